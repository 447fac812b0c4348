"""A gateway's signing identity: an Ed25519 key pair and the origin name of its log."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dicomledger.common.errors import ConfigurationError
from dicomledger.ledger.note import verifier_key


class KeyFileError(ConfigurationError, ValueError):
    """A key file is missing, unreadable, too widely readable or not an Ed25519 key."""


@dataclass(frozen=True)
class Identity:
    origin: str
    private_key: Ed25519PrivateKey

    @cached_property  # derived once: the ledger writer compares it for every entry it signs
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def vkey(self) -> str:
        """The signed-note verifier key other gateways and auditors put in their trust file."""
        return verifier_key(self.origin, self.public_key)


def create_key_file(path: Path) -> Ed25519PrivateKey:
    """Write a new PKCS#8 PEM private key readable by the owner only (0600)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    return key


def load_key_file(path: Path) -> Ed25519PrivateKey:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise KeyFileError(f"key file {path} is readable by others; run: chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise KeyFileError(f"key file {path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} holds a {type(key).__name__}, expected Ed25519")
    return key
