"""Deterministic DICOM test data: valid Part 10 files with clearly fake patients.

Everything is derived from a seed (pixels, UIDs, patient data), so the same call gives the
same bytes and two seeds give different images. Generated patients have a unique token in
their name and ID (which starts with FAKE_ID_PREFIX), so tests can grep a database or a
ledger copy for name, ID, birth date and accession number.

    from tests.dicomdata import make_ct_series, fake_patient
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.sequence import Sequence

FAKE_ID_PREFIX = "DLFAKE"

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
MF_GRAY_BYTE_SC = "1.2.840.10008.5.1.4.1.1.7.2"
MF_GRAY_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
MF_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

_FAMILY = ["Doe", "Mustermann", "Testperson", "Example", "Sampleton", "Placeholder"]
_GIVEN = ["Jane", "John", "Erika", "Max", "Alex", "Sam", "Robin", "Kim"]


@dataclass(frozen=True)
class FakePatient:
    name: str  # DICOM PN, e.g. "Doe-K3F9Q2^Jane"
    patient_id: str  # e.g. "DLFAKE-K3F9Q2"
    birth_date: str  # YYYYMMDD
    accession: str | None = None  # Accession Number of this patient's generated study
    sex: str = "O"


def fake_patient(seed: int | str = 0) -> FakePatient:
    """A realistic-looking, clearly fake patient, unique and stable per seed."""
    digest = hashlib.sha256(f"dicomledger-fake-patient:{seed}".encode()).digest()
    token = "".join("ABCDEFGHJKLMNPQRSTUVWXYZ23456789"[b % 32] for b in digest[:6])
    year, month, day = 1930 + digest[6] % 80, 1 + digest[7] % 12, 1 + digest[8] % 28
    return FakePatient(
        name=f"{_FAMILY[digest[9] % len(_FAMILY)]}-{token}^{_GIVEN[digest[10] % len(_GIVEN)]}",
        patient_id=f"{FAKE_ID_PREFIX}-{token}",
        birth_date=f"{year:04d}{month:02d}{day:02d}",
        accession=fake_accession(seed),
        sex="FM"[digest[11] % 2],
    )


def fake_accession(seed: int | str = 0) -> str:
    digest = hashlib.sha256(f"dicomledger-fake-accession:{seed}".encode()).hexdigest()
    return f"ACC{digest[:10].upper()}"


def fake_uid(*parts: object) -> str:
    """A UID that is stable for the same parts."""
    return uid.generate_uid(entropy_srcs=["dicomledger-test", *map(str, parts)])


# --- datasets ----------------------------------------------------------------------------


def _base_dataset(
    sop_class: str,
    modality: str,
    seed: int | str,
    patient: FakePatient | None,
    accession: str | None,
    study_uid: str | None,
    series_uid: str | None,
    instance: int,
    transfer_syntax: str,
) -> Dataset:
    patient = patient or fake_patient(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.UID(transfer_syntax)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = fake_uid(sop_class, seed, series_uid, instance)
    ds.StudyDate, ds.StudyTime = "20240117", "093000"
    ds.ContentDate, ds.ContentTime = "20240117", f"0930{instance % 60:02d}"
    ds.AccessionNumber = accession or patient.accession or fake_accession(seed)
    ds.Modality = modality
    ds.Manufacturer = "dicomledger test data"
    ds.ReferringPhysicianName = "Referrer^Fake"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study_uid or fake_uid("study", seed)
    ds.SeriesInstanceUID = series_uid or fake_uid("series", seed, modality)
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    return ds


def random_pixels(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    *,
    bits_stored: int = 16,
    dtype: str = "uint16",
    samples: int = 1,
    frames: int | None = None,
) -> np.ndarray:
    """A ramp plus noise (compressible, like an image) at a random offset: shape
    ((frames,) rows, cols(, samples)), values within `bits_stored` (signed for int dtypes)."""
    ramp = np.add.outer(np.arange(rows) * 3, np.arange(cols) * 2)
    if samples > 1:
        ramp = ramp[..., None] * np.arange(1, samples + 1)
    if frames is not None:
        ramp = ramp[None] + np.arange(frames).reshape((frames,) + (1,) * ramp.ndim) * 7
    offset = int(rng.integers(0, 1 << 16))
    values = ramp + offset + rng.integers(0, 32, size=ramp.shape)
    if np.dtype(dtype).kind == "i":
        half = 1 << (bits_stored - 1)
        return ((values % (2 * half)) - half).astype(dtype)
    return (values % (1 << bits_stored)).astype(dtype)


def make_image(
    dirpath: str | Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    sop_class: str = SC_IMAGE,
    modality: str = "OT",
    seed: int | str = 0,
    instance: int = 1,
    patient: FakePatient | None = None,
    accession: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    transfer_syntax: str = uid.ExplicitVRLittleEndian,
    filename: str | None = None,
    extra: dict[str, object] | None = None,
) -> Path:
    """Write `pixels` ((frames,) rows, cols(, samples)) as a Part 10 file.
    Bits Allocated and Pixel Representation follow the dtype."""
    ds = _base_dataset(
        sop_class,
        modality,
        seed,
        patient,
        accession,
        study_uid,
        series_uid,
        instance,
        uid.ExplicitVRLittleEndian,
    )
    bits = bits_stored or pixels.dtype.itemsize * 8
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)  # keep ours
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    path = Path(dirpath) / (filename or f"{modality.lower()}-{seed}-{instance:04d}.dcm")
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(ds, path, transfer_syntax)
    return path


def make_ct_series(
    dirpath: str | Path,
    n: int,
    rows: int = 512,
    cols: int = 512,
    *,
    patient: FakePatient | None = None,
    accession: str | None = None,
    study_uid: str | None = None,
    seed: int | str = 0,
    transfer_syntax: str = uid.ExplicitVRLittleEndian,
) -> list[Path]:
    """n CT slices: 16-bit, 12 bits stored, unsigned, Rescale Intercept -1024."""
    rng = np.random.default_rng(_int_seed("ct", seed))
    series = fake_uid("series", seed, "CT")
    paths = []
    for i in range(1, n + 1):
        extra = {
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "RescaleIntercept": "-1024",
            "RescaleSlope": "1",
            "RescaleType": "HU",
            "KVP": "120",
            "SliceThickness": "1.0",
            "PixelSpacing": ["0.7", "0.7"],
            "ImagePositionPatient": ["-180", "-180", f"{-i * 1.0:.1f}"],
            "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"],
            "FrameOfReferenceUID": fake_uid("for", seed),
        }
        paths.append(
            make_image(
                dirpath,
                random_pixels(rng, rows, cols, bits_stored=12),
                bits_stored=12,
                sop_class=CT_IMAGE,
                modality="CT",
                seed=seed,
                instance=i,
                patient=patient,
                accession=accession,
                study_uid=study_uid,
                series_uid=series,
                transfer_syntax=transfer_syntax,
                extra=extra,
            )
        )
    return paths


def make_mr_series(
    dirpath: str | Path,
    n: int,
    rows: int = 64,
    cols: int = 64,
    *,
    patient: FakePatient | None = None,
    accession: str | None = None,
    study_uid: str | None = None,
    seed: int | str = 0,
    transfer_syntax: str = uid.ExplicitVRLittleEndian,
) -> list[Path]:
    """n MR slices: 16-bit unsigned, 16 bits stored."""
    rng = np.random.default_rng(_int_seed("mr", seed))
    series = fake_uid("series", seed, "MR")
    extra = {"ScanningSequence": "SE", "SequenceVariant": "NONE", "MagneticFieldStrength": "1.5"}
    return [
        make_image(
            dirpath,
            random_pixels(rng, rows, cols),
            sop_class=MR_IMAGE,
            modality="MR",
            seed=seed,
            instance=i,
            patient=patient,
            accession=accession,
            study_uid=study_uid,
            series_uid=series,
            transfer_syntax=transfer_syntax,
            extra=extra,
        )
        for i in range(1, n + 1)
    ]


def make_multiframe(
    dirpath: str | Path,
    frames: int,
    rows: int,
    cols: int,
    *,
    bits_allocated: int = 16,
    bits_stored: int | None = None,
    samples_per_pixel: int = 1,
    patient: FakePatient | None = None,
    accession: str | None = None,
    study_uid: str | None = None,
    seed: int | str = 0,
    transfer_syntax: str = uid.ExplicitVRLittleEndian,
    filename: str | None = None,
) -> Path:
    """A native multi-frame Secondary Capture, streamed: pydicom writes the header, then
    the Pixel Data element is appended one frame at a time (memory: one frame), so a
    1 GB file is fine. Frame k is frame 0 plus k (mod 2**bits_stored): all differ."""
    if transfer_syntax not in (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian):
        raise ValueError("make_multiframe writes little endian native syntaxes only")
    if bits_allocated not in (8, 16) or samples_per_pixel not in (1, 3):
        raise ValueError("bits_allocated 8 or 16, samples_per_pixel 1 or 3")
    bits_stored = bits_stored or bits_allocated
    color = samples_per_pixel == 3
    sop = (
        MF_TRUE_COLOR_SC
        if color
        else (MF_GRAY_WORD_SC if bits_allocated == 16 else MF_GRAY_BYTE_SC)
    )
    ds = _base_dataset(sop, "OT", seed, patient, accession, study_uid, None, 1, transfer_syntax)
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = samples_per_pixel
    ds.PhotometricInterpretation = "RGB" if color else "MONOCHROME2"
    if color:
        ds.PlanarConfiguration = 0
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = "40"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0

    dtype = f"<u{bits_allocated // 8}"
    rng = np.random.default_rng(_int_seed("mf", seed))
    first = random_pixels(
        rng, rows, cols, bits_stored=bits_stored, dtype=dtype, samples=samples_per_pixel
    )
    length = frames * first.nbytes
    if length + 1 >= 0xFFFFFFFF:
        raise ValueError("Pixel Data longer than a 32-bit length allows")
    path = Path(dirpath) / (filename or f"mf-{seed}.dcm")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pydicom.dcmwrite(f, ds, enforce_file_format=True)
        vr = b"OB" if bits_allocated == 8 else b"OW"
        padded = length + length % 2
        if transfer_syntax == uid.ImplicitVRLittleEndian:
            f.write(struct.pack("<HHL", 0x7FE0, 0x0010, padded))
        else:
            f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, vr, 0, padded))
        mask = (1 << bits_stored) - 1
        for k in range(frames):
            f.write((first + (k & mask)) & mask)  # wraps within the dtype
        if length % 2:
            f.write(b"\0")
    return path


def make_sr(
    dirpath: str | Path,
    *,
    patient: FakePatient | None = None,
    accession: str | None = None,
    study_uid: str | None = None,
    seed: int | str = 0,
    text: str = "No acute findings. Fake report generated for testing.",
    transfer_syntax: str = uid.ExplicitVRLittleEndian,
) -> Path:
    """A Basic Text SR report (no pixel data)."""
    ds = _base_dataset(
        BASIC_TEXT_SR, "SR", seed, patient, accession, study_uid, None, 1, transfer_syntax
    )
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic imaging report")])
    finding = Dataset()
    finding.RelationshipType, finding.ValueType = "CONTAINS", "TEXT"
    finding.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    finding.TextValue = text
    ds.ContentSequence = Sequence([finding])
    path = Path(dirpath) / f"sr-{seed}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(ds, path, transfer_syntax)
    return path


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


# --- re-encodings ------------------------------------------------------------------------

# label -> (transfer syntax, encoder): every lossless way we can write the same pixels
COPY_SYNTAXES: dict[str, tuple[str, str]] = {
    "explicit": (uid.ExplicitVRLittleEndian, "pydicom"),
    "implicit": (uid.ImplicitVRLittleEndian, "pydicom"),
    "big-endian": (uid.ExplicitVRBigEndian, "pydicom"),
    "deflated": (uid.DeflatedExplicitVRLittleEndian, "pydicom"),
    "rle": (uid.RLELossless, "pydicom"),
    "jpeg-ls": (uid.JPEGLSLossless, "pydicom"),
    "j2k": (uid.JPEG2000Lossless, "pydicom"),
    "rle-dcmtk": (uid.RLELossless, "dcmcrle"),
    "jpeg-ls-dcmtk": (uid.JPEGLSLossless, "dcmcjpls"),
    "jpeg-lossless-sv1": (uid.JPEGLosslessSV1, "dcmcjpeg"),
    "jpeg-lossless": (uid.JPEGLossless, "dcmcjpeg"),
    # several fragments per frame: frame boundaries from the Basic Offset Table, and
    # without one, from the JPEG end-of-image markers
    "jpeg-lossless-fragments": (uid.JPEGLosslessSV1, "dcmcjpeg"),
    "jpeg-lossless-fragments-no-bot": (uid.JPEGLosslessSV1, "dcmcjpeg"),
}

_DCMTK_ARGS = {
    "rle-dcmtk": ["dcmcrle"],
    "jpeg-ls-dcmtk": ["dcmcjpls", "+el"],
    "jpeg-lossless-sv1": ["dcmcjpeg", "+e1"],
    "jpeg-lossless": ["dcmcjpeg", "+el", "+sv", "6"],
    "jpeg-lossless-fragments": ["dcmcjpeg", "+e1", "+fs", "1"],
    "jpeg-lossless-fragments-no-bot": ["dcmcjpeg", "+e1", "+fs", "1", "-ot"],
}


def make_compressed_copies(
    src: str | Path, dirpath: str | Path, labels: Iterable[str] | None = None
) -> dict[str, Path]:
    """Re-encode the native file `src` losslessly, one file per label of COPY_SYNTAXES.
    DCMTK-encoded labels are skipped when the tool is missing (unless asked for)."""
    out: dict[str, Path] = {}
    wanted = list(labels) if labels is not None else list(COPY_SYNTAXES)
    Path(dirpath).mkdir(parents=True, exist_ok=True)
    for label in wanted:
        tsyntax, encoder = COPY_SYNTAXES[label]
        path = Path(dirpath) / f"{Path(src).stem}.{label}.dcm"
        if encoder == "pydicom":
            _save(pydicom.dcmread(src), path, tsyntax)
        elif shutil.which(encoder):
            subprocess.run([*_DCMTK_ARGS[label], str(src), str(path)], check=True)
        elif labels is None:
            continue
        else:
            raise FileNotFoundError(f"{encoder} (DCMTK) is needed for {label}")
        out[label] = path
    return out


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    tsyntax = uid.UID(transfer_syntax)
    if tsyntax.is_encapsulated:
        # pydicom: RLE natively, JPEG-LS via pyjpegls, J2K via openjpeg. A lossless
        # transcoding is the same instance: keep its SOP Instance UID (pydicom makes a new one)
        ds.compress(tsyntax, generate_instance_uid=False)
    elif "PixelData" in ds:
        big = not tsyntax.is_little_endian
        was_big = not ds.file_meta.TransferSyntaxUID.is_little_endian
        if big != was_big and ds.BitsAllocated > 8:  # OW: swap to the new byte order
            width = ds.BitsAllocated // 8
            ds.PixelData = np.frombuffer(ds.PixelData, f"u{width}").byteswap().tobytes()
    ds.file_meta.TransferSyntaxUID = tsyntax
    pydicom.dcmwrite(path, ds, enforce_file_format=True)  # save_as refuses LE -> BE


# --- pydicom's own test files ------------------------------------------------------------


def wheel_test_files(compressed_only: bool = True) -> list[tuple[Path, uid.UID]]:
    """DICOM files shipped in the pydicom wheel with their transfer syntaxes; with
    `compressed_only`, those encapsulated or deflated. (get_testdata_file would try to
    download more.)"""
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            tsyntax = read_file_meta_info(path).get("TransferSyntaxUID")
        except Exception:  # not Part 10 (no preamble/meta): skip
            continue
        if not tsyntax:
            continue
        if compressed_only and not (tsyntax.is_encapsulated or tsyntax.is_deflated):
            continue
        found.append((path, uid.UID(tsyntax)))
    return found


def _int_seed(kind: str, seed: int | str) -> int:
    return int.from_bytes(hashlib.sha256(f"{kind}:{seed}".encode()).digest()[:8], "little")
