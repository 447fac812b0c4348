"""C-MOVE and C-GET on the asyncio layer. The core (``RetrieveCore``: plan, load, finish)
decides what may leave and checks each file; these services speak DIMSE: the sub-operations,
a Pending response after each, C-CANCEL, the final status and the Failed SOP Instance UID
List, by the rules in ``dicom/qr.py`` (``Tally``).

C-GET sends its C-STORE sub-operations on the requestor's own association, on a storage
context the requestor accepted us as SCU for (SCP/SCU role selection): the stored file's
data set bytes as they were hash-checked when the context has the stored transfer syntax,
else the data set re-encoded by pydicom in the context's syntax where that is a conversion
between uncompressed syntaxes (pynetdicom's rule), else the sub-operation fails without a
C-STORE (no context for it).

C-MOVE sends on a sub-association with the move destination, opened by this layer's
requestor (``requestor.py``): one presentation context per (SOP class, stored transfer
syntax), the stored data set bytes as they were hash-checked, each C-STORE-RQ naming the
Move Originator. A destination that cannot be reached or rejects the association is
0xA801 as before; one that accepts the association but none of the proposed contexts fails
the sub-operations (no C-STORE response), which the final status counts.

Pending responses go out after the first sub-operation, then at most every
``PENDING_EVERY`` sub-operations or ``PENDING_SECONDS``, whichever comes first (not after
each: on a fast destination a response per image costs as much as the image), and once
after the last sub-operation if it was not reported, so the requestor's last Pending
shows nothing remaining (as before); the counts in each are exact as of when it leaves.
"""

from __future__ import annotations

import asyncio
import copy
import zlib
from collections import deque
from collections.abc import Mapping

import structlog
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomledger.dicom.net import dimse
from dicomledger.dicom.net.dimse import (
    AFFECTED_SOP_CLASS_UID,
    CANNOT_UNDERSTAND,
    MOVE_DESTINATION,
    SOP_CLASS_NOT_SUPPORTED,
)
from dicomledger.dicom.net.negotiation import MAX_CONTEXTS, AcceptedContext
from dicomledger.dicom.net.operation import MemorySink, Operation, Refusal, Sink
from dicomledger.dicom.net.requestor import Destination, Requestor
from dicomledger.dicom.net.services import DEFAULT_SYNTAXES, check_sop_class, qr_request
from dicomledger.dicom.qr import (
    CANCEL,
    MAX_SUB_OPERATIONS,
    MOVE_DESTINATION_UNKNOWN,
    PENDING,
    RETRIEVE_UNABLE_TO_PROCESS,
    SUCCESS,
    Loaded,
    QRRequest,
    RetrieveCore,
    RetrieveOutcome,
    RetrievePlan,
    SubOperation,
    Tally,
    failed_uid_list,
)
from dicomledger.dicom.query import QueryError
from dicomledger.dicom.transcode import FALLBACK_SYNTAXES, TranscodeError, decompressed

log = structlog.get_logger("dicomledger.net")

MOVE_MODELS = {
    str(PatientRootQueryRetrieveInformationModelMove): "patient",
    str(StudyRootQueryRetrieveInformationModelMove): "study",
}
GET_MODELS = {
    str(PatientRootQueryRetrieveInformationModelGet): "patient",
    str(StudyRootQueryRetrieveInformationModelGet): "study",
}
LOOKAHEAD = 4  # instances read and checked ahead of the one being sent
SUB_OPERATION_PRIORITY = 2  # LOW, as pynetdicom sent them
PENDING_EVERY = 64  # sub-operations between Pending responses, at most ...
PENDING_SECONDS = 0.25  # ... or this long since the last one


class RetrieveService:
    """What C-MOVE and C-GET share: the request, the plan, the loop over its sub-operations
    with the check running ahead, the responses, and the core's record of what the
    requestor was told (written before the final response leaves)."""

    name = ""
    response_field = 0
    models: Mapping[str, str] = {}
    cancellable = True  # reads go on: C-CANCEL-RQ, and C-GET's C-STORE responses, reach us

    def __init__(self, core: RetrieveCore, ae_title: str, timeout: float) -> None:
        self._core = core
        self._ae_title = ae_title
        self._timeout = timeout  # for the peer's C-STORE responses and the sub-association
        self.abstract_syntaxes = dict.fromkeys(self.models, DEFAULT_SYNTAXES)

    def check(self, op: Operation) -> None:
        check_sop_class(op, self.name)
        if op.context.abstract_syntax not in self.models:
            raise Refusal(
                SOP_CLASS_NOT_SUPPORTED,
                f"{self.name} for {op.context.abstract_syntax} is not served",
            )
        if not op.command.has_data_set:
            raise Refusal(CANNOT_UNDERSTAND, f"{self.name}-RQ without an identifier")

    def open_sink(self, op: Operation, temp_name: str) -> Sink:
        return MemorySink()

    async def serve(self, op: Operation) -> None:
        try:
            request = await qr_request(
                op, self.name, self.models[op.context.abstract_syntax], self.move_destination(op)
            )
            plan = await self._core.plan(request)
        except (Refusal, QueryError):  # why is logged already
            self._respond(op, RETRIEVE_UNABLE_TO_PROCESS[self.name])
            return
        run = _Run(op, request, plan, RetrieveOutcome())
        try:
            await self.retrieve(run)
        finally:
            if not run.finished:  # cut short: the association ended, or we are stopping
                run.finished = True
                await self._core.finish(request, plan, run.outcome)
            await run.close()

    def move_destination(self, op: Operation) -> str | None:
        return None

    async def retrieve(self, run: _Run) -> None:
        raise NotImplementedError

    async def send(
        self, run: _Run, sub: SubOperation, loaded: Loaded, message_id: int
    ) -> int | None:
        """Send one sub-operation; its C-STORE response's status, None without one."""
        raise NotImplementedError

    # --- shared steps ---------------------------------------------------------------------

    async def _sub_operations(self, run: _Run) -> None:
        """Check, send and count each instance of the plan; then the final response."""
        op, plan = run.op, run.plan
        tally = Tally(len(plan.to_send), run.outcome)
        sent = 0
        loads = run.start_loads(self._core)
        loop = asyncio.get_running_loop()
        unreported, last_pending = (
            0,
            None,
        )  # sub-operations since the last Pending response, and when
        for sub in plan.to_send:
            loaded = await loads.next()
            if op.cancelled:
                if op.ended:
                    return  # nobody to answer
                run.outcome.cancelled = True
                await self._final(run, CANCEL, tally.counts(final=False), tally.failed_uids())
                return
            if loaded.dataset is None:
                tally.stopped(sub.sop_instance_uid, loaded.problem)
                continue
            sent += 1
            status = await self.send(
                run, sub, loaded, (op.command.message_id + sent - 1) % 0xFFFF + 1
            )
            if op.ended:
                return  # the requestor is gone: this one was never reported
            tally.sent(sub.sop_instance_uid, status)
            unreported += 1
            now = loop.time()
            if (
                last_pending is None
                or unreported >= PENDING_EVERY
                or now - last_pending >= PENDING_SECONDS
            ):
                self._respond(op, PENDING, tally.counts(final=False))
                unreported, last_pending = 0, now
                await op.drain()
        if unreported:  # the requestor's last Pending shows every sub-operation done
            self._respond(op, PENDING, tally.counts(final=False))
        status = tally.final_status()
        await self._final(
            run,
            status,
            tally.counts(final=True),
            tally.failed_uids() if status != SUCCESS else None,
        )

    async def _nothing_to_send(self, run: _Run) -> bool:
        """Answer a plan with no sub-operation (Success, as for an unknown study) or too many
        for the counts; True if answered."""
        total = len(run.plan.to_send)
        if total == 0:
            await self._final(run, SUCCESS, {"completed": 0, "failed": 0, "warning": 0})
            return True
        if total > MAX_SUB_OPERATIONS:
            log.error(
                "retrieve refused",
                service=self.name,
                calling_ae=run.op.peer.calling_ae,
                reason=f"{total} sub-operations, more than the counts can hold ({MAX_SUB_OPERATIONS})",
            )
            await self._final(run, RETRIEVE_UNABLE_TO_PROCESS[self.name], {})
            return True
        return False

    async def _final(
        self, run: _Run, status: int, counts: dict[str, int], failed: list[str] | None = None
    ) -> None:
        """The core records what the requestor is told before it is told (so a requestor that
        reads the ledger after the final response finds it there), then the final response."""
        run.outcome.status = status
        if not run.finished:
            run.finished = True
            await self._core.finish(run.request, run.plan, run.outcome)
        await run.before_final()
        self._respond(run.op, status, counts, failed)

    def _respond(
        self,
        op: Operation,
        status: int,
        counts: Mapping[str, int] | None = None,
        failed: list[str] | None = None,
    ) -> None:
        data = None
        if failed is not None:
            syntax = UID(op.context.transfer_syntax)
            data = encode(
                failed_uid_list(failed),
                syntax.is_implicit_VR,
                syntax.is_little_endian,
                syntax.is_deflated,
            )
        command = dimse.retrieve_response(
            self.response_field,
            op.command.message_id,
            op.command.uid(AFFECTED_SOP_CLASS_UID) or b"",
            status,
            with_identifier=data is not None,
            **(counts or {}),
        )
        op.respond(command, status, data)


class _Loads:
    """The core's checks of the next few instances, running ahead of the one being sent."""

    def __init__(self, core: RetrieveCore, subs: list[SubOperation]) -> None:
        self._core = core
        self._todo = iter(subs)
        self._ahead: deque[asyncio.Task[Loaded]] = deque()
        for _ in range(LOOKAHEAD):
            self._start_next()

    def _start_next(self) -> None:
        sub = next(self._todo, None)
        if sub is not None:
            self._ahead.append(asyncio.ensure_future(self._core.load(sub)))

    async def next(self) -> Loaded:
        loaded = await self._ahead.popleft()
        self._start_next()
        return loaded

    def cancel(self) -> None:
        for task in self._ahead:
            task.cancel()
        self._ahead.clear()


class _Run:
    """One retrieval being served."""

    def __init__(
        self, op: Operation, request: QRRequest, plan: RetrievePlan, outcome: RetrieveOutcome
    ) -> None:
        self.op = op
        self.request = request
        self.plan = plan
        self.outcome = outcome
        self.finished = False  # the core has recorded it
        self.loads: _Loads | None = None
        self.requestor: Requestor | None = None  # C-MOVE: the sub-association's

    def start_loads(self, core: RetrieveCore) -> _Loads:
        self.loads = _Loads(core, self.plan.to_send)
        return self.loads

    async def before_final(self) -> None:
        """C-MOVE: release the sub-association before the final response (as pynetdicom did)."""
        requestor, self.requestor = self.requestor, None
        if requestor is not None:
            await requestor.close()

    async def close(self) -> None:
        if self.loads is not None:
            self.loads.cancel()
        requestor, self.requestor = self.requestor, None
        if requestor is not None:
            await requestor.abort()  # cut short: the destination is not waited for


class GetService(RetrieveService):
    name = "C-GET"
    response_field = dimse.C_GET_RSP
    models = GET_MODELS

    async def serve(self, op: Operation) -> None:
        op.expect_responses()
        await super().serve(op)

    async def retrieve(self, run: _Run) -> None:
        run.outcome.associated = True  # the requestor's own association: nothing to set up
        if not await self._nothing_to_send(run):
            await self._sub_operations(run)

    async def send(
        self, run: _Run, sub: SubOperation, loaded: Loaded, message_id: int
    ) -> int | None:
        op = run.op
        context = storage_context(op.contexts, sub.sop_class_uid, sub.transfer_syntax_uid)
        if context is None:  # the requestor took no syntax we can send it in
            return None
        data: bytes | memoryview | None = loaded.data_set
        if (
            context.transfer_syntax != sub.transfer_syntax_uid
            and UID(sub.transfer_syntax_uid).is_compressed
        ):
            # the requestor takes none of the stored syntax: a decompressed copy
            data = await asyncio.get_running_loop().run_in_executor(
                None, _decompressed, loaded.dataset, context.transfer_syntax
            )
            if data is None:
                return None
        elif context.transfer_syntax != sub.transfer_syntax_uid or not data or len(data) % 2:
            # another (uncompressed) syntax, or an odd stored length: pydicom re-encodes it
            data = await asyncio.get_running_loop().run_in_executor(
                None, _encode_for, loaded.dataset, context.transfer_syntax
            )
            if data is None:
                return None
        op.send_request(
            context.context_id,
            dimse.request(
                dimse.C_STORE_RQ,
                message_id,
                sub.sop_class_uid.encode(),
                has_data_set=True,
                sop_instance_uid=sub.sop_instance_uid.encode(),
                priority=SUB_OPERATION_PRIORITY,
            ),
            data,
        )
        await op.drain()
        try:
            async with asyncio.timeout(self._timeout):
                while (response := await op.response()) is not None:
                    if response.field == dimse.C_STORE_RSP and response.message_id == message_id:
                        return response.us(dimse.STATUS)
                    log.warning(
                        "unexpected response during a C-GET ignored",
                        field=f"0x{response.field:04X}",
                        message_id=response.message_id,
                        calling_ae=op.peer.calling_ae,
                        peer=op.peer.address,
                    )
        except TimeoutError:
            op.abort(f"no C-STORE response to a C-GET sub-operation within {self._timeout:g} s")
        return None


class MoveService(RetrieveService):
    name = "C-MOVE"
    response_field = dimse.C_MOVE_RSP
    models = MOVE_MODELS

    def move_destination(self, op: Operation) -> str | None:
        return op.command.text(MOVE_DESTINATION) or ""

    async def retrieve(self, run: _Run) -> None:
        plan = run.plan
        if plan.unknown_destination or plan.destination is None:
            await self._final(run, MOVE_DESTINATION_UNKNOWN, {})
            return
        if await self._nothing_to_send(run):
            return
        host, port = plan.destination
        destination = run.request.move_destination or ""
        requestor = Requestor(
            self._ae_title,
            Destination(destination, host, port, *(plan.destination_tls or (None, ""))),
            acse_timeout=self._timeout,
            dimse_timeout=self._timeout,
            connect_timeout=min(self._timeout, 30),
            transcode=True,
        )
        run.requestor = requestor
        failure = await requestor.prepare(_pairs_for(plan.to_send))
        if failure is not None:
            log.warning(
                "move destination did not accept the association",
                destination=destination,
                address=f"{host}:{port}",
                calling_ae=run.op.peer.calling_ae,
                error=failure.error,
            )
            await self._final(run, MOVE_DESTINATION_UNKNOWN, {})
            return
        run.outcome.associated = True
        await self._sub_operations(run)

    async def send(
        self, run: _Run, sub: SubOperation, loaded: Loaded, message_id: int
    ) -> int | None:
        requestor = run.requestor
        assert requestor is not None
        target = requestor.choose((sub.sop_class_uid, sub.transfer_syntax_uid))
        if target is None:
            return None  # the destination took no context for it: failed without a C-STORE
        data: bytes | memoryview = loaded.data_set
        if target[1] != sub.transfer_syntax_uid:  # a decompressed copy (transcoding fallback)
            copy = await asyncio.get_running_loop().run_in_executor(
                None, _decompressed, loaded.dataset, target[1]
            )
            if copy is None:
                return None
            data = copy
        elif (not data or len(data) % 2) and not UID(sub.transfer_syntax_uid).is_deflated:
            # an odd stored length: pydicom re-encodes it in its own syntax (as pynetdicom did)
            encoded = await asyncio.get_running_loop().run_in_executor(
                None, _encode_for, loaded.dataset, sub.transfer_syntax_uid
            )
            if encoded is None:
                return None
            data = encoded
        result = await requestor.store(
            sub.sop_class_uid,
            sub.sop_instance_uid,
            target[1],
            data,
            move_originator=(run.op.peer.calling_ae, run.op.command.message_id),
            priority=SUB_OPERATION_PRIORITY,
        )
        return result.status


def _pairs_for(subs: list[SubOperation]) -> list[tuple[str, str]]:
    """One context per (SOP class, stored transfer syntax), each with that one syntax."""
    return list(dict.fromkeys((s.sop_class_uid, s.transfer_syntax_uid) for s in subs))[
        :MAX_CONTEXTS
    ]


def storage_context(
    contexts: Mapping[int, AcceptedContext], sop_class: str, transfer_syntax: str
) -> AcceptedContext | None:
    """The requestor's context to send a stored instance on: one we may act as SCU on (role
    selection) for its SOP class, in its stored transfer syntax, else in one it converts to
    (neither compressed, same byte order: pynetdicom's rule), else, for a compressed stored
    syntax, Explicit or Implicit VR Little Endian (a decompressed copy)."""
    stored = UID(transfer_syntax)
    convertible = None
    for cx in contexts.values():
        if cx.abstract_syntax != sop_class or not cx.as_scu:
            continue
        if cx.transfer_syntax == stored:
            return cx
        theirs = UID(cx.transfer_syntax)
        if (
            convertible is None
            and not theirs.is_compressed
            and (
                stored.is_compressed
                and theirs in FALLBACK_SYNTAXES  # decompressed (transcoding fallback)
                or not stored.is_compressed
                and stored.is_little_endian == theirs.is_little_endian
            )
        ):
            convertible = cx
    return convertible


def _decompressed(dataset: Dataset | None, transfer_syntax: str) -> bytes | None:
    """A decompressed copy in an uncompressed syntax; None if it cannot be made (the
    sub-operation fails without a C-STORE)."""
    if dataset is None:
        return None
    try:
        return decompressed(copy.deepcopy(dataset), transfer_syntax)
    except TranscodeError as exc:
        log.warning("no decompressed copy for a retrieve sub-operation", error=str(exc))
        return None


def _encode_for(dataset: Dataset | None, transfer_syntax: str) -> bytes | None:
    """The data set encoded in another syntax by pydicom (as pynetdicom's ``encode``, without
    its error log); None if it cannot be (the sub-operation fails without a C-STORE)."""
    if dataset is None:
        return None
    syntax = UID(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = syntax.is_implicit_VR, syntax.is_little_endian
    try:
        write_dataset(fp, dataset)
    except (
        Exception
    ):  # pydicom's writer raises many kinds (sequences nested too deep: RecursionError)
        return None
    data = fp.getvalue()
    if syntax.is_deflated:
        deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
        data += b"\x00" if len(data) % 2 else b""
    return data
