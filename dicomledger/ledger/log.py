"""The ledger database: many origins' Merkle logs in one SQLite file (aiosqlite, WAL).

Tables:
  origins     one row per log (this gateway's own, and later replicas of peers' logs)
  entries     the entry bytes, by (origin, index)
  nodes       every complete Merkle subtree hash by (origin, level, index); level 0 = leaf
              hashes. A proof or a root needs O(log n) of these rows, never a rebuild.
  checkpoints signed checkpoint notes by (origin, size), cosignatures included
  entry_keys  opaque lookup keys an appender attached to an entry (e.g. a hash to find
              later); the ledger does not interpret them
  key_changes the key changes of each log (``keychain.py``): the index of each key-rotation
              or key-replacement entry and the key in force after it, written with the
              entry; and a replacement accepted ahead of the origin's own entry (its
              statement, from another gateway's log or `replace-key submit`)
  witness_state, evidence, evidence_cleared, peer_status, peer_consortium
              the consortium's state (``ConsortiumState``)

Only ``LogWriter`` appends to an origin's log. It group-commits: appenders queue, the
writer takes everything queued, writes it in one transaction with synchronous=FULL and
releases each appender only after that commit returned.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import aiosqlite
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dicomledger.common.errors import LedgerFormatError, StorageError
from dicomledger.common.sqlite_thread import ThreadedSqlite
from dicomledger.ledger import merkle
from dicomledger.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    format_checkpoint,
    parse_checkpoint,
)
from dicomledger.ledger.entries import (
    KEY_ROTATION,
    ZERO_HASH,
    Entry,
    EntryError,
    check_entry,
    decode_entry,
    sign_entry,
)
from dicomledger.ledger.identity import Identity
from dicomledger.ledger.keychain import (
    KeyChain,
    KeyChange,
    KeyChangeError,
    Statement,
    changes_key_of,
    check_change,
    rotation_payload,
)
from dicomledger.ledger.keys import VERSION as LOOKUP_KEYS_VERSION
from dicomledger.ledger.keys import lookup_keys
from dicomledger.ledger.merkle import Frontier, NodeID
from dicomledger.ledger.note import (
    Note,
    NoteError,
    Signature,
    cosignature_timestamp,
    format_note,
    parse_note,
    sign_note_text,
)
from dicomledger.ledger.policy import WitnessPolicy

log = logging.getLogger(__name__)

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
CREATE TABLE IF NOT EXISTS peer_consortium (
    origin TEXT PRIMARY KEY,
    secret_check TEXT,
    policy TEXT,
    mismatch TEXT,
    checked_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS key_changes (
    origin_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    public_key BLOB NOT NULL,
    replaced INTEGER NOT NULL,
    statement BLOB,
    PRIMARY KEY (origin_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entry_keys (
    key TEXT NOT NULL,
    origin_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    PRIMARY KEY (key, origin_id, idx)
) WITHOUT ROWID;
"""


class LedgerStoreError(StorageError, RuntimeError):
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


KEY_CHANGES_SQL = (
    "SELECT idx, public_key, replaced FROM key_changes WHERE origin_id = ? ORDER BY idx"
)


def chain_of(origin: str, first: Ed25519PublicKey, rows: Iterable[Sequence[Any]]) -> KeyChain:
    """A KeyChain from the first key and ``key_changes`` rows (idx, public_key, replaced)."""
    changes = tuple(
        KeyChange(idx, Ed25519PublicKey.from_public_bytes(bytes(key)), bool(replaced))
        for idx, key, replaced in rows
    )
    return KeyChain(origin, first, changes)


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


async def one_row(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
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
            raise LedgerStoreError(
                f"cannot create tables in ledger database {path}: {exc}"
            ) from None
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
        row = await one_row(self.db, "SELECT id, public_key FROM origins WHERE name = ?", (name,))
        if row is None:
            return None
        info = OriginInfo(row[0], name, Ed25519PublicKey.from_public_bytes(row[1]))
        self._origins[name] = info
        return info

    async def key_chain(self, name: str) -> KeyChain:
        """The origin's keys: its first key and the changes its log made (and any replacement
        accepted ahead of its entry). LedgerStoreError for an unknown origin."""
        info = await self.origin(name)
        if info is None:
            raise LedgerStoreError(f"no log for origin {name!r} in {self.path}")
        rows = await self.db.execute_fetchall(KEY_CHANGES_SQL, (info.id,))
        return chain_of(info.name, info.public_key, rows)

    async def key_changes(self, name: str, start: int = 0) -> list[bytes]:
        """The key-rotation and key-replacement entries of ``name``'s log held, from index
        ``start`` on (what a peer that has not yet seen them needs to follow the chain)."""
        info = await self.origin(name)
        if info is None:
            return []
        rows = await self.db.execute_fetchall(
            "SELECT e.data FROM key_changes k JOIN entries e ON e.origin_id = k.origin_id AND e.idx = k.idx "
            "WHERE k.origin_id = ? AND k.idx >= ? ORDER BY k.idx",
            (info.id, start),
        )
        return [bytes(row[0]) for row in rows]

    async def accept_replacement(self, statement: Statement) -> bool:
        """Record a replacement statement for ``statement.origin`` (checked by the caller)
        ahead of the origin's own entry; True if it is new here."""
        info = await self.origin(statement.origin)
        if info is None:
            raise LedgerStoreError(f"no log for origin {statement.origin!r} in {self.path}")
        cur = await self.db.execute(
            "INSERT OR IGNORE INTO key_changes (origin_id, idx, public_key, replaced, statement) VALUES (?, ?, ?, 1, ?)",
            (
                info.id,
                statement.size,
                statement.new_key.public_bytes_raw(),
                format_note(statement.note),
            ),
        )
        added = cur.rowcount == 1
        await cur.close()
        return added

    async def origins(self) -> list[OriginInfo]:
        names = [
            row[0] for row in await self.db.execute_fetchall("SELECT name FROM origins ORDER BY id")
        ]
        return [info for name in names if (info := await self.origin(name)) is not None]

    async def _origin_id(self, name: str) -> int:
        info = await self.origin(name)
        if info is None:
            raise LedgerStoreError(f"no log for origin {name!r} in {self.path}")
        return info.id

    async def size(self, origin: str) -> int:
        oid = await self._origin_id(origin)
        row = await one_row(self.db, "SELECT MAX(idx) FROM entries WHERE origin_id = ?", (oid,))
        return 0 if row is None or row[0] is None else row[0] + 1

    async def entry(self, origin: str, index: int) -> bytes:
        oid = await self._origin_id(origin)
        row = await one_row(
            self.db, "SELECT data FROM entries WHERE origin_id = ? AND idx = ?", (oid, index)
        )
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
        row = await one_row(self.db, "PRAGMA user_version")
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
                        log.error(
                            "%s entry %d cannot be read for its lookup keys: %s",
                            info.name,
                            idx,
                            exc,
                        )
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
        row = await one_row(
            self.db, "SELECT note FROM checkpoints WHERE origin_id = ? AND size = ?", (oid, size)
        )
        if row is None:
            return False
        note = parse_note(bytes(row[0]))
        if cosignature in note.signatures:
            return False
        same = [
            s
            for s in note.signatures
            if (s.name, s.key_id) == (cosignature.name, cosignature.key_id)
        ]
        if any(
            (cosignature_timestamp(s) or 0) >= (cosignature_timestamp(cosignature) or 0)
            for s in same
        ):
            return False  # we hold a fresher line by this witness
        kept = [s for s in note.signatures if s not in same]
        updated = format_note(Note(note.text, (*kept, cosignature)))
        await self.store_checkpoint(origin, size, updated)
        return True

    async def latest_checkpoint(self, origin: str, at_least: int = 0) -> tuple[int, bytes] | None:
        """The newest stored checkpoint note of ``origin`` with size >= at_least."""
        oid = await self._origin_id(origin)
        row = await one_row(
            self.db,
            "SELECT size, note FROM checkpoints WHERE origin_id = ? AND size >= ? ORDER BY size DESC LIMIT 1",
            (oid, at_least),
        )
        return None if row is None else (row[0], bytes(row[1]))


@dataclass(frozen=True)
class NewKey:
    """The payload of a pending key rotation: the writer builds the payload (with the new
    key's signature over the entry's place) when it knows that place."""

    private_key: Ed25519PrivateKey


_UNSET = object()


@dataclass
class _Pending:
    kind: str
    payload: Mapping[str, Any] | NewKey
    keys: tuple[str, ...] | None  # None: keys.lookup_keys of the payload as appended
    future: asyncio.Future[Any] | None  # None: appended from a thread (append_guarded_blocking)
    ticket: Any = None  # for the companion (append_guarded)
    result: Any = _UNSET  # the outcome, for an append from a thread


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

    def before(
        self, tickets: Sequence[Any]
    ) -> Sequence[Mapping[str, Any] | Declined | BaseException]: ...

    def after(self, appended: Sequence[tuple[Any, Appended]]) -> None: ...


class _ThreadWriter(ThreadedSqlite):
    """A writer with its own thread and plain sqlite3 connection.

    A batch is written in one thread hop (aiosqlite would take one per statement and let
    other coroutines' statements interleave); readers, on the store's aiosqlite
    connection, never see half a batch.
    """

    def __init__(self, store: LedgerStore, name: str) -> None:
        super().__init__(store.path, name)
        self.store = store

    def _connect_writer(self) -> None:
        try:  # synchronous=FULL: COMMIT returns only once the WAL is on disk; the store made the schema
            self._connect("FULL", "")
        except sqlite3.Error as exc:
            raise LedgerStoreError(
                f"cannot open ledger database {self.store.path}: {exc}"
            ) from None

    def _frontier(self, origin_id: int, origin: str) -> tuple[Frontier, bytes | None]:
        """Writer thread: the stored tree's frontier and the last entry's bytes."""
        assert self._db is not None
        row = self._db.execute(
            "SELECT MAX(idx) FROM entries WHERE origin_id = ?", (origin_id,)
        ).fetchone()
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

    def _chain(self, origin_id: int, origin: str, first: Ed25519PublicKey) -> KeyChain:
        """Writer thread: the origin's key chain as stored."""
        assert self._db is not None
        return chain_of(origin, first, self._db.execute(KEY_CHANGES_SQL, (origin_id,)).fetchall())

    def _signer_keys(self, name: str) -> list[Ed25519PublicKey]:
        """Writer thread: the trusted keys of gateway ``name``'s chain (a replacement
        statement's signers may have rotated their keys), none if its log is unknown."""
        assert self._db is not None
        row = self._db.execute(
            "SELECT id, public_key FROM origins WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            return []
        return self._chain(
            row[0], name, Ed25519PublicKey.from_public_bytes(bytes(row[1]))
        ).trusted_keys()

    def _write(
        self,
        entries_rows: list[tuple[int, int, bytes]],
        node_rows: list[tuple[int, int, int, bytes]],
        key_rows: list[tuple[str, int, int]],
        checkpoint_row: tuple[int, int, bytes] | None = None,
        change_rows: Sequence[tuple[int, int, bytes, int, bytes | None]] = (),
    ) -> None:
        """Writer thread: one transaction; sqlite3.Error/OSError propagate after rollback."""
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO entries (origin_id, idx, data) VALUES (?, ?, ?)", entries_rows
            )
            db.executemany(
                "INSERT INTO nodes (origin_id, level, idx, hash) VALUES (?, ?, ?, ?)", node_rows
            )
            if key_rows:
                db.executemany(
                    "INSERT OR IGNORE INTO entry_keys (key, origin_id, idx) VALUES (?, ?, ?)",
                    key_rows,
                )
            if change_rows:  # a replacement accepted ahead keeps its statement row
                db.executemany(
                    "INSERT OR IGNORE INTO key_changes (origin_id, idx, public_key, replaced, statement) "
                    "VALUES (?, ?, ?, ?, ?)",
                    change_rows,
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


def _change_row(origin_id: int, change: KeyChange) -> tuple[int, int, bytes, int, None]:
    return origin_id, change.index, change.key.public_bytes_raw(), int(change.replaced), None


class LogWriter(_ThreadWriter):
    """The single writer of this gateway's own log, with group commit: appenders queue on
    the event loop; each batch is signed, hashed and committed on the writer's thread.

    It signs with ``identity``, the key in force at the log's tip: a key rotation appended
    through it (``rotate``) switches to the new key for the entries after it, in the same
    batch; ``tip`` gives the size and the key that signs its checkpoint, read together."""

    def __init__(
        self,
        store: LedgerStore,
        identity: Identity,
        max_batch: int = 2000,
        policy: WitnessPolicy | None = None,
        companion: Companion | None = None,
    ) -> None:
        super().__init__(store, "ledger-writer")
        self.identity = identity
        self.max_batch = max_batch
        self.companion = companion
        self.policy = policy  # counts the signers of a key-replacement statement
        # Batches are committed by whoever holds this lock: the writer thread for appends from
        # the event loop, or an appending thread itself (append_guarded_blocking), which then
        # commits every thread append queued meanwhile as one batch (group commit with no
        # hop to another thread: measured, the ingest's hops cost more than the commit).
        self._commit_lock = threading.Lock()
        self._from_threads: collections.deque[_Pending] = collections.deque()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._origin_id = 0
        self._tree = Frontier()  # committed entries only
        self._last_leaf = ZERO_HASH
        self._last_time = 0
        self.chain = KeyChain(identity.origin, identity.public_key)  # as committed
        self._tip: tuple[int, Identity] = (0, identity)  # replaced in one assignment: read together
        # Entries committed by this process, by kind (for the metrics endpoint): updated under
        # the commit lock, read with single lookups (atomic under the GIL)
        self.appended_kinds: Counter[str] = Counter()

    @property
    def size(self) -> int:
        """Entries committed so far."""
        return self._tree.size

    @property
    def tip(self) -> tuple[int, Identity]:
        """(entries committed, the identity that signs a checkpoint of that size)."""
        return self._tip

    async def start(self) -> None:
        info = await self.store.origin(self.identity.origin)
        if info is None:  # a new log: this key is its first key
            info = await self.store.ensure_origin(self.identity.origin, self.identity.public_key)
        self._origin_id = info.id
        self._first_key = info.public_key
        await self._on_thread(self._open)
        self._task = asyncio.create_task(self._run(), name=f"ledger-writer {info.name}")

    def _open(self) -> None:
        self._connect_writer()
        self._load_state()

    def _load_state(self) -> None:
        self._tree, last = self._frontier(self._origin_id, self.identity.origin)
        self._last_leaf = self._tree.newest[0][1] if self._tree.size else ZERO_HASH
        self._last_time = decode_entry(last).time_ms if last is not None else 0
        self.chain = self._chain(self._origin_id, self.identity.origin, self._first_key)
        self._tip = (self._tree.size, self.identity)

    @property
    def running(self) -> bool:
        """Started, and its commit loop has not ended (a stopped or crashed writer appends nothing)."""
        return self._task is not None and not self._task.done()

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
        await self.close()

    async def append(
        self, kind: str, payload: Mapping[str, Any], keys: Sequence[str] | None = None
    ) -> Appended:
        """Append one entry; returns once it is durable in the database. Its lookup keys are
        ``keys.lookup_keys`` unless ``keys`` says otherwise."""
        if kind == KEY_ROTATION:
            raise LedgerStoreError("a key rotation is appended with rotate()")
        pending = _Pending(kind, payload, None if keys is None else tuple(keys), self._new_future())
        result: Appended = await self._enqueue(pending)
        return result

    async def append_guarded(
        self, kind: str, payload: Mapping[str, Any], ticket: Any
    ) -> Appended | Declined:
        """Append one entry as the companion decides for ``ticket`` (see ``Companion``), in
        the same writer-thread hop as the batch's commit and the companion's own work."""
        if self.companion is None:
            raise LedgerStoreError("ledger writer has no companion for a guarded append")
        result: Appended | Declined = await self._enqueue(
            _Pending(kind, payload, None, self._new_future(), ticket)
        )
        return result

    def append_guarded_blocking(
        self, kind: str, payload: Mapping[str, Any], ticket: Any
    ) -> Appended | Declined:
        """``append_guarded`` for a worker thread (never the event loop's): returns once the
        entry is durable, committing it, with the other threads' appends queued meanwhile,
        on this thread when no batch is being committed."""
        if self.companion is None:
            raise LedgerStoreError("ledger writer has no companion for a guarded append")
        if self._task is None:
            raise LedgerStoreError("ledger writer is not running")
        pending = _Pending(kind, payload, None, None, ticket)
        self._from_threads.append(pending)
        while pending.result is _UNSET:
            with self._commit_lock:
                if pending.result is _UNSET:  # nobody committed it while we waited
                    batch = [
                        self._from_threads.popleft()
                        for _ in range(min(self.max_batch, len(self._from_threads)))
                    ]
                    for item, outcome in zip(batch, self._commit_or_fail(batch), strict=True):
                        item.result = outcome
        if isinstance(pending.result, BaseException):
            raise pending.result
        return cast(Appended | Declined, pending.result)

    async def rotate(self, new_key: Ed25519PrivateKey) -> Appended:
        """Append a key-rotation entry signed by the current key and ``new_key``; every
        entry after it, and every checkpoint of a size above it, is signed by ``new_key``.
        Returns once the entry is durable (and the writer signs with the new key)."""
        result: Appended = await self._enqueue(
            _Pending(KEY_ROTATION, NewKey(new_key), (), self._new_future())
        )
        return result

    def _new_future(self) -> asyncio.Future[Any]:
        if self._task is None:
            raise LedgerStoreError("ledger writer is not running")
        return asyncio.get_running_loop().create_future()

    async def _enqueue(self, pending: _Pending) -> Any:
        assert pending.future is not None
        self._queue.put_nowait(pending)
        return await pending.future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                try:
                    results: list[Any] = await self._on_thread(self._commit_batch, batch)
                except LedgerStoreError as exc:
                    results = [exc] * len(batch)
                for pending, result in zip(batch, results, strict=True):
                    future = pending.future
                    assert future is not None  # appends from the loop have one
                    if future.done():  # the appender was cancelled
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _commit_batch(self, batch: list[_Pending]) -> list[Any]:
        """Writer thread: ``_commit`` under the commit lock."""
        with self._commit_lock:
            return self._commit_or_fail(batch)

    def _commit_or_fail(self, batch: list[_Pending]) -> list[Any]:
        """Holding the commit lock: ``_commit``; an unexpected error fails the whole batch."""
        try:
            return self._commit(batch)
        except Exception as exc:
            return [exc] * len(batch)

    def _admit(
        self, batch: list[_Pending]
    ) -> list[Mapping[str, Any] | NewKey | Declined | BaseException]:
        """Writer thread: each item's payload to append, or what answers it instead (the
        companion's verdict on a guarded append)."""
        payloads: list[Mapping[str, Any] | NewKey | Declined | BaseException] = [
            p.payload for p in batch
        ]
        guarded = [i for i, p in enumerate(batch) if p.ticket is not None]
        if not guarded:
            return payloads
        assert self.companion is not None
        try:
            verdicts = self.companion.before([batch[i].ticket for i in guarded])
        except Exception as exc:  # the companion's store failed: its appends fail, the others go on
            verdicts = [exc] * len(guarded)
        for i, verdict in zip(guarded, verdicts, strict=True):
            payloads[i] = (
                verdict
                if isinstance(verdict, Declined | BaseException)
                else {**cast(Mapping[str, Any], batch[i].payload), **verdict}
            )
        return payloads

    def _commit(self, batch: list[_Pending]) -> list[Any]:
        """Writer thread: sign, hash and commit a batch (with the companion's work around it);
        per-item results in order: Appended, Declined or an exception."""
        entries_rows: list[tuple[int, int, bytes]] = []
        node_rows: list[tuple[int, int, int, bytes]] = []
        key_rows: list[tuple[str, int, int]] = []
        change_rows: list[tuple[int, int, bytes, int, bytes | None]] = []
        results: list[Any] = []
        oid = self._origin_id
        origin = self.identity.origin
        tree = self._tree.copy()
        last_leaf, last_time = self._last_leaf, self._last_time
        identity, chain = self.identity, self.chain
        for pending, payload in zip(batch, self._admit(batch), strict=True):
            if isinstance(payload, Declined | BaseException):
                results.append(payload)
                continue
            now = max(int(time.time() * 1000), last_time)
            index = tree.size
            new_key: Ed25519PrivateKey | None = None
            is_change = isinstance(payload, NewKey) or changes_key_of(origin, pending.kind, payload)
            if (
                not is_change
                and identity.public_key.public_bytes_raw() != chain.current.public_bytes_raw()
            ):
                results.append(
                    LedgerStoreError(
                        "this gateway's key is not the key its log has in force (replaced?); nothing is signed with it"
                    )
                )
                continue
            try:
                if isinstance(payload, NewKey):
                    new_key = payload.private_key
                    payload = rotation_payload(
                        origin=origin, index=index, prev=last_leaf, time_ms=now, new_key=new_key
                    )
                entry, data = sign_entry(
                    origin=origin,
                    index=index,
                    prev=last_leaf,
                    time_ms=now,
                    kind=pending.kind,
                    payload=payload,
                    private_key=identity.private_key,
                )
                if is_change:  # checked as every verifier will check it
                    chain = check_change(
                        entry,
                        chain,
                        root=tree.root,
                        policy=self.policy,
                        signer_keys=self._signer_keys,
                    )
                    change = chain.change_at(index)
                    assert change is not None
                    if new_key is not None:  # a rotation: what follows is signed by the new key
                        identity = Identity(origin, new_key)
                    change_rows.append(_change_row(oid, change))
            except (ValueError, KeyChangeError) as exc:  # a bad payload fails its own appender only
                results.append(exc)
                continue
            leaf = merkle.leaf_hash(data)
            keys = lookup_keys(pending.kind, payload) if pending.keys is None else pending.keys
            entries_rows.append((oid, index, data))
            node_rows += [(oid, level, idx, h) for (level, idx), h in tree.append(leaf)]
            key_rows += [(k, oid, index) for k in keys]
            results.append(Appended(origin, index, leaf, now, data))
            last_leaf, last_time = leaf, now
        if not entries_rows:
            return results
        try:
            self._write(entries_rows, node_rows, key_rows, change_rows=change_rows)
        except (sqlite3.Error, OSError) as exc:
            log.error("ledger commit failed: %s", exc)
            self._load_state()
            error = LedgerStoreError(
                f"ledger write failed ({exc}); check disk space and {self.store.path}"
            )
            return [r if isinstance(r, Declined | BaseException) else error for r in results]
        self._tree, self._last_leaf, self._last_time = tree, last_leaf, last_time
        self.identity, self.chain = identity, chain
        self._tip = (tree.size, identity)
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, Appended):
                self.appended_kinds[pending.kind] += 1
        self._after(batch, results)
        return results

    def _after(self, batch: list[_Pending], results: list[Any]) -> None:
        """Writer thread, after the commit: the companion's work on the guarded appends made."""
        done = [
            (i, batch[i].ticket, r)
            for i, r in enumerate(results)
            if batch[i].ticket is not None and isinstance(r, Appended)
        ]
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
        size, identity = self._tip
        return size, await sign_checkpoint(self.store, identity, size)


class ReplicaError(LedgerFormatError, ValueError):
    """Entries offered for another origin's log were refused; nothing was stored."""


class ReplicaWriter(_ThreadWriter):
    """Appends other origins' entries to their replica logs, verified before anything is stored.

    Entries must extend the local copy towards a checkpoint signed by the origin: each entry
    is checked (canonical, in sequence, chained, signed by the origin's key in force at its
    index, a key change checked as such), and the extended tree must be the checkpoint's tree
    (same root) or, for a chunk that stops short of it, be shown a prefix of it by a
    consistency proof. So a replica is pulled in bounded chunks, and every stored prefix is
    committed to by a signed checkpoint. Any failure stores nothing.
    """

    def __init__(
        self,
        store: LedgerStore,
        keys_of: Callable[[Entry], Sequence[str]] | None = None,
        policy: WitnessPolicy | None = None,
    ) -> None:
        super().__init__(store, "replica-writer")
        self._keys_of = keys_of or (lambda entry: lookup_keys(entry.kind, entry.payload))
        self.policy = policy  # counts the signers of key-replacement statements

    async def start(self) -> None:
        await self._on_thread(self._connect_writer)

    async def stop(self) -> None:
        await self.close()

    async def append_verified(
        self,
        origin: str,
        entries: Sequence[bytes],
        checkpoint_note: bytes,
        consistency_proof: Sequence[bytes] | None = None,
        later_changes: Sequence[KeyChange] = (),
    ) -> int:
        """Store ``entries`` (the next ones of ``origin``'s log); returns the replica's new size.

        Entries that reach the size of ``checkpoint_note`` are stored with it when the tree's
        root is the checkpoint's. Entries that stop short of it are stored (without a
        checkpoint) when ``consistency_proof`` proves the extended tree, at its new size, a
        prefix of the checkpoint's tree (RFC 9162 consistency from the new size to the
        checkpoint's). The checkpoint must be signed by the key in force at its size: the
        chain as stored, extended by the key changes among ``entries`` and, beyond them,
        ``later_changes`` (already checked, from the origin's key-change entries a peer
        served). ReplicaError says why it refused; then nothing was stored."""
        info = await self.store.origin(origin)
        if info is None:
            raise ReplicaError(
                f"origin {origin!r} is not a known log; add its key before replicating it"
            )
        proof = None if consistency_proof is None else list(consistency_proof)
        return await self._on_thread(
            self._append, info, list(entries), checkpoint_note, proof, list(later_changes)
        )

    def _append(
        self,
        info: OriginInfo,
        entries: list[bytes],
        checkpoint_note: bytes,
        proof: list[bytes] | None,
        later_changes: list[KeyChange],
    ) -> int:
        try:
            note = parse_note(checkpoint_note)
            cp = parse_checkpoint(note.text)
        except (NoteError, CheckpointError) as exc:
            raise ReplicaError(f"checkpoint of {info.name} is malformed: {exc}") from None
        if cp.origin != info.name:
            raise ReplicaError(f"checkpoint is for {cp.origin!r}, not {info.name!r}")
        chain = self._chain(info.id, info.name, info.public_key)
        tree, last = self._frontier(info.id, info.name)
        end = tree.size + len(entries)
        if end > cp.size or (end < cp.size and (proof is None or not entries)):
            raise ReplicaError(
                f"{len(entries)} entries after our {tree.size} of {info.name} do not reach "
                f"its checkpoint size {cp.size}"
            )
        prev = merkle.leaf_hash(last) if last is not None else ZERO_HASH
        entries_rows, node_rows, key_rows, change_rows = [], [], [], []
        for data in entries:
            index = tree.size
            try:
                entry = decode_entry(data)
                if changes_key_of(info.name, entry.kind, entry.payload):
                    check_entry(data, origin=info.name, index=index, prev=prev, public_key=None)
                    chain = check_change(
                        entry,
                        chain,
                        root=tree.root,
                        policy=self.policy,
                        signer_keys=self._signer_keys,
                    )
                    change = chain.change_at(index)
                    assert change is not None
                    change_rows.append(_change_row(info.id, change))
                else:
                    key = chain.entry_key(index)
                    known = chain.change_at(index)
                    if known is not None and known.replaced:
                        raise EntryError(
                            f"entry {index} must be the key-replacement entry a replacement statement accepted "
                            "here names; it is not (signed by the replaced key?)"
                        )
                    check_entry(data, origin=info.name, index=index, prev=prev, public_key=key)
            except (EntryError, KeyChangeError) as exc:
                raise ReplicaError(f"{info.name} entry {index}: {exc}") from None
            prev = merkle.leaf_hash(data)
            entries_rows.append((info.id, index, data))
            node_rows += [(info.id, level, idx, h) for (level, idx), h in tree.append(prev)]
            key_rows += [(k, info.id, index) for k in self._keys_of(entry)]
        ahead = chain
        for change in later_changes:
            if change.index >= end and chain.change_at(change.index) is None:
                try:
                    ahead = ahead.with_change(change)
                except KeyChangeError as exc:
                    raise ReplicaError(f"key changes of {info.name} offered ahead: {exc}") from None
        if not ahead.signs_checkpoint(note, cp.size):
            raise ReplicaError(
                f"checkpoint of {info.name} is not signed by its key (in force at size {cp.size})"
            )
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
            self._write(entries_rows, node_rows, key_rows, checkpoint_row, change_rows)
        except sqlite3.IntegrityError:
            raise ReplicaError(
                f"entries of {info.name} were stored meanwhile; retry from the new size"
            ) from None
        except (sqlite3.Error, OSError) as exc:
            raise LedgerStoreError(
                f"ledger write failed ({exc}); check disk space and {self.store.path}"
            ) from None
        return end

    async def drop_from(self, origin: str, size: int) -> int:
        """Remove ``origin``'s entries from index ``size`` on, with their nodes, lookup keys,
        key changes and the checkpoints above ``size``: entries a replacement statement
        accepted for index ``size`` proves signed by the replaced key. Returns how many."""
        info = await self.store.origin(origin)
        if info is None:
            return 0
        return await self._on_thread(self._drop_from, info.id, size)

    def _drop_from(self, origin_id: int, size: int) -> int:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            dropped = db.execute(
                "DELETE FROM entries WHERE origin_id = ? AND idx >= ?", (origin_id, size)
            ).rowcount
            db.execute(
                "DELETE FROM nodes WHERE origin_id = ? AND ((idx + 1) << level) > ?",
                (origin_id, size),
            )
            db.execute("DELETE FROM entry_keys WHERE origin_id = ? AND idx >= ?", (origin_id, size))
            db.execute(
                "DELETE FROM checkpoints WHERE origin_id = ? AND size > ?", (origin_id, size)
            )
            db.execute(  # but the replacement accepted for index ``size`` itself
                "DELETE FROM key_changes WHERE origin_id = ? AND idx >= ? AND NOT (idx = ? AND statement IS NOT NULL)",
                (origin_id, size, size),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return dropped


async def sign_checkpoint(store: LedgerStore, identity: Identity, size: int) -> bytes:
    """Sign a C2SP checkpoint of ``identity``'s log at ``size`` and store it; returns the note."""
    root = await store.root(identity.origin, size)
    text = format_checkpoint(Checkpoint(identity.origin, size, root))
    sig = sign_note_text(text, identity.origin, identity.private_key)
    note = format_note(Note(text, (sig,)))
    await store.store_checkpoint(identity.origin, size, note)
    return note
