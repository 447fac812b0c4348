"""Ledger entries: a deterministic, signed, chained encoding. Pure functions, no I/O.

Encoding (see docs/ledger-formats.md): an entry is the canonical JSON of one object

    {"index":N,"kind":K,"origin":O,"payload":{...},"prev":HEX64,"sig":B64,"time":MS,"v":1}

Canonical JSON here means: UTF-8, keys sorted, no insignificant whitespace, ASCII-only keys,
no floats (integers, strings, booleans, null, arrays and objects only). A decoder re-encodes
what it parsed and rejects the entry unless the bytes are identical, so one entry has exactly
one byte form and its leaf hash is stable.

The signature is Ed25519 over ``SIGNING_PREFIX + canonical JSON of the object without "sig"``;
the prefix separates entry signatures from signed-note (checkpoint) signatures made by the
same key. ``prev`` is the RFC 6962 leaf hash of the previous entry of the same origin (32 zero
bytes for index 0), so the chain and the Merkle tree commit to the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dicomledger.common.errors import LedgerFormatError
from dicomledger.ledger.merkle import leaf_hash

FORMAT_VERSION = 1
SIGNING_PREFIX = b"dicomledger/entry/v1\n"
MAX_ENTRY_BYTES = 64 * 1024
ZERO_HASH = bytes(32)

IMAGE_ANCHORED = "image-anchored"
GRANT = "grant"
REVOKE = "revoke"
FORWARDED = "forwarded"
FORWARD_REFUSED = "forward-refused"
RETRIEVED = "retrieved"
RETRIEVE_REFUSED = "retrieve-refused"
TAMPER_ALARM = "tamper-alarm"
CONFIG = "config"
LOCAL_TIP_ACCEPTED = (
    "local-tip-accepted"  # started on an unconfirmed tip (serve --accept-local-tip)
)
FLAG_CLEARED = "flag-cleared"  # an equivocation flag cleared (peers --clear-flag)
FORWARDS_QUEUED = "forwards-queued"  # a grant queued a patient's stored instances for a destination
ERASED = "erased"
KEY_ROTATION = "key-rotation"  # the log's signing key changes (rotate-key; keychain.py)
KEY_REPLACEMENT = (
    "key-replacement"  # a lost or stolen key replaced by a consortium quorum (keychain.py)
)
# a Storage Commitment report: how many instances were committed to which requestor (no UIDs)
STORAGE_COMMITTED = "storage-committed"
KINDS = frozenset(
    {
        STORAGE_COMMITTED,
        IMAGE_ANCHORED,
        GRANT,
        REVOKE,
        FORWARDED,
        FORWARD_REFUSED,
        RETRIEVED,
        RETRIEVE_REFUSED,
        TAMPER_ALARM,
        CONFIG,
        LOCAL_TIP_ACCEPTED,
        FLAG_CLEARED,
        FORWARDS_QUEUED,
        ERASED,
        KEY_ROTATION,
        KEY_REPLACEMENT,
    }
)
_FIELDS = frozenset({"v", "origin", "index", "prev", "time", "kind", "payload", "sig"})


class EntryError(LedgerFormatError, ValueError):
    """An entry is malformed, non-canonical, badly signed or out of place; the message says which."""


@dataclass(frozen=True)
class Entry:
    origin: str
    index: int
    prev: bytes  # leaf hash of the previous entry of this origin
    time_ms: int  # author's clock, milliseconds since the Unix epoch (UTC)
    kind: str
    payload: Mapping[str, Any]
    sig: bytes

    def unsigned_object(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "origin": self.origin,
            "index": self.index,
            "prev": self.prev.hex(),
            "time": self.time_ms,
            "kind": self.kind,
            "payload": self.payload,
        }


def canonical_json(value: Any) -> bytes:
    """The one byte form of a JSON value under this module's rules; EntryError if not allowed."""
    _check_json_value(value, "entry")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _check_json_value(value: Any, where: str) -> None:
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if abs(value) >= 2**53:
            raise EntryError(f"{where}: integer {value} is outside the exact JSON range (2**53)")
        return
    if isinstance(value, float):
        raise EntryError(
            f"{where}: floats are not allowed in ledger entries (use integers or strings)"
        )
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or not key.isascii():
                raise EntryError(f"{where}: object keys must be ASCII strings, got {key!r}")
            _check_json_value(item, f"{where}.{key}")
        return
    raise EntryError(f"{where}: {type(value).__name__} is not a JSON value")


def signing_bytes(entry: Entry) -> bytes:
    return SIGNING_PREFIX + canonical_json(entry.unsigned_object())


def encode_entry(entry: Entry) -> bytes:
    obj = entry.unsigned_object()
    obj["sig"] = base64.b64encode(entry.sig).decode()
    data = canonical_json(obj)
    if len(data) > MAX_ENTRY_BYTES:
        raise EntryError(f"entry is {len(data)} bytes, above the limit of {MAX_ENTRY_BYTES}")
    return data


def sign_entry(
    *,
    origin: str,
    index: int,
    prev: bytes,
    time_ms: int,
    kind: str,
    payload: Mapping[str, Any],
    private_key: Ed25519PrivateKey,
) -> tuple[Entry, bytes]:
    """Build, sign and encode an entry; returns the entry and its bytes."""
    if kind not in KINDS:
        raise EntryError(f"unknown entry kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    unsigned = Entry(origin, index, prev, time_ms, kind, payload, b"")
    sig = private_key.sign(signing_bytes(unsigned))
    entry = Entry(origin, index, prev, time_ms, kind, payload, sig)
    return entry, encode_entry(entry)


class _Parsing(threading.local):
    inexact = False  # the entry being parsed has a float, NaN/Infinity or an integer >= 2**53


_PARSING = _Parsing()


def _float(text: str) -> float:
    _PARSING.inexact = True
    return float(text)


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # more digits than Python converts
        raise EntryError("entry: an integer is outside the exact JSON range (2**53)") from None
    if abs(value) >= 2**53:
        _PARSING.inexact = True
    return value


# Parsing notes floats, NaN/Infinity and inexact integers on the way in, so the parsed object
# needs the walk of ``_check_json_value`` (which names the offending field) only when it has
# one, or non-ASCII text that may be in a key, before it is re-encoded for the canonical check.
_DECODER = json.JSONDecoder(parse_float=_float, parse_int=_int, parse_constant=_float)
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def decode_entry(data: bytes) -> Entry:
    """Parse entry bytes, rejecting anything that is not the canonical form. No signature check."""
    if len(data) > MAX_ENTRY_BYTES:
        raise EntryError(f"entry is {len(data)} bytes, above the limit of {MAX_ENTRY_BYTES}")
    _PARSING.inexact = False
    try:
        obj = _DECODER.decode(data.decode("utf-8"))
    except EntryError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EntryError(f"entry is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise EntryError("entry is not a JSON object")
    if set(obj) != _FIELDS:
        missing, extra = _FIELDS - set(obj), set(obj) - _FIELDS
        raise EntryError(
            f"entry fields wrong: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    if obj["v"] != FORMAT_VERSION or obj["v"] is True:
        raise EntryError(f"entry format version {obj['v']!r} is not supported (expected 1)")
    origin, index, time_ms, kind = obj["origin"], obj["index"], obj["time"], obj["kind"]
    if not isinstance(origin, str) or not origin:
        raise EntryError("entry origin must be a non-empty string")
    for name, number in (("index", index), ("time", time_ms)):
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise EntryError(f"entry {name} must be a non-negative integer")
    if not isinstance(kind, str) or kind not in KINDS:
        raise EntryError(f"entry kind {kind!r} is unknown")
    if not isinstance(obj["payload"], dict):
        raise EntryError("entry payload must be a JSON object")
    try:
        prev = bytes.fromhex(obj["prev"]) if isinstance(obj["prev"], str) else b""
        sig = base64.b64decode(obj["sig"], validate=True) if isinstance(obj["sig"], str) else b""
    except (ValueError, binascii.Error):
        raise EntryError("entry prev/sig are not valid hex/base64") from None
    if len(prev) != 32 or obj["prev"] != prev.hex():
        raise EntryError("entry prev must be 64 lower-case hex digits")
    if len(sig) != 64:
        raise EntryError("entry signature missing or not 64 bytes")
    if _PARSING.inexact or not data.isascii():
        _check_json_value(obj, "entry")  # floats, inexact integers, non-ASCII keys: named
    # Equal to encode_entry(entry): every field above is as encode_entry writes it.
    if (
        base64.b64encode(sig).decode("ascii") != obj["sig"]
        or _CANONICAL.encode(obj).encode() != data
    ):
        raise EntryError("entry is not in canonical form (key order, spacing, escaping or numbers)")
    return Entry(origin, index, prev, time_ms, kind, obj["payload"], sig)


def _signing_bytes_of_canonical(data: bytes, entry: Entry) -> bytes:
    """signing_bytes(entry) cut out of its canonical encoding instead of re-encoding it.

    Keys are sorted, so the top-level "sig" member is the last string member before "time"
    and "v" (integers): removing it from the right leaves the canonical unsigned object.
    """
    member = b',"sig":"' + base64.b64encode(entry.sig) + b'"'
    head, found, tail = data.rpartition(member)
    return SIGNING_PREFIX + head + tail if found else signing_bytes(entry)


def verify_entry_signature(
    entry: Entry, public_key: Ed25519PublicKey, canonical: bytes | None = None
) -> None:
    """EntryError unless the signature verifies; ``canonical`` (the entry's checked
    canonical bytes) saves re-encoding it."""
    message = (
        signing_bytes(entry) if canonical is None else _signing_bytes_of_canonical(canonical, entry)
    )
    try:
        public_key.verify(entry.sig, message)
    except InvalidSignature:
        raise EntryError(
            f"signature of {entry.origin} entry {entry.index} does not verify with the origin's key"
        ) from None


def check_entry(
    data: bytes,
    *,
    origin: str,
    index: int,
    prev: bytes,
    public_key: Ed25519PublicKey | None,
) -> Entry:
    """Decode and check one entry in its place in an origin's log; EntryError says what is wrong.

    ``public_key`` None skips the entry's own signature: only for a caller that authenticates
    the entry otherwise (``verify``: a checkpoint signed by the origin whose root commits to it)."""
    entry = decode_entry(data)
    if entry.origin != origin:
        raise EntryError(f"entry names origin {entry.origin!r}, expected {origin!r}")
    if entry.index != index:
        raise EntryError(f"entry is out of sequence: index {entry.index}, expected {index}")
    if entry.prev != prev:
        raise EntryError(
            f"entry {index} has a wrong previous hash {entry.prev.hex()[:16]}…, "
            f"expected {prev.hex()[:16]}…"
        )
    if public_key is not None:
        verify_entry_signature(entry, public_key, canonical=data)
    return entry


def entry_hash(data: bytes) -> bytes:
    """The hash the next entry cites as ``prev``: the RFC 6962 leaf hash of these bytes."""
    return leaf_hash(data)
