"""Storage Commitment (PS3.4 Annex J): what the gateway commits to, its ledger record, and
the report's delivery on a new association when the requesting one cannot carry it.

An instance is committed only if it is durable, indexed and anchored with the SOP class the
requestor names: its index row exists (written only after the file's fsync and the anchor's
commit), cites its ledger anchor, has that SOP class, and its stored file is there. Otherwise
it is failed with the standard reason: 0x0112 (no such object instance), 0x0119 (class /
instance conflict) or 0x0110 (processing failure: stored but not anchored, its file missing, or
our databases failing).

Every report is recorded on the ledger before it is sent: a ``storage-committed`` entry with
the requestor's AE title, the Transaction UID and the counts (no instance UIDs, no PHI), so an
auditor sees "committed N instances to AE X" and when.

The report on a new association (docs/design.md, "Storage Commitment"): the gateway is the
association requestor and remains the SCP of the SOP class (it proposes the SCP role). It uses
pynetdicom's SCU in a worker thread for that one association (the asyncio requestor is not on
this branch). A report that cannot be delivered is logged; the requestor asks again (a modality
re-requests a transaction that got no report), and the answer is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role

from dicomledger.config import StorageCommitmentConfig
from dicomledger.dicom.index import Index, IndexStoreError
from dicomledger.dicom.net.commitment import (
    FAILURE_CLASS_INSTANCE_CONFLICT,
    FAILURE_NO_SUCH_OBJECT_INSTANCE,
    FAILURE_PROCESSING,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentReport,
    CommitmentRequest,
)
from dicomledger.ledger.entries import STORAGE_COMMITTED
from dicomledger.ledger.log import LedgerStoreError, LogWriter
from dicomledger.metrics import IngestMetrics

log = structlog.get_logger("dicomledger.commitment")

DELIVERY_ATTEMPTS = 3
DELIVERY_RETRY_SECONDS = 2.0


class StorageCommitment:
    def __init__(
        self,
        config: StorageCommitmentConfig,
        *,
        ae_title: str,
        index: Index,
        storage_dir: Path,
        writer: LogWriter,
        destinations: dict[str, tuple[str, int]],
        metrics: IngestMetrics | None = None,
    ) -> None:
        self.config = config
        self.ae_title = ae_title
        self.index = index
        self.storage_dir = storage_dir
        self.writer = writer
        self.destinations = destinations  # [[destinations]] by AE title: a fallback address
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="commitment-report")
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the decision ----------------------------------------------------------------------

    async def decide(self, request: CommitmentRequest) -> CommitmentReport:
        committed: list[tuple[str, str]] = []
        failed: list[tuple[str, str, int]] = []
        for sop_class, sop_instance in request.references:
            reason = await self._failure_reason(sop_class, sop_instance)
            if reason is None:
                committed.append((sop_class, sop_instance))
            else:
                failed.append((sop_class, sop_instance, reason))
        reasons = Counter(f"0x{r:04X}" for _, _, r in failed)
        try:
            entry = await self.writer.append(
                STORAGE_COMMITTED,
                {
                    "requestor": request.calling_ae,
                    "transaction_uid": request.transaction_uid,
                    "committed": len(committed),
                    "failed": len(failed),
                    "failure_reasons": dict(sorted(reasons.items())),
                },
            )
        except LedgerStoreError as exc:
            # Not recorded, so not promised: every instance fails; the requestor asks again later.
            log.error(
                "storage commitment not recorded on the ledger: every instance reported failed",
                calling_ae=request.calling_ae,
                transaction_uid=request.transaction_uid,
                error=str(exc),
            )
            failed = [(c, i, FAILURE_PROCESSING) for c, i in request.references]
            committed, entry_index, reasons = (
                [],
                None,
                Counter({f"0x{FAILURE_PROCESSING:04X}": len(failed)}),
            )
        else:
            entry_index = entry.index
        if self.metrics is not None:
            self.metrics.committed("committed", len(committed))
            self.metrics.committed("failed", len(failed))
        log.info(
            "storage commitment",
            calling_ae=request.calling_ae,
            peer=request.peer,
            transaction_uid=request.transaction_uid,
            committed=len(committed),
            failed=len(failed),
            failure_reasons=dict(reasons),
            entry=entry_index,
        )
        return CommitmentReport(
            request.transaction_uid, tuple(committed), tuple(failed), self.ae_title
        )

    async def _failure_reason(self, sop_class: str, sop_instance: str) -> int | None:
        try:
            row = await self.index.instance(sop_instance)
        except IndexStoreError:
            return FAILURE_PROCESSING
        if row is None:
            return FAILURE_NO_SUCH_OBJECT_INSTANCE
        if row.sop_class_uid != sop_class:
            return FAILURE_CLASS_INSTANCE_CONFLICT
        if row.ledger_index is None:  # stored, its anchor not yet durable (or lost in a crash)
            return FAILURE_PROCESSING
        if not await asyncio.to_thread((self.storage_dir / row.path).is_file):
            return FAILURE_PROCESSING
        return None

    # -- delivery on a new association -----------------------------------------------------

    def address_of(self, ae_title: str) -> tuple[str, int] | None:
        requestor = self.config.requestor(ae_title)
        if requestor is not None:
            return requestor.host, requestor.port
        return self.destinations.get(ae_title)

    def deliver_elsewhere(
        self, request: CommitmentRequest, report: CommitmentReport, why_not_here: str
    ) -> None:
        address = self.address_of(request.calling_ae)
        if address is None:
            log.error(
                "storage commitment report not delivered: no address for the requestor (add it under "
                "[[commitment_requestors]])",
                calling_ae=request.calling_ae,
                transaction_uid=report.transaction_uid,
                reason=why_not_here,
            )
            return
        task = asyncio.get_running_loop().create_task(
            self._deliver(request, report, address, why_not_here)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(
        self,
        request: CommitmentRequest,
        report: CommitmentReport,
        address: tuple[str, int],
        why_not_here: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        problem = ""
        for attempt in range(1, DELIVERY_ATTEMPTS + 1):
            problem = await loop.run_in_executor(
                self._pool, self._send_report, request.calling_ae, address, report
            )
            if not problem:
                log.info(
                    "storage commitment report delivered",
                    calling_ae=request.calling_ae,
                    address=f"{address[0]}:{address[1]}",
                    transaction_uid=report.transaction_uid,
                    committed=len(report.committed),
                    failed=len(report.failed),
                    event_type=report.event_type,
                    association="new",
                    why_not_on_the_request=why_not_here,
                    attempt=attempt,
                )
                return
            if attempt < DELIVERY_ATTEMPTS:
                await asyncio.sleep(DELIVERY_RETRY_SECONDS * attempt)
        log.error(
            "storage commitment report not delivered",
            calling_ae=request.calling_ae,
            address=f"{address[0]}:{address[1]}",
            transaction_uid=report.transaction_uid,
            reason=problem,
            attempts=DELIVERY_ATTEMPTS,
        )

    def _send_report(
        self, called_ae: str, address: tuple[str, int], report: CommitmentReport
    ) -> str:
        """Worker thread: one association, one N-EVENT-REPORT; '' once the requestor took it."""
        ae = AE(ae_title=self.ae_title)
        timeout = self.config.report_timeout
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        ae.add_requested_context(
            STORAGE_COMMITMENT_PUSH, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        # We stay the SCP of the SOP class while requesting the association (PS3.4 J.3.3)
        role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
        assoc = ae.associate(address[0], address[1], ae_title=called_ae, ext_neg=[role])
        if not assoc.is_established:
            return "association refused or not established"
        try:
            status, _reply = assoc.send_n_event_report(
                report.event_information(),
                report.event_type,
                STORAGE_COMMITMENT_PUSH,
                STORAGE_COMMITMENT_INSTANCE,
            )
            if status is None or "Status" not in status:
                return "no N-EVENT-REPORT-RSP"
            if status.Status != 0x0000:
                return f"N-EVENT-REPORT-RSP status 0x{status.Status:04X}"
            return ""
        except (ValueError, RuntimeError) as exc:  # no accepted context, association gone
            return f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(Exception):
                if assoc.is_established:
                    assoc.release()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
