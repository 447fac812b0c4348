import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dicomledger.ledger import merkle
from dicomledger.ledger.checkpoint import parse_checkpoint
from dicomledger.ledger.entries import decode_entry
from dicomledger.ledger.identity import Identity
from dicomledger.ledger.log import LedgerStore, LogWriter
from dicomledger.ledger.note import parse_note, verify_note_signature
from dicomledger.ledger.verify import verify_database

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

ORIGIN = "a.example/dicomledger"


async def open_log(path: Path, key=None):
    identity = Identity(ORIGIN, key or Ed25519PrivateKey.generate())
    store = await LedgerStore.open(path)
    writer = LogWriter(store, identity)
    await writer.start()
    return identity, store, writer


async def test_thousand_concurrent_appends_lose_nothing(tmp_path):
    identity, store, writer = await open_log(tmp_path / "l.db")
    results = await asyncio.gather(*(writer.append("forwarded", {"n": i}) for i in range(1000)))
    assert sorted(r.index for r in results) == list(range(1000))
    assert await store.size(ORIGIN) == 1000
    payloads = sorted(decode_entry(d).payload["n"] for d in await store.entries(ORIGIN, 0, 1000))
    assert payloads == list(range(1000))
    await writer.stop()
    await store.close()
    report = verify_database(tmp_path / "l.db", {ORIGIN: identity.public_key})
    assert report.ok, report.problem
    assert report.origins[0].size == 1000


async def test_group_commit_batches_concurrent_appends(tmp_path):
    _, store, writer = await open_log(tmp_path / "l.db")
    commits = 0
    original = writer._commit

    def counting(batch):
        nonlocal commits
        commits += 1
        return original(batch)

    writer._commit = counting
    await asyncio.gather(*(writer.append("config", {"n": i}) for i in range(500)))
    assert commits < 50  # appends that wait together share a transaction
    await writer.stop()
    await store.close()


class RecordingCompanion:
    """A companion that adds the ticket to each payload and remembers each batch's tickets."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.after_calls: list[list[tuple[int, int]]] = []

    def before(self, tickets):
        self.batches.append(list(tickets))
        return [{"ticket": t} for t in tickets]

    def after(self, appended):
        self.after_calls.append([(t, a.index) for t, a in appended])


async def test_threads_commit_their_appends_together_as_one_batch(tmp_path):
    """append_guarded_blocking: appends from threads queued while a batch is committed go
    into the next batch together, committed by one of those threads; every appender gets
    its own entry, and the log verifies."""
    identity = Identity(ORIGIN, Ed25519PrivateKey.generate())
    store = await LedgerStore.open(tmp_path / "l.db")
    companion = RecordingCompanion()
    writer = LogWriter(store, identity, companion=companion)
    await writer.start()
    await writer.append("config", {"first": True})  # from the loop, on the writer's own thread
    results: dict[int, object] = {}

    def append(ticket: int) -> None:
        results[ticket] = writer.append_guarded_blocking("forwarded", {"n": ticket}, ticket)

    with writer._commit_lock:  # as if a batch were being committed: the threads queue up
        threads = [threading.Thread(target=append, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(writer._from_threads) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(writer._from_threads) == 6
    for t in threads:
        t.join(30)
    assert len(companion.batches) == 1 and sorted(companion.batches[0]) == list(range(6))
    by_ticket = {t: a for t, a in companion.after_calls[0]}
    assert sorted(results) == list(range(6))
    for ticket, appended in results.items():
        assert appended.index == by_ticket[ticket]
        assert decode_entry(appended.data).payload == {"n": ticket, "ticket": ticket}
    assert sorted(a.index for a in results.values()) == list(range(1, 7))
    await writer.append("config", {"last": True})  # the loop's writer goes on after them
    await writer.stop()
    await store.close()
    report = verify_database(tmp_path / "l.db", {ORIGIN: identity.public_key})
    assert report.ok, report.problem
    assert report.origins[0].size == 8


async def test_proofs_from_storage_match_in_memory_tree(tmp_path):
    identity, store, writer = await open_log(tmp_path / "l.db")
    for i in range(37):
        await writer.append("retrieved", {"i": i})
    leaves = [merkle.leaf_hash(d) for d in await store.entries(ORIGIN, 0, 37)]
    for size in (1, 2, 5, 16, 17, 37):
        root = await store.root(ORIGIN, size)
        assert root == merkle.root_of_leaf_hashes(leaves[:size])
        for index in range(size):
            proof = await store.inclusion_proof(ORIGIN, index, size)
            merkle.verify_inclusion(leaves[index], index, size, proof, root)
        for old in range(1, size):
            proof = await store.consistency_proof(ORIGIN, old, size)
            merkle.verify_consistency(old, size, await store.root(ORIGIN, old), root, proof)
    size, note_bytes = await writer.sign_checkpoint()
    note = parse_note(note_bytes)
    assert verify_note_signature(note, ORIGIN, identity.public_key)
    cp = parse_checkpoint(note.text)
    assert (cp.origin, cp.size, cp.root_hash) == (ORIGIN, 37, merkle.root_of_leaf_hashes(leaves))
    await writer.stop()
    await store.close()


async def test_writer_resumes_after_reopen(tmp_path):
    key = Ed25519PrivateKey.generate()
    identity, store, writer = await open_log(tmp_path / "l.db", key)
    for i in range(11):
        await writer.append("config", {"i": i})
    await writer.stop()
    await store.close()
    identity, store, writer = await open_log(tmp_path / "l.db", key)
    assert writer.size == 11
    for i in range(6):
        await writer.append("config", {"i": i})
    await writer.stop()
    await store.close()
    assert verify_database(tmp_path / "l.db", {ORIGIN: key.public_key()}).ok


async def test_bad_payload_fails_only_its_appender(tmp_path):
    _, store, writer = await open_log(tmp_path / "l.db")
    good, bad = await asyncio.gather(
        writer.append("config", {"ok": 1}),
        writer.append("config", {"bad": 1.5}),
        return_exceptions=True,
    )
    assert good.index == 0 and isinstance(bad, ValueError)
    assert (await writer.append("config", {"ok": 2})).index == 1
    await writer.stop()
    await store.close()


async def test_commit_failure_fails_appenders_and_recovers(tmp_path):
    path = tmp_path / "l.db"
    identity, store, writer = await open_log(path)
    await writer.append("config", {"i": 0})
    # Another connection holds the write lock past the busy timeout: the commit fails.
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    writer._db.execute("PRAGMA busy_timeout=100")
    with pytest.raises(Exception, match="ledger write failed"):
        await writer.append("config", {"i": 1})
    blocker.rollback()
    blocker.close()
    assert (await writer.append("config", {"i": 1})).index == 1
    await writer.stop()
    await store.close()
    assert verify_database(path, {ORIGIN: identity.public_key}).ok


APPENDER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from dicomledger.ledger.identity import Identity
    from dicomledger.ledger.log import LedgerStore, LogWriter

    async def main():
        key = Ed25519PrivateKey.from_private_bytes(bytes(32))
        store = await LedgerStore.open(Path(sys.argv[1]))
        writer = LogWriter(store, Identity("a.example/dicomledger", key))
        await writer.start()
        n = 0
        async def one(i):
            r = await writer.append("config", {"i": i})
            print(r.index, i, flush=True)   # printed only once the append is durable
        while True:
            await asyncio.gather(*(one(n + k) for k in range(20)))
            n += 20
            if n % 200 == 0:
                await writer.sign_checkpoint()

    asyncio.run(main())
    """
)


def test_sigkill_during_appends_keeps_every_acknowledged_entry(tmp_path):
    db = tmp_path / "l.db"
    out = tmp_path / "acks.txt"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", APPENDER, str(db)], stdout=f)
        deadline = time.time() + 30
        while time.time() < deadline and out.stat().st_size < 20000:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    acked = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:  # a line cut by the kill is not an acknowledgement
            acked[int(parts[0])] = int(parts[1])
    assert len(acked) > 500
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    report = verify_database(db, {ORIGIN: key.public_key()})
    assert report.ok, report.problem
    con = sqlite3.connect(db)
    rows = dict(con.execute("SELECT idx, data FROM entries"))
    con.close()
    for index, i in acked.items():
        assert decode_entry(bytes(rows[index])).payload == {"i": i}


async def test_reads_and_state_writes_interleave_with_commits(tmp_path):
    """Regression: a SELECT left open across an await pinned a stale read snapshot, so a
    state write on the shared connection failed with "database is locked" after the writer
    thread committed, and the checkpoint loop died with it."""
    from dicomledger.ledger.consortium import ConsortiumState, PeerStatus

    identity, store, writer = await open_log(tmp_path / "l.db")
    state = ConsortiumState(store)
    await writer.append("config", {"n": -1})
    stop = asyncio.Event()

    async def appender():
        n = 0
        while not stop.is_set():
            await writer.append("config", {"n": n})
            n += 1

    async def reader_writer(i: int):
        for k in range(300):
            await store.latest_checkpoint(ORIGIN)
            await store.size(ORIGIN)
            await state.set_peer_status(PeerStatus(f"p{i}", True, str(k), k, None))
            await writer.sign_checkpoint()

    task = asyncio.create_task(appender())
    try:
        await asyncio.gather(*(reader_writer(i) for i in range(4)))
    finally:
        stop.set()
        await task
    assert (await state.peer_status("p3")).their_size == 299
    size, _ = await store.latest_checkpoint(ORIGIN)
    assert size > 1
    await writer.stop()
    await store.close()
