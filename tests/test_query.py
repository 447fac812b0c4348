"""C-FIND identifier parsing and attribute matching (dicomledger.dicom.query): pure, no I/O."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from dicomledger.dicom.query import (
    ATTRIBUTE_LEVEL,
    COUNT_ATTRIBUTES,
    PATIENT_ROOT,
    STUDY_ROOT,
    UNIQUE_KEY,
    Query,
    QueryError,
    parse_query,
    response_identifier,
)

# Many keys here are deliberately not valid DICOM values ("*" for a DA, "1?" for an IS):
# pydicom warns about them when they are set or read, which is beside the point.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")


def identifier(level: str | None = "STUDY", **keys: Any) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def query(level: str = "STUDY", model: str = STUDY_ROOT, **keys: Any) -> Query:
    return parse_query(identifier(level, **keys), model)


def matches(keyword: str, key: Any, stored: Any, level: str = "IMAGE") -> bool:
    """Whether a stored value matches a one-key query (IMAGE level: every key is matched)."""
    return query(level, PATIENT_ROOT, **{keyword: key}).matches({keyword: stored})


def raw_identifier(level: str, **keys: str) -> Dataset:
    """An identifier as received, values still undecoded: pydicom refuses to set an IS
    such as "1?" from Python but reads one off the wire as text."""
    ds = Dataset()
    for keyword, text in {"QueryRetrieveLevel": level, **keys}.items():
        tag = Tag(tag_for_keyword(keyword))
        data = text.encode("ascii") + (b" " if len(text) % 2 else b"")
        ds[tag] = RawDataElement(tag, None, len(data), data, 0, True, True)
    return ds


def wire(ds: Dataset) -> Dataset:
    """ds encoded the way it travels (implicit VR little endian) and read back raw, so
    values are decoded with its Specific Character Set, as pynetdicom hands them to us."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_dataset(fp, ds)
    return read_dataset(DicomBytesIO(fp.getvalue()), True, True)


# --- constants ----------------------------------------------------------------------------


def test_counts_and_unique_keys_are_supported_attributes() -> None:
    assert len(COUNT_ATTRIBUTES) == 6
    assert COUNT_ATTRIBUTES <= ATTRIBUTE_LEVEL.keys()
    assert all(ATTRIBUTE_LEVEL[kw] == level for level, kw in UNIQUE_KEY.items())


# --- levels and rejection statuses --------------------------------------------------------


def test_missing_level_is_rejected_with_a900() -> None:
    with pytest.raises(QueryError) as err:
        parse_query(identifier(None, PatientName="X*"), PATIENT_ROOT)
    assert err.value.status == 0xA900
    assert "Query/Retrieve Level" in str(err.value)


@pytest.mark.parametrize("level", ["", "FOO", "study", "STUDY\\SERIES"])
def test_invalid_level_is_rejected_with_a900(level: str) -> None:
    with pytest.raises(QueryError) as err:
        parse_query(identifier(level), PATIENT_ROOT)
    assert err.value.status == 0xA900


def test_study_root_refuses_patient_level_but_patient_root_accepts_it() -> None:
    with pytest.raises(QueryError) as err:
        query("PATIENT", STUDY_ROOT, PatientID="")
    assert err.value.status == 0xA900
    assert query("PATIENT", PATIENT_ROOT, PatientID="").level == "PATIENT"


@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
def test_every_level_below_patient_is_accepted_by_both_models(level: str) -> None:
    for model in (PATIENT_ROOT, STUDY_ROOT):
        q = query(level, model)
        assert (q.model, q.level) == (model, level)


def test_unknown_model_is_a_programming_error_not_a_query_error() -> None:
    with pytest.raises(ValueError) as err:
        parse_query(identifier("STUDY"), "worklist")
    assert not isinstance(err.value, QueryError)


# --- universal matching -------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "*", "***", " * "])
def test_universal_key_needs_no_matcher_and_matches_empty_stored_values(key: str) -> None:
    q = query("STUDY", StudyDescription=key, StudyDate=key, StudyInstanceUID=key)
    assert q.matchers == {}
    assert q.matches({})
    assert q.matches({"StudyDescription": "", "StudyDate": "", "StudyInstanceUID": ""})


def test_a_missing_record_key_counts_as_empty() -> None:
    q = query("STUDY", StudyDescription="HEAD")
    assert not q.matches({})
    assert q.matches({"StudyDescription": "HEAD"})


# --- single value matching ----------------------------------------------------------------


def test_single_value_is_exact_and_case_sensitive_for_non_pn() -> None:
    assert matches("AccessionNumber", "ACC1", "ACC1")
    assert not matches("AccessionNumber", "ACC1", "acc1")
    assert not matches("AccessionNumber", "ACC1", "ACC12")
    assert not matches("AccessionNumber", "ACC1", "")
    assert matches("Modality", "CT", "CT")
    assert not matches("Modality", "CT", "ct")


def test_single_value_ignores_leading_and_trailing_spaces() -> None:
    assert matches("StudyID", " 42 ", "42")
    assert matches("StudyID", "42", "42 ")
    assert not matches("StudyID", "4 2", "42")


def test_pn_single_value_is_case_insensitive() -> None:
    assert matches("PatientName", "smith^john", "SMITH^JOHN")
    assert matches("PatientName", "SMITH^JOHN", "Smith^John")
    assert not matches("PatientName", "SMITH^JOHN", "SMITH^JANE")
    # a family name alone is a different name, not a prefix match
    assert not matches("PatientName", "SMITH", "SMITH^JOHN")


def test_pn_trailing_component_separators_are_not_significant() -> None:
    assert matches("PatientName", "SMITH^JOHN^^", "SMITH^JOHN")
    assert matches("PatientName", "SMITH^JOHN", "SMITH^JOHN^^^")
    assert matches("PatientName", "SMITH^", "SMITH")
    assert not matches("PatientName", "SMITH^JOHN^^", "SMITH^JOHN^^MR")


def test_pn_key_with_one_group_may_match_any_stored_group() -> None:
    stored = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert matches("PatientName", "YAMADA^TAROU", stored)
    assert matches("PatientName", "山田^太郎", stored)
    assert not matches("PatientName", "山田^花子", stored)
    assert matches("PatientName", "yamada^tarou=山田^太郎=やまだ^たろう", stored)
    assert not matches("PatientName", "Yamada^Tarou=山田^花子", stored)


def test_is_single_value_compares_numbers() -> None:
    assert matches("SeriesNumber", "3", "3")
    assert matches("SeriesNumber", "3", "03")
    assert not matches("SeriesNumber", "3", "30")
    assert not matches("SeriesNumber", "3", "")
    with pytest.raises(QueryError) as err:
        parse_query(raw_identifier("IMAGE", InstanceNumber="three"), PATIENT_ROOT)
    assert err.value.status == 0xA900


# --- wild card matching -------------------------------------------------------------------


def test_star_matches_any_sequence_including_empty() -> None:
    assert matches("StudyDescription", "CT*", "CT")
    assert matches("StudyDescription", "CT*", "CT HEAD")
    assert matches("StudyDescription", "*HEAD*", "CT HEAD W/O")
    assert not matches("StudyDescription", "CT*", "MR HEAD")
    assert not matches("StudyDescription", "CT*", "")


def test_question_mark_matches_exactly_one_character() -> None:
    assert matches("AccessionNumber", "A?C", "ABC")
    assert not matches("AccessionNumber", "A?C", "AC")
    assert not matches("AccessionNumber", "A?C", "ABBC")
    assert matches("AccessionNumber", "A*C", "AC")
    assert matches("AccessionNumber", "A*C", "ABBC")


def test_wildcards_are_case_sensitive_except_for_pn() -> None:
    assert not matches("StudyDescription", "ct*", "CT HEAD")
    assert matches("PatientName", "smi?h*", "SMITH^JOHN")
    assert matches("ReferringPhysicianName", "*house*", "HOUSE^GREGORY")
    assert not matches("PatientName", "smi?h", "SMITH^JOHN")


def test_pn_wildcard_sees_stripped_component_separators() -> None:
    assert matches("PatientName", "SMITH^*", "SMITH")
    assert matches("PatientName", "SMITH^J*", "SMITH^JOHN^^")
    assert not matches("PatientName", "SMITH^J*", "SMITH")


def test_other_regex_characters_are_literal() -> None:
    assert matches("StudyDescription", "[CT].*", "[CT].x")
    assert not matches("StudyDescription", "[CT]*", "C")
    assert not matches("StudyDescription", "A.C", "ABC")


def test_wildcard_kind_and_no_exact_values() -> None:
    q = query("SERIES", Modality="C?", SeriesDescription="*AX*")
    assert q.matchers["Modality"].kind == "wildcard"
    assert q.matchers["SeriesDescription"].kind == "wildcard"
    assert q.exact("Modality") is None


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("StudyDate", "2020*"),
        ("StudyDate", "202001?1"),
        ("StudyTime", "10*"),
        ("StudyInstanceUID", "1.2.*"),
        ("SeriesNumber", "1?"),
    ],
)
def test_wildcards_on_vrs_without_wildcard_matching_are_rejected(keyword: str, value: str) -> None:
    with pytest.raises(QueryError) as err:
        parse_query(raw_identifier("IMAGE", **{keyword: value}), PATIENT_ROOT)
    assert err.value.status == 0xA900
    assert keyword in str(err.value)
    assert value not in str(err.value)  # values carry PHI; the message names the attribute


# --- range matching -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "stored", "expected"),
    [
        ("20200101-20200131", "20200101", True),  # inclusive start
        ("20200101-20200131", "20200131", True),  # inclusive end
        ("20200101-20200131", "20200115", True),
        ("20200101-20200131", "20191231", False),
        ("20200101-20200131", "20200201", False),
        ("20200101-", "20200101", True),  # open end
        ("20200101-", "29991231", True),
        ("20200101-", "20191231", False),
        ("-20200101", "19000101", True),  # open start
        ("-20200101", "20200101", True),
        ("-20200101", "20200102", False),
        ("20200101", "20200101", True),  # single value
        ("20200101", "20200102", False),
        ("20200101-20200131", "", False),  # empty stored value never in a range
        ("-20200131", "", False),
        ("2020.01.01-2020.01.31", "20200110", True),  # ACR-NEMA dates, key and stored
        ("20200101-20200131", "2020.01.10", True),
        ("20200101-20200131", "not a date", False),
        (" 20200101 - 20200131 ", "20200110", True),
    ],
)
def test_date_range(key: str, stored: str, expected: bool) -> None:
    assert matches("StudyDate", key, stored) is expected


def test_date_range_bounds_are_exposed_normalised() -> None:
    m = query("STUDY", StudyDate="2020.01.01-").matchers["StudyDate"]
    assert (m.kind, m.lower, m.upper) == ("range", "20200101", None)
    assert query("STUDY", StudyDate="20200101").exact("StudyDate") is None


@pytest.mark.parametrize(
    ("key", "stored", "expected"),
    [
        ("101500-103000", "101500", True),
        ("101500-103000", "103000", True),
        ("101500-103000", "103000.5", True),  # still within second 10:30:00
        ("101500-103000", "103001", False),
        ("101500-103000", "101459.999999", False),
        ("1015-1030", "103059", True),  # partial upper bound: to the end of that minute
        ("1015-1030", "103100", False),
        ("10-", "100000", True),
        ("10-", "095959", False),
        ("-10", "105959.999999", True),  # "10" as upper bound: 10:59:59.999999
        ("-10", "110000", False),
        ("1015", "101530", True),  # single partial value: the whole minute
        ("1015", "101459", False),
        ("1015", "101600", False),
        ("101530.5", "101530.5", True),
        ("101530.5", "101530.59", True),
        ("101530.5", "101530.6", False),
        ("10:15-10:30", "102000", True),  # ACR-NEMA times
        ("1015-1030", "10:20:00", True),
        ("1015-1030", "", False),
        ("1015-1030", "10", False),  # a stored partial time is taken at its first instant
        ("1000-1030", "10", True),
    ],
)
def test_time_range_with_partial_precision(key: str, stored: str, expected: bool) -> None:
    assert matches("StudyTime", key, stored) is expected


def test_time_range_bounds() -> None:
    m = query("STUDY", StudyTime="10-1015").matchers["StudyTime"]
    assert (m.lower, m.upper) == ("100000.000000", "101559.999999")


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("StudyDate", "2020-01-01"),  # dashes inside a date
        ("StudyDate", "2020-01-01-2020-01-31"),
        ("StudyDate", "2020010"),
        ("StudyDate", "2020AB01"),
        ("StudyDate", "20201301"),  # no month 13
        ("StudyDate", "20200131-20200101"),  # start after end
        ("StudyDate", "-"),
        ("StudyTime", "2500"),
        ("StudyTime", "101"),
        ("StudyTime", "10.5"),  # fraction without seconds
        ("StudyTime", "1030-1015"),
        ("PatientBirthDate", "1970-"),
    ],
)
def test_malformed_ranges_are_rejected_with_a900(keyword: str, value: str) -> None:
    with pytest.raises(QueryError) as err:
        query("STUDY", PATIENT_ROOT, **{keyword: value})
    assert err.value.status == 0xA900
    assert keyword in str(err.value)


def test_birth_date_matches_at_a_lower_level() -> None:
    q = query("SERIES", PATIENT_ROOT, PatientBirthDate="19700101-19701231")
    assert q.matches({"PatientBirthDate": "19700615"})
    assert not q.matches({"PatientBirthDate": "19710615"})


# --- list matching ------------------------------------------------------------------------


def test_list_of_uid_matching() -> None:
    q = query("STUDY", StudyInstanceUID="1.2.3\\1.2.4")
    m = q.matchers["StudyInstanceUID"]
    assert (m.kind, m.values) == ("list", ("1.2.3", "1.2.4"))
    assert q.matches({"StudyInstanceUID": "1.2.4"})
    assert not q.matches({"StudyInstanceUID": "1.2.5"})
    assert not q.matches({"StudyInstanceUID": "1.2.3.4"})  # no prefix matching
    assert not q.matches({"StudyInstanceUID": ""})


def test_uid_list_given_as_python_list_and_single_uid() -> None:
    assert matches("SOPInstanceUID", ["1.2", "1.3"], "1.3")
    assert not matches("SOPInstanceUID", ["1.2", "1.3"], "1.4")
    assert matches("SOPInstanceUID", "1.2", "1.2")
    assert not matches("SOPInstanceUID", "1.2", "1.20")


def test_modalities_in_study_matches_if_any_stored_modality_is_requested() -> None:
    q = query("STUDY", ModalitiesInStudy="CT\\MR")
    assert q.matches({"ModalitiesInStudy": ["MR", "SR"]})
    assert q.matches({"ModalitiesInStudy": ["CT"]})
    assert not q.matches({"ModalitiesInStudy": ["US", "SR"]})
    assert not q.matches({"ModalitiesInStudy": []})
    one = query("STUDY", ModalitiesInStudy="CT")
    assert one.matches({"ModalitiesInStudy": ["MR", "CT"]})
    assert not one.matches({"ModalitiesInStudy": ["MR"]})


def test_list_items_may_use_wildcards_on_text_vrs() -> None:
    q = query("STUDY", ModalitiesInStudy="C?\\MR")
    assert q.matches({"ModalitiesInStudy": ["CR"]})
    assert not q.matches({"ModalitiesInStudy": ["CTX"]})
    assert q.exact("ModalitiesInStudy") is None


def test_a_star_in_a_list_is_universal() -> None:
    q = query("STUDY", ModalitiesInStudy="CT\\*")
    assert q.matchers == {}
    assert q.matches({"ModalitiesInStudy": []})


def test_multi_valued_date_is_rejected() -> None:
    with pytest.raises(QueryError) as err:
        query("STUDY", StudyDate="20200101\\20200102")
    assert err.value.status == 0xA900


# --- exact() ------------------------------------------------------------------------------


def test_exact_values_for_single_and_list_matchers() -> None:
    q = query(
        "IMAGE",
        PATIENT_ROOT,
        PatientID=" P1 ",
        StudyInstanceUID="1.2\\1.3",
        Modality="CT",
        SOPInstanceUID="",
        PatientName="SMITH^JOHN",
        SeriesNumber="2",
        StudyDate="20200101",
        AccessionNumber="A*",
    )
    assert q.exact("PatientID") == ("P1",)
    assert q.exact("StudyInstanceUID") == ("1.2", "1.3")
    assert q.exact("Modality") == ("CT",)
    assert q.exact("SOPInstanceUID") is None  # universal
    assert q.exact("PatientName") is None  # case-insensitive: SQL equality would miss
    assert q.exact("SeriesNumber") is None  # numeric: "02" == "2"
    assert q.exact("StudyDate") is None  # a range
    assert q.exact("AccessionNumber") is None  # wildcard
    assert q.exact("StudyDescription") is None  # not in the identifier


# --- levels of keys -----------------------------------------------------------------------


def test_lower_level_key_is_ignored_for_matching_but_still_returned() -> None:
    ds = raw_identifier("STUDY", Modality="CT", SOPInstanceUID="1.2.3", SeriesNumber="x")
    q = parse_query(ds, STUDY_ROOT)  # "x" is no IS, but below the level nobody looks
    assert q.matchers == {}
    assert q.matches({"Modality": "MR", "SOPInstanceUID": "9.9"})
    assert q.return_keys == ("SOPInstanceUID", "Modality", "SeriesNumber")  # tag order
    response = response_identifier(q, {"Modality": "MR", "SOPInstanceUID": "9.9"}, "GW")
    assert response.Modality == ""
    assert response.SOPInstanceUID == ""


def test_same_key_is_matched_at_its_own_level() -> None:
    q = query("SERIES", Modality="CT")
    assert q.matches({"Modality": "CT"})
    assert not q.matches({"Modality": "MR"})


def test_patient_keys_match_in_study_root_study_queries() -> None:
    q = query("STUDY", STUDY_ROOT, PatientName="DOE*", PatientID="P1")
    assert q.matches({"PatientName": "DOE^JANE", "PatientID": "P1"})
    assert not q.matches({"PatientName": "ROE^JANE", "PatientID": "P1"})
    assert not q.matches({"PatientName": "DOE^JANE", "PatientID": "P2"})


def test_counts_are_never_matched() -> None:
    q = query("STUDY", NumberOfStudyRelatedInstances="5", NumberOfPatientRelatedStudies="1")
    assert q.matchers == {}
    assert q.matches({"NumberOfStudyRelatedInstances": 7})
    assert "NumberOfStudyRelatedInstances" in q.return_keys


# --- return keys --------------------------------------------------------------------------


def test_return_keys_are_every_requested_keyword_in_tag_order() -> None:
    ds = identifier("STUDY")
    ds.StudyInstanceUID = ""  # (0020,000D)
    ds.PatientName = "X*"  # (0010,0010)
    ds.SpecificCharacterSet = "ISO_IR 100"  # (0008,0005): not a return key
    ds.InstitutionName = ""  # (0008,0080): unsupported, still returned
    ds.StudyDate = ""  # (0008,0020)
    ds.add_new(0x00081110, "SQ", [])  # ReferencedStudySequence
    ds.add_new(0x00091010, "LO", "private")  # private: has no keyword
    q = parse_query(ds, STUDY_ROOT)
    assert q.return_keys == (
        "StudyDate",
        "InstitutionName",
        "ReferencedStudySequence",
        "PatientName",
        "StudyInstanceUID",
    )
    assert set(q.matchers) == {"PatientName"}


# --- character sets -----------------------------------------------------------------------


def test_utf8_identifier_from_the_wire() -> None:
    ds = identifier("PATIENT", PatientName="Müller*", PatientID="")
    ds.SpecificCharacterSet = "ISO_IR 192"
    received = wire(ds)
    q = parse_query(received, PATIENT_ROOT)
    assert q.matches({"PatientName": "MÜLLER^Hans"})
    assert q.matches({"PatientName": "müller"})
    assert not q.matches({"PatientName": "Muller^Hans"})
    assert q.return_keys == ("PatientName", "PatientID")


def test_latin1_identifier_from_the_wire() -> None:
    ds = identifier("PATIENT", PatientName="M?ller")
    ds.SpecificCharacterSet = "ISO_IR 100"
    q = parse_query(wire(ds), PATIENT_ROOT)
    assert q.matches({"PatientName": "Müller"})  # "?" is one character, not one byte
    assert not q.matches({"PatientName": "Mueller"})


# --- response_identifier ------------------------------------------------------------------


def test_response_values_vrs_and_counts() -> None:
    q = query(
        "STUDY",
        PATIENT_ROOT,
        PatientName="",
        StudyInstanceUID="",
        StudyDate="20200101-",
        ModalitiesInStudy="",
        NumberOfStudyRelatedInstances="",
        NumberOfStudyRelatedSeries="",
        StudyDescription="",
        InstitutionName="",
    )
    record = {
        "PatientName": "DOE^JANE",
        "StudyInstanceUID": "1.2.3",
        "StudyDate": "20200105",
        "ModalitiesInStudy": ["CT", "MR"],
        "NumberOfStudyRelatedInstances": 12,
        "NumberOfStudyRelatedSeries": 2,
        "InstitutionName": "should not leak: unsupported",
        "PatientID": "PID-1",  # not requested, but the unique key above the level
        "AccessionNumber": "not requested",
    }
    ds = response_identifier(q, record, "DICOMLEDGER")
    assert ds.QueryRetrieveLevel == "STUDY"
    assert ds.RetrieveAETitle == "DICOMLEDGER"
    assert str(ds.PatientName) == "DOE^JANE"
    assert ds["PatientName"].VR == "PN"
    assert ds.StudyInstanceUID == "1.2.3"
    assert ds["StudyDate"].VR == "DA" and ds.StudyDate == "20200105"
    assert isinstance(ds.ModalitiesInStudy, MultiValue)
    assert list(ds.ModalitiesInStudy) == ["CT", "MR"]
    assert ds["ModalitiesInStudy"].VR == "CS"
    assert ds["NumberOfStudyRelatedInstances"].VR == "IS"
    assert ds.NumberOfStudyRelatedInstances == 12
    assert ds.NumberOfStudyRelatedSeries == 2
    assert ds.StudyDescription == ""  # missing from the record: empty
    assert ds["InstitutionName"].VR == "LO"
    assert ds["InstitutionName"].is_empty  # unsupported: empty
    assert "AccessionNumber" not in ds  # not requested
    assert ds.PatientID == "PID-1"  # unique keys of the level and above are always returned
    assert "SpecificCharacterSet" not in ds  # all ASCII
    assert {e.keyword for e in ds} == {
        "QueryRetrieveLevel",
        "RetrieveAETitle",
        "PatientID",
        *q.return_keys,
    }


def test_response_empty_unsupported_keys_use_their_dictionary_vr() -> None:
    ds = identifier("STUDY", StudyInstanceUID="")
    ds.add_new(0x00081110, "SQ", [])  # ReferencedStudySequence
    ds.add_new(0x00201206, "IS", None)  # NumberOfStudyRelatedSeries (supported count)
    ds.add_new(0x00100030, "DA", "")  # PatientBirthDate, missing in the record
    ds.add_new(0x00081030, "LO", "")  # StudyDescription
    ds.add_new(0x00280010, "US", None)  # Rows: unsupported, binary VR
    q = parse_query(ds, STUDY_ROOT)
    out = response_identifier(q, {"StudyInstanceUID": "1.2"}, "GW")
    assert out["ReferencedStudySequence"].VR == "SQ"
    assert len(out.ReferencedStudySequence) == 0
    assert out["Rows"].VR == "US" and out["Rows"].is_empty
    assert out["PatientBirthDate"].VR == "DA" and out["PatientBirthDate"].is_empty
    assert out["NumberOfStudyRelatedSeries"].is_empty
    # the response must survive encoding
    back = wire(out)
    assert back.StudyInstanceUID == "1.2"
    assert back.RetrieveAETitle == "GW"


def test_response_character_set_only_when_needed() -> None:
    q = query("PATIENT", PATIENT_ROOT, PatientName="", PatientID="")
    ascii_only = response_identifier(q, {"PatientName": "DOE^JANE", "PatientID": "P1"}, "GW")
    assert "SpecificCharacterSet" not in ascii_only
    utf8 = response_identifier(q, {"PatientName": "Müller^Hans", "PatientID": "P1"}, "GW")
    assert utf8.SpecificCharacterSet == "ISO_IR 192"
    back = wire(utf8)  # encoded as UTF-8 and decoded again
    assert str(back.PatientName) == "Müller^Hans"


def test_response_requested_retrieve_ae_title_is_filled_in() -> None:
    q = query("STUDY", RetrieveAETitle="", StudyInstanceUID="")
    ds = response_identifier(q, {"StudyInstanceUID": "1.2"}, "GW")
    assert ds.RetrieveAETitle == "GW"


def test_response_for_a_lower_level_count_is_empty() -> None:
    q = query("STUDY", NumberOfSeriesRelatedInstances="", NumberOfStudyRelatedInstances="")
    ds = response_identifier(
        q, {"NumberOfSeriesRelatedInstances": 4, "NumberOfStudyRelatedInstances": 9}, "GW"
    )
    assert ds["NumberOfSeriesRelatedInstances"].is_empty
    assert ds.NumberOfStudyRelatedInstances == 9
