"""What the gateway needs from a received instance's header."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset


class InstanceError(ValueError):
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


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def instance_header(
    ds: Dataset, header_sha256: bytes, sop_class_uid: str, sop_instance_uid: str
) -> InstanceHeader:
    """The attributes the gateway needs from a received dataset's parsed header.

    ``ds`` is the header pixelhash parsed (no second parse); the C-STORE request's SOP
    Class/Instance UIDs must match the dataset's own. InstanceError says what is wrong.
    """
    try:
        values = {
            kw: _text(ds, kw)
            for kw in (
                "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
                "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
                "ReferringPhysicianName", "Modality", "SeriesNumber", "SeriesDescription",
                "InstanceNumber",
            )
        }
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise InstanceError(f"dataset cannot be parsed: {type(exc).__name__}: {exc}") from None
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not values[keyword]:
            raise InstanceError(f"dataset has no {keyword}")
    if values["SOPInstanceUID"] != sop_instance_uid.strip("\x00 "):
        raise InstanceError(
            f"dataset SOPInstanceUID {values['SOPInstanceUID']} differs from the C-STORE "
            f"request's Affected SOP Instance UID {sop_instance_uid}"
        )
    if values["SOPClassUID"] and values["SOPClassUID"] != sop_class_uid.strip("\x00 "):
        raise InstanceError(
            f"dataset SOPClassUID {values['SOPClassUID']} differs from the C-STORE "
            f"request's Affected SOP Class UID {sop_class_uid}"
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
