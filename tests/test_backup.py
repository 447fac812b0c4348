"""Backup and restore, against gateway processes: an online backup taken
while storescu sends is consistent (every index row's file and anchor are in it), a restore
refuses a live data directory, existing data and an altered backup, and puts the gateway back
so that it verifies and serves; kill -9 of the backup (or of the gateway) during a backup
leaves nothing that passes for a backup and a gateway that still verifies."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import dicomdata
from tests.conftest import ROOT, GatewayProcess
from tests.test_erasure import index_count, stored_files

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


def backup_consistency(backup: Path) -> tuple[int, int]:
    """(index rows, entries of the gateway's own log) of a backup; asserts that each row's
    file is in the backup and its anchor, if it had one yet, in the backup's ledger (a row
    copied between its receipt and its anchor is anchored when the restored gateway starts,
    as after a crash: no Success had been sent for it)."""
    manifest = json.loads((backup / "manifest.json").read_text())
    images = {i["path"] for i in manifest["images"]}
    index = sqlite3.connect(backup / "db" / "index.db")
    ledger = sqlite3.connect(backup / "db" / "ledger.db")
    try:
        rows = index.execute("SELECT path, ledger_origin, ledger_index FROM instances").fetchall()
        for path, origin, idx in rows:
            assert path in images, path
            assert (backup / "images" / path).is_file()
            assert (
                idx is None
                or ledger.execute(
                    "SELECT 1 FROM entries e JOIN origins o ON o.id = e.origin_id WHERE o.name = ? AND e.idx = ?",
                    (origin, idx),
                ).fetchone()
            ), (origin, idx)
        return len(rows), manifest["logs"][manifest["origin"]]
    finally:
        index.close()
        ledger.close()


def test_online_backup_while_storing_then_restore(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    first = dicomdata.make_mr_series(tmp_path / "first", 20, seed="bk-first")
    during = dicomdata.make_mr_series(tmp_path / "during", 150, 16, 16, seed="bk-during")
    gw.start()
    try:
        assert gw.storescu(*first).returncode == 0
        sender = gw.storescu_in_background(during, tmp_path / "storescu.log")
        time.sleep(0.3)  # the backup starts while the images arrive
        linked = gw.cli("backup", "-o", str(tmp_path / "bk1"))
        assert linked.returncode == 0, linked.stderr
        assert sender.wait(timeout=120) == 0
        copied = gw.cli("backup", "-o", str(tmp_path / "bk2"), "--copy")
        assert copied.returncode == 0, copied.stderr
        rows, entries = backup_consistency(tmp_path / "bk1")
        assert 20 <= rows <= 170 and entries >= rows, (rows, entries)
        assert backup_consistency(tmp_path / "bk2") == (170, 170)
        assert json.loads((tmp_path / "bk1" / "manifest.json").read_text())["hard_linked"] is True
        again = gw.cli("backup", "-o", str(tmp_path / "bk1"))
        assert again.returncode == 1 and "not empty" in again.stderr
        live = gw.cli("restore", "--from", str(tmp_path / "bk2"), "--replace")
        assert live.returncode == 1 and "a gateway is running" in live.stderr, live.stderr
    finally:
        gw.stop()

    held = gw.cli("restore", "--from", str(tmp_path / "bk2"))
    assert held.returncode == 1 and "already holds data" in held.stderr, held.stderr
    # an altered backup is refused as a whole: nothing is restored
    victim = next((tmp_path / "bk2" / "images").rglob("*.dcm"))
    data = bytearray(victim.read_bytes())
    data[-5] ^= 1
    victim.write_bytes(bytes(data))
    altered = gw.cli("restore", "--from", str(tmp_path / "bk2"), "--replace")
    assert altered.returncode == 1 and "does not match its manifest" in altered.stderr, (
        altered.stderr
    )
    assert index_count(gw) == 170

    restored = gw.cli("restore", "--from", str(tmp_path / "bk1"), "--replace")
    assert restored.returncode == 0, restored.stderr
    assert "moved" in restored.stdout and "aside" in restored.stdout
    assert index_count(gw) == rows and len(stored_files(gw)) == rows
    gw.start()
    try:
        assert "awaiting an anchor" not in gw.cli("status").stdout
        assert gw.cli("verify").returncode == 0
        assert gw.cli("verify-file", str(first[0])).returncode == 0
        scrub = gw.cli("scrub")
        assert scrub.returncode == 0 and f"{rows} instances checked, 0 alarms" in scrub.stdout, (
            scrub.stdout
        )
        assert (
            gw.storescu(
                *dicomdata.make_mr_series(tmp_path / "after", 2, seed="bk-after")
            ).returncode
            == 0
        )
    finally:
        gw.stop()
    assert gw.cli("verify").returncode == 0


def start_backup(gw: GatewayProcess, output: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dicomledger.cli",
            "backup",
            "--config",
            str(gw.config),
            "-o",
            str(output),
            "--copy",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def when(pattern: str, folder: Path, timeout: float = 60) -> None:
    """Return as soon as ``folder`` holds a path matching ``pattern`` (polled every millisecond:
    a backup of a few hundred small files takes a fraction of a second)."""
    deadline = time.monotonic() + timeout
    while not any(folder.glob(pattern)):
        assert time.monotonic() < deadline, f"nothing matched {pattern} in {folder}"
        time.sleep(0.001)


def test_kill_9_during_a_backup_leaves_no_backup_and_a_consistent_gateway(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    files = dicomdata.make_mr_series(tmp_path / "mr", 200, 16, 16, seed="bk-kill")
    backups = tmp_path / "backups"
    backups.mkdir()
    gw.start()
    try:
        assert gw.storescu(*files).returncode == 0
        target = backups / "nightly"
        backup = start_backup(gw, target)
        when(".nightly.partial-*/images", backups)  # copying images
        backup.kill()
        backup.wait()
        assert not target.exists()  # nothing that passes for a backup
        [partial] = backups.glob(".nightly.partial-*")
        refused = gw.cli("restore", "--from", str(partial))
        assert refused.returncode == 1 and "a gateway is running" in refused.stderr, refused.stderr
        assert (
            gw.storescu(
                *dicomdata.make_mr_series(tmp_path / "more", 2, seed="bk-kill-more")
            ).returncode
            == 0
        )
        assert gw.cli("verify").returncode == 0

        # a new backup removes the leftover and completes; then the gateway is killed during one
        done = gw.cli("backup", "-o", str(target), "--copy")
        assert done.returncode == 0 and "did not finish" in done.stdout, done.stdout + done.stderr
        assert not list(backups.glob(".nightly.partial-*"))
        second = start_backup(gw, backups / "second")
        when(".second.partial-*", backups)
        gw.kill()
        _, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
    finally:
        gw.stop()
    assert (
        gw.cli("restore", "--from", str(partial), "--replace").returncode == 1
    )  # no manifest: not a backup
    assert backup_consistency(backups / "second") == (202, 202)
    assert gw.cli("verify").returncode == 0
    assert gw.cli("restore", "--from", str(backups / "second"), "--replace").returncode == 0
    gw.start()
    try:
        assert index_count(gw) == 202 and gw.cli("verify").returncode == 0
    finally:
        gw.stop()
