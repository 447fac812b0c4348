"""Forwarding: received instances go to the destination AEs the routes name, and only to those
the patient's permissions on the ledger authorise. Joins the DICOM half (``dicom.net.requestor``)
and the ledger half (``ledger.permission_book``), like ``gateway.py``.

Per anchored instance and matching destination (``route``, awaited before the C-STORE's
Success so that nothing acknowledged is lost):

* not authorised: nothing is queued, a ``forward-refused`` entry goes on the ledger;
* authorised: a job is written to the durable queue (SQLite, ``synchronous=FULL``).

Workers (``concurrency`` per destination, each with its own requestor and reused association)
take due jobs in batches (``_batch``): permissions decided again once per patient and study
for the batch (a revocation that arrived meanwhile, locally or by gossip, stops the job:
``forward-refused``), each file read and its pixel hash checked against the anchored one
before its bytes are sent as stored, a ``forwarded`` entry per Success (committed together by
the ledger writer) and the batch's jobs settled in one transaction. Failures retry with
exponential backoff (``retry_initial`` doubling up to ``retry_max``); after ``max_attempts``,
or at once for a permanent failure (the destination does not accept the SOP class), the job
is parked as failed and shown by ``dicomledger status`` and ``queue``; ``queue unpark`` and
``queue retry`` put it back (``admin_handlers``). A restart resumes the queue; jobs a crash
left in flight are marked done if their ``forwarded`` entry is on the ledger, else sent again
(docs/design.md, "Forwarding in batches"). A grant that comes after an instance was routed
queues it then (``consent.py``).
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog
from pydicom import dcmread

from dicomledger.atna import AuditSink, SentInstance
from dicomledger.common.errors import StorageError
from dicomledger.common.sqlite_thread import ThreadedSqlite
from dicomledger.config import DestinationConfig, ForwardingConfig
from dicomledger.dicom.net.filemeta import data_set_start
from dicomledger.dicom.net.requestor import Destination, Requestor, SendResult
from dicomledger.dicom.pixelhash import PixelHashError, stored_sha256
from dicomledger.dicom.transcode import TranscodeError, decompressed_data_set
from dicomledger.ledger.entries import (
    FORWARD_REFUSED,
    FORWARDED,
    TAMPER_ALARM,
    EntryError,
    decode_entry,
)
from dicomledger.ledger.log import LogWriter
from dicomledger.ledger.permission_book import PermissionBook
from dicomledger.tamper import FILE_MISSING, PIXELS_DIFFER, alarm_payload
from dicomledger.tls import destination_context

log = structlog.get_logger("dicomledger.forwarding")

_T = TypeVar("_T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    patient TEXT NOT NULL,
    study TEXT NOT NULL,
    instance TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL,            -- queued, done, refused, failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,     -- Unix time
    last_error TEXT,
    created_at TEXT NOT NULL,
    finished_at TEXT,
    in_flight INTEGER NOT NULL DEFAULT 0,  -- 1 from just before its send until it is settled
    UNIQUE (destination, sop_instance_uid, sha256)
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (destination, state, next_attempt, id);
-- image-anchored entries whose forwards are decided (queued or refused): a re-sent duplicate
-- of an instance whose routing failed after it was anchored is routed then
CREATE TABLE IF NOT EXISTS routed (
    anchor_origin TEXT NOT NULL,
    anchor_index INTEGER NOT NULL,
    PRIMARY KEY (anchor_origin, anchor_index)
) WITHOUT ROWID;
-- consent.py: how far each log was read for new permission records ...
CREATE TABLE IF NOT EXISTS consent_scan (
    origin TEXT PRIMARY KEY,
    next_index INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queue_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
-- ... and the forwards-queued entries of stored instances queued by a grant: committed with
-- the jobs, appended to the ledger after (entry_index NULL until then, e.g. after a crash)
CREATE TABLE IF NOT EXISTS backfills (
    id INTEGER PRIMARY KEY,
    payload TEXT NOT NULL,
    entry_index INTEGER,
    created_at TEXT NOT NULL
);
"""

# What `dicomledger queue` and `status` call a job: ``queued`` (waiting, never failed),
# ``failed`` (an attempt failed; it will be retried), ``parked`` (given up: stored as
# 'failed'), ``done``, ``refused``.
_SHOWN_STATE = (
    "CASE WHEN state = 'queued' AND attempts > 0 THEN 'failed' "
    "WHEN state = 'failed' THEN 'parked' ELSE state END"
)


class ForwardQueueError(StorageError, RuntimeError):
    """The forward queue database failed; the message names the file."""


@dataclass(frozen=True)
class ForwardItem:
    """An anchored instance to route: where its file is and its pseudonyms (no PHI)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str  # relative to the storage directory
    calling_ae: str
    modality: str | None
    patient: str
    study: str
    instance: str
    sha256: str


@dataclass(frozen=True)
class Job:
    id: int
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    patient: str
    study: str
    instance: str
    sha256: str
    attempts: int


@dataclass(frozen=True)
class ListedJob:
    """A job as `dicomledger queue` shows it."""

    id: int
    destination: str
    state: str  # as shown: queued, failed, parked, done or refused
    attempts: int
    last_error: str | None
    created_at: str
    next_attempt: float  # Unix time
    sop_instance_uid: str


@dataclass(frozen=True)
class BackfillCounts:
    """Of a patient's stored instances that a grant authorises for a destination: how many were
    queued now, how many a job already delivered, how many already wait in the queue."""

    queued: int
    done: int
    waiting: int


@dataclass(frozen=True)
class Backfill:
    id: int
    payload: dict[str, Any]  # its forwards-queued ledger entry


_JOB_COLUMNS = (
    "id, destination, sop_instance_uid, sop_class_uid, transfer_syntax_uid, path, patient, "
    "study, instance, sha256, attempts"
)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _insert_job(
    db: sqlite3.Connection, destination: str, item: ForwardItem, *, or_ignore: bool
) -> bool:
    """Queue ``item`` for ``destination``, due now; whether a row was added (``or_ignore``: not
    if that exact instance already has a job there)."""
    cur = db.execute(
        f"INSERT {'OR IGNORE ' if or_ignore else ''}INTO jobs (destination, sop_instance_uid, sop_class_uid, "
        "transfer_syntax_uid, path, patient, study, instance, sha256, state, next_attempt, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', 0, ?)",
        (
            destination,
            item.sop_instance_uid,
            item.sop_class_uid,
            item.transfer_syntax_uid,
            item.path,
            item.patient,
            item.study,
            item.instance,
            item.sha256,
            _now_iso(),
        ),
    )
    return cur.rowcount == 1


class ForwardQueue(ThreadedSqlite):
    """The durable job queue: one SQLite file, used on its own thread."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "forward-queue")

    async def _on_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return await super()._on_thread(fn, *args)
        except sqlite3.Error as exc:
            raise ForwardQueueError(
                f"forward queue {self.path} failed ({exc}); check disk space"
            ) from None

    @classmethod
    async def open(cls, path: Path) -> ForwardQueue:
        queue = cls(path)
        await queue._on_thread(queue._open)
        return queue

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connect("FULL", SCHEMA)  # FULL: a queued job survives power loss
        assert self._db is not None
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "in_flight" not in columns:  # a queue written by an earlier version
            self._db.execute("ALTER TABLE jobs ADD COLUMN in_flight INTEGER NOT NULL DEFAULT 0")

    async def add(
        self, destinations: Sequence[str], item: ForwardItem, anchor: tuple[str, int]
    ) -> list[str]:
        """Queue ``item`` for ``destinations`` and record that the forwards of the entry
        ``anchor`` (origin, index) are decided, in one transaction; returns the destinations
        it was newly queued for (not those where that exact instance already was)."""

        def add() -> list[str]:
            assert self._db is not None
            queued = []
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for destination in destinations:
                    if _insert_job(self._db, destination, item, or_ignore=True):
                        queued.append(destination)
                self._db.execute(
                    "INSERT OR IGNORE INTO routed (anchor_origin, anchor_index) VALUES (?, ?)",
                    anchor,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return queued

        return await self._on_thread(add)

    async def routed(self, anchor: tuple[str, int]) -> bool:
        """Whether the forwards of the image-anchored entry ``anchor`` were decided."""
        rows = await self._on_thread(
            self._fetchall,
            "SELECT 1 FROM routed WHERE anchor_origin = ? AND anchor_index = ?",
            anchor,
        )
        return bool(rows)

    async def due(
        self, destination: str, now: float, exclude: Sequence[int], limit: int = 1
    ) -> list[Job]:
        """The oldest due queued jobs of ``destination`` not in ``exclude`` (being sent)."""
        marks = ",".join(
            "?" for _ in exclude
        )  # SQLite accepts an empty list; NOT IN (NULL) matches nothing
        rows = await self._on_thread(
            self._fetchall,
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE destination = ? AND state = 'queued' "
            f"AND next_attempt <= ? AND id NOT IN ({marks}) ORDER BY next_attempt, id LIMIT ?",
            (destination, now, *exclude, limit),
        )
        return [Job(*row) for row in rows]

    async def next_due_time(self, destination: str) -> float | None:
        rows = await self._on_thread(
            self._fetchall,
            "SELECT MIN(next_attempt) FROM jobs WHERE destination = ? AND state = 'queued'",
            (destination,),
        )
        due: float | None = rows[0][0]
        return due

    async def finish(self, job: Job, state: str, error: str | None = None) -> None:
        await self._on_thread(
            self._fetchall,
            "UPDATE jobs SET state = ?, last_error = ?, finished_at = ?, attempts = ?, in_flight = 0 WHERE id = ?",
            (state, error, _now_iso(), job.attempts, job.id),
        )

    async def retry_later(self, job: Job, at: float, error: str) -> None:
        await self._on_thread(
            self._fetchall,
            "UPDATE jobs SET attempts = ?, next_attempt = ?, last_error = ?, in_flight = 0 WHERE id = ?",
            (job.attempts, at, error, job.id),
        )

    async def mark_in_flight(self, ids: Sequence[int]) -> None:
        """Durably note that these jobs are about to be sent: after a crash, a restart looks on
        the ledger for their ``forwarded`` entries before sending them again."""
        await self._in_one_transaction(
            [("UPDATE jobs SET in_flight = 1 WHERE id = ?", [(i,) for i in ids])]
        )

    async def settle(
        self, done: Sequence[Job], refused: Sequence[tuple[Job, str]], untouched: Sequence[int]
    ) -> None:
        """A batch's outcome in one transaction: jobs delivered, jobs refused, and jobs not
        attempted (back to waiting, not in flight)."""
        now = _now_iso()
        await self._in_one_transaction(
            [
                (
                    "UPDATE jobs SET state = 'done', last_error = NULL, finished_at = ?, attempts = ?, in_flight = 0 "
                    "WHERE id = ?",
                    [(now, j.attempts, j.id) for j in done],
                ),
                (
                    "UPDATE jobs SET state = 'refused', last_error = ?, finished_at = ?, in_flight = 0 WHERE id = ?",
                    [(why, now, j.id) for j, why in refused],
                ),
                ("UPDATE jobs SET in_flight = 0 WHERE id = ?", [(i,) for i in untouched]),
            ]
        )

    async def in_flight(self) -> list[Job]:
        """Jobs a crash left in flight: their send may or may not have reached the destination."""
        rows = await self._on_thread(
            self._fetchall,
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE in_flight = 1 AND state = 'queued' ORDER BY id",
        )
        return [Job(*row) for row in rows]

    async def _in_one_transaction(
        self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]
    ) -> None:
        def run() -> None:
            assert self._db is not None
            if not any(rows for _, rows in statements):
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    if rows:
                        self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

        await self._on_thread(run)

    async def counts(self) -> dict[tuple[str, str], int]:
        rows = await self._on_thread(
            self._fetchall,
            "SELECT destination, state, COUNT(*) FROM jobs GROUP BY destination, state",
        )
        return {(d, s): n for d, s, n in rows}

    async def parked(self, limit: int = 20) -> list[tuple[str, str, int, str | None, str | None]]:
        """Failed (parked) jobs, newest first: destination, SOP instance, attempts, error, when."""
        return await self._on_thread(
            self._fetchall,
            "SELECT destination, sop_instance_uid, attempts, last_error, finished_at FROM jobs "
            "WHERE state = 'failed' ORDER BY finished_at DESC LIMIT ?",
            (limit,),
        )

    # -- the operator's view: `dicomledger queue`, `queue retry`, `queue unpark`, `status` ----

    async def shown_counts(self) -> dict[tuple[str, str], int]:
        """(destination, state as shown) -> how many jobs."""
        rows = await self._on_thread(
            self._fetchall, f"SELECT destination, {_SHOWN_STATE}, COUNT(*) FROM jobs GROUP BY 1, 2"
        )
        return {(d, s): n for d, s, n in rows}

    async def listed(
        self, states: Sequence[str], destination: str | None, limit: int
    ) -> list[ListedJob]:
        """Jobs in ``states`` (as shown), of ``destination`` or all, oldest first."""
        marks = ",".join("?" for _ in states)
        where = f"{_SHOWN_STATE} IN ({marks})" + (" AND destination = ?" if destination else "")
        rows = await self._on_thread(
            self._fetchall,
            f"SELECT id, destination, {_SHOWN_STATE}, attempts, last_error, created_at, next_attempt, "
            f"sop_instance_uid FROM jobs WHERE {where} ORDER BY id LIMIT ?",
            (*states, *([destination] if destination else []), limit),
        )
        return [ListedJob(*row) for row in rows]

    async def put_back(
        self, *, parked_only: bool, destination: str | None, ids: Sequence[int]
    ) -> dict[str, int]:
        """Make parked jobs (and unless ``parked_only``, failed ones waiting for their next
        attempt) queued and due now, with a fresh attempt count; per destination, how many."""
        which = (
            "state = 'failed'"
            if parked_only
            else "(state = 'failed' OR (state = 'queued' AND attempts > 0))"
        )
        where = [which]
        params: list[Any] = []
        if destination is not None:
            where.append("destination = ?")
            params.append(destination)
        if ids:
            where.append(f"id IN ({','.join('?' for _ in ids)})")
            params += list(ids)

        def put_back() -> dict[str, int]:
            assert self._db is not None
            self._db.execute("BEGIN IMMEDIATE")
            try:
                counts = dict(
                    self._db.execute(
                        f"SELECT destination, COUNT(*) FROM jobs WHERE {' AND '.join(where)} GROUP BY destination",
                        params,
                    ).fetchall()
                )
                self._db.execute(
                    "UPDATE jobs SET state = 'queued', attempts = 0, next_attempt = 0, finished_at = NULL "
                    f"WHERE {' AND '.join(where)}",
                    params,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return counts

        return await self._on_thread(put_back)

    # -- consent (consent.py): stored instances that a grant authorises --------------------

    async def consent_scan_marks(self) -> dict[str, int] | None:
        """Per log origin, the index from which its permission records are still to be read;
        None before the first scan (``start_consent_scan``)."""

        def marks() -> dict[str, int] | None:
            assert self._db is not None
            if not self._db.execute(
                "SELECT 1 FROM queue_settings WHERE name = 'consent_scan_since'"
            ).fetchall():
                return None
            return dict(self._db.execute("SELECT origin, next_index FROM consent_scan").fetchall())

        return await self._on_thread(marks)

    async def start_consent_scan(self, sizes: dict[str, int]) -> None:
        """The first scan starts at the logs' current ends: grants recorded before it queue nothing."""
        await self.set_consent_scan_marks(sizes, since=_now_iso())

    async def set_consent_scan_marks(self, marks: dict[str, int], since: str | None = None) -> None:
        def write() -> None:
            assert self._db is not None
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO consent_scan (origin, next_index) VALUES (?, ?) "
                    "ON CONFLICT (origin) DO UPDATE SET next_index = MAX(next_index, excluded.next_index)",
                    sorted(marks.items()),
                )
                if since is not None:
                    self._db.execute(
                        "INSERT OR IGNORE INTO queue_settings (name, value) VALUES ('consent_scan_since', ?)",
                        (since,),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

        await self._on_thread(write)

    async def backfill(
        self,
        destination: str,
        items: Sequence[ForwardItem],
        entry: Callable[[BackfillCounts], dict[str, Any]],
    ) -> Backfill | None:
        """Queue ``items`` for ``destination`` unless a job of that exact instance exists (done,
        queued, failing or parked; a job refused because it was no longer authorised when due is
        queued again), and, if any was queued, keep the ledger entry ``entry(counts)`` to append,
        in one transaction. None if nothing was queued."""

        def backfill() -> Backfill | None:
            assert self._db is not None
            queued = done = waiting = 0
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for item in items:
                    key = (destination, item.sop_instance_uid, item.sha256)
                    found = self._db.execute(
                        "SELECT state FROM jobs WHERE destination = ? AND sop_instance_uid = ? AND sha256 = ?",
                        key,
                    ).fetchall()
                    state = found[0][0] if found else None
                    if state == "done":
                        done += 1
                    elif state in ("queued", "failed"):
                        waiting += 1
                    elif state == "refused":
                        self._db.execute(
                            "UPDATE jobs SET state = 'queued', attempts = 0, next_attempt = 0, last_error = NULL, "
                            "finished_at = NULL, created_at = ? WHERE destination = ? AND sop_instance_uid = ? "
                            "AND sha256 = ?",
                            (_now_iso(), *key),
                        )
                        queued += 1
                    else:
                        _insert_job(self._db, destination, item, or_ignore=False)
                        queued += 1
                result = None
                if queued:
                    payload = entry(BackfillCounts(queued, done, waiting))
                    cur = self._db.execute(
                        "INSERT INTO backfills (payload, created_at) VALUES (?, ?)",
                        (json.dumps(payload), _now_iso()),
                    )
                    assert cur.lastrowid is not None
                    result = Backfill(cur.lastrowid, payload)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return result

        return await self._on_thread(backfill)

    async def unrecorded_backfills(self) -> list[Backfill]:
        """Backfills whose ledger entry was not appended yet (a crash, a ledger failure)."""
        rows = await self._on_thread(
            self._fetchall,
            "SELECT id, payload FROM backfills WHERE entry_index IS NULL ORDER BY id",
        )
        return [Backfill(i, json.loads(payload)) for i, payload in rows]

    async def recorded_backfill_entries(self) -> set[int]:
        rows = await self._on_thread(
            self._fetchall, "SELECT entry_index FROM backfills WHERE entry_index IS NOT NULL"
        )
        return {r[0] for r in rows}

    async def backfill_recorded(self, backfill_id: int, entry_index: int) -> None:
        await self._on_thread(
            self._fetchall,
            "UPDATE backfills SET entry_index = ? WHERE id = ?",
            (entry_index, backfill_id),
        )

    async def cancel(self, sop_instance_uids: Sequence[str]) -> int:
        """Remove every job of these instances (an erasure: their rows name the instances and
        their files); returns how many were still to be sent. Deleted rows are zeroed and the
        WAL truncated, as in the index."""
        uids = list(sop_instance_uids)

        def cancel() -> int:
            db = self._db
            assert db is not None
            db.execute("PRAGMA secure_delete = ON")
            pending = 0
            db.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(uids), 500):
                    chunk = uids[start : start + 500]
                    marks = ",".join("?" for _ in chunk)
                    pending += db.execute(
                        f"SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND sop_instance_uid IN ({marks})",
                        chunk,
                    ).fetchone()[0]
                    db.execute(f"DELETE FROM jobs WHERE sop_instance_uid IN ({marks})", chunk)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return pending

        return await self._on_thread(cancel)

    async def pending_of(self, sop_instance_uids: Sequence[str]) -> int:
        """How many jobs of these instances are still to be sent."""
        uids = list(sop_instance_uids)
        total = 0
        for start in range(0, len(uids), 500):
            chunk = uids[start : start + 500]
            rows = await self._on_thread(
                self._fetchall,
                f"SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND sop_instance_uid IN ({','.join('?' for _ in chunk)})",
                chunk,
            )
            total += rows[0][0]
        return total


def backoff(attempts: int, initial: float, maximum: float) -> float:
    """Seconds to wait after ``attempts`` failed attempts: initial, 2x, 4x, ... up to maximum."""
    return min(maximum, initial * 2.0 ** max(0, attempts - 1))


class Forwarder:
    def __init__(
        self,
        config: ForwardingConfig,
        queue: ForwardQueue,
        book: PermissionBook,
        writer: LogWriter,
        storage_dir: Path,
        audit: AuditSink | None = None,
    ) -> None:
        self.config = config
        self.audit = audit or AuditSink()
        self.queue = queue
        self.book = book
        self.writer = writer
        self.storage_dir = storage_dir
        self._wake = {d.ae_title: asyncio.Event() for d in config.destinations}
        self._sending: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._stop_event = asyncio.Event()
        # reads and hash checks of stored files before they are sent
        self._checker = ThreadPoolExecutor(2, thread_name_prefix="forward-check")

    # -- routing (in the ingest path) ------------------------------------------------------

    def destinations_for(self, item: ForwardItem) -> list[DestinationConfig]:
        titles: list[str] = []
        for route in self.config.routes:
            if route.matches(item.calling_ae, item.modality, item.sop_class_uid):
                titles += [t for t in route.to if t not in titles]
        return [d for t in titles if (d := self.config.destination(t)) is not None]

    async def route(self, item: ForwardItem, anchor: tuple[str, int]) -> list[str]:
        """Decide for each matching destination now: queue it, or record the refusal; then
        ``anchor`` (the instance's image-anchored entry) counts as routed. If this fails
        midway nothing is queued and the anchor is not marked: routing it again (the sender
        re-sends after our failure status) queues it then, or records a refusal again."""
        outcomes, allowed = [], []
        for dest in self.destinations_for(item):
            decision = await self.book.decide(
                item.patient, study=item.study, ae=dest.ae_title, site=dest.site, today=_today()
            )
            if not decision.allowed:
                await self._refused(
                    dest, item.patient, item.study, item.instance, item.sha256, decision.reason
                )
                outcomes.append(f"{dest.ae_title}: refused ({decision.reason})")
            else:
                allowed.append(dest.ae_title)
                outcomes.append(f"{dest.ae_title}: queued")
        if outcomes:  # nothing to decide when no route matches
            for title in await self.queue.add(allowed, item, anchor):
                self._wake[title].set()
        return outcomes

    async def routed(self, anchor: tuple[str, int]) -> bool:
        return await self.queue.routed(anchor)

    def wake(self, destination: str) -> None:
        """Jobs of ``destination`` became due (queued by a grant, put back by the operator)."""
        if (event := self._wake.get(destination)) is not None:
            event.set()

    def admin_handlers(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]]:
        """`dicomledger queue retry` and `queue unpark`, through the admin socket."""
        return {
            "queue-retry": partial(self._put_back, parked_only=False),
            "queue-unpark": partial(self._put_back, parked_only=True),
        }

    async def _put_back(self, body: dict[str, Any], *, parked_only: bool) -> dict[str, Any]:
        destination = body.get("destination")
        if destination is not None and self.config.destination(destination) is None:
            known = ", ".join(d.ae_title for d in self.config.destinations) or "none"
            raise ValueError(f"{destination!r} is not a [[destinations]] AE title (known: {known})")
        ids = body.get("jobs", [])
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise ValueError("jobs must be a list of job numbers")
        counts = await self.queue.put_back(
            parked_only=parked_only, destination=destination, ids=ids
        )
        for title, n in counts.items():
            self.wake(title)
            log.info(
                "forward jobs put back in the queue",
                destination=title,
                jobs=n,
                which="parked" if parked_only else "failed and parked",
            )
        return {"put_back": counts}

    async def _refused(
        self,
        dest: DestinationConfig,
        patient: str,
        study: str,
        instance: str,
        sha256: str,
        reason: str,
    ) -> None:
        payload = {
            "destination": dest.ae_title,
            "site": dest.site,
            "patient": patient,
            "study": study,
            "instance": instance,
            "sha256": sha256,
            "reason": reason,
        }
        await self.writer.append(FORWARD_REFUSED, payload)
        log.info("forward refused", destination=dest.ae_title, reason=reason)

    # -- workers ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self._recover_in_flight()
        for dest in self.config.destinations:
            for n in range(dest.concurrency):
                self._tasks.append(
                    asyncio.create_task(self._worker(dest), name=f"forward {dest.ae_title} {n}")
                )

    async def stop(self) -> None:
        """Let each worker finish the send in progress (and record its batch), then stop."""
        self._stopping = True
        self._stop_event.set()
        for event in self._wake.values():
            event.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._checker.shutdown(wait=False)

    async def _recover_in_flight(self) -> None:
        """Jobs a crash caught in flight: those whose ``forwarded`` entry is on the ledger were
        delivered and recorded (the crash came before the queue's commit): they are marked
        done, not sent again. The others go again (the destination may have had them: the
        crash came between its Success and our ledger commit; a PACS keeps one copy)."""
        jobs = await self.queue.in_flight()
        if not jobs:
            return
        recorded = await self._recorded_forwards({j.patient for j in jobs})
        done = [j for j in jobs if (j.destination, j.instance, j.sha256) in recorded]
        again = [j.id for j in jobs if (j.destination, j.instance, j.sha256) not in recorded]
        await self.queue.settle(done, [], again)
        log.warning(
            "forward jobs found in flight after a restart",
            recorded_on_ledger=len(done),
            sent_again=len(again),
        )

    async def _recorded_forwards(self, patients: set[str]) -> set[tuple[str, str, str]]:
        """(destination, instance, pixel hash) of this gateway's ``forwarded`` entries of these patients."""
        store, origin = self.writer.store, self.writer.identity.origin
        found: set[tuple[str, str, str]] = set()
        for patient in patients:
            for entry_origin, index in await store.find(f"activity:{patient}"):
                if entry_origin != origin:
                    continue
                try:
                    entry = decode_entry(await store.entry(entry_origin, index))
                except EntryError:
                    continue
                if entry.kind == FORWARDED:
                    p = entry.payload
                    found.add(
                        (str(p.get("destination")), str(p.get("instance")), str(p.get("sha256")))
                    )
        return found

    async def _worker(self, dest: DestinationConfig) -> None:
        requestor = Requestor(
            self.config.calling_ae,
            Destination(
                dest.ae_title,
                dest.host,
                dest.port,
                destination_context(dest),
                dest.tls.server_name if dest.tls is not None else "",
            ),
            transcode=True,
        )
        wake = self._wake[dest.ae_title]
        failures = 0  # consecutive retryable failures: the destination is down or refusing
        try:
            while not self._stopping:
                try:
                    jobs = await self.queue.due(
                        dest.ae_title, time.time(), sorted(self._sending), BATCH_JOBS
                    )
                except ForwardQueueError as exc:
                    log.error("forward queue unreadable", destination=dest.ae_title, error=str(exc))
                    jobs = []
                if not jobs:
                    # nothing due: keep the association for a burst, release it once idle
                    await requestor.release_if_idle()
                    wake.clear()
                    next_due = await self.queue.next_due_time(dest.ae_title)
                    timeout = (
                        5.0 if next_due is None else max(0.05, min(5.0, next_due - time.time()))
                    )
                    try:
                        await asyncio.wait_for(wake.wait(), timeout)
                    except TimeoutError:
                        pass
                    continue
                ids = [j.id for j in jobs]
                self._sending.update(ids)
                try:
                    retry = await self._batch(dest, jobs, requestor)
                except Exception as exc:  # a bug must not stop forwarding; the jobs stay queued
                    log.exception(
                        "forward batch failed unexpectedly",
                        destination=dest.ae_title,
                        jobs=len(jobs),
                        error=str(exc),
                    )
                    retry = True
                finally:
                    self._sending.difference_update(ids)
                failures = failures + 1 if retry else 0
                if retry:  # back off the whole destination, not only this job: one probe at a time
                    pause = backoff(failures, self.config.retry_initial, self.config.retry_max)
                    try:
                        await asyncio.wait_for(self._stop_event.wait(), pause)
                    except TimeoutError:
                        pass
        finally:
            await requestor.close()

    async def _batch(self, dest: DestinationConfig, jobs: list[Job], requestor: Requestor) -> bool:
        """Send a batch of due jobs on one association; True if it ended on a failure worth
        retrying later (the destination is down, busy, aborting). Permissions are decided
        once per patient and study for the batch, which lasts at most ``BATCH_SECONDS``
        of sending: a revocation stops the rest of the queue within that. Each delivery's
        ``forwarded`` entry is appended as soon as its Success arrives (the ledger writer
        commits those of the batch together); the jobs are settled in one transaction."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        decisions = await self.book.decide_all(
            {(j.patient, j.study) for j in jobs}, ae=dest.ae_title, site=dest.site, today=_today()
        )
        refused: list[tuple[Job, str]] = []
        allowed: list[Job] = []
        for job in jobs:
            decision = decisions[job.patient, job.study]
            if decision.allowed:
                allowed.append(job)
            else:  # e.g. revoked after it was queued
                refused.append(
                    (job, f"no longer authorised when due to be sent: {decision.reason}")
                )
        await asyncio.gather(
            *(
                self._refused(dest, j.patient, j.study, j.instance, j.sha256, why)
                for j, why in refused
            )
        )
        if not allowed:
            await self.queue.settle([], refused, [])
            return False
        await self.queue.mark_in_flight([j.id for j in allowed])
        await requestor.prepare(
            list(dict.fromkeys((j.sop_class_uid, j.transfer_syntax_uid) for j in allowed))
        )
        loads = _Lookahead(
            allowed,
            lambda job: loop.run_in_executor(
                self._checker,
                _load_checked,
                self.storage_dir / job.path,
                job.transfer_syntax_uid,
                job.sha256,
            ),
        )
        done: list[Job] = []
        appends: list[asyncio.Task[Any]] = []
        retry = False
        attempted = 0
        try:
            for job in allowed:
                if attempted and (self._stopping or loop.time() - started > BATCH_SECONDS):
                    break
                attempted += 1
                load = await loads.next()
                job = replace(job, attempts=job.attempts + 1)
                if load.problem:
                    await self._not_sendable(dest, job, load)
                    continue
                data, syntax = load.data_set, job.transfer_syntax_uid
                target = requestor.choose((job.sop_class_uid, syntax))
                if target is not None and target[1] != syntax:
                    # the destination takes none of the stored syntax: a decompressed copy
                    try:
                        data = await loop.run_in_executor(
                            self._checker, decompressed_data_set, load.part10, target[1]
                        )
                        syntax = target[1]
                    except TranscodeError as exc:
                        await self.queue.finish(
                            job, "failed", f"cannot send {job.path} decompressed: {exc}"
                        )
                        log.error(
                            "forward failed; job parked",
                            destination=dest.ae_title,
                            sop_instance=job.sop_instance_uid,
                            error=str(exc),
                        )
                        continue
                result = await requestor.store(
                    job.sop_class_uid, job.sop_instance_uid, syntax, data
                )
                if result.ok:
                    grant = decisions[job.patient, job.study].grant
                    payload = {
                        "destination": dest.ae_title,
                        "site": dest.site,
                        "patient": job.patient,
                        "study": job.study,
                        "instance": job.instance,
                        "sha256": job.sha256,
                        "grant": grant.ref if grant else None,
                        "status": f"0x{result.status or 0:04X}",
                    }
                    if syntax != job.transfer_syntax_uid:
                        payload["transcoded_to"] = syntax
                    appends.append(asyncio.ensure_future(self.writer.append(FORWARDED, payload)))
                    done.append(job)
                    continue
                retry = await self._failed(dest, job, result)
                if retry:
                    break  # the destination is in trouble: the rest waits for the backoff
        finally:
            loads.cancel()
            if appends:
                await asyncio.gather(*appends)
            untouched = [j.id for j in allowed[attempted:]]
            await self.queue.settle(done, refused, untouched)
        if done:
            self.audit.instances_sent(
                "forward",
                our_ae=self.config.calling_ae,
                destination=dest.ae_title,
                destination_address=dest.host,
                instances=[
                    SentInstance(
                        j.sop_class_uid,
                        j.sop_instance_uid,
                        self.storage_dir / j.path,
                        j.patient,
                        j.study,
                    )
                    for j in done
                ],
            )
            log.info(
                "forwarded",
                destination=dest.ae_title,
                instances=len(done),
                ms=round((loop.time() - started) * 1000, 1),
            )
        return retry

    async def _not_sendable(self, dest: DestinationConfig, job: Job, load: Loaded) -> None:
        """The stored file fails the check before sending: never sent, parked; a pixel hash
        that no longer matches the anchored one is a tamper alarm."""
        path = self.storage_dir / job.path
        if load.found is not None:
            log.error(
                "TAMPER ALARM: stored instance not forwarded",
                file=str(path),
                sop_instance=job.sop_instance_uid,
                destination=dest.ae_title,
                anchored_sha256=job.sha256,
                found_sha256=load.found,
            )
            await self.writer.append(
                TAMPER_ALARM,
                alarm_payload(
                    patient=job.patient,
                    study=job.study,
                    instance=job.instance,
                    expected=job.sha256,
                    found=load.found,
                    anchor_origin=None,
                    anchor_index=None,
                    problem=load.problem,
                    context={"service": "forward", "destination": dest.ae_title},
                ),
            )
        await self.queue.finish(job, "failed", load.problem)
        log.error(
            "forward failed; job parked",
            destination=dest.ae_title,
            sop_instance=job.sop_instance_uid,
            attempts=job.attempts,
            error=load.problem,
            file=str(path),
        )

    async def _failed(self, dest: DestinationConfig, job: Job, result: SendResult) -> bool:
        """A send failed: retry the job later, or park it; True if worth retrying."""
        if result.retryable and job.attempts < self.config.max_attempts:
            wait = backoff(job.attempts, self.config.retry_initial, self.config.retry_max)
            await self.queue.retry_later(job, time.time() + wait, result.error)
            log.warning(
                "forward failed; will retry",
                destination=dest.ae_title,
                sop_instance=job.sop_instance_uid,
                attempts=job.attempts,
                retry_in_s=round(wait, 2),
                error=result.error,
            )
            return True
        await self.queue.finish(job, "failed", result.error)
        log.error(
            "forward failed; job parked",
            destination=dest.ae_title,
            sop_instance=job.sop_instance_uid,
            attempts=job.attempts,
            error=result.error,
            file=str(self.storage_dir / job.path),
        )
        return result.retryable


BATCH_JOBS = 64  # due jobs of a destination taken together
BATCH_SECONDS = 0.5  # of sending, before the next batch decides permissions again
LOOKAHEAD = 4  # files read and checked ahead of the one being sent


@dataclass(frozen=True)
class Loaded:
    """A stored file read and checked for sending: its data set bytes, or why not."""

    data_set: memoryview | bytes = b""
    problem: str = ""
    found: str | None = None  # the pixel hash found, when it differs from the anchored one
    part10: bytes = b""  # the whole stored file (for a decompressed copy)


def _load_checked(path: Path, transfer_syntax_uid: str, sha256: str) -> Loaded:
    """In a checker thread: read the stored file once and check its pixel hash against the
    anchored one; the bytes checked are the bytes sent."""
    try:
        data = path.read_bytes()
        dataset = dcmread(io.BytesIO(data))
        found = stored_sha256(data, dataset, transfer_syntax_uid).hex()
    except FileNotFoundError:
        return Loaded(problem=f"cannot send {path}: {FILE_MISSING}")
    except (OSError, PixelHashError) as exc:
        return Loaded(problem=f"cannot send {path}: {exc}")
    except Exception as exc:  # pydicom cannot parse what we stored: damaged
        return Loaded(
            problem=f"cannot send {path}: stored file cannot be parsed: {type(exc).__name__}: {exc}"
        )
    if found != sha256:
        return Loaded(problem=f"tamper check failed: {PIXELS_DIFFER}", found=found)
    return Loaded(memoryview(data)[data_set_start(data) :], part10=data)


class _Lookahead:
    """Runs ``load`` for the next few jobs ahead of the one being sent."""

    def __init__(self, jobs: list[Job], load: Callable[[Job], Awaitable[Loaded]]) -> None:
        self._todo = iter(jobs)
        self._load = load
        self._ahead: deque[asyncio.Future[Loaded]] = deque()
        for _ in range(LOOKAHEAD):
            self._start_next()

    def _start_next(self) -> None:
        job = next(self._todo, None)
        if job is not None:
            self._ahead.append(asyncio.ensure_future(self._load(job)))

    async def next(self) -> Loaded:
        loaded = await self._ahead.popleft()
        self._start_next()
        return loaded

    def cancel(self) -> None:
        for future in self._ahead:
            future.cancel()
        self._ahead.clear()


def _today() -> str:
    return datetime.now(UTC).date().isoformat()
