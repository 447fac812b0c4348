"""Erasure: a patient's (or one study's) stored files, index rows and pending forward jobs
leave the gateway; an ``erased`` entry on the ledger says so (``ledger/erasure.py``).

The order makes a crash at any point safe (``docs/erasure.md``):

1. the ``erased`` entry E is appended (durable): from here on the erasure *will* happen;
2. the instances' forward jobs are deleted (nothing of them is sent any more);
3. their index rows go, in one transaction that lists their files in the index's
   ``erasing`` table (secure_delete, WAL truncated): C-FIND and retrievals no longer see them;
4. the files go, then their ``erasing`` rows.

After a crash, E is an erasure this gateway has not marked done (``lifecycle.db``), so the
next start applies it again: rows of the patient anchored before E are erased (step 2 on),
and files still listed in ``erasing`` are removed. An instance received after E is not
covered, so a patient who comes back later keeps the new images.

The same path serves retention (reason ``retention``) and other gateways' erasures: a gateway
configured to honour erasures from a custodian erases the copies it holds of the instances
that custodian's erasure covers and writes its own ``erased`` entry citing it; otherwise the
request is kept for `dicomledger status` (``lifecycle_state.py``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from dicomledger.common.errors import ConfigurationError
from dicomledger.dicom.index import Index, InstanceRow
from dicomledger.dicom.store import FileStore
from dicomledger.forwarding import ForwardQueue
from dicomledger.ledger.entries import ERASED
from dicomledger.ledger.erasure import (
    CUSTODIAN_ERASURE,
    EntryRef,
    Erasure,
    ErasureFormatError,
    erasures_of,
    make_erased_payload,
    read_erasure,
    requested_instances,
)
from dicomledger.ledger.log import LedgerStore, LogWriter
from dicomledger.ledger.pseudonym import pseudonym
from dicomledger.lifecycle_state import ErasureRequest, LifecycleState

log = structlog.get_logger("dicomledger.erasure")


def truncate_wal(database: Path) -> bool:
    """Checkpoint another component's SQLite database and cut its WAL to zero bytes (its old
    page images hold what was deleted); False if a reader kept it busy."""
    db = sqlite3.connect(database, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy
    except sqlite3.Error as exc:
        log.warning(
            "cannot truncate the WAL after an erasure", database=str(database), error=str(exc)
        )
        return False
    finally:
        db.close()


class NothingToErase(ConfigurationError, ValueError):
    """No stored instance matches the erasure; nothing was written."""


@dataclass(frozen=True)
class ErasurePlan:
    patient: str  # pseudonym
    study: str | None  # pseudonym; None: every study
    rows: list[InstanceRow]  # the instances to erase
    files: int  # stored files: current versions and earlier ones
    forward_jobs: int  # still to be sent

    @property
    def studies(self) -> list[str]:
        """The study UIDs of the instances (local: never leaves the gateway's admin interface)."""
        return sorted({r.study_uid for r in self.rows if r.study_uid})


class Eraser:
    def __init__(
        self,
        *,
        index: Index,
        ledger: LedgerStore,
        writer: LogWriter,
        files: FileStore,
        queue: ForwardQueue | None,
        state: LifecycleState,
        secret: bytes,
        origin: str,
        lock: asyncio.Lock,
        honour_from: tuple[str, ...],
        audit_queue: Path | None = None,
    ) -> None:
        self.index = index
        self.ledger = ledger
        self.writer = writer
        self.files = files
        self.queue = queue
        self.state = state
        self.secret = secret
        self.origin = origin
        self.lock = lock  # shared with the scrub: an instance is never checked while it is erased
        self.honour_from = honour_from
        # The ATNA queue: its sent messages, which name patients, must not stay in its WAL.
        self.audit_queue = audit_queue

    def _pseudonym(self, kind: str, value: str) -> str:
        return pseudonym(self.secret, kind, value)

    # -- planning -----------------------------------------------------------------------------

    async def plan(
        self,
        patient: str,
        study: str | None = None,
        *,
        before: int | None = None,
        instances: frozenset[str] | None = None,
        patient_ids: list[str] | None = None,
    ) -> ErasurePlan:
        """What erasing ``patient`` (a pseudonym; the Patient IDs are found by it) or one of
        its studies removes now: instances anchored by this gateway (before entry ``before``;
        of ``instances``, by pseudonym, if given)."""
        if patient_ids is None:
            patient_ids = [
                p
                for p in await self.index.patient_ids()
                if self._pseudonym("patient", p) == patient
            ]
        rows = [
            r
            for r in await self.index.rows_of(patient_ids)
            if r.ledger_origin == self.origin
            and r.ledger_index is not None
            and (before is None or r.ledger_index < before)
            and (
                study is None
                or (r.study_uid is not None and self._pseudonym("study", r.study_uid) == study)
            )
            and (instances is None or self._pseudonym("instance", r.sop_instance_uid) in instances)
        ]
        uids = [r.sop_instance_uid for r in rows]
        files = {r.path for r in rows} | set(await self.index.superseded_paths(uids))
        jobs = await self.queue.pending_of(uids) if self.queue is not None else 0
        return ErasurePlan(patient, study, rows, len(files), jobs)

    async def describe(self, plan: ErasurePlan) -> list[dict[str, Any]]:
        """The studies a plan erases, for the administrator: UID, Patient ID, date,
        modalities, how many of its instances go (local admin interface only)."""
        per_study = Counter((r.study_uid, r.patient_id) for r in plan.rows)
        summaries: dict[tuple[str | None, str | None], Any] = {
            (s.study_uid, s.patient_id): s
            for s in await self.index.studies(
                sorted({r.patient_id for r in plan.rows if r.patient_id})
            )
        }
        lines = []
        for (study_uid, patient_id), count in sorted(
            per_study.items(), key=lambda kv: (kv[0][0] or "", kv[0][1] or "")
        ):
            s = summaries.get((study_uid, patient_id))
            lines.append(
                {
                    "study_uid": study_uid,
                    "patient_id": patient_id,
                    "study_date": s.study_date if s else "",
                    "modalities": list(s.modalities) if s else [],
                    "instances": count,
                    "description": s.description if s else "",
                }
            )
        return lines

    # -- erasing ------------------------------------------------------------------------------

    async def erase(
        self,
        patient: str,
        study: str | None,
        reason: str,
        *,
        dry_run: bool = False,
        patient_ids: list[str] | None = None,
    ) -> dict[str, Any]:
        """Erase now (or, with ``dry_run``, say what would go). NothingToErase if nothing
        of it is stored here."""
        async with self.lock:
            plan = await self.plan(patient, study, patient_ids=patient_ids)
            answer = {
                "instances": len(plan.rows),
                "files": plan.files,
                "forward_jobs": plan.forward_jobs,
                "studies": await self.describe(plan),
                "dry_run": dry_run,
            }
            if not plan.rows:
                raise NothingToErase(
                    "nothing of this patient is stored here"
                    if study is None
                    else "nothing of this patient in this study is stored here"
                )
            if dry_run:
                return answer
            erasure = await self._record(plan, reason, None)
        await self._requests_resolved(patient)
        return {**answer, "origin": self.origin, "index": erasure}

    async def _record(self, plan: ErasurePlan, reason: str, request: EntryRef | None) -> int:
        """Append the erased entry, then apply it; with the lock held. Returns its index."""
        payload = make_erased_payload(
            patient=plan.patient,
            study=plan.study,
            studies=[self._pseudonym("study", s) for s in plan.studies],
            instances=len(plan.rows),
            files=plan.files,
            forward_jobs=plan.forward_jobs,
            reason=reason,
            request=request,
        )
        appended = await self.writer.append(ERASED, payload)
        log.info(
            "erasure recorded",
            entry=appended.index,
            patient=plan.patient,
            study=plan.study,
            reason=reason,
            instances=len(plan.rows),
            files=plan.files,
            forward_jobs=plan.forward_jobs,
            request=None if request is None else f"{request.origin} entry {request.index}",
        )
        await self._apply(plan.rows, appended.index)
        await self.state.mark_seen(self.origin, appended.index)
        log.info("erased", entry=appended.index, instances=len(plan.rows), files=plan.files)
        return appended.index

    async def _apply(self, rows: list[InstanceRow], before: int) -> None:
        """Steps 2-4 for ``rows`` (entry ``before`` is durable already)."""
        uids = [r.sop_instance_uid for r in rows]
        if self.queue is not None:
            await self.queue.cancel(uids)
        paths, truncated = await self.index.erase(uids, self.origin, before)
        log.info(
            "erased instances are out of the index; removing their files",
            entry=before,
            files=len(paths),
        )
        truncated = await self._remove_files() and truncated
        await self.state.forget_instances(uids)
        if self.audit_queue is not None and self.audit_queue.exists():
            truncated = await asyncio.to_thread(truncate_wal, self.audit_queue) and truncated
        if not truncated:
            log.warning(
                "a WAL could not be truncated after an erasure (a reader kept it busy): deleted "
                "rows may stay in it until the next erasure or the next start"
            )

    async def _remove_files(self) -> bool:
        """Remove every file listed in the index's ``erasing`` table."""
        paths = await self.index.erasing()
        if not paths:
            return await self.index.truncate_wal()
        await asyncio.to_thread(self.files.remove, paths)
        return await self.index.erased_files_removed(paths)

    # -- erasures on the ledger: own ones to finish, other gateways' to honour ----------------

    async def catch_up(self) -> None:
        """Apply every erasure held in the ledger that this gateway has not acted on: its own
        ones a crash interrupted (or a restored backup predates), then other gateways'."""
        async with self.lock:
            leftover = await self.index.erasing()
            if leftover:
                await self._remove_files()
                log.warning(
                    "removed the files of an erasure interrupted by a crash", files=len(leftover)
                )
        seen = await self.state.seen_erasures()
        found = [ref for ref in await self.ledger.find("erased") if ref not in seen]
        for origin, index in sorted(found, key=lambda ref: (ref[0] != self.origin, ref)):
            try:
                erasure = await read_erasure(self.ledger, origin, index)
            except ErasureFormatError as exc:
                log.error(
                    "erasure entry cannot be read; not applied",
                    origin=origin,
                    entry=index,
                    error=str(exc),
                )
            else:
                if origin == self.origin:
                    await self._finish_own(erasure)
                else:
                    await self._consider(erasure)
            await self.state.mark_seen(origin, index)
        for request in await self.state.requests(state="pending"):
            if request.origin in self.honour_from:  # configured since it was kept pending
                await self._consider(await read_erasure(self.ledger, request.origin, request.index))

    async def _requested(self, erasure: Erasure) -> frozenset[str] | None:
        if erasure.request is None:
            return None
        try:
            return await requested_instances(
                self.ledger,
                await read_erasure(self.ledger, erasure.request.origin, erasure.request.index),
            )
        except ErasureFormatError:
            return frozenset()

    async def _finish_own(self, erasure: Erasure) -> None:
        requested = await self._requested(erasure)
        async with self.lock:
            plan = await self.plan(
                erasure.patient, erasure.study, before=erasure.index, instances=requested
            )
            if plan.rows:
                await self._apply(plan.rows, erasure.index)
                log.warning(
                    "erasure completed: it had been interrupted, or the data was restored from "
                    "an older backup",
                    entry=erasure.index,
                    instances=len(plan.rows),
                )

    async def _consider(self, erasure: Erasure) -> None:
        """Another gateway's erasure: erase our copies of what it covers if we honour that
        gateway, else keep it for `status` while we hold copies."""
        mine = [
            e
            for e in await erasures_of(self.ledger, erasure.patient)
            if e.origin == self.origin and e.request == EntryRef(erasure.origin, erasure.index)
        ]
        if mine:  # applied before (its own entry is finished by _finish_own)
            await self._keep(erasure, "honoured", mine[0].instances, mine[0].index)
            return
        covered = await requested_instances(self.ledger, erasure)
        async with self.lock:
            plan = await self.plan(erasure.patient, erasure.study, instances=covered)
            if not plan.rows:
                await self._keep(erasure, "not held", 0, None)
                return
            if erasure.origin not in self.honour_from:
                await self._keep(erasure, "pending", len(plan.rows), None)
                log.warning(
                    "erasure by another gateway not applied: its origin is not in [erasure] honour_from",
                    origin=erasure.origin,
                    entry=erasure.index,
                    patient=erasure.patient,
                    copies_held=len(plan.rows),
                )
                return
            index = await self._record(
                plan, CUSTODIAN_ERASURE, EntryRef(erasure.origin, erasure.index)
            )
        await self._keep(erasure, "honoured", len(plan.rows), index)
        await self._requests_resolved(erasure.patient)

    async def _keep(self, erasure: Erasure, state: str, held: int, entry: int | None) -> None:
        await self.state.record_request(
            ErasureRequest(
                erasure.origin,
                erasure.index,
                erasure.patient,
                erasure.study,
                erasure.reason,
                erasure.time_ms,
                state,
                held,
                entry,
            )
        )

    async def _requests_resolved(self, patient: str) -> None:
        """After an erasure of ``patient`` here, recount the copies pending requests name."""
        for request in await self.state.requests(state="pending", patient=patient):
            erasure = await read_erasure(self.ledger, request.origin, request.index)
            plan = await self.plan(
                patient, erasure.study, instances=await requested_instances(self.ledger, erasure)
            )
            await self._keep(erasure, "pending" if plan.rows else "resolved", len(plan.rows), None)
