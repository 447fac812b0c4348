"""Offline re-check of a whole ledger database; names the first bad place.

For every origin: every entry decodes canonically, sits at its index, cites the previous
entry's hash and carries a valid signature by the origin's key; every stored Merkle node
(leaf hashes included) equals the one recomputed from the entries, and no extra node exists;
every stored checkpoint is signed by the origin and its root matches the entries.

Signature checks (the slow part: ~0.1 ms each) run in a process pool, one chunk of the
log per worker; everything else is sequential.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dicomledger.ledger import merkle
from dicomledger.ledger.checkpoint import CheckpointError, parse_checkpoint
from dicomledger.ledger.entries import ZERO_HASH, EntryError, check_entry
from dicomledger.ledger.note import NoteError, parse_note, verify_note_signature

CHUNK = 20_000


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


@dataclass(frozen=True)
class VerifyReport:
    origins: tuple[OriginReport, ...]
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _connect(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise FileNotFoundError(f"ledger database {path} does not exist")
    # Read-only; works beside a running gateway (WAL readers do not block the writer).
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _check_chunk(
    path: str, origin_id: int, origin: str, key: bytes, start: int, end: int
) -> tuple[int, str] | None:
    """Worker: check entries [start, end) of one origin; first (index, problem) or None."""
    public_key = Ed25519PublicKey.from_public_bytes(key)
    db = _connect(Path(path))
    try:
        prev = ZERO_HASH
        if start > 0:
            row = db.execute(
                "SELECT data FROM entries WHERE origin_id = ? AND idx = ?", (origin_id, start - 1)
            ).fetchone()
            prev = merkle.leaf_hash(bytes(row[0])) if row else ZERO_HASH
        expected = start
        for idx, data in db.execute(
            "SELECT idx, data FROM entries WHERE origin_id = ? AND idx >= ? AND idx < ? ORDER BY idx",
            (origin_id, start, end),
        ):
            if idx != expected:
                return expected, "entry is missing (the log has a gap)"
            data = bytes(data)
            try:
                check_entry(data, origin=origin, index=idx, prev=prev, public_key=public_key)
            except EntryError as exc:
                return idx, str(exc)
            prev = merkle.leaf_hash(data)
            expected += 1
        if expected != end:
            return expected, "entry is missing (the log has a gap)"
        return None
    finally:
        db.close()


def verify_database(
    path: Path, expected_keys: dict[str, Ed25519PublicKey] | None = None, workers: int | None = None
) -> VerifyReport:
    """Check everything; ``expected_keys`` pins origins' keys (e.g. this gateway's own)."""
    db = _connect(path)
    reports: list[OriginReport] = []
    try:
        origins = db.execute("SELECT id, name, public_key FROM origins ORDER BY id").fetchall()
        workers = workers or os.cpu_count() or 1
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for origin_id, name, key in origins:
                key = bytes(key)
                pinned = (expected_keys or {}).get(name)
                if pinned is not None and pinned.public_bytes_raw() != key:
                    return VerifyReport(
                        tuple(reports),
                        Problem(name, "origin key", "stored public key differs from the configured key"),
                    )
                problem, report = _verify_origin(db, pool, path, origin_id, name, key)
                if report is not None:
                    reports.append(report)
                if problem is not None:
                    return VerifyReport(tuple(reports), problem)
    finally:
        db.close()
    return VerifyReport(tuple(reports), None)


def _verify_origin(
    db: sqlite3.Connection,
    pool: ProcessPoolExecutor,
    path: Path,
    origin_id: int,
    name: str,
    key: bytes,
) -> tuple[Problem | None, OriginReport | None]:
    row = db.execute("SELECT MAX(idx) FROM entries WHERE origin_id = ?", (origin_id,)).fetchone()
    size = 0 if row[0] is None else row[0] + 1

    # 1. entries: canonical, in sequence, chained, signed (parallel chunks)
    chunks = [(s, min(s + CHUNK, size)) for s in range(0, size, CHUNK)]
    futures = [pool.submit(_check_chunk, str(path), origin_id, name, key, s, e) for s, e in chunks]
    for future in futures:
        result = future.result()
        if result is not None:
            return Problem(name, f"entry {result[0]}", result[1]), None

    # 2. Merkle nodes, level by level, against the entries
    level_hashes = [
        merkle.leaf_hash(bytes(data))
        for (data,) in db.execute(
            "SELECT data FROM entries WHERE origin_id = ? ORDER BY idx", (origin_id,)
        )
    ]
    levels: list[list[bytes]] = []
    level = 0
    while level_hashes:
        stored = db.execute(
            "SELECT idx, hash FROM nodes WHERE origin_id = ? AND level = ? ORDER BY idx",
            (origin_id, level),
        )
        seen = 0
        for i, (idx, h) in enumerate(stored):
            if idx != i or i >= len(level_hashes):
                return Problem(name, f"node ({level}, {idx})", "unexpected stored Merkle node"), None
            if bytes(h) != level_hashes[i]:
                if level == 0:
                    return Problem(name, f"entry {idx} leaf hash", "stored leaf hash does not match the entry"), None
                return Problem(name, f"node ({level}, {idx})", "stored Merkle node hash is wrong"), None
            seen = i + 1
        if seen != len(level_hashes):
            return Problem(name, f"node ({level}, {seen})", "stored Merkle node is missing"), None
        levels.append(level_hashes)
        level_hashes = [
            merkle.node_hash(level_hashes[i], level_hashes[i + 1])
            for i in range(0, len(level_hashes) - 1, 2)
        ]
        level += 1
    extra = db.execute(
        "SELECT level, idx FROM nodes WHERE origin_id = ? AND level >= ? LIMIT 1", (origin_id, level)
    ).fetchone()
    if extra:
        return Problem(name, f"node ({extra[0]}, {extra[1]})", "unexpected stored Merkle node"), None

    def node(level_idx: tuple[int, int]) -> bytes:
        return levels[level_idx[0]][level_idx[1]]

    # 3. checkpoints
    public_key = Ed25519PublicKey.from_public_bytes(key)
    count = 0
    for cp_size, note_bytes in _checkpoints(db, origin_id):
        where = f"checkpoint at size {cp_size}"
        try:
            note = parse_note(note_bytes)
            cp = parse_checkpoint(note.text)
        except (NoteError, CheckpointError) as exc:
            return Problem(name, where, f"malformed: {exc}"), None
        if not verify_note_signature(note, name, public_key):
            return Problem(name, where, "signature by the origin's key does not verify"), None
        if cp.origin != name or cp.size != cp_size:
            return Problem(name, where, f"names {cp.origin!r} size {cp.size}, stored as {name!r} size {cp_size}"), None
        if cp_size > size:
            return Problem(name, where, f"covers {cp_size} entries but the log holds {size}"), None
        root = merkle.fold_range([node(n) for n in merkle.root_plan(cp_size)]) if cp_size else merkle.root_of_leaf_hashes([])
        if root != cp.root_hash:
            return Problem(name, where, "root hash does not match the stored entries"), None
        count += 1
    return None, OriginReport(name, size, count)


def _checkpoints(db: sqlite3.Connection, origin_id: int) -> Iterator[tuple[int, bytes]]:
    for size, note in db.execute(
        "SELECT size, note FROM checkpoints WHERE origin_id = ? ORDER BY size", (origin_id,)
    ):
        yield size, bytes(note)
