"""Keyed pseudonyms: how identifiers appear on the ledger instead of PHI.

pseudonym(secret, kind, value) = hex(HMAC-SHA-256(secret, kind || 0x00 || value)). The kind
("patient", "study", ...) keeps equal strings of different kinds from sharing a pseudonym;
without the consortium secret nobody can test a guessed patient ID against the ledger.
"""

from __future__ import annotations

import hashlib
import hmac

SECRET_CHECK_MESSAGE = b"dicomledger pseudonym secret check v1"


def pseudonym(secret: bytes, kind: str, value: str) -> str:
    return hmac.new(secret, kind.encode() + b"\x00" + value.encode(), hashlib.sha256).hexdigest()


def secret_check(secret: bytes) -> str:
    """A keyed check value of the consortium secret, which peers exchange to find out that
    they hold the same secret without revealing it: hex(HMAC-SHA-256(secret, "dicomledger
    pseudonym secret check v1")). Like a pseudonym, it tells nothing about the secret."""
    return hmac.new(secret, SECRET_CHECK_MESSAGE, hashlib.sha256).hexdigest()
