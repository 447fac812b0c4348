"""Never equivocate after a restore: a gateway gets back the entries of its own log that its
peers hold before it appends anything; without a peer to confirm its tip it starts only when
told to (recorded on the ledger); equivocation evidence is exported and checked offline, and
a flag is cleared by an entry saying who and why. Real gateway processes on loopback."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from dicomledger.ledger.entries import decode_entry
from dicomledger.ledger.tip import TipRecordError, flag_cleared_payload, local_tip_accepted_payload
from tests import dicomdata
from tests.conftest import ROOT, GatewayProcess, consortium, dcmtk, dicomledger

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


def query(gw: GatewayProcess, sql: str, params: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'ledger.db'}?mode=ro", uri=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def log_of(gw: GatewayProcess, origin: str) -> tuple[list[bytes], dict[int, bytes]]:
    """(entries, {size: checkpoint note}) of ``origin``'s log as ``gw`` holds it."""
    entries = query(
        gw,
        "SELECT e.data FROM entries e JOIN origins o ON o.id = e.origin_id "
        "WHERE o.name = ? ORDER BY e.idx",
        (origin,),
    )
    notes = query(
        gw,
        "SELECT c.size, c.note FROM checkpoints c JOIN origins o ON o.id = c.origin_id "
        "WHERE o.name = ?",
        (origin,),
    )
    return [bytes(r[0]) for r in entries], {size: bytes(note) for size, note in notes}


def newest_checkpoint_size(gw: GatewayProcess, origin: str) -> int:
    return max(log_of(gw, origin)[1], default=0)


def events(gw: GatewayProcess, name: str, offset: int = 0) -> list[dict]:
    found = []
    for line in gw.log_path.read_bytes()[offset:].decode(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            found.append(event)
    return found


def wait_until(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def assert_clean_logs(*gateways: GatewayProcess) -> None:
    for gw in gateways:
        text = gw.log()
        assert "Traceback" not in text and "gossip round failed" not in text, text[-3000:]


def test_a_gateway_restored_from_an_older_backup_fetches_its_lost_entries_back(tmp_path):
    """A's data is put back (`dicomledger restore`) from an online backup (`dicomledger backup`
    while A serves) taken 50 entries earlier, while B and C run: before it appends anything A
    fetches those 50 entries back from its peers (checked against its own signed checkpoints)
    and continues after the true tip; nobody is flagged."""
    gateways = consortium(tmp_path, 3)
    a, b, c = gateways
    for gw in gateways:
        gw.start()
    try:
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "first", 5, seed="first")).returncode
            == 0
        )
        wait_until(
            lambda: all(newest_checkpoint_size(gw, a.origin) == 5 for gw in (b, c)),
            what="B and C to hold A's first 5 entries",
        )
        backup = a.cli(
            "backup", "-o", str(tmp_path / "a-backup")
        )  # online, 50 entries before the end
        assert backup.returncode == 0, backup.stderr
        lost = dicomdata.make_mr_series(tmp_path / "lost", 50, seed="lost")
        assert a.storescu(*lost).returncode == 0
        wait_until(
            lambda: all(newest_checkpoint_size(gw, a.origin) == 55 for gw in (b, c)),
            what="B and C to hold A's 55 entries with A's checkpoint",
        )
        true_log = log_of(b, a.origin)[0]
        a.stop()
        restored = a.cli("restore", "--from", str(tmp_path / "a-backup"), "--replace")
        assert restored.returncode == 0, restored.stderr
        assert len(log_of(a, a.origin)[0]) == 5
        offset = a.log_path.stat().st_size

        a.start()
        # before its DICOM listener opened, A held its whole log again
        started = events(a, "gateway started", offset)
        assert started and started[0]["ledger_size"] == 55, started
        fetched = events(a, "fetched this gateway's own entries back from its peers", offset)
        assert [(e["local_size"], e["size"], e["fetched"]) for e in fetched] == [(5, 55, 50)], (
            fetched
        )
        assert log_of(a, a.origin)[0] == true_log
        # its index had lost the 50 instances and their files: it says so, once
        missing = events(
            a, "anchored instances with neither an index row nor a stored file: not rebuilt", offset
        )
        assert [e["count"] for e in missing] == [50], missing

        # A continues after the true tip, and its peers follow
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "after", 2, seed="after")).returncode
            == 0
        )
        entries = log_of(a, a.origin)[0]
        assert len(entries) == 57 and entries[:55] == true_log
        assert decode_entry(entries[55]).kind == "image-anchored"
        assert decode_entry(entries[55]).prev == hashlib.sha256(b"\x00" + true_log[54]).digest()
        for gw in (b, c):
            wait_until(
                lambda gw=gw: log_of(gw, a.origin)[0] == entries,
                what=f"{gw.origin} to hold A's 57 entries",
            )
            wait_until(
                lambda gw=gw: newest_checkpoint_size(gw, a.origin) == 57,
                what=f"{gw.origin} to hold A at 57",
            )
        for gw in gateways:
            peers = gw.cli("peers").stdout
            assert "FLAGGED" not in peers, peers
        assert "local-tip-accepted" not in b"".join(entries).decode()
    finally:
        for gw in gateways:
            gw.stop()
    assert_clean_logs(*gateways)
    for gw in gateways:
        assert not query(gw, "SELECT origin FROM evidence"), gw.origin
        assert "EQUIVOCATION" not in gw.log()
        result = gw.cli("verify")
        assert result.returncode == 0, result.stdout
        assert f"{a.origin}: 57 entries" in result.stdout, result.stdout


def test_with_no_peer_reachable_a_gateway_starts_only_with_accept_local_tip(tmp_path):
    a, b = consortium(tmp_path, 2)
    for gw in (a, b):
        gw.start()
    try:
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "one", 3, seed="one")).returncode == 0
        )
        wait_until(lambda: newest_checkpoint_size(b, a.origin) == 3, what="B to hold A's 3 entries")
    finally:
        for gw in (a, b):
            gw.stop()
    before = (
        query(
            a, "SELECT o.name, e.idx, e.data FROM entries e JOIN origins o ON o.id = e.origin_id"
        ),
        query(a, "SELECT origin_id, size, note FROM checkpoints"),
    )

    # B is down: A waits for it (its DICOM listener closed) and then refuses to start
    a.set("startup_wait = 60.0", "startup_wait = 3")
    offset = a.log_path.stat().st_size
    with open(a.log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicomledger.cli", "serve", "--config", str(a.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        wait_until(
            lambda: events(
                a,
                "waiting for a peer to confirm this gateway's log before it appends anything",
                offset,
            ),
            what="A to wait for a peer",
        )
        echo = dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", a.ae_title, "127.0.0.1", str(a.port))
        assert echo.returncode != 0, "A's DICOM listener is open before its log is confirmed"
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    refused = events(a, "gateway cannot start", offset)
    assert len(refused) == 1, refused
    assert (
        "no peer answered within 3 s" in refused[0]["reason"]
        and "--accept-local-tip" in refused[0]["reason"]
    )
    # nothing appended, no checkpoint signed (not even of the tip it already had)
    after = (
        query(
            a, "SELECT o.name, e.idx, e.data FROM entries e JOIN origins o ON o.id = e.origin_id"
        ),
        query(a, "SELECT origin_id, size, note FROM checkpoints"),
    )
    assert after == before

    # told to, it starts on its local tip, and says so on its ledger
    offset = a.log_path.stat().st_size
    a.start(accept_local_tip=True)
    try:
        entries = log_of(a, a.origin)[0]
        assert len(entries) == 4
        accepted = decode_entry(entries[3])
        assert accepted.kind == "local-tip-accepted"
        assert accepted.payload["unconfirmed"] == [b.origin]
        assert "no peer answered" in accepted.payload["problem"]
        assert accepted.payload["by"]
        assert events(a, "recorded on the ledger: started on an unconfirmed local tip", offset)
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "two", 1, seed="two")).returncode == 0
        )
        # its tip was the true one: B follows it, nobody is flagged
        b.start()
        wait_until(
            lambda: (
                log_of(b, a.origin)[0] == log_of(a, a.origin)[0]
                and len(log_of(b, a.origin)[0]) == 5
            ),
            what="B to replicate A's 5 entries",
        )
        assert "not flagged" in b.cli("peers").stdout
    finally:
        for gw in (a, b):
            gw.stop()
    assert_clean_logs(a, b)
    for gw in (a, b):
        assert gw.cli("verify").returncode == 0
        assert not query(gw, "SELECT origin FROM evidence")


def test_serve_stops_cleanly_while_waiting_for_a_peer(tmp_path):
    a, _ = consortium(tmp_path, 2)
    with open(a.log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicomledger.cli", "serve", "--config", str(a.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        wait_until(
            lambda: events(
                a, "waiting for a peer to confirm this gateway's log before it appends anything"
            ),
            what="A to wait for a peer",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert events(a, "gateway not started") and events(a, "gateway stopped")
    assert not events(a, "gateway cannot start")
    assert dicomledger("verify", "--config", str(a.config)).returncode == 0
    assert not log_of(a, a.origin)[0]


def test_operator_records_carry_checked_text_only():
    payload = flag_cleared_payload(
        "b.example/dicomledger",
        [b"\x02" * 32, b"\x01" * 32, b"\x02" * 32],
        "J. Admin",
        "re-keyed after a restore",
    )
    assert payload == {
        "by": "J. Admin",
        "evidence": ["01" * 32, "02" * 32],
        "origin": "b.example/dicomledger",
        "reason": "re-keyed after a restore",
    }
    for by, reason in (
        ("J. Admin", ""),
        ("", "why"),
        ("J. Admin", "two\nlines"),
        ("J. Admin", "x" * 257),
    ):
        with pytest.raises(TipRecordError):
            flag_cleared_payload("b.example/dicomledger", [b"\x01" * 32], by, reason)
    with pytest.raises(TipRecordError, match="no evidence"):
        flag_cleared_payload("b.example/dicomledger", [], "J. Admin", "why")
    accepted = local_tip_accepted_payload(
        "root", "no peer answered within 60 s" * 20, ["c", "b", "c"]
    )
    assert accepted["unconfirmed"] == ["b", "c"] and len(accepted["problem"]) == 256


def serve_until_it_stops(
    gw: GatewayProcess, *extra: str, timeout: float = 60
) -> tuple[int, list[dict]]:
    """`serve` expected to refuse to start: (exit code, its JSON log lines)."""
    offset = gw.log_path.stat().st_size
    with open(gw.log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicomledger.cli", "serve", "--config", str(gw.config), *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
    text = gw.log_path.read_bytes()[offset:].decode()
    assert "Traceback" not in text, text
    return code, [json.loads(line) for line in text.splitlines() if line.strip()]


def own_log_rows(gw: GatewayProcess) -> tuple[list[tuple], list[tuple]]:
    """Every entry and checkpoint of ``gw``'s own log as its database holds them."""
    origin = (gw.origin,)
    return (
        query(
            gw,
            "SELECT e.idx, e.data FROM entries e JOIN origins o ON o.id = e.origin_id WHERE o.name = ? "
            "ORDER BY e.idx",
            origin,
        ),
        query(
            gw,
            "SELECT c.size, c.note FROM checkpoints c JOIN origins o ON o.id = c.origin_id "
            "WHERE o.name = ? ORDER BY c.size",
            origin,
        ),
    )


def change_entries(gw: GatewayProcess, origin: str, start: int, forge: bool) -> None:
    """At ``gw`` (stopped), the entries of ``origin`` from ``start`` on: forged (one character
    of their signature changed) or lost (deleted); the checkpoints it holds stay."""
    con = sqlite3.connect(gw.dir / "data" / "ledger.db", isolation_level=None)
    try:
        (oid,) = con.execute("SELECT id FROM origins WHERE name = ?", (origin,)).fetchone()
        if forge:
            for idx, data in con.execute(
                "SELECT idx, data FROM entries WHERE origin_id = ? AND idx >= ?", (oid, start)
            ).fetchall():
                at = bytes(data).index(b'"sig":"') + len(b'"sig":"')
                changed = (
                    bytes(data[:at])
                    + (b"B" if data[at : at + 1] == b"A" else b"A")
                    + bytes(data[at + 1 :])
                )
                con.execute(
                    "UPDATE entries SET data = ? WHERE origin_id = ? AND idx = ?",
                    (changed, oid, idx),
                )
        else:
            con.execute("DELETE FROM entries WHERE origin_id = ? AND idx >= ?", (oid, start))
    finally:
        con.close()


def test_restored_gateway_refuses_to_start_on_forged_or_lost_entries_of_its_own_log(tmp_path):
    """A restored from a copy 4 entries old; B serves forged copies of those 4 entries (bad
    signature) and C lost them but still shows A's signed checkpoint of size 7: A believes
    none of B's, cannot get them back anywhere, and refuses to start (exit 1, one line)."""
    gateways = consortium(tmp_path, 3)
    a, b, c = gateways
    for gw in gateways:
        gw.start()
    try:
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "first", 3, seed="r-first")).returncode
            == 0
        )
        wait_until(
            lambda: all(newest_checkpoint_size(gw, a.origin) == 3 for gw in (b, c)),
            what="A's 3 entries at B, C",
        )
        a.stop()
        shutil.copytree(a.dir / "data", tmp_path / "a-copy")
        a.start()
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "lost", 4, seed="r-lost")).returncode
            == 0
        )
        wait_until(
            lambda: all(newest_checkpoint_size(gw, a.origin) == 7 for gw in (b, c)),
            what="A's 7 entries at B, C",
        )
    finally:
        for gw in gateways:
            gw.stop()
    true_log = log_of(b, a.origin)[0]
    shutil.rmtree(a.dir / "data")
    shutil.copytree(tmp_path / "a-copy", a.dir / "data")  # the restore
    before = own_log_rows(a)
    change_entries(b, a.origin, 3, forge=True)
    change_entries(c, a.origin, 3, forge=False)
    for gw in (b, c):
        gw.start()
    try:
        code, lines = serve_until_it_stops(a)
        assert code == 1, lines
        refused = [line for line in lines if line["event"] == "gateway cannot start"]
        assert len(refused) == 1 and refused[0]["level"] == "error", lines
        reason = refused[0]["reason"]
        assert (
            "a checkpoint of this gateway's log at size 7" in reason
            and "only 3 of its entries could be had" in reason
        )
        failed = [
            line
            for line in lines
            if line["event"] == "could not fetch this gateway's own entries back from a peer"
        ]
        assert {line["source"] for line in failed} == {b.origin, c.origin}, failed
        assert "signature" in next(
            line["error"] for line in failed if line["source"] == b.origin
        ), failed
        assert own_log_rows(a) == before  # nothing forged stored, nothing appended or signed
        assert not any(line["event"] == "gateway started" for line in lines)
        # the true entries are still A's: put back at C, A gets them and starts
        c.stop()
        con = sqlite3.connect(c.dir / "data" / "ledger.db", isolation_level=None)
        try:
            (oid,) = con.execute("SELECT id FROM origins WHERE name = ?", (a.origin,)).fetchone()
            con.executemany(
                "INSERT INTO entries (origin_id, idx, data) VALUES (?, ?, ?)",
                [(oid, i, true_log[i]) for i in range(3, 7)],
            )
        finally:
            con.close()
        c.start()
        a.start()
        assert log_of(a, a.origin)[0] == true_log
    finally:
        for gw in gateways:
            if gw.proc is not None and gw.proc.poll() is None:
                gw.stop()
    assert a.cli("verify").returncode == 0


def test_restored_gateway_refuses_to_start_when_a_peer_holds_another_history_of_its_log(tmp_path):
    """A restored from a copy 3 entries old started alone with --accept-local-tip and signed a
    second history; B holds the first. At A's next start B's checkpoint contradicts A's
    local log: A refuses to start (exit 1, one line saying it signed two histories)."""
    a, b = consortium(tmp_path, 2)
    a.set("startup_wait = 60.0", "startup_wait = 2")
    for gw in (b, a):  # B first: A waits only 2 s for a peer, less than B may take to start
        gw.start()
    try:
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "first", 2, seed="h-first")).returncode
            == 0
        )
        wait_until(lambda: newest_checkpoint_size(b, a.origin) == 2, what="A's 2 entries at B")
        a.stop()
        shutil.copytree(a.dir / "data", tmp_path / "a-copy")
        a.start()
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "lost", 3, seed="h-lost")).returncode
            == 0
        )
        wait_until(lambda: newest_checkpoint_size(b, a.origin) == 5, what="A's 5 entries at B")
    finally:
        for gw in (a, b):
            gw.stop()
    shutil.rmtree(a.dir / "data")
    shutil.copytree(tmp_path / "a-copy", a.dir / "data")
    a.start(accept_local_tip=True)  # B is down: the operator forces it, and A forks its own log
    try:
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "fork", 3, seed="h-fork")).returncode
            == 0
        )
        wait_until(
            lambda: newest_checkpoint_size(a, a.origin) == 6, what="A to sign its second history"
        )
    finally:
        a.stop()
    before = own_log_rows(a)
    b.start(accept_local_tip=True)
    try:
        code, lines = serve_until_it_stops(a)
    finally:
        b.stop()
    assert code == 1, lines
    refused = [line for line in lines if line["event"] == "gateway cannot start"]
    assert len(refused) == 1 and refused[0]["level"] == "error", lines
    reason = refused[0]["reason"]
    assert f"{b.origin} holds a checkpoint of this gateway's log at size 5" in reason, reason
    assert (
        "of another history than the local log's" in reason and "signed two histories" in reason
    ), reason
    assert own_log_rows(a) == before
    assert not any(line["event"] == "gateway started" for line in lines)
