"""The consortium as this gateway remembers it: witness state per origin, equivocation
evidence (an origin with evidence whose flag was not cleared is flagged), each peer's last known
status and consortium settings. Kept in the ledger database, beside the logs (``log.py``), and
used by the peer service (``gossip.py``, ``peer_api.py``) and ``dicomledger status``."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from dicomledger.ledger.log import LedgerStore, one_row


@dataclass(frozen=True)
class HeldEvidence:
    """Equivocation evidence held against an origin, and whether (when, by which entry of
    this gateway's log) its flag was cleared."""

    origin: str
    data: bytes
    received_at: str
    cleared_at: str | None = None
    cleared_by_entry: int | None = None


def evidence_digest(data: bytes) -> bytes:
    """SHA-256 of an evidence file's bytes: how a ``flag-cleared`` entry names it."""
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class PeerStatus:
    origin: str
    reachable: bool
    last_contact: str | None
    their_size: int | None
    error: str | None


@dataclass(frozen=True)
class ConsortiumCheck:
    """What a peer last said of its consortium settings (``peer_api.CONSORTIUM_HEADER``): the
    check value of its pseudonym secret, the digest of its witness policy, and how they
    differ from ours (None: they match)."""

    origin: str
    secret_check: str | None
    policy: str | None
    mismatch: str | None
    checked_at: str


class ConsortiumState:
    """What a gateway remembers about its peers: witness state per origin, equivocation
    evidence (an origin with evidence whose flag was not cleared is flagged), and each peer's
    last known status."""

    def __init__(self, store: LedgerStore) -> None:
        self.db = store.db

    async def witness_state(self, origin: str) -> tuple[int, bytes, bytes] | None:
        row = await one_row(
            self.db, "SELECT size, root, note FROM witness_state WHERE origin = ?", (origin,)
        )
        return None if row is None else (row[0], bytes(row[1]), bytes(row[2]))

    async def witnessed_notes(self) -> list[tuple[str, bytes]]:
        """(origin, note) of the checkpoint last cosigned, per origin."""
        rows = await self.db.execute_fetchall(
            "SELECT origin, note FROM witness_state ORDER BY origin"
        )
        return [(row[0], bytes(row[1])) for row in rows]

    async def save_witness_state(self, origin: str, size: int, root: bytes, note: bytes) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO witness_state (origin, size, root, note) VALUES (?, ?, ?, ?)",
            (origin, size, root, note),
        )

    async def forget_witness_state(self, origin: str) -> None:
        await self.db.execute("DELETE FROM witness_state WHERE origin = ?", (origin,))

    async def add_evidence(self, origin: str, data: bytes, now: str) -> bool:
        """Keep evidence against ``origin``; True if it was new."""
        cur = await self.db.execute(
            "INSERT OR IGNORE INTO evidence (origin, data, received_at) VALUES (?, ?, ?)",
            (origin, data, now),
        )
        added = cur.rowcount == 1  # the INSERT has finished: no statement stays open
        await cur.close()
        return added

    async def evidence(self) -> list[tuple[str, bytes]]:
        """(origin, evidence) of every flag in force: evidence not cleared, oldest first."""
        rows = await self.db.execute_fetchall(
            "SELECT origin, data FROM evidence ORDER BY received_at"
        )
        cleared = await self._cleared_digests()
        return [
            (row[0], bytes(row[1])) for row in rows if evidence_digest(bytes(row[1])) not in cleared
        ]

    async def evidence_held(self, origin: str) -> list[HeldEvidence]:
        """All evidence held against ``origin``, cleared or not, oldest first."""
        rows = await self.db.execute_fetchall(
            "SELECT data, received_at FROM evidence WHERE origin = ? ORDER BY received_at",
            (origin,),
        )
        cleared = await self._cleared_digests()
        return [
            HeldEvidence(
                origin,
                bytes(data),
                received_at,
                *cleared.get(evidence_digest(bytes(data)), (None, None)),
            )
            for data, received_at in rows
        ]

    async def _cleared_digests(self) -> dict[bytes, tuple[str, int]]:
        rows = await self.db.execute_fetchall(
            "SELECT digest, cleared_at, entry FROM evidence_cleared"
        )
        return {bytes(row[0]): (row[1], row[2]) for row in rows}

    async def flagged(self) -> set[str]:
        return {origin for origin, _ in await self.evidence()}

    async def mark_cleared(
        self, origin: str, digests: Sequence[bytes], entry: int, now: str
    ) -> None:
        """Clear the flag these pieces of evidence raised against ``origin``: the evidence is
        kept (for export and audit) but no longer flags the origin nor is served to peers;
        ``entry`` is the ``flag-cleared`` entry of this gateway's log that records it."""
        await self.db.executemany(
            "INSERT OR IGNORE INTO evidence_cleared (digest, origin, cleared_at, entry) VALUES (?, ?, ?, ?)",
            [(d, origin, now, entry) for d in digests],
        )

    async def set_peer_status(self, status: PeerStatus) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO peer_status (origin, reachable, last_contact, their_size, error) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                status.origin,
                int(status.reachable),
                status.last_contact,
                status.their_size,
                status.error,
            ),
        )

    async def set_consortium_check(self, check: ConsortiumCheck) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO peer_consortium (origin, secret_check, policy, mismatch, checked_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (check.origin, check.secret_check, check.policy, check.mismatch, check.checked_at),
        )

    async def consortium_check(self, origin: str) -> ConsortiumCheck | None:
        row = await one_row(
            self.db,
            "SELECT secret_check, policy, mismatch, checked_at FROM peer_consortium WHERE origin = ?",
            (origin,),
        )
        return None if row is None else ConsortiumCheck(origin, *row)

    async def peer_status(self, origin: str) -> PeerStatus | None:
        row = await one_row(
            self.db,
            "SELECT reachable, last_contact, their_size, error FROM peer_status WHERE origin = ?",
            (origin,),
        )
        return None if row is None else PeerStatus(origin, bool(row[0]), row[1], row[2], row[3])
