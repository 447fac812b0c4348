"""What the peer service reads of its settings: the shapes ``config.py``'s peering objects have.

The ledger does not import the configuration (which joins both halves); the loader's frozen
dataclasses fit these protocols, and a test or a tool may pass any object that does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dicomledger.ledger.policy import WitnessPolicy


class PeerSettings(Protocol):
    """Another gateway of the consortium ([[peers]])."""

    @property
    def origin(self) -> str: ...  # its log origin, also its signed-note key name
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def public_key(self) -> Ed25519PublicKey: ...
    @property
    def tls_cert(self) -> bytes: ...  # its pinned TLS certificate (PEM)


class WitnessSettings(Protocol):
    """A standard C2SP tlog-witness outside the consortium ([[witnesses]])."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def public_key(self) -> Ed25519PublicKey: ...
    @property
    def tls_cert(self) -> bytes | None: ...  # None: the system's CAs
    @property
    def interval(self) -> float: ...


class PeeringSettings(Protocol):
    """The peer API's own address, TLS files and gossip tuning ([peering])."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def tls_cert(self) -> Path: ...
    @property
    def tls_key(self) -> Path: ...
    @property
    def gossip_interval(self) -> float: ...
    @property
    def fanout(self) -> int: ...
    @property
    def max_message_bytes(self) -> int: ...
    @property
    def peers(self) -> Sequence[PeerSettings]: ...
    @property
    def heartbeat_interval(self) -> float: ...
    @property
    def backoff_max(self) -> float: ...
    @property
    def witnesses(self) -> Sequence[WitnessSettings]: ...
    @property
    def witness_policy(self) -> WitnessPolicy | None: ...
