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

C-MOVE sends on a sub-association with the move destination, through pynetdicom's SCU
(``AE.associate`` and ``send_c_store``) in a thread of its own: one presentation context
per (SOP class, stored transfer syntax), so instances leave as stored.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association as PynetdicomAssociation
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
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
from dicomledger.dicom.scu import on_sending_connection

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
            raise Refusal(SOP_CLASS_NOT_SUPPORTED, f"{self.name} for {op.context.abstract_syntax} is not served")
        if not op.command.has_data_set:
            raise Refusal(CANNOT_UNDERSTAND, f"{self.name}-RQ without an identifier")

    def open_sink(self, op: Operation, temp_name: str) -> Sink:
        return MemorySink()

    async def serve(self, op: Operation) -> None:
        try:
            request = await qr_request(op, self.name, self.models[op.context.abstract_syntax],
                                        self.move_destination(op))
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

    async def send(self, run: _Run, sub: SubOperation, loaded: Loaded, message_id: int) -> int | None:
        """Send one sub-operation; its C-STORE response's status, None without one."""
        raise NotImplementedError

    # --- shared steps ---------------------------------------------------------------------

    async def _sub_operations(self, run: _Run) -> None:
        """Check, send and count each instance of the plan; then the final response."""
        op, plan = run.op, run.plan
        tally = Tally(len(plan.to_send), run.outcome)
        sent = 0
        loads = run.start_loads(self._core)
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
            status = await self.send(run, sub, loaded, (op.command.message_id + sent - 1) % 0xFFFF + 1)
            if op.ended:
                return  # the requestor is gone: this one was never reported
            tally.sent(sub.sop_instance_uid, status)
            self._respond(op, PENDING, tally.counts(final=False))
            await op.drain()
        status = tally.final_status()
        await self._final(run, status, tally.counts(final=True), tally.failed_uids() if status != SUCCESS else None)

    async def _nothing_to_send(self, run: _Run) -> bool:
        """Answer a plan with no sub-operation (Success, as for an unknown study) or too many
        for the counts; True if answered."""
        total = len(run.plan.to_send)
        if total == 0:
            await self._final(run, SUCCESS, {"completed": 0, "failed": 0, "warning": 0})
            return True
        if total > MAX_SUB_OPERATIONS:
            log.error("retrieve refused", service=self.name, calling_ae=run.op.peer.calling_ae,
                      reason=f"{total} sub-operations, more than the counts can hold ({MAX_SUB_OPERATIONS})")
            await self._final(run, RETRIEVE_UNABLE_TO_PROCESS[self.name], {})
            return True
        return False

    async def _final(self, run: _Run, status: int, counts: dict[str, int], failed: list[str] | None = None) -> None:
        """The core records what the requestor is told before it is told (so a requestor that
        reads the ledger after the final response finds it there), then the final response."""
        run.outcome.status = status
        if not run.finished:
            run.finished = True
            await self._core.finish(run.request, run.plan, run.outcome)
        await run.before_final()
        self._respond(run.op, status, counts, failed)

    def _respond(self, op: Operation, status: int, counts: Mapping[str, int] | None = None,
                 failed: list[str] | None = None) -> None:
        data = None
        if failed is not None:
            syntax = UID(op.context.transfer_syntax)
            data = encode(failed_uid_list(failed), syntax.is_implicit_VR, syntax.is_little_endian,
                          syntax.is_deflated)
        command = dimse.retrieve_response(self.response_field, op.command.message_id,
                                          op.command.uid(AFFECTED_SOP_CLASS_UID) or b"", status,
                                          with_identifier=data is not None, **(counts or {}))
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

    def __init__(self, op: Operation, request: QRRequest, plan: RetrievePlan, outcome: RetrieveOutcome) -> None:
        self.op = op
        self.request = request
        self.plan = plan
        self.outcome = outcome
        self.finished = False  # the core has recorded it
        self.loads: _Loads | None = None
        self.sub_association: PynetdicomAssociation | None = None
        self.thread: ThreadPoolExecutor | None = None  # C-MOVE: the sub-association's

    def start_loads(self, core: RetrieveCore) -> _Loads:
        self.loads = _Loads(core, self.plan.to_send)
        return self.loads

    async def in_thread(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        if self.thread is None:
            self.thread = ThreadPoolExecutor(1, thread_name_prefix="c-move-sub-association")
        return await asyncio.get_running_loop().run_in_executor(self.thread, lambda: func(*args, **kwargs))

    async def before_final(self) -> None:
        """C-MOVE: release the sub-association before the final response (as pynetdicom did)."""
        assoc, self.sub_association = self.sub_association, None
        if assoc is not None and assoc.is_established:
            await self.in_thread(assoc.release)

    async def close(self) -> None:
        if self.loads is not None:
            self.loads.cancel()
        assoc, self.sub_association = self.sub_association, None
        if assoc is not None and assoc.is_established:
            await self.in_thread(assoc.abort)  # cut short: the destination is not waited for
        if self.thread is not None:
            self.thread.shutdown(wait=False)


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

    async def send(self, run: _Run, sub: SubOperation, loaded: Loaded, message_id: int) -> int | None:
        op = run.op
        context = storage_context(op.contexts, sub.sop_class_uid, sub.transfer_syntax_uid)
        if context is None:  # the requestor took no syntax we can send it in
            return None
        data: bytes | memoryview | None = loaded.data_set
        if context.transfer_syntax != sub.transfer_syntax_uid or not data or len(data) % 2:
            # another (uncompressed) syntax, or an odd stored length: pydicom re-encodes it
            data = await asyncio.get_running_loop().run_in_executor(
                None, _encode_for, loaded.dataset, context.transfer_syntax)
            if data is None:
                return None
        op.send_request(context.context_id, dimse.request(
            dimse.C_STORE_RQ, message_id, sub.sop_class_uid.encode(), has_data_set=True,
            sop_instance_uid=sub.sop_instance_uid.encode(), priority=SUB_OPERATION_PRIORITY), data)
        await op.drain()
        try:
            async with asyncio.timeout(self._timeout):
                while (response := await op.response()) is not None:
                    if response.field == dimse.C_STORE_RSP and response.message_id == message_id:
                        return response.us(dimse.STATUS)
                    log.warning("unexpected response during a C-GET ignored", field=f"0x{response.field:04X}",
                                message_id=response.message_id, calling_ae=op.peer.calling_ae, peer=op.peer.address)
        except TimeoutError:
            op.abort(f"no C-STORE response to a C-GET sub-operation within {self._timeout:g} s")
        return None


class MoveService(RetrieveService):
    name = "C-MOVE"
    response_field = dimse.C_MOVE_RSP
    models = MOVE_MODELS

    def __init__(self, core: RetrieveCore, ae_title: str, timeout: float) -> None:
        super().__init__(core, ae_title, timeout)
        ae = AE(ae_title=ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = min(timeout, 30)
        self._ae = ae

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
        assoc = await run.in_thread(
            self._ae.associate, host, port, ae_title=destination, contexts=_contexts_for(plan.to_send),
            evt_handlers=[(evt.EVT_CONN_OPEN, on_sending_connection)], tls_args=plan.destination_tls)
        if not assoc.is_established:
            log.warning("move destination did not accept the association", destination=destination,
                        address=f"{host}:{port}", calling_ae=run.op.peer.calling_ae)
            await self._final(run, MOVE_DESTINATION_UNKNOWN, {})
            return
        run.sub_association = assoc
        run.outcome.associated = True
        await self._sub_operations(run)

    async def send(self, run: _Run, sub: SubOperation, loaded: Loaded, message_id: int) -> int | None:
        assoc = run.sub_association
        assert assoc is not None
        try:
            response: Dataset = await run.in_thread(
                assoc.send_c_store, loaded.dataset, msg_id=message_id, originator_aet=self._ae_title,
                originator_id=run.op.command.message_id)
        except Exception:  # no accepted context, not encodable, association gone: failed, no response
            return None
        status = response.get("Status")
        return int(status) if status is not None else None


def _contexts_for(subs: list[SubOperation]) -> list[Any]:
    """One context per (SOP class, stored transfer syntax), each with that one syntax."""
    pairs = list(dict.fromkeys((s.sop_class_uid, s.transfer_syntax_uid) for s in subs))
    return [build_context(*pair) for pair in pairs[:MAX_CONTEXTS]] or [build_context(Verification)]


def storage_context(contexts: Mapping[int, AcceptedContext], sop_class: str,
                    transfer_syntax: str) -> AcceptedContext | None:
    """The requestor's context to send a stored instance on, as pynetdicom chooses it: one we
    may act as SCU on (role selection) for its SOP class, in its stored transfer syntax, else
    in one it converts to (neither compressed, same byte order)."""
    stored = UID(transfer_syntax)
    convertible = None
    for cx in contexts.values():
        if cx.abstract_syntax != sop_class or not cx.as_scu:
            continue
        if cx.transfer_syntax == stored:
            return cx
        theirs = UID(cx.transfer_syntax)
        if convertible is None and not (stored.is_compressed or theirs.is_compressed) \
                and stored.is_little_endian == theirs.is_little_endian:
            convertible = cx
    return convertible


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
    except Exception:  # pydicom's writer raises many kinds (sequences nested too deep: RecursionError)
        return None
    data = fp.getvalue()
    if syntax.is_deflated:
        deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
        data += b"\x00" if len(data) % 2 else b""
    return data
