"""Consortium: gateways as real processes on loopback replicate and witness each other's logs."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tests import dicomdata
from tests.conftest import GatewayProcess, consortium, dicomledger


def log_size(gw: GatewayProcess, origin: str) -> int:
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'ledger.db'}?mode=ro", uri=True)
    try:
        row = con.execute(
            "SELECT MAX(e.idx) FROM entries e JOIN origins o ON o.id = e.origin_id WHERE o.name = ?",
            (origin,),
        ).fetchone()
    finally:
        con.close()
    return 0 if row is None or row[0] is None else row[0] + 1


def wait_until(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_entries_replicate_to_every_peer_and_are_witnessed(tmp_path):
    gateways = consortium(tmp_path, 3)
    a, b, c = gateways
    for gw in gateways:
        gw.start()
    try:
        files = dicomdata.make_mr_series(tmp_path / "mr", 5)
        assert a.storescu(*files).returncode == 0
        for gw in (b, c):
            wait_until(lambda gw=gw: log_size(gw, a.origin) == 5, what=f"{gw.origin} to hold A's 5 entries")
        # B's copy verifies, and finds A's anchor for the file
        assert b.cli("verify").returncode == 0
        found = b.cli("verify-file", str(files[0]))
        assert found.returncode == 0 and a.origin in found.stdout, found.stdout
        # A's checkpoint gets cosigned by B and C, and `prove` carries the cosignatures
        trust = tmp_path / "trust.txt"
        trust.write_text("".join(gw.vkey + "\n" for gw in gateways))

        def witnessed() -> bool:
            proof = tmp_path / "a.proof"
            if a.cli("prove", "--entry", "4", "-o", str(proof)).returncode != 0:
                return False
            out = dicomledger("check-proof", str(proof), "--trust", str(trust)).stdout
            return f"witnessed by {b.origin}" in out and f"witnessed by {c.origin}" in out

        wait_until(witnessed, what="cosignatures by B and C on A's checkpoint")
    finally:
        for gw in gateways:
            gw.stop()
    for gw in gateways:
        assert gw.cli("verify").returncode == 0


def test_a_stopped_gateway_catches_up_by_itself(tmp_path):
    gateways = consortium(tmp_path, 3)
    a, b, c = gateways
    for gw in gateways:
        gw.start()
    try:
        c.stop()
        assert a.storescu(*dicomdata.make_mr_series(tmp_path / "a", 500, seed="a")).returncode == 0
        assert b.storescu(*dicomdata.make_mr_series(tmp_path / "b", 500, seed="b")).returncode == 0
        unreachable = a.cli("peers").stdout
        assert f"{c.origin}" in unreachable
        c.start()
        for origin in (a.origin, b.origin):
            wait_until(lambda origin=origin: log_size(c, origin) == 500, timeout=60, what=f"C to catch up on {origin}")
        status = c.cli("peers").stdout
        assert "we hold 500 entries" in status and "not flagged" in status, status
    finally:
        for gw in gateways:
            gw.stop()
    for gw in gateways:
        result = gw.cli("verify")
        assert result.returncode == 0, result.stdout
        assert "500 entries" in result.stdout
