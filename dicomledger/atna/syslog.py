"""Syslog for audit messages: RFC 5424 messages, sent over TLS (RFC 5425) or UDP (RFC 5426).

``syslog_message`` and ``octet_counted`` are pure. The transports are blocking and used from one
sender thread (``trail.py``): a message counts as delivered once the socket took all its bytes.
RFC 5425 has no application-level acknowledgement, so before each batch the TLS transport
checks whether the repository closed the connection (it never sends us anything else), and
reconnects, rather than writing into a dead connection. UDP cannot tell: a datagram the
repository never read is lost (RFC 5426 says so); use TLS where nothing may be lost.
"""

from __future__ import annotations

import select
import socket
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from dicomledger.common.errors import PeerError

BOM = b"\xef\xbb\xbf"  # RFC 5424 6.4: MSG in UTF-8 starts with the byte order mark
FACILITY_AUTHPRIV = 10  # security/authorization messages, as IHE ATNA asks
NIL = "-"


def _header_field(value: str, limit: int) -> str:
    """RFC 5424 PRINTUSASCII without spaces, at most ``limit`` characters; NILVALUE if empty."""
    cleaned = "".join(c for c in value if "!" <= c <= "~")[:limit]
    return cleaned or NIL


def syslog_message(
    body: bytes,
    *,
    time: datetime,
    hostname: str,
    app_name: str,
    procid: str,
    msgid: str,
    severity: int = 5,
    facility: int = FACILITY_AUTHPRIV,
) -> bytes:
    """One RFC 5424 message: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM body``."""
    if not 0 <= severity <= 7:
        raise ValueError(f"syslog severity {severity} is not 0..7")
    stamp = time.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    header = " ".join(
        [
            f"<{facility * 8 + severity}>1",
            stamp,
            _header_field(hostname, 255),
            _header_field(app_name, 48),
            _header_field(procid, 128),
            _header_field(msgid, 32),
            NIL,  # no STRUCTURED-DATA
        ]
    )
    return header.encode("ascii") + b" " + BOM + body


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


class TransportError(PeerError, OSError):
    """The audit repository cannot be reached or took a message only in part; str() says why."""


class Transport(Protocol):
    def send(self, message: bytes) -> None: ...

    def close(self) -> None: ...


def client_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    """TLS 1.2+ client context that checks the repository's certificate against ``ca_file``
    (the system's CAs if None) and presents ours for mutual node authentication (IHE ATNA)."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return context


class TlsTransport:
    """RFC 5425: a long-lived TLS connection, octet-counted frames, reconnected when lost."""

    def __init__(
        self, host: str, port: int, context: ssl.SSLContext, server_name: str, timeout: float = 10.0
    ) -> None:
        self.host, self.port = host, port
        self._context = context
        self._server_name = server_name
        self._timeout = timeout
        self._socket: ssl.SSLSocket | None = None

    def _connected(self) -> ssl.SSLSocket:
        if self._socket is not None and self._closed_by_peer(self._socket):
            self.close()
        if self._socket is None:
            try:
                raw = socket.create_connection((self.host, self.port), timeout=self._timeout)
            except OSError as exc:
                raise TransportError(
                    f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
                ) from None
            try:
                self._socket = self._context.wrap_socket(raw, server_hostname=self._server_name)
            except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
                raw.close()
                raise TransportError(
                    f"TLS handshake with {self.host}:{self.port} failed: {exc}"
                ) from None
        return self._socket

    @staticmethod
    def _closed_by_peer(sock: ssl.SSLSocket) -> bool:
        """A syslog receiver never writes: anything readable means it closed (or reset)."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            sock.setblocking(False)
            try:
                return sock.recv(1) == b""
            except (ssl.SSLWantReadError, BlockingIOError):
                return False
            finally:
                sock.setblocking(True)
                sock.settimeout(None)
        except (OSError, ValueError):
            return True

    def send(self, message: bytes) -> None:
        sock = self._connected()
        try:
            sock.settimeout(self._timeout)
            sock.sendall(octet_counted(message))
        except OSError as exc:
            self.close()
            raise TransportError(
                f"sending to {self.host}:{self.port} failed: {exc.strerror or exc}"
            ) from None

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is None:
            return
        try:
            sock.settimeout(1.0)
            sock.unwrap()  # close_notify: the repository sees an orderly end (RFC 5425 5.4)
        except (OSError, ValueError):
            pass
        sock.close()


class UdpTransport:
    """RFC 5426: one message per datagram. An ICMP "port unreachable" from an earlier datagram
    surfaces as ConnectionRefusedError on a later send, which we report (the message is kept)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._socket: socket.socket | None = None

    def send(self, message: bytes) -> None:
        try:
            if self._socket is None:
                infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
                family, kind, proto, _, address = infos[0]
                self._socket = socket.socket(family, kind, proto)
                self._socket.connect(address)
            self._socket.send(message)
        except OSError as exc:
            self.close()
            raise TransportError(
                f"sending to {self.host}:{self.port} (UDP) failed: {exc.strerror or exc}"
            ) from None

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
