"""Query/Retrieve between the DICOM side and its core: what a C-FIND, C-MOVE or C-GET asks
(``QRRequest``), what the core (``retrieval.py``, through the ``RetrieveCore`` protocol)
answers, and the rules for a retrieval's sub-operations as the requestor is told them:
counts, the final status and the Failed SOP Instance UID List (``Tally``). The services
that speak them on the wire are in ``dicom/net/retrieve.py``.

Instances the caller may not have are not sub-operations at all: a retrieval of a study the
caller may not see is answered exactly like one of a study that does not exist (Success, no
sub-operations), so the answer never tells that it exists; the core records the refusal.

The rules are the ones pynetdicom's Query/Retrieve service applied when it served us, so a
requestor sees what it saw before (PS3.4 C.4.2.1.5 / C.4.3.1.4): a Pending response after
each sub-operation sent; an instance the check stops (tamper check, unreadable file) is never
sent and stays "remaining" until the final response, which counts it as failed and lists its
UID; a sub-operation that got no C-STORE response (no presentation context for its stored
transfer syntax, a data set that cannot be encoded, a lost association) is failed; the final
status is Success without failures or warnings, else 0xA702 if nothing was sent, else 0xB000.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

PENDING = 0xFF00
CANCEL = 0xFE00
SUCCESS = 0x0000
SUB_OPERATIONS_FAILED = 0xB000  # warning: sub-operations complete, one or more failures
UNABLE_TO_PERFORM = 0xA702  # failure: no sub-operation could be performed
MOVE_DESTINATION_UNKNOWN = 0xA801
# An identifier a retrieve cannot use: "unable to process", the codes pynetdicom answered
# (its handler-exception statuses), so DCMTK still prints "Failed: UnableToProcess".
RETRIEVE_UNABLE_TO_PROCESS = {"C-MOVE": 0xC511, "C-GET": 0xC411}
MAX_SUB_OPERATIONS = 0xFFFF  # the counts are US (PS3.7 C.4.2.2)


@dataclass(frozen=True)
class QRRequest:
    service: str  # "C-FIND", "C-MOVE" or "C-GET"
    model: str  # "patient" or "study" (root)
    identifier: Dataset
    calling_ae: str
    peer: str
    move_destination: str | None = None


@dataclass(frozen=True)
class SubOperation:
    """One instance a retrieval will send, if it passes the check just before."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    ref: Any  # the core's own handle on it


@dataclass(frozen=True)
class Loaded:
    """A stored instance read for sending: the bytes that were hash-checked are the bytes that
    leave (``data_set``, the file's data set as stored) or are re-encoded (``dataset``)."""

    dataset: Dataset | None  # None: do not send
    problem: str = ""  # why not
    data_set: bytes | memoryview = b""  # the stored file's data set, exactly as hash-checked


@dataclass
class RetrievePlan:
    to_send: list[SubOperation]
    refused: dict[
        str, str
    ]  # SOP Instance UID -> why the caller may not have it (not a sub-operation)
    destination: tuple[str, int] | None = None  # C-MOVE: where the move destination AE listens
    destination_tls: tuple[ssl.SSLContext, str] | None = (
        None  # C-MOVE: TLS to it (context, its name)
    )
    unknown_destination: bool = False  # C-MOVE: answer 0xA801
    context: Any = None  # the core's own state, handed back to finish()


@dataclass
class RetrieveOutcome:
    """What happened to a retrieval's sub-operations, as the requestor is told, for the
    core's audit record."""

    completed: list[str] = field(default_factory=list)
    warning: list[str] = field(default_factory=list)
    failed: list[str] = field(
        default_factory=list
    )  # sent, and failed (by its response, or none came)
    no_response: list[str] = field(default_factory=list)  # of failed: no C-STORE response
    not_sent: dict[str, str] = field(default_factory=dict)  # stopped by the check: uid -> why
    associated: bool = False  # C-MOVE: the association with the destination was made
    cancelled: bool = False
    status: int | None = None  # the final status; None if the operation was cut short


class RetrieveCore(Protocol):
    """The Query/Retrieve core, called on the event loop; blocking work is its own business."""

    async def find(self, request: QRRequest) -> list[Dataset]: ...
    async def plan(self, request: QRRequest) -> RetrievePlan: ...
    async def load(self, sub: SubOperation) -> Loaded: ...
    async def finish(
        self, request: QRRequest, plan: RetrievePlan, outcome: RetrieveOutcome
    ) -> None: ...


class Tally:
    """A retrieval's sub-operations counted as the requestor is told them."""

    def __init__(self, total: int, outcome: RetrieveOutcome) -> None:
        self.total = total
        self.outcome = outcome

    def sent(self, uid: str, status: int | None) -> None:
        """A sub-operation sent: counted by its C-STORE response's status, failed without one."""
        category = code_to_category(status) if status is not None else None
        if category == STATUS_SUCCESS:
            self.outcome.completed.append(uid)
        elif category == STATUS_WARNING:
            self.outcome.warning.append(uid)
        else:
            self.outcome.failed.append(uid)
            if status is None:
                self.outcome.no_response.append(uid)

    def stopped(self, uid: str, problem: str) -> None:
        """Not sent: the check before sending stopped it."""
        self.outcome.not_sent[uid] = problem

    @property
    def remaining(self) -> int:
        o = self.outcome
        return self.total - len(o.completed) - len(o.warning) - len(o.failed)

    def counts(self, *, final: bool) -> dict[str, int]:
        """Remaining, Completed, Failed, Warning for a response. A final one has no
        Remaining: what was never sent counts as failed."""
        o = self.outcome
        if final:
            return {
                "completed": len(o.completed),
                "failed": len(o.failed) + len(o.not_sent),
                "warning": len(o.warning),
            }
        return {
            "remaining": self.remaining,
            "completed": len(o.completed),
            "failed": len(o.failed),
            "warning": len(o.warning),
        }

    def final_status(self) -> int:
        o = self.outcome
        if not (o.failed or o.warning or o.not_sent):
            return SUCCESS
        return SUB_OPERATIONS_FAILED if o.completed or o.warning else UNABLE_TO_PERFORM

    def failed_uids(self) -> list[str]:
        """The Failed SOP Instance UID List: failed, then stopped by the check."""
        return [*self.outcome.failed, *self.outcome.not_sent]


def failed_uid_list(uids: list[str]) -> Dataset:
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = uids
    return ds
