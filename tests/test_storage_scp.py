"""The Storage SCP end to end: real DCMTK senders against a running gateway process."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from tests import dicomdata
from tests.conftest import GatewayProcess, dcmtk

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

PATIENT_NAMES = ["Testperson^Alice", "Fakename^Bob"]


def index_rows(gw: GatewayProcess, sql: str) -> list[tuple]:
    con = sqlite3.connect(gw.dir / "data" / "index.db")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def ledger_payloads(gw: GatewayProcess) -> list[dict]:
    con = sqlite3.connect(gw.dir / "data" / "ledger.db")
    try:
        rows = con.execute("SELECT data FROM entries ORDER BY idx").fetchall()
    finally:
        con.close()
    return [json.loads(r[0])["payload"] for r in rows]


def log_lines(gw: GatewayProcess) -> list[dict]:
    out = []
    for line in gw.log().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def successes(storescu_output: str) -> int:
    return storescu_output.count("Received Store Response (Success)")


def wait_for_successes(output: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and successes(output.read_text()) < count:
        time.sleep(0.01)


def test_echo(gateway):
    result = dcmtk(
        "echoscu", "-aet", "ECHOSCU", "-aec", gateway.ae_title, "127.0.0.1", str(gateway.port)
    )
    assert result.returncode == 0, result.stderr


def test_ct_series_is_stored_indexed_anchored_and_verifiable(gateway, tmp_path):
    files = dicomdata.make_ct_series(tmp_path / "ct", 12, rows=128, cols=128)
    result = gateway.storescu(*files)
    assert result.returncode == 0, result.stderr
    assert successes(result.stdout + result.stderr) == 12
    assert index_rows(gateway, "SELECT COUNT(*) FROM instances WHERE ledger_index IS NOT NULL") == [
        (12,)
    ]
    payloads = ledger_payloads(gateway)
    assert len(payloads) == 12
    for f in files:
        ds = pydicom.dcmread(f)
        (path,) = index_rows(
            gateway, f"SELECT path FROM instances WHERE sop_instance_uid = '{ds.SOPInstanceUID}'"
        )[0]
        stored = pydicom.dcmread(gateway.dir / "data" / "images" / path)
        assert stored.PixelData == ds.PixelData
        check = gateway.cli("verify-file", str(f))
        assert check.returncode == 0 and "ANCHORED" in check.stdout, check.stdout
    assert gateway.cli("verify").returncode == 0
    stores = [line for line in log_lines(gateway) if line.get("event") == "c-store"]
    assert len(stores) == 12
    assert {
        "calling_ae",
        "sop_class",
        "transfer_syntax",
        "bytes",
        "hash",
        "duration_ms",
        "status",
    } <= set(stores[0])


def test_multiframe_gets_per_frame_hashes_and_a_frame_root(gateway, tmp_path):
    (f,) = [dicomdata.make_multiframe(tmp_path / "mf", frames=7, rows=64, cols=64)]
    result = gateway.storescu(f)
    assert result.returncode == 0, result.stderr
    (payload,) = ledger_payloads(gateway)
    assert payload["frames"] == 7 and payload["frame_root"] and payload["hash_method"] == "pixel"


OPTION_FOR_SYNTAX = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}


@pytest.mark.jpeg_gpl  # the JPEG Lossless files' decoded-pixel hash
def test_compressed_wheel_files_are_stored_as_received(gateway):
    by_option: dict[str, list[Path]] = {}
    for path, syntax in dicomdata.wheel_test_files(compressed_only=True):
        if syntax in OPTION_FOR_SYNTAX:
            by_option.setdefault(OPTION_FOR_SYNTAX[syntax], []).append(path)
    assert {"-xy", "-xs", "-xt", "-xv", "-xr"} <= set(by_option)
    sent = 0
    for option, paths in by_option.items():
        result = gateway.storescu(*paths, options=(option, "--no-halt"))
        sent += successes(result.stdout + result.stderr)
    # (several wheel files share a SOP Instance UID: the ledger has every version, the index the newest)
    syntaxes = {p["transfer_syntax"] for p in ledger_payloads(gateway)}
    for wanted in (
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
    ):
        assert wanted in syntaxes, f"no instance stored in {wanted}"
    assert sent >= 10
    # stored as received (no transcoding), and lossless ones got a decoded-pixel hash
    for uid, syntax, path, decoded in index_rows(
        gateway, "SELECT sop_instance_uid, transfer_syntax_uid, path, decoded_sha256 FROM instances"
    ):
        stored = pydicom.dcmread(gateway.dir / "data" / "images" / path, stop_before_pixels=True)
        assert stored.file_meta.TransferSyntaxUID == syntax
        if syntax in ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80"):
            assert decoded is not None, f"{uid} ({syntax}) has no decoded-pixel hash"
    assert gateway.cli("verify").returncode == 0


def test_sr_gets_a_content_hash(gateway, tmp_path):
    f = dicomdata.make_sr(tmp_path / "sr")
    result = gateway.storescu(f)
    assert result.returncode == 0, result.stderr
    (payload,) = ledger_payloads(gateway)
    assert payload["hash_method"] == "content-canonical" and payload["frames"] == 0
    assert gateway.cli("verify-file", str(f)).returncode == 0


def test_unknown_calling_ae_is_refused_and_logged(gateway, tmp_path):
    files = dicomdata.make_mr_series(tmp_path / "mr", 1)
    result = gateway.storescu(*files, aet="INTRUDER")
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr
    refused = [line for line in log_lines(gateway) if line.get("event") == "association refused"]
    assert refused and refused[0]["calling_ae"] == "INTRUDER"
    assert "allowed_calling_aes" in refused[0]["reason"]
    assert ledger_payloads(gateway) == []


def test_malformed_dataset_fails_and_next_good_one_succeeds(gateway, tmp_path):
    good = dicomdata.make_mr_series(tmp_path / "mr", 2)
    bad = tmp_path / "bad.dcm"
    ds = pydicom.dcmread(good[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PixelData = ds.PixelData[:1000]  # shorter than Rows x Columns x 2
    ds.save_as(bad)
    result = gateway.storescu(bad, good[1], options=("--no-halt",))
    out = result.stdout + result.stderr
    assert "Received Store Response (Error: CannotUnderstand)" in out, out
    assert successes(out) == 1
    failed = [
        line
        for line in log_lines(gateway)
        if line.get("event") == "c-store" and line["status"] != "0x0000"
    ]
    assert (
        failed and failed[0]["status"].startswith("0xC") and "Pixel Data" in failed[0]["outcome"]
    ), failed
    assert len(ledger_payloads(gateway)) == 1

    # Garbage dataset bytes over pynetdicom (storescu will not send an unparsable file)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title=gateway.ae_title)
    assert assoc.is_established
    raw = tmp_path / "garbage.dcm"
    meta_ds = pydicom.dcmread(good[0])
    meta_ds.SOPInstanceUID = pydicom.uid.generate_uid()
    meta_ds.file_meta.MediaStorageSOPInstanceUID = meta_ds.SOPInstanceUID
    meta_ds.save_as(raw)
    data = raw.read_bytes()
    cut = data.index(b"\xe0\x7f\x10\x00")  # Pixel Data tag: replace the rest by garbage
    raw.write_bytes(data[: cut - 40] + b"\xff\xee" * 50)
    status = assoc.send_c_store(raw)
    assert 0xC000 <= status.Status <= 0xCFFF
    status = assoc.send_c_store(pydicom.dcmread(good[0]))
    assert status.Status == 0x0000
    assoc.release()
    assert len(ledger_payloads(gateway)) == 2


def test_duplicates_header_edits_and_changed_pixels(gateway, tmp_path):
    (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1)
    assert gateway.storescu(f).returncode == 0
    assert gateway.storescu(f).returncode == 0  # identical again: nothing new
    assert len(ledger_payloads(gateway)) == 1

    ds = pydicom.dcmread(f)
    ds.PatientName = "Corrected^Name"
    header_edit = tmp_path / "header.dcm"
    ds.save_as(header_edit)
    check = gateway.cli("verify-file", str(header_edit))
    assert check.returncode == 0 and "ANCHORED" in check.stdout

    pixels = bytearray(ds.PixelData)
    pixels[10] ^= 0x01
    ds.PixelData = bytes(pixels)
    altered = tmp_path / "altered.dcm"
    ds.save_as(altered)
    check = gateway.cli("verify-file", str(altered))
    assert check.returncode == 1 and "MISMATCH" in check.stdout

    assert gateway.storescu(altered).returncode == 0
    payloads = ledger_payloads(gateway)
    assert len(payloads) == 2
    assert payloads[1]["pixels_changed_from"]["index"] == 0
    assert any(line.get("event") == "changed pixels" for line in log_lines(gateway))
    assert index_rows(gateway, "SELECT COUNT(*) FROM superseded_instances") == [(1,)]


def test_no_phi_on_the_ledger(gateway, tmp_path):
    patients = [
        dicomdata.FakePatient(
            name=name,
            patient_id=f"PID-{i}-77341",
            birth_date=f"19{50 + i}0412",
            accession=f"ACC{i}99812",
        )
        for i, name in enumerate(PATIENT_NAMES)
    ]
    files = []
    for i, p in enumerate(patients):
        files += dicomdata.make_mr_series(tmp_path / f"mr{i}", 3, patient=p, seed=f"phi{i}")
    assert gateway.storescu(*files).returncode == 0
    gateway.stop()
    raw = b"".join(p.read_bytes() for p in (gateway.dir / "data").glob("ledger.db*"))
    assert len(ledger_payloads(gateway)) == 6
    for p in patients:
        for value in (p.name, p.name.split("^")[0], p.patient_id, p.birth_date, p.accession):
            assert value.encode() not in raw, f"{value} found in the ledger database"
    # ...while the local index (which is not the ledger) does hold them, so the search is real
    index_raw = b"".join(p.read_bytes() for p in (gateway.dir / "data").glob("index.db*"))
    assert patients[0].patient_id.encode() in index_raw


@pytest.mark.slow
def test_sigkill_during_500_image_send_loses_nothing_acknowledged(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    gw.start()
    files = dicomdata.make_mr_series(tmp_path / "mr", 500)
    out_path = tmp_path / "storescu.out"
    sender = gw.storescu_in_background(files, out_path)
    wait_for_successes(out_path, 150)
    gw.kill()
    sender.wait(timeout=60)
    output = out_path.read_text()
    acknowledged = []
    current = None
    for line in output.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acknowledged.append(Path(current))
    assert 150 <= len(acknowledged) < 500, output[-2000:]

    gw.start()
    try:
        for f in acknowledged:
            uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            rows = index_rows(
                gw, f"SELECT path, ledger_index FROM instances WHERE sop_instance_uid = '{uid}'"
            )
            assert rows and rows[0][1] is not None, (
                f"{f.name} acknowledged but not indexed+anchored"
            )
            assert (gw.dir / "data" / "images" / rows[0][0]).exists()
        for f in acknowledged[:: max(1, len(acknowledged) // 10)]:
            assert gw.cli("verify-file", str(f)).returncode == 0
        unanchored = index_rows(gw, "SELECT COUNT(*) FROM instances WHERE ledger_index IS NULL")
        assert unanchored == [(0,)]
        assert list((gw.dir / "data" / "images" / "tmp").iterdir()) == []
    finally:
        gw.stop()
    verify = gw.cli("verify")
    assert verify.returncode == 0, verify.stdout


def test_disk_error_answers_out_of_resources_and_leaves_nothing_behind(gateway, tmp_path):
    files = dicomdata.make_mr_series(tmp_path / "mr", 2)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    blocker = gateway.dir / "data" / "images" / study
    blocker.write_text("a file where the study folder must go: mkdir fails")
    result = gateway.storescu(files[0])
    out = result.stdout + result.stderr
    assert "Received Store Response (Refused: OutOfResources)" in out, out
    errors = [line for line in log_lines(gateway) if line.get("event") == "c-store"]
    assert errors[-1]["status"] == "0xA700" and "cannot store" in errors[-1]["outcome"]
    assert ledger_payloads(gateway) == []
    assert index_rows(gateway, "SELECT COUNT(*) FROM instances") == [(0,)]
    assert list((gateway.dir / "data" / "images" / "tmp").iterdir()) == []
    blocker.unlink()
    assert gateway.storescu(*files).returncode == 0
    assert len(ledger_payloads(gateway)) == 2


def test_sigterm_finishes_in_flight_stores_and_stops_cleanly(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    gw.start()
    files = dicomdata.make_mr_series(tmp_path / "mr", 300)
    out_path = tmp_path / "storescu.out"
    sender = gw.storescu_in_background(files, out_path)
    wait_for_successes(out_path, 50)
    assert gw.stop(signal.SIGTERM) == 0
    sender.wait(timeout=60)
    acknowledged = successes(out_path.read_text())
    assert acknowledged >= 50
    lines = log_lines(gw)
    assert lines[-1]["event"] == "gateway stopped"
    anchored = index_rows(gw, "SELECT COUNT(*) FROM instances WHERE ledger_index IS NOT NULL")[0][0]
    assert anchored >= acknowledged
    assert index_rows(gw, "SELECT COUNT(*) FROM instances WHERE ledger_index IS NULL") == [(0,)]
    assert gw.cli("verify").returncode == 0
    # the clean stop signed a checkpoint covering everything
    status = gw.cli("status").stdout
    assert f"{anchored} entries, newest checkpoint at size {anchored}" in status, status


def test_verify_file_recognises_a_losslessly_transcoded_copy(gateway, tmp_path):
    (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1)
    assert gateway.storescu(f).returncode == 0
    copies = dicomdata.make_compressed_copies(f, tmp_path / "copies", ["jpeg-ls", "rle"])
    for label, copy in copies.items():
        check = gateway.cli("verify-file", str(copy))
        assert check.returncode == 0, (label, check.stdout)
        assert "decoded pixel values match" in check.stdout


def _private_sop_dataset(sop_class: str):
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.PatientID = "DLFAKE-PRIVATE"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return ds


def test_unknown_sop_classes_only_when_configured(tmp_path):
    private = "1.2.826.0.1.3680043.9.9999.1.1"  # not a standard storage SOP class
    for accept in (False, True):
        gw = GatewayProcess(tmp_path / f"gw-{accept}")
        if accept:
            text = gw.config.read_text().replace(
                "accept_unknown_sop_classes = false", "accept_unknown_sop_classes = true"
            )
            gw.config.write_text(text)
        gw.start()
        try:
            ae = AE(ae_title="STORESCU")
            ae.add_requested_context(private, pydicom.uid.ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.ae_title)
            if not accept:
                assert not assoc.is_established or not assoc.accepted_contexts
                if assoc.is_established:
                    assoc.release()
                assert ledger_payloads(gw) == []
                continue
            assert assoc.is_established and assoc.accepted_contexts
            status = assoc.send_c_store(_private_sop_dataset(private))
            assoc.release()
            assert status.Status == 0x0000
            (payload,) = ledger_payloads(gw)
            assert payload["sop_class"] == private and payload["hash_method"] == "content-canonical"
        finally:
            gw.stop()


def test_more_concurrent_associations_than_pynetdicoms_default_of_ten(gateway, tmp_path):
    files = dicomdata.make_mr_series(tmp_path / "mr", 15)
    associations = []
    for _ in files:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", gateway.port, ae_title=gateway.ae_title)
        assert assoc.is_established
        associations.append(assoc)
    statuses = [
        assoc.send_c_store(pydicom.dcmread(f)).Status
        for assoc, f in zip(associations, files, strict=True)
    ]
    for assoc in associations:
        assoc.release()
    assert statuses == [0x0000] * 15
    assert len(ledger_payloads(gateway)) == 15


def test_wrong_called_ae_title_is_refused_and_logged(gateway, tmp_path):
    files = dicomdata.make_mr_series(tmp_path / "mr", 1)
    result = dcmtk(
        "storescu",
        "-aet",
        "STORESCU",
        "-aec",
        "NOT_THE_GATEWAY",
        "127.0.0.1",
        str(gateway.port),
        str(files[0]),
    )
    assert result.returncode != 0 and "Association Rejected" in result.stdout + result.stderr
    refused = [line for line in log_lines(gateway) if line.get("event") == "association refused"]
    assert refused and "NOT_THE_GATEWAY" in refused[0]["reason"]
    assert ledger_payloads(gateway) == []


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom reading the wheel's odd files
def test_the_senders_preferred_transfer_syntax_is_accepted(gateway, tmp_path):
    # storescu +C proposes one context per SOP class: [Explicit LE, Explicit BE, Implicit]
    (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1)
    ds = pydicom.dcmread(f)
    block = ds.private_block(0x0009, "DLTEST", create=True)
    block.add_new(0x10, "LO", "kept with its VR")
    ds.save_as(f)
    result = gateway.storescu(f, options=("+C",))
    assert result.returncode == 0, result.stdout + result.stderr
    ((path, syntax),) = index_rows(gateway, "SELECT path, transfer_syntax_uid FROM instances")
    assert syntax == pydicom.uid.ExplicitVRLittleEndian
    stored = pydicom.dcmread(gateway.dir / "data" / "images" / path)
    assert stored.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert stored.private_block(0x0009, "DLTEST")[0x10].VR == "LO"  # not UN, as after Implicit VR

    # dcmsend proposes [file's syntax, Explicit LE, Explicit BE, Implicit] per file syntax: it
    # sends JPEG, JPEG-LS, RLE and deflated files as they are only if we accept their syntax
    by_uid: dict[str, list[tuple[Path, str]]] = {}
    for p, syntax in dicomdata.wheel_test_files(compressed_only=True):
        uid = pydicom.dcmread(p, stop_before_pixels=True).get("SOPInstanceUID")
        if uid:
            by_uid.setdefault(str(uid), []).append((p, str(syntax)))
    checked = set()
    rounds = max(len(versions) for versions in by_uid.values())
    for n in range(rounds):  # several wheel files share a UID: one version of each per round
        batch = {uid: versions[n] for uid, versions in by_uid.items() if n < len(versions)}
        before = {
            uid: row
            for uid, *row in index_rows(
                gateway, "SELECT sop_instance_uid, path, transfer_syntax_uid FROM instances"
            )
        }
        dcmtk(
            "dcmsend",
            "--no-halt",
            "-aet",
            "STORESCU",
            "-aec",
            gateway.ae_title,
            "127.0.0.1",
            str(gateway.port),
            *(str(p) for p, _ in batch.values()),
        )
        after = {
            uid: row
            for uid, *row in index_rows(
                gateway, "SELECT sop_instance_uid, path, transfer_syntax_uid FROM instances"
            )
        }
        for uid, (p, syntax) in batch.items():
            if uid in after and after[uid] != before.get(
                uid
            ):  # stored now (a few wheel files are refused)
                assert after[uid][1] == syntax, (
                    f"{p.name} sent as {syntax}, stored as {after[uid][1]}"
                )
                checked.add(syntax)
    for wanted in (
        pydicom.uid.JPEGBaseline8Bit,
        pydicom.uid.JPEGLSLossless,
        pydicom.uid.RLELossless,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
    ):
        assert wanted in checked, f"no file in {wanted.name} was checked"


def test_requestor_preference_gives_each_context_its_own_first_choice(tmp_path):
    """The gateway's negotiation (its DICOM layer configured as `serve` configures it) gives
    each proposed context the requestor's first syntax among those we support."""
    from dicomledger.dicom.net import DicomServer
    from tests.netharness import associate_rq

    server = DicomServer(
        ae_title="GATEWAY",
        host="127.0.0.1",
        port=0,
        allowed_calling_aes=None,
        on_store=None,
        temp_dir=tmp_path,
    )  # type: ignore[arg-type]  (never started)

    def chosen(*proposals: list[str]) -> list[str]:
        rq = associate_rq(
            [(2 * i + 1, dicomdata.MR_IMAGE, p) for i, p in enumerate(proposals)], called="GATEWAY"
        )
        answer = server.negotiator.negotiate(rq[6:])
        return [answer.contexts[2 * i + 1].transfer_syntax for i in range(len(proposals))]

    ex, be, im, jls, rle = (
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.5",
    )
    assert chosen([ex, be, im]) == [ex]
    # dcmsend: one context per file syntax, each with the uncompressed ones after it
    assert chosen([jls, ex, be, im], [rle, ex, be, im], [ex, be, im]) == [jls, rle, ex]
    assert chosen([im], [ex, im]) == [im, ex]
    assert chosen(["1.2.3.4.5", be, im]) == [be]  # first one we support
    assert chosen([ex, im], [im, ex])[0] == ex  # the earlier context gets its own choice...
    assert chosen([ex, im], [im, ex])[1] == im  # ...and so does the later one (per context)
