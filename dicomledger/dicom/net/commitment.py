"""Storage Commitment Push Model SCP (PS3.4 Annex J) on the asyncio layer.

An N-ACTION-RQ (Action Type 1, Request Storage Commitment) carries a Transaction UID and the
Referenced SOP Sequence. The service answers the N-ACTION-RSP at once, asks ``decide`` (the
gateway: which instances it holds durably) for the report, and sends the N-EVENT-REPORT-RQ
(Event Type 1: all committed, 2: some failed) on the same association, waiting for its
N-EVENT-REPORT-RSP. If the requestor releases or drops the association first, does not answer
in time, or answers with a failure, the report goes to ``deliver_elsewhere``: a new association
to the requestor's configured address (the gateway does that, off this association).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID
from pynetdicom.dsutils import decode, encode

from dicomledger.dicom.net import dimse
from dicomledger.dicom.net.dimse import (
    ACTION_TYPE_ID,
    REQUESTED_SOP_CLASS_UID,
    REQUESTED_SOP_INSTANCE_UID,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    uid_problem,
)
from dicomledger.dicom.net.operation import MemorySink, Operation, Refusal, Sink
from dicomledger.dicom.net.services import DEFAULT_SYNTAXES

log = structlog.get_logger("dicomledger.net")

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP instance
REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type IDs

# N-ACTION statuses (PS3.7 C.4.4 / 10.1.4.1.10)
NO_SUCH_OBJECT_INSTANCE = 0x0112
INVALID_ARGUMENT_VALUE = 0x0115
INVALID_OBJECT_INSTANCE = 0x0117
MISSING_ATTRIBUTE = 0x0120
NO_SUCH_ACTION_TYPE = 0x0123
# Failure Reasons of the Failed SOP Sequence (PS3.3 C.14.1.1)
FAILURE_PROCESSING = 0x0110
FAILURE_NO_SUCH_OBJECT_INSTANCE = 0x0112
FAILURE_CLASS_INSTANCE_CONFLICT = 0x0119

REPORT_MESSAGE_ID = 1  # our own requests on this association: one report per N-ACTION


@dataclass(frozen=True)
class CommitmentRequest:
    transaction_uid: str
    references: tuple[tuple[str, str], ...]  # (SOP class UID, SOP instance UID) as requested
    calling_ae: str
    peer: str  # "host:port" of the requesting association


@dataclass(frozen=True)
class CommitmentReport:
    transaction_uid: str
    committed: tuple[tuple[str, str], ...]  # (SOP class UID, SOP instance UID)
    failed: tuple[tuple[str, str, int], ...]  # (class, instance, Failure Reason)
    retrieve_ae_title: str | None = None  # where the committed instances can be retrieved

    @property
    def event_type(self) -> int:
        return SOME_FAILED if self.failed else ALL_COMMITTED

    def event_information(self) -> Dataset:
        """The N-EVENT-REPORT's Event Information (PS3.4 J.3.3.1)."""
        ds = Dataset()
        ds.TransactionUID = self.transaction_uid
        if self.retrieve_ae_title:
            ds.RetrieveAETitle = self.retrieve_ae_title
        if self.committed:
            ds.ReferencedSOPSequence = Sequence([_reference(c, i) for c, i in self.committed])
        if self.failed:
            items = []
            for sop_class, sop_instance, reason in self.failed:
                item = _reference(sop_class, sop_instance)
                item.FailureReason = reason
                items.append(item)
            ds.FailedSOPSequence = Sequence(items)
        return ds


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


Decide = Callable[[CommitmentRequest], Awaitable[CommitmentReport]]
DeliverElsewhere = Callable[[CommitmentRequest, CommitmentReport, str], None]  # (.., why not here)


def parse_action_information(data: bytes, syntax: UID) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Transaction UID and references of an N-ACTION's Action Information; Refusal (with the
    N-ACTION status) naming the first problem. Messages never quote values."""
    try:
        ds = decode(
            io.BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated
        )
        transaction = ds.get("TransactionUID")
        items = ds.get("ReferencedSOPSequence")
        references = []
        for n, item in enumerate(items or []):
            sop_class, sop_instance = (
                item.get("ReferencedSOPClassUID"),
                item.get("ReferencedSOPInstanceUID"),
            )
            for value, name in (
                (sop_class, "Referenced SOP Class UID"),
                (sop_instance, "Referenced SOP Instance UID"),
            ):
                problem = uid_problem(
                    str(value).encode("ascii", "replace") if value else None, name
                )
                if problem:
                    raise Refusal(
                        INVALID_ARGUMENT_VALUE if value else MISSING_ATTRIBUTE,
                        f"Referenced SOP Sequence item {n + 1}: {problem}",
                    )
            references.append((str(sop_class), str(sop_instance)))
    except Refusal:
        raise
    except Exception as exc:  # pydicom's decoders raise many kinds: all mean a malformed data set
        raise Refusal(
            INVALID_ARGUMENT_VALUE, f"Action Information cannot be decoded: {type(exc).__name__}"
        ) from None
    if not transaction:
        raise Refusal(MISSING_ATTRIBUTE, "no Transaction UID (0008,1195)")
    problem = uid_problem(str(transaction).encode("ascii", "replace"), "Transaction UID")
    if problem:
        raise Refusal(INVALID_ARGUMENT_VALUE, problem)
    if not references:
        raise Refusal(MISSING_ATTRIBUTE, "no items in the Referenced SOP Sequence (0008,1199)")
    return str(transaction), tuple(references)


class CommitmentService:
    """N-ACTION of the Storage Commitment Push Model SOP class."""

    name = "N-ACTION"
    cancellable = True  # reads go on while it waits for the N-EVENT-REPORT-RSP
    abstract_syntaxes = {STORAGE_COMMITMENT_PUSH: DEFAULT_SYNTAXES}

    def __init__(
        self, decide: Decide, deliver_elsewhere: DeliverElsewhere, report_timeout: float
    ) -> None:
        self._decide = decide
        self._deliver_elsewhere = deliver_elsewhere
        self._timeout = report_timeout

    def check(self, op: Operation) -> None:
        sop_class = op.command.uid(REQUESTED_SOP_CLASS_UID)
        problem = uid_problem(sop_class, "Requested SOP Class UID")
        if problem:
            raise Refusal(MISSING_ATTRIBUTE, problem)
        if (
            sop_class != op.context.abstract_syntax_bytes
            or op.context.abstract_syntax != STORAGE_COMMITMENT_PUSH
        ):
            raise Refusal(
                SOP_CLASS_NOT_SUPPORTED,
                f"N-ACTION of SOP class {sop_class!r:.70} on presentation context "
                f"{op.context.context_id}, accepted for {op.context.abstract_syntax}",
            )
        if op.command.uid(REQUESTED_SOP_INSTANCE_UID) != STORAGE_COMMITMENT_INSTANCE.encode():
            raise Refusal(
                INVALID_OBJECT_INSTANCE,
                "Requested SOP Instance UID is not the Storage Commitment "
                f"well-known instance {STORAGE_COMMITMENT_INSTANCE}",
            )
        if op.command.us(ACTION_TYPE_ID) != REQUEST_STORAGE_COMMITMENT:
            raise Refusal(
                NO_SUCH_ACTION_TYPE,
                f"Action Type ID {op.command.us(ACTION_TYPE_ID)} (only 1, "
                "Request Storage Commitment)",
            )
        if not op.command.has_data_set:
            raise Refusal(MISSING_ATTRIBUTE, "N-ACTION-RQ without Action Information")

    def open_sink(self, op: Operation, temp_name: str) -> Sink:
        return MemorySink()

    async def serve(self, op: Operation) -> None:
        sop_class = STORAGE_COMMITMENT_PUSH.encode()
        instance = STORAGE_COMMITMENT_INSTANCE.encode()
        message_id = op.command.message_id
        syntax = UID(op.context.transfer_syntax)
        loop = asyncio.get_running_loop()
        try:
            transaction, references = await loop.run_in_executor(
                None, parse_action_information, op.data_set or b"", syntax
            )
        except Refusal as refusal:
            log.warning(
                "request refused",
                service=self.name,
                status=f"0x{refusal.status:04X}",
                reason=refusal.reason,
                calling_ae=op.peer.calling_ae,
                peer=op.peer.address,
            )
            op.respond(
                dimse.n_action_response(
                    message_id, sop_class, instance, refusal.status, comment=refusal.reason
                ),
                refusal.status,
            )
            return
        request = CommitmentRequest(transaction, references, op.peer.calling_ae, op.peer.address)
        report = await self._decide(request)
        op.respond(
            dimse.n_action_response(
                message_id, sop_class, instance, SUCCESS, REQUEST_STORAGE_COMMITMENT
            ),
            SUCCESS,
        )
        why_not_here = await self._report_here(op, report, syntax)
        if why_not_here is not None:
            self._deliver_elsewhere(request, report, why_not_here)

    async def _report_here(
        self, op: Operation, report: CommitmentReport, syntax: UID
    ) -> str | None:
        """Send the report on this association; None once the requestor took it, else why not."""
        if op.ended:
            return "the requesting association had ended"
        data = encode(
            report.event_information(),
            syntax.is_implicit_VR,
            syntax.is_little_endian,
            syntax.is_deflated,
        )
        if data is None:
            return "the report does not encode in the association's transfer syntax"
        op.expect_responses()
        op.send_request(
            op.context.context_id,
            dimse.n_event_report_request(
                REPORT_MESSAGE_ID,
                STORAGE_COMMITMENT_PUSH.encode(),
                STORAGE_COMMITMENT_INSTANCE.encode(),
                report.event_type,
            ),
            data,
        )
        try:
            response = await asyncio.wait_for(op.response(), self._timeout)
        except TimeoutError:
            return f"no N-EVENT-REPORT-RSP on the requesting association within {self._timeout:g} s"
        if response is None:
            return "the requestor released or closed the association before answering the report"
        status = response.us(dimse.STATUS)
        if response.field != dimse.N_EVENT_REPORT_RSP or response.message_id != REPORT_MESSAGE_ID:
            return f"the requestor answered the report with command 0x{response.field:04X}"
        if status != SUCCESS:
            return f"the requestor answered the report with status 0x{status or 0:04X}"
        log.info(
            "storage commitment report delivered",
            calling_ae=op.peer.calling_ae,
            peer=op.peer.address,
            transaction_uid=report.transaction_uid,
            committed=len(report.committed),
            failed=len(report.failed),
            event_type=report.event_type,
            association="same",
        )
        return None
