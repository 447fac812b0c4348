"""The DICOM side of the gateway: a pynetdicom AE with thin event handlers.

Each association runs in its own pynetdicom thread. Handlers only turn the event into a
``StoreRequest`` and hand it to the ``on_store`` callable the gateway gives us, which blocks
until the instance is durable and anchored and returns the DIMSE status to send; or, for
C-FIND / C-MOVE / C-GET, into a ``QRRequest`` for the Query/Retrieve core (``qr.py``).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydicom import config as pydicom_config
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicomledger.dicom.qr import QRRequest, RetrieveCore, find_responses, retrieve_responses
from dicomledger.dicom.query import UNABLE_TO_PROCESS, QueryError
from dicomledger.dicom.receive_files import RECEIVE_FILES

log = structlog.get_logger("dicomledger.scp")

# Status codes we answer with (PS3.4 Annex B.2.3 and PS3.7 C.4.2)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000  # failure range 0xCxxx: "cannot understand"
PROCESSING_FAILURE = 0x0110


class _TemplateContext(PresentationContext):
    """A supported context whose per-association copy is shallow.

    pynetdicom deep-copies the server's supported contexts for every association; with
    every storage SOP class times every transfer syntax that is ~70 ms of UID copying per
    association (a PACS often sends one image per association). UIDs are immutable, so a
    copy of the object and its list is all a negotiation needs.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _TemplateContext:
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone

    def prefer(self, proposals: list[list[str]]) -> None:
        """Order our syntaxes by the requestor's preference in its ``proposals`` (the
        transfer syntax lists of its contexts for our abstract syntax), the rest after."""
        first = requestor_preference(proposals, set(self._transfer_syntax))
        self._transfer_syntax = first + [ts for ts in self._transfer_syntax if ts not in first]


def _context(abstract_syntax: str, transfer_syntaxes: list[str], both_roles: bool = False) -> _TemplateContext:
    cx = _TemplateContext()
    cx.abstract_syntax = abstract_syntax
    cx.transfer_syntax = transfer_syntaxes
    if both_roles:  # accept SCP/SCU role selection: a C-GET requestor takes the storage SCP role
        cx.scu_role = cx.scp_role = True
    return cx


def requestor_preference(proposals: list[list[str]], supported: Collection[str]) -> list[str]:
    """One order of our ``supported`` transfer syntaxes for all the contexts a requestor
    proposed for one abstract syntax (pynetdicom negotiates an abstract syntax with one
    list of ours, taking in each context the first of our list that the context offers).

    Each context wants its first supported syntax ranked above the others it offers; those
    constraints are met in a topological order (ties: best place in any context, then first
    appearance). Only contradictory contexts ([Explicit, Implicit] next to [Implicit,
    Explicit]) cannot all be met; the earlier one wins. dcmsend's [JPEG-LS, Explicit,
    Implicit], [RLE, Explicit, Implicit] and [Explicit, Implicit] get JPEG-LS, RLE, Explicit.
    """
    rank: dict[str, tuple[int, int]] = {}
    above: dict[str, set[str]] = {}  # syntax -> syntaxes some context wants ranked above it
    for syntaxes in proposals:
        offered = [ts for ts in syntaxes if ts in supported]
        for place, ts in enumerate(offered):
            if ts not in rank:
                rank[ts] = (place, len(rank))
            elif place < rank[ts][0]:
                rank[ts] = (place, rank[ts][1])
            above.setdefault(ts, set())
        for ts in offered[1:]:
            above[ts].add(offered[0])
    order: list[str] = []
    left = sorted(rank, key=rank.__getitem__)
    while left:
        free = [ts for ts in left if not above[ts] & set(left)]
        pick = free[0] if free else left[0]  # a cycle: contradictory contexts, keep the earlier
        order.append(pick)
        left.remove(pick)
    return order


class _AnsweredFilter(logging.Filter):
    """Drops pynetdicom's two log records (message, then traceback) about a QueryError the
    core has already logged with its reason, in the thread that raised it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(_ANSWERED, "active", False):
            return True
        if record.exc_info is not None:
            _ANSWERED.active = False  # the traceback record comes last
        return False


_ANSWERED = threading.local()
logging.getLogger("pynetdicom.service_class").addFilter(_AnsweredFilter())

QR_MODELS = {
    PatientRootQueryRetrieveInformationModelFind: ("C-FIND", "patient"),
    StudyRootQueryRetrieveInformationModelFind: ("C-FIND", "study"),
    PatientRootQueryRetrieveInformationModelMove: ("C-MOVE", "patient"),
    StudyRootQueryRetrieveInformationModelMove: ("C-MOVE", "study"),
    PatientRootQueryRetrieveInformationModelGet: ("C-GET", "patient"),
    StudyRootQueryRetrieveInformationModelGet: ("C-GET", "study"),
}


@dataclass(frozen=True)
class StoreRequest:
    dataset_path: Path  # Part 10 file written by pynetdicom's chunked receive
    calling_ae: str
    peer: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    # Writing the received dataset failed (e.g. a full disk): nothing usable is at dataset_path
    receive_error: OSError | None = None


@dataclass(frozen=True)
class RefusedAssociation:
    """An association we refused, as told to ``on_refused`` (the audit trail's Security Alert)."""

    calling_ae: str
    called_ae: str
    address: str
    reason: str
    unauthorised: bool  # refused for the AE titles it claimed; False: at capacity


@dataclass
class _AssocStats:
    started: float = field(default_factory=time.monotonic)
    stores: int = 0
    failures: int = 0


class DicomServer:
    """Storage SCP + Verification SCP, restricted to the configured calling AEs."""

    def __init__(
        self,
        *,
        ae_title: str,
        host: str,
        port: int,
        allowed_calling_aes: list[str] | None,  # None: any calling AE
        on_store: Callable[[StoreRequest], int],
        temp_dir: Path,
        max_associations: int = 64,
        max_pdu_size: int = 0,
        network_timeout: float = 60.0,
        accept_unknown_sop_classes: bool = False,
        query_retrieve: RetrieveCore | None = None,
        on_refused: Callable[[RefusedAssociation], None] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self._on_refused = on_refused
        self._allowed_aes = allowed_calling_aes
        self._on_store = on_store
        self._qr = query_retrieve
        self._server: ThreadedAssociationServer | None = None
        self._in_flight = 0
        self._idle = threading.Condition()
        self._stats: dict[int, _AssocStats] = {}

        # Received datasets stream to a file (never whole in RAM); the file lands in
        # temp_dir, on the image store's file system, so storing it is one rename.
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.UNRESTRICTED_STORAGE_SERVICE = accept_unknown_sop_classes
        tempfile.tempdir = str(temp_dir)
        RECEIVE_FILES.install(temp_dir)
        # pydicom checks each value as it reads it and warns quoting the value, which can be
        # PHI; we act on parse errors, never on those warnings.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

        ae = AE(ae_title=ae_title)
        ae.maximum_associations = max_associations
        ae.maximum_pdu_size = max_pdu_size
        if allowed_calling_aes is not None:
            ae.require_calling_aet = list(allowed_calling_aes)  # pynetdicom rejects the rest
        ae.require_called_aet = True  # a sender addressing another AE title is refused
        ae.network_timeout = network_timeout
        ae.acse_timeout = network_timeout
        ae.dimse_timeout = network_timeout
        syntaxes = list(AllTransferSyntaxes)
        self._contexts = [_context(Verification, DEFAULT_TRANSFER_SYNTAXES)] + [
            _context(cx.abstract_syntax, syntaxes, both_roles=query_retrieve is not None)  # type: ignore[arg-type]
            for cx in AllStoragePresentationContexts
        ]
        if query_retrieve is not None:
            self._contexts += [_context(uid, DEFAULT_TRANSFER_SYNTAXES) for uid in QR_MODELS]
        self.ae = ae

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended, ["released"]),
            (evt.EVT_ABORTED, self._on_ended, ["aborted"]),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_c_store),
        ]
        if self._qr is not None:
            handlers += [
                (evt.EVT_C_FIND, self._on_query),
                (evt.EVT_C_MOVE, self._on_query),
                (evt.EVT_C_GET, self._on_query),
            ]
        self._server = self.ae.start_server(
            (self.host, self.port), block=False, evt_handlers=handlers, contexts=self._contexts
        )
        self.port = self._server.server_address[1]

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight C-STOREs finish and be answered, then close."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        deadline = time.monotonic() + grace
        with self._idle:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
        # Let the last responses leave, and peers release by themselves, before aborting.
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            assoc.abort()

    # Handlers: thin, no logic beyond translating the event.

    def _on_connection(self, event: evt.Event) -> None:
        """Before the association's thread starts: when it ends (released, aborted, reset,
        timed out, its DUL thread dead), remove the dataset files no store took."""
        assoc = event.assoc
        run = assoc.run

        def run_then_discard() -> None:
            try:
                run()
            finally:
                if removed := RECEIVE_FILES.discard_association(assoc):
                    log.info("removed partial uploads", files=removed,
                             peer=f"{assoc.requestor.address}:{assoc.requestor.port}")

        assoc.run = run_then_discard

    def _on_requested(self, event: evt.Event) -> None:
        """Before negotiation: order this association's supported transfer syntaxes by the
        requestor's own preference (its order within each presentation context), so an image
        is stored as the modality made it (compressed stays compressed, Explicit VR stays
        explicit) instead of being converted by the sender to our first choice."""
        proposed: dict[str, list[list[str]]] = {}
        for rq in event.assoc.requestor.requested_contexts:
            proposed.setdefault(str(rq.abstract_syntax), []).append([str(ts) for ts in rq.transfer_syntax])
        for cx in event.assoc.acceptor.supported_contexts:
            if isinstance(cx, _TemplateContext) and str(cx.abstract_syntax) in proposed:
                cx.prefer(proposed[str(cx.abstract_syntax)])

    def _on_accepted(self, event: evt.Event) -> None:
        self._stats[id(event.assoc)] = _AssocStats()

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        calling, called = requestor.ae_title, event.assoc.acceptor.ae_title
        if self._allowed_aes is not None and calling not in self._allowed_aes:
            reason = "calling AE title not in gateway.allowed_calling_aes"
        elif requestor.primitive is not None and requestor.primitive.called_ae_title.strip() != self.ae.ae_title:
            reason = f"called AE title {requestor.primitive.called_ae_title.strip()!r} is not this gateway's ({self.ae.ae_title})"
        else:
            reason = "too many associations (gateway.max_associations)"
        if self._on_refused is not None:
            unauthorised = not reason.startswith("too many")  # refused for who it claims to be
            self._on_refused(RefusedAssociation(calling, called, requestor.address, reason, unauthorised))
        log.warning(
            "association refused",
            reason=reason,
            calling_ae=calling,
            called_ae=called,
            peer=f"{requestor.address}:{requestor.port}",
        )

    def _on_ended(self, event: evt.Event, how: str) -> None:
        stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        log.info(
            "association",
            calling_ae=event.assoc.requestor.ae_title,
            peer=f"{event.assoc.requestor.address}:{event.assoc.requestor.port}",
            ended=how,
            stores=stats.stores,
            failures=stats.failures,
            duration_ms=round((time.monotonic() - stats.started) * 1000, 1),
        )

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_c_store(self, event: evt.Event) -> int:
        req = event.request
        path = Path(event.dataset_path)
        request = StoreRequest(
            dataset_path=path,
            calling_ae=event.assoc.requestor.ae_title,
            peer=f"{event.assoc.requestor.address}:{event.assoc.requestor.port}",
            sop_class_uid=str(req.AffectedSOPClassUID),
            sop_instance_uid=str(req.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            receive_error=RECEIVE_FILES.write_error(path),
        )
        with self._idle:
            self._in_flight += 1
        try:
            status = self._on_store(request)
        except Exception as exc:  # on_store answers every request; a bug must not reach pynetdicom
            log.error("c-store handler failed", sop_instance=request.sop_instance_uid,
                      error=type(exc).__name__)
            status = PROCESSING_FAILURE
        finally:
            RECEIVE_FILES.discard(path)  # stored files were renamed away; the rest goes
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()
        stats = self._stats.get(id(event.assoc))
        if stats is not None:
            stats.stores += 1
            stats.failures += status != SUCCESS
        return status

    def _on_query(self, event: evt.Event) -> Any:
        """C-FIND, C-MOVE, C-GET: the core decides, qr.py answers. Returns pynetdicom's generator."""
        assert self._qr is not None
        service, model = QR_MODELS[str(event.request.AffectedSOPClassUID)]
        requestor = event.assoc.requestor
        peer = f"{requestor.address}:{requestor.port}"
        cancelled = lambda: event.is_cancelled  # noqa: E731
        try:
            try:
                identifier = event.identifier
            except Exception as exc:  # pynetdicom/pydicom decoding: any error means a malformed identifier
                reason = f"identifier cannot be decoded: {type(exc).__name__}: {exc}"
                log.warning("query refused", service=service, calling_ae=requestor.ae_title, peer=peer, reason=reason)
                raise QueryError(reason, UNABLE_TO_PROCESS) from None
            request = QRRequest(
                service=service, model=model, identifier=identifier, calling_ae=requestor.ae_title,
                peer=peer, move_destination=event.move_destination if service == "C-MOVE" else None,
            )
            if service == "C-FIND":
                return find_responses(self._qr.find(request), cancelled)
            return retrieve_responses(self._qr, request, self._qr.plan(request), cancelled, event.assoc)
        except QueryError as exc:  # why is logged already
            if service == "C-FIND":
                return iter([(exc.status, None)])
            # pynetdicom answers a retrieve handler's exception with 0xC511 / 0xC411 (unable to
            # process): the only failure it lets us give before the destination and the count.
            # Keep pynetdicom's traceback of it out of the log.
            _ANSWERED.active = True
            raise
