"""C-FIND identifiers: parsing and attribute matching (PS3.4 C.2.2.2 and C.4.1), pure.

No I/O here: ``parse_query`` turns a request identifier into a ``Query``; the caller
fetches candidate records (a mapping keyword -> stored text, ``""`` when absent), keeps
those for which ``Query.matches`` holds and builds each answer with ``response_identifier``.

Choices where the standard leaves room (each one is documented where it is made):

* Every problem with the identifier is answered 0xA900 "Identifier does not match SOP
  Class", as DCMTK's dcmqrscp (missing level, level outside the model), dcm4che
  (``QueryRetrieveLevel2``: missing or invalid level) and pynetdicom's qrscp app do.
  0xC000 "Unable to process" is kept for an identifier we cannot even decode.
* Relational-lenient: keys above the query level are matched like keys at the level (no
  unique-key-only rule); a value given for a key *below* the query level is ignored, and
  that key is returned empty.
* PN matching is case-insensitive (PS3.4 C.2.2.2.1 lets the SCP choose); all other text
  matching is case-sensitive. Leading/trailing spaces never matter.
* DA and TM keys always use range matching: a single value is the range from itself to
  itself, widened to the precision it was given with ("1015" is 10:15:00-10:15:59.999999).
* No supported attribute has VR DT, so DT range matching is not implemented.

Values in messages: a QueryError's text names the attribute and what is wrong, never the
value, because identifiers carry PHI (names, birth dates) and the message goes to the log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA

from dicomledger.common.errors import DicomError

__all__ = [
    "ATTRIBUTE_LEVEL",
    "COUNT_ATTRIBUTES",
    "IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS",
    "LEVELS",
    "PATIENT_ROOT",
    "STUDY_ROOT",
    "UNABLE_TO_PROCESS",
    "UNIQUE_KEY",
    "Matcher",
    "Query",
    "QueryError",
    "parse_query",
    "response_identifier",
]

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
PATIENT_ROOT = "patient"
STUDY_ROOT = "study"

IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000

ATTRIBUTE_LEVEL: dict[str, str] = {
    "PatientName": "PATIENT",
    "PatientID": "PATIENT",
    "PatientBirthDate": "PATIENT",
    "PatientSex": "PATIENT",
    "NumberOfPatientRelatedStudies": "PATIENT",
    "NumberOfPatientRelatedSeries": "PATIENT",
    "NumberOfPatientRelatedInstances": "PATIENT",
    "StudyDate": "STUDY",
    "StudyTime": "STUDY",
    "AccessionNumber": "STUDY",
    "StudyID": "STUDY",
    "StudyDescription": "STUDY",
    "ModalitiesInStudy": "STUDY",
    "ReferringPhysicianName": "STUDY",
    "StudyInstanceUID": "STUDY",
    "NumberOfStudyRelatedSeries": "STUDY",
    "NumberOfStudyRelatedInstances": "STUDY",
    "SeriesInstanceUID": "SERIES",
    "Modality": "SERIES",
    "SeriesNumber": "SERIES",
    "SeriesDescription": "SERIES",
    "NumberOfSeriesRelatedInstances": "SERIES",
    "SOPInstanceUID": "IMAGE",
    "InstanceNumber": "IMAGE",
    "SOPClassUID": "IMAGE",
}

# Return-only: computed by the SCP, so a value the requester gives is meaningless (C.6.1.1.x)
COUNT_ATTRIBUTES: frozenset[str] = frozenset(
    {
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "NumberOfSeriesRelatedInstances",
    }
)

UNIQUE_KEY: dict[str, str] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}

# VRs for which PS3.4 C.2.2.2.4 defines wild card matching; elsewhere "*" and "?" are errors
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
RANGE_VRS = frozenset({"DA", "TM"})

# Present in the identifier but neither a matching nor a return key
_NOT_RETURN_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet"})

MatchKind = Literal["universal", "single", "wildcard", "range", "list"]
StoredValue = str | list[str]


class QueryError(DicomError, ValueError):
    """The identifier cannot be used; ``status`` is the DIMSE failure status to answer with."""

    def __init__(self, message: str, status: int = IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------
# Value normalisation


def _text(value: str) -> str:
    # Padding is not significant (PS3.5 6.2: trailing SPACE, UI trailing NUL)
    return value.strip(" \t\r\n\x00")


def _pn_groups(value: str) -> list[str]:
    """A PN's component groups, lower-cased, without trailing component separators.

    PS3.5 6.2.1: trailing "^" and trailing empty "=" groups carry nothing, so
    "SMITH^JOHN^^" and "SMITH^JOHN" are the same name. lower() rather than casefold():
    casefold() turns "ß" into "ss", and then "?" would no longer be one stored character.
    """
    groups = [g.lstrip(" ").rstrip("^ ") for g in _text(value).lower().split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return groups


def _pn_key(value: str) -> str:
    return "=".join(_pn_groups(value))


def _date(value: str) -> str | None:
    """YYYYMMDD, or None if not a date. pydicom's DA checks the calendar and also takes
    the ACR-NEMA "YYYY.MM.DD" form."""
    try:
        parsed = DA(_text(value))
    except (ValueError, TypeError, OverflowError):
        return None
    return None if parsed is None else f"{parsed.year:04}{parsed.month:02}{parsed.day:02}"


# HH[MM[SS[.F{1,6}]]]; pydicom's TM parses to datetime.time, losing the precision the key
# was given with, which is exactly what the range bounds need.
_TIME = re.compile(
    r"(?P<h>[01]\d|2[0-3])(?:(?P<m>[0-5]\d)(?:(?P<s>[0-5]\d|60)(?:\.(?P<f>\d{1,6}))?)?)?"
)


def _time_bounds(value: str) -> tuple[str, str] | None:
    """The first and last instants "HHMMSS.ffffff" a (partial) TM value stands for.

    PS3.5 6.2: omitted trailing components mean the value is only precise to the ones
    given, so "10" covers 10:00:00.000000-10:59:59.999999. The ACR-NEMA "HH:MM:SS" form
    is accepted by dropping the colons.
    """
    match = _TIME.fullmatch(_text(value).replace(":", ""))
    if match is None:
        return None
    h, m, s, f = match.group("h", "m", "s", "f")
    low = f"{h}{m or '00'}{s or '00'}.{(f or '').ljust(6, '0')}"
    high = f"{h}{m or '59'}{s or '59'}.{(f or '').ljust(6, '9')}"
    return low, high


def _stored_instant(vr: str, value: str) -> str | None:
    # A stored partial time is taken at its first instant; malformed stored data never
    # matches a range (and is not the requester's fault, so no error).
    if vr == "DA":
        return _date(value)
    bounds = _time_bounds(value)
    return None if bounds is None else bounds[0]


def _key_bounds(vr: str, value: str) -> tuple[str, str] | None:
    if vr == "DA":
        day = _date(value)
        return None if day is None else (day, day)
    return _time_bounds(value)


@lru_cache(maxsize=512)
def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    # "*": any sequence, including empty; "?": exactly one character (PS3.4 C.2.2.2.4).
    # Everything else is literal, so fnmatch ("[...]" classes) is not usable. Runs of "*"
    # collapse to one to keep backtracking linear-ish on hostile patterns.
    pattern = re.sub(r"\*+", "*", pattern)
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex, re.DOTALL)


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


# ---------------------------------------------------------------------------------------
# Matching


@dataclass(frozen=True)
class Matcher:
    """One attribute's matching rule, built from the identifier's value.

    ``values``: for "single" and "list", the key values; for "wildcard", the pattern;
    normalised as compared (stripped; PN lower-cased without trailing "^"; IS as an
    integer's text). ``lower``/``upper``: for "range", the inclusive bounds as
    YYYYMMDD (DA) or HHMMSS.ffffff (TM), None when open; text order is time order.
    """

    keyword: str
    kind: MatchKind
    vr: str = ""
    values: tuple[str, ...] = ()
    lower: str | None = None
    upper: str | None = None

    def matches(self, value: StoredValue) -> bool:
        """Whether a stored value matches; ``value`` is its text ("" if absent) or, for a
        multi-valued attribute (ModalitiesInStudy), the list of its values: then any one
        value matching is enough."""
        if self.kind == "universal":
            return True  # also matches empty stored values (C.2.2.2.3)
        stored = value if isinstance(value, list) else [value]
        return any(self._matches_one(v) for v in (stored or [""]))

    def _matches_one(self, value: str) -> bool:
        if self.kind == "range":
            instant = _stored_instant(self.vr, value)
            if instant is None:
                return False  # an empty or malformed stored value is outside every range
            return (self.lower is None or instant >= self.lower) and (
                self.upper is None or instant <= self.upper
            )
        if self.vr == "PN":
            return self._matches_pn(value)
        if self.vr == "IS":
            try:
                stored = str(int(_text(value)))
            except ValueError:
                return False
            return stored in self.values
        stored = _text(value)
        return any(self._item_matches(item, stored) for item in self.values)

    def _item_matches(self, item: str, stored: str) -> bool:
        if self.vr in WILDCARD_VRS and _has_wildcard(item):
            return _wildcard_regex(item).fullmatch(stored) is not None
        return item == stored

    def _matches_pn(self, value: str) -> bool:
        groups = _pn_groups(value)
        for item in self.values:
            # A key with one component group (the usual case) may name the patient in any
            # of the stored groups: alphabetic, ideographic or phonetic.
            candidates = ["=".join(groups)] if "=" in item else (groups or [""])
            for stored in candidates:
                if _has_wildcard(item):
                    # "SMITH^*" must match a stored "SMITH": a stored name stands for itself
                    # with any number of the trailing "^" that were stripped (5 components).
                    regex = _wildcard_regex(item)
                    padded = (stored + "^" * n for n in range(max(1, 5 - stored.count("^"))))
                    if any(regex.fullmatch(p) for p in padded):
                        return True
                elif item == stored:
                    return True
        return False


@dataclass(frozen=True)
class Query:
    model: str  # PATIENT_ROOT or STUDY_ROOT
    level: str  # one of LEVELS
    matchers: dict[str, Matcher] = field(default_factory=dict)  # non-universal only
    return_keys: tuple[str, ...] = ()  # requested keywords, in tag order

    def matches(self, record: Mapping[str, StoredValue | int]) -> bool:
        """Whether every matcher accepts the record's value (a missing key is "")."""
        for keyword, matcher in self.matchers.items():
            value = record.get(keyword, "")
            if isinstance(value, int):
                value = str(value)
            if not matcher.matches(value):
                return False
        return True

    def exact(self, keyword: str) -> tuple[str, ...] | None:
        """The values a stored value must equal, for pre-filtering in SQL, or None.

        Only where SQL text equality is the same test as ``matches``: "single" or "list"
        with no wild cards, and not PN (case-insensitive, "^"-insensitive) nor IS
        (numeric: "01" == "1"). DA/TM keys are ranges; use ``lower``/``upper`` instead.
        """
        matcher = self.matchers.get(keyword)
        if matcher is None or matcher.kind not in ("single", "list") or matcher.vr in ("PN", "IS"):
            return None
        if matcher.vr in WILDCARD_VRS and any(_has_wildcard(v) for v in matcher.values):
            return None
        return matcher.values


def _element_values(elem: DataElement) -> list[str]:
    """The element's values as text; pydicom has already decoded them with the
    identifier's Specific Character Set (PN values are PersonName)."""
    value = elem.value
    if value is None:
        return []
    items: Iterable[object] = value if isinstance(value, MultiValue | list) else [value]
    texts: list[str] = []
    for item in items:
        if isinstance(item, bytes):  # a VR pydicom could not convert; UIDs/CS are ASCII
            item = item.decode("utf-8", "replace")
        texts.append(str(item))
    return texts


def _build_matcher(keyword: str, vr: str, texts: list[str]) -> Matcher:
    items = [t for t in (_text(x) for x in texts) if t]
    # Empty, or any value made only of "*": universal (C.2.2.2.3, C.2.2.2.4)
    if not items or any(set(t) == {"*"} for t in items):
        return Matcher(keyword, "universal", vr)

    if vr in RANGE_VRS:
        if len(items) > 1:
            raise QueryError(f"{keyword}: multiple values are not supported for a {vr} key")
        lower, upper = _parse_range(keyword, vr, items[0])
        return Matcher(keyword, "range", vr, lower=lower, upper=upper)

    if vr not in WILDCARD_VRS and any(_has_wildcard(t) for t in items):
        raise QueryError(f"{keyword}: wild cards are not allowed for VR {vr} (PS3.4 C.2.2.2.4)")
    if vr == "IS":
        try:
            items = [str(int(t)) for t in items]
        except ValueError:
            raise QueryError(f"{keyword}: not an integer string") from None
    if vr == "PN":
        items = [_pn_key(t) for t in items]

    if len(items) > 1:
        # List of UID matching (C.2.2.2.2), or for other VRs (ModalitiesInStudy "CT\MR"):
        # a match on any one value
        return Matcher(keyword, "list", vr, tuple(items))
    if vr in WILDCARD_VRS and _has_wildcard(items[0]):
        return Matcher(keyword, "wildcard", vr, (items[0],))
    return Matcher(keyword, "single", vr, (items[0],))


def _parse_range(keyword: str, vr: str, text: str) -> tuple[str | None, str | None]:
    """Inclusive bounds of "A-B", "A-", "-B" or a single "A" (PS3.4 C.2.2.2.5)."""
    form = "YYYYMMDD" if vr == "DA" else "HH[MM[SS[.FFFFFF]]]"
    malformed = QueryError(
        f"{keyword}: malformed {vr} value or range (expected {form}, optionally as "
        f"'A-B', 'A-' or '-B'; wild cards other than a lone '*' are not allowed)"
    )
    if _has_wildcard(text) or text.count("-") > 1:
        raise malformed
    if "-" in text:
        first, last = (part.strip() for part in text.split("-"))
        if not first and not last:
            raise malformed
    else:
        first = last = text
    lower_bounds = _key_bounds(vr, first) if first else None
    upper_bounds = _key_bounds(vr, last) if last else None
    if (first and lower_bounds is None) or (last and upper_bounds is None):
        raise malformed
    lower = lower_bounds[0] if lower_bounds else None
    upper = upper_bounds[1] if upper_bounds else None
    if lower is not None and upper is not None and lower > upper:
        raise QueryError(f"{keyword}: range start is after its end")
    return lower, upper


def _level_index(keyword: str, model: str) -> int:
    level = ATTRIBUTE_LEVEL[keyword]
    if model == STUDY_ROOT and level == "PATIENT":
        level = "STUDY"  # Study Root has no patient level: these are study attributes
    return LEVELS.index(level)


def parse_query(identifier: Dataset, model: str) -> Query:
    """The Query a C-FIND request identifier asks for, under the Patient or Study Root model.

    QueryError (with its DIMSE status) if the identifier is not usable.
    """
    if model not in (PATIENT_ROOT, STUDY_ROOT):
        raise ValueError(f"unknown query/retrieve model {model!r}")
    try:
        # Iterating a Dataset yields elements in tag order, converting raw elements with the
        # identifier's Specific Character Set (so a UTF-8 "Müller*" arrives as text).
        elements = [(elem, keyword_for_tag(elem.tag)) for elem in identifier]
        has_level = "QueryRetrieveLevel" in identifier
        level_values = _element_values(identifier["QueryRetrieveLevel"]) if has_level else []
    except (ValueError, TypeError, LookupError, UnicodeError) as exc:
        message = f"identifier cannot be decoded: {type(exc).__name__}"
        raise QueryError(message, UNABLE_TO_PROCESS) from exc

    # Missing or invalid level: A900, not C000 (see the module docstring). Strict CS
    # comparison: "study" is not a Query/Retrieve Level.
    if len(level_values) != 1 or not _text(level_values[0]):
        raise QueryError("Query/Retrieve Level (0008,0052) is missing or not single-valued")
    level = _text(level_values[0])
    if level not in LEVELS:
        raise QueryError("Query/Retrieve Level (0008,0052) is not PATIENT, STUDY, SERIES or IMAGE")
    if model == STUDY_ROOT and level == "PATIENT":
        raise QueryError("Query/Retrieve Level PATIENT is not part of the Study Root model")
    level_index = LEVELS.index(level)

    return_keys: list[str] = []
    matchers: dict[str, Matcher] = {}
    for elem, keyword in elements:
        if not keyword or keyword in _NOT_RETURN_KEYS:
            continue  # private/unknown tags cannot be named by keyword, so not returned
        return_keys.append(keyword)
        if keyword not in ATTRIBUTE_LEVEL or keyword in COUNT_ATTRIBUTES:
            continue  # unsupported keys and counts are returned, never matched
        if _level_index(keyword, model) > level_index:
            continue  # below the query level: ignored for matching, returned empty
        matcher = _build_matcher(keyword, dictionary_VR(elem.tag), _element_values(elem))
        if matcher.kind != "universal":
            matchers[keyword] = matcher
    return Query(model, level, matchers, tuple(return_keys))


# ---------------------------------------------------------------------------------------
# Responses


def response_identifier(
    query: Query, record: Mapping[str, StoredValue | int], retrieve_ae: str
) -> Dataset:
    """The C-FIND response identifier for one matching record (PS3.4 C.4.1.1.3.2).

    Every requested key, with the record's value; empty when the record has none, when
    we do not support the attribute, or when it belongs below the query level. Unique keys
    of the query level and above are always returned.
    """
    ds = Dataset()
    ds.QueryRetrieveLevel = query.level
    level_index = LEVELS.index(query.level)
    for keyword in query.return_keys:
        tag = tag_for_keyword(keyword)
        if tag is None:  # cannot happen: return keys come from the data dictionary
            continue
        vr = dictionary_VR(tag).split(" or ")[0]  # e.g. "US or SS": either is fine empty
        value: object = empty_value_for_VR(vr)
        supported = keyword in ATTRIBUTE_LEVEL and _level_index(keyword, query.model) <= level_index
        stored = record.get(keyword) if supported else None
        if stored is not None and stored != "" and stored != []:
            value = _response_value(vr, stored)
        ds.add_new(tag, vr, value)
    # The unique keys of the level and the levels above, even if not asked for: a
    # workstation needs them to retrieve what it found (PS3.4 C.4.1.2.2.1 hierarchy).
    top = 0 if query.model == PATIENT_ROOT else 1
    for level in LEVELS[top : level_index + 1]:
        keyword = UNIQUE_KEY[level]
        if keyword not in ds and record.get(keyword):
            setattr(ds, keyword, record[keyword])
    ds.RetrieveAETitle = retrieve_ae
    if not all(_is_ascii(elem.value) for elem in ds):
        # Values are decoded text; UTF-8 can carry any of them (PS3.5 6.1.2.5.3)
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _response_value(vr: str, stored: StoredValue | int) -> object:
    if isinstance(stored, list):
        return [str(v) for v in stored]  # multi-valued: ModalitiesInStudy
    if vr == "IS":
        try:
            return int(stored)  # counts arrive as int; IS text like "3" too
        except ValueError:
            return str(stored)  # keep what is stored; pydicom warns about it, not us
    if isinstance(stored, int):
        return str(stored)
    if vr == "CS" and "\\" in stored:
        return stored.split("\\")  # a multi-valued CS stored as "CT\\MR" text
    return stored


def _is_ascii(value: object) -> bool:
    if isinstance(value, MultiValue | list):
        return all(_is_ascii(v) for v in value)
    return value is None or isinstance(value, int) or str(value).isascii()
