"""`dicomledger status`: the ledger and store at a glance."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

from dicomledger.config import Config
from dicomledger.dicom.index import Index
from dicomledger.ledger.log import LedgerStore
from dicomledger.ledger.note import Signature, cosignature_timestamp, parse_note


async def _status(config: Config) -> list[str]:
    lines = [f"gateway {config.gateway.ae_title} on {config.gateway.host}:{config.gateway.port}"]
    store = await LedgerStore.open(config.ledger.database)
    try:
        for origin in await store.origins():
            size = await store.size(origin.name)
            cp = await store.latest_checkpoint(origin.name)
            mark = " (this gateway)" if origin.name == config.ledger.origin else ""
            lines.append(
                f"log {origin.name}{mark}: {size} entries, newest checkpoint at size "
                f"{cp[0] if cp else 'none'}"
            )
    finally:
        await store.close()
    index = await Index.open(config.storage.index)
    try:
        lines.append(f"stored instances: {await index.count_instances()}")
        unanchored = await index.unanchored()
        if unanchored:
            lines.append(f"instances awaiting an anchor: {len(unanchored)}")
    finally:
        await index.close()
    if config.forwarding is not None:
        from dicomledger.forwarding import ForwardQueue

        queue = await ForwardQueue.open(config.forwarding.queue)
        try:
            counts = await queue.counts()
            for dest in config.forwarding.destinations:
                by_state = {state: counts.get((dest.ae_title, state), 0) for state in ("queued", "done", "refused", "failed")}
                lines.append(
                    f"forwarding to {dest.ae_title} at {dest.host}:{dest.port}: "
                    + ", ".join(f"{n} {state}" for state, n in by_state.items())
                )
            for destination, uid, attempts, error, when in await queue.parked():
                lines.append(f"  PARKED {destination} {uid} after {attempts} attempts at {when}: {error}")
        finally:
            await queue.close()
    from dicomledger.lifecycle import status_lines

    return lines + status_lines(config)


def _cosigned(own: tuple[int, bytes] | None, sigs: Sequence[Signature], peer: str) -> str:
    """When ``peer`` last cosigned our newest checkpoint (a heartbeat renews it while idle)."""
    stamps = [cosignature_timestamp(s) for s in sigs if s.name == peer]
    if own is None or not stamps or stamps[0] is None:
        return "has not cosigned our newest checkpoint" if own else ""
    when = datetime.fromtimestamp(stamps[0], UTC).isoformat()
    return f"cosigned our checkpoint {own[0]} at {when}"


def status(config: Config) -> int:
    for line in asyncio.run(_status(config)):
        print(line)
    return 0


async def _peers(config: Config) -> list[str]:
    from dicomledger.ledger.log import ConsortiumState

    if config.peering is None:
        return ["no [peering] section: this gateway runs alone"]
    store = await LedgerStore.open(config.ledger.database)
    try:
        state = ConsortiumState(store)
        flagged = await state.flagged()
        own = await store.latest_checkpoint(config.ledger.origin)
        own_sigs = parse_note(own[1]).signatures if own else ()
        lines = []
        for peer in config.peering.peers:
            status = await state.peer_status(peer.origin)
            known = await store.origin(peer.origin) is not None
            held = await store.size(peer.origin) if known else 0
            cp = await store.latest_checkpoint(peer.origin) if known else None
            reach = "never contacted" if status is None else ("reachable" if status.reachable else "UNREACHABLE")
            parts = [
                f"{peer.origin} at {peer.host}:{peer.port}: {reach}",
                f"last contact {status.last_contact}" if status and status.last_contact else "",
                f"we hold {held} entries of its newest checkpoint {cp[0] if cp else 'none'}",
                f"its own checkpoint size {status.their_size}" if status and status.their_size is not None else "",
                _cosigned(own, own_sigs, peer.origin),
                "FLAGGED: equivocation evidence held" if peer.origin in flagged else "not flagged",
                f"last error: {status.error}" if status and status.error else "",
            ]
            lines.append("; ".join(p for p in parts if p))
        return lines
    finally:
        await store.close()


def peers(config: Config) -> int:
    for line in asyncio.run(_peers(config)):
        print(line)
    return 0
