"""Gossip benchmark: replication between 10 gateways on loopback, with the default intervals.

    .venv/bin/python bench/gossip_bench.py [--quick] [--gateways 10] [--reps 3] [--keep] [--work-dir DIR]

Every gateway is a real `dicomledger serve` process (fresh `dicomledger init` into a temp
dir, all listed as each other's [[peers]], config as `init` writes it: checkpoint_interval,
gossip_interval, fanout and heartbeat_interval are left at their defaults and printed).

1. Propagation. A pynetdicom SCU per origin holds one association to each of two origins
   and sends small MR images at a steady random (Poisson) rate; each stored image appends
   one image-anchored entry. Once every peer holds everything (plus a short quiet period)
   all gateways are stopped. For entry i of origin O, appended at entry.time_ms (read from
   O's ledger.db), its arrival at peer P is the timestamp of the first "replicated" line in
   P's log with origin O and size > i; delay(i) = max over the N-1 peers of arrival -
   append. A few warm-up images per origin (sent before the timed window, while the peers
   open their TLS connections) are not counted.
2. Bytes. The "peer API traffic" lines every gateway logs at shutdown (JSON payload bytes of
   the peer API; HTTP headers and TLS framing not counted): the sum of bytes_sent over all
   gateways / (entries appended x (N-1) peers). An idle consortium's traffic (same gateways,
   no appends) is measured first, so the share that is per-entry and the share that is
   background gossip can be told apart.
3. Catch-up, --reps times: gateway J is stopped (or stays stopped) while 10,000 entries are
   appended to origin O's log directly with the library (LedgerStore + LogWriter, O's own
   key, O stopped meanwhile; synthetic image-anchored entries shaped like O's real ones).
   O is started, the running peers pull the entries, then J is started; catch-up time = J's
   "gateway started" log timestamp -> the "replicated" line where J's copy of O reaches
   the full size (process start -> full also printed). Each rep uses another (J, O).

Prints one table at the end with the targets next to the figures: append -> on all peers
p99 < 2 s, catch-up of 10,000 entries < 5 s. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import re
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (  # bench/ is sys.path[0] when run as a script
    HOST,
    ROOT,
    BenchError,
    Gateway,
    close_association,
    init_gateways,
    log_lines,
    machine_facts,
    mark,
    parse_time,
    percentile,
    run_in_work_dir,
    start_all,
    stop_all,
    wait_for,
)

sys.path.insert(0, str(ROOT))
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402
from pynetdicom import AE, _config  # noqa: E402

from dicomledger.config import Config  # noqa: E402
from dicomledger.ledger.entries import CONFIG, IMAGE_ANCHORED, decode_entry  # noqa: E402
from dicomledger.ledger.identity import Identity, load_key_file  # noqa: E402
from dicomledger.ledger.log import LedgerStore, LogWriter  # noqa: E402
from tests.dicomdata import MR_IMAGE, make_mr_series  # noqa: E402

SENDER_AE = "BENCHSCU"

# Targets from the issue
TARGET_P99_S = 2.0
TARGET_CATCHUP_S = 5.0


@dataclass(frozen=True)
class Plan:
    senders: int  # origins receiving images
    images: int  # per sending origin, timed
    seconds: float  # over which each origin's images are spread
    warmup: int  # per sending origin, before the timed window, not counted
    idle_seconds: float  # idle consortium for the traffic baseline
    catchup_entries: int
    reps: int


FULL = Plan(
    senders=2, images=150, seconds=60.0, warmup=3, idle_seconds=30.0, catchup_entries=10_000, reps=3
)
QUICK = Plan(
    senders=2, images=30, seconds=15.0, warmup=2, idle_seconds=0.0, catchup_entries=10_000, reps=1
)


# --- gateways --------------------------------------------------------------------------


def create_consortium(work: Path, n: int) -> list[Gateway]:
    secret = work / "consortium.secret"
    secret.write_text("ab" * 32)
    names = [f"GW{chr(ord('A') + i)}" for i in range(n)]
    gateways = [Gateway(work / name, name, secret=secret, allow=(SENDER_AE,)) for name in names]
    init_gateways(gateways)
    for gw in gateways:
        for other in gateways:
            if other is not gw:
                gw.add_peer(other)
    return gateways


def cpu_of(gateways: Sequence[Gateway]) -> tuple[float, float]:
    """(CPU seconds used by all the gateways so far, monotonic time now)."""
    return sum(gw.cpu_seconds() for gw in gateways), time.monotonic()


def cpu_share(before: tuple[float, float], after: tuple[float, float]) -> float:
    """CPU used between two cpu_of() snapshots, in cores (1.0 = one core busy)."""
    return (after[0] - before[0]) / max(1e-9, after[1] - before[1])


def all_hold(gateways: Sequence[Gateway], origin_sizes: dict[str, int]) -> bool:
    return all(gw.holds(origin) >= size for gw in gateways for origin, size in origin_sizes.items())


# --- sending images --------------------------------------------------------------------


def send_paced(
    gw: Gateway, files: Sequence[Path], offsets: Sequence[float], t0: float, errors: list[str]
) -> None:
    """One association to ``gw``; file k is sent at monotonic time t0 + offsets[k] (or as soon
    as the previous one is done, if that is later)."""
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(MR_IMAGE, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, gw.port, ae_title=gw.name)
    if not assoc.is_established:
        errors.append(f"{gw.name}: association refused")
        return
    try:
        for path, offset in zip(files, offsets, strict=True):
            delay = t0 + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            status = assoc.send_c_store(path)
            if getattr(status, "Status", None) != 0x0000:
                errors.append(f"{gw.name}: C-STORE of {path.name} answered {status!r}")
                return
    finally:
        close_association(assoc)


def send_all(jobs: Sequence[tuple[Gateway, Sequence[Path], Sequence[float]]]) -> None:
    """Run the paced senders in parallel threads, one per origin; BenchError if any failed."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream from the file: no SCU-side re-encoding
    errors: list[str] = []
    t0 = time.monotonic() + 0.2
    threads = [
        threading.Thread(target=send_paced, args=(gw, files, offsets, t0, errors), daemon=True)
        for gw, files, offsets in jobs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise BenchError("sending failed: " + "; ".join(errors))


def poisson_offsets(n: int, seconds: float, seed: str) -> list[float]:
    """n arrival times in [0, seconds): a Poisson process of rate n/seconds, rescaled so the
    last one lands just before ``seconds`` (the run length does not depend on luck)."""
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(n + 1):
        t += rng.expovariate(1.0)
        times.append(t)
    return [x / times[-1] * seconds for x in times[:n]]


# --- measurements ----------------------------------------------------------------------


@dataclass
class Propagation:
    entries: int = 0  # measured (warm-up excluded)
    appended: int = 0  # all entries of the sending origins (warm-up included)
    all_peers: list[float] = field(default_factory=list)  # seconds, one per entry
    first_peer: list[float] = field(default_factory=list)
    pairs: list[float] = field(default_factory=list)  # one per (entry, peer)
    last_via_relay: int = 0  # entries whose last copy came from a peer other than the origin
    pulls: int = 0  # "replicated" lines for the sending origins
    missing: list[str] = field(default_factory=list)
    entry_bytes: list[int] = field(default_factory=list)


def replicated_by_peer(
    gateways: Sequence[Gateway], origins: set[str]
) -> dict[tuple[str, str], list[tuple[int, float, str]]]:
    """(peer, origin) -> [(new size, time, source)] from each "replicated" line, log order."""
    found: dict[tuple[str, str], list[tuple[int, float, str]]] = collections.defaultdict(list)
    for gw in gateways:
        for rec in log_lines(gw.log_path):
            if rec.get("event") == "replicated" and rec.get("origin") in origins:
                found[(gw.origin, rec["origin"])].append(
                    (int(rec["size"]), parse_time(rec["timestamp"]), rec["source"])
                )
    return found


def measure_propagation(
    gateways: Sequence[Gateway], senders: Sequence[Gateway], skip: int
) -> Propagation:
    result = Propagation()
    pulls = replicated_by_peer(gateways, {o.origin for o in senders})
    for origin in senders:
        raw = origin.own_entries()
        entries = [decode_entry(data) for data in raw]
        result.appended += len(entries)
        result.entry_bytes += [len(data) for data in raw]
        peers = [gw for gw in gateways if gw is not origin]
        for entry in entries[skip:]:
            appended = entry.time_ms / 1000
            arrivals: list[tuple[float, str]] = []
            for peer in peers:
                hit = next(
                    (
                        (t, src)
                        for size, t, src in pulls[(peer.origin, origin.origin)]
                        if size > entry.index
                    ),
                    None,
                )
                if hit is None:
                    result.missing.append(f"{peer.name} lacks {origin.name} entry {entry.index}")
                    continue
                arrivals.append(hit)
            if len(arrivals) != len(peers):
                continue
            delays = [t - appended for t, _ in arrivals]
            result.entries += 1
            result.pairs += delays
            result.all_peers.append(max(delays))
            result.first_peer.append(min(delays))
            last_source = max(arrivals)[1]
            result.last_via_relay += last_source != origin.origin
        result.pulls += sum(len(pulls[(peer.origin, origin.origin)]) for peer in peers)
    return result


@dataclass
class Traffic:
    bytes_sent: int = 0
    bytes_received: int = 0
    requests_made: int = 0
    gateways: int = 0
    lifetime_s: float = 0.0  # summed over gateways: "peer API started" -> SIGTERM


def traffic_since(gateways: Sequence[Gateway], stopped_at: dict[str, float]) -> Traffic:
    """Sum of the "peer API traffic" lines each gateway logged since its last start."""
    total = Traffic()
    for gw in gateways:
        lines = [
            r for r in log_lines(gw.log_path, gw.log_offset) if r.get("event") == "peer API traffic"
        ]
        if not lines:
            raise BenchError(
                f"{gw.name} logged no 'peer API traffic' line at shutdown:\n{gw.log_tail()}"
            )
        rec = lines[-1]
        api = [
            r for r in log_lines(gw.log_path, gw.log_offset) if r.get("event") == "peer API started"
        ]
        up_at = parse_time(api[0]["timestamp"]) if api else gw.spawned_at
        total.bytes_sent += int(rec["bytes_sent"])
        total.bytes_received += int(rec["bytes_received"])
        total.requests_made += int(rec["requests_made"])
        total.gateways += 1
        total.lifetime_s += stopped_at[gw.name] - up_at
    return total


def stop_and_time(gateways: Sequence[Gateway]) -> dict[str, float]:
    stopped = time.time()
    stop_all(gateways)
    return {gw.name: stopped for gw in gateways}


# --- catch-up --------------------------------------------------------------------------


_HEX = re.compile(r"^[0-9a-f]+$")


def synthetic_payloads(template: dict[str, Any] | None, n: int, seed: str) -> list[dict[str, Any]]:
    """``n`` payloads shaped like ``template`` (a real anchor of the origin) with every hex
    string replaced by random hex of the same length, so each entry differs like real ones."""
    rng = random.Random(seed)
    if template is None:
        return [{"bench": "catch-up", "n": k} for k in range(n)]

    def vary(value: Any) -> Any:
        if isinstance(value, str) and len(value) >= 16 and _HEX.match(value):
            return f"{rng.getrandbits(4 * len(value)):0{len(value)}x}"
        if isinstance(value, dict):
            return {k: vary(v) for k, v in value.items()}
        return value

    return [vary(template) for _ in range(n)]


async def _append_entries(config: Config, kind: str, payloads: list[dict[str, Any]]) -> None:
    store = await LedgerStore.open(config.ledger.database)
    try:
        writer = LogWriter(
            store, Identity(config.ledger.origin, load_key_file(config.ledger.key_file))
        )
        await writer.start()
        try:
            keys = [
                (f"sha256:{p['sha256']}", f"instance:{p['instance']}")
                if kind == IMAGE_ANCHORED
                else ()
                for p in payloads
            ]
            await asyncio.gather(
                *(writer.append(kind, p, k) for p, k in zip(payloads, keys, strict=True))
            )
        finally:
            await writer.stop()
    finally:
        await store.close()


def anchor_template(gw: Gateway) -> dict[str, Any] | None:
    """The payload of the newest image-anchored entry of ``gw``'s own log, if any."""
    for data in reversed(gw.own_entries()):
        entry = decode_entry(data)
        if entry.kind == IMAGE_ANCHORED and {"sha256", "instance"} <= set(entry.payload):
            return dict(entry.payload)
    return None


def append_directly(origin: Gateway, n: int, seed: str, template: dict[str, Any] | None) -> int:
    """Append ``n`` entries shaped like ``template`` (config entries if None) to the stopped
    origin's own log; returns its new size."""
    assert not origin.running
    kind = IMAGE_ANCHORED if template is not None else CONFIG
    asyncio.run(_append_entries(origin.config, kind, synthetic_payloads(template, n, seed)))
    return origin.holds(origin.origin)


@dataclass
class CatchUp:
    joiner: str
    origin: str
    entries: int
    append_s: float  # library append of the entries at the stopped origin
    peers_s: float  # origin's "gateway started" -> every running peer holds them
    started_to_full_s: float  # J's "gateway started" -> J holds them
    spawn_to_full_s: float  # J's process start -> J holds them
    pulls: int  # J's "replicated" lines for the origin until full
    source: str
    kind: str  # of the appended entries
    entry_bytes: float  # their mean size


def catch_up_rep(
    gateways: Sequence[Gateway],
    joiner: Gateway,
    origin: Gateway,
    n: int,
    rep: int,
    template: dict[str, Any] | None,
) -> CatchUp:
    for gw in (joiner, origin):
        if gw.running:
            gw.stop()
    before = origin.holds(origin.origin)
    began = time.monotonic()
    size = append_directly(origin, n, f"catch-up-{rep}", template)
    append_s = time.monotonic() - began
    if size != before + n:
        raise BenchError(f"{origin.name} holds {size} entries after appending {n} to {before}")
    added = origin.own_entries()[before:]
    kind, entry_bytes = decode_entry(added[-1]).kind, statistics.mean(map(len, added))
    others = [gw for gw in gateways if gw is not joiner]
    start_all([gw for gw in others if not gw.running])
    wait_for(
        lambda: all(gw.holds(origin.origin) >= size for gw in others),
        300,
        f"the running peers to hold {size} entries of {origin.name}",
        poll=0.05,
    )
    origin_started = next(
        parse_time(r["timestamp"])
        for r in log_lines(origin.log_path, origin.log_offset)
        if r.get("event") == "gateway started"
    )
    peers_s = time.time() - origin_started
    time.sleep(1.0)  # let the peers' own follow-up traffic settle
    joiner.spawn()
    wait_for(
        lambda: joiner.started() and joiner.holds(origin.origin) >= size,
        120,
        f"{joiner.name} to catch up with {origin.name}",
        poll=0.05,
    )
    time.sleep(0.3)  # the "replicated" line is logged just after the commit
    started_at, full_at, pulls, source = None, None, 0, ""
    for rec in log_lines(joiner.log_path, joiner.log_offset):
        if rec.get("event") == "gateway started" and started_at is None:
            started_at = parse_time(rec["timestamp"])
        elif (
            rec.get("event") == "replicated"
            and rec.get("origin") == origin.origin
            and full_at is None
        ):
            pulls += 1
            if int(rec["size"]) >= size:
                full_at, source = parse_time(rec["timestamp"]), rec["source"]
    if started_at is None or full_at is None:
        raise BenchError(
            f"{joiner.name}'s log lacks 'gateway started' or the final 'replicated' line"
        )
    return CatchUp(
        joiner.name,
        origin.name,
        n,
        append_s,
        peers_s,
        full_at - started_at,
        full_at - joiner.spawned_at,
        pulls,
        source,
        kind,
        entry_bytes,
    )


# --- log problems ----------------------------------------------------------------------


def log_problems(gateways: Sequence[Gateway]) -> collections.Counter[str]:
    """Warnings and errors over all gateway logs, by level, event and reason."""
    found: collections.Counter[str] = collections.Counter()
    for gw in gateways:
        for rec in log_lines(gw.log_path):
            level = rec.get("level")
            if level in ("warning", "error", "critical"):
                reason = str(rec.get("reason") or rec.get("error") or "")
                reason = re.sub(r"\d+", "N", reason)[:110]  # sizes/indexes vary: group by shape
                found[f"{level}: {rec.get('event')}" + (f" ({reason})" if reason else "")] += 1
    return found


# --- report ----------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    plan: Plan,
    gateways: Sequence[Gateway],
    settings: str,
    prop: Propagation,
    traffic: Traffic,
    idle: Traffic | None,
    cpu: dict[str, float],
    catchups: Sequence[CatchUp],
    problems: collections.Counter[str],
    elapsed: float,
) -> str:
    n = len(gateways)
    lines: list[str] = []
    add = lines.append
    add("")
    add(
        f"dicomledger gossip benchmark ({'quick' if args.quick else 'full'}; {n} gateways on {HOST}; "
        f"{elapsed / 60:.1f} min)"
    )
    add(machine_facts())
    add(f"settings (dicomledger init defaults, unchanged): {settings}")
    add(
        f"load: {plan.senders} origins x {plan.images} MR images (64x64) each, Poisson arrivals over "
        f"{plan.seconds:.0f} s ({plan.senders * plan.images / plan.seconds:.1f} entries/s in total), "
        f"one pynetdicom association per origin; {plan.warmup} warm-up images per origin not counted"
    )
    add("")
    ms = [x * 1000 for x in prop.all_peers]
    first = [x * 1000 for x in prop.first_peer]
    pairs = [x * 1000 for x in prop.pairs]
    avg_entry = statistics.mean(prop.entry_bytes) if prop.entry_bytes else 0
    denominator = prop.appended * (n - 1)
    per_entry = traffic.bytes_sent / denominator if denominator else float("nan")
    rows: list[tuple[str, str, str, str]] = []
    if ms:
        p99 = percentile(ms, 0.99)
        rows.append(
            (
                f"append -> on all {n - 1} peers, p50 / p99 (ms)",
                f"{percentile(ms, 0.5):,.0f} / {p99:,.0f}",
                f"p99 < {TARGET_P99_S * 1000:,.0f}",
                mark(p99 < TARGET_P99_S * 1000 and not prop.missing),
            )
        )
        rows.append((f"append -> on all {n - 1} peers, max (ms)", f"{max(ms):,.0f}", "", ""))
        rows.append(
            (
                "append -> on the first peer, p50 / p99 (ms)",
                f"{percentile(first, 0.5):,.0f} / {percentile(first, 0.99):,.0f}",
                "",
                "",
            )
        )
        rows.append(
            (
                "append -> on one peer, all (entry, peer) pairs, p50 / p99 (ms)",
                f"{percentile(pairs, 0.5):,.0f} / {percentile(pairs, 0.99):,.0f}",
                "",
                "",
            )
        )
    rows.append(
        (
            "entries measured / peers missing an entry",
            f"{prop.entries:,} / {len(prop.missing)}",
            "0 missing",
            mark(not prop.missing),
        )
    )
    if catchups:
        med = statistics.median(c.started_to_full_s for c in catchups)
        label = f"median of {len(catchups)}" if len(catchups) > 1 else "1 run"
        rows.append(
            (
                f"catch-up of {catchups[0].entries:,} entries (s, {label})",
                f"{med:.2f}",
                f"< {TARGET_CATCHUP_S:g}",
                mark(med < TARGET_CATCHUP_S),
            )
        )
        rows.append(
            (
                "  same, from the joiner's process start (s)",
                f"{statistics.median(c.spawn_to_full_s for c in catchups):.2f}",
                "",
                "",
            )
        )
        rows.append(
            (
                f"  {n - 2} running peers at once, origin started -> all hold them (s)",
                f"{statistics.median(c.peers_s for c in catchups):.1f}",
                "",
                "",
            )
        )
    rows.append(("peer API bytes sent per entry per peer", f"{per_entry:,.0f}", "", ""))
    if idle is not None and idle.lifetime_s > 0:
        idle_rate = idle.bytes_sent / idle.lifetime_s  # per gateway-second
        background = idle_rate * traffic.lifetime_s
        rows.append(
            (
                "  of which idle background (gossip, heartbeats)",
                f"{background / denominator:,.0f}",
                "",
                "",
            )
        )
        rows.append(
            (
                "  of which due to the entries (total - idle background)",
                f"{(traffic.bytes_sent - background) / denominator:,.0f}",
                "",
                "",
            )
        )
    rows.append(
        ("  size of one entry (bytes, mean; base64 in the JSON: x4/3)", f"{avg_entry:,.0f}", "", "")
    )
    width = max(len(r[0]) for r in rows) + 2
    add(f"{'measure':<{width}}{'value':>15}   {'target':<12}")
    for name, value, target, verdict in rows:
        add(f"{name:<{width}}{value:>15}   {target:<12}{verdict}")
    add("")
    add("details:")
    add(
        f"  propagation: {prop.appended} entries appended ({prop.entries} measured), {prop.pulls} 'replicated' "
        f"pulls of them over {n - 1} peers each ({prop.pulls / max(1, prop.appended) / (n - 1):.2f} "
        f"pulls per entry per peer; < 1 = batched); last copy came from a relaying peer (not the origin) "
        f"for {prop.last_via_relay} of {prop.entries} entries"
    )
    if ms:
        hist = collections.Counter(min(int(x // 250), 12) for x in ms)
        add(
            "  append -> all peers histogram (ms): "
            + ", ".join(
                f"{k * 250}-{'' if k == 12 else (k + 1) * 250}: {hist[k]}" for k in sorted(hist)
            )
        )
    add(
        f"  peer API traffic, propagation run ({traffic.gateways} gateways, {traffic.lifetime_s / traffic.gateways:.0f} s "
        f"each): bytes sent {traffic.bytes_sent:,}, received {traffic.bytes_received:,}, "
        f"requests made {traffic.requests_made:,} (JSON payload bytes; HTTP headers and TLS framing not counted)"
    )
    if idle is not None and idle.lifetime_s > 0:
        add(
            f"  idle baseline ({idle.gateways} gateways, {idle.lifetime_s / idle.gateways:.0f} s each, no appends): "
            f"{idle.bytes_sent / idle.lifetime_s:,.0f} bytes/s sent per gateway, "
            f"{idle.requests_made / idle.lifetime_s:.1f} requests/s per gateway"
        )
    if cpu:
        add(
            f"  CPU of all {n} gateway processes together (1.0 = one core busy; the box has {os.cpu_count()}): "
            + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
            + " (the bench's own SCU threads and log polling not included)"
        )
    for k, c in enumerate(catchups, 1):
        add(
            f"  catch-up run {k}: {c.joiner} missing {c.entries:,} {c.kind} entries ({c.entry_bytes:,.0f} bytes "
            f"each) of {c.origin}: started -> full "
            f"{c.started_to_full_s:.2f} s, process start -> full {c.spawn_to_full_s:.2f} s, {c.pulls} pull(s) "
            f"(full copy from {c.source}); library append at the stopped origin {c.append_s:.1f} s; "
            f"the {n - 2} running peers held them {c.peers_s:.1f} s after the origin's 'gateway started'"
        )
    if prop.missing:
        add(
            f"  FAILURE: {len(prop.missing)} (peer, entry) pairs never replicated, e.g. "
            + "; ".join(prop.missing[:5])
        )
    total = sum(problems.values())
    add(f"  warnings/errors in the gateway logs (all phases): {total}" + (":" if total else ""))
    for text, count in problems.most_common(12):
        add(f"    {count:>6} x {text}")
    add("")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke run (~1 min): {QUICK}")
    parser.add_argument("--gateways", type=int, default=10, help="gateways in the consortium")
    parser.add_argument("--reps", type=int, default=None, help="catch-up runs (median reported)")
    parser.add_argument(
        "--catchup-entries", type=int, default=None, help="entries the joiner misses"
    )
    parser.add_argument("--no-idle", action="store_true", help="skip the idle traffic baseline")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="parent of the temporary work dir"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work dir (gateway dirs and logs)"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.reps is not None:
        plan = Plan(**{**vars(plan), "reps": args.reps})
    if args.catchup_entries is not None:
        plan = Plan(**{**vars(plan), "catchup_entries": args.catchup_entries})
    if args.no_idle:
        plan = Plan(**{**vars(plan), "idle_seconds": 0.0})
    if args.gateways < plan.senders + 2 or args.gateways < 2 * plan.reps + plan.senders:
        parser.error(
            f"--gateways must be at least {max(plan.senders + 2, 2 * plan.reps + plan.senders)}"
        )

    return run_in_work_dir(
        "gossip-bench-", args.work_dir, args.keep, lambda work: run(args, plan, work)
    )


def run(args: argparse.Namespace, plan: Plan, work: Path) -> int:
    began = time.perf_counter()
    gateways: list[Gateway] = []
    try:
        print(f"work dir {work}; creating {args.gateways} gateways ...", flush=True)
        gateways = create_consortium(work, args.gateways)
        cfg = gateways[0].config
        assert cfg.peering is not None
        settings = (
            f"checkpoint_interval {cfg.ledger.checkpoint_interval:g} s, gossip_interval "
            f"{cfg.peering.gossip_interval:g} s, fanout {cfg.peering.fanout}, heartbeat_interval "
            f"{cfg.peering.heartbeat_interval:g} s, {len(cfg.peering.peers)} peers each"
        )
        print(f"  {settings}", flush=True)
        senders = gateways[: plan.senders]
        data = {
            gw.name: make_mr_series(
                work / "data" / gw.name, plan.warmup + plan.images, seed=f"gossip-{gw.name}"
            )
            for gw in senders
        }

        idle: Traffic | None = None
        cpu: dict[str, float] = {}
        if plan.idle_seconds > 0:
            took = start_all(gateways)
            print(
                f"idle baseline: started in {took:.1f} s; idling {plan.idle_seconds:.0f} s ...",
                flush=True,
            )
            time.sleep(2.0)  # past the start-up work
            before = cpu_of(gateways)
            time.sleep(max(0.0, plan.idle_seconds - 2.0))
            cpu["idle"] = cpu_share(before, cpu_of(gateways))
            idle = traffic_since(gateways, stop_and_time(gateways))
            print(
                f"  {idle.bytes_sent / idle.lifetime_s:,.0f} bytes/s sent per gateway while idle",
                flush=True,
            )

        took = start_all(gateways)
        print(
            f"propagation: {len(gateways)} gateways started in {took:.1f} s; warm-up ...",
            flush=True,
        )
        send_all([(gw, data[gw.name][: plan.warmup], [0.0] * plan.warmup) for gw in senders])
        wait_for(
            lambda: all_hold(gateways, {gw.origin: plan.warmup for gw in senders}),
            60,
            "warm-up entries",
            poll=0.1,
        )
        print(
            f"  sending {plan.senders} x {plan.images} images over {plan.seconds:.0f} s ...",
            flush=True,
        )
        before = cpu_of(gateways)
        send_all(
            [
                (
                    gw,
                    data[gw.name][plan.warmup :],
                    poisson_offsets(plan.images, plan.seconds, gw.name),
                )
                for gw in senders
            ]
        )
        cpu["sending"] = cpu_share(before, cpu_of(gateways))
        expected = {gw.origin: plan.warmup + plan.images for gw in senders}
        waited = wait_for(
            lambda: all_hold(gateways, expected), 120, "every peer to hold every entry", poll=0.1
        )
        print(
            f"  all peers hold everything {waited:.1f} s after the last image; quiet 3 s, stopping",
            flush=True,
        )
        time.sleep(3.0)
        traffic = traffic_since(gateways, stop_and_time(gateways))
        prop = measure_propagation(gateways, senders, plan.warmup)
        if prop.all_peers:
            print(
                f"  append -> all peers p50 {percentile(prop.all_peers, 0.5) * 1000:,.0f} ms, "
                f"p99 {percentile(prop.all_peers, 0.99) * 1000:,.0f} ms over {prop.entries} entries",
                flush=True,
            )

        catchups: list[CatchUp] = []
        template = anchor_template(senders[0])  # entries shaped like the real anchors
        for rep in range(plan.reps):
            joiner, origin = gateways[-1 - rep], gateways[plan.senders + rep]
            print(
                f"catch-up run {rep + 1}/{plan.reps}: {joiner.name} misses {plan.catchup_entries:,} entries "
                f"of {origin.name} ...",
                flush=True,
            )
            c = catch_up_rep(gateways, joiner, origin, plan.catchup_entries, rep, template)
            catchups.append(c)
            print(
                f"  started -> full {c.started_to_full_s:.2f} s (process start -> full {c.spawn_to_full_s:.2f} s); "
                f"running peers took {c.peers_s:.1f} s",
                flush=True,
            )
        stop_all(gateways)

        problems = log_problems(gateways)
        print(
            report(
                args,
                plan,
                gateways,
                settings,
                prop,
                traffic,
                idle,
                cpu,
                catchups,
                problems,
                time.perf_counter() - began,
            )
        )
        return 1 if prop.missing else 0
    except BenchError as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
