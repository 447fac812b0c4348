"""C-STORE SCU: forwards stored files, as stored, to one destination AE over a reused association.

Blocking API for a forwarding worker's own thread (never the asyncio loop). One ``StoreSCU``
per worker; it keeps one association open across sends and proposes one presentation
context per (SOP class, transfer syntax) pair seen so far. Each context carries exactly one
transfer syntax, so the destination cannot pick another one: files go out byte for byte
(pynetdicom's chunked send, no decoding, no transcoding; only a file whose data set has an odd,
invalid length is re-encoded by pydicom, in its own transfer syntax).

The worker releases the association when it has nothing to send: it calls ``close()`` as
soon as its queue has nothing due (or ``release_if_idle()`` from a timer, which releases
after ``idle_release`` seconds without a send). A later send re-associates.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import (
    GENERAL_STATUS,
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from dicomledger.dicom import reactor

log = structlog.get_logger("dicomledger.scu")

MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
_STATUS_TEXT = {**GENERAL_STATUS, **STORAGE_SERVICE_CLASS_STATUS}
# Failures that will fail again for this file whatever we wait (PS3.4 B.2.3, PS3.7 C.4.2);
# every other failure (0xA7xx out of resources, 0x0110 processing failure, ...) is retried.
_PERMANENT = {0x0105, 0x0106, 0x0117, 0x0122, 0x0124, 0x0211, 0x0212}

Pair = tuple[str, str]  # (SOP class UID, transfer syntax UID)


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = None  # None: plain TCP
    server_name: str = ""  # the name its TLS certificate must carry


@dataclass(frozen=True)
class SendResult:
    ok: bool  # Success or Warning: the destination has the instance
    status: int | None  # DIMSE status; None if no C-STORE response
    retryable: bool  # worth sending again later (destination down, busy, ...)
    error: str = ""  # what went wrong (or the warning), for logs and `dicomledger status`


def on_sending_connection(event: evt.Event) -> None:
    """EVT_CONN_OPEN of an association we send C-STOREs on (forwarding, C-MOVE sub-operations)."""
    # pynetdicom writes a C-STORE as several small PDUs; with Nagle's algorithm on, each
    # waits for the peer's delayed ACK (~40 ms per file against storescp).
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]  # open: it has a socket
    reactor.install(event)


def _pair(cx: PresentationContext) -> Pair:
    return str(cx.abstract_syntax), str(cx.transfer_syntax[0])


def _permanent(status: int) -> bool:
    return status in _PERMANENT or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF


class StoreSCU:
    def __init__(
        self,
        calling_ae: str,
        destination: Destination,
        *,
        acse_timeout: float = 30,
        dimse_timeout: float = 60,
        network_timeout: float = 60,
        connect_timeout: float = 10,
        idle_release: float = 5.0,
        max_pdu: int = 0,  # what we accept; only the destination's maximum matters for sending
    ) -> None:
        self.destination = destination
        self.idle_release = idle_release
        self._max_pdu = max_pdu
        # Send files from disk in PDU-sized chunks, without decoding them (process-wide,
        # and only affects send_c_store given a path, which only this module does).
        _config.STORE_SEND_CHUNKED_DATASET = True
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout, ae.dimse_timeout = acse_timeout, dimse_timeout
        ae.network_timeout, ae.connection_timeout = network_timeout, connect_timeout
        self._ae = ae
        self._lock = threading.Lock()  # send, close, release_if_idle: any thread
        self._pairs: OrderedDict[Pair, None] = OrderedDict()  # needed so far, oldest use first
        self._assoc: Association | None = None
        self._proposed: set[Pair] = set()
        self._accepted: set[Pair] = set()
        self._opened = 0.0
        self._last_used = 0.0
        self._sends = self._failures = 0  # on the current association
        self._msg_id = 0

    @property
    def _where(self) -> str:
        d = self.destination
        return f"{d.host}:{d.port}"

    def send(self, path: Path, sop_class_uid: str, transfer_syntax_uid: str) -> SendResult:
        """Send the file as stored. Never raises for network or destination problems."""
        pair = (str(sop_class_uid), str(transfer_syntax_uid))
        with self._lock:
            result = self._ensure(pair)
            if result is None:
                reused = self._sends + self._failures > 0
                result, lost = self._store(path)
                if lost and reused:
                    # The destination may have dropped the association while it sat idle,
                    # just as we used it: try once on a fresh one (a duplicate is harmless).
                    log.info("association lost; sending again", destination=self.destination.ae_title)
                    result = self._ensure(pair) or self._store(path)[0]
            self._last_used = time.monotonic()
            if not result.ok:
                log.warning(
                    "c-store failed", destination=self.destination.ae_title, address=self._where,
                    file=str(path), status=result.status, retryable=result.retryable,
                    error=result.error,
                )
            return result

    def close(self) -> None:
        """Release the association, if any (the next send opens a new one)."""
        with self._lock:
            self._end("released")

    def release_if_idle(self) -> bool:
        """Release the association if nothing was sent for ``idle_release`` seconds."""
        with self._lock:
            if self._assoc is None or time.monotonic() - self._last_used < self.idle_release:
                return False
            self._end("released")
            return True

    # Association management (callers hold the lock)

    def _ensure(self, pair: Pair) -> SendResult | None:
        """Make sure an association with `pair` negotiated exists; None if we can send."""
        self._pairs[pair] = None
        self._pairs.move_to_end(pair)
        while len(self._pairs) > MAX_CONTEXTS:
            self._pairs.popitem(last=False)
        if self._assoc is not None and not self._assoc.is_established:
            self._end("lost")  # aborted by the peer, the network or a timeout
        if self._assoc is not None:
            if pair in self._accepted:
                return None
            if pair in self._proposed:
                return self._refused(pair, self._assoc)
            self._end("released")  # a new pair: negotiate again with it added
        return self._associate(pair)

    def _associate(self, pair: Pair) -> SendResult | None:
        d = self.destination
        connected = threading.Event()

        def on_connect(event: evt.Event) -> None:
            on_sending_connection(event)
            connected.set()

        started = time.monotonic()
        assoc = self._ae.associate(
            d.host, d.port, contexts=[build_context(*p) for p in self._pairs], ae_title=d.ae_title,
            max_pdu=self._max_pdu, evt_handlers=[(evt.EVT_CONN_OPEN, on_connect)],
            tls_args=(d.tls, d.server_name or d.host) if d.tls is not None else None,
        )
        primitive = assoc.acceptor.primitive
        if assoc.is_established:
            self._assoc, self._opened, self._sends, self._failures = assoc, started, 0, 0
            self._proposed = set(self._pairs)
            self._accepted = {_pair(cx) for cx in assoc.accepted_contexts}
            log.info(
                "association opened", destination=d.ae_title, address=self._where,
                proposed=len(self._proposed), accepted=len(self._accepted),
                ms=round((time.monotonic() - started) * 1000, 1),
            )
            return None if pair in self._accepted else self._refused(pair, assoc)
        if assoc.is_rejected and primitive is not None:
            reason, kind = primitive.reason_str, "permanent" if primitive.result == 1 else "transient"
            error = (
                f"association rejected by {d.ae_title} at {self._where}: {reason[:1].lower()}{reason[1:]}"
                f" ({kind}, source: {primitive.source_str})"
            )
        elif primitive is not None and primitive.result == 0:
            return self._refused(pair, assoc)  # accepted with no context: pynetdicom aborted it
        elif not connected.is_set():
            error = self._connect_error()
        elif time.monotonic() - started >= (self._ae.acse_timeout or 0):
            error = (
                f"no association response from {d.ae_title} at {self._where}"
                f" within {self._ae.acse_timeout:g} s"
            )
        else:
            error = f"{d.ae_title} at {self._where} closed the connection during association negotiation"
        return SendResult(False, None, True, error)

    def _connect_error(self) -> str:
        # pynetdicom only logs why the TCP connection failed: ask the socket once more.
        try:
            address = (self.destination.host, self.destination.port)
            with socket.create_connection(address, self._ae.connection_timeout):
                return f"could not connect to {self._where}"  # it is up again by now
        except OSError as exc:
            return f"{(exc.strerror or str(exc) or type(exc).__name__).lower()} at {self._where}"

    def _refused(self, pair: Pair, assoc: Association) -> SendResult:
        why = next(
            (cx.status.lower() for cx in assoc.rejected_contexts if _pair(cx) == pair), "rejected"
        )
        self._failures += 1
        sop, ts = UID(pair[0]), UID(pair[1])
        error = f"destination {self.destination.ae_title} does not accept {sop.name} in {ts.name} ({why})"
        return SendResult(False, None, False, error)

    def _store(self, path: Path) -> tuple[SendResult, bool]:
        """One C-STORE on the current association; also says whether the association was lost."""
        assoc = self._assoc
        assert assoc is not None
        d = self.destination
        self._msg_id = self._msg_id % 0xFFFF + 1
        started = time.monotonic()
        try:
            # A data set's length is even; an odd file (an unpadded deflate stream, as some old
            # files have) makes DCMTK abort: let pydicom re-encode it, same transfer syntax.
            dataset = path if path.stat().st_size % 2 == 0 else dcmread(path)
            rsp = assoc.send_c_store(dataset, msg_id=self._msg_id)
        except RuntimeError:  # the peer aborted between our check and the send
            self._end("lost")
            error = f"association with {d.ae_title} lost before the C-STORE"
            return SendResult(False, None, True, error), True
        except (OSError, InvalidDicomError, AttributeError, ValueError) as exc:
            # unreadable file, no file meta, or its meta names another pair than the queue did
            self._failures += 1
            return SendResult(False, None, False, f"cannot send {path}: {exc}"), False
        status = rsp.get("Status")
        if status is None:
            timed_out = time.monotonic() - started >= (self._ae.dimse_timeout or 0)
            self._end("lost")
            if timed_out:
                error = f"no C-STORE response from {d.ae_title} within {self._ae.dimse_timeout:g} s"
            else:
                error = f"association with {d.ae_title} at {self._where} aborted during the C-STORE"
            return SendResult(False, None, True, error), not timed_out
        category = code_to_category(status)
        text = _STATUS_TEXT.get(status, (category, category))[1] or category
        if category in (STATUS_SUCCESS, STATUS_WARNING):
            self._sends += 1
            warning = "" if category == STATUS_SUCCESS else f"warning 0x{status:04X}: {text}"
            return SendResult(True, status, False, warning), False
        self._failures += 1
        error = f"{d.ae_title} answered 0x{status:04X} ({text})"
        return SendResult(False, status, not _permanent(status), error), False

    def _end(self, how: str) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is None:
            return
        if assoc.is_established:
            if how == "released":
                assoc.release()  # pynetdicom aborts if the peer does not answer within acse_timeout
            else:
                assoc.abort()
        self._proposed, self._accepted = set(), set()
        log.info(
            "association closed", destination=self.destination.ae_title, address=self._where,
            ended=how, sends=self._sends, failures=self._failures,
            seconds=round(time.monotonic() - self._opened, 2),
        )
