"""The tamper check of a stored instance against its anchoring ledger entry, shared by
retrieval (before an instance leaves, ``retrieval.py``) and the scrub (``scrub.py``), so both
decide and report a tampered instance the same way.

The anchoring entry (``ledger_origin``, ``ledger_index`` of the index row) must decode, carry
this gateway's signature, be an ``image-anchored`` entry of this instance; the stored file's
hash under the entry's hash method (``docs/pixel-hash.md``) must equal the entry's ``sha256``.
A failure is a ``tamper-alarm`` entry on the ledger and an error log line naming the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dicomledger.ledger.entries import (
    IMAGE_ANCHORED,
    EntryError,
    decode_entry,
    verify_entry_signature,
)

# The problems, word for word in the alarm entries and log lines.
NO_ANCHOR = "instance has no anchoring ledger entry"
PIXELS_DIFFER = "pixel hash of the stored file differs from the anchored hash"
FILE_MISSING = "stored file is missing"


@dataclass(frozen=True)
class AnchorCheck:
    problem: str | None  # None: the entry anchors this instance, signed by us
    sha256: str | None  # the hash it anchored, if readable
    method: str | None  # its hash method: the stored file is hashed the same way
    payload: dict[str, Any] | None  # the entry's payload, if it decodes


def check_anchor(
    anchor: bytes | None, entry_key: Callable[[int], Ed25519PublicKey], instance: str
) -> AnchorCheck:
    """Does ``anchor`` (the anchoring entry's bytes) anchor ``instance`` (its pseudonym),
    signed with ``entry_key(index)``, the key this log had in force at its index (it may have
    rotated since)?"""
    if anchor is None:
        return AnchorCheck(NO_ANCHOR, None, None, None)
    try:
        entry = decode_entry(anchor)
    except EntryError as exc:
        return AnchorCheck(f"anchoring entry is invalid: {exc}", None, None, None)
    payload = dict(entry.payload)
    sha256 = payload.get("sha256")
    sha256 = sha256 if isinstance(sha256, str) else None
    method = payload.get("hash_method")
    method = method if isinstance(method, str) else None
    try:
        verify_entry_signature(entry, entry_key(entry.index), canonical=anchor)
    except EntryError as exc:
        return AnchorCheck(f"anchoring entry is invalid: {exc}", sha256, method, payload)
    if entry.kind != IMAGE_ANCHORED or payload.get("instance") != instance:
        return AnchorCheck(
            f"ledger entry {entry.index} does not anchor this instance", sha256, method, payload
        )
    return AnchorCheck(None, sha256, method, payload)


def alarm_payload(
    *,
    patient: str,
    study: str,
    instance: str,
    expected: str | None,
    found: str | None,
    anchor_origin: str | None,
    anchor_index: int | None,
    problem: str,
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``tamper-alarm`` entry's payload; ``context`` names who found it (a retrieval's
    service, calling AE and destination, or ``{"found_by": "scrub"}``)."""
    return {
        **(context or {}),
        "patient": patient,
        "study": study,
        "instance": instance,
        "expected_sha256": expected,
        "found_sha256": found,
        "anchor": {"origin": anchor_origin, "index": anchor_index},
        "problem": problem,
    }
