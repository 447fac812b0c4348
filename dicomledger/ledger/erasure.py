"""Erasure records on the ledger: what an ``erased`` entry says, and which anchors it covers.

The images and index rows of an erased patient (or study) leave the gateway; the ledger keeps
every entry as it was (its signatures and Merkle tree must keep verifying) and gains one
``erased`` entry saying that the images anchored before it are gone, why, and how many.
Pseudonyms, counts and a reason code only: never PHI, never free text (an administrator's
free text is where a name would slip in).

Payload (``docs/ledger-formats.md``)::

    {"patient": P, "study": S | null, "studies": [S, ...], "instances": N, "files": N,
     "forward_jobs": N, "reason": CODE, "request": {"origin": O, "index": I} | null}

An ``erased`` entry E of origin O **covers** an ``image-anchored`` entry A when A is O's own
(same origin), older (A.index < E.index), of E's patient and, if E names a study, of that
study. An entry that applies another gateway's erasure (``request`` names that gateway's
``erased`` entry R) covers only copies of what R covers: anchors whose instance the requesting
gateway anchored, for that patient (and study), before R. So a gateway that honours another's
erasure erases the copies it received from it and nothing of its own.

Pure functions; the lookups that need a ledger database take a ``LedgerStore``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dicomledger.common.errors import LedgerFormatError
from dicomledger.ledger.entries import ERASED, IMAGE_ANCHORED, Entry, EntryError, decode_entry

if TYPE_CHECKING:
    from dicomledger.ledger.log import LedgerStore

# Why a patient's (or a study's) images were erased. The first four are an administrator's
# (`dicomledger erase --reason`); RETENTION is written only by the retention policy and
# CUSTODIAN_ERASURE only when applying another gateway's erasure.
PATIENT_REQUEST = "patient-request"  # the data subject asked (GDPR Art. 17(1))
CONSENT_WITHDRAWN = "consent-withdrawn"  # Art. 17(1)(b)
LEGAL_OBLIGATION = "legal-obligation"  # a law or a court orders it, Art. 17(1)(e)
UNLAWFUL_PROCESSING = "unlawful-processing"  # received by mistake, wrong patient, Art. 17(1)(d)
RETENTION = "retention"
CUSTODIAN_ERASURE = "custodian-erasure"
ADMIN_REASONS = (
    PATIENT_REQUEST,
    CONSENT_WITHDRAWN,
    LEGAL_OBLIGATION,
    UNLAWFUL_PROCESSING,
    CUSTODIAN_ERASURE,
)
REASONS = frozenset({*ADMIN_REASONS, RETENTION})

_PSEUDONYM = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_FIELDS = frozenset(
    {"patient", "study", "studies", "instances", "files", "forward_jobs", "reason", "request"}
)
MAX_STUDIES = 256  # an entry stays far below the 64 KiB entry limit


class ErasureFormatError(LedgerFormatError, ValueError):
    """An ``erased`` payload is malformed; the message names the field."""


@dataclass(frozen=True)
class EntryRef:
    origin: str
    index: int


@dataclass(frozen=True)
class Erasure:
    """One ``erased`` entry, parsed."""

    origin: str  # the gateway that erased (the entry's origin)
    index: int  # the entry's index in that gateway's log
    time_ms: int
    patient: str
    study: str | None  # None: every study of the patient
    studies: tuple[str, ...]  # the studies images were erased from
    instances: int
    files: int
    forward_jobs: int
    reason: str
    request: EntryRef | None  # the other gateway's erasure this one applies


def make_erased_payload(
    *,
    patient: str,
    study: str | None,
    studies: list[str],
    instances: int,
    files: int,
    forward_jobs: int,
    reason: str,
    request: EntryRef | None = None,
) -> dict[str, Any]:
    """The payload of an ``erased`` entry; ErasureFormatError if a value is not allowed."""
    payload = {
        "patient": patient,
        "study": study,
        "studies": sorted(set(studies))[:MAX_STUDIES],
        "instances": instances,
        "files": files,
        "forward_jobs": forward_jobs,
        "reason": reason,
        "request": None if request is None else {"origin": request.origin, "index": request.index},
    }
    _check(payload)
    return payload


def _count(payload: Mapping[str, Any], key: str) -> int:
    value = payload[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ErasureFormatError(f"{key} must be a non-negative integer")
    return value


def _pseudonym(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _PSEUDONYM.match(value):
        raise ErasureFormatError(f"{key} must be a pseudonym (1..128 characters of [A-Za-z0-9_-])")
    return value


def _check(payload: Mapping[str, Any]) -> tuple[str, str | None, tuple[str, ...], EntryRef | None]:
    if set(payload) != _FIELDS:
        raise ErasureFormatError(f"fields must be exactly {sorted(_FIELDS)}")
    patient = _pseudonym(payload["patient"], "patient")
    study = None if payload["study"] is None else _pseudonym(payload["study"], "study")
    studies = payload["studies"]
    if not isinstance(studies, list) or len(studies) > MAX_STUDIES:
        raise ErasureFormatError(f"studies must be a list of at most {MAX_STUDIES} pseudonyms")
    studies_t = tuple(_pseudonym(s, "studies[]") for s in studies)
    for key in ("instances", "files", "forward_jobs"):
        _count(payload, key)
    if payload["reason"] not in REASONS:
        raise ErasureFormatError(f"reason must be one of {', '.join(sorted(REASONS))}")
    request = payload["request"]
    ref = None
    if request is not None:
        if (
            not isinstance(request, Mapping)
            or set(request) != {"origin", "index"}
            or not isinstance(request["origin"], str)
            or not request["origin"]
        ):
            raise ErasureFormatError("request must be null or {origin, index}")
        ref = EntryRef(request["origin"], _count(request, "index"))
    return patient, study, studies_t, ref


def parse_erasure(entry: Entry) -> Erasure:
    """An ``erased`` entry's content; ErasureFormatError if it is not one or is malformed."""
    if entry.kind != ERASED:
        raise ErasureFormatError(
            f"{entry.origin} entry {entry.index} is a {entry.kind} entry, not {ERASED}"
        )
    p = entry.payload
    patient, study, studies, ref = _check(p)
    return Erasure(
        origin=entry.origin,
        index=entry.index,
        time_ms=entry.time_ms,
        patient=patient,
        study=study,
        studies=studies,
        instances=p["instances"],
        files=p["files"],
        forward_jobs=p["forward_jobs"],
        reason=p["reason"],
        request=ref,
    )


def in_scope(erasure: Erasure, anchor: Entry) -> bool:
    """``anchor`` is an image-anchored entry of ``erasure``'s gateway, older than it, of its
    patient and (if it names one) study. With a ``request`` this is not yet coverage: the
    instance must also be one the requesting gateway anchored (``covers``)."""
    p = anchor.payload
    return (
        anchor.kind == IMAGE_ANCHORED
        and anchor.origin == erasure.origin
        and anchor.index < erasure.index
        and p.get("patient") == erasure.patient
        and (erasure.study is None or p.get("study") == erasure.study)
    )


def covers(erasure: Erasure, anchor: Entry, requested_instances: frozenset[str] | None) -> bool:
    """Whether ``erasure`` covers ``anchor``. ``requested_instances``: for an erasure that
    applies another gateway's (``request`` set), the instance pseudonyms that gateway's
    erasure covers (``requested_instances`` below); ignored otherwise."""
    if not in_scope(erasure, anchor):
        return False
    if erasure.request is None:
        return True
    return requested_instances is not None and anchor.payload.get("instance") in requested_instances


# -- lookups in a ledger database --------------------------------------------------------------


async def read_erasure(store: LedgerStore, origin: str, index: int) -> Erasure:
    """The erasure at ``origin`` entry ``index``; ErasureFormatError if it is not a valid one."""
    try:
        return parse_erasure(decode_entry(await store.entry(origin, index)))
    except EntryError as exc:
        raise ErasureFormatError(f"{origin} entry {index} cannot be read: {exc}") from None


async def erasures_of(store: LedgerStore, patient: str) -> list[Erasure]:
    """Every valid erasure of ``patient`` in every log the database holds (malformed ones are
    skipped: `dicomledger verify` and `audit` show them)."""
    found = []
    for origin, index in await store.find(f"erased:{patient}"):
        try:
            erasure = await read_erasure(store, origin, index)
        except ErasureFormatError:
            continue
        if erasure.patient == patient:
            found.append(erasure)
    return found


async def requested_instances(store: LedgerStore, request: Erasure) -> frozenset[str]:
    """The instance pseudonyms ``request`` covers: those its gateway anchored for the patient
    (and study) before it. For a request that itself applies another's, recursively."""
    inner = None
    if request.request is not None:
        try:
            inner = await requested_instances(
                store, await read_erasure(store, request.request.origin, request.request.index)
            )
        except ErasureFormatError:
            inner = frozenset()
    found = set()
    for origin, index in await store.find(f"patient:{request.patient}"):
        if origin != request.origin or index >= request.index:
            continue
        try:
            anchor = decode_entry(await store.entry(origin, index))
        except EntryError:
            continue
        if covers(request, anchor, inner) and isinstance(anchor.payload.get("instance"), str):
            found.add(anchor.payload["instance"])
    return frozenset(found)


class ErasureLookup:
    """Which erasure covers an anchor, for many anchors: each patient's erasures and each
    request's covered instances are read from the database once."""

    def __init__(self, store: LedgerStore) -> None:
        self.store = store
        self._of_patient: dict[str, list[Erasure]] = {}
        self._requested: dict[EntryRef, frozenset[str]] = {}

    async def _requested_by(self, ref: EntryRef) -> frozenset[str]:
        if ref not in self._requested:
            try:
                self._requested[ref] = await requested_instances(
                    self.store, await read_erasure(self.store, ref.origin, ref.index)
                )
            except ErasureFormatError:
                self._requested[ref] = frozenset()
        return self._requested[ref]

    async def covering(self, anchor: Entry) -> Erasure | None:
        """The oldest erasure held that covers the image-anchored entry ``anchor``, if any."""
        patient = anchor.payload.get("patient")
        if anchor.kind != IMAGE_ANCHORED or not isinstance(patient, str):
            return None
        if patient not in self._of_patient:
            self._of_patient[patient] = sorted(
                await erasures_of(self.store, patient), key=lambda e: (e.origin, e.index)
            )
        for erasure in self._of_patient[patient]:
            if not in_scope(erasure, anchor):
                continue
            requested = (
                None if erasure.request is None else await self._requested_by(erasure.request)
            )
            if covers(erasure, anchor, requested):
                return erasure
        return None


async def erasure_covering(store: LedgerStore, anchor: Entry) -> Erasure | None:
    """The oldest erasure held that covers the image-anchored entry ``anchor``, if any."""
    return await ErasureLookup(store).covering(anchor)
