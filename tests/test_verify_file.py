"""`dicomledger verify-file` against a gateway process fed by DCMTK's storescu:
reports DCMTK re-encoded on the way verify as ANCHORED and a changed report is a MISMATCH;
pixels anchored as another SOP instance get their own verdict; anchors
made with the old `content` method (bytes as received) still verify, on verify-file and on
retrieve."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pydicom
import pytest
from pydicom import uid

from dicomledger.dicom.pixelhash import CONTENT, CONTENT_CANONICAL, hash_instance_file
from tests import dicomdata
from tests.conftest import GatewayProcess, dcmtk
from tests.test_storage_scp import index_rows, ledger_payloads, log_lines, successes

WHEEL = Path(pydicom.__file__).parent / "data" / "test_files"
REPORTS = [WHEEL / "waveform_ecg.dcm", WHEEL / "reportsi.dcm"]

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.e2e,
]  # pydicom on the wheel files


def stored_file(gw: GatewayProcess, path: Path) -> Path:
    sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    ((relative,),) = index_rows(gw, f"SELECT path FROM instances WHERE sop_instance_uid = '{sop}'")
    return gw.dir / "data" / "images" / relative


def first_text_value(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The deepest content item with a Text Value in an SR content tree."""
    found = None
    for item in ds.get("ContentSequence", []):
        found = first_text_value(item) or found
        if found is None and "TextValue" in item:
            found = item
    return found


# --- item 4: legal re-encodings by DCMTK are not tampering ---------------------------------


@pytest.mark.parametrize(
    "options,syntax",
    [
        ((), uid.ExplicitVRLittleEndian),  # storescu's default: sequences get explicit lengths
        (("-xi",), uid.ImplicitVRLittleEndian),  # and the VRs go too
        # one context [Big Endian, Little Endian, Implicit]: the gateway accepts the sender's first
        # choice, so storescu converts to big endian (with -xb alone it also proposes the file's
        # own Little Endian in a context of its own, and sends that, unconverted)
        (("-xb", "+C"), uid.ExplicitVRBigEndian),
    ],
    ids=["explicit", "implicit", "big-endian"],
)
def test_reports_re_encoded_by_storescu_verify_as_anchored(gateway, options, syntax):
    result = gateway.storescu(*REPORTS, options=options)
    assert result.returncode == 0 and successes(result.stdout + result.stderr) == 2, result.stderr
    for original in REPORTS:
        check = gateway.cli("verify-file", str(original))
        assert check.returncode == 0 and check.stdout.startswith("ANCHORED: content hash"), (
            check.stdout
        )
        stored = stored_file(gateway, original)
        assert (
            pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
        )
        # DCMTK re-encoded the dataset: other bytes than the sender's file
        assert (
            hash_instance_file(stored).header_sha256 != hash_instance_file(original).header_sha256
        )
    assert [p["hash_method"] for p in ledger_payloads(gateway)] == [CONTENT_CANONICAL] * 2


def test_a_changed_value_in_the_report_content_tree_is_a_mismatch(gateway, tmp_path):
    original = WHEEL / "reportsi.dcm"
    assert gateway.storescu(original).returncode == 0
    ds = pydicom.dcmread(original)
    re_encoded = tmp_path / "implicit.dcm"
    dicomdata._save(ds, re_encoded, uid.ImplicitVRLittleEndian)
    assert gateway.cli("verify-file", str(re_encoded)).returncode == 0  # same content

    item = first_text_value(ds)
    item.TextValue = "Entered text"  # one value deep in the content tree
    for syntax in (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian):
        changed = tmp_path / f"changed-{syntax}.dcm"
        dicomdata._save(ds, changed, syntax)
        check = gateway.cli("verify-file", str(changed))
        assert check.returncode == 1 and check.stdout.startswith(
            "MISMATCH: this instance was anchored"
        ), check.stdout


# --- item 22: the same pixels under another SOP Instance UID ---------------------------------


def test_pixels_anchored_as_another_instance_have_their_own_verdict(gateway, tmp_path):
    a, b = dicomdata.make_mr_series(tmp_path / "mr", 2)
    assert gateway.storescu(a, b).returncode == 0
    anchored_a = ledger_payloads(gateway)[0]["instance"]
    assert gateway.cli("verify-file", str(a)).returncode == 0

    ds = pydicom.dcmread(a)
    ds.SOPInstanceUID = dicomdata.fake_uid("never-received")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    copy = tmp_path / "copy.dcm"
    ds.save_as(copy)
    check = gateway.cli("verify-file", str(copy))
    assert check.returncode == 4, check.stdout
    assert check.stdout.startswith(
        "ANCHORED AS ANOTHER INSTANCE: this file's pixel data hash matches entry 0 "
    )
    assert f"which anchored SOP instance {anchored_a};" in check.stdout
    assert f"SOP Instance UID {ds.SOPInstanceUID} was never received" in check.stdout

    # the same by the decoded pixel values: a JPEG-LS copy under the new UID
    jls = dicomdata.make_compressed_copies(copy, tmp_path / "jls", ["jpeg-ls"])["jpeg-ls"]
    check = gateway.cli("verify-file", str(jls))
    assert (
        check.returncode == 4
        and "this file's decoded pixel values hash matches entry 0" in check.stdout
    )

    # A's pixels under B's UID: B was anchored with other pixels, so that is a MISMATCH,
    # which also says whose pixels these are
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.dcmread(b).SOPInstanceUID
    swapped = tmp_path / "swapped.dcm"
    ds.save_as(swapped)
    check = gateway.cli("verify-file", str(swapped))
    assert check.returncode == 1 and check.stdout.startswith(
        "MISMATCH: this instance was anchored"
    ), check.stdout
    assert f"which anchored another SOP instance, {anchored_a}" in check.stdout


def test_a_file_nothing_is_known_of_is_not_anchored(gateway, tmp_path):
    (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1, seed="never-sent")
    check = gateway.cli("verify-file", str(f))
    assert check.returncode == 3 and check.stdout.startswith("NOT ANCHORED"), check.stdout


# --- anchors made before content-canonical existed ---------------------------------------------


def getscu(gw: GatewayProcess, out: Path, patient_id: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    result = dcmtk(
        "getscu",
        "-v",
        "-aet",
        "WS1",
        "-aec",
        gw.ae_title,
        "-od",
        str(out),
        "-P",
        "-k",
        "QueryRetrieveLevel=PATIENT",
        "-k",
        f"PatientID={patient_id}",
        "127.0.0.1",
        str(gw.port),
    )
    return result.stdout + result.stderr


def entries_of(gw: GatewayProcess, kind: str) -> list[dict]:
    con = sqlite3.connect(gw.dir / "data" / "ledger.db")
    try:
        rows = con.execute("SELECT data FROM entries ORDER BY idx").fetchall()
    finally:
        con.close()
    return [e["payload"] for e in map(json.loads, (r[0] for r in rows)) if e["kind"] == kind]


def test_anchors_made_with_the_old_content_method_still_verify(tmp_path):
    original = WHEEL / "waveform_ecg.dcm"
    patient_id = str(pydicom.dcmread(original).PatientID)
    gw = GatewayProcess(tmp_path / "gw", allow=("STORESCU", "ECHOSCU", "WS1"))
    with open(gw.config, "a") as f:
        f.write('\n[[destinations]]\nae_title = "WS1"\naddress = "127.0.0.1:1"\n')
    gw.serve_module = "tests.legacy_content_serve"  # anchors the bytes as received
    gw.start()
    try:
        assert gw.storescu(original).returncode == 0
    finally:
        gw.stop()
    (legacy,) = ledger_payloads(gw)
    stored = stored_file(gw, original)
    assert (
        legacy["hash_method"] == CONTENT
        and legacy["sha256"] == hash_instance_file(stored).header_sha256.hex()
    )

    gw.serve_module = "dicomledger.cli"  # today's gateway, same data
    gw.start()
    try:
        # the stored bytes match the old anchor; the sender's original (DCMTK re-encoded it on
        # the way) matches through the stored copy
        assert gw.cli("verify-file", str(stored)).returncode == 0
        check = gw.cli("verify-file", str(original))
        assert check.returncode == 0 and "to the stored copy anchored by" in check.stdout, (
            check.stdout
        )

        # retrieve-time tamper check by the anchor's method: sent
        assert gw.cli("grant", "--patient-id", patient_id, "--to", "WS1").returncode == 0
        out = getscu(gw, tmp_path / "get", patient_id)
        assert len(list((tmp_path / "get").iterdir())) == 1, out
        assert entries_of(gw, "tamper-alarm") == []

        # a changed value in the stored copy: no longer the anchored content
        data = stored.read_bytes()
        at = data.index(patient_id.encode())
        stored.write_bytes(data[:at] + b"9" + data[at + 1 :])
        check = gw.cli("verify-file", str(original))
        assert check.returncode == 1 and "content (bytes as received) hash" in check.stdout, (
            check.stdout
        )
        out = getscu(gw, tmp_path / "get-tampered", patient_id)
        assert list((tmp_path / "get-tampered").iterdir()) == [], out
        (alarm,) = entries_of(gw, "tamper-alarm")
        assert alarm["expected_sha256"] == legacy["sha256"] != alarm["found_sha256"]

        # the instance arriving again as it first did: same content as the old anchor (not
        # "changed pixels"), anchored anew by today's method
        assert gw.storescu(original).returncode == 0
        again = entries_of(gw, "image-anchored")[-1]
        assert (
            again["hash_method"] == CONTENT_CANONICAL and again["header_changed_from"]["index"] == 0
        )
        assert "pixels_changed_from" not in again
        assert not any(line.get("event") == "changed pixels" for line in log_lines(gw))
        assert gw.cli("verify-file", str(original)).stdout.startswith("ANCHORED: content hash")
    finally:
        gw.stop()
