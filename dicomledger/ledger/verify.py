"""Offline re-check of a whole ledger database, read-only; names the first bad place.

For every origin (or one): every entry decodes canonically, sits at its index (no gap),
names the origin, cites the previous entry's hash and is authenticated by the origin's key;
every stored Merkle node (leaf hashes included) equals the one recomputed from the entries,
and no extra node exists; every stored checkpoint is signed by the origin, names its origin
and size, and its root matches the entries; every cosignature on it by a known witness key
verifies; with a witness policy, the newest checkpoint meets the quorum.

Keys: an auditor passes a ``Trust`` (trust file): each origin's key must be in it and equal
the one stored in the database; witnesses are its witness keys. ``dicomledger verify
--config`` passes the gateway's own key instead (``expected_keys``); other origins are then
checked with their stored keys, which also serve as witness keys.

Authentication and speed (docs/ledger-formats.md, "What a checkpoint pins"): entries up to
the newest checkpoint whose origin signature verifies are authenticated by that checkpoint,
whose root is recomputed from their bytes, so their own Ed25519 signatures are not checked
again; entries after it are. If anything at all is wrong, the origin is checked again with
every entry's signature, so the first bad place is named exactly as a full check names it.
Work runs in a process pool, one aligned chunk of 2**CHUNK_LEVEL entries per task (entries
and the Merkle nodes inside the chunk), because decoding JSON and hashing hold the GIL.

Reads happen in one read transaction (one snapshot) plus the workers' reads of rows below
that snapshot's size, which an append-only writer never changes: it works on the live file
of a running gateway and never writes (the database is opened with ``mode=ro``).
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dicomledger.common.errors import StorageError
from dicomledger.ledger import merkle
from dicomledger.ledger.checkpoint import CheckpointError, parse_checkpoint
from dicomledger.ledger.entries import (
    KEY_ROTATION,
    ZERO_HASH,
    EntryError,
    check_entry,
    decode_entry,
    verify_entry_signature,
)
from dicomledger.ledger.keychain import (
    KeyChain,
    KeyChange,
    KeyChangeError,
    chain_from_entries,
    changes_key_of,
    check_change,
)
from dicomledger.ledger.note import NoteError, key_id, parse_note, verify_note_signature
from dicomledger.ledger.policy import CosignatureError, WitnessPolicy, verified_cosigners
from dicomledger.ledger.trust import Trust

CHUNK_LEVEL = 14
CHUNK = 1 << CHUNK_LEVEL  # entries per task; a whole subtree, so its nodes are checked in it
CHECKPOINT_BATCH = 500  # checkpoints per task
MAX_LEVEL = 64  # sizes stay below 2**63

Progress = Callable[[int, int], None]  # (entries checked so far, entries to check)


@dataclass(frozen=True)
class Problem:
    origin: str
    where: str  # "entry 41", "node (3, 5)", "checkpoint at size 200", "origin key"
    what: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.where}: {self.what}"


@dataclass(frozen=True)
class OriginReport:
    origin: str
    size: int
    checkpoints: int
    newest_checkpoint: int = 0  # size of the newest checkpoint (0: none)
    witnesses: tuple[str, ...] = ()  # known witnesses that cosigned the newest checkpoint
    quorum: str | None = None  # the policy's quorum, met by the newest checkpoint


@dataclass(frozen=True)
class VerifyReport:
    origins: tuple[OriginReport, ...]
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def entries(self) -> int:
        return sum(o.size for o in self.origins)


class UnreadableCopy(StorageError, sqlite3.OperationalError):
    """A WAL database in a folder SQLite cannot write its -shm index to."""


def _connect(path: Path) -> sqlite3.Connection:
    """Read-only: never writes the database (SQLite may add empty -wal/-shm files beside it);
    WAL readers do not block the gateway's writer."""
    if not path.exists():
        raise FileNotFoundError(f"ledger database {path} does not exist")
    uri = f"{path.absolute().as_uri()}?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return db
    except sqlite3.OperationalError as exc:
        db.close()
        if "readonly" not in str(exc) and "unable to open" not in str(exc):
            raise
        # A copy on read-only media: SQLite cannot create the -wal/-shm files a WAL
        # database needs. With no -wal file beside it the file alone is the whole database
        # (and nothing is writing it: a running writer keeps its -wal file), so it can be
        # read as immutable; a -wal file would be ignored that way, so that case is refused.
        wal = path.with_name(path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise UnreadableCopy(
                f"{exc}: the folder is not writable and {wal.name} holds part of the database; "
                "copy both files to a writable folder"
            ) from None
        return sqlite3.connect(f"{uri}&immutable=1", uri=True)


def _blob(value: object) -> bytes | None:
    """A BLOB column's bytes; None for anything else a tampered database may hold there."""
    return bytes(value) if isinstance(value, bytes | memoryview) else None


# -- worker tasks (run in the process pool; arguments and results are plain data) ----------


@dataclass(frozen=True)
class _ChunkResult:
    entry_problem: tuple[int, str] | None  # (index, what)
    node_problem: tuple[int, int, str] | None  # (level, index, what), the lowest
    root: bytes | None  # hash of the chunk's subtree if the chunk is whole
    checked: int


ChangeData = tuple[
    tuple[int, bytes, bool], ...
]  # key changes as plain data: (index, key, replaced)


def _chain(origin: str, first: bytes, changes: ChangeData) -> KeyChain:
    return KeyChain(
        origin,
        Ed25519PublicKey.from_public_bytes(first),
        tuple(
            KeyChange(idx, Ed25519PublicKey.from_public_bytes(key), replaced)
            for idx, key, replaced in changes
        ),
    )


def _check_chunk(
    path: str,
    origin_id: int,
    origin: str,
    key: bytes,
    start: int,
    end: int,
    sign_from: int,
    changes: ChangeData = (),
) -> _ChunkResult:
    """Entries [start, end) of one origin (start a multiple of CHUNK) and every Merkle node
    inside that range; entry signatures only from index ``sign_from`` on, each with the key
    ``changes`` (the database's key-change rows, checked by the main process) put in force
    there. Key-change entries are reported, not checked here (the main process checks them)."""
    chain = _chain(origin, key, changes)
    hinted = {idx for idx, _, _ in changes}
    db = _connect(Path(path))
    try:
        prev = ZERO_HASH
        if start > 0:
            row = db.execute(
                "SELECT data FROM entries WHERE origin_id = ? AND idx = ?", (origin_id, start - 1)
            ).fetchone()
            before = _blob(row[0]) if row else None
            prev = merkle.leaf_hash(before) if before is not None else ZERO_HASH
        leaves: list[bytes] = []
        entry_problem = None
        for idx, data in db.execute(
            "SELECT idx, data FROM entries WHERE origin_id = ? AND idx >= ? AND idx < ? ORDER BY idx",
            (origin_id, start, end),
        ):
            expected = start + len(leaves)
            if idx != expected:
                entry_problem = (expected, "entry is missing (the log has a gap)")
                break
            data = _blob(data)
            if data is None:
                entry_problem = (idx, "entry is not stored as bytes")
                break
            try:
                entry = check_entry(data, origin=origin, index=idx, prev=prev, public_key=None)
                if changes_key_of(origin, entry.kind, entry.payload) != (idx in hinted):
                    what = (
                        "is a key change that the database's key_changes table does not list"
                        if idx not in hinted
                        else "is listed in the database's key_changes table but is no key change"
                    )
                    raise EntryError(f"entry {what}")
                if idx >= sign_from and idx not in hinted:
                    verify_entry_signature(entry, chain.entry_key(idx), canonical=data)
            except EntryError as exc:
                entry_problem = (idx, str(exc))
                break
            prev = merkle.leaf_hash(data)
            leaves.append(prev)
        if entry_problem is None and start + len(leaves) != end:
            entry_problem = (start + len(leaves), "entry is missing (the log has a gap)")
        if entry_problem is not None:
            return _ChunkResult(entry_problem, None, None, end - start)
        return _check_chunk_nodes(db, origin_id, start, end, leaves)
    finally:
        db.close()


def _check_chunk_nodes(
    db: sqlite3.Connection, origin_id: int, start: int, end: int, leaves: list[bytes]
) -> _ChunkResult:
    level_hashes = leaves
    level = 0
    while level_hashes:
        first = start >> level
        stored = db.execute(
            "SELECT idx, hash FROM nodes WHERE origin_id = ? AND level = ? AND idx >= ? AND idx < ? ORDER BY idx",
            (origin_id, level, first, first + len(level_hashes)),
        ).fetchall()
        problem = _compare_level(level, first, level_hashes, stored)
        if problem is not None:
            return _ChunkResult(None, problem, None, end - start)
        if level == CHUNK_LEVEL:
            break
        level_hashes = [
            merkle.node_hash(level_hashes[i], level_hashes[i + 1])
            for i in range(0, len(level_hashes) - 1, 2)
        ]
        level += 1
    whole = end - start == CHUNK
    return _ChunkResult(None, None, level_hashes[0] if whole else None, end - start)


def _compare_level(
    level: int, first: int, computed: list[bytes], stored: list[tuple[int, bytes]]
) -> tuple[int, int, str] | None:
    """The first difference between the recomputed nodes first.. of a level and the stored
    rows of that index range (ordered by index)."""
    position = 0
    for idx, h in stored:
        expected = first + position
        if idx != expected:
            return level, expected, "stored Merkle node is missing"
        if _blob(h) != computed[position]:
            if level == 0:
                return level, idx, "stored leaf hash does not match the entry"
            return level, idx, "stored Merkle node hash is wrong"
        position += 1
    if position != len(computed):
        return level, first + position, "stored Merkle node is missing"
    return None


@dataclass(frozen=True)
class _CheckedCheckpoint:
    size: int
    root: bytes
    cosigned: dict[str, int]  # witness key name -> newest cosignature timestamp


def _check_checkpoints(
    origin: str,
    key: bytes,
    witness_keys: dict[str, list[bytes]],
    batch: list[tuple[int, bytes | None]],
    changes: ChangeData = (),
) -> tuple[list[_CheckedCheckpoint], tuple[int, str] | None]:
    """Signatures of a batch of one origin's checkpoints (ascending size), each by the key
    in force at its size: the checked ones and the first problem, as (size, what)."""
    chain = _chain(origin, key, changes)
    witnesses = {
        name: [Ed25519PublicKey.from_public_bytes(k) for k in keys]
        for name, keys in witness_keys.items()
    }
    checked: list[_CheckedCheckpoint] = []
    for size, note_bytes in batch:
        if note_bytes is None:
            return checked, (size, "malformed: the note is not stored as bytes")
        try:
            note = parse_note(note_bytes)
            cp = parse_checkpoint(note.text)
        except (NoteError, CheckpointError) as exc:
            return checked, (size, f"malformed: {exc}")
        public_key = chain.key_for_size(size)
        if not verify_note_signature(note, origin, public_key):
            return checked, (size, "signature by the origin's key does not verify")
        if cp.origin != origin or cp.size != size:
            return checked, (
                size,
                f"names {cp.origin!r} size {cp.size}, stored as {origin!r} size {size}",
            )
        try:
            cosigned, _ = verified_cosigners(note, (origin, key_id(origin, public_key)), witnesses)
        except CosignatureError as exc:
            return checked, (size, str(exc))
        checked.append(_CheckedCheckpoint(size, cp.root_hash, cosigned))
    return checked, None


# -- the main process -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Origin:
    id: int
    name: str
    key: bytes  # its first key: entries and checkpoints verify with it until a key change
    size: int
    checkpoints: list[tuple[int, bytes | None]]  # None: not a BLOB
    changes: ChangeData = ()  # the key_changes rows below ``size`` (checked in ``_check_changes``)


class _Run:
    def __init__(
        self,
        db: sqlite3.Connection,
        path: Path,
        pool: ProcessPoolExecutor,
        witness_keys: dict[str, list[bytes]],
        policy: WitnessPolicy | None,
        progress: Progress | None,
        total: int,
        key_policy: WitnessPolicy | None = None,
        signer_keys: dict[str, list[Ed25519PublicKey]] | None = None,
        trusted_chains: dict[str, KeyChain] | None = None,
    ) -> None:
        self.db, self.path, self.pool = db, path, pool
        self.witness_keys, self.policy = witness_keys, policy
        self.progress, self.total, self.done = progress, total, 0
        self.key_policy = key_policy  # counts the signers of key-replacement statements
        self.signer_keys = signer_keys or {}
        self.trusted_chains = trusted_chains or {}  # from the trust file's key-change lines

    def _advance(self, entries: int, extra_total: int = 0) -> None:
        self.done += entries
        self.total += extra_total
        if self.progress is not None:
            self.progress(self.done, self.total)

    def origin(
        self, o: _Origin, every_signature: bool
    ) -> tuple[Problem | None, OriginReport | None]:
        covered = 0 if every_signature else _newest_signed_checkpoint(o)
        problem, report = self._check(o, sign_from=covered)
        if problem is not None and report is None and covered > 0:
            # Something stored is wrong: name the first bad place as a check of every
            # entry's own signature names it.
            self._advance(0, o.size)
            problem, report = self._check(o, sign_from=0)
        return problem, report

    def _check(self, o: _Origin, sign_from: int) -> tuple[Problem | None, OriginReport | None]:
        """The first problem, with no report if the stored data is wrong, or with the
        origin's report if only the witness policy is not met."""
        # 1. entries and the nodes inside each chunk, in parallel
        stray = self.db.execute(
            "SELECT idx FROM entries WHERE origin_id = ? AND idx < 0 LIMIT 1", (o.id,)
        ).fetchone()
        if stray is not None:
            return Problem(o.name, f"entry {stray[0]}", "unexpected entry (negative index)"), None
        futures: dict[Future[_ChunkResult], int] = {
            self.pool.submit(
                _check_chunk,
                str(self.path),
                o.id,
                o.name,
                o.key,
                s,
                min(s + CHUNK, o.size),
                sign_from,
                o.changes,
            ): s
            for s in range(0, o.size, CHUNK)
        }
        results: dict[int, _ChunkResult] = {}
        for future in as_completed(futures):
            result = future.result()
            results[futures[future]] = result
            self._advance(result.checked)
        chunks = [results[s] for s in sorted(results)]
        entry_problems = [c.entry_problem for c in chunks if c.entry_problem is not None]
        if entry_problems:
            idx, what = min(entry_problems)
            return Problem(o.name, f"entry {idx}", what), None

        # 2. nodes above the chunks, and stray nodes
        node_problems = [c.node_problem for c in chunks if c.node_problem is not None]
        upper = self._upper_levels(o, [c.root for c in chunks if c.root is not None], node_problems)
        node_problems += self._stray_nodes(o)
        if node_problems:
            level, idx, what = min(node_problems)
            where = (
                f"entry {idx} leaf hash"
                if what.startswith("stored leaf hash")
                else f"node ({level}, {idx})"
            )
            return Problem(o.name, where, what), None

        # 2b. the key changes the workers followed: each one checked from the first key
        problem = self._check_changes(o, upper)
        if problem is not None:
            return problem, None

        # 3. checkpoints: signatures and cosignatures in parallel, roots here
        batches = [
            o.checkpoints[i : i + CHECKPOINT_BATCH]
            for i in range(0, len(o.checkpoints), CHECKPOINT_BATCH)
        ]
        cp_futures = [
            self.pool.submit(_check_checkpoints, o.name, o.key, self.witness_keys, b, o.changes)
            for b in batches
        ]
        newest: _CheckedCheckpoint | None = None
        for cp_future in cp_futures:
            checked, failure = cp_future.result()
            for cp in checked:
                where = f"checkpoint at size {cp.size}"
                if cp.size > o.size:
                    return Problem(
                        o.name, where, f"covers {cp.size} entries but the log holds {o.size}"
                    ), None
                if self._root(o, cp.size, upper) != cp.root:
                    return Problem(
                        o.name, where, "root hash does not match the stored entries"
                    ), None
                newest = cp
            if failure is not None:
                return Problem(o.name, f"checkpoint at size {failure[0]}", failure[1]), None

        report = OriginReport(
            o.name,
            o.size,
            len(o.checkpoints),
            newest_checkpoint=0 if newest is None else newest.size,
            witnesses=() if newest is None else tuple(sorted(newest.cosigned)),
        )
        # 4. the witness policy, on the newest checkpoint: it pins every entry it covers
        if self.policy is not None:
            if newest is None:
                if o.size:
                    what = "no checkpoint covers the log, so no witness has cosigned it"
                    return Problem(o.name, "checkpoints", what), report
            else:
                shortfall = self.policy.shortfall(newest.cosigned)
                if shortfall is not None:
                    where = f"checkpoint at size {newest.size}"
                    return Problem(
                        o.name, where, f"newest checkpoint is below the witness quorum: {shortfall}"
                    ), report
            report = replace(report, quorum=self.policy.describe())
        return None, report

    def _check_changes(self, o: _Origin, upper: dict[int, list[bytes]]) -> Problem | None:
        """Every key-change entry of the log (the workers found exactly those the
        key_changes rows list), in order from the first key: a rotation signed by the key
        before it and by the new key, a replacement meeting the witness policy's quorum and
        pinning the root of the entries before it. The keys must be the rows' (which the
        workers used), and the trust file's key-change lines must be the log's."""
        chain = _chain(o.name, o.key, ())
        for idx, key, replaced in o.changes:
            (data,) = self.db.execute(
                "SELECT data FROM entries WHERE origin_id = ? AND idx = ?", (o.id, idx)
            ).fetchone()
            try:
                entry = decode_entry(bytes(data))
                chain = check_change(
                    entry,
                    chain,
                    root=partial(self._root, o, idx, upper),
                    policy=self.key_policy,
                    signer_keys=lambda name: self.signer_keys.get(name, []),
                )
            except (EntryError, KeyChangeError) as exc:
                return Problem(o.name, f"entry {idx}", str(exc))
            change = chain.change_at(idx)
            if (
                change is None
                or change.key.public_bytes_raw() != key
                or change.replaced != replaced
            ):
                return Problem(
                    o.name,
                    f"entry {idx}",
                    "the database's key_changes row does not match the key change",
                )
        trusted = self.trusted_chains.get(o.name)
        for change in trusted.changes if trusted is not None else ():
            if change.index >= o.size:
                continue
            held = chain.change_at(change.index)
            if held is None or held.key.public_bytes_raw() != change.key.public_bytes_raw():
                return Problem(
                    o.name,
                    f"entry {change.index}",
                    "the trust file's key-change line is not this log's entry",
                )
        return None

    def _upper_levels(
        self, o: _Origin, chunk_roots: list[bytes], problems: list[tuple[int, int, str]]
    ) -> dict[int, list[bytes]]:
        """Levels CHUNK_LEVEL.. recomputed from the whole chunks' roots; the first difference
        with the stored nodes of each level above CHUNK_LEVEL goes to ``problems``."""
        levels = {CHUNK_LEVEL: chunk_roots}
        level, hashes = CHUNK_LEVEL, chunk_roots
        while len(hashes) > 1:
            hashes = [
                merkle.node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes) - 1, 2)
            ]
            level += 1
            levels[level] = hashes
            stored = self.db.execute(
                "SELECT idx, hash FROM nodes WHERE origin_id = ? AND level = ? AND idx < ? ORDER BY idx",
                (o.id, level, len(hashes)),
            ).fetchall()
            problem = _compare_level(level, 0, hashes, stored)
            if problem is not None:
                problems.append(problem)
        return levels

    def _stray_nodes(self, o: _Origin) -> list[tuple[int, int, str]]:
        """Stored nodes that no complete subtree of the log's size explains."""
        found = []
        for level in range(MAX_LEVEL):
            for sql in ("idx >= ? ORDER BY idx", "idx < 0 AND ? IS NOT NULL"):
                row = self.db.execute(
                    f"SELECT idx FROM nodes WHERE origin_id = ? AND level = ? AND {sql} LIMIT 1",
                    (o.id, level, o.size >> level),
                ).fetchone()
                if row is not None:
                    found.append((level, row[0], "unexpected stored Merkle node"))
        row = self.db.execute(
            "SELECT level, idx FROM nodes WHERE origin_id = ? AND (level < 0 OR level >= ?) LIMIT 1",
            (o.id, MAX_LEVEL),
        ).fetchone()
        if row is not None:
            found.append((row[0], row[1], "unexpected stored Merkle node"))
        return found

    def _root(self, o: _Origin, size: int, upper: dict[int, list[bytes]]) -> bytes:
        if size == 0:
            return merkle.root_of_leaf_hashes([])
        hashes = []
        for level, idx in merkle.root_plan(size):
            if level >= CHUNK_LEVEL:
                hashes.append(upper[level][idx])
            else:  # a stored node inside a chunk, which its worker found equal to the recomputed one
                (h,) = self.db.execute(
                    "SELECT hash FROM nodes WHERE origin_id = ? AND level = ? AND idx = ?",
                    (o.id, level, idx),
                ).fetchone()
                hashes.append(h)
        return merkle.fold_range(hashes)


def _newest_signed_checkpoint(o: _Origin) -> int:
    """Size of the newest checkpoint that is well-formed and signed by the origin's key: the
    entries below it need no signature check of their own if its root matches them."""
    chain = _chain(
        o.name, o.key, o.changes
    )  # as the rows say: checked later, and if wrong all is re-checked
    for size, note_bytes in reversed(o.checkpoints):
        if size > o.size or note_bytes is None:
            continue
        try:
            note = parse_note(note_bytes)
            cp = parse_checkpoint(note.text)
        except (NoteError, CheckpointError):
            continue
        if cp.origin == o.name and cp.size == size and chain.signs_checkpoint(note, size):
            return size
    return 0


def verify_database(
    path: Path,
    expected_keys: Mapping[str, Ed25519PublicKey] | None = None,
    workers: int | None = None,
    *,
    trust: Trust | None = None,
    origin: str | None = None,
    progress: Progress | None = None,
    every_signature: bool = False,
    current_keys: Mapping[str, Ed25519PublicKey] | None = None,
    key_policy: WitnessPolicy | None = None,
) -> VerifyReport:
    """Check everything (or the log of ``origin`` only).

    ``trust``: the auditor's trust file: every origin checked needs a key there, equal to the
    stored first key; its witness keys, key-change lines and policy apply. Otherwise
    ``expected_keys`` pins some origins' first keys and the stored keys serve for the rest;
    ``current_keys`` names keys that must be in force at an origin's tip (this gateway's key
    file, which a rotation replaces). Key-replacement statements are counted with the trust
    file's policy, or ``key_policy``. ``every_signature``: also check the own signature of
    entries a checkpoint authenticates.
    """
    db = _connect(path)
    reports: list[OriginReport] = []
    key_policy = trust.policy if trust is not None and trust.policy is not None else key_policy
    try:
        db.execute("BEGIN")  # one read snapshot for everything this process reads
        every = db.execute("SELECT id, name, public_key FROM origins ORDER BY id").fetchall()
        rows = [r for r in every if origin is None or r[1] == origin]
        if origin is not None and not rows:
            return VerifyReport(
                (), Problem(origin, "origin", "the ledger holds no log for this origin")
            )
        stored = {name: _blob(key) for _, name, key in every}
        pinned = {
            n: k.public_bytes_raw()
            for n, k in (trust.logs if trust else expected_keys or {}).items()
        }
        try:
            trusted_chains = trust.chains if trust is not None else {}
        except NoteError as exc:
            return VerifyReport((), Problem("trust file", "key-change line", str(exc)))
        changes = {name: _change_rows(db, origin_id) for origin_id, name, _ in every}
        chains, replaced = _later_keys(db, every, stored, changes, key_policy)
        if trust is not None:
            # a witness's keys: those the trust file gives, and the later keys its own log (in
            # this database, from the first key the trust file pins) changed to, but not those
            # a replacement took over from
            witness_keys = {
                n: [k.public_bytes_raw() for k in keys] for n, keys in trust.witness_keys().items()
            }
            for name, keys in witness_keys.items():
                if name in chains and pinned.get(name) == stored.get(name):
                    keys[:] = [k for k in keys if k not in replaced[name]]
                    keys += [k for k in chains[name] if k not in keys]
        else:
            witness_keys = {
                name: [
                    k
                    for k in dict.fromkeys([stored_key, *chains.get(name, [])])
                    if k not in replaced.get(name, [])
                ]
                for name, stored_key in stored.items()
                if stored_key is not None and len(stored_key) == 32
            }
        origins = []
        for origin_id, name, _ in rows:
            want = pinned.get(name)
            if trust is not None and want is None:
                what = "the trust file has no key for this origin (add its vkey, or check others with --origin)"
                return VerifyReport((), Problem(name, "origin key", what))
            key = stored[name]
            if key is None or len(key) != 32:
                return VerifyReport(
                    (), Problem(name, "origin key", "stored public key is not an Ed25519 key")
                )
            if want is not None and want != key:
                what = "trusted" if trust is not None else "configured"
                return VerifyReport(
                    (),
                    Problem(name, "origin key", f"stored public key differs from the {what} key"),
                )
            size_row = db.execute(
                "SELECT MAX(idx) FROM entries WHERE origin_id = ?", (origin_id,)
            ).fetchone()
            checkpoints = [
                (size, _blob(note))
                for size, note in db.execute(
                    "SELECT size, note FROM checkpoints WHERE origin_id = ? ORDER BY size",
                    (origin_id,),
                )
            ]
            size = 0 if size_row[0] is None else size_row[0] + 1
            held = tuple(
                c for c in changes[name] if c[0] < size
            )  # rows at or above: accepted ahead
            origins.append(_Origin(origin_id, name, key, size, checkpoints, held))
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            run = _Run(
                db,
                path,
                pool,
                witness_keys,
                trust.policy if trust else None,
                progress,
                sum(o.size for o in origins),
                key_policy=key_policy,
                signer_keys={
                    n: [Ed25519PublicKey.from_public_bytes(k) for k in keys]
                    for n, keys in chains.items()
                },
                trusted_chains=trusted_chains,
            )
            for o in origins:
                problem, report = run.origin(o, every_signature)
                if report is not None:
                    reports.append(report)
                if problem is None and (current_keys or {}).get(o.name) is not None:
                    problem = _current_key_problem(o, current_keys[o.name])  # type: ignore[index]
                if problem is not None:
                    return VerifyReport(tuple(reports), problem)
    finally:
        db.close()
    return VerifyReport(tuple(reports), None)


def _change_rows(db: sqlite3.Connection, origin_id: int) -> ChangeData:
    """An origin's key_changes rows as plain data; none in a database from before them."""
    try:
        rows = db.execute(
            "SELECT idx, public_key, replaced FROM key_changes WHERE origin_id = ? ORDER BY idx",
            (origin_id,),
        ).fetchall()
    except sqlite3.OperationalError:  # no such table
        return ()
    return tuple(
        (idx, bytes(key), bool(replaced))
        for idx, key, replaced in rows
        if isinstance(key, bytes) and len(key) == 32
    )


def _later_keys(
    db: sqlite3.Connection,
    origins: list[tuple[int, str, object]],
    stored: Mapping[str, bytes | None],
    changes: Mapping[str, ChangeData],
    policy: WitnessPolicy | None,
) -> tuple[dict[str, list[bytes]], dict[str, list[bytes]]]:
    """The keys each origin's log changed to that still count as a witness's or a statement
    signer's (replaced ones left out): its key-change entries checked from its first key, the
    root a replacement pins taken as given (the origin's own check compares it with its tree).
    An origin whose changes do not check gets none here (its own check names the problem).
    Also returns, per origin, the keys a replacement took over from."""
    found: dict[str, list[bytes]] = {}
    replaced: dict[str, list[bytes]] = {}
    for origin_id, name, _ in origins:
        first = stored.get(name)
        if first is None or len(first) != 32 or not changes.get(name):
            continue
        entries = []
        for idx, _, _ in changes[name]:
            row = db.execute(
                "SELECT data FROM entries WHERE origin_id = ? AND idx = ?", (origin_id, idx)
            ).fetchone()
            if row is not None and (data := _blob(row[0])) is not None:
                try:
                    entries.append(decode_entry(data))
                except EntryError:
                    break
        rotations = [e for e in entries if e.kind == KEY_ROTATION]
        try:
            chain = chain_from_entries(
                name,
                Ed25519PublicKey.from_public_bytes(first),
                entries if policy else rotations,
                policy=policy,
            )
        except KeyChangeError:
            continue
        found[name] = [k.public_bytes_raw() for k in chain.trusted_keys()]
        replaced[name] = [
            k.public_bytes_raw() for k in chain.keys() if k.public_bytes_raw() not in found[name]
        ]
    return found, replaced


def _current_key_problem(o: _Origin, want: Ed25519PublicKey) -> Problem | None:
    current = _chain(o.name, o.key, o.changes).current
    if current.public_bytes_raw() == want.public_bytes_raw():
        return None
    return Problem(
        o.name,
        "origin key",
        "the configured key file's key is not the key this log has in force "
        f"(at its {o.size} entries, after {len(o.changes)} key change(s))",
    )


# -- presentation -----------------------------------------------------------------------


class ProgressLine:
    """Progress of a verify on ``stream``: on a terminal, entries/s and the time left,
    redrawn at most twice a second; otherwise nothing until ``finish`` prints one line."""

    def __init__(self, stream: TextIO = sys.stderr, interactive: bool | None = None) -> None:
        self.stream = stream
        self.interactive = stream.isatty() if interactive is None else interactive
        self.start = time.monotonic()
        self._drawn = 0.0
        self.done = self.total = 0

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        now = time.monotonic()
        if not self.interactive or now - self._drawn < 0.5:
            return
        self._drawn = now
        rate = done / max(now - self.start, 1e-9)
        left = (total - done) / rate if rate > 0 else 0.0
        self.stream.write(
            f"\rverifying: {done:,} of {total:,} entries, {rate:,.0f} entries/s, {left:.0f} s left  "
        )
        self.stream.flush()

    def finish(self, report: VerifyReport) -> None:
        seconds = time.monotonic() - self.start
        if self.interactive:
            self.stream.write("\r\033[K")
        entries = report.entries
        self.stream.write(
            f"verified {entries:,} entries of {len(report.origins)} log(s) in {seconds:.1f} s "
            f"({entries / max(seconds, 1e-9):,.0f} entries/s)\n"
        )
        self.stream.flush()


def report_lines(report: VerifyReport) -> list[str]:
    """What `dicomledger verify` prints on stdout."""
    lines = []
    for o in report.origins:
        line = f"{o.origin}: {o.size} entries, {o.checkpoints} checkpoints"
        if o.witnesses:
            line += f"; newest (size {o.newest_checkpoint}) cosigned by {', '.join(o.witnesses)}"
        if o.quorum is not None:
            line += f"; witness quorum met ({o.quorum})"
        if o.newest_checkpoint < o.size:
            line += f"; {o.size - o.newest_checkpoint} newest entries not yet under a checkpoint"
        lines.append(line)
    if report.problem is not None:
        lines.append(f"FAILED: {report.problem}")
    else:
        lines.append(
            "OK: every entry, chain link, Merkle node, checkpoint and known cosignature verifies"
        )
    return lines


def verify_and_report(
    path: Path,
    *,
    trust: Trust | None = None,
    expected_keys: Mapping[str, Ed25519PublicKey] | None = None,
    origin: str | None = None,
    every_signature: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
    current_keys: Mapping[str, Ed25519PublicKey] | None = None,
    key_policy: WitnessPolicy | None = None,
) -> bool:
    """`dicomledger verify`: progress on ``err``, the report on ``out``; True if all is well.
    sqlite3.Error if the file is not a ledger database or cannot be read."""
    out, err = out or sys.stdout, err or sys.stderr
    progress = ProgressLine(err)
    report = verify_database(
        path,
        expected_keys,
        trust=trust,
        origin=origin,
        progress=progress,
        every_signature=every_signature,
        current_keys=current_keys,
        key_policy=key_policy,
    )
    progress.finish(report)
    for line in report_lines(report):
        print(line, file=out)
    return report.ok
