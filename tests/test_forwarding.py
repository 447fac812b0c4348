"""Forwarding gated by patient permissions: a gateway process forwards to DCMTK storescp only
what a grant on its ledger authorises, and records every forward and refusal."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pydicom.uid
import pytest

from dicomledger.ledger.entries import decode_entry
from tests import dicomdata
from tests.conftest import DCMTK_ENV, GatewayProcess, consortium, free_port
from tests.test_consortium import log_size, wait_until

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


def entries_of_kind(gw: GatewayProcess, kind: str) -> list[dict]:
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'ledger.db'}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT e.data FROM entries e JOIN origins o ON o.id = e.origin_id WHERE o.name = ? ORDER BY e.idx",
            (gw.origin,),
        ).fetchall()
    finally:
        con.close()
    return [e.payload for e in map(lambda r: decode_entry(bytes(r[0])), rows) if e.kind == kind]


@pytest.fixture
def pacs(tmp_path: Path):
    out = tmp_path / "pacs"
    out.mkdir()
    port = free_port()
    log = open(tmp_path / "storescp.log", "w")
    proc = subprocess.Popen(
        ["storescp", "-v", "-aet", "PACS", "-od", str(out), "+uf", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=DCMTK_ENV,
    )
    time.sleep(0.5)
    yield port, out
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def forwarding_gateway(tmp_path: Path, pacs_port: int) -> GatewayProcess:
    gw = GatewayProcess(tmp_path / "gw")
    with open(gw.config, "a") as f:
        f.write(
            "\n[forwarding]\nretry_initial = 0.2\nretry_max = 1.0\n"
            f'\n[[destinations]]\nae_title = "PACS"\naddress = "127.0.0.1:{pacs_port}"\n'
            '\n[[routes]]\nto = ["PACS"]\nmodality = "MR"\n'
        )
    return gw


def test_forwarded_only_while_a_grant_authorises_it(tmp_path, pacs):
    pacs_port, received = pacs
    gw = forwarding_gateway(tmp_path, pacs_port)
    patient = dicomdata.fake_patient("fw")
    # the admin commands need the running gateway, and say so
    down = gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS")
    assert down.returncode == 2 and "not running" in down.stderr, down.stderr
    gw.start()
    try:
        before = dicomdata.make_mr_series(tmp_path / "before", 2, seed="before", patient=patient)
        assert gw.storescu(*before).returncode == 0
        refused = entries_of_kind(gw, "forward-refused")
        assert len(refused) == 2 and all(r["destination"] == "PACS" for r in refused)
        assert "no grant" in refused[0]["reason"] or "deny" in refused[0]["reason"].lower(), (
            refused[0]
        )

        granted = gw.cli(
            "grant", "--patient-id", patient.patient_id, "--to", "PACS", "--purpose", "follow-up"
        )
        assert granted.returncode == 0, granted.stderr
        shown = gw.cli("permissions", "--patient-id", patient.patient_id)
        assert "to PACS, all studies" in shown.stdout, shown.stdout

        during = dicomdata.make_mr_series(tmp_path / "during", 3, seed="during", patient=patient)
        assert gw.storescu(*during).returncode == 0
        # the grant also sends the 2 stored before it (consent drives forwarding)
        wait_until(lambda: len(entries_of_kind(gw, "forwarded")) == 5, what="5 forwarded entries")
        for path in before + during:
            sent = pydicom.dcmread(path)
            copies = [
                p
                for p in received.iterdir()
                if pydicom.dcmread(p).SOPInstanceUID == sent.SOPInstanceUID
            ]
            assert len(copies) == 1
            assert pydicom.dcmread(copies[0]).PixelData == sent.PixelData
        assert len(list(received.iterdir())) == 5

        revoked = gw.cli(
            "revoke", "--patient-id", patient.patient_id, "--to", "PACS", "--reason", "withdrawn"
        )
        assert revoked.returncode == 0, revoked.stderr
        after = dicomdata.make_mr_series(tmp_path / "after", 2, seed="after", patient=patient)
        assert gw.storescu(*after).returncode == 0
        time.sleep(1)
        assert len(list(received.iterdir())) == 5
        assert len(entries_of_kind(gw, "forward-refused")) == 4
        shown = gw.cli("permissions", "--patient-id", patient.patient_id)
        assert "effective grants: none" in shown.stdout and "revoked by" in shown.stdout, (
            shown.stdout
        )
    finally:
        gw.stop()
    # no PHI went onto the ledger with the permissions
    ledger = (gw.dir / "data" / "ledger.db").read_bytes()
    assert patient.patient_id.encode() not in ledger
    assert gw.cli("verify").returncode == 0


def test_destination_down_then_up_with_a_restart_delivers_each_once(tmp_path):
    pacs_port = free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    gw = forwarding_gateway(tmp_path, pacs_port)
    patient = dicomdata.fake_patient("down")
    gw.start()
    storescp = None
    try:
        assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS").returncode == 0
        files = dicomdata.make_mr_series(tmp_path / "mr", 200, seed="down", patient=patient)
        assert gw.storescu(*files).returncode == 0  # the PACS is down: all 200 wait in the queue
        time.sleep(1)
        assert "forward failed; will retry" in gw.log()
        assert gw.stop() == 0
        gw.start()  # the queue survives the restart
        log = open(tmp_path / "storescp.log", "w")
        storescp = subprocess.Popen(
            ["storescp", "-v", "-aet", "PACS", "-od", str(received), "+uf", str(pacs_port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
        )
        wait_until(
            lambda: len(entries_of_kind(gw, "forwarded")) == 200,
            timeout=60,
            what="200 forwarded entries",
        )
        time.sleep(1)
        stored = [
            pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in received.iterdir()
        ]
        assert len(stored) == 200 and len(set(stored)) == 200  # each exactly once
        assert {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files} == set(
            stored
        )
    finally:
        gw.stop()
        if storescp is not None:
            storescp.terminate()
            storescp.wait(timeout=10)
    status = gw.cli("status").stdout
    assert "forwarding to PACS" in status and "200 done, 0 refused, 0 failed" in status, status
    assert gw.cli("verify").returncode == 0


def add_forwarding(gw: GatewayProcess, pacs_port: int) -> None:
    with open(gw.config, "a") as f:
        f.write(
            "\n[forwarding]\nretry_initial = 0.2\nretry_max = 1.0\n"
            f'\n[[destinations]]\nae_title = "PACS"\naddress = "127.0.0.1:{pacs_port}"\n'
            '\n[[routes]]\nto = ["PACS"]\n'
        )


def effective(gw: GatewayProcess, patient_id: str) -> str:
    return gw.cli("permissions", "--patient-id", patient_id).stdout


def test_a_revoke_at_one_gateway_stops_forwarding_at_another(tmp_path, pacs):
    pacs_port, received = pacs
    a, b = consortium(tmp_path, 2)
    add_forwarding(b, pacs_port)
    patient = dicomdata.fake_patient("consortium")
    for gw in (a, b):
        gw.start()
    try:
        # A anchors the patient's first image: A is the custodian and may sign for the patient
        assert (
            a.storescu(
                *dicomdata.make_mr_series(tmp_path / "a", 1, seed="a", patient=patient)
            ).returncode
            == 0
        )
        wait_until(lambda: log_size(b, a.origin) == 1, what="B to hold A's anchor")
        # PACS is B's destination, not A's: A signs a grant to it only with --force
        assert (
            a.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS", "--force").returncode
            == 0
        )
        wait_until(
            lambda: "to PACS" in effective(b, patient.patient_id), what="the grant to reach B"
        )
        assert (
            b.storescu(
                *dicomdata.make_mr_series(tmp_path / "b1", 2, seed="b1", patient=patient)
            ).returncode
            == 0
        )
        wait_until(lambda: len(entries_of_kind(b, "forwarded")) == 2, what="B to forward 2 images")

        assert a.cli("revoke", "--patient-id", patient.patient_id, "--to", "PACS").returncode == 0
        wait_until(
            lambda: "effective grants: none" in effective(b, patient.patient_id),
            what="the revoke to reach B",
        )
        assert (
            b.storescu(
                *dicomdata.make_mr_series(tmp_path / "b2", 3, seed="b2", patient=patient)
            ).returncode
            == 0
        )
        time.sleep(1)
        assert len(entries_of_kind(b, "forwarded")) == 2 and len(list(received.iterdir())) == 2
        assert len(entries_of_kind(b, "forward-refused")) == 3
    finally:
        for gw in (a, b):
            gw.stop()


def test_concurrent_grant_and_revoke_give_deny_on_every_gateway(tmp_path):
    """B revokes while cut off from A; A grants without having seen the revoke. Once they meet,
    every gateway (also C, which saw them in whatever order) decides deny: revoke wins."""
    a, b, c = consortium(tmp_path, 3)
    patient = dicomdata.fake_patient("concurrent")
    for gw in (a, b, c):
        gw.start()
    try:
        # both A and B anchor images of the patient: both are custodians
        assert (
            a.storescu(
                *dicomdata.make_mr_series(tmp_path / "a", 1, seed="a", patient=patient)
            ).returncode
            == 0
        )
        assert (
            b.storescu(
                *dicomdata.make_mr_series(tmp_path / "b", 1, seed="b", patient=patient)
            ).returncode
            == 0
        )
        for gw in (a, b, c):
            wait_until(
                lambda gw=gw: log_size(gw, a.origin) == 1 and log_size(gw, b.origin) == 1,
                what="anchors",
            )
        a.stop()
        # no gateway here has a PACS destination: grant and revoke to it need --force
        assert (
            b.cli(
                "revoke", "--patient-id", patient.patient_id, "--to", "PACS", "--force"
            ).returncode
            == 0
        )
        b.stop()
        c.stop()
        a.start(
            accept_local_tip=True
        )  # A alone (no peer to confirm its log): it has not seen B's revoke
        assert (
            a.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS", "--force").returncode
            == 0
        )
        assert "to PACS" in effective(a, patient.patient_id)
        b.start()
        c.start()
        for gw in (a, b, c):
            wait_until(
                lambda gw=gw: (
                    "effective grants: none" in (out := effective(gw, patient.patient_id))
                    and "2 records" in out
                ),
                what=f"{gw.origin} to hold both records and deny",
            )
            assert "revoked by" in effective(gw, patient.patient_id)
    finally:
        for gw in (a, b, c):
            gw.stop()


def test_kill_9_during_a_batch_then_restart_delivers_every_instance_once(tmp_path, pacs):
    """kill -9 while a batch is being sent, restart: every instance reaches storescp, the
    ledger holds exactly one forwarded entry per instance and the queue one done job each.
    Jobs the crash left in flight are marked done if their entry is on the ledger and sent
    again otherwise: storescp (+uf, a new file per receipt) may hold a second copy only of
    those sent again (a Success that came just before the kill, not yet recorded)."""
    pacs_port, received = pacs
    gw = forwarding_gateway(tmp_path, pacs_port)
    patient = dicomdata.fake_patient("kill9")
    files = dicomdata.make_mr_series(tmp_path / "mr", 400, seed="kill9", patient=patient)
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    gw.start()
    try:
        assert gw.storescu(*files).returncode == 0  # no grant yet: nothing is sent
        assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS").returncode == 0
        wait_until(
            lambda: len(entries_of_kind(gw, "forwarded")) >= 60,
            timeout=60,
            what="a first batch delivered",
        )
        gw.kill()
        before_restart = len(entries_of_kind(gw, "forwarded"))
        assert before_restart < 400, "all delivered before the kill: nothing was in flight"
        offset = len(gw.log())
        gw.start()
        wait_until(
            lambda: len(entries_of_kind(gw, "forwarded")) >= 400,
            timeout=120,
            what="400 forwarded entries",
        )
        wait_until(lambda: queue_done(gw) == 400, timeout=30, what="400 done jobs")
        time.sleep(0.5)
        recovery = [
            json.loads(line)
            for line in gw.log()[offset:].splitlines()
            if "forward jobs found in flight after a restart" in line
        ]
        assert len(recovery) == 1, gw.log()[offset:]  # the kill caught a batch in flight
        sent_again = recovery[0]["sent_again"]
        forwarded = entries_of_kind(gw, "forwarded")
        assert len(forwarded) == 400 and len({f["instance"] for f in forwarded}) == 400
        stored = [
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in received.iterdir()
        ]
        assert set(stored) == uids  # every instance arrived
        assert len(stored) - 400 <= sent_again < 64  # a second copy only of a job sent again
    finally:
        gw.stop()
    assert gw.cli("verify").returncode == 0


def queue_done(gw: GatewayProcess) -> int:
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'forward.db'}?mode=ro", uri=True)
    try:
        return con.execute("SELECT COUNT(*) FROM jobs WHERE state = 'done'").fetchone()[0]
    finally:
        con.close()


def test_a_jpeg_ls_image_reaches_an_uncompressed_only_destination_decompressed(tmp_path):
    """Transcoding fallback: storescp (without +xa) accepts only uncompressed syntaxes; a
    JPEG-LS stored image arrives in Explicit VR Little Endian with the same decoded pixels and
    SOP Instance UID, and its forwarded entry records transcoded_to."""
    pacs_port = free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    log = open(tmp_path / "storescp.log", "w")
    storescp = subprocess.Popen(
        ["storescp", "-v", "-aet", "PACS", "-od", str(received), str(pacs_port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=DCMTK_ENV,
    )
    gw = forwarding_gateway(tmp_path, pacs_port)
    patient = dicomdata.fake_patient("jpegls")
    (native,) = dicomdata.make_mr_series(tmp_path / "mr", 1, seed="jpegls", patient=patient)
    jpeg_ls = dicomdata.make_compressed_copies(native, tmp_path / "jls", ["jpeg-ls"])["jpeg-ls"]
    gw.start()
    try:
        assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS").returncode == 0
        assert gw.storescu(jpeg_ls, options=("-xt",)).returncode == 0
        wait_until(
            lambda: len(entries_of_kind(gw, "forwarded")) == 1, timeout=30, what="a forwarded entry"
        )
        (entry,) = entries_of_kind(gw, "forwarded")
        assert entry["transcoded_to"] == "1.2.840.10008.1.2.1", entry
        wait_until(lambda: len(list(received.iterdir())) == 1, what="storescp to hold the file")
        (got_path,) = received.iterdir()
        got, sent = pydicom.dcmread(got_path), pydicom.dcmread(jpeg_ls)
        assert got.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert got.SOPInstanceUID == sent.SOPInstanceUID
        assert (got.pixel_array == sent.pixel_array).all()
        assert (got.pixel_array == pydicom.dcmread(native).pixel_array).all()
        assert "LossyImageCompression" not in got  # a lossless original stays unmarked
    finally:
        gw.stop()
        storescp.terminate()
        storescp.wait(timeout=10)
        log.close()


def test_orthanc_receives_forwards_as_stored(tmp_path):
    """Orthanc (Debian package, fresh config) as the forwarding destination: the images of a
    granted patient arrive, their data sets byte for byte as the gateway stored them."""
    from tests.test_gateway_interop import ORTHANC, Orthanc, dataset_bytes, dataset_bytes_of

    if not Path(ORTHANC).exists():
        pytest.fail("Orthanc not installed: run ./scripts/test, which installs it")
    orthanc_port = free_port()
    gw = GatewayProcess(tmp_path / "gw")
    with open(gw.config, "a") as f:
        f.write(
            "\n[forwarding]\nretry_initial = 0.2\nretry_max = 1.0\n"
            f'\n[[destinations]]\nae_title = "ORTHANC"\naddress = "127.0.0.1:{orthanc_port}"\n'
            '\n[[routes]]\nto = ["ORTHANC"]\n'
        )
    orthanc = Orthanc(tmp_path / "orthanc", orthanc_port, gw)
    patient = dicomdata.fake_patient("to-orthanc")
    files = dicomdata.make_mr_series(tmp_path / "mr", 5, seed="to-orthanc", patient=patient)
    gw.start()
    try:
        assert (
            gw.cli("grant", "--patient-id", patient.patient_id, "--to", "ORTHANC").returncode == 0
        )
        assert gw.storescu(*files).returncode == 0
        wait_until(
            lambda: len(entries_of_kind(gw, "forwarded")) == 5,
            timeout=30,
            what="5 forwarded entries",
        )
        instances = orthanc.rest("GET", "/instances")
        assert len(instances) == 5
        by_uid = {
            orthanc.rest("GET", f"/instances/{i}/simplified-tags")["SOPInstanceUID"]: i
            for i in instances
        }
        for path in files:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            with urllib.request.urlopen(
                f"http://127.0.0.1:{orthanc.http_port}/instances/{by_uid[uid]}/file"
            ) as r:
                got = r.read()
            assert dataset_bytes_of(got) == dataset_bytes(path), path.name
    finally:
        gw.stop()
        orthanc.stop()
