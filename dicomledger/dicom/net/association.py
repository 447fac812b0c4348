"""One connection: the acceptor's side of the PS3.8 section 9.2 state machine, as an
``asyncio.Protocol`` (no thread per association).

States used by an acceptor that answers at once: Sta2 (transport open, waiting for the
A-ASSOCIATE-RQ; ARTIM running), Sta6 (established), Sta13 (we sent an A-ASSOCIATE-RJ,
A-RELEASE-RP or A-ABORT and wait for the peer to close; ARTIM running). Sta3 and Sta8 last
no longer than a function call here. Every way out writes one log line with the reason.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from dicomledger.common.errors import DicomError
from dicomledger.dicom.net import dimse, pdu
from dicomledger.dicom.net.dimse import RESPONSE_BIT, Command, CommandError, parse_command
from dicomledger.dicom.net.negotiation import (
    Accepted,
    AcceptedContext,
    AssociateRqError,
    RefusedAssociation,
    Rejected,
    reject,
)
from dicomledger.dicom.net.operation import DiscardSink, Operation, Peer, Refusal
from dicomledger.dicom.net.pdu import FramingError, PduReader
from dicomledger.dicom.net.tls import TlsPeer, tls_peer

if TYPE_CHECKING:
    from dicomledger.dicom.net.server import DicomServer

log = structlog.get_logger("dicomledger.net")

COMMAND_SET_LIMIT = 64 * 1024  # a command set is a few hundred bytes
STASH_LIMIT = 1024 * 1024  # bytes held while an operation runs before we stop reading
SERVICE_NAMES = {
    dimse.C_STORE_RQ: "C-STORE",
    dimse.C_GET_RQ: "C-GET",
    dimse.C_FIND_RQ: "C-FIND",
    dimse.C_MOVE_RQ: "C-MOVE",
    dimse.C_ECHO_RQ: "C-ECHO",
    0x0100: "N-EVENT-REPORT",
    0x0110: "N-GET",
    0x0120: "N-SET",
    0x0130: "N-ACTION",
    0x0140: "N-CREATE",
    0x0150: "N-DELETE",
}


# How an association ended, for DicomServer.outcomes ("ended" of its log line; none: we aborted it)
OUTCOMES = {
    "released": "released",
    "aborted by the peer": "aborted_by_peer",
    "connection closed": "connection_lost",
}


class State(enum.Enum):
    AWAITING_RQ = "Sta2"
    ESTABLISHED = "Sta6"
    CLOSING = "Sta13"
    CLOSED = "Sta1"


class Association(asyncio.Protocol):
    def __init__(self, server: DicomServer) -> None:
        self._server = server
        self._loop = server.loop
        self._reader = PduReader(self, server.negotiator.max_pdu_length)
        self._transport: asyncio.Transport | None = None
        self.state = State.AWAITING_RQ
        self.address = "?"
        self.peer = Peer("", "?")
        self.opened = self._loop.time()
        self._last_read = self.opened
        self._timer: asyncio.TimerHandle | None = None
        self._contexts: dict[int, AcceptedContext] = {}
        self._peer_max_pdu = 0
        # the message being received
        self._message_context: AcceptedContext | None = None
        self._command = bytearray()
        self._receiving: Operation | None = None  # its data set is arriving
        # the operation being served, and what waits for it
        self.busy: Operation | None = None
        self.task: asyncio.Task[None] | None = None
        self._deferred_request: tuple[Command, AcceptedContext] | None = None
        self._release_deferred = False
        self._reading_paused = False
        self._writable: asyncio.Future[None] | None = None
        self.counted = False  # holds one of the server's max_associations places
        self.over_tls = False
        self.tls_peer: TlsPeer | None = None  # the client certificate the handshake verified
        self.stores = 0
        self.failures = 0

    # --- transport events ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peername = transport.get_extra_info("peername")
        self.address = f"{peername[0]}:{peername[1]}" if peername else "?"
        self.peer = Peer("", self.address)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.over_tls, self.tls_peer = True, tls_peer(ssl_object)
        self._arm(self.opened + self._server.artim_timeout)
        self._server.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        if self.state is not State.ESTABLISHED and self.state is not State.AWAITING_RQ:
            return  # Sta13: read and drop until the peer closes
        self._last_read = self._loop.time()
        self._run_reader(self._reader.feed, data)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = State.CLOSED
        self._cancel_timer()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        note = self._drop_partial_data_set()
        if was is State.ESTABLISHED:
            why = f"{type(exc).__name__}: {exc}" if exc else "closed by the peer without A-RELEASE"
            self._end("association", ended="connection closed", reason=why + note)
        elif was is State.AWAITING_RQ:
            log.info(
                "connection closed",
                peer=self.address,
                reason="closed before an A-ASSOCIATE-RQ"
                + (f" ({type(exc).__name__})" if exc else ""),
            )
        self._server.connection_closed(self)

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # --- PduSink -----------------------------------------------------------------------------

    def pdu_started(self, pdu_type: int, length: int) -> None:
        if self.state is State.AWAITING_RQ:
            if pdu_type not in (pdu.A_ASSOCIATE_RQ, pdu.A_ABORT):
                raise FramingError(
                    f"{pdu.PDU_NAMES[pdu_type]} before an A-ASSOCIATE-RQ", pdu.REASON_UNEXPECTED_PDU
                )
        elif pdu_type not in (pdu.P_DATA_TF, pdu.A_RELEASE_RQ, pdu.A_ABORT):
            raise FramingError(
                f"{pdu.PDU_NAMES[pdu_type]} on an established association",
                pdu.REASON_UNEXPECTED_PDU,
            )

    def control_pdu(self, pdu_type: int, body: bytes) -> None:
        if pdu_type == pdu.A_ASSOCIATE_RQ:
            self._associate(body)
        elif pdu_type == pdu.A_RELEASE_RQ:
            self._release()
        elif pdu_type == pdu.A_ABORT:
            self._peer_aborted(body)

    def pdv(self, context_id: int, control: int, data: memoryview, done: bool) -> None:
        context = self._message_context
        if context is None or context.context_id != context_id:
            if context is not None:
                raise FramingError(
                    f"PDV on presentation context {context_id} inside a message on "
                    f"context {context.context_id}"
                )
            context = self._contexts.get(context_id)
            if context is None:
                raise FramingError(
                    f"PDV on presentation context {context_id}, which was not accepted"
                )
            self._message_context = context
        if control & pdu.MESSAGE_COMMAND:
            if self._receiving is not None:
                raise FramingError(
                    "command fragment where the data set was expected",
                    pdu.REASON_UNEXPECTED_PARAMETER,
                )
            self._command += data
            if len(self._command) > COMMAND_SET_LIMIT:
                raise FramingError(f"command set longer than {COMMAND_SET_LIMIT} bytes")
            if done and control & pdu.MESSAGE_LAST:
                self._command_received(context)
        else:
            op = self._receiving
            if op is None:
                raise FramingError(
                    "data set fragment without a command", pdu.REASON_UNEXPECTED_PARAMETER
                )
            op.sink.write(data)
            if done and control & pdu.MESSAGE_LAST:
                self._data_set_received(op)

    # --- association -------------------------------------------------------------------------

    def _associate(self, body: bytes) -> None:
        negotiator = self._server.negotiator
        try:
            answer = negotiator.cached(body) or negotiator.precheck(body)
        except AssociateRqError as exc:
            self._abort(str(exc), pdu.REASON_INVALID_PARAMETER)
            return
        if answer is None:  # decode and negotiate in the server's worker thread
            self._reader.halt()
            self.task = self._loop.create_task(self._negotiate_elsewhere(body))
            self._server.operation_started(self.task)
            return
        self._answer(answer)

    async def _negotiate_elsewhere(self, body: bytes) -> None:
        negotiator = self._server.negotiator
        try:
            answer = await self._loop.run_in_executor(
                self._server.negotiation_pool, negotiator.decide, body
            )
        except AssociateRqError as exc:
            if self.state is State.AWAITING_RQ:
                self._abort(str(exc), pdu.REASON_INVALID_PARAMETER)
            return
        finally:
            self.task = None
        negotiator.remember(body, answer)
        if self.state is State.AWAITING_RQ:  # not closed meanwhile (ARTIM, the peer)
            self._answer(answer)
            self._run_reader(self._reader.resume)

    def _answer(self, answer: Accepted | Rejected) -> None:
        server = self._server
        if not isinstance(answer, Rejected) and server.stopping:
            answer = reject(
                pdu.REJECTED_TRANSIENT,
                pdu.RJ_SOURCE_PRESENTATION,
                1,
                "the server is stopping",
                answer.calling_ae,
                answer.called_ae,
            )
        if not isinstance(answer, Rejected) and (
            unbound := server.binding_refusal(answer.calling_ae, self)
        ):
            # checked per connection, after the (cached) negotiation: an AE title alone is no identity
            answer = reject(
                pdu.REJECTED_PERMANENT,
                pdu.RJ_SOURCE_USER,
                3,
                unbound,
                answer.calling_ae,
                answer.called_ae,
            )
        if not isinstance(answer, Rejected) and server.associations >= server.max_associations:
            answer = server.negotiator.local_limit_exceeded(
                answer.calling_ae, answer.called_ae, server.max_associations
            )
        if isinstance(answer, Rejected):  # (logged first: the line is there when the peer reads)
            log.warning(
                "association refused",
                reason=answer.reason,
                calling_ae=answer.calling_ae,
                called_ae=answer.called_ae,
                peer=self.address,
            )
            server.outcomes["refused"] += 1
            server.association_refused(
                RefusedAssociation(
                    answer.calling_ae,
                    answer.called_ae,
                    self.address.rsplit(":", 1)[0],
                    answer.reason,
                    unauthorised=not answer.transient,
                )
            )
            self._write(answer.pdu)
            self._closing()
            return
        self._write(answer.pdu)
        self.state = State.ESTABLISHED
        self._contexts = dict(answer.contexts)
        self._peer_max_pdu = answer.peer_max_pdu
        self.peer = Peer(answer.calling_ae, self.address)
        server.association_started(self)
        self._arm(self._last_read + server.network_timeout)

    def _release(self) -> None:
        if self._receiving is not None or self._message_context is not None:
            raise FramingError("A-RELEASE-RQ inside a DIMSE message", pdu.REASON_UNEXPECTED_PDU)
        if self.busy is not None:  # answer the operation first (PS3.8 Sta8 may still send P-DATA)
            self._release_deferred = True
            self._reader.halt()
            if self.busy.responses is not None:  # a peer that releases answers no request of ours
                self.busy.responses.put_nowait(None)
            return
        self._end("association", ended="released")
        self._write(pdu.A_RELEASE_RP_PDU)
        self._closing()

    def _peer_aborted(self, body: bytes) -> None:
        source, reason = (body[2], body[3]) if len(body) == 4 else (None, None)
        note = self._drop_partial_data_set()
        if self.state is State.ESTABLISHED:
            self._end(
                "association",
                ended="aborted by the peer",
                abort_source=source,
                abort_reason=reason,
                reason=note.strip(" ;") or None,
            )
        else:
            log.info("connection closed", peer=self.address, reason="A-ABORT before association")
        self.state = State.CLOSED
        assert self._transport is not None
        self._transport.close()

    def _abort(
        self,
        reason: str,
        provider_reason: int = pdu.REASON_NOT_SPECIFIED,
        source: int = pdu.ABORT_SOURCE_PROVIDER,
    ) -> None:
        """We abort: bad input (PS3.8 AA-1 before association, AA-8 after) or a timeout."""
        if self.state is State.AWAITING_RQ:
            log.warning(
                "association aborted",
                reason=reason,
                peer=self.address,
                state="awaiting A-ASSOCIATE-RQ",
            )
            self._write(pdu.a_abort(pdu.ABORT_SOURCE_USER, pdu.REASON_NOT_SPECIFIED))  # AA-1
        elif self.state is State.ESTABLISHED:
            note = self._drop_partial_data_set()
            self._end("association aborted", reason=reason + note)
            self._write(
                pdu.a_abort(source, provider_reason if source == pdu.ABORT_SOURCE_PROVIDER else 0)
            )  # AA-8
        else:
            return
        self._closing()

    def _closing(self) -> None:
        """Sta13: wait (ARTIM) for the peer to close after our last PDU."""
        if self.state is State.ESTABLISHED:
            self._server.association_ended(self)
        self.state = State.CLOSING
        self._reader.halt()
        self._arm(self._loop.time() + self._server.artim_timeout)

    def _end(self, event: str, **fields: object) -> None:
        """The one log line of an association's end (and its count by outcome)."""
        if self.state is State.ESTABLISHED:
            self._server.association_ended(self)
            self._server.outcomes[OUTCOMES.get(str(fields.get("ended")), "aborted")] += 1
        level = log.warning if "aborted" in event else log.info
        level(
            event,
            calling_ae=self.peer.calling_ae,
            peer=self.address,
            stores=self.stores,
            failures=self.failures,
            duration_ms=round((self._loop.time() - self.opened) * 1000, 1),
            **{k: v for k, v in fields.items() if v is not None},
        )

    def _abort_for_service(self, reason: str) -> None:
        if self.state is State.ESTABLISHED:
            self._abort(reason)

    def abort_for_shutdown(self) -> None:
        if self.state is State.ESTABLISHED:
            self._abort("the server is stopping", source=pdu.ABORT_SOURCE_USER)
        if self._transport is not None:
            self._transport.close()

    # --- DIMSE messages --------------------------------------------------------------------

    def _command_received(self, context: AcceptedContext) -> None:
        raw, self._command = self._command, bytearray()
        try:
            command = parse_command(raw)
        except CommandError as exc:
            raise _DimseError(f"command set does not parse: {exc}") from None
        field = command.field
        if field == dimse.C_CANCEL_RQ or field & RESPONSE_BIT:
            self._message_context = None
            if command.has_data_set:
                raise _DimseError(f"command 0x{field:04X} with a data set")
            busy = self.busy
            if field == dimse.C_CANCEL_RQ:
                if busy is not None and busy.command.message_id == command.message_id:
                    busy.cancelled = True
                return  # a late C-CANCEL (the operation already ended) is normal
            if busy is not None and busy.responses is not None:
                busy.responses.put_nowait(command)  # to the service that sent the request
                return
            raise _DimseError(f"unexpected DIMSE response 0x{field:04X} (we sent no request)")
        if field not in dimse.REQUESTS:
            raise _DimseError(f"unknown command field 0x{field:04X}")
        if self.busy is not None:  # beyond the 1/1 window: serve it after the current one
            self._deferred_request = (command, context)
            self._reader.halt()
            return
        self._request(command, context)

    def _request(self, command: Command, context: AcceptedContext) -> None:
        service = self._server.services.get(command.field)
        op = Operation(
            self.peer,
            context,
            self._contexts,
            command,
            service,
            self._send,
            self._drain,
            self._abort_for_service,
        )
        try:
            name = SERVICE_NAMES.get(command.field, "operation")
            if service is None:
                raise Refusal(dimse.UNRECOGNIZED_OPERATION, f"{name} is not served here")
            owners = self._server.owners.get(context.abstract_syntax)
            # a context nobody declared was accepted as an unknown storage SOP class
            if command.field not in (owners or (dimse.C_STORE_RQ,)):
                raise Refusal(
                    dimse.SOP_CLASS_NOT_SUPPORTED,
                    f"{name} on presentation context {context.context_id}, accepted for "
                    f"{context.abstract_syntax}",
                )
            service.check(op)
            if command.has_data_set:
                op.sink = service.open_sink(op, self._server.temp_name())
        except Refusal as refusal:
            op.refusal = refusal
            op.sink = DiscardSink()
        if command.has_data_set:
            self._receiving = op
        else:
            self._message_context = None
            self._begin(op)

    def _data_set_received(self, op: Operation) -> None:
        self._receiving = None
        self._message_context = None
        try:
            op.sink.finish(op)
        except Refusal as refusal:
            op.refusal = op.refusal or refusal
        self._begin(op)

    def _begin(self, op: Operation) -> None:
        if self._server.stopping:  # in-flight operations finish; new ones are not started
            op.cleanup()
            self._abort("the server is stopping: request not served", source=pdu.ABORT_SOURCE_USER)
            return
        refusal = op.refusal
        if refusal is not None or op.service is None:
            assert refusal is not None
            name = SERVICE_NAMES.get(op.command.field, f"0x{op.command.field:04X}")
            log.warning(
                "request refused",
                service=name,
                status=f"0x{refusal.status:04X}",
                reason=refusal.reason,
                calling_ae=self.peer.calling_ae,
                peer=self.address,
            )
            op.respond(
                dimse.failure_response(op.command, refusal.status, refusal.reason), refusal.status
            )
            self._count(op)
            return
        self.busy = op
        if not op.service.cancellable:
            self._reader.halt()  # the 1/1 window: nothing else to read until we answer
        self.task = self._loop.create_task(self._serve(op))
        self._server.operation_started(self.task)

    async def _serve(self, op: Operation) -> None:
        assert op.service is not None
        try:
            await op.service.serve(op)
        except Exception:
            log.exception(
                "dimse service failed",
                service=op.service.name,
                calling_ae=self.peer.calling_ae,
                peer=self.address,
            )
            if op.status is None or op.status in (dimse.PENDING, 0xFF01):
                op.respond(
                    dimse.failure_response(op.command, dimse.PROCESSING_FAILURE, "internal error"),
                    dimse.PROCESSING_FAILURE,
                )
        finally:
            op.cleanup()
            self._count(op)
            self.busy = None
            self.task = None
            self._operation_done()

    def _count(self, op: Operation) -> None:
        if op.command.field == dimse.C_STORE_RQ:
            self.stores += 1
            self.failures += op.status != dimse.SUCCESS

    def _operation_done(self) -> None:
        if self.state is not State.ESTABLISHED:
            return
        if self._release_deferred:
            self._release_deferred = False
            self._run_reader(lambda: self._release())
            return
        deferred, self._deferred_request = self._deferred_request, None
        if deferred is not None:
            self._run_reader(self._request, *deferred)
        if self.busy is None or self.busy.service is None or self.busy.service.cancellable:
            self._run_reader(self._reader.resume)

    # --- plumbing --------------------------------------------------------------------------

    def _run_reader(self, step: Callable[..., None], *args: object) -> None:
        """Run a reader step; a protocol violation in it aborts the association."""
        try:
            step(*args)
        except FramingError as exc:
            self._abort(str(exc), exc.reason)
        except _DimseError as exc:
            self._abort(str(exc), source=pdu.ABORT_SOURCE_USER)
        if self.state is not State.ESTABLISHED and self.state is not State.AWAITING_RQ:
            return
        transport = self._transport
        assert transport is not None
        stashed = self._reader.stashed
        if stashed > STASH_LIMIT and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif self._reading_paused and stashed <= STASH_LIMIT:
            self._reading_paused = False
            transport.resume_reading()

    def _send(self, context_id: int, command: bytes, data_set: bytes | memoryview | None) -> None:
        if self.state is not State.ESTABLISHED:
            return  # the peer is gone or aborted: nothing to answer
        data = pdu.p_data(context_id, command, command=True, max_pdu_length=self._peer_max_pdu)
        if data_set is not None:
            data += pdu.p_data(
                context_id, data_set, command=False, max_pdu_length=self._peer_max_pdu
            )
        self._write(data)

    async def _drain(self) -> None:
        if self._writable is not None:
            await self._writable
        else:
            await asyncio.sleep(0)  # let a C-CANCEL-RQ be read

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def _drop_partial_data_set(self) -> str:
        """The association ends: a data set being received is dropped (with its temp file),
        an operation being served is told to stop where it can (C-FIND between matches)."""
        if self.busy is not None:
            self.busy.cancelled = self.busy.ended = True
            if self.busy.responses is not None:
                self.busy.responses.put_nowait(None)
        op, self._receiving = self._receiving, None
        if op is None:
            return ""
        op.sink.discard()
        return "; data set incomplete, temp file removed"

    # --- timers: one handle, re-armed lazily --------------------------------------------------

    def _arm(self, deadline: float) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_at(deadline, self._timer_fired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timer_fired(self) -> None:
        self._timer = None
        server, now = self._server, self._loop.time()
        if self.state is State.AWAITING_RQ:  # ARTIM: from the connection's first moment
            log.warning(
                "connection closed",
                peer=self.address,
                reason=f"no A-ASSOCIATE-RQ within {server.artim_timeout:g} s (ARTIM)",
            )
            self._close_now()
        elif self.state is State.ESTABLISHED:
            due = self._last_read + server.network_timeout
            if self.busy is not None:  # waiting for us, not for the peer
                self._arm(now + server.network_timeout)
            elif now < due:
                self._arm(due)
            else:
                self._abort(
                    f"no data from the peer for {server.network_timeout:g} s (network_timeout)"
                )
        elif self.state is State.CLOSING:  # the peer did not close after our last PDU
            self._close_now()

    def _close_now(self) -> None:
        self.state = State.CLOSING
        if self._transport is not None:
            self._transport.abort()

    def evict(self) -> None:
        """Closed to make room for new connections (never-associated, oldest first)."""
        log.warning(
            "connection closed",
            peer=self.address,
            reason="too many connections waiting for an A-ASSOCIATE-RQ; the oldest is closed",
        )
        self._close_now()


class _DimseError(DicomError, ValueError):
    """A command set we cannot answer (no usable Message ID or Command Field): A-ABORT."""
