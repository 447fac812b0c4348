"""The ledger database: many origins' Merkle logs in one SQLite file (aiosqlite, WAL).

Tables:
  origins     one row per log (this gateway's own, and later replicas of peers' logs)
  entries     the entry bytes, by (origin, index)
  nodes       every complete Merkle subtree hash by (origin, level, index); level 0 = leaf
              hashes. A proof or a root needs O(log n) of these rows, never a rebuild.
  checkpoints signed checkpoint notes by (origin, size), cosignatures included
  entry_keys  opaque lookup keys an appender attached to an entry (e.g. a hash to find
              later); the ledger does not interpret them
  witness_state, evidence, evidence_cleared, peer_status
              the consortium's state (``ConsortiumState``)

Only ``LogWriter`` appends to an origin's log. It group-commits: appenders queue, the
writer takes everything queued, writes it in one transaction with synchronous=FULL and
releases each appender only after that commit returned.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiosqlite
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dicomledger.ledger import merkle
from dicomledger.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    format_checkpoint,
    parse_checkpoint,
)
from dicomledger.ledger.entries import (
    ZERO_HASH,
    Entry,
    EntryError,
    check_entry,
    decode_entry,
    sign_entry,
)
from dicomledger.ledger.identity import Identity
from dicomledger.ledger.keys import VERSION as LOOKUP_KEYS_VERSION
from dicomledger.ledger.keys import lookup_keys
from dicomledger.ledger.merkle import Frontier, NodeID
from dicomledger.ledger.note import (
    Note,
    NoteError,
    Signature,
    format_note,
    parse_note,
    sign_note_text,
    verify_note_signature,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS origins (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    public_key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    origin_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (origin_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nodes (
    origin_id INTEGER NOT NULL,
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (origin_id, level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    origin_id INTEGER NOT NULL,
    size INTEGER NOT NULL,
    note BLOB NOT NULL,
    PRIMARY KEY (origin_id, size)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS witness_state (
    origin TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    note BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS evidence (
    origin TEXT NOT NULL,
    data BLOB NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (origin, data)
);
CREATE TABLE IF NOT EXISTS evidence_cleared (
    digest BLOB PRIMARY KEY,
    origin TEXT NOT NULL,
    cleared_at TEXT NOT NULL,
    entry INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS peer_status (
    origin TEXT PRIMARY KEY,
    reachable INTEGER NOT NULL,
    last_contact TEXT,
    their_size INTEGER,
    error TEXT
);
CREATE TABLE IF NOT EXISTS entry_keys (
    key TEXT NOT NULL,
    origin_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    PRIMARY KEY (key, origin_id, idx)
) WITHOUT ROWID;
"""


class LedgerStoreError(RuntimeError):
    """The ledger database could not be read or written; the message says what to check."""


@dataclass(frozen=True)
class Appended:
    origin: str
    index: int
    leaf_hash: bytes
    time_ms: int
    data: bytes


@dataclass(frozen=True)
class OriginInfo:
    id: int
    name: str
    public_key: Ed25519PublicKey


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


async def connect(path: Path) -> aiosqlite.Connection:
    try:
        db = await aiosqlite.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise LedgerStoreError(f"cannot open ledger database {path}: {exc}") from None
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (WAL fsynced) before it returns; we promise durability.
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA busy_timeout=10000")
    except sqlite3.Error as exc:
        await db.close()  # its thread would otherwise keep the process alive
        raise LedgerStoreError(f"cannot open ledger database {path}: {exc}") from None
    return db


async def _one_row(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    """The first row of a query, run to completion in one thread hop.

    A SELECT left open between awaits (``async with execute() ... fetchone()``) keeps a
    read snapshot on the shared connection; another coroutine's write on that connection
    then fails at once with "database is locked" (SQLITE_BUSY_SNAPSHOT) once the writer
    thread has committed. ``execute_fetchall`` finishes the statement before returning.
    """
    rows = await db.execute_fetchall(sql, params)
    return next(iter(rows), None)


class LedgerStore:
    """Read access to all logs in one database, plus origin and checkpoint bookkeeping."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path
        self._origins: dict[str, OriginInfo] = {}

    @classmethod
    async def open(cls, path: Path) -> LedgerStore:
        db = await connect(path)
        try:
            await db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            await db.close()
            raise LedgerStoreError(f"cannot create tables in ledger database {path}: {exc}") from None
        return cls(db, path)

    async def close(self) -> None:
        await self.db.close()

    async def ensure_origin(self, name: str, public_key: Ed25519PublicKey) -> OriginInfo:
        """Register a log's origin and key, or check the stored key matches."""
        existing = await self.origin(name)
        if existing is not None:
            if public_key_bytes(existing.public_key) != public_key_bytes(public_key):
                raise LedgerStoreError(
                    f"origin {name!r} is stored with a different public key; "
                    "the key file does not belong to this ledger database"
                )
            return existing
        await self.db.execute(
            "INSERT INTO origins (name, public_key) VALUES (?, ?)",
            (name, public_key_bytes(public_key)),
        )
        self._origins.pop(name, None)
        info = await self.origin(name)
        assert info is not None
        return info

    async def origin(self, name: str) -> OriginInfo | None:
        if name in self._origins:
            return self._origins[name]
        row = await _one_row(self.db, "SELECT id, public_key FROM origins WHERE name = ?", (name,))
        if row is None:
            return None
        info = OriginInfo(row[0], name, Ed25519PublicKey.from_public_bytes(row[1]))
        self._origins[name] = info
        return info

    async def origins(self) -> list[OriginInfo]:
        names = [row[0] for row in await self.db.execute_fetchall("SELECT name FROM origins ORDER BY id")]
        return [info for name in names if (info := await self.origin(name)) is not None]

    async def _origin_id(self, name: str) -> int:
        info = await self.origin(name)
        if info is None:
            raise LedgerStoreError(f"no log for origin {name!r} in {self.path}")
        return info.id

    async def size(self, origin: str) -> int:
        oid = await self._origin_id(origin)
        row = await _one_row(self.db, "SELECT MAX(idx) FROM entries WHERE origin_id = ?", (oid,))
        return 0 if row is None or row[0] is None else row[0] + 1

    async def entry(self, origin: str, index: int) -> bytes:
        oid = await self._origin_id(origin)
        row = await _one_row(self.db, "SELECT data FROM entries WHERE origin_id = ? AND idx = ?", (oid, index))
        if row is None:
            raise LedgerStoreError(f"{origin} has no entry {index}")
        return bytes(row[0])

    async def entries(self, origin: str, start: int, end: int) -> list[bytes]:
        oid = await self._origin_id(origin)
        rows = await self.db.execute_fetchall(
            "SELECT data FROM entries WHERE origin_id = ? AND idx >= ? AND idx < ? ORDER BY idx",
            (oid, start, end),
        )
        return [bytes(row[0]) for row in rows]

    async def add_lookup_keys(self) -> int:
        """Once per lookup-key scheme (``keys.VERSION``): attach the keys to every stored
        entry, so entries stored before the scheme gained a key are found by it too. Returns
        how many entries were read (0 when the database is at that version already)."""
        row = await _one_row(self.db, "PRAGMA user_version")
        if row is not None and row[0] >= LOOKUP_KEYS_VERSION:
            return 0
        read = 0
        for info in await self.origins():
            size = await self.size(info.name)
            for start in range(0, size, 5000):
                rows = await self.entries(info.name, start, min(size, start + 5000))
                found = []
                for idx, data in enumerate(rows, start):
                    try:
                        entry = decode_entry(data)
                    except EntryError as exc:  # `dicomledger verify` names it; keep going
                        log.error("%s entry %d cannot be read for its lookup keys: %s", info.name, idx, exc)
                        continue
                    found += [(key, info.id, idx) for key in lookup_keys(entry.kind, entry.payload)]
                await self.db.executemany(
                    "INSERT OR IGNORE INTO entry_keys (key, origin_id, idx) VALUES (?, ?, ?)", found
                )
                read += len(rows)
        await self.db.execute(f"PRAGMA user_version = {LOOKUP_KEYS_VERSION}")
        return read

    async def find(self, key: str) -> list[tuple[str, int]]:
        """(origin, index) of entries an appender attached ``key`` to, oldest first per origin."""
        rows = await self.db.execute_fetchall(
            "SELECT o.name, k.idx FROM entry_keys k JOIN origins o ON o.id = k.origin_id "
            "WHERE k.key = ? ORDER BY o.id, k.idx",
            (key,),
        )
        return [(row[0], row[1]) for row in rows]

    async def newest_by_key(self, origin: str, prefix: str) -> dict[str, int]:
        """Each lookup key starting with ``prefix`` that ``origin``'s entries carry, with the
        index of the newest entry carrying it (e.g. prefix ``instance:``: the latest anchor
        of every instance). One range scan of the key index."""
        info = await self.origin(origin)
        if info is None or not prefix:
            return {}
        after = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        rows = await self.db.execute_fetchall(
            "SELECT key, MAX(idx) FROM entry_keys WHERE key >= ? AND key < ? AND origin_id = ? GROUP BY key",
            (prefix, after, info.id),
        )
        return {row[0]: row[1] for row in rows}

    async def keys_between(self, origin: str, prefix: str, start: int, end: int) -> set[str]:
        """The lookup keys starting with ``prefix`` that entries ``start`` <= index < ``end``
        of ``origin``'s log carry (e.g. ``perm:``: the patients with new permission records)."""
        info = await self.origin(origin)
        if info is None or not prefix or start >= end:
            return set()
        after = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        rows = await self.db.execute_fetchall(
            "SELECT DISTINCT key FROM entry_keys WHERE key >= ? AND key < ? AND origin_id = ? AND idx >= ? AND idx < ?",
            (prefix, after, info.id, start, end),
        )
        return {row[0] for row in rows}

    async def nodes(self, origin: str, ids: Iterable[NodeID]) -> dict[NodeID, bytes]:
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        oid = await self._origin_id(origin)
        found: dict[NodeID, bytes] = {}
        for chunk_start in range(0, len(wanted), 200):
            chunk = wanted[chunk_start : chunk_start + 200]
            values = ",".join("(?,?)" for _ in chunk)
            params: list[int] = [level_or_idx for node in chunk for level_or_idx in node]
            # Drive the lookup from the wanted list so each node is one primary-key probe.
            rows = await self.db.execute_fetchall(
                f"WITH wanted(level, idx) AS (VALUES {values}) "
                "SELECT n.level, n.idx, n.hash FROM wanted w JOIN nodes n "
                "ON n.origin_id = ? AND n.level = w.level AND n.idx = w.idx",
                [*params, oid],
            )
            for level, idx, h in rows:
                found[(level, idx)] = bytes(h)
        missing = [n for n in wanted if n not in found]
        if missing:
            raise LedgerStoreError(
                f"ledger database {self.path} lacks Merkle nodes {missing[:3]} of {origin}; "
                "run `dicomledger verify`"
            )
        return found

    async def _folded(self, origin: str, plans: Sequence[Sequence[NodeID]]) -> list[bytes]:
        got = await self.nodes(origin, (n for plan in plans for n in plan))
        return [merkle.fold_range([got[n] for n in plan]) for plan in plans]

    async def root(self, origin: str, size: int) -> bytes:
        if size == 0:
            return merkle.root_of_leaf_hashes([])
        return (await self._folded(origin, [merkle.root_plan(size)]))[0]

    async def inclusion_proof(self, origin: str, index: int, size: int) -> list[bytes]:
        return await self._folded(origin, merkle.inclusion_proof_plan(index, size))

    async def consistency_proof(self, origin: str, old_size: int, new_size: int) -> list[bytes]:
        return await self._folded(origin, merkle.consistency_proof_plan(old_size, new_size))

    async def store_checkpoint(self, origin: str, size: int, note: bytes) -> None:
        oid = await self._origin_id(origin)
        await self.db.execute(
            "INSERT OR REPLACE INTO checkpoints (origin_id, size, note) VALUES (?, ?, ?)",
            (oid, size, note),
        )

    async def add_cosignature(self, origin: str, size: int, cosignature: Signature) -> bool:
        """Put a witness's cosignature line on the stored checkpoint note, replacing that
        witness's older one (a fresher timestamp is a heartbeat); True if stored."""
        oid = await self._origin_id(origin)
        row = await _one_row(self.db, "SELECT note FROM checkpoints WHERE origin_id = ? AND size = ?", (oid, size))
        if row is None:
            return False
        note = parse_note(bytes(row[0]))
        if cosignature in note.signatures:
            return False
        kept = [s for s in note.signatures if (s.name, s.key_id) != (cosignature.name, cosignature.key_id)]
        updated = format_note(Note(note.text, (*kept, cosignature)))
        await self.store_checkpoint(origin, size, updated)
        return True

    async def latest_checkpoint(
        self, origin: str, at_least: int = 0
    ) -> tuple[int, bytes] | None:
        """The newest stored checkpoint note of ``origin`` with size >= at_least."""
        oid = await self._origin_id(origin)
        row = await _one_row(
            self.db,
            "SELECT size, note FROM checkpoints WHERE origin_id = ? AND size >= ? ORDER BY size DESC LIMIT 1",
            (oid, at_least),
        )
        return None if row is None else (row[0], bytes(row[1]))


@dataclass(frozen=True)
class HeldEvidence:
    """Equivocation evidence held against an origin, and whether (when, by which entry of
    this gateway's log) its flag was cleared."""

    origin: str
    data: bytes
    received_at: str
    cleared_at: str | None = None
    cleared_by_entry: int | None = None


def evidence_digest(data: bytes) -> bytes:
    """SHA-256 of an evidence file's bytes: how a ``flag-cleared`` entry names it."""
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class PeerStatus:
    origin: str
    reachable: bool
    last_contact: str | None
    their_size: int | None
    error: str | None


class ConsortiumState:
    """What a gateway remembers about its peers: witness state per origin, equivocation
    evidence (an origin with evidence whose flag was not cleared is flagged), and each peer's
    last known status."""

    def __init__(self, store: LedgerStore) -> None:
        self.db = store.db

    async def witness_state(self, origin: str) -> tuple[int, bytes, bytes] | None:
        row = await _one_row(self.db, "SELECT size, root, note FROM witness_state WHERE origin = ?", (origin,))
        return None if row is None else (row[0], bytes(row[1]), bytes(row[2]))

    async def witnessed_notes(self) -> list[tuple[str, bytes]]:
        """(origin, note) of the checkpoint last cosigned, per origin."""
        rows = await self.db.execute_fetchall("SELECT origin, note FROM witness_state ORDER BY origin")
        return [(row[0], bytes(row[1])) for row in rows]

    async def save_witness_state(self, origin: str, size: int, root: bytes, note: bytes) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO witness_state (origin, size, root, note) VALUES (?, ?, ?, ?)",
            (origin, size, root, note),
        )

    async def add_evidence(self, origin: str, data: bytes, now: str) -> bool:
        """Keep evidence against ``origin``; True if it was new."""
        cur = await self.db.execute(
            "INSERT OR IGNORE INTO evidence (origin, data, received_at) VALUES (?, ?, ?)",
            (origin, data, now),
        )
        added = cur.rowcount == 1  # the INSERT has finished: no statement stays open
        await cur.close()
        return added

    async def evidence(self) -> list[tuple[str, bytes]]:
        """(origin, evidence) of every flag in force: evidence not cleared, oldest first."""
        rows = await self.db.execute_fetchall("SELECT origin, data FROM evidence ORDER BY received_at")
        cleared = await self._cleared_digests()
        return [(row[0], bytes(row[1])) for row in rows if evidence_digest(bytes(row[1])) not in cleared]

    async def evidence_held(self, origin: str) -> list[HeldEvidence]:
        """All evidence held against ``origin``, cleared or not, oldest first."""
        rows = await self.db.execute_fetchall(
            "SELECT data, received_at FROM evidence WHERE origin = ? ORDER BY received_at", (origin,)
        )
        cleared = await self._cleared_digests()
        return [
            HeldEvidence(origin, bytes(data), received_at, *cleared.get(evidence_digest(bytes(data)), (None, None)))
            for data, received_at in rows
        ]

    async def _cleared_digests(self) -> dict[bytes, tuple[str, int]]:
        rows = await self.db.execute_fetchall("SELECT digest, cleared_at, entry FROM evidence_cleared")
        return {bytes(row[0]): (row[1], row[2]) for row in rows}

    async def flagged(self) -> set[str]:
        return {origin for origin, _ in await self.evidence()}

    async def mark_cleared(self, origin: str, digests: Sequence[bytes], entry: int, now: str) -> None:
        """Clear the flag these pieces of evidence raised against ``origin``: the evidence is
        kept (for export and audit) but no longer flags the origin nor is served to peers;
        ``entry`` is the ``flag-cleared`` entry of this gateway's log that records it."""
        await self.db.executemany(
            "INSERT OR IGNORE INTO evidence_cleared (digest, origin, cleared_at, entry) VALUES (?, ?, ?, ?)",
            [(d, origin, now, entry) for d in digests],
        )

    async def set_peer_status(self, status: PeerStatus) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO peer_status (origin, reachable, last_contact, their_size, error) "
            "VALUES (?, ?, ?, ?, ?)",
            (status.origin, int(status.reachable), status.last_contact, status.their_size, status.error),
        )

    async def peer_status(self, origin: str) -> PeerStatus | None:
        row = await _one_row(
            self.db,
            "SELECT reachable, last_contact, their_size, error FROM peer_status WHERE origin = ?",
            (origin,),
        )
        return None if row is None else PeerStatus(origin, bool(row[0]), row[1], row[2], row[3])


@dataclass
class _Pending:
    kind: str
    payload: Mapping[str, Any]
    keys: tuple[str, ...] | None  # None: keys.lookup_keys of the payload as appended
    future: asyncio.Future[Any]
    ticket: Any = None  # for the companion (append_guarded)


@dataclass(frozen=True)
class Declined:
    """A guarded append the companion answered itself, appending nothing (e.g. a duplicate)."""

    value: Any


class Companion(Protocol):
    """Work on another store that rides on the ledger writer's thread hop, around the commit of
    each batch (``LogWriter(companion=...)``, ``append_guarded``). Both methods run on the
    writer's thread, in batch order, so what ``before`` decides cannot race with another
    batch.

    ``before`` gets the tickets of the batch's guarded appends and returns, per ticket, a
    mapping to add to its payload (append it), a ``Declined`` (answer its appender with that,
    append nothing) or an exception (raise it to its appender, append nothing). ``after`` gets
    (ticket, Appended) for those appended, once the batch is durable in the ledger; an
    exception from it goes to each of their appenders (the entries stay appended)."""

    def before(self, tickets: Sequence[Any]) -> Sequence[Mapping[str, Any] | Declined | BaseException]: ...

    def after(self, appended: Sequence[tuple[Any, Appended]]) -> None: ...


class _ThreadWriter:
    """A writer with its own thread and plain sqlite3 connection.

    A batch is written in one thread hop (aiosqlite would take one per statement and let
    other coroutines' statements interleave); readers, on the store's aiosqlite
    connection, never see half a batch.
    """

    def __init__(self, store: LedgerStore, name: str) -> None:
        self.store = store
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._db: sqlite3.Connection | None = None  # used on self._thread only

    async def _on_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _connect(self) -> None:
        try:
            db = sqlite3.connect(self.store.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # COMMIT returns only once the WAL is on disk
            db.execute("PRAGMA busy_timeout=10000")
        except sqlite3.Error as exc:
            raise LedgerStoreError(f"cannot open ledger database {self.store.path}: {exc}") from None
        self._db = db

    async def _close(self) -> None:
        if self._db is not None:
            await self._on_thread(self._db.close)
            self._db = None
        self._thread.shutdown()

    def _frontier(self, origin_id: int, origin: str) -> tuple[Frontier, bytes | None]:
        """Writer thread: the stored tree's frontier and the last entry's bytes."""
        assert self._db is not None
        row = self._db.execute("SELECT MAX(idx) FROM entries WHERE origin_id = ?", (origin_id,)).fetchone()
        size = 0 if row[0] is None else row[0] + 1
        nodes: dict[NodeID, bytes] = {}
        for level, idx in Frontier.needed_nodes(size):
            node = self._db.execute(
                "SELECT hash FROM nodes WHERE origin_id = ? AND level = ? AND idx = ?",
                (origin_id, level, idx),
            ).fetchone()
            if node is None:
                raise LedgerStoreError(
                    f"ledger database {self.store.path} lacks Merkle node ({level}, {idx}) of "
                    f"{origin}; run `dicomledger verify`"
                )
            nodes[(level, idx)] = bytes(node[0])
        last = None
        if size:
            (last,) = self._db.execute(
                "SELECT data FROM entries WHERE origin_id = ? AND idx = ?", (origin_id, size - 1)
            ).fetchone()
        return Frontier.from_nodes(size, nodes), None if last is None else bytes(last)

    def _write(
        self,
        entries_rows: list[tuple[int, int, bytes]],
        node_rows: list[tuple[int, int, int, bytes]],
        key_rows: list[tuple[str, int, int]],
        checkpoint_row: tuple[int, int, bytes] | None = None,
    ) -> None:
        """Writer thread: one transaction; sqlite3.Error/OSError propagate after rollback."""
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO entries (origin_id, idx, data) VALUES (?, ?, ?)", entries_rows)
            db.executemany("INSERT INTO nodes (origin_id, level, idx, hash) VALUES (?, ?, ?, ?)", node_rows)
            if key_rows:
                db.executemany(
                    "INSERT OR IGNORE INTO entry_keys (key, origin_id, idx) VALUES (?, ?, ?)", key_rows
                )
            if checkpoint_row is not None:
                db.execute(
                    "INSERT OR REPLACE INTO checkpoints (origin_id, size, note) VALUES (?, ?, ?)",
                    checkpoint_row,
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


class LogWriter(_ThreadWriter):
    """The single writer of this gateway's own log, with group commit: appenders queue on
    the event loop; each batch is signed, hashed and committed on the writer's thread."""

    def __init__(
        self, store: LedgerStore, identity: Identity, max_batch: int = 2000, companion: Companion | None = None
    ) -> None:
        super().__init__(store, "ledger-writer")
        self.identity = identity
        self.max_batch = max_batch
        self.companion = companion
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._origin_id = 0
        self._tree = Frontier()  # committed entries only
        self._last_leaf = ZERO_HASH
        self._last_time = 0

    @property
    def size(self) -> int:
        """Entries committed so far."""
        return self._tree.size

    async def start(self) -> None:
        info = await self.store.ensure_origin(self.identity.origin, self.identity.public_key)
        self._origin_id = info.id
        await self._on_thread(self._open)
        self._task = asyncio.create_task(self._run(), name=f"ledger-writer {info.name}")

    def _open(self) -> None:
        self._connect()
        self._load_state()

    def _load_state(self) -> None:
        self._tree, last = self._frontier(self._origin_id, self.identity.origin)
        self._last_leaf = self._tree.newest[0][1] if self._tree.size else ZERO_HASH
        self._last_time = decode_entry(last).time_ms if last is not None else 0

    async def stop(self) -> None:
        """Finish everything queued, then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        await self._close()

    async def append(
        self, kind: str, payload: Mapping[str, Any], keys: Sequence[str] | None = None
    ) -> Appended:
        """Append one entry; returns once it is durable in the database. Its lookup keys are
        ``keys.lookup_keys`` unless ``keys`` says otherwise."""
        result: Appended = await self._enqueue(kind, payload, None if keys is None else tuple(keys), None)
        return result

    async def append_guarded(self, kind: str, payload: Mapping[str, Any], ticket: Any) -> Appended | Declined:
        """Append one entry as the companion decides for ``ticket`` (see ``Companion``), in
        the same writer-thread hop as the batch's commit and the companion's own work."""
        if self.companion is None:
            raise LedgerStoreError("ledger writer has no companion for a guarded append")
        result: Appended | Declined = await self._enqueue(kind, payload, None, ticket)
        return result

    async def _enqueue(self, kind: str, payload: Mapping[str, Any], keys: tuple[str, ...] | None, ticket: Any) -> Any:
        if self._task is None:
            raise LedgerStoreError("ledger writer is not running")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(kind, payload, keys, future, ticket))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                try:
                    results: list[Any] = await self._on_thread(self._commit, batch)
                except LedgerStoreError as exc:
                    results = [exc] * len(batch)
                for pending, result in zip(batch, results, strict=True):
                    if pending.future.done():  # the appender was cancelled
                        continue
                    if isinstance(result, BaseException):
                        pending.future.set_exception(result)
                    else:
                        pending.future.set_result(result)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _admit(self, batch: list[_Pending]) -> list[Mapping[str, Any] | Declined | BaseException]:
        """Writer thread: each item's payload to append, or what answers it instead (the
        companion's verdict on a guarded append)."""
        payloads: list[Mapping[str, Any] | Declined | BaseException] = [p.payload for p in batch]
        guarded = [i for i, p in enumerate(batch) if p.ticket is not None]
        if not guarded:
            return payloads
        assert self.companion is not None
        try:
            verdicts = self.companion.before([batch[i].ticket for i in guarded])
        except Exception as exc:  # the companion's store failed: its appends fail, the others go on
            verdicts = [exc] * len(guarded)
        for i, verdict in zip(guarded, verdicts, strict=True):
            payloads[i] = verdict if isinstance(verdict, Declined | BaseException) else {**batch[i].payload, **verdict}
        return payloads

    def _commit(self, batch: list[_Pending]) -> list[Any]:
        """Writer thread: sign, hash and commit a batch (with the companion's work around it);
        per-item results in order: Appended, Declined or an exception."""
        entries_rows: list[tuple[int, int, bytes]] = []
        node_rows: list[tuple[int, int, int, bytes]] = []
        key_rows: list[tuple[str, int, int]] = []
        results: list[Any] = []
        oid = self._origin_id
        tree = self._tree.copy()
        last_leaf, last_time = self._last_leaf, self._last_time
        for pending, payload in zip(batch, self._admit(batch), strict=True):
            if isinstance(payload, Declined | BaseException):
                results.append(payload)
                continue
            now = max(int(time.time() * 1000), last_time)
            index = tree.size
            try:
                _, data = sign_entry(
                    origin=self.identity.origin,
                    index=index,
                    prev=last_leaf,
                    time_ms=now,
                    kind=pending.kind,
                    payload=payload,
                    private_key=self.identity.private_key,
                )
            except ValueError as exc:  # a bad payload fails its own appender only
                results.append(exc)
                continue
            leaf = merkle.leaf_hash(data)
            keys = lookup_keys(pending.kind, payload) if pending.keys is None else pending.keys
            entries_rows.append((oid, index, data))
            node_rows += [(oid, level, idx, h) for (level, idx), h in tree.append(leaf)]
            key_rows += [(k, oid, index) for k in keys]
            results.append(Appended(self.identity.origin, index, leaf, now, data))
            last_leaf, last_time = leaf, now
        if not entries_rows:
            return results
        try:
            self._write(entries_rows, node_rows, key_rows)
        except (sqlite3.Error, OSError) as exc:
            log.error("ledger commit failed: %s", exc)
            self._load_state()
            error = LedgerStoreError(f"ledger write failed ({exc}); check disk space and {self.store.path}")
            return [r if isinstance(r, Declined | BaseException) else error for r in results]
        self._tree, self._last_leaf, self._last_time = tree, last_leaf, last_time
        self._after(batch, results)
        return results

    def _after(self, batch: list[_Pending], results: list[Any]) -> None:
        """Writer thread, after the commit: the companion's work on the guarded appends made."""
        done = [(i, batch[i].ticket, r) for i, r in enumerate(results)
                if batch[i].ticket is not None and isinstance(r, Appended)]
        if not done:
            return
        assert self.companion is not None
        try:
            self.companion.after([(ticket, appended) for _, ticket, appended in done])
        except Exception as exc:  # appended and durable, but the companion's part failed
            for i, _, _ in done:
                results[i] = exc

    async def sign_checkpoint(self) -> tuple[int, bytes]:
        """Sign and store a checkpoint of the log as committed now; returns (size, note)."""
        size = self.size
        return size, await sign_checkpoint(self.store, self.identity, size)


class ReplicaError(ValueError):
    """Entries offered for another origin's log were refused; nothing was stored."""


class ReplicaWriter(_ThreadWriter):
    """Appends other origins' entries to their replica logs, verified before anything is stored.

    Entries must extend the local copy towards a checkpoint signed by the origin: each entry
    is checked (canonical, in sequence, chained, signed by the origin), and the extended tree
    must be the checkpoint's tree (same root) or, for a chunk that stops short of it, be shown
    a prefix of it by a consistency proof. So a replica is pulled in bounded chunks, and every
    stored prefix is committed to by a signed checkpoint. Any failure stores nothing.
    """

    def __init__(
        self, store: LedgerStore, keys_of: Callable[[Entry], Sequence[str]] | None = None
    ) -> None:
        super().__init__(store, "replica-writer")
        self._keys_of = keys_of or (lambda entry: lookup_keys(entry.kind, entry.payload))

    async def start(self) -> None:
        await self._on_thread(self._connect)

    async def stop(self) -> None:
        await self._close()

    async def append_verified(
        self,
        origin: str,
        entries: Sequence[bytes],
        checkpoint_note: bytes,
        consistency_proof: Sequence[bytes] | None = None,
    ) -> int:
        """Store ``entries`` (the next ones of ``origin``'s log); returns the replica's new size.

        Entries that reach the size of ``checkpoint_note`` are stored with it when the tree's
        root is the checkpoint's. Entries that stop short of it are stored (without a
        checkpoint) when ``consistency_proof`` proves the extended tree, at its new size, a
        prefix of the checkpoint's tree (RFC 9162 consistency from the new size to the
        checkpoint's). ReplicaError says why it refused; then nothing was stored."""
        info = await self.store.origin(origin)
        if info is None:
            raise ReplicaError(f"origin {origin!r} is not a known log; add its key before replicating it")
        proof = None if consistency_proof is None else list(consistency_proof)
        return await self._on_thread(self._append, info, list(entries), checkpoint_note, proof)

    def _append(
        self, info: OriginInfo, entries: list[bytes], checkpoint_note: bytes, proof: list[bytes] | None
    ) -> int:
        try:
            note = parse_note(checkpoint_note)
            cp = parse_checkpoint(note.text)
        except (NoteError, CheckpointError) as exc:
            raise ReplicaError(f"checkpoint of {info.name} is malformed: {exc}") from None
        if cp.origin != info.name:
            raise ReplicaError(f"checkpoint is for {cp.origin!r}, not {info.name!r}")
        if not verify_note_signature(note, info.name, info.public_key):
            raise ReplicaError(f"checkpoint of {info.name} is not signed by its key")
        tree, last = self._frontier(info.id, info.name)
        end = tree.size + len(entries)
        if end > cp.size or (end < cp.size and (proof is None or not entries)):
            raise ReplicaError(
                f"{len(entries)} entries after our {tree.size} of {info.name} do not reach "
                f"its checkpoint size {cp.size}"
            )
        prev = merkle.leaf_hash(last) if last is not None else ZERO_HASH
        entries_rows, node_rows, key_rows = [], [], []
        for data in entries:
            index = tree.size
            try:
                entry = check_entry(data, origin=info.name, index=index, prev=prev, public_key=info.public_key)
            except EntryError as exc:
                raise ReplicaError(f"{info.name} entry {index}: {exc}") from None
            prev = merkle.leaf_hash(data)
            entries_rows.append((info.id, index, data))
            node_rows += [(info.id, level, idx, h) for (level, idx), h in tree.append(prev)]
            key_rows += [(k, info.id, index) for k in self._keys_of(entry)]
        checkpoint_row: tuple[int, int, bytes] | None = None
        if end == cp.size:
            if tree.root() != cp.root_hash:
                raise ReplicaError(
                    f"entries of {info.name} up to {cp.size} do not match its signed checkpoint's root"
                )
            checkpoint_row = (info.id, cp.size, checkpoint_note)
        else:
            assert proof is not None
            try:
                merkle.verify_consistency(end, cp.size, tree.root(), cp.root_hash, proof)
            except merkle.ProofError as exc:
                raise ReplicaError(
                    f"entries of {info.name} up to {end} are not shown to be a prefix of its signed "
                    f"checkpoint of size {cp.size}: {exc}"
                ) from None
        try:
            self._write(entries_rows, node_rows, key_rows, checkpoint_row)
        except sqlite3.IntegrityError:
            raise ReplicaError(f"entries of {info.name} were stored meanwhile; retry from the new size") from None
        except (sqlite3.Error, OSError) as exc:
            raise LedgerStoreError(f"ledger write failed ({exc}); check disk space and {self.store.path}") from None
        return end


async def sign_checkpoint(store: LedgerStore, identity: Identity, size: int) -> bytes:
    """Sign a C2SP checkpoint of ``identity``'s log at ``size`` and store it; returns the note."""
    root = await store.root(identity.origin, size)
    text = format_checkpoint(Checkpoint(identity.origin, size, root))
    sig = sign_note_text(text, identity.origin, identity.private_key)
    note = format_note(Note(text, (sig,)))
    await store.store_checkpoint(identity.origin, size, note)
    return note
