"""Keyed pseudonyms: how identifiers appear on the ledger instead of PHI.

pseudonym(secret, kind, value) = hex(HMAC-SHA-256(secret, kind || 0x00 || value)). The kind
("patient", "study", ...) keeps equal strings of different kinds from sharing a pseudonym;
without the consortium secret nobody can test a guessed patient ID against the ledger.
"""

from __future__ import annotations

import hashlib
import hmac


def pseudonym(secret: bytes, kind: str, value: str) -> str:
    return hmac.new(secret, kind.encode() + b"\x00" + value.encode(), hashlib.sha256).hexdigest()
