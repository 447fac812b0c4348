"""Replica logs: another origin's entries are stored only when they verify against its signed checkpoint."""

import sqlite3

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dicomledger.ledger.identity import Identity
from dicomledger.ledger.log import (
    LedgerStore,
    LogWriter,
    ReplicaError,
    ReplicaWriter,
    sign_checkpoint,
)
from dicomledger.ledger.verify import verify_database

A = "a.example/dicomledger"
KEY_A = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


async def origin_log(tmp_path, n=50):
    store = await LedgerStore.open(tmp_path / "a.db")
    writer = LogWriter(store, Identity(A, KEY_A))
    await writer.start()
    for i in range(n):
        await writer.append("image-anchored", {"sha256": f"{i:064x}"})
    return store, writer


async def replica(tmp_path, keys_of=None):
    store = await LedgerStore.open(tmp_path / "b.db")
    await store.ensure_origin(A, KEY_A.public_key())
    writer = ReplicaWriter(store, keys_of)
    await writer.start()
    return store, writer


async def checkpoint_at(a_store, size):
    return await sign_checkpoint(a_store, Identity(A, KEY_A), size)


async def test_replicates_in_chunks_and_verifies(tmp_path):
    a_store, a_writer = await origin_log(tmp_path)
    b_store, rep = await replica(tmp_path, keys_of=lambda e: [f"sha256:{e.payload['sha256']}"])
    for start, end in ((0, 1), (1, 20), (20, 50)):
        size = await rep.append_verified(
            A, await a_store.entries(A, start, end), await checkpoint_at(a_store, end)
        )
        assert size == end
    assert await b_store.root(A, 50) == await a_store.root(A, 50)
    assert await b_store.find(f"sha256:{7:064x}") == [(A, 7)]
    # a checkpoint for the size we already hold, with no entries, is accepted and stored
    assert await rep.append_verified(A, [], await checkpoint_at(a_store, 50)) == 50
    await rep.stop()
    await b_store.close()
    await a_writer.stop()
    await a_store.close()
    report = verify_database(tmp_path / "b.db", {A: KEY_A.public_key()})
    assert report.ok, report.problem
    assert report.origins[0].size == 50 and report.origins[0].checkpoints == 3  # sizes 1, 20 and 50


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.mark.parametrize(
    "case, message",
    [
        ("tampered entry", "entry 3"),
        ("gap", "entry 2: entry is out of sequence"),
        ("short of checkpoint", "do not reach its checkpoint size"),
        ("foreign key checkpoint", "not signed by its key"),
        ("other origin checkpoint", "is for"),
        ("wrong root", "do not match its signed checkpoint's root"),
        ("garbage checkpoint", "malformed"),
        ("unknown origin", "not a known log"),
    ],
)
async def test_refuses_bad_input_and_stores_nothing(tmp_path, case, message):
    a_store, a_writer = await origin_log(tmp_path, 10)
    b_store, rep = await replica(tmp_path)
    entries = await a_store.entries(A, 0, 10)
    note = await checkpoint_at(a_store, 10)
    origin = A
    if case == "tampered entry":
        entries[3] = entries[3].replace(b'"sha256":"0', b'"sha256":"1', 1)
    elif case == "gap":
        entries = entries[:2] + entries[3:] + [entries[2]]
    elif case == "short of checkpoint":
        entries = entries[:9]
    elif case == "foreign key checkpoint":
        other = Identity(A, Ed25519PrivateKey.generate())
        note = await sign_checkpoint(a_store, other, 10)
    elif case == "other origin checkpoint":
        note = note.replace(A.encode(), b"z.example/dicomledger", 1)
    elif case == "wrong root":
        # a validly signed checkpoint over different entries of the same origin (a fork)
        fork = await LedgerStore.open(tmp_path / "fork.db")
        fork_writer = LogWriter(fork, Identity(A, KEY_A))
        await fork_writer.start()
        for i in range(10):
            await fork_writer.append("image-anchored", {"sha256": f"{i + 1:064x}"})
        note = await sign_checkpoint(fork, Identity(A, KEY_A), 10)
        await fork_writer.stop()
        await fork.close()
    elif case == "garbage checkpoint":
        note = b"\xff\x00 not a note"
    elif case == "unknown origin":
        origin = "nobody.example/dicomledger"
    with pytest.raises(ReplicaError, match=message):
        await rep.append_verified(origin, entries, note)
    await rep.stop()
    await b_store.close()
    con = sqlite3.connect(tmp_path / "b.db")
    assert con.execute("SELECT COUNT(*) FROM entries").fetchone() == (0,)
    assert con.execute("SELECT COUNT(*) FROM nodes").fetchone() == (0,)
    assert con.execute("SELECT COUNT(*) FROM checkpoints").fetchone() == (0,)
    con.close()
    await a_writer.stop()
    await a_store.close()


async def test_replaying_held_entries_is_refused_and_harmless(tmp_path):
    a_store, a_writer = await origin_log(tmp_path, 10)
    b_store, rep = await replica(tmp_path)
    entries = await a_store.entries(A, 0, 10)
    note = await checkpoint_at(a_store, 10)
    assert await rep.append_verified(A, entries, note) == 10
    with pytest.raises(ReplicaError, match="do not reach"):
        await rep.append_verified(A, entries, note)
    assert await b_store.size(A) == 10
    await rep.stop()
    await b_store.close()
    await a_writer.stop()
    await a_store.close()
    assert verify_database(tmp_path / "b.db").ok


async def test_stores_a_prefix_shown_consistent_with_a_larger_checkpoint(tmp_path):
    """A chunk that stops short of the checkpoint is stored (without a checkpoint) when a
    consistency proof shows it a prefix of the checkpoint's tree; the last chunk brings the
    checkpoint."""
    a_store, a_writer = await origin_log(tmp_path)
    b_store, rep = await replica(tmp_path)
    note = await checkpoint_at(a_store, 50)
    for start, end in ((0, 16), (16, 35)):  # a power of two, and not
        proof = await a_store.consistency_proof(A, end, 50)
        assert (
            await rep.append_verified(A, await a_store.entries(A, start, end), note, proof) == end
        )
        assert await b_store.latest_checkpoint(A) is None
        assert await b_store.root(A, end) == await a_store.root(A, end)
    assert await rep.append_verified(A, await a_store.entries(A, 35, 50), note) == 50
    assert await b_store.latest_checkpoint(A) == (50, note)
    await rep.stop()
    await b_store.close()
    await a_writer.stop()
    await a_store.close()
    report = verify_database(tmp_path / "b.db", {A: KEY_A.public_key()})
    assert report.ok and report.origins[0].size == 50 and report.origins[0].checkpoints == 1


@pytest.mark.parametrize(
    "case, message",
    [
        ("no proof", "do not reach its checkpoint size"),
        ("proof for another size", "not shown to be a prefix"),
        ("flipped proof hash", "not shown to be a prefix"),
        ("proof of another history", "not shown to be a prefix"),
        ("entries past the checkpoint", "do not reach its checkpoint size"),
        ("no entries", "do not reach its checkpoint size"),
    ],
)
async def test_refuses_a_prefix_that_is_not_shown_consistent(tmp_path, case, message):
    a_store, a_writer = await origin_log(tmp_path)
    b_store, rep = await replica(tmp_path)
    note = await checkpoint_at(a_store, 30)
    entries = await a_store.entries(A, 0, 20)
    proof: list[bytes] | None = await a_store.consistency_proof(A, 20, 30)
    if case == "no proof":
        proof = None
    elif case == "proof for another size":
        proof = await a_store.consistency_proof(A, 20, 40)
    elif case == "flipped proof hash":
        proof[0] = flip(proof[0], 5)
    elif case == "proof of another history":  # entries 0..19 of a fork, with the fork's proof
        fork = await LedgerStore.open(tmp_path / "fork.db")
        fork_writer = LogWriter(fork, Identity(A, KEY_A))
        await fork_writer.start()
        for i in range(30):
            await fork_writer.append("image-anchored", {"sha256": f"{i + 7:064x}"})
        entries, proof = await fork.entries(A, 0, 20), await fork.consistency_proof(A, 20, 30)
        await fork_writer.stop()
        await fork.close()
    elif case == "entries past the checkpoint":
        entries = await a_store.entries(A, 0, 31)
    elif case == "no entries":
        entries = []
    with pytest.raises(ReplicaError, match=message):
        await rep.append_verified(A, entries, note, proof)
    assert await b_store.size(A) == 0
    await rep.stop()
    await b_store.close()
    await a_writer.stop()
    await a_store.close()
