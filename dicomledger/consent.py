"""Consent drives forwarding: a grant sends the patient's images this gateway already stores.

At ingest, a received instance is routed once (``Forwarder.route``): queued for a destination
the patient's permissions authorise, refused (a ``forward-refused`` entry) for the others.
Consent often comes later. ``ConsentForwarding`` watches the ledger this gateway holds (its
own log and every peer's it replicates) for new permission records: a grant signed here, or
one recorded at another site and arrived by gossip. For each patient with a new record, and
each configured destination, it takes the patient's stored instances that the routes send
there and that the permissions now allow (a study-scoped grant: that study only), leaves out
those already delivered (a ``forwarded`` entry of this gateway, or a done job) or already in
the queue (queued, failing or parked), and queues the others: a job refused because a revoke
came before it was due is queued again. Each (destination, grant) that queued something gets
one ``forwards-queued`` entry on the ledger saying how many (docs/ledger-formats.md).

Any new permission record starts the check, a revocation too: what a record changes is
decided on the whole history, as every decision is (a grant whose ancestry arrives later may
come into force then). Nothing is queued that the permissions do not allow at that moment,
and the worker checks again when the job is due, so a revoke between grant and delivery
stops the rest (``forward-refused``).

Crash safety: the jobs and the entry to append are committed in one forward-queue
transaction; the entry is appended after it. A crash in between leaves the entry pending:
the next scan appends it, unless the log already holds it (a crash after the append, before
it was marked). The scan marks (how far each log was read) move only after the patients
found were handled; re-handling a patient queues nothing twice.

Grants recorded before the first scan (the first start of a gateway with forwarding on this
version) queue nothing: the scan starts at the logs' ends then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from dicomledger.config import DestinationConfig, ForwardingConfig
from dicomledger.dicom.index import Index, IndexStoreError, InstanceRow
from dicomledger.forwarding import (
    Backfill,
    BackfillCounts,
    Forwarder,
    ForwardItem,
    ForwardQueueError,
)
from dicomledger.ledger.entries import FORWARDED, FORWARDS_QUEUED, EntryError, decode_entry
from dicomledger.ledger.log import LedgerStore, LedgerStoreError, LogWriter
from dicomledger.ledger.permission_book import PermissionBook
from dicomledger.ledger.permissions import Grant
from dicomledger.ledger.pseudonym import pseudonym

log = structlog.get_logger("dicomledger.consent")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

SCAN_INTERVAL = 1.0  # seconds between looks at the ledger for records that arrived by gossip


@dataclass
class _Group:
    """A destination's instances that one grant authorises."""

    grant: Grant
    to_queue: list[ForwardItem] = field(default_factory=list)
    delivered: int = 0  # by a forwarded entry of this gateway


def forwards_queued_payload(
    dest: DestinationConfig, patient: str, grant: Grant, delivered: int, counts: BackfillCounts
) -> dict[str, Any]:
    """The forwards-queued entry: pseudonyms, the grant's ref and scope, and counts; no PHI."""
    return {
        "destination": dest.ae_title,
        "site": dest.site,
        "patient": patient,
        "study": grant.study,
        "grant": grant.ref,
        "queued": counts.queued,
        "already_delivered": delivered + counts.done,
        "already_queued": counts.waiting,
    }


class ConsentForwarding:
    def __init__(
        self,
        config: ForwardingConfig,
        forwarder: Forwarder,
        ledger: LedgerStore,
        index: Index,
        book: PermissionBook,
        writer: LogWriter,
        secret: bytes,
        origin: str,
        interval: float = SCAN_INTERVAL,
    ) -> None:
        self.config = config
        self.forwarder = forwarder
        self.queue = forwarder.queue
        self.ledger = ledger
        self.index = index
        self.book = book
        self.writer = writer
        self.secret = secret
        self.origin = origin
        self.interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_error: str | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="consent forwarding")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        """Look at the ledger now (a permission record was just signed here)."""
        self._wake.set()

    def then_scan(self, handler: Handler) -> Handler:
        """``handler`` (an admin action that signs a permission record), followed by a scan."""

        async def handle(body: dict[str, Any]) -> dict[str, Any]:
            answer = await handler(body)
            self.wake()
            return answer

        return handle

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before the scan: a record signed during it wakes the next one
            try:
                await self.scan()
                self._last_error = None
            except (LedgerStoreError, IndexStoreError, ForwardQueueError) as exc:
                if str(exc) != self._last_error:  # once per problem, not every second
                    log.error("consent scan failed; trying again", error=str(exc))
                self._last_error = str(exc)
            except Exception as exc:  # a bug must not end consent-driven forwarding
                log.exception(
                    "consent scan failed unexpectedly", error=f"{type(exc).__name__}: {exc}"
                )
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass

    async def scan(self) -> None:
        """Append pending forwards-queued entries, then handle every patient with permission
        records the logs gained since the last scan."""
        await self._append_pending()
        marks = await self.queue.consent_scan_marks()
        sizes = {o.name: await self.ledger.size(o.name) for o in await self.ledger.origins()}
        if marks is None:
            await self.queue.start_consent_scan(sizes)
            log.info(
                "consent-driven forwarding starts at the ledger's current end", logs=len(sizes)
            )
            return
        patients: set[str] = set()
        moved: dict[str, int] = {}
        for origin, size in sizes.items():
            start = marks.get(origin, 0)  # a log first seen now: all of its records are new
            if size > start:
                patients |= {
                    key.removeprefix("perm:")
                    for key in await self.ledger.keys_between(origin, "perm:", start, size)
                }
                moved[origin] = size
        for patient in sorted(patients):
            await self.follow(patient)
        if moved:
            await self.queue.set_consent_scan_marks(moved)

    async def follow(self, patient: str) -> None:
        """Queue the stored instances of ``patient`` that the permissions now allow and that
        are neither delivered nor in the queue, per destination the routes send them to."""
        anchors = [
            idx
            for origin, idx in await self.ledger.find(f"patient:{patient}")
            if origin == self.origin
        ]
        if not anchors:
            return  # no image of this patient stored here
        items = [
            self._item(row, modality, patient)
            for row, modality in await self.index.anchored_by(self.origin, anchors)
            if row.study_uid is not None
        ]  # (None: a row from before schema 2, not yet read)
        if not items:
            return
        delivered: set[tuple[str, str, str]] | None = None  # read once, and only if needed
        today = datetime.now(UTC).date().isoformat()
        for dest in self.config.destinations:
            routed = [it for it in items if dest in self.forwarder.destinations_for(it)]
            if not routed:
                continue
            decisions = await self.book.decide_all(
                sorted({(patient, it.study) for it in routed}),
                ae=dest.ae_title,
                site=dest.site,
                today=today,
            )
            groups: dict[str, _Group] = {}
            for item in routed:
                decision = decisions[patient, item.study]
                if not decision.allowed or decision.grant is None:
                    continue  # e.g. the new record was a revoke
                if delivered is None:
                    delivered = await self._delivered(patient)
                group = groups.setdefault(decision.grant.ref, _Group(decision.grant))
                if (dest.ae_title, item.instance, item.sha256) in delivered:
                    group.delivered += 1
                else:
                    group.to_queue.append(item)
            for group in groups.values():
                if group.to_queue:
                    await self._queue(dest, patient, group)

    async def _queue(self, dest: DestinationConfig, patient: str, group: _Group) -> None:
        def entry(counts: BackfillCounts) -> dict[str, Any]:
            return forwards_queued_payload(dest, patient, group.grant, group.delivered, counts)

        backfill = await self.queue.backfill(dest.ae_title, group.to_queue, entry)
        if backfill is None:
            return  # all of them delivered or waiting already
        try:
            appended = await self.writer.append(FORWARDS_QUEUED, backfill.payload)
            await self.queue.backfill_recorded(backfill.id, appended.index)
        finally:  # the jobs are queued: send them even if their entry must wait (_append_pending)
            self.forwarder.wake(dest.ae_title)
        p = backfill.payload
        log.info(
            "stored instances queued by a grant",
            destination=dest.ae_title,
            patient=patient[:12],
            grant=group.grant.ref[:16],
            queued=p["queued"],
            already_delivered=p["already_delivered"],
            already_queued=p["already_queued"],
            entry=appended.index,
        )

    async def _append_pending(self) -> None:
        """Append the entries of backfills committed but not recorded (a crash between the
        two, or a ledger failure), unless the log holds one already."""
        pending = await self.queue.unrecorded_backfills()
        if not pending:
            return
        recorded = await self.queue.recorded_backfill_entries()
        for backfill in pending:
            index = await self._logged(backfill, recorded)
            if index is None:
                index = (await self.writer.append(FORWARDS_QUEUED, backfill.payload)).index
                log.warning(
                    "forwards-queued entry appended after a restart or a ledger failure",
                    destination=backfill.payload.get("destination"),
                    entry=index,
                )
            await self.queue.backfill_recorded(backfill.id, index)
            recorded.add(index)
            self.forwarder.wake(str(backfill.payload.get("destination")))

    async def _logged(self, backfill: Backfill, recorded: set[int]) -> int | None:
        """The index of a forwards-queued entry of ours with this payload that no backfill claims."""
        for index, kind, payload in await self._own_activity(str(backfill.payload.get("patient"))):
            if kind == FORWARDS_QUEUED and index not in recorded and payload == backfill.payload:
                return index
        return None

    async def _delivered(self, patient: str) -> set[tuple[str, str, str]]:
        """(destination, instance, pixel hash) of this gateway's forwarded entries of ``patient``."""
        return {
            (str(p.get("destination")), str(p.get("instance")), str(p.get("sha256")))
            for _, kind, p in await self._own_activity(patient)
            if kind == FORWARDED
        }

    async def _own_activity(self, patient: str) -> list[tuple[int, str, dict[str, Any]]]:
        """(index, kind, payload) of this gateway's activity entries about ``patient``."""
        found = []
        for origin, idx in await self.ledger.find(f"activity:{patient}"):
            if origin != self.origin:
                continue
            try:
                entry = decode_entry(await self.ledger.entry(origin, idx))
            except EntryError as exc:  # `dicomledger verify` names it
                log.error(
                    "ledger entry unreadable; left out", origin=origin, index=idx, error=str(exc)
                )
                continue
            found.append((idx, entry.kind, dict(entry.payload)))
        return found

    def _item(self, row: InstanceRow, modality: str | None, patient: str) -> ForwardItem:
        return ForwardItem(
            sop_instance_uid=row.sop_instance_uid,
            sop_class_uid=row.sop_class_uid,
            transfer_syntax_uid=row.transfer_syntax_uid,
            path=row.path,
            calling_ae=row.calling_ae,
            modality=modality,
            patient=patient,
            study=pseudonym(self.secret, "study", str(row.study_uid)),
            instance=pseudonym(self.secret, "instance", row.sop_instance_uid),
            sha256=row.sha256.hex(),
        )
