"""What the gateway needs from a received instance's header, and what it refuses in one."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from dicomledger.common.errors import DicomError

# Deepest nesting of sequences we accept (a top-level sequence is depth 1). Retrieval has
# pydicom read and write the whole dataset, recursively, and a few hundred levels exhaust
# Python's recursion limit: an instance we could not serve is refused at receive (0xC000).
# Real objects stay far below this (structured report content trees: about ten levels).
MAX_SEQUENCE_DEPTH = 64

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Explicit VRs with a 4-byte length (pydicom's list): every walk over raw elements uses this one
LONG_LENGTH_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)


class InstanceError(DicomError, ValueError):
    """The dataset cannot be stored; the message names the missing or malformed attribute."""


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician: str
    modality: str
    series_number: str
    series_description: str
    instance_number: str
    header_sha256: bytes  # SHA-256 of the dataset bytes before Pixel Data: tells header edits apart


def sequence_depth_exceeds(ds: Dataset, limit: int = MAX_SEQUENCE_DEPTH) -> bool:
    """Whether sequences in ``ds`` nest deeper than ``limit``, without recursion: pydicom
    keeps a defined-length sequence as raw bytes until asked, so those are walked as bytes."""
    datasets: list[tuple[Dataset, int]] = [(ds, 0)]
    while datasets:
        current, depth = datasets.pop()
        for elem in current._dict.values():
            if isinstance(elem, RawDataElement):
                if _raw_is_sequence(elem) and elem.value:
                    if depth + 1 > limit or _raw_depth_exceeds(
                        elem.value, depth + 1, elem.is_implicit_VR, elem.is_little_endian, limit
                    ):
                        return True
            elif isinstance(elem, DataElement) and elem.VR == "SQ":
                if depth + 1 > limit:
                    return True
                datasets += [(item, depth + 1) for item in elem.value]
    return False


def _raw_is_sequence(elem: RawDataElement) -> bool:
    vr = elem.VR
    if vr is None:  # implicit VR: as the data dictionary says
        try:
            vr = dictionary_VR(elem.tag)
        except KeyError:
            return False
    return vr == "SQ"


def _raw_depth_exceeds(value: bytes, depth: int, implicit: bool, little: bool, limit: int) -> bool:
    """Walk the raw value of a sequence at ``depth``: items, their elements, and nested
    sequences (explicit VR SQ; implicit VR: the dictionary's SQ or an undefined length).
    Malformed bytes end the walk: parsing them is not this check's business."""
    endian = "<" if little else ">"
    # open containers: (end offset, or None until a delimiter; sequence depth inside it)
    open_: list[tuple[int | None, int]] = [(len(value), depth)]
    pos = 0
    while open_ and pos + 8 <= len(value):
        end, level = open_[-1]
        if end is not None and pos >= end:
            open_.pop()
            continue
        group, element = struct.unpack_from(endian + "HH", value, pos)
        tag = group << 16 | element
        if group == 0xFFFE:
            length = struct.unpack_from(endian + "L", value, pos + 4)[0]
            pos += 8
            if tag == _ITEM:
                open_.append((None if length == _UNDEFINED else pos + length, level))
            elif tag in (_ITEM_END, _SEQUENCE_END) and len(open_) > 1:
                open_.pop()
            continue
        if implicit:
            length = struct.unpack_from(endian + "L", value, pos + 4)[0]
            try:
                nested = length == _UNDEFINED or dictionary_VR(tag) == "SQ"
            except KeyError:
                nested = False
            pos += 8
        else:
            vr = value[pos + 4 : pos + 6]
            if vr in LONG_LENGTH_VRS:
                if pos + 12 > len(value):
                    return False
                length = struct.unpack_from(endian + "L", value, pos + 8)[0]
                pos += 12
            else:
                length = struct.unpack_from(endian + "H", value, pos + 6)[0]
                pos += 8
            nested = vr == b"SQ" or length == _UNDEFINED
        if nested:
            if level + 1 > limit:
                return True
            open_.append((None if length == _UNDEFINED else pos + length, level + 1))
        else:
            pos += length
    return False


# The attributes InstanceHeader is made of, by pydicom keyword
HEADER_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "InstanceNumber",
)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def shown_uid(value: str) -> str:
    """A UID as a log line or status reason may show it: a valid one as it is; anything else
    only by its length, since a UID whose length is wrong holds the bytes of the elements
    after it (the patient's name and ID)."""
    value = value.strip("\x00 ")
    return value if UID(value).is_valid else f"(not a valid UID, {len(value)} characters)"


def instance_header(
    ds: Dataset, header_sha256: bytes, sop_class_uid: str, sop_instance_uid: str
) -> InstanceHeader:
    """The attributes the gateway needs from a received dataset's parsed header.

    ``ds`` is the header pixelhash parsed (no second parse); the C-STORE request's SOP
    Class/Instance UIDs must match the dataset's own. InstanceError says what is wrong.
    """
    try:
        values = {kw: _text(ds, kw) for kw in HEADER_KEYWORDS}
    except Exception as exc:  # pydicom converts values lazily, here, and fails any way on bad ones
        # (ValueError, NotImplementedError for an unknown VR, BytesLengthException, OSError, ...)
        raise InstanceError(f"dataset cannot be parsed: {type(exc).__name__}: {exc}") from None
    return checked_header(
        values, header_sha256, sop_class_uid, sop_instance_uid, lambda: sequence_depth_exceeds(ds)
    )


def checked_header(
    values: dict[str, str],
    header_sha256: bytes,
    sop_class_uid: str,
    sop_instance_uid: str,
    too_deep: Callable[[], bool],
) -> InstanceHeader:
    """InstanceHeader from the text of each of HEADER_KEYWORDS (as ``str(value).strip()``
    gives it), after the checks instance_header makes: UIDs present, sequences not nested
    deeper than MAX_SEQUENCE_DEPTH (`too_deep`), the request's UIDs are the dataset's own."""
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not values[keyword]:
            raise InstanceError(f"dataset has no {keyword}")
    if too_deep():
        raise InstanceError(
            f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels: such an instance could not be served"
        )
    if values["SOPInstanceUID"] != sop_instance_uid.strip("\x00 "):
        raise InstanceError(
            f"dataset SOPInstanceUID {shown_uid(values['SOPInstanceUID'])} differs from the C-STORE "
            f"request's Affected SOP Instance UID {shown_uid(sop_instance_uid)}"
        )
    if values["SOPClassUID"] and values["SOPClassUID"] != sop_class_uid.strip("\x00 "):
        raise InstanceError(
            f"dataset SOPClassUID {shown_uid(values['SOPClassUID'])} differs from the C-STORE "
            f"request's Affected SOP Class UID {shown_uid(sop_class_uid)}"
        )
    return InstanceHeader(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=values["SOPInstanceUID"],
        study_uid=values["StudyInstanceUID"],
        series_uid=values["SeriesInstanceUID"],
        patient_id=values["PatientID"],
        patient_name=values["PatientName"],
        birth_date=values["PatientBirthDate"],
        sex=values["PatientSex"],
        study_date=values["StudyDate"],
        study_time=values["StudyTime"],
        accession_number=values["AccessionNumber"],
        study_id=values["StudyID"],
        study_description=values["StudyDescription"],
        referring_physician=values["ReferringPhysicianName"],
        modality=values["Modality"],
        series_number=values["SeriesNumber"],
        series_description=values["SeriesDescription"],
        instance_number=values["InstanceNumber"],
        header_sha256=header_sha256,
    )


def read_instance_header(
    path: Path, header_sha256: bytes, sop_class_uid: str, sop_instance_uid: str
) -> InstanceHeader:
    """instance_header of a stored file, read up to its pixel data only (the index rebuilds
    what it lost from the files). InstanceError if the file is missing, damaged or not that
    instance."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # missing, damaged, not DICOM: say which, never crash a start
        raise InstanceError(f"stored file cannot be read: {type(exc).__name__}: {exc}") from None
    return instance_header(ds, header_sha256, sop_class_uid, sop_instance_uid)
