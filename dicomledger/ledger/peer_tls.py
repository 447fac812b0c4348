"""The authenticated, encrypted channel between gateways: mutual TLS with pinned certificates.

Each gateway has a self-signed TLS certificate made by `dicomledger init`. A gateway trusts
exactly the certificates of the peers in its config (and presents its own), so a peer not
in the config cannot connect, and we cannot be talked into connecting to an impostor.

The server runs each TLS handshake itself (``HandshakeFirstSite``) instead of leaving it to
asyncio, which drops a failed server-side handshake silently (it logs those only in debug
mode): every refused connection is reported with the client's address and the reason.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import os
import ssl
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def create_tls_identity(cert_path: Path, key_path: Path, name: str) -> None:
    """A new P-256 key (0600) and a self-signed certificate naming ``name``, valid 10 years."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("dicomledger-peer")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate's DER bytes, hex: how we recognise which peer connected."""
    return hashlib.sha256(der).hexdigest()


def pem_fingerprint(pem: bytes) -> str:
    return fingerprint(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER))


def _context(
    purpose: ssl.Purpose, cert: Path, key: Path, peer_certs: list[bytes]
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.check_hostname = False  # identity is the pinned certificate, not a host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    if peer_certs:
        ctx.load_verify_locations(cadata="".join(p.decode() for p in peer_certs))
    return ctx


def server_context(cert: Path, key: Path, peer_certs: list[bytes]) -> ssl.SSLContext:
    """Requires a client certificate that is one of ``peer_certs``."""
    return _context(ssl.Purpose.CLIENT_AUTH, cert, key, peer_certs)


def client_context(cert: Path, key: Path, peer_certs: list[bytes]) -> ssl.SSLContext:
    """Presents our certificate; accepts only a server certificate among ``peer_certs``."""
    return _context(ssl.Purpose.SERVER_AUTH, cert, key, peer_certs)


HANDSHAKE_TIMEOUT = 10.0  # seconds a client may take to complete the TLS handshake


_OPENSSL_REASONS = {  # the usual strangers, in words; OpenSSL's code stays in the line
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate",
    "HTTP_REQUEST": "plain HTTP, not TLS",
}


def handshake_failure(exc: BaseException) -> str:
    """Why a server-side TLS handshake failed, in one line, with OpenSSL's reason code."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate not accepted: {exc.verify_message} ({exc.reason})"
    if isinstance(exc, ssl.SSLError):
        words = _OPENSSL_REASONS.get(exc.reason or "")
        return (
            f"TLS handshake failed: {words} ({exc.reason})"
            if words
            else f"TLS handshake failed: {exc.reason or exc}"
        )
    if isinstance(exc, ConnectionAbortedError):
        return f"no TLS handshake within {HANDSHAKE_TIMEOUT:g} s"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return "connection closed during the TLS handshake"
    return f"TLS handshake failed: {type(exc).__name__}: {exc}"


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


class _Handoff(asyncio.Protocol):
    """Stands in for the HTTP protocol while ``start_tls`` returns: TLS may hand over the
    first request bytes together with the handshake's last message, before we can attach
    the real protocol."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.eof = False
        self.lost = False
        self.lost_exc: Exception | None = None

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True  # the real protocol decides once attached

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost, self.lost_exc = True, exc


class _HandshakeFirst(asyncio.Protocol):
    """A plain TCP connection whose TLS handshake we run (``loop.start_tls``) before the
    HTTP protocol sees it; a failed handshake is reported through ``on_refused``."""

    def __init__(
        self,
        app_factory: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        on_refused: Callable[[str, str], None],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self._app_factory = app_factory
        self._context = context
        self._on_refused = on_refused
        self._tasks = tasks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the ClientHello is for the TLS layer start_tls puts in place
        task = asyncio.get_running_loop().create_task(self._handshake(transport))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        address = _address(transport)
        handoff = _Handoff()
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport,
                handoff,
                self._context,
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except asyncio.CancelledError:
            transport.abort()
            raise
        except Exception as exc:  # every failure of a stranger's handshake: report, never raise
            transport.abort()
            self._on_refused(address, handshake_failure(exc))
            return
        if tls is None or handoff.lost:
            self._on_refused(address, "connection closed during the TLS handshake")
            return
        app = self._app_factory()
        tls.set_protocol(app)
        app.connection_made(tls)
        if handoff.data:
            app.data_received(b"".join(handoff.data))
        if handoff.eof and not app.eof_received():
            tls.close()


class HandshakeFirstSite(web.BaseSite):
    """An aiohttp site for an HTTPS server whose TLS handshakes we run ourselves, so that
    each refused one is reported: ``on_refused(address, reason)``, once per connection."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext,
        on_refused: Callable[[str, str], None],
    ) -> None:
        super().__init__(runner)
        self._host, self._port = host, port
        self._tls = tls
        self._on_refused = on_refused
        self._handshakes: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _HandshakeFirst(server, self._tls, self._on_refused, self._handshakes),
            self._host,
            self._port,
        )

    async def stop(self) -> None:
        for task in list(self._handshakes):
            task.cancel()
        await super().stop()
