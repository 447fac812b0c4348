"""The DIMSE services on the asyncio layer: C-ECHO, C-STORE and C-FIND. Thin: C-STORE hands
a ``StoreRequest`` to the gateway's ``on_store`` and answers the status it returns; C-FIND
asks the Query/Retrieve core (``RetrieveCore.find``) and sends what it returns. C-MOVE and
C-GET are added the same way: one class with ``check``, ``open_sink`` and ``serve``,
registered under its Command Field in server.py."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dicomledger.dicom.net import dimse
from dicomledger.dicom.net.dimse import (
    AFFECTED_SOP_CLASS_UID,
    AFFECTED_SOP_INSTANCE_UID,
    CANCEL,
    CANNOT_UNDERSTAND,
    PENDING,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    uid_problem,
)
from dicomledger.dicom.net.filemeta import part10_header
from dicomledger.dicom.net.operation import FileSink, MemorySink, Operation, Refusal, Sink
from dicomledger.dicom.qr import QRRequest, RetrieveCore
from dicomledger.dicom.query import UNABLE_TO_PROCESS, QueryError
from dicomledger.dicom.scp import StoreRequest

log = structlog.get_logger("dicomledger.net")

OnStore = Callable[[StoreRequest], Awaitable[int]]

# What we accept, as today's pynetdicom server does: every storage SOP class with every
# transfer syntax pydicom knows (the sender's choice wins, negotiation.py); Verification and
# Query/Retrieve with pynetdicom's defaults.
STORAGE_TRANSFER_SYNTAXES = tuple(str(ts) for ts in AllTransferSyntaxes)
STORAGE_SOP_CLASSES = tuple(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
DEFAULT_SYNTAXES = tuple(DEFAULT_TRANSFER_SYNTAXES)


def _check_sop_class(op: Operation, service: str) -> bytes:
    sop_class = op.command.uid(AFFECTED_SOP_CLASS_UID)
    problem = uid_problem(sop_class, "Affected SOP Class UID")
    if problem:
        raise Refusal(CANNOT_UNDERSTAND, problem)
    assert sop_class is not None
    if sop_class != op.context.abstract_syntax_bytes:
        raise Refusal(SOP_CLASS_NOT_SUPPORTED, f"{service} of SOP class {sop_class.decode()} on presentation "
                      f"context {op.context.context_id}, accepted for {op.context.abstract_syntax}")
    return sop_class


class EchoService:
    name = "C-ECHO"
    cancellable = False
    abstract_syntaxes = {str(Verification): DEFAULT_SYNTAXES}

    def check(self, op: Operation) -> None:
        _check_sop_class(op, self.name)

    def open_sink(self, op: Operation, temp_name: str) -> Sink:
        raise Refusal(CANNOT_UNDERSTAND, "C-ECHO-RQ with a data set")

    async def serve(self, op: Operation) -> None:
        sop_class = op.command.uid(AFFECTED_SOP_CLASS_UID) or b""
        op.respond(dimse.echo_response(op.command.message_id, sop_class), SUCCESS)


class StoreService:
    """C-STORE: the data set streams into a temp Part 10 file in ``temp_dir``; ``on_store``
    gets it as a StoreRequest and returns the status, once the instance is safe (or not).
    A file ``on_store`` leaves at ``dataset_path`` is removed afterwards."""

    name = "C-STORE"
    cancellable = False
    abstract_syntaxes = dict.fromkeys(STORAGE_SOP_CLASSES, STORAGE_TRANSFER_SYNTAXES)

    def __init__(self, on_store: OnStore, temp_dir: Path) -> None:
        self._on_store = on_store
        self._temp_dir = temp_dir

    def check(self, op: Operation) -> None:
        _check_sop_class(op, self.name)
        problem = uid_problem(op.command.uid(AFFECTED_SOP_INSTANCE_UID), "Affected SOP Instance UID")
        if problem:
            raise Refusal(CANNOT_UNDERSTAND, problem)
        if not op.command.has_data_set:
            raise Refusal(CANNOT_UNDERSTAND, "C-STORE-RQ without a data set")

    def open_sink(self, op: Operation, temp_name: str) -> Sink:
        header = part10_header(
            op.context.abstract_syntax_bytes,
            op.command.uid(AFFECTED_SOP_INSTANCE_UID) or b"",
            op.context.transfer_syntax_bytes,
            op.peer.calling_ae.encode("ascii", "replace"),
        )
        try:
            return FileSink(self._temp_dir, temp_name, header)
        except OSError as exc:
            raise Refusal(dimse.OUT_OF_RESOURCES, f"cannot create a temp file: {exc.strerror}") from None

    async def serve(self, op: Operation) -> None:
        assert op.data_set_path is not None
        sop_class = op.command.uid(AFFECTED_SOP_CLASS_UID) or b""
        sop_instance = op.command.uid(AFFECTED_SOP_INSTANCE_UID) or b""
        request = StoreRequest(
            dataset_path=op.data_set_path,
            calling_ae=op.peer.calling_ae,
            peer=op.peer.address,
            sop_class_uid=sop_class.decode("ascii"),
            sop_instance_uid=sop_instance.decode("ascii"),
            transfer_syntax_uid=op.context.transfer_syntax,
        )
        status = await self._on_store(request)
        op.respond(dimse.store_response(op.command.message_id, sop_class, sop_instance, status), status)


FIND_MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): "patient",
    str(StudyRootQueryRetrieveInformationModelFind): "study",
}


class FindService:
    """C-FIND against ``RetrieveCore.find`` (run in a thread: the core may block on its
    database): a Pending response per match, C-CANCEL between matches, then the final one."""

    name = "C-FIND"
    cancellable = True
    abstract_syntaxes = dict.fromkeys(FIND_MODELS, DEFAULT_SYNTAXES)

    def __init__(self, core: RetrieveCore) -> None:
        self._core = core

    def check(self, op: Operation) -> None:
        _check_sop_class(op, self.name)
        if op.context.abstract_syntax not in FIND_MODELS:  # e.g. C-FIND on a storage context
            raise Refusal(SOP_CLASS_NOT_SUPPORTED, f"C-FIND for {op.context.abstract_syntax} is not served")
        if not op.command.has_data_set:
            raise Refusal(CANNOT_UNDERSTAND, "C-FIND-RQ without an identifier")

    def open_sink(self, op: Operation, temp_name: str) -> Sink:
        return MemorySink()

    async def serve(self, op: Operation) -> None:
        sop_class = op.command.uid(AFFECTED_SOP_CLASS_UID) or b""
        message_id = op.command.message_id
        syntax = UID(op.context.transfer_syntax)

        def final(status: int, comment: str | None = None) -> None:
            op.respond(dimse.find_response(message_id, sop_class, status, with_identifier=False,
                                           comment=comment), status)

        try:  # decoding (up to 1 MiB) and the core's query: in a thread, off the event loop
            matches = await asyncio.get_running_loop().run_in_executor(None, self._find, op, syntax)
        except Refusal as refusal:
            final(refusal.status, refusal.reason)
            return
        except QueryError as exc:  # the core has logged why
            final(exc.status, str(exc)[:64])
            return
        for match in matches:
            await op.drain()
            if op.cancelled:
                final(CANCEL)
                return
            data = encode(match, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
            if data is None:  # an identifier the core built that pydicom cannot encode: a bug there
                log.error("c-find response not encodable", calling_ae=op.peer.calling_ae, peer=op.peer.address)
                continue
            op.respond(dimse.find_response(message_id, sop_class, PENDING, with_identifier=True), PENDING, data)
        await op.drain()
        final(CANCEL if op.cancelled else SUCCESS)

    def _find(self, op: Operation, syntax: UID) -> list[Dataset]:
        try:
            identifier = decode(io.BytesIO(op.data_set or b""), syntax.is_implicit_VR, syntax.is_little_endian,
                                syntax.is_deflated)
            list(identifier)  # pydicom converts values lazily: make any of them fail here
        except Exception as exc:  # pydicom's decoders raise many kinds: all mean a malformed identifier
            reason = f"identifier cannot be decoded: {type(exc).__name__}"
            log.warning("query refused", service="C-FIND", calling_ae=op.peer.calling_ae, peer=op.peer.address,
                        reason=reason)
            raise Refusal(UNABLE_TO_PROCESS, reason) from None
        request = QRRequest(service="C-FIND", model=FIND_MODELS[op.context.abstract_syntax], identifier=identifier,
                            calling_ae=op.peer.calling_ae, peer=op.peer.address)
        return self._core.find(request)
