"""The DIMSE services on the asyncio layer: C-ECHO, C-STORE and C-FIND (C-MOVE and C-GET:
retrieve.py). Thin: C-STORE hands a ``StoreRequest`` to the gateway's ``on_store`` and
answers the status it returns; C-FIND asks the Query/Retrieve core (``RetrieveCore.find``)
and sends what it returns. Each is one class with ``check``, ``open_sink`` and ``serve``,
registered under its Command Field in server.py."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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

log = structlog.get_logger("dicomledger.net")


@dataclass(frozen=True)
class StoreRequest:
    """A received C-STORE, as the gateway's ``on_store`` gets it."""

    dataset_path: Path  # the temp Part 10 file; on_store moves what it keeps, the rest is removed
    calling_ae: str
    peer: str  # "host:port"
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    # Writing the received data set failed (e.g. a full disk): nothing usable is at dataset_path
    receive_error: OSError | None = None


OnStore = Callable[[StoreRequest], Awaitable[int]]

# What we accept, as the pynetdicom server did before: every storage SOP class with every
# transfer syntax pydicom knows (the sender's choice wins, negotiation.py); Verification and
# Query/Retrieve with pynetdicom's defaults.
STORAGE_TRANSFER_SYNTAXES = tuple(str(ts) for ts in AllTransferSyntaxes)
STORAGE_SOP_CLASSES = tuple(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
DEFAULT_SYNTAXES = tuple(DEFAULT_TRANSFER_SYNTAXES)


def check_sop_class(op: Operation, service: str) -> bytes:
    sop_class = op.command.uid(AFFECTED_SOP_CLASS_UID)
    problem = uid_problem(sop_class, "Affected SOP Class UID")
    if problem:
        raise Refusal(CANNOT_UNDERSTAND, problem)
    assert sop_class is not None
    if sop_class != op.context.abstract_syntax_bytes:
        raise Refusal(
            SOP_CLASS_NOT_SUPPORTED,
            f"{service} of SOP class {sop_class.decode()} on presentation "
            f"context {op.context.context_id}, accepted for {op.context.abstract_syntax}",
        )
    return sop_class


class EchoService:
    name = "C-ECHO"
    cancellable = False
    abstract_syntaxes = {str(Verification): DEFAULT_SYNTAXES}

    def check(self, op: Operation) -> None:
        check_sop_class(op, self.name)

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
        check_sop_class(op, self.name)
        problem = uid_problem(
            op.command.uid(AFFECTED_SOP_INSTANCE_UID), "Affected SOP Instance UID"
        )
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
        return FileSink(self._temp_dir, temp_name, header)  # a write error goes to on_store

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
            receive_error=op.data_set_error,
        )
        status = await self._on_store(request)
        op.respond(
            dimse.store_response(op.command.message_id, sop_class, sop_instance, status), status
        )


FIND_MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): "patient",
    str(StudyRootQueryRetrieveInformationModelFind): "study",
}


class FindService:
    """C-FIND against ``RetrieveCore.find``: a Pending response per match, C-CANCEL between
    matches, then the final one."""

    name = "C-FIND"
    cancellable = True
    abstract_syntaxes = dict.fromkeys(FIND_MODELS, DEFAULT_SYNTAXES)

    def __init__(self, core: RetrieveCore) -> None:
        self._core = core

    def check(self, op: Operation) -> None:
        check_sop_class(op, self.name)
        if op.context.abstract_syntax not in FIND_MODELS:  # e.g. C-FIND on a storage context
            raise Refusal(
                SOP_CLASS_NOT_SUPPORTED, f"C-FIND for {op.context.abstract_syntax} is not served"
            )
        if not op.command.has_data_set:
            raise Refusal(CANNOT_UNDERSTAND, "C-FIND-RQ without an identifier")

    def open_sink(self, op: Operation, temp_name: str) -> Sink:
        return MemorySink()

    async def serve(self, op: Operation) -> None:
        sop_class = op.command.uid(AFFECTED_SOP_CLASS_UID) or b""
        message_id = op.command.message_id
        syntax = UID(op.context.transfer_syntax)

        def final(status: int, comment: str | None = None) -> None:
            op.respond(
                dimse.find_response(
                    message_id, sop_class, status, with_identifier=False, comment=comment
                ),
                status,
            )

        try:
            request = await qr_request(op, "C-FIND", FIND_MODELS[op.context.abstract_syntax])
            matches = await self._core.find(request)
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
                log.error(
                    "c-find response not encodable",
                    calling_ae=op.peer.calling_ae,
                    peer=op.peer.address,
                )
                continue
            op.respond(
                dimse.find_response(message_id, sop_class, PENDING, with_identifier=True),
                PENDING,
                data,
            )
        await op.drain()
        final(CANCEL if op.cancelled else SUCCESS)


async def qr_request(
    op: Operation, service: str, model: str, move_destination: str | None = None
) -> QRRequest:
    """The request's identifier decoded (up to 1 MiB: in a thread, off the event loop) into a
    QRRequest; Refusal 0xC000 with one 'query refused' line if it does not decode."""
    syntax = UID(op.context.transfer_syntax)
    identifier = await asyncio.get_running_loop().run_in_executor(
        None, _decode_identifier, op.data_set or b"", syntax
    )
    if isinstance(identifier, str):
        reason = f"identifier cannot be decoded: {identifier}"
        log.warning(
            "query refused",
            service=service,
            calling_ae=op.peer.calling_ae,
            peer=op.peer.address,
            reason=reason,
        )
        raise Refusal(UNABLE_TO_PROCESS, reason)
    return QRRequest(
        service=service,
        model=model,
        identifier=identifier,
        calling_ae=op.peer.calling_ae,
        peer=op.peer.address,
        move_destination=move_destination,
    )


def _decode_identifier(data: bytes, syntax: UID) -> Dataset | str:
    """The identifier, or why it does not decode (the exception's type: its text may quote values)."""
    try:
        identifier = decode(
            io.BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated
        )
        list(identifier)  # pydicom converts values lazily: make any of them fail here
        return identifier
    except Exception as exc:  # pydicom's decoders raise many kinds: all mean a malformed identifier
        return type(exc).__name__
