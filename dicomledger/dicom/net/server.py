"""The asyncio DICOM acceptor: one listening socket, one ``Association`` protocol per
connection, the services by Command Field: C-ECHO, C-STORE (to the gateway's ``on_store``
coroutine function) and, given a Query/Retrieve core, C-FIND, C-MOVE and C-GET."""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
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
    ) -> None:
        self.host, self.port = host, port
        self.ae_title = ae_title
        self._on_refused = on_refused
        self.temp_dir = temp_dir
        self.max_associations = max_associations
        self.network_timeout = network_timeout
        self.artim_timeout = min(ARTIM_DEFAULT, network_timeout) if artim_timeout is None else artim_timeout
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
            unknown_abstract_syntaxes=STORAGE_TRANSFER_SYNTAXES if accept_unknown_sop_classes else None,
            max_pdu_length=max_pdu_size,
        )

        self.loop: asyncio.AbstractEventLoop  # the running loop, from start()
        # A-ASSOCIATE-RQs not seen before are decoded here, one at a time, off the loop
        self.negotiation_pool: ThreadPoolExecutor
        self._server: asyncio.Server | None = None
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
        self._server = await self.loop.create_server(
            lambda: Association(self), self.host, self.port, reuse_address=True, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("dicom server listening", ae_title=self.ae_title, host=self.host, port=self.port,
                 max_associations=self.max_associations, descriptor_limit=limit)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight operations finish and be answered, give peers a
        moment to release, then abort what is left."""
        if self._server is None:
            return
        server, self._server = self._server, None
        self.stopping = True
        server.close()
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
        await server.wait_closed()

    @property
    def listening(self) -> bool:
        """The DICOM port is bound and new associations are taken."""
        return self._server is not None and not self.stopping

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
                log.exception("on_refused failed", calling_ae=refusal.calling_ae, peer=refusal.address)

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

    def temp_name(self) -> str:
        return f"net-{os.getpid()}-{next(self._names)}.dcm"


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
