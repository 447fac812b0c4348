"""`dicomledger status` and `dicomledger peers`: the gateway, its ledger and store at a glance;
`peers --evidence` writes out the equivocation evidence held against a peer.

Both read the databases directly, so they answer the same whether the gateway runs or not;
whether it runs is asked of its data-directory lock (``datadir.running_gateway``). They
create nothing: a database that does not exist yet is reported as such.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicomledger.config import Config
from dicomledger.datadir import running_gateway
from dicomledger.dicom.index import Index
from dicomledger.ledger.consortium import ConsortiumCheck, ConsortiumState
from dicomledger.ledger.entries import FORWARD_REFUSED, FORWARDED
from dicomledger.ledger.log import LedgerStore
from dicomledger.ledger.note import Signature, cosignature_timestamp, parse_note


def running_line(config: Config) -> str:
    g = config.gateway
    pid = running_gateway(config)
    where = f"gateway {g.ae_title} on {g.host}:{g.port}"
    if pid is None:
        return f"{where}: NOT RUNNING (start it with `dicomledger serve --config {config.path}`)"
    return f"{where}: running (process {pid})"


async def forward_entry_counts(store: LedgerStore, origin: str) -> Counter[tuple[str, str]]:
    """(destination, kind) -> how many ``forwarded`` / ``forward-refused`` entries ``origin``'s
    log holds: the ledger, not the queue, is the record of what was sent and refused."""
    info = await store.origin(origin)
    if info is None:
        return Counter()
    rows = await store.db.execute_fetchall(
        "SELECT json_extract(t, '$.payload.destination'), json_extract(t, '$.kind'), COUNT(*) "
        "FROM (SELECT CAST(data AS TEXT) AS t FROM entries WHERE origin_id = ?) "
        "WHERE json_extract(t, '$.kind') IN (?, ?) GROUP BY 1, 2",
        (info.id, FORWARDED, FORWARD_REFUSED),
    )
    return Counter({(dest, kind): n for dest, kind, n in rows})


async def _status(config: Config) -> list[str]:
    lines = [running_line(config)]
    database = config.ledger.database
    if not database.exists():
        return [*lines, f"no ledger database at {database} yet: the gateway has never run"]
    store = await LedgerStore.open(database)
    try:
        for origin in await store.origins():
            size = await store.size(origin.name)
            cp = await store.latest_checkpoint(origin.name)
            mark = " (this gateway)" if origin.name == config.ledger.origin else ""
            lines.append(
                f"log {origin.name}{mark}: {size} entries, newest checkpoint at size "
                f"{cp[0] if cp else 'none'}"
            )
        forwards = await forward_entry_counts(store, config.ledger.origin)
    finally:
        await store.close()
    if config.storage.index.exists():
        index = await Index.open(config.storage.index)
        try:
            lines.append(f"stored instances: {await index.count_instances()}")
            unanchored = await index.unanchored()
            if unanchored:
                lines.append(f"instances awaiting an anchor: {len(unanchored)}")
        finally:
            await index.close()
    else:
        lines.append("stored instances: 0 (no index database yet)")
    if config.forwarding is not None:
        lines += await _forwarding_lines(config, forwards)
    from dicomledger.lifecycle import status_lines

    return lines + status_lines(config)


async def _forwarding_lines(config: Config, forwards: Counter[tuple[str, str]]) -> list[str]:
    """Per destination: done and refused as the ledger has them (``forwarded`` and
    ``forward-refused`` entries), queued, failed (to be retried) and parked as the forward
    queue has them."""
    from dicomledger.forwarding import ForwardQueue

    assert config.forwarding is not None
    fw = config.forwarding
    counts: dict[tuple[str, str], int] = {}
    parked: list[tuple[str, str, int, str | None, str | None]] = []
    if fw.queue.exists():
        queue = await ForwardQueue.open(fw.queue)
        try:
            counts = await queue.shown_counts()
            parked = await queue.parked()
        finally:
            await queue.close()
    lines = []
    for dest in fw.destinations:
        by_state = {
            "queued": counts.get((dest.ae_title, "queued"), 0),
            "done": forwards[dest.ae_title, FORWARDED],
            "refused": forwards[dest.ae_title, FORWARD_REFUSED],
            "failed": counts.get((dest.ae_title, "failed"), 0),
            "parked": counts.get((dest.ae_title, "parked"), 0),
        }
        lines.append(
            f"forwarding to {dest.ae_title} at {dest.host}:{dest.port}: "
            + ", ".join(f"{n} {state}" for state, n in by_state.items())
        )
    for destination, uid, attempts, error, when in parked:
        lines.append(f"  PARKED {destination} {uid} after {attempts} attempts at {when}: {error}")
    if parked:
        lines.append(
            "  (`dicomledger queue` lists the jobs; `queue unpark` or `queue retry` sends them again)"
        )
    return lines


def _age(since: str, now: datetime) -> str:
    """``2h05m``, ``3m20s``, ``12s``: how long ago ``since`` (ISO 8601) was."""
    try:
        seconds = max(0, int((now - datetime.fromisoformat(since)).total_seconds()))
    except ValueError:
        return "?"
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


QUEUE_STATES = {
    "pending": ("queued", "failed", "parked"),
    "queued": ("queued",),
    "failed": ("failed",),
    "parked": ("parked",),
    "refused": ("refused",),
    "done": ("done",),
    "all": ("queued", "failed", "parked", "refused", "done"),
}


async def _queue_listing(
    config: Config, destination: str | None, state: str, limit: int
) -> dict[str, Any] | tuple[str, int]:
    """The jobs to list as a JSON-able object; or why there are none to list, with the exit code."""
    from dicomledger.forwarding import ForwardQueue

    fw = config.forwarding
    if fw is None:
        return "no [forwarding] section in the config: this gateway forwards nothing", 2
    if destination is not None and fw.destination(destination) is None:
        known = ", ".join(d.ae_title for d in fw.destinations) or "none"
        return f"{destination!r} is not a [[destinations]] AE title (known: {known})", 2
    if not fw.queue.exists():
        return f"no forward queue at {fw.queue} yet: the gateway has not run with forwarding", 1
    queue = await ForwardQueue.open(fw.queue)
    try:
        counts = await queue.shown_counts()
        jobs = await queue.listed(QUEUE_STATES[state], destination, limit + 1)
    finally:
        await queue.close()
    now = datetime.now(UTC)
    titles = [destination] if destination else [d.ae_title for d in fw.destinations]
    return {
        "destinations": {
            t: {s: counts.get((t, s), 0) for s in ("queued", "failed", "parked", "done", "refused")}
            for t in titles
        },
        "jobs": [
            {
                "job": j.id,
                "destination": j.destination,
                "state": j.state,
                "attempts": j.attempts,
                "age": _age(j.created_at, now),
                "queued_at": j.created_at,
                "next_attempt": datetime.fromtimestamp(j.next_attempt, UTC).isoformat(
                    timespec="seconds"
                )
                if j.state == "failed"
                else None,
                "sop_instance_uid": j.sop_instance_uid,
                "last_error": j.last_error,
            }
            for j in jobs[:limit]
        ],
        "more": len(jobs) > limit,
    }


def queue_jobs(
    config: Config, destination: str | None, state: str, limit: int, as_json: bool
) -> int:
    """`dicomledger queue`: the forward queue's jobs (read from its database, running or not)."""
    listing = asyncio.run(_queue_listing(config, destination, state, limit))
    if isinstance(listing, tuple):
        problem, code = listing
        print(f"dicomledger: {problem}", file=sys.stderr)
        return code
    if as_json:
        print(json.dumps(listing, indent=2))
        return 0
    for title, n in listing["destinations"].items():
        print(f"{title}: " + ", ".join(f"{count} {s}" for s, count in n.items()))
    if not listing["jobs"]:
        print(f"no {state} jobs" if state != "all" else "no jobs")
    for j in listing["jobs"]:
        line = (
            f"  job {j['job']} to {j['destination']}: {j['state']}, {j['attempts']} attempts, "
            f"queued {j['age']} ago, {j['sop_instance_uid']}"
        )
        if j["next_attempt"]:
            line += f", next attempt {j['next_attempt']}"
        if j["last_error"]:
            line += f"; last error: {j['last_error']}"
        print(line)
    if listing["more"]:
        print(f"  (more: --limit N shows more than {limit})")
    return 0


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
    if config.peering is None:
        return ["no [peering] section: this gateway runs alone"]
    if not config.ledger.database.exists():
        return [f"no ledger database at {config.ledger.database} yet: the gateway has never run"]
    store = await LedgerStore.open(config.ledger.database)
    try:
        state = ConsortiumState(store)
        flagged = await state.flagged()
        own = await store.latest_checkpoint(config.ledger.origin)
        lines = []
        if config.ledger.origin in flagged:  # a peer's evidence against us, checked, reached us
            lines.append(
                f"{config.ledger.origin} (this gateway): FLAGGED: evidence that it signed two "
                "histories of its log is held (`peers --evidence` writes it out)"
            )
        own_sigs = parse_note(own[1]).signatures if own else ()
        for peer in config.peering.peers:
            status = await state.peer_status(peer.origin)
            known = await store.origin(peer.origin) is not None
            held = await store.size(peer.origin) if known else 0
            cp = await store.latest_checkpoint(peer.origin) if known else None
            reach = (
                "never contacted"
                if status is None
                else ("reachable" if status.reachable else "UNREACHABLE")
            )
            parts = [
                f"{peer.origin} at {peer.host}:{peer.port}: {reach}",
                f"last contact {status.last_contact}" if status and status.last_contact else "",
                f"we hold {held} entries of its newest checkpoint {cp[0] if cp else 'none'}",
                f"its own checkpoint size {status.their_size}"
                if status and status.their_size is not None
                else "",
                _cosigned(own, own_sigs, peer.origin),
                "FLAGGED: equivocation evidence held" if peer.origin in flagged else "not flagged",
                _consortium(await state.consortium_check(peer.origin)),
                await _cleared(state, peer.origin),
                f"last error: {status.error}" if status and status.error else "",
            ]
            lines.append("; ".join(p for p in parts if p))
        return lines
    finally:
        await store.close()


def _consortium(check: ConsortiumCheck | None) -> str:
    """Whether the peer holds our pseudonym secret and witness policy (exchanged at peering)."""
    if check is None:
        return "consortium settings not exchanged yet"
    if check.mismatch is not None:
        return f"REFUSED: {check.mismatch} (as of {check.checked_at})"
    return "same pseudonym secret and witness policy"


async def _cleared(state: ConsortiumState, origin: str) -> str:
    cleared = [e for e in await state.evidence_held(origin) if e.cleared_at is not None]
    if not cleared:
        return ""
    last = max(cleared, key=lambda e: e.cleared_at or "")
    return f"flag cleared at {last.cleared_at} (our entry {last.cleared_by_entry})"


async def _evidence(config: Config, origin: str) -> tuple[bytes, str] | str:
    """The evidence to export against ``origin`` (the oldest in force, else the oldest whose
    flag was cleared) and a line about it; or why there is none."""
    if not config.ledger.database.exists():
        return f"no ledger database at {config.ledger.database} yet: the gateway has never run"
    store = await LedgerStore.open(config.ledger.database)
    try:
        held = await ConsortiumState(store).evidence_held(origin)
    finally:
        await store.close()
    if not held:
        return f"no equivocation evidence against {origin} is held here"
    chosen = next((e for e in held if e.cleared_at is None), held[0])
    flag = "in force" if chosen.cleared_at is None else f"flag cleared at {chosen.cleared_at}"
    more = f"; {len(held) - 1} more held" if len(held) > 1 else ""
    return chosen.data, f"received {chosen.received_at}, {flag}{more}"


def export_evidence(config: Config, origin: str, output: Path) -> int:
    """`peers --evidence ORIGIN -o FILE`: the evidence file, as peers exchange it
    (docs/ledger-formats.md); `check-evidence` or any verifier checks it offline."""
    found = asyncio.run(_evidence(config, origin))
    if isinstance(found, str):
        print(f"dicomledger: {found}", file=sys.stderr)
        return 1
    data, about = found
    output.write_bytes(data)
    print(f"wrote the equivocation evidence against {origin} to {output} ({about})")
    print(
        f"check it offline: dicomledger check-evidence {output} --trust <file with {origin}'s verifier key>"
    )
    return 0


def peers(config: Config) -> int:
    for line in asyncio.run(_peers(config)):
        print(line)
    return 0
