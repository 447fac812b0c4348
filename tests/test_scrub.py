"""The scrub, against a gateway process: one-bit changes in a stored file
and in index rows are found by the next pass, on demand and in the background, as a
retrieval's tamper check would find them (tamper-alarm entries, error log lines), and
`status` shows the last full pass and its findings."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pydicom
import pytest

from tests import dicomdata
from tests.conftest import GatewayProcess
from tests.test_consortium import wait_until
from tests.test_forwarding import entries_of_kind

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


def stored_file(gw: GatewayProcess, source: Path) -> Path:
    uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    [found] = [p for p in (gw.dir / "data" / "images").rglob(f"{uid}.*.dcm")]
    return found


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def index_db(gw: GatewayProcess) -> sqlite3.Connection:
    con = sqlite3.connect(gw.dir / "data" / "index.db", isolation_level=None)
    con.execute("PRAGMA busy_timeout = 10000")
    return con


def flip_row_bit(gw: GatewayProcess, source: Path, column: str) -> None:
    """Flip the lowest bit of the last byte of one column of the instance's index row."""
    uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    con = index_db(gw)
    try:
        (value,) = con.execute(
            f"SELECT {column} FROM instances WHERE sop_instance_uid = ?", (uid,)
        ).fetchone()
        raw = bytearray(value if isinstance(value, bytes) else value.encode())
        raw[-1] ^= 1
        changed = bytes(raw) if isinstance(value, bytes) else raw.decode()
        con.execute(f"UPDATE instances SET {column} = ? WHERE sop_instance_uid = ?", (changed, uid))
    finally:
        con.close()


def scrub_alarms(gw: GatewayProcess) -> list[dict]:
    return [e for e in entries_of_kind(gw, "tamper-alarm") if e.get("found_by") == "scrub"]


def test_on_demand_scrub_finds_one_bit_changes_in_a_file_and_in_index_rows(tmp_path, gateway):
    x, y = dicomdata.fake_patient("scrub-x"), dicomdata.fake_patient("scrub-y")
    study_x = dicomdata.fake_uid("study", "scrub-x")
    files_x = dicomdata.make_mr_series(
        tmp_path / "x", 4, patient=x, study_uid=study_x, seed="scrub-x"
    )
    files_y = dicomdata.make_ct_series(tmp_path / "y", 3, 64, 64, patient=y, seed="scrub-y")
    assert gateway.storescu(*files_x, *files_y).returncode == 0
    clean = gateway.cli("scrub")
    assert clean.returncode == 0 and "7 instances checked, 0 alarms, 0 warnings" in clean.stdout, (
        clean.stdout
    )

    flip_bit(stored_file(gateway, files_x[0]), -10)  # a pixel byte near the end of the file
    flip_row_bit(gateway, files_x[1], "sha256")  # the row's pixel hash
    flip_row_bit(gateway, files_y[0], "patient_id")  # the instance would show under another patient
    name = stored_file(gateway, files_y[1])  # a header-only change: the anchor covers the pixels
    data = name.read_bytes()
    flip_bit(name, data.index(y.name.encode()) + 1)

    result = gateway.cli("scrub")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "scrub pass" in result.stdout and "7 of 7 instances" in result.stdout, result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ALARM", "WARNING"))]
    assert len(lines) == 4, result.stdout
    uid = {
        f: str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        for f in [*files_x, *files_y]
    }
    assert any(uid[files_x[0]] in s and "pixel hash of the stored file differs" in s for s in lines)
    assert any(
        uid[files_x[1]] in s and "index row disagrees with its anchoring entry: sha256" in s
        for s in lines
    )
    assert any(
        uid[files_y[0]] in s and "index row disagrees with its anchoring entry: patient" in s
        for s in lines
    )
    assert any(
        s.startswith("WARNING") and uid[files_y[1]] in s and "header differs" in s for s in lines
    )
    alarms = scrub_alarms(gateway)
    assert len(alarms) == 3, alarms
    flipped = next(
        a
        for a in alarms
        if a["found_sha256"]
        and a["expected_sha256"] != a["found_sha256"]
        and "pixel hash" in a["problem"]
    )
    assert flipped["anchor"]["origin"] == gateway.origin and flipped["expected_sha256"]
    assert gateway.log().count('"TAMPER ALARM: stored instance failed the scrub"') == 3
    assert x.patient_id not in gateway.log() and y.patient_id not in gateway.log()

    # the next pass finds them again (logged) but puts no second alarm on the ledger
    again = gateway.cli("scrub")
    assert again.returncode == 1 and "3 alarms, 1 warnings" in again.stdout, again.stdout
    assert len(scrub_alarms(gateway)) == 3
    assert gateway.log().count('"TAMPER ALARM: stored instance failed the scrub"') == 6
    status = gateway.cli("status").stdout
    assert (
        "scrub: last full pass" in status
        and "7 instances" in status
        and "3 alarms, 1 warnings" in status
    ), status
    assert f"ALARM {uid[files_x[0]]}" in status, status
    # one study only
    one = gateway.cli("scrub", "--study", study_x)
    assert one.returncode == 1 and "4 instances checked, 2 alarms, 0 warnings" in one.stdout, (
        one.stdout
    )
    audit = gateway.cli("audit", "--patient-id", x.patient_id)
    assert audit.stdout.count("TAMPER ALARM") == 2, audit.stdout
    # a missing file is an alarm too, not a crash
    stored_file(gateway, files_x[2]).unlink()
    missing = gateway.cli("scrub", "--study", study_x)
    assert "stored file is missing" in missing.stdout, missing.stdout
    gateway.stop()
    assert gateway.cli("verify").returncode == 0


def test_background_scrub_finds_a_flipped_bit_in_its_next_pass(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    with open(gw.config, "a") as f:  # a full pass every 3 seconds
        f.write("\n[scrub]\nfull_pass_days = 0.0000347\nmax_rate_mb_s = 50.0\n")
    files = dicomdata.make_ct_series(tmp_path / "ct", 5, 64, 64, seed="scrub-bg")
    gw.start()
    try:
        assert gw.storescu(*files).returncode == 0
        wait_until(
            lambda: "(background): 5 instances" in gw.cli("status").stdout,
            what="a clean background pass",
        )
        assert "0 alarms" in gw.cli("status").stdout
        flip_bit(stored_file(gw, files[3]), -2, bit=3)
        wait_until(
            lambda: len(scrub_alarms(gw)) == 1, what="the next background pass to raise the alarm"
        )
        wait_until(
            lambda: (
                "(background): 5 instances" in (s := gw.cli("status").stdout) and "1 alarms" in s
            ),
            what="status to show the finding",
        )
        assert "TAMPER ALARM: stored instance failed the scrub" in gw.log()
    finally:
        gw.stop()


def test_scrub_max_rate_bounds_the_read_rate_and_keeps_the_verdicts(tmp_path, gateway):
    files = dicomdata.make_ct_series(
        tmp_path / "ct", 4, seed="scrub-rate"
    )  # 4 x 512 x 512 x 16 bit: ~2 MB
    assert gateway.storescu(*files).returncode == 0
    flip_bit(stored_file(gateway, files[2]), -6)
    stored_mb = sum(stored_file(gateway, f).stat().st_size for f in files) / 1e6
    assert stored_mb > 2

    def verdicts(stdout: str) -> list[str]:
        return sorted(
            line.split(" complete: ")[-1]
            for line in stdout.splitlines()
            if line.startswith(("ALARM", "WARNING")) or "instances checked" in line
        )

    unlimited = gateway.cli("scrub")
    assert (
        unlimited.returncode == 1
        and "4 instances checked, 1 alarms, 0 warnings" in unlimited.stdout
    ), unlimited.stdout
    rate = 1.0  # MB/s
    started = time.monotonic()
    limited = gateway.cli("scrub", "--max-rate", str(rate))
    took = time.monotonic() - started
    assert limited.returncode == 1, limited.stdout + limited.stderr
    assert verdicts(limited.stdout) == verdicts(unlimited.stdout), (
        limited.stdout,
        unlimited.stdout,
    )
    assert f"of {stored_mb:.1f} MB" in limited.stdout, limited.stdout
    assert took >= 0.8 * stored_mb / rate, (
        f"{stored_mb:.1f} MB scrubbed in {took:.2f} s at a limit of {rate} MB/s"
    )
