"""Patient permissions on the ledger: grants, revocations and the decisions they imply.

Pure functions: no I/O, no clock (``today`` is passed in), crypto only via ``cryptography``.

A permission record is a ledger entry of kind ``grant`` or ``revoke``, appended by a gateway to
its own log (the entry is signed by that gateway as usual). Its *content* is signed separately
by an **issuer**: a named Ed25519 key (a consent authority such as
``consent-office.hospital-a.example``, or a custodian gateway signing with its origin name and
key). Issuer names follow the signed-note key name rules (non-empty, no space, no "+", no
control character), at most 255 characters.

A record's **ref** is the lowercase hex of the RFC 6962 leaf hash of its entry bytes
(``SHA-256(0x00 || entry)``), so a ref names exactly one entry.

Payloads (the entry's ``payload`` object; all identifiers are keyed pseudonyms, 1..128
characters of ``[A-Za-z0-9_-]``, never PHI)::

    grant:  {"consent":TEXT,"grantee":GRANTEE,"heads":[REF,...],"issuer":NAME,
             "issuer_sig":B64,"patient":ID,"purpose":TEXT,"study":ID|null,
             "until":"YYYY-MM-DD"|null}
    revoke: {"grantee":GRANTEE|null,"grants":[REF,...],"heads":[REF,...],"issuer":NAME,
             "issuer_sig":B64,"patient":ID,"reason":TEXT}
    GRANTEE = {"ae":AE|null,"gateway":NAME|null}    (at least one of the two non-null)

* Exactly these fields, with these JSON types; anything else is rejected.
* ``ae``: a DICOM AE title: 1..16 printable ASCII characters, no backslash, no "@", no leading
  or trailing space (spaces are not significant in an AE title, so one title has one form).
  ``gateway``: a gateway origin, same rules as an issuer name. Written ``AE``, ``AE@GATEWAY``
  or ``@GATEWAY`` (any AE at that gateway) on the command line and in messages.
* ``until``: the last day (UTC, inclusive) the grant is valid, a real ISO 8601 calendar date
  ``YYYY-MM-DD``; null means no end.
* ``study``: null means every study of the patient.
* TEXT (``purpose``, ``consent``, ``reason``): at most 256 characters, no control characters
  (Unicode category Cc) and no lone surrogates; may be empty.
* ``heads``: the refs of the permission records of this patient the issuer had seen and that
  no other seen record cites (the frontier, ``heads_of``): sorted, unique, 64 lowercase hex
  digits each, at most 64.
* ``grants`` (revoke): refs of the grants revoked, same form, at most 256. A revoke needs a
  target: a non-empty ``grants`` or a non-null ``grantee``.
* ``issuer_sig``: standard padded canonical base64 of the Ed25519 signature by the issuer's key
  over ``"dicomledger/permission/v1\\n" || canonical JSON of the payload without
  "issuer_sig"`` (canonical JSON as for entries).

Decisions (``evaluate``, ``decide``) depend only on the *set* of records held, never on the
order they arrived in nor on entry times (clocks are not trusted). Records that are for another
patient, or whose issuer the caller does not authorise (``is_authorised``, which also checks the
issuer signature), are ignored and reported; they count as not held, also for ancestry.

A record's *ancestors* are the records reachable through ``heads``. Revoke wins: a grant G is
**effective** iff it is authorised, ``today <= until``, and no authorised revoke R of the same
patient *targets* G unless R is an ancestor of G. R targets G if

* R's ``grants`` names G, or names a held grant with the same signed content as G (so a grant
  copied into another entry, which gives it another ref, is revoked with the original); or
* R's ``grantee`` covers G's grantee: R.ae is null or equals G.ae, and R.gateway is null or
  equals G.gateway. Such a revoke also ends grants it did not see (concurrent ones); a grant
  that has R among its ancestors was issued knowing R and is a fresh grant.

A grant whose ancestry we do not fully hold is evaluated with what we hold: missing ancestry
means "concurrent", so a revoke wins (fail safe). A destination (AE title, its gateway, a
study) is **allowed** iff some effective grant matches it (``decide``); default deny.
"""

from __future__ import annotations

import base64
import heapq
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dicomledger.common.errors import LedgerFormatError
from dicomledger.ledger.entries import (
    GRANT,
    REVOKE,
    Entry,
    EntryError,
    canonical_json,
    encode_entry,
)
from dicomledger.ledger.merkle import leaf_hash
from dicomledger.ledger.note import NoteError, canonical_b64decode, check_key_name

PERMISSION_PREFIX = b"dicomledger/permission/v1\n"
MAX_TEXT_CHARS = 256
MAX_HEADS = 64
MAX_REVOKED_GRANTS = 256
MAX_NAME_CHARS = 255
REF_SHORT = 8  # hex digits of a ref shown in messages (the CLI accepts at least this many)

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_REF_RE = re.compile(r"[0-9a-f]{64}")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_AE_RE = re.compile(r"[\x20-\x3f\x41-\x5b\x5d-\x7e]{1,16}")  # printable ASCII but "\" and "@"

_GRANT_FIELDS = frozenset(
    {"patient", "grantee", "study", "until", "purpose", "consent", "heads", "issuer", "issuer_sig"}
)
_REVOKE_FIELDS = frozenset(
    {"patient", "grants", "grantee", "reason", "heads", "issuer", "issuer_sig"}
)
_GRANTEE_FIELDS = frozenset({"ae", "gateway"})


class PermissionFormatError(LedgerFormatError, ValueError):
    """A permission payload, grantee or argument is malformed; the message names the field."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_name(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PermissionFormatError(f"{where}: must be a string, got {type(value).__name__}")
    try:
        check_key_name(value)
    except NoteError as exc:
        raise PermissionFormatError(f"{where}: {exc}") from None
    if len(value) > MAX_NAME_CHARS:
        raise PermissionFormatError(f"{where}: name is longer than {MAX_NAME_CHARS} characters")
    return value


def _check_ae(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PermissionFormatError(f"{where}: must be a string, got {type(value).__name__}")
    if not _AE_RE.fullmatch(value) or not value.strip(" "):
        raise PermissionFormatError(
            f"{where}: {_show(value)} is not an AE title (1-16 printable ASCII characters, "
            "no backslash, no '@', not all spaces)"
        )
    if value != value.strip(" "):
        raise PermissionFormatError(
            f"{where}: {_show(value)} has leading or trailing spaces (not significant in an AE "
            "title; write it without them)"
        )
    return value


def _check_grantee_parts(ae: Any, gateway: Any, where: str) -> None:
    if ae is None and gateway is None:
        raise PermissionFormatError(f"{where}: names neither an AE title nor a gateway")
    if ae is not None:
        _check_ae(ae, f"{where}.ae")
    if gateway is not None:
        _check_name(gateway, f"{where}.gateway")


@dataclass(frozen=True)
class Grantee:
    """Who a grant is for: an AE title (at any gateway), an AE at one gateway, or a whole
    gateway (any AE whose configured site is that gateway's origin)."""

    ae: str | None
    gateway: str | None

    def __post_init__(self) -> None:
        _check_grantee_parts(self.ae, self.gateway, "grantee")

    @classmethod
    def parse(cls, text: str) -> Grantee:
        """``AE``, ``AE@GATEWAY`` or ``@GATEWAY`` (split at the first "@": AE titles here
        never contain one). Spaces around the AE title are dropped, as DICOM ignores them."""
        if not isinstance(text, str) or not text.strip():
            raise PermissionFormatError("grantee: empty; write AE, AE@GATEWAY or @GATEWAY")
        ae, sep, gateway = text.strip().partition("@")
        ae = ae.strip(" ")
        if sep and not gateway:
            raise PermissionFormatError(
                f"grantee: {_show(text)} has no gateway after '@'; write AE, AE@GATEWAY or @GATEWAY"
            )
        return cls(ae or None, gateway if sep else None)

    def __str__(self) -> str:
        if self.gateway is None:
            return str(self.ae)
        return f"{self.ae or ''}@{self.gateway}"

    def covers(self, other: Grantee) -> bool:
        """True if a revocation naming this grantee reaches a grant to ``other``."""
        return (self.ae is None or self.ae == other.ae) and (
            self.gateway is None or self.gateway == other.gateway
        )

    def to_json(self) -> dict[str, str | None]:
        return {"ae": self.ae, "gateway": self.gateway}


@dataclass(frozen=True)
class Grant:
    ref: str  # hex leaf hash of the entry
    origin: str  # the gateway whose log holds the entry
    index: int
    time_ms: int  # the appending gateway's clock; informative only, never used in decisions
    patient: str
    grantee: Grantee
    study: str | None
    until: str | None  # last valid day, inclusive
    purpose: str
    consent: str
    heads: tuple[str, ...]
    issuer: str
    issuer_sig: bytes


@dataclass(frozen=True)
class Revoke:
    ref: str
    origin: str
    index: int
    time_ms: int
    patient: str
    grants: tuple[str, ...]
    grantee: Grantee | None
    reason: str
    heads: tuple[str, ...]
    issuer: str
    issuer_sig: bytes


Record = Grant | Revoke
IsAuthorised = Callable[[Record], str | None]


# -- field checks, shared by make_*_payload and parse_permission -------------------------------


def _check_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise PermissionFormatError(
            f"{where}: {_show(value)} is not a pseudonym (1-128 characters of A-Z a-z 0-9 _ -)"
        )
    return value


def _check_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PermissionFormatError(f"{where}: must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise PermissionFormatError(
            f"{where}: {len(value)} characters, more than the limit of {MAX_TEXT_CHARS}"
        )
    for i, c in enumerate(value):
        if unicodedata.category(c) in ("Cc", "Cs"):
            raise PermissionFormatError(
                f"{where}: contains control character or lone surrogate U+{ord(c):04X} at {i}"
            )
    return value


def _parse_date(value: Any, where: str) -> date:
    # fromisoformat alone also takes "20240101" and "2024-W01-1"; the regex pins the one form
    if not isinstance(value, str) or not _DATE_RE.fullmatch(value):
        raise PermissionFormatError(f"{where}: {_show(value)} is not a date of the form YYYY-MM-DD")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise PermissionFormatError(
            f"{where}: {_show(value)} is not a valid calendar date"
        ) from None


def _check_refs(value: Any, where: str, limit: int) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise PermissionFormatError(f"{where}: must be a list of refs, got {type(value).__name__}")
    if len(value) > limit:
        raise PermissionFormatError(f"{where}: {len(value)} refs, more than the limit of {limit}")
    for i, ref in enumerate(value):
        if not isinstance(ref, str) or not _REF_RE.fullmatch(ref):
            raise PermissionFormatError(
                f"{where}[{i}]: {_show(ref)} is not a ref (64 lowercase hex digits)"
            )
    if list(value) != sorted(set(value)):
        # one content has one byte form, so heads/grants must be in a fixed order
        raise PermissionFormatError(f"{where}: refs must be sorted and unique")
    return tuple(value)


def _check_grantee_json(value: Any, where: str) -> Grantee:
    if not isinstance(value, Mapping):
        raise PermissionFormatError(f"{where}: must be an object {{ae, gateway}}")
    _check_keys(value, _GRANTEE_FIELDS, where)
    _check_grantee_parts(value["ae"], value["gateway"], where)
    return Grantee(value["ae"], value["gateway"])


def _check_keys(obj: Mapping[str, Any], expected: frozenset[str], where: str) -> None:
    keys = set(obj)
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        parts = [f"missing field {m!r}" for m in missing] + [f"unknown field {e!r}" for e in extra]
        raise PermissionFormatError(f"{where}: {', '.join(parts)}")


def _parse_fields(kind: str, payload: Any, *, signed: bool) -> dict[str, Any]:
    """Typed values of every field of a grant/revoke payload; PermissionFormatError naming
    the first bad field. ``signed=False`` checks a payload before ``issuer_sig`` is added."""
    if not isinstance(payload, Mapping):
        raise PermissionFormatError(f"{kind} payload: must be a JSON object")
    expected = _GRANT_FIELDS if kind == GRANT else _REVOKE_FIELDS
    _check_keys(payload, expected if signed else expected - {"issuer_sig"}, f"{kind} payload")
    out: dict[str, Any] = {
        "patient": _check_id(payload["patient"], f"{kind} patient"),
        "heads": _check_refs(payload["heads"], f"{kind} heads", MAX_HEADS),
        "issuer": _check_name(payload["issuer"], f"{kind} issuer"),
    }
    if kind == GRANT:
        out["grantee"] = _check_grantee_json(payload["grantee"], "grant grantee")
        study, until = payload["study"], payload["until"]
        out["study"] = None if study is None else _check_id(study, "grant study")
        if until is not None:
            _parse_date(until, "grant until")
        out["until"] = until
        out["purpose"] = _check_text(payload["purpose"], "grant purpose")
        out["consent"] = _check_text(payload["consent"], "grant consent")
    else:
        out["grants"] = _check_refs(payload["grants"], "revoke grants", MAX_REVOKED_GRANTS)
        grantee = payload["grantee"]
        out["grantee"] = None if grantee is None else _check_grantee_json(grantee, "revoke grantee")
        if not out["grants"] and out["grantee"] is None:
            raise PermissionFormatError(
                "revoke grants: empty and grantee is null; a revocation needs at least one target"
            )
        out["reason"] = _check_text(payload["reason"], "revoke reason")
    if signed:
        sig = payload["issuer_sig"]
        if not isinstance(sig, str):
            raise PermissionFormatError(f"{kind} issuer_sig: must be a base64 string")
        raw = canonical_b64decode(sig, f"{kind} issuer_sig", PermissionFormatError)
        if len(raw) != 64:
            raise PermissionFormatError(f"{kind} issuer_sig: {len(raw)} bytes, not 64 (Ed25519)")
        out["issuer_sig"] = raw
    return out


# -- making and reading records ----------------------------------------------------------------


def _message(unsigned: Mapping[str, Any]) -> bytes:
    return PERMISSION_PREFIX + canonical_json(unsigned)


def sign_payload(
    kind: str, unsigned: dict[str, Any], issuer_key: Ed25519PrivateKey
) -> dict[str, Any]:
    """``unsigned`` (checked by ``unsigned_*_payload``) with the issuer's signature added."""
    if not isinstance(issuer_key, Ed25519PrivateKey):
        raise PermissionFormatError(f"{kind} issuer key: must be an Ed25519 private key")
    sig = issuer_key.sign(_message(unsigned))
    return {**unsigned, "issuer_sig": base64.b64encode(sig).decode("ascii")}


def _sorted_refs(refs: Iterable[str], where: str) -> list[str]:
    if isinstance(refs, str):  # a lone ref would otherwise be read as 64 one-character refs
        raise PermissionFormatError(f"{where}: must be a list of refs, not a string")
    return sorted(set(refs))


def unsigned_grant_payload(
    *,
    patient: str,
    grantee: Grantee,
    study: str | None,
    until: str | None,
    purpose: str,
    consent: str,
    heads: Iterable[str],
    issuer_name: str,
) -> dict[str, Any]:
    """A checked grant payload without its issuer signature: what the issuer signs (and what
    `grant --dry-run` shows). ``heads`` is sorted and deduplicated."""
    if not isinstance(grantee, Grantee):
        raise PermissionFormatError("grant grantee: must be a Grantee")
    unsigned = {
        "patient": patient,
        "grantee": grantee.to_json(),
        "study": study,
        "until": until,
        "purpose": purpose,
        "consent": consent,
        "heads": _sorted_refs(heads, "grant heads"),
        "issuer": issuer_name,
    }
    _parse_fields(GRANT, unsigned, signed=False)
    return unsigned


def make_grant_payload(
    *,
    patient: str,
    grantee: Grantee,
    study: str | None,
    until: str | None,
    purpose: str,
    consent: str,
    heads: Iterable[str],
    issuer_name: str,
    issuer_key: Ed25519PrivateKey,
) -> dict[str, Any]:
    """A checked grant payload signed by the issuer. ``heads`` is sorted and deduplicated."""
    unsigned = unsigned_grant_payload(
        patient=patient,
        grantee=grantee,
        study=study,
        until=until,
        purpose=purpose,
        consent=consent,
        heads=heads,
        issuer_name=issuer_name,
    )
    return sign_payload(GRANT, unsigned, issuer_key)


def unsigned_revoke_payload(
    *,
    patient: str,
    grants: Iterable[str],
    grantee: Grantee | None,
    reason: str,
    heads: Iterable[str],
    issuer_name: str,
) -> dict[str, Any]:
    """A checked revoke payload without its issuer signature. ``grants`` and ``heads`` are
    sorted and deduplicated."""
    if grantee is not None and not isinstance(grantee, Grantee):
        raise PermissionFormatError("revoke grantee: must be a Grantee or None")
    unsigned = {
        "patient": patient,
        "grants": _sorted_refs(grants, "revoke grants"),
        "grantee": None if grantee is None else grantee.to_json(),
        "reason": reason,
        "heads": _sorted_refs(heads, "revoke heads"),
        "issuer": issuer_name,
    }
    _parse_fields(REVOKE, unsigned, signed=False)
    return unsigned


def make_revoke_payload(
    *,
    patient: str,
    grants: Iterable[str],
    grantee: Grantee | None,
    reason: str,
    heads: Iterable[str],
    issuer_name: str,
    issuer_key: Ed25519PrivateKey,
) -> dict[str, Any]:
    """A checked revoke payload signed by the issuer. ``grants`` and ``heads`` are sorted and
    deduplicated."""
    unsigned = unsigned_revoke_payload(
        patient=patient,
        grants=grants,
        grantee=grantee,
        reason=reason,
        heads=heads,
        issuer_name=issuer_name,
    )
    return sign_payload(REVOKE, unsigned, issuer_key)


def parse_permission(entry: Entry, entry_bytes: bytes) -> Record:
    """The grant or revoke an entry holds, checked strictly (exact fields, types, forms).

    ``entry_bytes`` must be the entry's canonical encoding (as decoded), since the record's ref
    is their leaf hash. The issuer signature is *not* verified here: see ``issuer_signature_ok``.
    """
    if entry.kind not in (GRANT, REVOKE):
        raise PermissionFormatError(f"entry kind {entry.kind!r} is not a permission record")
    try:
        same = encode_entry(entry) == bytes(entry_bytes)
    except EntryError as exc:
        raise PermissionFormatError(f"{entry.kind} payload: {exc}") from None
    if not same:
        raise PermissionFormatError("entry bytes are not the encoding of this entry")
    return parse_record(
        entry.kind,
        entry.payload,
        ref=leaf_hash(bytes(entry_bytes)).hex(),
        origin=entry.origin,
        index=entry.index,
        time_ms=entry.time_ms,
    )


def parse_record(
    kind: str, payload: Mapping[str, Any], *, ref: str, origin: str, index: int, time_ms: int
) -> Record:
    """parse_permission for a payload whose entry is known by its ``ref`` (leaf hash) already."""
    if kind not in (GRANT, REVOKE):
        raise PermissionFormatError(f"entry kind {kind!r} is not a permission record")
    f = _parse_fields(kind, payload, signed=True)
    if kind == GRANT:
        return Grant(
            ref,
            origin,
            index,
            time_ms,
            f["patient"],
            f["grantee"],
            f["study"],
            f["until"],
            f["purpose"],
            f["consent"],
            f["heads"],
            f["issuer"],
            f["issuer_sig"],
        )
    return Revoke(
        ref,
        origin,
        index,
        time_ms,
        f["patient"],
        f["grants"],
        f["grantee"],
        f["reason"],
        f["heads"],
        f["issuer"],
        f["issuer_sig"],
    )


def record_payload(record: Record, *, with_sig: bool = True) -> dict[str, Any]:
    """The payload a record was parsed from (parsing is lossless), optionally without the
    issuer signature."""
    out: dict[str, Any] = {
        "patient": record.patient,
        "heads": list(record.heads),
        "issuer": record.issuer,
    }
    if isinstance(record, Grant):
        out.update(
            grantee=record.grantee.to_json(),
            study=record.study,
            until=record.until,
            purpose=record.purpose,
            consent=record.consent,
        )
    else:
        out.update(
            grants=list(record.grants),
            grantee=None if record.grantee is None else record.grantee.to_json(),
            reason=record.reason,
        )
    if with_sig:
        out["issuer_sig"] = base64.b64encode(record.issuer_sig).decode("ascii")
    return out


def signed_message(record: Record) -> bytes:
    """What the issuer signed: the prefix and the canonical payload without ``issuer_sig``."""
    return _message(record_payload(record, with_sig=False))


def issuer_signature_ok(record: Record, public_key: Ed25519PublicKey) -> bool:
    """True iff ``issuer_sig`` verifies with this key. Whether that key may speak for the
    record's issuer name, and for this patient, is the caller's decision."""
    if len(record.issuer_sig) != 64:
        return False
    try:
        public_key.verify(record.issuer_sig, signed_message(record))
    except InvalidSignature:
        return False
    return True


# -- history ----------------------------------------------------------------------------------


def _by_ref(records: Iterable[Record]) -> dict[str, Record]:
    """Records keyed by ref, in ref order. The same entry may be passed twice (e.g. found in
    two lookups); two *different* records with one ref can only be a caller's bug."""
    out: dict[str, Record] = {}
    for record in records:
        held = out.setdefault(record.ref, record)
        if held != record:
            raise ValueError(f"two different permission records share ref {record.ref}")
    return dict(sorted(out.items()))


def heads_of(records: Iterable[Record], *, is_authorised: IsAuthorised | None = None) -> list[str]:
    """Sorted refs of the records no other record here cites: what a new record must cite.

    With ``is_authorised``, only authorised records count, so junk records by unauthorised
    issuers are neither cited nor able to hide the records they cite."""
    held = _by_ref(records)
    if is_authorised is not None:
        held = {ref: r for ref, r in held.items() if is_authorised(r) is None}
    cited = {head for r in held.values() for head in r.heads}
    return [ref for ref in held if ref not in cited]


def ancestors(ref: str, records_by_ref: Mapping[str, Record]) -> set[str]:
    """Refs of the held records reachable from ``ref`` through ``heads`` (not ``ref`` itself).
    Cited refs that are not held are absent, and so is what only they would lead to."""
    seen: set[str] = set()
    start = records_by_ref.get(ref)
    stack = list(start.heads) if start is not None else []
    while stack:
        head = stack.pop()
        if head in seen or head not in records_by_ref:
            continue
        seen.add(head)
        stack.extend(records_by_ref[head].heads)
    seen.discard(ref)  # only a hash cycle could put it there
    return seen


def order_history(records: Iterable[Record]) -> list[Record]:
    """The records in a topological order (every cited held record before the citing one),
    ties broken by ref: the same set gives the same list on every gateway."""
    held = _by_ref(records)
    pending = {ref: {h for h in r.heads if h in held} for ref, r in held.items()}
    citing: dict[str, list[str]] = {ref: [] for ref in held}
    for ref, heads in pending.items():
        for head in heads:
            citing[head].append(ref)
    ready = [ref for ref, heads in pending.items() if not heads]
    heapq.heapify(ready)
    out: list[Record] = []
    while ready:
        ref = heapq.heappop(ready)
        out.append(held[ref])
        for child in citing[ref]:
            pending[child].discard(ref)
            if not pending[child]:
                heapq.heappush(ready, child)
    done = {r.ref for r in out}
    out.extend(r for ref, r in held.items() if ref not in done)  # a hash cycle: cannot happen
    return out


# -- decisions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PermissionState:
    """The outcome of ``evaluate``; every dict is keyed by ref, in ref order."""

    patient: str | None
    effective: list[Grant]  # sorted by ref
    ended: dict[str, str]  # grant ref -> why it is not effective
    ignored: dict[str, str]  # record ref -> why it does not count
    revoked_by: dict[str, str]  # grant ref -> the (smallest) ref of a revoke that ends it
    records: dict[str, Record]  # everything evaluated, to explain decisions


@dataclass(frozen=True)
class Decision:
    allowed: bool
    grant: Grant | None  # the grant that allows it
    reason: str  # for the log and the PACS administrator


def evaluate(
    records: Iterable[Record],
    *,
    is_authorised: IsAuthorised,
    today: str,
    patient: str | None = None,
) -> PermissionState:
    """Which grants of one patient are in force on ``today`` (UTC, "YYYY-MM-DD").

    ``is_authorised(record)`` returns None if the record's issuer may sign for its patient (and
    its issuer signature verifies), else why not. ``patient`` is whose permissions these are;
    if None and the records name several patients, all are ignored (nobody guesses).
    """
    day = _parse_date(today, "today")
    held = _by_ref(records)
    ignored: dict[str, str] = {}
    if patient is None:
        patients = {r.patient for r in held.values()}
        if len(patients) == 1:
            patient = patients.pop()
        elif patients:
            for ref in held:
                ignored[ref] = (
                    f"records of {len(patients)} patients were evaluated together and no "
                    "patient was named"
                )
    mine: dict[str, Record] = {}  # this patient's records, authorised or not
    authorised: dict[str, Record] = {}
    for ref, record in held.items():
        if ref in ignored:
            continue
        if record.patient != patient:
            ignored[ref] = f"record is for patient {record.patient[:12]}…, not {str(patient)[:12]}…"
            continue
        mine[ref] = record
        why = is_authorised(record)
        if why is not None:
            ignored[ref] = why
            continue
        authorised[ref] = record

    # Ignored records count as not held, for ancestry too: a junk record citing a revoke must
    # not make a concurrent grant look as if its issuer had seen that revoke.
    content = {ref: signed_message(r) for ref, r in mine.items() if isinstance(r, Grant)}
    revokes = [r for r in authorised.values() if isinstance(r, Revoke)]
    revoked_content = {r.ref: {content[g] for g in r.grants if g in content} for r in revokes}
    ended: dict[str, str] = {}
    revoked_by: dict[str, str] = {}
    effective: list[Grant] = []
    for ref, grant in authorised.items():
        if not isinstance(grant, Grant):
            continue
        seen = ancestors(ref, authorised)
        for revoke in revokes:  # in ref order, so the first is the smallest
            targets = (
                ref in revoke.grants
                or content[ref] in revoked_content[revoke.ref]
                or (revoke.grantee is not None and revoke.grantee.covers(grant.grantee))
            )
            if targets and revoke.ref not in seen:
                revoked_by[ref] = revoke.ref
                ended[ref] = f"revoked by {revoke.ref}"
                break
        else:
            if grant.until is not None and day > date.fromisoformat(grant.until):
                ended[ref] = f"expired after {grant.until}"
            else:
                effective.append(grant)
    return PermissionState(
        patient=patient,
        effective=effective,
        ended=ended,
        ignored=dict(sorted(ignored.items())),
        revoked_by=revoked_by,
        records=held,
    )


def _strip_ae(ae: str) -> str:
    return ae.strip(" ")  # DICOM: leading and trailing spaces of an AE title are not significant


def _matches(grant: Grant, ae: str, site: str | None, study: str | None) -> bool:
    g = grant.grantee
    return (
        (g.ae is None or g.ae == ae)
        and (g.gateway is None or g.gateway == site)
        and (grant.study is None or grant.study == study)
    )


def decide(state: PermissionState, *, ae: str, site: str | None, study: str | None) -> Decision:
    """May an image of ``state``'s patient (of ``study``) go to AE title ``ae`` at gateway
    ``site`` (None: a destination not assigned to any gateway)? Default deny. Among several
    matching grants the one with the smallest ref is named, so every gateway names the same."""
    ae = _strip_ae(ae)
    where = f"{ae}@{site}" if site is not None else ae
    for grant in state.effective:  # sorted by ref
        if _matches(grant, ae, site, study):
            until = f", until {grant.until}" if grant.until else ""
            reason = f"allowed by grant {grant.ref[:REF_SHORT]} to {grant.grantee}{until}"
            return Decision(True, grant, reason)

    grants = [r for r in state.records.values() if isinstance(r, Grant)]
    matching = [g for g in grants if _matches(g, ae, site, study)]
    revoked = [g for g in matching if g.ref in state.revoked_by]
    expired = [g for g in matching if g.ref in state.ended and g.ref not in state.revoked_by]
    ignored = [g for g in matching if g.ref in state.ignored]
    more = len(revoked) + len(expired) + len(ignored) - 1
    also = ""
    if more > 0:
        also = f" ({more} other matching grant{'s' if more > 1 else ''} not in force either)"
    if revoked:
        g = revoked[0]
        by = state.revoked_by[g.ref]
        reason = f"grant {g.ref[:REF_SHORT]} to {g.grantee} revoked by {by[:REF_SHORT]}"
    elif expired:
        g = expired[0]
        reason = f"grant {g.ref[:REF_SHORT]} to {g.grantee} expired after {g.until}"
    elif ignored:
        g = ignored[0]
        reason = f"grant {g.ref[:REF_SHORT]} to {g.grantee} not accepted: {state.ignored[g.ref]}"
    elif any(_matches(g, ae, site, g.study) for g in state.effective):
        reason = f"no grant for {where} covers this study (only other studies)"
    else:
        reason = f"no grant for {where}"
    return Decision(False, None, reason + also)
