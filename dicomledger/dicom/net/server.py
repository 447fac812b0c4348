"""The asyncio DICOM acceptor: one listening socket, one ``Association`` protocol per
connection, the services by Command Field: C-ECHO, C-STORE (to the gateway's ``on_store``
coroutine function) and, given a Query/Retrieve core, C-FIND, C-MOVE and C-GET."""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import ssl
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from dicomledger.dicom.net import dimse
from dicomledger.dicom.net.association import Association
from dicomledger.dicom.net.negotiation import Negotiator, RefusedAssociation
from dicomledger.dicom.net.operation import Service
from dicomledger.dicom.net.retrieve import GetService, MoveService
from dicomledger.dicom.net.services import (
    STORAGE_TRANSFER_SYNTAXES,
    EchoService,
    FindService,
    OnStore,
    StoreService,
)
from dicomledger.dicom.net.tls import AeBinding, handshake_failure
from dicomledger.dicom.qr import RetrieveCore

log = structlog.get_logger("dicomledger.net")

ARTIM_DEFAULT = 30.0  # seconds, as DCMTK's and pynetdicom's ACSE timeout


class DicomServer:
    """Verification and Storage SCP (and Query/Retrieve SCP when given a core) on asyncio.

    ``services`` adds or replaces services by request Command Field.
    """

    def __init__(
        self,
        *,
        ae_title: str,
        host: str,
        port: int,
        allowed_calling_aes: list[str] | None,  # None: any calling AE
        on_store: OnStore,
        temp_dir: Path,
        max_associations: int = 64,
        max_pdu_size: int = 0,
        network_timeout: float = 60.0,
        accept_unknown_sop_classes: bool = False,
        query_retrieve: RetrieveCore | None = None,
        artim_timeout: float | None = None,
        services: Mapping[int, Service] | None = None,
        on_refused: Callable[[RefusedAssociation], None] | None = None,
        tls: ssl.SSLContext | None = None,
        tls_port: int | None = None,
        ae_bindings: Mapping[str, AeBinding] | None = None,
        on_tls_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        """``tls`` without ``tls_port``: ``port`` serves TLS only; with it, ``tls_port`` serves
        TLS alongside plain TCP on ``port``. ``on_tls_refused(address, reason)``: a failed handshake."""
        self.host, self.port = host, port
        self.tls, self.tls_port = tls, tls_port
        self.ae_bindings = dict(ae_bindings or {})
        self._on_tls_refused = on_tls_refused
        self._handshakes: set[asyncio.Task[None]] = set()
        self.failed_port: int | None = None
        self.ae_title = ae_title
        self._on_refused = on_refused
        self.temp_dir = temp_dir
        self.max_associations = max_associations
        self.network_timeout = network_timeout
        self.artim_timeout = (
            min(ARTIM_DEFAULT, network_timeout) if artim_timeout is None else artim_timeout
        )
        # Connections that never send an A-ASSOCIATE-RQ hold no association place; beyond
        # this many at once the oldest is closed, so they cannot exhaust descriptors either.
        self.max_waiting = max(256, 4 * max_associations)

        self.services: dict[int, Service] = {
            dimse.C_ECHO_RQ: EchoService(),
            dimse.C_STORE_RQ: StoreService(on_store, temp_dir),
        }
        if query_retrieve is not None:
            self.services[dimse.C_FIND_RQ] = FindService(query_retrieve)
            self.services[dimse.C_MOVE_RQ] = MoveService(query_retrieve, ae_title, network_timeout)
            self.services[dimse.C_GET_RQ] = GetService(query_retrieve, ae_title, network_timeout)
        self.services.update(services or {})
        supported: dict[str, tuple[str, ...]] = {}
        self.owners: dict[str, set[int]] = {}  # abstract syntax -> the Command Fields served on it
        for field, service in self.services.items():
            for abstract, syntaxes in service.abstract_syntaxes.items():
                supported[abstract] = tuple(dict.fromkeys(supported.get(abstract, ()) + syntaxes))
                self.owners.setdefault(abstract, set()).add(field)
        storage = frozenset(self.services[dimse.C_STORE_RQ].abstract_syntaxes)
        self.negotiator = Negotiator(
            ae_title=ae_title,
            allowed_calling_aes=allowed_calling_aes,
            supported=supported,
            # A C-GET requestor takes the Storage SCP role on its storage contexts
            both_roles=storage if query_retrieve is not None else frozenset(),
            unknown_abstract_syntaxes=STORAGE_TRANSFER_SYNTAXES
            if accept_unknown_sop_classes
            else None,
            max_pdu_length=max_pdu_size,
        )

        self.loop: asyncio.AbstractEventLoop  # the running loop, from start()
        # A-ASSOCIATE-RQs not seen before are decoded here, one at a time, off the loop
        self.negotiation_pool: ThreadPoolExecutor
        self._servers: list[asyncio.Server] = []
        self._connections: set[Association] = set()
        self._waiting: dict[Association, None] = {}  # not yet associated, oldest first
        self._tasks: set[asyncio.Task[None]] = set()
        self._names = itertools.count(1)
        self.associations = 0
        # Associations by how they ended: released, aborted (by us), aborted_by_peer,
        # connection_lost, refused (the metrics endpoint reads it)
        self.outcomes: Counter[str] = Counter()
        self.stopping = False  # stop() was called: no new association or operation

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.negotiation_pool = ThreadPoolExecutor(1, thread_name_prefix="dicom-negotiation")
        limit = raise_descriptor_limit()
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        plain = self.tls is None or self.tls_port is not None
        self.failed_port = self.port  # the port that could not be bound, if start() raises
        try:
            main = await self.loop.create_server(
                (lambda: Association(self)) if plain else (lambda: _TlsHandshake(self)),
                self.host,
                self.port,
                reuse_address=True,
                backlog=1024,
            )
            self._servers.append(main)
            self.port = main.sockets[0].getsockname()[1]
            if self.tls is not None and self.tls_port is not None:
                self.failed_port = self.tls_port
                extra = await self.loop.create_server(
                    lambda: _TlsHandshake(self),
                    self.host,
                    self.tls_port,
                    reuse_address=True,
                    backlog=1024,
                )
                self._servers.append(extra)
                self.tls_port = extra.sockets[0].getsockname()[1]
        except OSError:
            for server in self._servers:
                server.close()
            self._servers = []
            raise
        if self.tls is not None and self.tls_port is None:
            self.tls_port = self.port
        log.info(
            "dicom server listening",
            ae_title=self.ae_title,
            host=self.host,
            port=self.port if plain else None,
            tls_port=self.tls_port,
            max_associations=self.max_associations,
            descriptor_limit=limit,
        )

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight operations finish and be answered, give peers a
        moment to release, then abort what is left."""
        if not self._servers:
            return
        servers, self._servers = self._servers, []
        self.stopping = True
        for server in servers:
            server.close()
        for handshake in list(self._handshakes):
            handshake.cancel()
        deadline = self.loop.time() + grace
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        while self.associations and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for assoc in list(self._connections):
            assoc.abort_for_shutdown()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        self.negotiation_pool.shutdown(wait=False, cancel_futures=True)
        for server in servers:
            await server.wait_closed()

    @property
    def listening(self) -> bool:
        """The DICOM port is bound and new associations are taken."""
        return bool(self._servers) and not self.stopping

    @property
    def connections(self) -> int:
        return len(self._connections)

    # --- called by the associations ----------------------------------------------------------

    def connection_opened(self, assoc: Association) -> None:
        self._connections.add(assoc)
        self._waiting[assoc] = None
        if len(self._waiting) > self.max_waiting:
            oldest = next(iter(self._waiting))
            self._waiting.pop(oldest)
            oldest.evict()

    def association_refused(self, refusal: RefusedAssociation) -> None:
        if self._on_refused is not None:
            try:
                self._on_refused(refusal)
            except Exception:  # the listener's bug must not reach the association
                log.exception(
                    "on_refused failed", calling_ae=refusal.calling_ae, peer=refusal.address
                )

    def association_started(self, assoc: Association) -> None:
        self._waiting.pop(assoc, None)
        assoc.counted = True
        self.associations += 1

    def association_ended(self, assoc: Association) -> None:
        if assoc.counted:
            assoc.counted = False
            self.associations -= 1

    def connection_closed(self, assoc: Association) -> None:
        self._waiting.pop(assoc, None)
        self.association_ended(assoc)
        self._connections.discard(assoc)

    def operation_started(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def binding_refusal(self, calling_ae: str, assoc: Association) -> str | None:
        binding = self.ae_bindings.get(calling_ae)
        if binding is None:
            return None
        return binding.refusal(assoc.tls_peer, assoc.over_tls, assoc.address.rsplit(":", 1)[0])

    def handshake_started(self, transport: asyncio.Transport) -> None:
        if len(self._handshakes) >= self.max_waiting:  # as connections that send no A-ASSOCIATE-RQ
            peername = transport.get_extra_info("peername")
            log.warning(
                "connection closed",
                peer=f"{peername[0]}:{peername[1]}" if peername else "?",
                reason=f"{self.max_waiting} TLS handshakes already in progress",
            )
            transport.abort()
            return
        task = self.loop.create_task(self._handshake(transport))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        """TLS on an accepted connection; on success the Association takes it over, else one
        log line with the peer's address and why (asyncio itself says nothing)."""
        peername = transport.get_extra_info("peername")
        address = f"{peername[0]}:{peername[1]}" if peername else "?"
        assert self.tls is not None
        early = _Handover()
        try:
            tls_transport = await self.loop.start_tls(
                transport,
                early,
                self.tls,
                server_side=True,
                ssl_handshake_timeout=self.artim_timeout,
            )
        except asyncio.CancelledError:
            transport.abort()
            raise
        except Exception as exc:  # SSLError, a reset, the handshake timeout
            reason = handshake_failure(exc)
            transport.abort()
            if (
                isinstance(exc, ConnectionError)
                and not isinstance(exc, ssl.SSLError)
                and not early.received
            ):
                # closed (or silent until the ARTIM time) without a TLS error: a port probe, not a refusal
                log.info(
                    "connection closed", peer=address, reason=f"during the TLS handshake ({reason})"
                )
                return
            log.warning("tls handshake refused", peer=address, reason=reason)
            if self._on_tls_refused is not None:
                try:
                    self._on_tls_refused(address, reason)
                except Exception:  # the listener's bug must not reach the loop
                    log.exception("on_tls_refused failed", peer=address)
            return
        if tls_transport is None or early.closed:
            log.info(
                "connection closed", peer=address, reason="closed right after the TLS handshake"
            )
            return
        assoc = Association(self)
        tls_transport.set_protocol(assoc)
        assoc.connection_made(tls_transport)
        for data in early.received:
            assoc.data_received(data)

    def temp_name(self) -> str:
        return f"net-{os.getpid()}-{next(self._names)}.dcm"


class _TlsHandshake(asyncio.Protocol):
    """An accepted connection on a TLS listener until its handshake is done."""

    def __init__(self, server: DicomServer) -> None:
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # start_tls reads the ClientHello
        self._server.handshake_started(transport)


class _Handover(asyncio.Protocol):
    """Holds what arrives between the end of the handshake and the Association taking over."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.closed = False

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


def raise_descriptor_limit() -> int:
    """Lift the soft limit on open descriptors to the hard one (the system's): every
    association holds one, and asyncio's epoll has no limit of its own (select() had 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
