"""Every stored byte that matters is covered: `verify` names the first bad place."""

import asyncio
import shutil
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dicomledger.ledger.identity import Identity
from dicomledger.ledger.log import LedgerStore, LogWriter
from dicomledger.ledger.verify import verify_database

ORIGIN = "a.example/dicomledger"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ledger") / "pristine.db"

    async def build():
        store = await LedgerStore.open(path)
        writer = LogWriter(store, Identity(ORIGIN, KEY))
        await writer.start()
        for i in range(40):
            await writer.append("image-anchored", {"sha256": f"{i:064x}"})
            if i in (9, 29):
                await writer.sign_checkpoint()
        await writer.stop()
        await store.close()

    asyncio.run(build())
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return path


def tampered(pristine: Path, tmp_path: Path, sql: str, *params, name: str = "t.db") -> Path:
    path = tmp_path / name
    shutil.copy(pristine, path)
    con = sqlite3.connect(path)
    con.execute(sql, params)
    con.commit()
    con.close()
    return path


def flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]


def entry(pristine: Path, idx: int) -> bytes:
    con = sqlite3.connect(pristine)
    (data,) = con.execute("SELECT data FROM entries WHERE idx = ?", (idx,)).fetchone()
    con.close()
    return bytes(data)


def test_pristine_verifies(pristine):
    report = verify_database(pristine, {ORIGIN: KEY.public_key()})
    assert report.ok, report.problem
    assert report.origins[0].size == 40 and report.origins[0].checkpoints == 2


def test_entry_body_change_names_the_entry(pristine, tmp_path):
    data = entry(pristine, 17).replace(b'"sha256":"0', b'"sha256":"1', 1)
    path = tampered(pristine, tmp_path, "UPDATE entries SET data = ? WHERE idx = 17", data)
    problem = verify_database(path).problem
    assert problem.where == "entry 17" and "signature" in problem.what


def test_signature_change_names_the_entry(pristine, tmp_path):
    data = entry(pristine, 3)
    at = data.index(b'"sig":"') + 10
    data = data[:at] + (b"B" if data[at : at + 1] != b"B" else b"C") + data[at + 1 :]
    path = tampered(pristine, tmp_path, "UPDATE entries SET data = ? WHERE idx = 3", data)
    assert verify_database(path).problem.where == "entry 3"


def test_leaf_hash_change_names_the_leaf(pristine, tmp_path):
    con = sqlite3.connect(pristine)
    (h,) = con.execute("SELECT hash FROM nodes WHERE level = 0 AND idx = 22").fetchone()
    con.close()
    path = tampered(
        pristine,
        tmp_path,
        "UPDATE nodes SET hash = ? WHERE level = 0 AND idx = 22",
        flip(bytes(h), 5),
    )
    problem = verify_database(path).problem
    assert problem.where == "entry 22 leaf hash"


def test_inner_node_change_names_the_node(pristine, tmp_path):
    con = sqlite3.connect(pristine)
    (h,) = con.execute("SELECT hash FROM nodes WHERE level = 3 AND idx = 2").fetchone()
    con.close()
    path = tampered(
        pristine,
        tmp_path,
        "UPDATE nodes SET hash = ? WHERE level = 3 AND idx = 2",
        flip(bytes(h), 0),
    )
    assert verify_database(path).problem.where == "node (3, 2)"


def test_checkpoint_change_names_the_checkpoint(pristine, tmp_path):
    con = sqlite3.connect(pristine)
    (note,) = con.execute("SELECT note FROM checkpoints WHERE size = 30").fetchone()
    con.close()
    note = bytes(note)
    lines = note.split(b"\n")
    lines[1] = b"31"  # claim a different size under the same signature
    path = tampered(
        pristine, tmp_path, "UPDATE checkpoints SET note = ? WHERE size = 30", b"\n".join(lines)
    )
    problem = verify_database(path).problem
    assert problem.where == "checkpoint at size 30"
    sig_at = note.rindex(b" ") + 3
    path2 = tampered(
        pristine,
        tmp_path,
        "UPDATE checkpoints SET note = ? WHERE size = 30",
        flip(note, sig_at),
        name="t2.db",
    )
    assert verify_database(path2).problem.where == "checkpoint at size 30"


def test_deleted_entry_is_a_gap(pristine, tmp_path):
    path = tampered(pristine, tmp_path, "DELETE FROM entries WHERE idx = 8")
    problem = verify_database(path).problem
    assert problem.where == "entry 8" and "missing" in problem.what


def test_swapped_origin_key_is_caught(pristine, tmp_path):
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    path = tampered(pristine, tmp_path, "UPDATE origins SET public_key = ?", other)
    assert verify_database(path, {ORIGIN: KEY.public_key()}).problem.where == "origin key"
    assert verify_database(path).problem.where == "entry 0"


def test_entry_after_the_newest_checkpoint_is_checked_by_its_own_signature(pristine, tmp_path):
    data = entry(pristine, 35).replace(b'"sha256":"0', b'"sha256":"1', 1)
    path = tampered(pristine, tmp_path, "UPDATE entries SET data = ? WHERE idx = 35", data)
    problem = verify_database(path).problem
    assert problem.where == "entry 35" and "signature" in problem.what


def test_checkpoint_whose_root_does_not_match_is_named(pristine, tmp_path):
    """The newest checkpoint, signed by the origin, over other entries: the entries it would
    authenticate are checked one by one instead, and the checkpoint is named."""
    from dicomledger.ledger.checkpoint import Checkpoint, format_checkpoint
    from dicomledger.ledger.note import Note, format_note, sign_note_text

    text = format_checkpoint(Checkpoint(ORIGIN, 30, bytes(32)))
    note = format_note(Note(text, (sign_note_text(text, ORIGIN, KEY),)))
    path = tampered(pristine, tmp_path, "UPDATE checkpoints SET note = ? WHERE size = 30", note)
    problem = verify_database(path).problem
    assert (problem.where, problem.what) == (
        "checkpoint at size 30",
        "root hash does not match the stored entries",
    )


@pytest.mark.parametrize(
    "sql, where, what",
    [
        (
            "UPDATE entries SET data = 'text' WHERE idx = 4",
            "entry 4",
            "entry is not stored as bytes",
        ),
        (
            "UPDATE nodes SET hash = 'text' WHERE level = 1 AND idx = 3",
            "node (1, 3)",
            "stored Merkle node hash is wrong",
        ),
        (
            "UPDATE origins SET public_key = 'text'",
            "origin key",
            "stored public key is not an Ed25519 key",
        ),
        (
            "INSERT INTO entries (origin_id, idx, data) SELECT origin_id, -1, data FROM entries WHERE idx = 0",
            "entry -1",
            "unexpected entry (negative index)",
        ),
        (
            "INSERT INTO nodes (origin_id, level, idx, hash) SELECT origin_id, 2, -1, hash FROM nodes WHERE level = 2 AND idx = 0",
            "node (2, -1)",
            "unexpected stored Merkle node",
        ),
        (
            "INSERT INTO nodes (origin_id, level, idx, hash) SELECT origin_id, 70, 0, hash FROM nodes WHERE level = 2 AND idx = 0",
            "node (70, 0)",
            "unexpected stored Merkle node",
        ),
        (
            "UPDATE checkpoints SET note = 'text' WHERE size = 10",
            "checkpoint at size 10",
            "malformed: the note is not stored as bytes",
        ),
    ],
)
def test_odd_values_in_a_tampered_database_are_named_not_crashed_on(
    pristine, tmp_path, sql, where, what
):
    problem = verify_database(tampered(pristine, tmp_path, sql)).problem
    assert (problem.where, problem.what) == (where, what)


def test_an_entry_the_key_holder_signed_badly_but_checkpointed_needs_every_signature(tmp_path):
    """The one thing the checkpoint shortcut gives up (docs/ledger-formats.md, "What a
    checkpoint pins"): only the key holder can make it, and --every-signature finds it."""
    from dicomledger.ledger import merkle
    from dicomledger.ledger.checkpoint import Checkpoint, format_checkpoint
    from dicomledger.ledger.note import Note, format_note, sign_note_text

    path = tmp_path / "holder.db"

    async def build():
        store = await LedgerStore.open(path)
        writer = LogWriter(store, Identity(ORIGIN, KEY))
        await writer.start()
        for i in range(10):
            await writer.append("image-anchored", {"sha256": f"{i:064x}"})
        await writer.sign_checkpoint()
        await writer.stop()
        await store.close()

    asyncio.run(build())
    con = sqlite3.connect(path)
    (data,) = con.execute("SELECT data FROM entries WHERE idx = 9").fetchone()
    con.execute(
        "UPDATE entries SET data = ? WHERE idx = 9",
        (bytes(data).replace(b'"sha256":"0', b'"sha256":"1', 1),),
    )
    tree = merkle.Frontier()
    con.execute("DELETE FROM nodes")
    for (data,) in con.execute("SELECT data FROM entries ORDER BY idx").fetchall():
        for (level, idx), h in tree.append(merkle.leaf_hash(bytes(data))):
            con.execute(
                "INSERT INTO nodes (origin_id, level, idx, hash) VALUES (1, ?, ?, ?)",
                (level, idx, h),
            )
    text = format_checkpoint(Checkpoint(ORIGIN, 10, tree.root()))
    con.execute(
        "UPDATE checkpoints SET note = ? WHERE size = 10",
        (format_note(Note(text, (sign_note_text(text, ORIGIN, KEY),))),),
    )
    con.commit()
    con.close()
    assert verify_database(path, {ORIGIN: KEY.public_key()}).ok
    problem = verify_database(path, {ORIGIN: KEY.public_key()}, every_signature=True).problem
    assert problem.where == "entry 9" and "signature" in problem.what
