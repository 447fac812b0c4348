"""The `retrieved` entry says what the requestor was told: every sub-operation that was not
sent counts as failed, and the final status is the one that went on the wire. Real gateway,
pynetdicom's getscu app (which accepts only uncompressed syntaxes for its SCP role) over a
patient with compressed instances from the pydicom wheel, and DCMTK getscu/movescu over a
stored instance that cannot be encoded."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests import dicomdata
from tests.conftest import DCMTK_ENV, GatewayProcess, free_port
from tests.test_forwarding import entries_of_kind
from tests.test_retrieve import gw_site, movescu, received, stored_path

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

WHEEL = Path(pydicom.__file__).parent / "data" / "test_files"
# (file in the wheel, storescu option proposing its transfer syntax)
COMPRESSED = (
    ("MR_small_RLE.dcm", "-xr"),
    ("MR_small_jpeg_ls_lossless.dcm", "-xt"),
    ("SC_rgb_jpeg_gdcm.dcm", "-xs"),
)


def as_patient(
    source: Path, out: Path, patient: dicomdata.FakePatient, study_uid: str, seed: str
) -> Path:
    """The wheel file as this patient's, in this study, with its own UIDs; pixels untouched."""
    ds = pydicom.dcmread(source)
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = (
        patient.patient_id,
        patient.name,
        patient.birth_date,
    )
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = dicomdata.fake_uid("series", seed)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = dicomdata.fake_uid("sop", seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


@dataclass
class Site:
    gw: GatewayProcess
    ws1_port: int
    patient: dicomdata.FakePatient
    native: list[Path]
    compressed: list[Path]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("truthful")
    ws1_port = free_port()
    gw = GatewayProcess(tmp / "gw", allow=("STORESCU", "WS1"))
    with open(gw.config, "a") as f:
        f.write(f'\n[[destinations]]\nae_title = "WS1"\naddress = "127.0.0.1:{ws1_port}"\n')
    patient = dicomdata.fake_patient("truthful")
    study = dicomdata.fake_uid("study", "truthful")
    native = dicomdata.make_mr_series(
        tmp / "mr", 3, patient=patient, study_uid=study, seed="truthful"
    )
    compressed = [
        as_patient(WHEEL / name, tmp / "c" / name, patient, study, f"truthful-{name}")
        for name, _ in COMPRESSED
    ]
    gw.start()
    try:
        assert gw.storescu(*native).returncode == 0
        for path, (_, option) in zip(compressed, COMPRESSED, strict=True):
            result = gw.storescu(path, options=(option,))
            assert "Received Store Response (Success)" in result.stdout + result.stderr, (
                result.stderr
            )
        assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", "WS1").returncode == 0
        yield Site(gw, ws1_port, patient, native, compressed)
    finally:
        gw.stop()


def pynetdicom_getscu(site: Site, out: Path, *keys: str, model: str = "-P") -> str:
    out.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        "-m",
        "pynetdicom",
        "getscu",
        "-d",
        "-aet",
        "WS1",
        "-aec",
        site.gw.ae_title,
        model,
        "-od",
        str(out),
    ]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run(
        [*args, "127.0.0.1", str(site.gw.port)],
        capture_output=True,
        text=True,
        timeout=120,
        env=DCMTK_ENV,
    )
    return result.stdout + result.stderr


def retrieved_by(gw: GatewayProcess, service: str, since: int) -> list[dict]:
    return [e for e in entries_of_kind(gw, "retrieved")[since:] if e["service"] == service]


def told(output: str) -> tuple[str, int, int, int]:
    """(final status, completed, failed, remaining) of the final response, as the requestor
    logged it (pynetdicom's getscu -d, DCMTK's movescu/getscu -d)."""
    counts = {}
    for name in ("Completed", "Failed", "Remaining"):
        found = re.findall(rf"{name} Sub-?operations\s*: (\d+)", output, re.IGNORECASE)
        counts[name] = int(found[-1])
    status = re.findall(r"^\w: (?:DIMSE )?Status\s*: (0x[0-9a-fA-F]{4})", output, re.MULTILINE)[-1]
    return f"0x{int(status, 16):04X}", counts["Completed"], counts["Failed"], counts["Remaining"]


def decoded_by_uid(paths: list[Path]) -> dict[str, bytes]:
    """Decoded pixel values (pydicom's pixel_array) by SOP Instance UID."""
    return {str(ds.SOPInstanceUID): ds.pixel_array.tobytes() for ds in map(pydicom.dcmread, paths)}


def test_get_sends_what_the_requestor_cannot_take_compressed_decompressed(site, tmp_path):
    """Transcoding fallback (before it, these three failed without a C-STORE):
    pynetdicom's getscu takes no compressed syntax for its SCP role, so the compressed
    instances arrive decompressed, with the same decoded pixels; all six complete."""
    before = len(entries_of_kind(site.gw, "retrieved"))
    got = tmp_path / "got"
    output = pynetdicom_getscu(
        site, got, "QueryRetrieveLevel=PATIENT", f"PatientID={site.patient.patient_id}"
    )
    assert decoded_by_uid(received(got)) == decoded_by_uid(site.native + site.compressed), output
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in received(got)} <= {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
    }
    assert told(output) == ("0x0000", 6, 0, 0), output
    (entry,) = retrieved_by(site.gw, "C-GET", before)
    assert (entry["status"], entry["completed"], entry["failed"], entry["not_sent"]) == told(
        output
    ), entry


def test_move_sends_what_the_destination_cannot_take_compressed_decompressed(site, tmp_path):
    """DCMTK movescu as its own move destination accepts uncompressed syntaxes only: the
    compressed instances arrive decompressed (before the fallback they failed)."""
    before = len(entries_of_kind(site.gw, "retrieved"))
    moved = tmp_path / "moved"
    output = movescu(
        gw_site(site.gw, site.ws1_port),
        "WS1",
        "WS1",
        site.ws1_port,
        moved,
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={pydicom.dcmread(site.native[0]).StudyInstanceUID}",
        extra=("-d",),
    )
    assert decoded_by_uid(received(moved)) == decoded_by_uid(site.native + site.compressed), output
    assert told(output) == ("0x0000", 6, 0, 0), output
    (entry,) = retrieved_by(site.gw, "C-MOVE", before)
    assert (entry["status"], entry["completed"], entry["failed"], entry["not_sent"]) == told(
        output
    ), entry


CT_ONLY = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[CTOnly]
PresentationContext1 = CTImageStorage\\Uncompressed

[[Profiles]]
[CTOnly]
PresentationContexts = CTOnly
"""


def test_move_to_a_destination_that_accepts_no_context_fails_its_sub_operations(site, tmp_path):
    """A known move destination that accepts the association but none of the proposed
    contexts (a CT-only storescp; the study is MR and SC): every sub-operation fails, final
    0xA702, not 0xA801 "Move Destination Unknown"."""
    profile = tmp_path / "ct-only.cfg"
    profile.write_text(CT_ONLY)
    out = tmp_path / "ct-only"
    out.mkdir()
    log = open(tmp_path / "storescp.log", "w")
    storescp = subprocess.Popen(
        [
            "storescp",
            "-v",
            "-aet",
            "WS1",
            "-xf",
            str(profile),
            "CTOnly",
            "-od",
            str(out),
            str(site.ws1_port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=DCMTK_ENV,
    )
    try:
        time.sleep(0.5)
        before = len(entries_of_kind(site.gw, "retrieved"))
        study = pydicom.dcmread(site.native[0]).StudyInstanceUID
        result = subprocess.run(
            [
                "movescu",
                "-d",
                "-aet",
                "WS1",
                "-aec",
                site.gw.ae_title,
                "-aem",
                "WS1",
                "-S",
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={study}",
                "127.0.0.1",
                str(site.gw.port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=DCMTK_ENV,
        )
        output = result.stdout + result.stderr
        assert told(output) == ("0xA702", 0, 6, 0), output
        (entry,) = retrieved_by(site.gw, "C-MOVE", before)
        assert (entry["status"], entry["completed"], entry["failed"], entry["not_sent"]) == told(
            output
        ), entry
        assert list(out.iterdir()) == []
    finally:
        storescp.terminate()
        storescp.wait(timeout=10)
        log.close()


def deep_sequence(depth: int) -> bytes:
    """A Content Sequence nested ``depth`` deep, with explicit lengths (as DCMTK re-encodes
    sequences), in Explicit VR Little Endian: item k (from the inside) holds 20*k bytes."""
    parts = []
    for k in range(depth - 1, -1, -1):
        parts.append(struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 8 + 20 * k))
        parts.append(struct.pack("<HHL", 0xFFFE, 0xE000, 20 * k))
    return b"".join(parts)


def test_instance_that_cannot_be_encoded_counts_as_failed(site, tmp_path):
    """An instance stored and anchored before the receive-side depth limit, with a 5,000-deep
    sequence: its pixels (and so the tamper check) are fine, but pynetdicom cannot re-encode
    it for a requestor that takes it in another transfer syntax (pynetdicom's getscu app
    proposes Implicit VR first). It is never reported as sent: the C-GET answers 0xA702, 1
    failed, and the ledger says so. A C-MOVE sends it as stored (no re-encoding); whatever
    the destination is told, the ledger says the same."""
    ds = pydicom.dcmread(site.native[0])
    uid = str(ds.SOPInstanceUID)
    path = stored_path(gw_site(site.gw, 0), uid)
    original = path.read_bytes()
    at = original.rindex(b"\xe0\x7f\x10\x00OW")  # Pixel Data: the sequence goes just before it
    path.write_bytes(original[:at] + deep_sequence(5000) + original[at:])
    keys = (
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={ds.StudyInstanceUID}",
        f"SeriesInstanceUID={ds.SeriesInstanceUID}",
        f"SOPInstanceUID={uid}",
    )
    try:
        before = len(entries_of_kind(site.gw, "retrieved"))
        got = tmp_path / "got"
        output = pynetdicom_getscu(site, got, *keys, model="-S")
        assert received(got) == [] and told(output) == ("0xA702", 0, 1, 0), output
        (entry,) = retrieved_by(site.gw, "C-GET", before)
        assert (entry["status"], entry["completed"], entry["failed"], entry["not_sent"]) == told(
            output
        ), entry

        moved = tmp_path / "moved"
        output = movescu(
            gw_site(site.gw, site.ws1_port),
            "WS1",
            "WS1",
            site.ws1_port,
            moved,
            *keys,
            extra=("-d",),
        )
        (entry,) = retrieved_by(site.gw, "C-MOVE", before)
        assert (entry["status"], entry["completed"], entry["failed"], entry["not_sent"]) == told(
            output
        ), entry
        assert len(received(moved)) == entry["completed"], output
    finally:
        path.write_bytes(original)
