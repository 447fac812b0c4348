"""The requestor (SCU) side of the asyncio layer: associations out, C-ECHO and C-STORE.

One ``Requestor`` per destination keeps one association open across sends and proposes one
presentation context per (SOP class, transfer syntax) pair it was asked for so far (the most
recently used 128). Each context carries exactly one transfer syntax, so the destination
cannot pick another: a data set leaves as the bytes handed to ``store`` (the stored file's
data set as it was hash-checked), never re-encoded here. A pair the destination refuses is
answered without asking again until the association is renewed. ``fallback`` pairs
(transcoding): for a pair in a compressed syntax, the same SOP class in Explicit and
Implicit VR Little Endian is proposed on the same association too (``transcode``), and
``choose`` says which accepted pair an instance goes in; the caller supplies the
decompressed copy (``dicom/transcode.py``).

The A-ASSOCIATE-RQ/AC/RJ go through pynetdicom's codecs (once per association); the
per-image path (C-STORE-RQ, its data set in P-DATA-TF PDUs, the C-STORE-RSP) is ``struct``
(``pdu.py``, ``dimse.py``). TCP_NODELAY is set on every connection (a C-STORE is written as
a few PDUs; with Nagle's algorithm each waits for the peer's delayed ACK). Every wait has a
timeout: the TCP connect, the association response (ARTIM, ``acse_timeout``), each DIMSE
response (``dimse_timeout``), the release. An optional ``ssl.SSLContext`` makes it DICOM TLS.

Results say whether a failure is worth retrying (``SendResult.retryable``): a peer that is
down, rejects transiently or permanently (its configuration may change), aborts or times out
is retryable; a refused presentation context or a status that will fail again whatever we
wait (``PERMANENT_STATUSES``) is not.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAcPdu
from pynetdicom.pdu import A_ASSOCIATE_RJ as AssociateRjPdu
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRqPdu
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import (
    GENERAL_STATUS,
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from dicomledger.common.errors import DicomError
from dicomledger.dicom.net import dimse, pdu
from dicomledger.dicom.net.dimse import Command, CommandError, parse_command
from dicomledger.dicom.net.filemeta import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    file_meta,
)
from dicomledger.dicom.net.negotiation import APPLICATION_CONTEXT_NAME, MAX_CONTEXTS
from dicomledger.dicom.net.pdu import FramingError, PduReader
from dicomledger.dicom.transcode import FALLBACK_SYNTAXES, needs_fallback

log = structlog.get_logger("dicomledger.scu")

VERIFICATION = "1.2.840.10008.1.1"
_STATUS_TEXT = {**GENERAL_STATUS, **STORAGE_SERVICE_CLASS_STATUS}
# Failures that will fail again for this file whatever we wait (PS3.4 B.2.3, PS3.7 C.4.2);
# every other failure (0xA7xx out of resources, 0x0110 processing failure, ...) is retried.
PERMANENT_STATUSES = frozenset({0x0105, 0x0106, 0x0117, 0x0122, 0x0124, 0x0211, 0x0212})
_CONTEXT_RESULTS = {
    1: "user rejected",
    2: "provider rejected",
    3: "abstract syntax not supported",
    4: "transfer syntax(es) not supported",
}

Pair = tuple[str, str]  # (SOP class UID, transfer syntax UID)


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = None  # None: plain TCP
    server_name: str = ""  # the name its TLS certificate must carry (default: host)


@dataclass(frozen=True)
class SendResult:
    ok: bool  # Success or Warning: the destination has the instance
    status: int | None  # DIMSE status; None if no response
    retryable: bool  # worth sending again later (destination down, busy, ...)
    error: str = ""  # what went wrong (or the warning), for logs and `dicomledger status`


def permanent(status: int) -> bool:
    return status in PERMANENT_STATUSES or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF


def status_text(status: int) -> str:
    category = code_to_category(status)
    return _STATUS_TEXT.get(status, (category, category))[1] or category


class AssociationLost(DicomError):
    """The association ended (peer abort, connection closed) while we waited."""


class _Link(asyncio.Protocol):
    """One connection to the destination: PDUs in through ``PduReader``, answers to futures."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._reader = PduReader(self)
        self._control: asyncio.Future[tuple[int, bytes]] | None = None  # AC/RJ/RP
        self._response: asyncio.Future[Command] | None = None
        self._command = bytearray()
        self._writable: asyncio.Future[None] | None = None
        self.closed = False
        self.lost_because = ""
        self.peer_aborted = False

    # transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self._reader.feed(data)
        except (FramingError, CommandError) as exc:
            self._lose(f"the peer broke the protocol: {exc}")
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(f"connection closed ({type(exc).__name__})" if exc else "connection closed")
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # PduSink
    def pdu_started(self, pdu_type: int, length: int) -> None:
        pass

    def control_pdu(self, pdu_type: int, body: bytes) -> None:
        if pdu_type == pdu.A_ABORT:
            self.peer_aborted = True
            self._lose("aborted by the peer")
            self.close()
        elif (
            pdu_type == pdu.A_RELEASE_RQ
        ):  # the peer releases (we never have a request in flight then)
            self.write(pdu.A_RELEASE_RP_PDU)
            self._lose("released by the peer")
        elif self._control is not None and not self._control.done():
            self._control.set_result((pdu_type, body))
        else:
            raise FramingError(f"unexpected {pdu.PDU_NAMES.get(pdu_type, hex(pdu_type))}")

    def pdv(self, context_id: int, control: int, data: memoryview, done: bool) -> None:
        if not control & pdu.MESSAGE_COMMAND:
            return  # a data set after a response (none of the responses we ask for has one)
        self._command += data
        if len(self._command) > 64 * 1024:
            raise FramingError("response command set longer than 64 KiB")
        if done and control & pdu.MESSAGE_LAST:
            raw, self._command = self._command, bytearray()
            command = parse_command(raw)
            if self._response is not None and not self._response.done():
                self._response.set_result(command)

    # used by the Requestor
    def _lose(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.lost_because = why
        for future in (self._control, self._response):
            if future is not None and not future.done():
                future.set_exception(AssociationLost(why))

    def expect_control(self) -> asyncio.Future[tuple[int, bytes]]:
        self._control = self._loop.create_future()
        return self._control

    def expect_response(self) -> asyncio.Future[Command]:
        self._response = self._loop.create_future()
        if self.closed:
            self._response.set_exception(AssociationLost(self.lost_because))
        return self._response

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(parts)

    async def drain(self) -> None:
        if self._writable is not None:
            await self._writable

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(pdu.a_abort(pdu.ABORT_SOURCE_USER, pdu.REASON_NOT_SPECIFIED))
        self.close()

    def close(self) -> None:
        self._lose("closed by us")
        if self.transport is not None:
            self.transport.close()


class Requestor:
    """Associations out to one destination, reused; C-ECHO and C-STORE. Coroutines on one
    event loop, one operation at a time (a lock serialises callers)."""

    def __init__(
        self,
        calling_ae: str,
        destination: Destination,
        *,
        acse_timeout: float = 30,
        dimse_timeout: float = 60,
        connect_timeout: float = 10,
        idle_release: float = 5.0,
        max_pdu: int = 0,  # what we accept; only the destination's maximum matters for sending
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        transcode: bool = False,  # propose uncompressed fallbacks for compressed pairs
    ) -> None:
        self.transcode = transcode
        self.calling_ae = calling_ae
        self.destination = destination
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.connect_timeout = connect_timeout
        self.idle_release = idle_release
        self._max_pdu = max_pdu
        # DICOM TLS: the context built from the config (here or on the destination)
        self._ssl = ssl_context or destination.tls
        self._server_hostname = server_hostname or destination.server_name or destination.host
        self._lock = asyncio.Lock()
        self._pairs: OrderedDict[Pair, None] = OrderedDict()  # needed so far, oldest use first
        self._link: _Link | None = None
        self._proposed: set[Pair] = set()
        self._accepted: dict[Pair, int] = {}  # pair -> presentation context ID
        self._refused: dict[Pair, str] = {}  # pair -> why
        self._peer_max_pdu = 0
        self._opened = 0.0
        self._last_used = 0.0
        self._sends = self._failures = 0  # on the current association
        self._msg_id = 0

    @property
    def where(self) -> str:
        return f"{self.destination.host}:{self.destination.port}"

    @property
    def associated(self) -> bool:
        return self._link is not None and not self._link.closed

    def accepts(self, pair: Pair) -> bool | None:
        """On the current association: True if ``pair`` was accepted, False if refused, None if
        it was not proposed (or there is no association)."""
        if not self.associated:
            return None
        if pair in self._accepted:
            return True
        return False if pair in self._refused else None

    def choose(self, pair: Pair) -> Pair | None:
        """The pair to send an instance of ``pair`` in on the current association: ``pair``
        itself if accepted (or not negotiated yet), else an accepted uncompressed fallback
        (with ``transcode``), else None (the destination takes it in no syntax we offer)."""
        accepted = self.accepts(pair)
        if accepted is not False:
            return pair
        if self.transcode and needs_fallback(pair[1]):
            for syntax in FALLBACK_SYNTAXES:
                if (pair[0], str(syntax)) in self._accepted:
                    return (pair[0], str(syntax))
        return None

    # --- the operations -------------------------------------------------------------------

    async def prepare(self, pairs: list[Pair]) -> SendResult | None:
        """Make sure an association exists that proposed every pair of ``pairs`` (a batch's),
        so sending them does not re-associate; None if it does (pairs may still be refused)."""
        async with self._lock:
            return await self._ensure(pairs)

    async def echo(self) -> SendResult:
        async with self._lock:
            failure = await self._ensure([(VERIFICATION, str(UID("1.2.840.10008.1.2")))])
            if failure is not None:
                return failure
            context_id = self._accepted.get((VERIFICATION, "1.2.840.10008.1.2"))
            if context_id is None:
                return SendResult(
                    False,
                    None,
                    False,
                    f"destination {self.destination.ae_title} does not accept Verification",
                )
            result, _lost = await self._exchange(
                context_id,
                dimse.request(
                    dimse.C_ECHO_RQ, self._next_id(), VERIFICATION.encode(), has_data_set=False
                ),
                None,
                "C-ECHO",
            )
            return result

    async def store(
        self,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        data: bytes | memoryview,
        *,
        move_originator: tuple[str, int] | None = None,
        priority: int = 0,
    ) -> SendResult:
        """One C-STORE of ``data`` (a data set, exactly the bytes to send) in its transfer
        syntax. Never raises for network or destination problems."""
        pair = (str(sop_class_uid), str(transfer_syntax_uid))
        if len(data) % 2 and UID(pair[1]).is_deflated:
            # an unpadded deflate stream (some old files): DCMTK aborts on an odd length; the
            # inflater stops at the stream's end, so a pad byte after it changes nothing
            data = bytes(data) + b"\x00"
        async with self._lock:
            result = await self._ensure([pair], current=pair)
            if result is None:
                reused = self._sends + self._failures > 0
                result, lost = await self._store(
                    pair, sop_instance_uid, data, move_originator, priority
                )
                if lost and reused:
                    # The destination may have dropped the association while it sat idle,
                    # just as we used it: try once on a fresh one (a duplicate is harmless).
                    log.info(
                        "association lost; sending again", destination=self.destination.ae_title
                    )
                    result = (
                        await self._ensure([pair], current=pair)
                        or (
                            await self._store(
                                pair, sop_instance_uid, data, move_originator, priority
                            )
                        )[0]
                    )
            self._last_used = asyncio.get_running_loop().time()
            if not result.ok:
                log.warning(
                    "c-store failed",
                    destination=self.destination.ae_title,
                    address=self.where,
                    sop_instance=sop_instance_uid,
                    status=result.status,
                    retryable=result.retryable,
                    error=result.error,
                )
            return result

    async def send_file(
        self, path: Path, sop_class_uid: str, transfer_syntax_uid: str
    ) -> SendResult:
        """The data set of a Part 10 file, as stored (read in a thread)."""
        try:
            data, sop_instance_uid = await asyncio.to_thread(read_data_set, path)
        except (OSError, ValueError) as exc:
            self._failures += 1
            return SendResult(False, None, False, f"cannot send {path}: {exc}")
        return await self.store(sop_class_uid, sop_instance_uid, transfer_syntax_uid, data)

    async def close(self) -> None:
        """Release the association, if any (the next send opens a new one)."""
        async with self._lock:
            await self._end("released")

    async def abort(self) -> None:
        async with self._lock:
            await self._end("aborted")

    async def release_if_idle(self) -> bool:
        """Release the association if nothing was sent for ``idle_release`` seconds."""
        async with self._lock:
            if self._link is None:
                return False
            if asyncio.get_running_loop().time() - self._last_used < self.idle_release:
                return False
            await self._end("released")
            return True

    # --- association management (callers hold the lock) ------------------------------------

    async def _ensure(self, pairs: list[Pair], current: Pair | None = None) -> SendResult | None:
        if self.transcode:
            pairs = pairs + [
                (p[0], str(ts)) for p in pairs if needs_fallback(p[1]) for ts in FALLBACK_SYNTAXES
            ]
        for pair in pairs:
            self._pairs[pair] = None
            self._pairs.move_to_end(pair)
        while len(self._pairs) > MAX_CONTEXTS:
            self._pairs.popitem(last=False)
        if self._link is not None and self._link.closed:
            await self._end("lost")  # aborted by the peer, the network or a timeout
        if self._link is not None:
            if all(p in self._proposed for p in pairs):
                return (
                    None if current is None or current in self._accepted else self._refusal(current)
                )
            await self._end("released")  # a new pair: negotiate again with it added
        failure = await self._associate()
        if failure is not None:
            return failure
        return None if current is None or current in self._accepted else self._refusal(current)

    async def _associate(self) -> SendResult | None:
        d = self.destination
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _transport, link = await loop.create_connection(
                    lambda: _Link(loop),
                    d.host,
                    d.port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname if self._ssl is not None else None,
                )
        except TimeoutError:
            return SendResult(
                False,
                None,
                True,
                f"no TCP connection to {self.where} within {self.connect_timeout:g} s",
            )
        except ssl.SSLError as exc:
            return SendResult(
                False, None, True, f"TLS handshake with {self.where} failed: {exc.reason or exc}"
            )
        except OSError as exc:
            # asyncio's message names the address; the errno's own text says what happened
            why = (os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__).lower()
            return SendResult(False, None, True, f"{why} at {self.where}")
        pairs = list(self._pairs)
        ids = {pair: 2 * n + 1 for n, pair in enumerate(pairs)}
        answer = link.expect_control()
        link.write(self._associate_rq(pairs, ids))
        try:
            async with asyncio.timeout(self.acse_timeout):
                pdu_type, body = await answer
        except TimeoutError:
            link.abort()
            return SendResult(
                False,
                None,
                True,
                f"no association response from {d.ae_title} at {self.where}"
                f" within {self.acse_timeout:g} s",
            )
        except AssociationLost as exc:
            link.close()
            return SendResult(
                False,
                None,
                True,
                f"{d.ae_title} at {self.where} closed the connection during "
                f"association negotiation ({exc})",
            )
        header = pdu.PDU_HEADER.pack(pdu_type, len(body))
        if pdu_type == pdu.A_ASSOCIATE_RJ:
            link.close()
            rj = AssociateRjPdu()
            rj.decode(header + body)
            primitive = rj.to_primitive()
            reason = primitive.reason_str
            kind = "permanent" if primitive.result == 1 else "transient"
            return SendResult(
                False,
                None,
                True,
                f"association rejected by {d.ae_title} at {self.where}: "
                f"{reason[:1].lower()}{reason[1:]} ({kind}, source: {primitive.source_str})",
            )
        if pdu_type != pdu.A_ASSOCIATE_AC:
            link.abort()
            return SendResult(
                False,
                None,
                True,
                f"{d.ae_title} at {self.where} answered the A-ASSOCIATE-RQ "
                f"with {pdu.PDU_NAMES.get(pdu_type, hex(pdu_type))}",
            )
        try:
            ac = AssociateAcPdu()
            ac.decode(header + body)
            results = {
                int(item.context_id or 0): (int(item.result or 0), str(item.transfer_syntax or ""))
                for item in ac.presentation_context
            }
            peer_max = next(
                (
                    int(i.maximum_length_received or 0)
                    for i in ac.to_primitive().user_information
                    if isinstance(i, MaximumLengthNotification)
                ),
                0,
            )
        except Exception as exc:  # pynetdicom's decoders raise many kinds
            link.abort()
            return SendResult(
                False,
                None,
                True,
                f"A-ASSOCIATE-AC from {d.ae_title} cannot be decoded ({type(exc).__name__}: {exc})",
            )
        self._link, self._opened, self._sends, self._failures = link, started, 0, 0
        self._peer_max_pdu = peer_max
        self._proposed = set(pairs)
        self._accepted, self._refused = {}, {}
        for pair, cid in ids.items():
            result, syntax = results.get(cid, (2, ""))
            if result == 0 and syntax == pair[1]:
                self._accepted[pair] = cid
            else:
                self._refused[pair] = (
                    _CONTEXT_RESULTS.get(result, "rejected") if result else "rejected"
                )
        log.info(
            "association opened",
            destination=d.ae_title,
            address=self.where,
            proposed=len(pairs),
            accepted=len(self._accepted),
            ms=round((loop.time() - started) * 1000, 1),
        )
        # accepted with no context: kept (and released when done) so that its refusals are
        # answered without asking again
        return None

    def _associate_rq(self, pairs: list[Pair], ids: dict[Pair, int]) -> bytes:
        rq = A_ASSOCIATE()
        rq.application_context_name = APPLICATION_CONTEXT_NAME
        rq.calling_ae_title = self.calling_ae
        rq.called_ae_title = self.destination.ae_title
        for pair in pairs:
            cx = PresentationContext()
            cx.context_id = ids[pair]
            cx.abstract_syntax = pair[0]
            cx.transfer_syntax = [pair[1]]
            rq.presentation_context_definition_list.append(cx)
        length = MaximumLengthNotification()
        length.maximum_length_received = self._max_pdu
        uid = ImplementationClassUIDNotification()
        uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        rq.user_information = [length, uid, version]
        return AssociateRqPdu(rq).encode()

    def _refusal(self, pair: Pair) -> SendResult:
        self._failures += 1
        why = self._refused.get(pair, "rejected")
        sop, ts = UID(pair[0]), UID(pair[1])
        error = f"destination {self.destination.ae_title} does not accept {sop.name} in {ts.name} ({why})"
        return SendResult(False, None, False, error)

    def _next_id(self) -> int:
        self._msg_id = self._msg_id % 0xFFFF + 1
        return self._msg_id

    async def _store(
        self,
        pair: Pair,
        sop_instance_uid: str,
        data: bytes | memoryview,
        move_originator: tuple[str, int] | None,
        priority: int,
    ) -> tuple[SendResult, bool]:
        """One C-STORE on the current association; also says whether the association was lost."""
        link = self._link
        if link is None or link.closed:  # the accepted-with-nothing case, or lost since _ensure
            return SendResult(
                False,
                None,
                True,
                f"association with {self.destination.ae_title} lost before the C-STORE",
            ), True
        command = dimse.request(
            dimse.C_STORE_RQ,
            self._next_id(),
            pair[0].encode(),
            has_data_set=True,
            sop_instance_uid=sop_instance_uid.encode(),
            priority=priority,
            move_originator=move_originator,
        )
        result, lost = await self._exchange(self._accepted[pair], command, data, "C-STORE")
        if result.ok:
            self._sends += 1
        else:
            self._failures += 1
        return result, lost

    async def _exchange(
        self, context_id: int, command: bytes, data: bytes | memoryview | None, what: str
    ) -> tuple[SendResult, bool]:
        link = self._link
        assert link is not None
        d = self.destination
        message_id = self._msg_id  # the request's (just taken by _next_id)
        response = link.expect_response()
        parts = pdu.p_data_parts(
            context_id, command, command=True, max_pdu_length=self._peer_max_pdu
        )
        if data is not None:
            parts += pdu.p_data_parts(
                context_id, data, command=False, max_pdu_length=self._peer_max_pdu
            )
        link.writelines(parts)
        try:
            async with asyncio.timeout(self.dimse_timeout):
                await link.drain()
                rsp = await response
                while rsp.message_id != message_id:  # a late answer to a request we gave up on
                    response = link.expect_response()
                    rsp = await response
        except TimeoutError:
            await self._end("aborted")
            return SendResult(
                False,
                None,
                True,
                f"no {what} response from {d.ae_title} within {self.dimse_timeout:g} s",
            ), False
        except AssociationLost:
            await self._end("lost")
            return SendResult(
                False,
                None,
                True,
                f"association with {d.ae_title} at {self.where} aborted during the {what}",
            ), True
        status = rsp.us(dimse.STATUS)
        if status is None:
            await self._end("aborted")
            return SendResult(
                False, None, True, f"{what} response from {d.ae_title} without a status"
            ), False
        category = code_to_category(status)
        if category in (STATUS_SUCCESS, STATUS_WARNING):
            warning = (
                ""
                if category == STATUS_SUCCESS
                else f"warning 0x{status:04X}: {status_text(status)}"
            )
            return SendResult(True, status, False, warning), False
        error = f"{d.ae_title} answered 0x{status:04X} ({status_text(status)})"
        return SendResult(False, status, not permanent(status), error), False

    async def _end(self, how: str) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        if not link.closed:
            if how == "released":
                answer = link.expect_control()
                link.write(pdu.A_RELEASE_RQ_PDU)
                try:
                    async with asyncio.timeout(self.acse_timeout):
                        await answer  # the A-RELEASE-RP
                except (TimeoutError, AssociationLost):
                    how = "aborted"
                    link.abort()
                else:
                    link.close()
            else:
                link.abort()
        self._proposed, self._accepted, self._refused = set(), {}, {}
        log.info(
            "association closed",
            destination=self.destination.ae_title,
            address=self.where,
            ended=how,
            sends=self._sends,
            failures=self._failures,
            seconds=round(asyncio.get_running_loop().time() - self._opened, 2),
        )


def read_data_set(path: Path) -> tuple[memoryview, str]:
    """A Part 10 file's data set bytes and its SOP Instance UID (from its File Meta)."""
    data = path.read_bytes()
    start, meta = file_meta(data)
    sop_instance = meta.get(0x0003)
    if sop_instance is None:
        raise ValueError("no Media Storage SOP Instance UID in its File Meta")
    return memoryview(data)[start:], sop_instance.rstrip(b"\x00 ").decode("ascii", "replace")
