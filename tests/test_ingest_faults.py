"""The ingest path under real faults: stores that end badly leave nothing behind, a full image
disk is answered 0xA700 and stores resume when space returns, and a forward lost between
anchoring and queueing is routed when the sender sends the instance again."""

from __future__ import annotations

import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from tests import dicomdata
from tests.conftest import ROOT, GatewayProcess
from tests.dimse import associate, send_as_is, send_part, store_request
from tests.test_forwarding import entries_of_kind, forwarding_gateway, pacs  # noqa: F401 (fixture)
from tests.test_logs import assert_json_log_without
from tests.test_storage_scp import index_rows, ledger_payloads, log_lines

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

MR = "1.2.840.10008.5.1.4.1.1.4"


def tmp_files(gw: GatewayProcess) -> list[Path]:
    return list((gw.dir / "data" / "images" / "tmp").iterdir())


def wait_for(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def c_store_lines(gw: GatewayProcess) -> list[dict]:
    return [line for line in log_lines(gw) if line.get("event") == "c-store"]


# --- partial uploads ---------------------------------------------------------------------


def test_partial_uploads_are_removed_while_the_gateway_runs(gateway, tmp_path):
    (big,) = dicomdata.make_mr_series(tmp_path / "mr", 1, rows=512, cols=512, seed="partial")
    sop_instance = str(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID)

    def half_sent() -> object:
        assoc = associate(gateway.port, gateway.ae_title, MR, [ExplicitVRLittleEndian])
        send_part(assoc, big)
        wait_for(lambda: tmp_files(gateway), "the gateway to receive into a temporary file")
        return assoc

    # 1. half a dataset, then an A-ABORT
    half_sent().abort()
    wait_for(lambda: not tmp_files(gateway), "the aborted upload to be removed")

    # 2. half a dataset, then a TCP reset
    assoc = half_sent()
    raw = assoc.dul.socket.socket
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.shutdown(socket.SHUT_RDWR)
    wait_for(lambda: not tmp_files(gateway), "the reset upload to be removed")
    assoc.abort()

    # 3. a command set pynetdicom cannot use (no Affected SOP Instance UID) before a dataset
    assoc = associate(gateway.port, gateway.ae_title, MR, [ExplicitVRLittleEndian])
    send_part(assoc, big, command=store_request(MR, None))
    time.sleep(0.5)
    wait_for(lambda: not tmp_files(gateway), "the upload under a bad command set to be removed")
    assoc.abort()

    # 4. the sender is killed in the middle of the dataset
    sender = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.dimse",
            "partial",
            str(gateway.port),
            gateway.ae_title,
            str(big),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert sender.stdout is not None and sender.stdout.readline().strip() == "sent"
        assert tmp_files(gateway)
        sender.send_signal(signal.SIGKILL)
    finally:
        sender.wait(timeout=10)
    wait_for(lambda: not tmp_files(gateway), "the killed sender's upload to be removed")

    # 5. whole datasets the gateway fails: bad data (0xC000) leaves nothing either
    bad = tmp_path / "bad.dcm"
    ds = pydicom.dcmread(big)
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(bad)
    assoc = associate(gateway.port, gateway.ae_title, MR, [ExplicitVRLittleEndian])
    assert send_as_is(assoc, bad) == 0xC000
    assert tmp_files(gateway) == []
    # ...and the gateway still stores, on the same association
    assert send_as_is(assoc, big) == 0x0000
    assoc.release()
    assert tmp_files(gateway) == []
    assert index_rows(
        gateway, f"SELECT COUNT(*) FROM instances WHERE sop_instance_uid = '{sop_instance}'"
    ) == [(1,)]
    # The bad command set is refused before its data set, which is read and dropped (the old
    # pynetdicom server's DUL thread died of it; our DICOM layer does not): no thread ends, and
    # each of the four cut-off stores is named in its association's one JSON line
    records = assert_json_log_without(gateway)
    assert not any(r.get("event") == "exception ended a thread" for r in records)
    ended = [r for r in records if r.get("event") == "association"]
    assert sum("data set incomplete" in str(r.get("reason")) for r in ended) == 4, ended


# --- a full image disk (item 16) ---------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 12 MiB tmpfs as the image store's file system: ENOSPC for real, in a few MB."""
    mount = tmp_path / "images"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_full_image_disk_answers_out_of_resources_and_resumes(tmp_path, small_disk):
    gw = GatewayProcess(tmp_path / "gw")
    gw.set('directory = "data/images"', f'directory = "{small_disk}"')
    gw.start()
    try:
        files = dicomdata.make_mr_series(tmp_path / "mr", 3, rows=256, cols=256, seed="full")
        (too_big,) = dicomdata.make_mr_series(tmp_path / "big", 1, rows=2600, cols=2600, seed="big")
        filler = fill(small_disk)

        # several senders at once onto the full disk: each is answered, none is cut off
        outputs = [tmp_path / f"storescu{i}.out" for i in range(3)]
        senders = [
            gw.storescu_in_background([f], out) for f, out in zip(files, outputs, strict=True)
        ]
        for sender in senders:
            sender.wait(timeout=60)
        for out in outputs:
            text = out.read_text()
            assert "Received Store Response (Refused: OutOfResources)" in text, text
            assert "Association Aborted" not in text and "Peer aborted" not in text, text
        failed = c_store_lines(gw)
        assert len(failed) == 3 and {line["status"] for line in failed} == {"0xA700"}
        assert all("No space left on device" in line["outcome"] for line in failed), failed
        assert [p.name for p in (small_disk / "tmp").iterdir()] == []
        assert ledger_payloads(gw) == [] and index_rows(gw, "SELECT COUNT(*) FROM instances") == [
            (0,)
        ]

        # space returns: the same senders succeed
        filler.unlink()
        result = gw.storescu(*files)
        assert (
            result.returncode == 0
            and result.stdout.count("(Success)") + result.stderr.count("(Success)") == 3
        )
        assert len(ledger_payloads(gw)) == 3

        # an instance larger than the whole disk: 0xA700 while other stores go on
        result = gw.storescu(too_big)
        assert "Received Store Response (Refused: OutOfResources)" in result.stdout + result.stderr
        assert [p.name for p in (small_disk / "tmp").iterdir()] == []
        assert len(ledger_payloads(gw)) == 3
        assert "Traceback" not in gw.log()
    finally:
        gw.stop()


# --- a forward lost between anchoring and queueing (item 6) ---------------------------------


def test_a_forward_that_failed_to_queue_is_routed_when_the_sender_resends(tmp_path, pacs):  # noqa: F811
    pacs_port, received = pacs
    gw = forwarding_gateway(tmp_path, pacs_port)
    patient = dicomdata.fake_patient("lost-forward")
    gw.start()
    try:
        assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS").returncode == 0
        (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1, seed="lost-forward", patient=patient)
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)

        # the forward queue's database fails once: the instance is anchored, its job not queued
        queue = sqlite3.connect(gw.dir / "data" / "forward.db", isolation_level=None)
        queue.execute(
            "CREATE TRIGGER fail BEFORE INSERT ON jobs BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
        )
        first = gw.storescu(f)
        assert "Received Store Response (Refused: OutOfResources)" in first.stdout + first.stderr
        queue.execute("DROP TRIGGER fail")
        queue.close()
        assert len(entries_of_kind(gw, "image-anchored")) == 1
        assert entries_of_kind(gw, "forwarded") == []

        # the sender sends it again (a duplicate of the anchored instance): now it is routed
        assert gw.storescu(f).returncode == 0
        wait_for(lambda: len(entries_of_kind(gw, "forwarded")) == 1, "the forward")
        # ...and a third copy is a duplicate whose forward is decided: not routed again
        assert gw.storescu(f).returncode == 0
        time.sleep(1.0)
        assert len(entries_of_kind(gw, "forwarded")) == 1
        assert len(entries_of_kind(gw, "image-anchored")) == 1
        copies = [p for p in received.iterdir() if pydicom.dcmread(p).SOPInstanceUID == uid]
        assert len(copies) == 1
        outcomes = [(line["status"], line["outcome"]) for line in c_store_lines(gw)]
        assert outcomes[0][0] == "0xA700" and "forward queue" in outcomes[0][1], outcomes
        anchor = re.fullmatch(
            r"duplicate of anchored entry (\d+); forwarding: PACS: queued", outcomes[1][1]
        )
        assert outcomes[1][0] == "0x0000" and anchor, outcomes
        assert outcomes[2] == ("0x0000", f"duplicate of anchored entry {anchor[1]}"), outcomes
        assert "Traceback" not in gw.log()
    finally:
        gw.stop()
