"""Query/Retrieve on the wire: the response generators pynetdicom drives for C-FIND, C-MOVE
and C-GET. What matches, who may see it and whether a file may leave is decided by the core
(``retrieval.py``) through the ``RetrieveCore`` protocol; this file only speaks DIMSE:
pending responses, C-CANCEL, sub-operation counts and the Failed SOP Instance UID List.

Instances the caller may not have are not sub-operations at all: a retrieval of a study the
caller may not see is answered exactly like one of a study that does not exist (Success, no
sub-operations), so the answer never tells that it exists; the core records the refusal.

pynetdicom counts a sub-operation as done only when it sends the C-STORE itself, so
instances we stop (tamper check, unreadable file) are simply never yielded: they stay
"remaining" until our final response, where pynetdicom reports them as failed
(PS3.4 C.4.2.1.5 / C.4.3.1.4), and we list their UIDs. pynetdicom also fails sub-operations
on its own, without a C-STORE response (no presentation context the receiver accepted for
the stored transfer syntax, a dataset it cannot encode, a lost association): each time it
resumes us we count the instance it just handled by the response it got, or as failed if
none came, so our counts are the ones the requestor is told.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom import build_context, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from dicomledger.dicom.scu import on_sending_connection

PENDING = 0xFF00
CANCEL = 0xFE00
SUCCESS = 0x0000
SUB_OPERATIONS_FAILED = 0xB000  # warning: sub-operations complete, one or more failures
UNABLE_TO_PERFORM = 0xA702  # failure: no sub-operation could be performed
MAX_CONTEXTS = 128  # presentation context IDs are odd numbers 1..255
LOOKAHEAD = 4  # instances read and checked ahead of the one being sent


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
    dataset: Dataset | None  # None: do not send
    problem: str = ""  # why not


@dataclass
class RetrievePlan:
    to_send: list[SubOperation]
    refused: dict[str, str]  # SOP Instance UID -> why the caller may not have it (not a sub-operation)
    destination: tuple[str, int] | None = None  # C-MOVE: where the move destination AE listens
    unknown_destination: bool = False  # C-MOVE: answer 0xA801
    context: Any = None  # the core's own state, handed back to finish()


@dataclass
class RetrieveOutcome:
    """What happened to a retrieval's sub-operations, as the requestor is told, for the
    core's audit record."""

    completed: list[str] = field(default_factory=list)
    warning: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # sent by pynetdicom, and failed (response or none)
    no_response: list[str] = field(default_factory=list)  # of failed: pynetdicom got no C-STORE response
    not_sent: dict[str, str] = field(default_factory=dict)  # stopped by the check: uid -> why
    associated: bool = False  # C-MOVE: the association with the destination was made
    cancelled: bool = False
    status: int | None = None  # the final status; None if the operation was cut short


class RetrieveCore(Protocol):
    def find(self, request: QRRequest) -> list[Dataset]: ...
    def plan(self, request: QRRequest) -> RetrievePlan: ...
    def load(self, sub: SubOperation) -> Loaded: ...
    def finish(self, request: QRRequest, plan: RetrievePlan, outcome: RetrieveOutcome) -> None: ...


def find_responses(matches: list[Dataset], is_cancelled: Callable[[], bool]) -> Iterator[tuple[int, Dataset | None]]:
    for identifier in matches:
        if is_cancelled():
            yield CANCEL, None
            return
        yield PENDING, identifier


class StoreResponses:
    """The C-STORE responses of sub-operations (from EVT_DIMSE_RECV, on the one DUL thread of
    the association; pynetdicom triggers it before the sender gets the response), and each
    sub-operation counted once pynetdicom is done with it."""

    def __init__(self, outcome: RetrieveOutcome) -> None:
        self._outcome = outcome
        self._statuses: dict[str, int] = {}

    def on_dimse_recv(self, event: evt.Event) -> None:
        message = event.message
        if not isinstance(message, C_STORE_RSP):
            return
        command = message.command_set
        self._statuses[str(command.get("AffectedSOPInstanceUID", ""))] = int(command.get("Status", 0xC000))

    def settle(self, uid: str) -> None:
        """Count the sub-operation of ``uid``, which pynetdicom has just sent or given up on:
        as its response says, or failed without one, as pynetdicom counts it."""
        status = self._statuses.pop(uid, None)
        category = code_to_category(status) if status is not None else None
        if category == STATUS_SUCCESS:
            self._outcome.completed.append(uid)
        elif category == STATUS_WARNING:
            self._outcome.warning.append(uid)
        else:
            self._outcome.failed.append(uid)
            if status is None:
                self._outcome.no_response.append(uid)


def move_association_kwargs(plan: RetrievePlan, responses: StoreResponses) -> dict[str, Any]:
    """associate() arguments for the sub-association: one context per (SOP class, transfer
    syntax) to send, each with that one syntax, so files leave as stored."""
    pairs = list(dict.fromkeys((s.sop_class_uid, s.transfer_syntax_uid) for s in plan.to_send))
    # nothing to send (all refused): pynetdicom still associates before our final response
    contexts = [build_context(*pair) for pair in pairs[:MAX_CONTEXTS]] or [build_context(Verification)]
    return {
        "contexts": contexts,
        "evt_handlers": [(evt.EVT_CONN_OPEN, on_sending_connection), (evt.EVT_DIMSE_RECV, responses.on_dimse_recv)],
    }


def retrieve_responses(
    core: RetrieveCore,
    request: QRRequest,
    plan: RetrievePlan,
    is_cancelled: Callable[[], bool],
    assoc: Any,  # the requestor's association (C-GET sends on it)
) -> Iterator[Any]:
    """The C-MOVE / C-GET generator: (destination,) count, then one pending per instance sent."""
    outcome = RetrieveOutcome()
    responses = StoreResponses(outcome)
    finished = False

    def finish(status: int | None) -> None:
        nonlocal finished
        if not finished:
            finished = True
            outcome.status = status
            core.finish(request, plan, outcome)

    is_get = request.service == "C-GET"
    if is_get:
        assoc.bind(evt.EVT_DIMSE_RECV, responses.on_dimse_recv)
    # One checker: more threads only compete with the sending ones for the GIL.
    pool = ThreadPoolExecutor(1, thread_name_prefix="retrieve-check")
    try:
        if not is_get:
            if plan.unknown_destination or plan.destination is None:
                finish(0xA801)
                yield None, None  # pynetdicom answers 0xA801: move destination unknown
                return
            yield (*plan.destination, move_association_kwargs(plan, responses))
        total = len(plan.to_send)  # what the caller may not have is not counted, as if absent
        if total == 0:
            finish(SUCCESS)  # pynetdicom answers Success with no sub-operations
        yield total
        outcome.associated = True  # resumed: the sub-association exists (C-MOVE) or is not needed
        ahead: deque[Future[Loaded]] = deque()
        todo = iter(plan.to_send)
        for sub in todo:
            ahead.append(pool.submit(core.load, sub))
            if len(ahead) >= LOOKAHEAD:
                break
        for sub in plan.to_send:
            loaded = ahead.popleft().result()
            if (nxt := next(todo, None)) is not None:
                ahead.append(pool.submit(core.load, nxt))
            if is_cancelled():
                outcome.cancelled = True
                finish(CANCEL)
                yield CANCEL, _failed_list(outcome)
                return
            if loaded.dataset is None:
                outcome.not_sent[sub.sop_instance_uid] = loaded.problem
                continue
            yield PENDING, loaded.dataset
            responses.settle(sub.sop_instance_uid)  # resumed: pynetdicom is done with it
        # The final status, by pynetdicom's rule (which it applies itself when we send nothing).
        sent = len(outcome.completed) + len(outcome.warning)
        problems = outcome.not_sent or outcome.failed or outcome.warning
        status = (SUB_OPERATIONS_FAILED if sent else UNABLE_TO_PERFORM) if problems else SUCCESS
        finish(status)
        if outcome.not_sent:  # still "remaining" to pynetdicom, which reports them as failed
            yield status, _failed_list(outcome)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if is_get:
            assoc.unbind(evt.EVT_DIMSE_RECV, responses.on_dimse_recv)
        finish(None)  # pynetdicom stopped early (destination unreachable, peer aborted)


def _failed_list(outcome: RetrieveOutcome) -> Dataset:
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = [*outcome.failed, *outcome.not_sent]
    return ds
