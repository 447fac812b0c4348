"""Local bookkeeping of erasure, retention and scrub (``lifecycle.db`` beside the index).

* ``erasures_seen``: the ``erased`` entries (any gateway's) this gateway has acted on, so each
  is applied once, also when it arrives by replication or comes back with a restored ledger;
* ``erasure_requests``: other gateways' erasures of instances we hold copies of, and what we
  did: ``honoured`` (our own ``erased`` entry), ``pending`` (not configured to honour it; shown
  by `status` until the copies are gone), ``resolved`` (erased here since), ``not held``;
* ``scrub_passes`` and ``scrub_findings``: every scrub pass, where it is (a background pass
  resumes after a restart) and what it found.

Nothing here goes on the ledger. Findings name SOP Instance UIDs and stored paths (no names,
IDs or dates); an erasure deletes the findings of the instances it erases.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dicomledger.common.errors import StorageError
from dicomledger.common.sqlite_thread import ThreadedSqlite

_T = TypeVar("_T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS erasures_seen (
    origin TEXT NOT NULL,
    idx INTEGER NOT NULL,
    PRIMARY KEY (origin, idx)
);
CREATE TABLE IF NOT EXISTS erasure_requests (
    origin TEXT NOT NULL,
    idx INTEGER NOT NULL,
    patient TEXT NOT NULL,          -- pseudonym
    study TEXT,                     -- pseudonym, NULL: every study
    reason TEXT NOT NULL,
    time_ms INTEGER NOT NULL,       -- the requesting entry's time
    state TEXT NOT NULL,            -- honoured, pending, resolved, not held
    held INTEGER NOT NULL,          -- copies held here when last counted
    entry INTEGER,                  -- our erased entry, when honoured
    updated REAL NOT NULL,
    PRIMARY KEY (origin, idx)
);
CREATE TABLE IF NOT EXISTS scrub_passes (
    id INTEGER PRIMARY KEY,
    scope TEXT NOT NULL,            -- "full", or "study" for `scrub --study`
    trigger TEXT NOT NULL,          -- "background" or "on demand"
    state TEXT NOT NULL,            -- running, complete, interrupted
    started REAL NOT NULL,
    finished REAL,
    cursor INTEGER NOT NULL DEFAULT 0,   -- index rowid checked up to (a background pass resumes there)
    checked INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    unanchored INTEGER NOT NULL DEFAULT 0,
    findings INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS scrub_findings (
    pass_id INTEGER NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    severity TEXT NOT NULL,         -- "alarm" (a tamper-alarm entry) or "warning"
    problem TEXT NOT NULL,
    expected TEXT,
    found TEXT,
    alarm_index INTEGER,            -- our tamper-alarm entry
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS scrub_findings_pass ON scrub_findings (pass_id);
CREATE INDEX IF NOT EXISTS scrub_findings_instance ON scrub_findings (sop_instance_uid);
"""


@dataclass(frozen=True)
class ErasureRequest:
    origin: str
    index: int
    patient: str
    study: str | None
    reason: str
    time_ms: int
    state: str
    held: int
    entry: int | None


@dataclass(frozen=True)
class ScrubPass:
    id: int
    scope: str
    trigger: str
    state: str
    started: float
    finished: float | None
    cursor: int
    checked: int
    bytes: int
    unanchored: int
    findings: int


@dataclass(frozen=True)
class Finding:
    pass_id: int
    sop_instance_uid: str
    path: str
    severity: str
    problem: str
    expected: str | None
    found: str | None
    alarm_index: int | None
    at: float


_PASS_COLUMNS = (
    "id, scope, trigger, state, started, finished, cursor, checked, bytes, unanchored, findings"
)
_FINDING_COLUMNS = (
    "pass_id, sop_instance_uid, path, severity, problem, expected, found, alarm_index, at"
)
_REQUEST_COLUMNS = "origin, idx, patient, study, reason, time_ms, state, held, entry"


class LifecycleStateError(StorageError, RuntimeError):
    """The lifecycle database failed; the message names the file."""


class LifecycleState(ThreadedSqlite):
    def __init__(self, path: Path) -> None:
        super().__init__(path, "lifecycle-db")

    @classmethod
    async def open(cls, path: Path) -> LifecycleState:
        state = cls(path)
        await state._on_thread(state._open)
        return state

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connect("FULL", SCHEMA)
        assert self._db is not None
        self._db.execute("PRAGMA secure_delete = ON")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (repr(time.time()),))
        # a pass that was running when the process ended
        self._db.execute("UPDATE scrub_passes SET state = 'interrupted' WHERE state = 'running'")

    async def _on_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return await super()._on_thread(fn, *args)
        except sqlite3.Error as exc:
            raise LifecycleStateError(
                f"lifecycle database {self.path} failed ({exc}); check disk space"
            ) from None

    async def _run(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return await self._on_thread(self._fetchall, sql, params)

    async def created(self) -> float:
        rows = await self._run("SELECT value FROM meta WHERE key = 'created'")
        return float(rows[0][0])

    # -- erasures ---------------------------------------------------------------------------

    async def seen_erasures(self) -> set[tuple[str, int]]:
        return {(r[0], r[1]) for r in await self._run("SELECT origin, idx FROM erasures_seen")}

    async def mark_seen(self, origin: str, index: int) -> None:
        await self._run("INSERT OR IGNORE INTO erasures_seen VALUES (?, ?)", (origin, index))

    async def record_request(self, request: ErasureRequest) -> None:
        await self._run(
            "INSERT OR REPLACE INTO erasure_requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                request.origin,
                request.index,
                request.patient,
                request.study,
                request.reason,
                request.time_ms,
                request.state,
                request.held,
                request.entry,
                time.time(),
            ),
        )

    async def requests(
        self, state: str | None = None, patient: str | None = None
    ) -> list[ErasureRequest]:
        sql, params = f"SELECT {_REQUEST_COLUMNS} FROM erasure_requests WHERE 1", []
        if state is not None:
            sql += " AND state = ?"
            params.append(state)
        if patient is not None:
            sql += " AND patient = ?"
            params.append(patient)
        return [
            ErasureRequest(*r)
            for r in await self._run(sql + " ORDER BY time_ms, origin, idx", params)
        ]

    async def forget_instances(self, sop_instance_uids: Sequence[str]) -> None:
        """Drop the scrub findings of erased instances (they name the instance and its file)."""
        uids = list(sop_instance_uids)

        def forget() -> None:
            db = self._db
            assert db is not None
            for start in range(0, len(uids), 500):
                chunk = uids[start : start + 500]
                db.execute(
                    f"DELETE FROM scrub_findings WHERE sop_instance_uid IN ({','.join('?' for _ in chunk)})",
                    chunk,
                )
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        await self._on_thread(forget)

    # -- scrub ------------------------------------------------------------------------------

    async def start_pass(
        self, scope: str, trigger: str, resume: ScrubPass | None = None
    ) -> ScrubPass:
        """A new pass, or ``resume`` (an interrupted background pass) running again."""
        if resume is not None:
            await self._run("UPDATE scrub_passes SET state = 'running' WHERE id = ?", (resume.id,))
            pass_id = resume.id
        else:

            def insert() -> int:
                assert self._db is not None
                cur = self._db.execute(
                    "INSERT INTO scrub_passes (scope, trigger, state, started) VALUES (?, ?, 'running', ?)",
                    (scope, trigger, time.time()),
                )
                assert cur.lastrowid is not None
                return cur.lastrowid

            pass_id = await self._on_thread(insert)
        found = await self.scrub_pass(pass_id)
        assert found is not None
        return found

    async def scrub_pass(self, pass_id: int) -> ScrubPass | None:
        rows = await self._run(f"SELECT {_PASS_COLUMNS} FROM scrub_passes WHERE id = ?", (pass_id,))
        return ScrubPass(*rows[0]) if rows else None

    async def progress(
        self, pass_id: int, cursor: int, checked: int, nbytes: int, unanchored: int, findings: int
    ) -> None:
        await self._run(
            "UPDATE scrub_passes SET cursor = ?, checked = ?, bytes = ?, unanchored = ?, findings = ? WHERE id = ?",
            (cursor, checked, nbytes, unanchored, findings, pass_id),
        )

    async def finish_pass(self, pass_id: int, state: str) -> None:
        await self._run(
            "UPDATE scrub_passes SET state = ?, finished = ? WHERE id = ?",
            (state, time.time(), pass_id),
        )

    async def last_pass(
        self, scope: str = "full", state: str | None = "complete", trigger: str | None = None
    ) -> ScrubPass | None:
        sql, params = f"SELECT {_PASS_COLUMNS} FROM scrub_passes WHERE scope = ?", [scope]
        if state is not None:
            sql += " AND state = ?"
            params.append(state)
        if trigger is not None:
            sql += " AND trigger = ?"
            params.append(trigger)
        rows = await self._run(sql + " ORDER BY id DESC LIMIT 1", params)
        return ScrubPass(*rows[0]) if rows else None

    async def add_finding(self, finding: Finding) -> None:
        await self._run(
            f"INSERT INTO scrub_findings ({_FINDING_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                finding.pass_id,
                finding.sop_instance_uid,
                finding.path,
                finding.severity,
                finding.problem,
                finding.expected,
                finding.found,
                finding.alarm_index,
                finding.at,
            ),
        )

    async def earlier_alarm(
        self, sop_instance_uid: str, problem: str, found: str | None
    ) -> int | None:
        """The tamper-alarm entry an earlier pass wrote for the same finding, if any: a
        finding that persists is logged every pass but goes on the ledger once."""
        rows = await self._run(
            "SELECT alarm_index FROM scrub_findings WHERE sop_instance_uid = ? AND problem = ? AND found IS ?"
            " AND alarm_index IS NOT NULL ORDER BY at DESC LIMIT 1",
            (sop_instance_uid, problem, found),
        )
        return rows[0][0] if rows else None

    async def findings(self, pass_id: int, limit: int = 1000) -> list[Finding]:
        rows = await self._run(
            f"SELECT {_FINDING_COLUMNS} FROM scrub_findings WHERE pass_id = ? ORDER BY at LIMIT ?",
            (pass_id, limit),
        )
        return [Finding(*r) for r in rows]
