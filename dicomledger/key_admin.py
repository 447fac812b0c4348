"""`dicomledger rotate-key` and `replace-key submit`, through the running gateway: both append
to its log, so they go through its single writer after its start-up check (an offline append
to a restored log could sign a second history).

* ``rotate-key``: a new key signs the log from a key-rotation entry on (``ledger/rotation.py``);
  the gateway's custodian signatures and cosignatures use it at once; ``trust.txt`` beside the
  config gets the entry as a ``key-change`` line for auditors.
* ``replace-key-submit``: a replacement statement for a peer's lost or stolen key, signed by a
  quorum of the consortium (``ledger/keychain.py``); the gateway follows it and records it on
  its own log (kind ``key-replacement``), from where every other gateway learns it too.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import structlog

from dicomledger.config import Config
from dicomledger.ledger.entries import KEY_REPLACEMENT
from dicomledger.ledger.gossip import PeerService
from dicomledger.ledger.keychain import KeyChangeError, replacement_payload
from dicomledger.ledger.log import LogWriter
from dicomledger.ledger.note import SIG_COSIGNATURE_V1, verifier_key
from dicomledger.ledger.permission_book import PermissionBook
from dicomledger.ledger.rotation import rotate_key
from dicomledger.ledger.trust import key_change_line

log = structlog.get_logger("dicomledger.keys")


def add_to_trust_file(config: Config, entry: bytes, what: str, vkey: str) -> Path:
    """Append a key change's ``key-change`` line to the ``trust.txt`` beside the config (the
    file `init` wrote for auditors and peers), if there is one; returns its path."""
    trust = config.path.parent / "trust.txt"
    if trust.exists():
        with open(trust, "a", encoding="utf-8") as f:
            f.write(
                f"\n# {what}: from then on this log is signed by\n# {vkey}\n{key_change_line(entry)}\n"
            )
    return trust


class KeyAdmin:
    def __init__(
        self, config: Config, writer: LogWriter, book: PermissionBook, peers: PeerService | None
    ) -> None:
        self.config = config
        self.writer = writer
        self.book = book
        self.peers = peers

    def handlers(self) -> dict[str, Any]:
        return {"rotate-key": self.rotate, "replace-key-submit": self.submit}

    async def rotate(self, body: dict[str, Any]) -> dict[str, Any]:
        appended = await rotate_key(self.writer, self.config.ledger.key_file)
        identity = self.writer.identity
        self.book.issuer_keys[identity.origin] = identity.private_key  # custodian signatures
        trust = add_to_trust_file(
            self.config, appended.data, f"Key rotation at entry {appended.index}", identity.vkey
        )
        line = key_change_line(appended.data)
        log.warning(
            "key rotated: entries after the key-rotation entry are signed by the new key",
            entry=appended.index,
            vkey=identity.vkey,
        )
        return {
            "index": appended.index,
            "vkey": identity.vkey,
            "witness_vkey": verifier_key(identity.origin, identity.public_key, SIG_COSIGNATURE_V1),
            "trust_line": line,
            "trust_file": str(trust) if trust.exists() else None,
        }

    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.peers is None:
            raise KeyChangeError("this gateway has no [peering]: it follows no other gateway's key")
        data = base64.b64decode(body["statement"], validate=True)
        statement = await self.peers.apply_statement(data, "replace-key submit")
        appended = await self.writer.append(KEY_REPLACEMENT, replacement_payload(data))
        return {
            "origin": statement.origin,
            "size": statement.size,
            "index": appended.index,
            "signers": statement.signers,
        }
