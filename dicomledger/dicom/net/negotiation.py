"""A-ASSOCIATE-RQ in, A-ASSOCIATE-AC or -RJ out, with pynetdicom's PDU codecs, primitives
and presentation-context negotiation (``pynetdicom.pdu``, ``pynetdicom.presentation``).

Differences from pynetdicom's acceptor, each on purpose:

* Within a context the transfer syntax is the *sender's* first choice among those we
  support, so images are stored as the modality made them (pynetdicom takes its own first).
* An A-ASSOCIATE-RQ that breaks PS3.8 (an even, repeated or out-of-range presentation
  context ID, so also more than 128 contexts; no context; undecodable items) is answered
  with an A-ABORT (``AssociateRqError``, state machine AA-1) instead of an exception in
  the reactor thread.
* The answer to a given RQ depends only on its bytes and our configuration, so it is
  cached: a PACS opening one association per image pays pynetdicom's ~30 ms of decoding
  and negotiation for 128 contexts once, not per image.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAcPdu
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRqPdu
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from dicomledger.common.errors import DicomError
from dicomledger.dicom.net import pdu
from dicomledger.dicom.net.filemeta import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"  # DICOM Application Context (PS3.7 A.2.1)
MAX_CONTEXTS = 128  # presentation context IDs are the odd numbers 1..255
CACHE_SIZE = 32


class AssociateRqError(DicomError, ValueError):
    """The A-ASSOCIATE-RQ is not a valid PDU: answered with an A-ABORT."""


@dataclass(frozen=True, slots=True)
class AcceptedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    abstract_syntax_bytes: bytes  # for the File Meta of a received instance
    transfer_syntax_bytes: bytes
    as_scu: bool  # we may send requests on it (a C-GET requestor's storage contexts)


@dataclass(frozen=True)
class Accepted:
    pdu: bytes  # the A-ASSOCIATE-AC to send
    contexts: Mapping[int, AcceptedContext]
    calling_ae: str
    called_ae: str
    peer_max_pdu: int  # 0: no limit
    peer_implementation: str
    proposed: int  # presentation contexts proposed


@dataclass(frozen=True)
class Rejected:
    pdu: bytes  # the A-ASSOCIATE-RJ to send
    reason: str
    calling_ae: str
    called_ae: str
    transient: bool = False  # at capacity or stopping: the same request may succeed later


@dataclass(frozen=True)
class RefusedAssociation:
    """An association we refused, as told to ``on_refused`` (the audit trail's Security Alert)."""

    calling_ae: str
    called_ae: str
    address: str  # the peer's host
    reason: str
    unauthorised: (
        bool  # refused for the AE titles it claimed (or what it proposed); False: at capacity
    )


def reject(
    result: int,
    source: int,
    reason_code: int,
    reason: str,
    calling_ae: str = "",
    called_ae: str = "",
) -> Rejected:
    return Rejected(
        pdu.a_associate_rj(result, source, reason_code),
        reason,
        calling_ae,
        called_ae,
        transient=result == pdu.REJECTED_TRANSIENT,
    )


class Negotiator:
    """Our side of association negotiation, fixed at construction (the gateway's config)."""

    def __init__(
        self,
        *,
        ae_title: str,
        allowed_calling_aes: Iterable[str] | None,  # None: any calling AE
        supported: Mapping[str, tuple[str, ...]],  # abstract syntax -> transfer syntaxes
        both_roles: frozenset[
            str
        ] = frozenset(),  # abstract syntaxes we also act as SCU for (C-GET)
        unknown_abstract_syntaxes: tuple[str, ...] | None = None,  # accept any other, with these
        max_pdu_length: int = 0,
    ) -> None:
        self.ae_title = ae_title.strip()
        self._allowed = (
            None
            if allowed_calling_aes is None
            else frozenset(a.strip() for a in allowed_calling_aes)
        )
        self._supported = {a: frozenset(ts) for a, ts in supported.items()}
        self._both_roles = both_roles
        self._unknown = (
            frozenset(unknown_abstract_syntaxes) if unknown_abstract_syntaxes is not None else None
        )
        self.max_pdu_length = max_pdu_length
        self._cache: OrderedDict[bytes, Accepted | Rejected] = OrderedDict()

    def negotiate(self, body: bytes) -> Accepted | Rejected:
        """The answer to an A-ASSOCIATE-RQ PDU body; AssociateRqError if it is invalid."""
        answer = self.cached(body) or self.precheck(body)
        if answer is None:
            answer = self.decide(body)
            self.remember(body, answer)
        return answer

    # The server splits negotiate() in three: cached() and precheck() on the event loop
    # (cheap), decide() in a worker thread (pynetdicom's decoding of a large RQ takes up to
    # half a second of Python, which must not stall other associations), remember() back
    # on the loop.

    def cached(self, body: bytes) -> Accepted | Rejected | None:
        answer = self._cache.get(body)
        if answer is not None:
            self._cache.move_to_end(body)
        return answer

    def remember(self, body: bytes, answer: Accepted | Rejected) -> None:
        self._cache[body] = answer
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def precheck(self, body: bytes) -> Rejected | None:
        """The checks that need only the RQ's fixed fields (PS3.8 Table 9-11), so a sender
        we refuse costs no decoding: protocol version, called and calling AE title."""
        if len(body) < 68:  # protocol version, reserved, called and calling AE, reserved
            raise AssociateRqError(
                f"A-ASSOCIATE-RQ of {len(body)} bytes, shorter than its fixed fields"
            )
        version = int.from_bytes(body[0:2], "big")
        called = body[4:20].decode("ascii", "replace").strip(" \x00")
        calling = body[20:36].decode("ascii", "replace").strip(" \x00")
        if not version & 0x0001:
            return reject(
                pdu.REJECTED_PERMANENT,
                pdu.RJ_SOURCE_ACSE,
                2,
                f"protocol version 0x{version:04X} not supported (bit 0 unset)",
                calling,
                called,
            )
        if self._allowed is not None and calling not in self._allowed:
            return reject(
                pdu.REJECTED_PERMANENT,
                pdu.RJ_SOURCE_USER,
                3,
                "calling AE title not in gateway.allowed_calling_aes",
                calling,
                called,
            )
        if called != self.ae_title:
            return reject(
                pdu.REJECTED_PERMANENT,
                pdu.RJ_SOURCE_USER,
                7,
                f"called AE title {called!r} is not this gateway's ({self.ae_title})",
                calling,
                called,
            )
        return None

    def decide(self, body: bytes) -> Accepted | Rejected:
        """Decode with pynetdicom and negotiate; thread-safe (touches no shared state)."""
        return self.precheck(body) or self._negotiate(body)

    def local_limit_exceeded(self, calling_ae: str, called_ae: str, limit: int) -> Rejected:
        return reject(
            pdu.REJECTED_TRANSIENT,
            pdu.RJ_SOURCE_PRESENTATION,
            2,
            f"too many associations (max_associations = {limit})",
            calling_ae,
            called_ae,
        )

    def _negotiate(self, body: bytes) -> Accepted | Rejected:
        rq = AssociateRqPdu()
        try:
            rq.decode(pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_RQ, len(body)) + body)
            calling, called = rq.calling_ae_title.strip(), rq.called_ae_title.strip()
            application_context = rq.application_context_name
        except Exception as exc:  # pynetdicom's decoders raise many kinds; any of them: invalid PDU
            raise AssociateRqError(
                f"A-ASSOCIATE-RQ cannot be decoded ({type(exc).__name__}: {exc})"
            ) from None
        if application_context != APPLICATION_CONTEXT_NAME:
            return reject(
                pdu.REJECTED_PERMANENT,
                pdu.RJ_SOURCE_USER,
                2,
                f"application context name {str(application_context)[:64]!r} not supported",
                calling,
                called,
            )
        _check_context_ids([item.context_id for item in rq.presentation_context])
        try:
            primitive = rq.to_primitive()
            proposed = primitive.presentation_context_definition_list
        except Exception as exc:  # as above: a context pynetdicom cannot represent
            raise AssociateRqError(
                f"A-ASSOCIATE-RQ cannot be decoded ({type(exc).__name__}: {exc})"
            ) from None
        try:
            return self._accept(primitive, proposed, calling, called)
        except AssociateRqError:
            raise
        except (
            Exception
        ) as exc:  # values pynetdicom decoded but will not encode back: an invalid RQ too
            raise AssociateRqError(
                f"A-ASSOCIATE-RQ cannot be negotiated ({type(exc).__name__}: {exc})"
            ) from None

    def _accept(
        self, rq: A_ASSOCIATE, proposed: list[PresentationContext], calling: str, called: str
    ) -> Accepted:
        peer_max, implementation, version, async_ops = 0, "", "", False
        rq_roles: dict[UID, tuple[bool | None, bool | None]] = {}
        for item in rq.user_information:
            if isinstance(item, MaximumLengthNotification):
                peer_max = item.maximum_length_received or 0
            elif isinstance(item, ImplementationClassUIDNotification):
                implementation = str(item.implementation_class_uid or "")
            elif isinstance(item, ImplementationVersionNameNotification):
                version = str(item.implementation_version_name or "")
            elif isinstance(item, AsynchronousOperationsWindowNegotiation):
                async_ops = True
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
                rq_roles[UID(str(item.sop_class_uid))] = (item.scu_role, item.scp_role)

        results: list[PresentationContext] = []
        roles: dict[str, SCP_SCU_RoleSelectionNegotiation] = {}
        for rq_cx in proposed:
            if rq_cx.abstract_syntax is None or not rq_cx.transfer_syntax:
                raise AssociateRqError(
                    f"presentation context {rq_cx.context_id} has no abstract or transfer syntax"
                )
            ours = self._acceptor_context(rq_cx)
            result, role_items = negotiate_as_acceptor(
                [rq_cx], [ours] if ours else [], rq_roles or None
            )
            results += result
            roles.update((str(r.sop_class_uid), r) for r in role_items)

        contexts = {
            int(cx.context_id): AcceptedContext(  # type: ignore[arg-type]
                context_id=int(cx.context_id),  # type: ignore[arg-type]
                abstract_syntax=str(cx.abstract_syntax),
                transfer_syntax=str(cx.transfer_syntax[0]),
                abstract_syntax_bytes=str(cx.abstract_syntax).encode("ascii"),
                transfer_syntax_bytes=str(cx.transfer_syntax[0]).encode("ascii"),
                as_scu=bool(cx.as_scu),
            )
            for cx in results
            if cx.result == 0x00
        }
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT_NAME
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0x00
        for cx in results:
            ac.presentation_context_definition_results_list.append(cx)
        info: list = [
            _max_length(self.max_pdu_length),
            _implementation_uid(),
            _implementation_version(),
        ]
        if async_ops:  # we perform one operation at a time (PS3.7 D.3.3.3)
            window = AsynchronousOperationsWindowNegotiation()
            window.maximum_number_operations_invoked = 1
            window.maximum_number_operations_performed = 1
            info.append(window)
        info += roles.values()
        ac.user_information = info
        return Accepted(
            pdu=AssociateAcPdu(ac).encode(),
            contexts=contexts,
            calling_ae=calling,
            called_ae=called,
            peer_max_pdu=peer_max,
            peer_implementation=f"{implementation} {version}".strip(),
            proposed=len(proposed),
        )

    def _acceptor_context(self, rq_cx: PresentationContext) -> PresentationContext | None:
        """Our context for one proposed context: its transfer syntaxes that we support, in
        the sender's order, so pynetdicom's negotiation picks the sender's first choice."""
        abstract = str(rq_cx.abstract_syntax)
        ours = self._supported.get(abstract)
        if ours is None:
            ours = self._unknown
            if ours is None:
                return None
        cx = PresentationContext()
        cx.abstract_syntax = abstract
        cx.transfer_syntax = [ts for ts in rq_cx.transfer_syntax if ts in ours]  # none: result 0x04
        if abstract in self._both_roles or (ours is self._unknown and self._both_roles):
            cx.scu_role = cx.scp_role = True
        return cx


def _check_context_ids(ids: list[int | None]) -> None:
    if not ids:
        raise AssociateRqError("A-ASSOCIATE-RQ proposes no presentation context")
    if len(ids) > MAX_CONTEXTS:
        raise AssociateRqError(
            f"A-ASSOCIATE-RQ proposes {len(ids)} presentation contexts (at most {MAX_CONTEXTS})"
        )
    seen: set[int] = set()
    for cid in ids:
        if cid is None or not 1 <= cid <= 255 or cid % 2 == 0:
            raise AssociateRqError(f"presentation context ID {cid} (must be odd, 1..255)")
        if cid in seen:
            raise AssociateRqError(f"presentation context ID {cid} proposed twice")
        seen.add(cid)


def _max_length(value: int) -> MaximumLengthNotification:
    item = MaximumLengthNotification()
    item.maximum_length_received = value
    return item


def _implementation_uid() -> ImplementationClassUIDNotification:
    item = ImplementationClassUIDNotification()
    item.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    return item


def _implementation_version() -> ImplementationVersionNameNotification:
    item = ImplementationVersionNameNotification()
    item.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return item
