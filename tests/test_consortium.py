"""Consortium: gateways as real processes on loopback replicate and witness each other's logs."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import time

import pytest

from dicomledger.ledger.checkpoint import parse_checkpoint
from dicomledger.ledger.entries import decode_entry
from dicomledger.ledger.note import cosignature_timestamp, parse_note, parse_verifier_key
from dicomledger.ledger.witness import check_equivocation, parse_evidence
from tests import dicomdata
from tests.conftest import GatewayProcess, consortium, dicomledger, free_port

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


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
            wait_until(
                lambda gw=gw: log_size(gw, a.origin) == 5, what=f"{gw.origin} to hold A's 5 entries"
            )
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
    assert_no_unhandled_errors(*gateways)
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
            wait_until(
                lambda origin=origin: log_size(c, origin) == 500,
                timeout=60,
                what=f"C to catch up on {origin}",
            )
        status = c.cli("peers").stdout
        assert "we hold 500 entries" in status and "not flagged" in status, status
    finally:
        for gw in gateways:
            gw.stop()
    assert_no_unhandled_errors(*gateways)
    for gw in gateways:
        result = gw.cli("verify")
        assert result.returncode == 0, result.stdout
        assert "500 entries" in result.stdout


def newest_checkpoint(gw: GatewayProcess, origin: str) -> tuple[int, bytes] | None:
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'ledger.db'}?mode=ro", uri=True)
    try:
        return con.execute(
            "SELECT c.size, c.note FROM checkpoints c JOIN origins o ON o.id = c.origin_id "
            "WHERE o.name = ? ORDER BY c.size DESC LIMIT 1",
            (origin,),
        ).fetchone()
    finally:
        con.close()


def test_idle_log_gets_heartbeat_cosignatures(tmp_path):
    a, b = consortium(tmp_path, 2)
    a.set("heartbeat_interval = 60.0", "heartbeat_interval = 1.0")
    for gw in (a, b):
        gw.start()
    try:
        assert a.storescu(*dicomdata.make_mr_series(tmp_path / "mr", 1)).returncode == 0

        def b_cosignature_time() -> int | None:
            held = newest_checkpoint(a, a.origin)
            if held is None or held[0] != 1:
                return None
            sigs = [s for s in parse_note(bytes(held[1])).signatures if s.name == b.origin]
            return cosignature_timestamp(sigs[0]) if sigs else None

        wait_until(
            lambda: b_cosignature_time() is not None, what="B's first cosignature of A's checkpoint"
        )
        first = b_cosignature_time()
        # the log stays at size 1; B's cosignature on it is renewed with a later timestamp
        wait_until(
            lambda: (b_cosignature_time() or 0) >= first + 2,
            timeout=20,
            what="a heartbeat cosignature",
        )
        assert newest_checkpoint(a, a.origin)[0] == 1
        note = parse_note(bytes(newest_checkpoint(a, a.origin)[1]))
        assert [s.name for s in note.signatures].count(b.origin) == 1  # replaced, not piled up
    finally:
        for gw in (a, b):
            gw.stop()


def log_entries(gw: GatewayProcess, origin: str) -> list[bytes]:
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'ledger.db'}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT e.data FROM entries e JOIN origins o ON o.id = e.origin_id "
            "WHERE o.name = ? ORDER BY e.idx",
            (origin,),
        ).fetchall()
    finally:
        con.close()
    return [bytes(r[0]) for r in rows]


def evidence_rows(gw: GatewayProcess) -> list[tuple[str, bytes]]:
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'ledger.db'}?mode=ro", uri=True)
    try:
        return con.execute("SELECT origin, data FROM evidence").fetchall()
    finally:
        con.close()


def assert_no_unhandled_errors(*gateways: GatewayProcess) -> None:
    for gw in gateways:
        text = gw.log()
        assert "gossip round failed" not in text and "Traceback" not in text, text[-3000:]


def test_a_gateway_that_rewrites_its_history_is_flagged_by_all(tmp_path):
    """A restores an old backup of its ledger while no peer is reachable, is started anyway
    (--accept-local-tip) and appends other entries: it has now signed two checkpoints of size 4
    with different roots. B, which witnessed the first, catches it; C, which cannot reach A (nor
    A it) and follows A's log only through B, learns it from B's gossiped evidence. Then the
    evidence is exported and checked offline, and B's administrator clears the flag."""
    a, b, c = consortium(tmp_path, 3)
    # A and C cannot reach each other (wrong addresses): C follows A only through B
    c.set(f'address = "127.0.0.1:{a.peer_port}"', f'address = "127.0.0.1:{free_port()}"')
    a.set(f'address = "127.0.0.1:{c.peer_port}"', f'address = "127.0.0.1:{free_port()}"')
    for gw in (a, b, c):
        gw.start()
    try:
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "one", 2, seed="one")).returncode == 0
        )
        wait_until(
            lambda: log_size(b, a.origin) == 2 and log_size(c, a.origin) == 2,
            what="A's first 2 entries",
        )
        a.stop()
        shutil.copytree(a.dir / "data", tmp_path / "a-backup")
        a.start()
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "two", 2, seed="two")).returncode == 0
        )
        wait_until(
            lambda: (newest_checkpoint(b, a.origin) or (0,))[0] == 4,
            what="B to witness A at size 4",
        )
        wait_until(lambda: log_size(c, a.origin) == 4, what="C to follow A through B")
        assert not evidence_rows(b) and not evidence_rows(c)

        a.stop()  # the rewrite: back to size 2 while cut off from B (C it never reaches), then
        b.stop()  # two different entries: its local-tip-accepted entry and one image
        shutil.rmtree(a.dir / "data")
        shutil.copytree(tmp_path / "a-backup", a.dir / "data")
        a.start(accept_local_tip=True)
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "forked", 1, seed="forked")).returncode
            == 0
        )
        wait_until(
            lambda: (newest_checkpoint(a, a.origin) or (0,))[0] == 4,
            what="A to sign its other size 4",
        )
        b.start()

        for gw in (b, c):
            wait_until(
                lambda gw=gw: bool(evidence_rows(gw)),
                timeout=20,
                what=f"{gw.origin} to hold evidence",
            )
            peers = gw.cli("peers").stdout
            line = next(ln for ln in peers.splitlines() if ln.startswith(a.origin))
            assert "FLAGGED: equivocation evidence held" in line, peers
            assert "EQUIVOCATION" in gw.log()
            assert {origin for origin, _ in evidence_rows(gw)} == {a.origin}
        # the evidence is two checkpoints signed by A: same size, different roots
        evidence = parse_evidence(evidence_rows(b)[0][1])
        _, a_key = parse_verifier_key(a.vkey)
        proven = check_equivocation(
            evidence.note_a, evidence.note_b, evidence.consistency_proof or None, a_key
        )
        assert proven is not None and proven.origin == a.origin
        sizes = {
            parse_checkpoint(parse_note(n).text).size for n in (evidence.note_a, evidence.note_b)
        }
        assert sizes == {4} and evidence.note_a != evidence.note_b
        # C never talked to A: it must have been told by B, and checked the evidence itself
        assert f'reported_by": "{b.origin}"' in c.log()

        # A flagged origin's new entries are no longer replicated
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "more", 3, seed="more")).returncode == 0
        )
        time.sleep(3)
        assert log_size(b, a.origin) == 4 and log_size(c, a.origin) == 4
        assert "you are flagged for equivocation" in b.log()  # and no longer cosigned

        # the evidence, written out by C (which never talked to A), checks offline with A's key
        exported = tmp_path / "a.evidence"
        out = c.cli("peers", "--evidence", a.origin, "-o", str(exported))
        assert out.returncode == 0, out.stderr
        assert parse_evidence(exported.read_bytes()).origin == a.origin
        trust_a = tmp_path / "trust-a.txt"
        trust_a.write_text(a.vkey + "\n")
        checked = dicomledger("check-evidence", str(exported), "--trust", str(trust_a))
        assert checked.returncode == 0 and checked.stdout.startswith(
            f"VALID: {a.origin} signed two"
        ), checked.stdout
        one_sided = (
            tmp_path / "one-sided.evidence"
        )  # both lines the same checkpoint: proves nothing
        text = exported.read_text().splitlines(keepends=True)
        one_sided.write_text(text[0] + text[1] + text[2] + "b " + text[2][2:] + "".join(text[4:]))
        refuted = dicomledger("check-evidence", str(one_sided), "--trust", str(trust_a))
        assert refuted.returncode == 1 and refuted.stdout.startswith("INVALID"), refuted.stdout
        trust_b = tmp_path / "trust-b.txt"
        trust_b.write_text(b.vkey + "\n")
        unkeyed = dicomledger("check-evidence", str(exported), "--trust", str(trust_b))
        assert unkeyed.returncode == 1 and "no key for" in unkeyed.stdout, unkeyed.stdout

        # the consortium deals with A (it stops); B's administrator clears the flag: an entry
        # in B's log says who and why; C, still holding the evidence, does not re-flag A at B
        a.stop()
        assert b.cli("peers", "--clear-flag", a.origin).returncode == 2  # no --reason
        not_flagged = b.cli("peers", "--clear-flag", c.origin, "--reason", "mistaken")
        assert not_flagged.returncode == 1 and "not flagged here" in not_flagged.stderr, (
            not_flagged.stderr
        )
        cleared = b.cli(
            "peers", "--clear-flag", a.origin, "--reason", "A restored a backup; re-keyed"
        )
        assert cleared.returncode == 0, cleared.stderr
        b_entries = [decode_entry(e) for e in log_entries(b, b.origin)]
        (entry,) = [e for e in b_entries if e.kind == "flag-cleared"]
        assert (
            entry.payload
            == {
                "origin": a.origin,
                "reason": "A restored a backup; re-keyed",
                "by": entry.payload["by"],
                "evidence": sorted(
                    hashlib.sha256(data).hexdigest() for _, data in evidence_rows(b)
                ),
            }
            and entry.payload["by"]
        )
        assert f"entry {entry.index}" in cleared.stdout
        time.sleep(2)  # ten gossip rounds with C, which serves the same evidence
        line = next(ln for ln in b.cli("peers").stdout.splitlines() if ln.startswith(a.origin))
        assert "not flagged" in line and "flag cleared at" in line, line
        assert "FLAGGED" in next(
            ln for ln in c.cli("peers").stdout.splitlines() if ln.startswith(a.origin)
        )
        wait_until(
            lambda: log_size(c, b.origin) == len(b_entries), what="C to hold B's flag-cleared entry"
        )
        assert b.cli("peers", "--evidence", a.origin, "-o", str(tmp_path / "again")).returncode == 0
        assert (tmp_path / "again").read_bytes() in {
            data for _, data in evidence_rows(b)
        }  # kept, for auditors
    finally:
        for gw in (a, b, c):
            gw.stop()
    assert_no_unhandled_errors(a, b, c)
    for gw in (b, c):
        assert gw.cli("verify").returncode == 0
    stopped = b.cli("peers", "--clear-flag", a.origin, "--reason", "again")
    assert stopped.returncode == 2 and "not running" in stopped.stderr
