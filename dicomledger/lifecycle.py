"""Data over years, in the running gateway: erasure, retention and the scrub (their own
modules), with the admin actions `dicomledger erase`, `retention` and `scrub` and the
lines they add to `dicomledger status`. Joins the DICOM half and the ledger half, like
``gateway.py``, which only starts and stops it.

Erasure and the scrub share one lock: an instance is never checked while it is being erased.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from dicomledger.atna.trail import AuditSink
from dicomledger.config import Config
from dicomledger.dicom.index import Index
from dicomledger.dicom.store import FileStore
from dicomledger.erasure import Eraser
from dicomledger.forwarding import ForwardQueue
from dicomledger.ledger.entries import Entry
from dicomledger.ledger.erasure import ADMIN_REASONS, ErasureLookup
from dicomledger.ledger.identity import Identity
from dicomledger.ledger.log import LedgerStore, LogWriter
from dicomledger.lifecycle_state import LifecycleState
from dicomledger.retention import Retention
from dicomledger.scrub import Scrubber

log = structlog.get_logger("dicomledger.lifecycle")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def _pseudonym_field(body: dict[str, Any], key: str, required: bool) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a pseudonym")
    return value


class Lifecycle:
    def __init__(
        self,
        config: Config,
        *,
        index: Index,
        ledger: LedgerStore,
        writer: LogWriter,
        files: FileStore,
        secret: bytes,
        identity: Identity,
        audit: AuditSink | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.ledger = ledger
        self.writer = writer
        self.files = files
        self.secret = secret
        self.identity = identity
        self.audit = audit or AuditSink()
        self.lock = asyncio.Lock()
        self.state: LifecycleState | None = None
        self.eraser: Eraser | None = None
        self.retention: Retention | None = None
        self.scrubber: Scrubber | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self) -> None:
        """Open the lifecycle database (before the gateway reconciles its index at start)."""
        cfg = self.config
        self.state = await LifecycleState.open(cfg.lifecycle_db)
        self.eraser = Eraser(
            index=self.index,
            ledger=self.ledger,
            writer=self.writer,
            files=self.files,
            queue=None,
            state=self.state,
            secret=self.secret,
            origin=self.identity.origin,
            lock=self.lock,
            honour_from=cfg.erasure.honour_from,
            audit_queue=cfg.atna.queue if cfg.atna is not None else None,
        )
        self.retention = Retention(cfg.retention, self.eraser, self.secret)
        self.scrubber = Scrubber(
            config=cfg.scrub,
            index=self.index,
            ledger=self.ledger,
            writer=self.writer,
            storage_dir=cfg.storage.directory,
            state=self.state,
            secret=self.secret,
            origin=self.identity.origin,
            lock=self.lock,
            audit=self.audit,
            ae_title=cfg.gateway.ae_title,
            host=cfg.gateway.host,
        )

    async def not_erased(self, anchors: list[Entry]) -> list[Entry]:
        """The anchors no erasure covers (an index row lost with its anchor erased is not
        rebuilt from a file an interrupted erasure left)."""
        lookup = ErasureLookup(self.ledger)
        return [a for a in anchors if await lookup.covering(a) is None]

    async def start(self, queue: ForwardQueue | None) -> None:
        """Finish what the ledger says is erased, then run the follower, retention and scrub."""
        assert self.eraser is not None and self.retention is not None and self.scrubber is not None
        self.eraser.queue = queue
        if not await self.index.truncate_wal():  # after an erasure that could not truncate it
            log.warning("the index WAL could not be truncated at start (a reader kept it busy)")
        await self.eraser.catch_up()
        self._tasks = [
            asyncio.create_task(self._follow(), name="erasure follower"),
            asyncio.create_task(self.retention.loop(), name="retention"),
            asyncio.create_task(self.scrubber.loop(), name="scrub"),
        ]

    async def _follow(self) -> None:
        """Apply erasures that arrive by replication (or come back with a restored ledger)."""
        assert self.eraser is not None
        while True:
            await asyncio.sleep(self.config.erasure.poll_interval)
            try:
                await self.eraser.catch_up()
            except (
                Exception
            ) as exc:  # a failing look must not end the follower; the next one retries
                log.exception("applying erasures failed", error=f"{type(exc).__name__}: {exc}")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.scrubber is not None:
            await self.scrubber.stop()
        if self.state is not None:
            await self.state.close()

    # -- admin actions -------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        return {
            "erase": self._erase,
            "retention": self._retention,
            "scrub": self._scrub,
            "scrub-progress": self._scrub_progress,
        }

    async def _erase(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self.eraser is not None
        patient = _pseudonym_field(body, "patient", True)
        assert patient is not None
        reason = body.get("reason")
        if reason not in ADMIN_REASONS:
            raise ValueError(f"reason must be one of {', '.join(ADMIN_REASONS)}")
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ValueError("dry_run must be true or false")
        return await self.eraser.erase(
            patient, _pseudonym_field(body, "study", False), reason, dry_run=dry_run
        )

    async def _retention(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self.retention is not None
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ValueError("dry_run must be true or false")
        return await self.retention.run(dry_run=dry_run)

    async def _scrub(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self.scrubber is not None
        rate = body.get("max_rate_mb_s")
        if rate is not None and (
            not isinstance(rate, int | float) or isinstance(rate, bool) or rate <= 0
        ):
            raise ValueError("max_rate_mb_s must be a positive number or null")
        progress = await self.scrubber.start(
            study=_pseudonym_field(body, "study", False), rate_mb_s=rate, trigger="on demand"
        )
        return progress.json()

    async def _scrub_progress(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self.scrubber is not None
        pass_id = body.get("pass")
        if not isinstance(pass_id, int) or isinstance(pass_id, bool):
            raise ValueError("pass must be the integer a scrub request returned")
        found = await self.scrubber.progress(pass_id)
        if found is None:
            raise ValueError(f"no scrub pass {pass_id}")
        return found


# -- `dicomledger status` ------------------------------------------------------------------------


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def status_lines(config: Config) -> list[str]:
    """What `dicomledger status` says about the scrub and about other gateways' erasures;
    read-only, from ``lifecycle.db`` (nothing if the gateway never ran with it)."""
    path = config.lifecycle_db
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return _scrub_lines(db, config) + _request_lines(db)
    except sqlite3.Error as exc:
        return [f"lifecycle database {path} cannot be read: {exc}"]
    finally:
        db.close()


def _scrub_lines(db: sqlite3.Connection, config: Config) -> list[str]:
    lines = []
    full = db.execute(
        "SELECT id, trigger, started, finished, checked, bytes, unanchored FROM scrub_passes"
        " WHERE scope = 'full' AND state = 'complete' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    if full is None:
        lines.append("scrub: no full pass yet")
    else:
        pass_id, trigger, started, finished, checked, nbytes, unanchored = full
        findings = db.execute(
            "SELECT sop_instance_uid, path, severity, problem, alarm_index FROM scrub_findings WHERE pass_id = ?"
            " ORDER BY at",
            (pass_id,),
        ).fetchall()
        alarms = sum(f[2] == "alarm" for f in findings)
        lines.append(
            f"scrub: last full pass {_when(started)} to {_when(finished)} ({trigger}): {checked} instances, "
            f"{nbytes / 1e6:.1f} MB checked, {alarms} alarms, {len(findings) - alarms} warnings"
            + (f", {unanchored} not yet anchored" if unanchored else "")
        )
        for uid, file, severity, problem, alarm in findings[:20]:
            entry = f" (tamper-alarm entry {alarm})" if alarm is not None else ""
            lines.append(f"  {severity.upper()} {uid} {file}: {problem}{entry}")
        if len(findings) > 20:
            lines.append(f"  ... and {len(findings) - 20} more")
    running = db.execute(
        "SELECT id, scope, trigger, checked, bytes FROM scrub_passes WHERE state = 'running' ORDER BY id"
    ).fetchall()
    for pass_id, scope, trigger, checked, nbytes in running:
        lines.append(
            f"scrub: pass {pass_id} ({scope}, {trigger}) running: {checked} instances, "
            f"{nbytes / 1e6:.1f} MB checked so far"
        )
    if config.scrub.enabled:
        created = db.execute("SELECT value FROM meta WHERE key = 'created'").fetchone()
        base = full[2] if full is not None else (float(created[0]) if created else time.time())
        lines.append(
            f"scrub: next background pass due {_when(base + config.scrub.full_pass_days * 86400)} "
            f"(every {config.scrub.full_pass_days:g} days, at most {config.scrub.max_rate_mb_s:g} MB/s)"
        )
    else:
        lines.append("scrub: background passes disabled ([scrub] enabled = false)")
    return lines


def _request_lines(db: sqlite3.Connection) -> list[str]:
    lines = []
    pending = db.execute(
        "SELECT origin, idx, patient, study, reason, time_ms, held FROM erasure_requests WHERE state = 'pending'"
        " ORDER BY time_ms, origin, idx"
    ).fetchall()
    if pending:
        lines.append(f"erasure requests from other gateways NOT applied here: {len(pending)}")
    for origin, idx, patient, study, reason, time_ms, held in pending:
        scope = f"study {study[:12]}…" if study else "every study"
        lines.append(
            f"  {origin} entry {idx} ({reason}, {_when(time_ms / 1000)}): patient {patient[:12]}…, {scope}: "
            f"{held} copies held here; erase them with `dicomledger erase`, or add {origin} to "
            "[erasure] honour_from"
        )
    honoured = db.execute(
        "SELECT COUNT(*) FROM erasure_requests WHERE state = 'honoured'"
    ).fetchone()[0]
    if honoured:
        lines.append(f"erasures of other gateways applied here: {honoured}")
    return lines
