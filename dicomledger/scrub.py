"""The scrub: every stored instance re-hashed and its index row checked against the ledger,
in the background at a bounded read rate, and on demand (`dicomledger scrub`).

Per index row (``check``), with the same tamper check a retrieval makes before an instance
leaves (``tamper.py``):

* the anchoring entry must be this gateway's signed ``image-anchored`` entry of the instance;
* the row must agree with it: pixel hash and method, patient, study, series and instance
  pseudonyms, SOP class, transfer syntax, frames. A row edited in the database (say, its
  Patient ID, which would show the instance under another patient) disagrees;
* the stored file must be there and hash (under the entry's method) to the anchored hash.

Each failure is a ``tamper-alarm`` entry (``"found_by": "scrub"``) and an error log line, as
a retrieval raises them; a finding that persists is logged every pass but goes on the ledger
once. A header that differs from the one indexed at receipt (pixel data unchanged) is a
warning finding only: the anchor covers the pixels, and a retrieval serves such a file.

Rate: a background pass reads at most ``max_rate_mb_s`` and a new one starts
``full_pass_days`` after the last full pass started (the first that long after the gateway
first ran); an interrupted background pass resumes where it stopped. Passes, progress and
findings are kept in ``lifecycle.db`` for `dicomledger status`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from dicomledger.atna.trail import AuditSink, SentInstance
from dicomledger.config import ScrubConfig
from dicomledger.dicom.index import Index, InstanceRow
from dicomledger.dicom.pixelhash import PixelHashError, hash_instance_file
from dicomledger.ledger.entries import TAMPER_ALARM, EntryError, decode_entry
from dicomledger.ledger.log import LedgerStore, LedgerStoreError, LogWriter
from dicomledger.ledger.pseudonym import pseudonym
from dicomledger.lifecycle_state import Finding, LifecycleState, ScrubPass
from dicomledger.tamper import FILE_MISSING, PIXELS_DIFFER, alarm_payload, check_anchor

log = structlog.get_logger("dicomledger.scrub")

ALARM, WARNING = "alarm", "warning"
BATCH = 256


@dataclass(frozen=True)
class Problem:
    severity: str
    problem: str
    expected: str | None = None
    found: str | None = None


@dataclass
class Progress:
    """A pass as it runs (and, once done, as it ended)."""

    pass_id: int
    scope: str
    trigger: str
    total: int
    total_bytes: int
    cursor: int = 0
    checked: int = 0
    bytes: int = 0
    unanchored: int = 0
    findings: list[dict[str, Any]] = field(default_factory=list)
    state: str = "running"

    def json(self) -> dict[str, Any]:
        return {
            "pass": self.pass_id,
            "scope": self.scope,
            "trigger": self.trigger,
            "state": self.state,
            "total": self.total,
            "total_bytes": self.total_bytes,
            "checked": self.checked,
            "bytes": self.bytes,
            "unanchored": self.unanchored,
            "findings": self.findings,
        }


class Scrubber:
    def __init__(
        self,
        *,
        config: ScrubConfig,
        index: Index,
        ledger: LedgerStore,
        writer: LogWriter,
        storage_dir: Path,
        state: LifecycleState,
        secret: bytes,
        origin: str,
        lock: asyncio.Lock,
        audit: AuditSink | None = None,
        ae_title: str = "",
        host: str = "127.0.0.1",
    ) -> None:
        self.config = config
        self.index = index
        self.ledger = ledger
        self.writer = writer
        self.storage_dir = storage_dir
        self.state = state
        self.secret = secret
        self.origin = origin
        self.lock = lock  # shared with erasure
        self.audit = (
            audit or AuditSink()
        )  # the ATNA trail gets a Security Alert, as for a retrieval's alarm
        self.ae_title = ae_title
        self.host = host
        self.running: dict[int, Progress] = {}
        self._tasks: set[asyncio.Task[Progress]] = set()

    def _pseudonym(self, kind: str, value: str | None) -> str | None:
        return None if value is None else pseudonym(self.secret, kind, value)

    # -- one row ------------------------------------------------------------------------------

    async def check(self, row: InstanceRow) -> list[Problem]:
        """Everything wrong with one anchored index row and its stored file."""
        try:
            anchor = await self.ledger.entry(row.ledger_origin or "", row.ledger_index or 0)
        except LedgerStoreError:
            anchor = None
        instance = pseudonym(self.secret, "instance", row.sop_instance_uid)
        checked = check_anchor(anchor, self.writer.chain.entry_key, instance)
        if checked.problem is not None:  # as a retrieval: nothing to check the file against
            return [Problem(ALARM, checked.problem, checked.sha256)]
        problems = []
        disagree = self._disagreement(row, checked.payload or {})
        if disagree:
            problems.append(
                Problem(
                    ALARM,
                    f"index row disagrees with its anchoring entry: {', '.join(disagree)}",
                    checked.sha256,
                    row.sha256.hex(),
                )
            )
        expected, method = checked.sha256, checked.method
        try:
            hashes = await asyncio.to_thread(hash_instance_file, self.storage_dir / row.path)
        except FileNotFoundError:
            return [*problems, Problem(ALARM, FILE_MISSING, expected)]
        except (OSError, PixelHashError) as exc:
            return [
                *problems,
                Problem(ALARM, f"stored file cannot be read or hashed: {exc}", expected),
            ]
        found = hashes.sha256_for(method) if method is not None else None
        if found is None:
            problems.append(
                Problem(
                    ALARM,
                    f"stored file cannot be read or hashed: the file has {hashes.method} "
                    f"hashes, the anchor names {method!r}",
                    expected,
                )
            )
        elif found.hex() != expected:
            problems.append(Problem(ALARM, PIXELS_DIFFER, expected, found.hex()))
        elif hashes.header_sha256 != row.header_sha256:
            problems.append(
                Problem(
                    WARNING,
                    "the stored file's header differs from the one indexed at receipt "
                    "(pixel data unchanged)",
                    expected,
                    found.hex(),
                )
            )
        return problems

    def _disagreement(self, row: InstanceRow, payload: dict[str, Any]) -> list[str]:
        """The fields where the index row and its anchoring entry's payload differ."""
        decoded = row.decoded_sha256.hex() if row.decoded_sha256 is not None else None
        expected = {
            "sha256": row.sha256.hex(),
            "hash_method": row.hash_method,
            "decoded_sha256": decoded,
            "patient": self._pseudonym("patient", row.patient_id),
            "study": self._pseudonym("study", row.study_uid),
            "series": self._pseudonym("series", row.series_uid),
            "sop_class": row.sop_class_uid,
            "transfer_syntax": row.transfer_syntax_uid,
            "frames": row.number_of_frames,
        }
        return [name for name, value in expected.items() if payload.get(name) != value]

    # -- a pass -------------------------------------------------------------------------------

    async def _rows(self, progress: Progress, study: str | None) -> list[InstanceRow] | None:
        """The rows of one study (a study pass), or None: a full pass walks the index."""
        if study is None:
            return None
        uids = {
            s.study_uid
            for s in await self.index.studies()
            if pseudonym(self.secret, "study", s.study_uid) == study
        }
        patients = {s.patient_id for s in await self.index.studies() if s.study_uid in uids}
        rows = [r for uid in sorted(uids) for r in await self.index.rows_of(sorted(patients), uid)]
        progress.total, progress.total_bytes = len(rows), sum(r.size for r in rows)
        return rows

    async def start(
        self,
        *,
        study: str | None,
        rate_mb_s: float | None,
        trigger: str,
        resume: ScrubPass | None = None,
    ) -> Progress:
        """Begin a pass in the background; returns its progress (updated as it runs)."""
        record = await self.state.start_pass("study" if study else "full", trigger, resume)
        total, total_bytes = await self.index.totals()
        progress = Progress(record.id, record.scope, trigger, total, total_bytes)
        if resume is not None:
            progress.cursor, progress.checked, progress.bytes = (
                resume.cursor,
                resume.checked,
                resume.bytes,
            )
            progress.unanchored = resume.unanchored
            progress.findings = [_finding_json(f) for f in await self.state.findings(resume.id)]
        self.running[record.id] = progress
        task = asyncio.create_task(
            self._run(progress, study, rate_mb_s), name=f"scrub pass {record.id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return progress

    async def _run(
        self, progress: Progress, study: str | None, rate_mb_s: float | None
    ) -> Progress:
        started, base_bytes = time.monotonic(), progress.bytes
        last_saved = time.monotonic()
        log.info(
            "scrub pass started",
            scrub_pass=progress.pass_id,
            scope=progress.scope,
            trigger=progress.trigger,
            instances=progress.total,
            bytes=progress.total_bytes,
            resumed_at=progress.checked or None,
        )
        try:
            rows = await self._rows(progress, study)
            cursor, position = progress.cursor, 0
            while True:
                if rows is not None:  # a study: the rows listed at the start
                    batch = [(0, r) for r in rows[position : position + BATCH]]
                    position += BATCH
                else:  # everything: the index in rowid order, from where the pass stands
                    batch = await self.index.rows_after(cursor, BATCH)
                if not batch:
                    break
                for rowid, listed in batch:
                    await self._check_one(progress, listed)
                    cursor = max(cursor, rowid)
                    progress.cursor = cursor
                    if rate_mb_s:  # keep the pass within its read budget
                        ahead = (progress.bytes - base_bytes) / (rate_mb_s * 1e6) - (
                            time.monotonic() - started
                        )
                        if ahead > 0:
                            await asyncio.sleep(ahead)
                    if time.monotonic() - last_saved > 2:
                        await self._save(progress)
                        last_saved = time.monotonic()
            progress.state = "complete"
        except asyncio.CancelledError:
            progress.state = "interrupted"
            raise
        except Exception as exc:  # a bug or a failing database: the pass ends, the gateway goes on
            progress.state = "interrupted"
            log.exception(
                "scrub pass failed",
                scrub_pass=progress.pass_id,
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            await asyncio.shield(self._end(progress))
        return progress

    async def _save(self, progress: Progress) -> None:
        await self.state.progress(
            progress.pass_id,
            progress.cursor,
            progress.checked,
            progress.bytes,
            progress.unanchored,
            len(progress.findings),
        )

    async def _end(self, progress: Progress) -> None:
        await self._save(progress)
        await self.state.finish_pass(progress.pass_id, progress.state)
        self.running.pop(progress.pass_id, None)
        alarms = sum(f["severity"] == ALARM for f in progress.findings)
        (log.error if alarms else log.info)(
            "scrub pass ended",
            scrub_pass=progress.pass_id,
            state=progress.state,
            scope=progress.scope,
            checked=progress.checked,
            bytes=progress.bytes,
            unanchored=progress.unanchored,
            alarms=alarms,
            warnings=len(progress.findings) - alarms,
        )

    async def _check_one(self, progress: Progress, listed: InstanceRow) -> None:
        async with self.lock:  # an erasure does not remove it while we look
            row = await self.index.instance(listed.sop_instance_uid)
            if row is None or row.path != listed.path:
                return  # erased, or replaced by a newer version, since the batch was read
            progress.checked += 1
            progress.bytes += row.size
            if (
                row.ledger_index is None
            ):  # being stored right now (or a crash left it: anchored at start)
                progress.unanchored += 1
                return
            for problem in await self.check(row):
                await self._report(progress, row, problem)

    async def _report(self, progress: Progress, row: InstanceRow, p: Problem) -> None:
        path = self.storage_dir / row.path
        anchor = f"{row.ledger_origin} entry {row.ledger_index}"
        alarm_index = None
        if p.severity == ALARM:
            log.error(
                "TAMPER ALARM: stored instance failed the scrub",
                file=str(path),
                sop_instance=row.sop_instance_uid,
                found_by="scrub",
                anchored_sha256=row.sha256.hex(),
                found_sha256=p.found,
                problem=p.problem,
                anchor=anchor,
            )
            alarm_index = await self.state.earlier_alarm(row.sop_instance_uid, p.problem, p.found)
            if alarm_index is None:
                alarm_index = await self._alarm(row, p)
        else:
            log.warning(
                "scrub warning",
                file=str(path),
                sop_instance=row.sop_instance_uid,
                problem=p.problem,
                anchor=anchor,
            )
        finding = Finding(
            progress.pass_id,
            row.sop_instance_uid,
            row.path,
            p.severity,
            p.problem,
            p.expected,
            p.found,
            alarm_index,
            time.time(),
        )
        await self.state.add_finding(finding)
        progress.findings.append(_finding_json(finding))

    async def _alarm(self, row: InstanceRow, p: Problem) -> int:
        # The anchor's pseudonyms are the ledger's truth; a row's may have been edited.
        anchored: dict[str, Any] = {}
        try:
            anchored = dict(
                decode_entry(
                    await self.ledger.entry(row.ledger_origin or "", row.ledger_index or 0)
                ).payload
            )
        except (LedgerStoreError, EntryError):  # missing or undecodable: the row's own pseudonyms
            pass

        def named(kind: str, value: str | None) -> str:
            given = anchored.get(kind)
            return given if isinstance(given, str) else (self._pseudonym(kind, value) or "")

        payload = alarm_payload(
            patient=named("patient", row.patient_id),
            study=named("study", row.study_uid),
            instance=pseudonym(self.secret, "instance", row.sop_instance_uid),
            expected=p.expected,
            found=p.found,
            anchor_origin=row.ledger_origin,
            anchor_index=row.ledger_index,
            problem=p.problem,
            context={"found_by": "scrub"},
        )
        appended = await self.writer.append(TAMPER_ALARM, payload)
        self.audit.tamper_alarm(
            "scrub",
            calling_ae=self.ae_title,
            peer=f"{self.host}:0",
            destination=self.ae_title,
            instance=SentInstance(
                row.sop_class_uid,
                row.sop_instance_uid,
                self.storage_dir / row.path,
                payload["patient"],
                payload["study"],
                delivered=False,
            ),
            problem=p.problem,
        )
        return appended.index

    # -- on demand and in the background -------------------------------------------------------

    async def progress(self, pass_id: int) -> dict[str, Any] | None:
        running = self.running.get(pass_id)
        if running is not None:
            return running.json()
        record = await self.state.scrub_pass(pass_id)
        if record is None:
            return None
        return {
            "pass": record.id,
            "scope": record.scope,
            "trigger": record.trigger,
            "state": record.state,
            "total": record.checked,
            "total_bytes": record.bytes,
            "checked": record.checked,
            "bytes": record.bytes,
            "unanchored": record.unanchored,
            "findings": [_finding_json(f) for f in await self.state.findings(record.id)],
        }

    async def loop(self) -> None:
        """Background passes: one every ``full_pass_days``, at most ``max_rate_mb_s``."""
        if not self.config.enabled:
            return
        period = self.config.full_pass_days * 86400
        while True:
            last = await self.state.last_pass("full", state="complete")
            stopped = await self.state.last_pass("full", state="interrupted", trigger="background")
            if stopped is not None and (last is None or stopped.id > last.id):
                progress = await self.start(
                    study=None,
                    rate_mb_s=self.config.max_rate_mb_s,
                    trigger="background",
                    resume=stopped,
                )
            else:
                due = (last.started if last is not None else await self.state.created()) + period
                if time.time() < due:
                    await asyncio.sleep(min(60.0, due - time.time()))
                    continue
                progress = await self.start(
                    study=None, rate_mb_s=self.config.max_rate_mb_s, trigger="background"
                )
            while progress.state == "running":
                await asyncio.sleep(0.2)
            if progress.state != "complete":
                await asyncio.sleep(60.0)  # it failed: do not spin

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _finding_json(f: Finding) -> dict[str, Any]:
    return {
        "sop_instance_uid": f.sop_instance_uid,
        "path": f.path,
        "severity": f.severity,
        "problem": f.problem,
        "expected": f.expected,
        "found": f.found,
        "alarm_index": f.alarm_index,
    }
