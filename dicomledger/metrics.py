"""The operations endpoint: Prometheus ``/metrics``, ``/healthz`` and ``/readyz`` on a local
HTTP listener (aiohttp) of its own, never the DICOM port.

The C-STORE path only adds to plain numbers on the event loop (``IngestMetrics``: no lock,
no object per image beyond the ints Python makes anyway). Everything else is read when a
scraper asks: the DICOM server's association counts, the ledger writer's size and the kinds
it committed, the peers' status and the forward queue's counts from their databases. So an
unscraped gateway pays for nothing but the C-STORE counters (bench/ingest_bench.py
--metrics-cost measures it).
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from dicomledger.config import MetricsConfig
from dicomledger.ledger.entries import RETRIEVE_REFUSED, RETRIEVED, TAMPER_ALARM

if TYPE_CHECKING:
    from dicomledger.gateway import Gateway

log = structlog.get_logger("dicomledger.metrics")

# C-STORE duration (receipt of the last fragment to the answer): seconds
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ASSOCIATION_OUTCOMES = ("released", "aborted", "aborted_by_peer", "connection_lost", "refused")


class IngestMetrics:
    """What the C-STORE path counts; written on the event loop only."""

    __slots__ = ("by_status", "buckets", "latency_sum", "bytes_received", "commitments")

    def __init__(self) -> None:
        self.by_status: dict[int, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above every bound (+Inf)
        self.latency_sum = 0.0
        self.bytes_received = 0
        self.commitments: dict[str, int] = {}  # Storage Commitment instances by result

    def stored(self, status: int, seconds: float, size: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        if size > 0:
            self.bytes_received += size

    def committed(self, result: str, count: int) -> None:
        if count:
            self.commitments[result] = self.commitments.get(result, 0) + count


@dataclass
class Snapshot:
    """What a scrape reads from databases (async), before the collector runs (sync)."""

    peers: list[tuple[str, int | None, bool, bool]] = field(
        default_factory=list
    )  # origin, lag, reachable, flagged
    forward_jobs: dict[tuple[str, str], int] = field(
        default_factory=dict
    )  # (destination, state) -> jobs


class GatewayCollector(Collector):
    def __init__(self, gateway: Gateway, ingest: IngestMetrics) -> None:
        self.gateway = gateway
        self.ingest = ingest
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Metric]:
        gw, ingest = self.gateway, self.ingest
        server = gw.server
        yield GaugeMetricFamily(
            "dicomledger_associations_open",
            "DICOM associations established now",
            value=server.associations if server is not None else 0,
        )
        outcomes = CounterMetricFamily(
            "dicomledger_associations", "DICOM associations ended, by outcome", labels=["outcome"]
        )
        for outcome in ASSOCIATION_OUTCOMES:
            outcomes.add_metric([outcome], server.outcomes[outcome] if server is not None else 0)
        yield outcomes
        stores = CounterMetricFamily(
            "dicomledger_c_store", "C-STORE requests answered, by status", labels=["status"]
        )
        for status, n in sorted(ingest.by_status.items()):
            stores.add_metric([f"0x{status:04X}"], n)
        yield stores
        cumulative, buckets = 0, []
        for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), ingest.buckets, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "dicomledger_c_store_duration_seconds",
            "C-STORE handling time: data set received to status decided (parse, hash, "
            "fsync, index, anchor)",
            buckets=buckets,
            sum_value=ingest.latency_sum,
        )
        yield CounterMetricFamily(
            "dicomledger_received_bytes",
            "bytes of received C-STORE data sets",
            value=ingest.bytes_received,
        )
        commitments = CounterMetricFamily(
            "dicomledger_storage_commitment_instances",
            "instances answered in Storage Commitment reports, by result",
            labels=["result"],
        )
        for result in ("committed", "failed"):
            commitments.add_metric([result], ingest.commitments.get(result, 0))
        yield commitments

        writer = gw.writer
        kinds = writer.appended_kinds if writer is not None else {}
        yield GaugeMetricFamily(
            "dicomledger_ledger_entries",
            "entries in this gateway's own log",
            value=writer.size if writer is not None else 0,
        )
        yield GaugeMetricFamily(
            "dicomledger_ledger_unsigned_entries",
            "entries of the own log not yet covered by a signed checkpoint",
            value=gw.unsigned_entries(),
        )
        yield GaugeMetricFamily(
            "dicomledger_checkpoint_age_seconds",
            "seconds since this gateway last signed a checkpoint (since start if none yet)",
            value=gw.checkpoint_age(),
        )
        yield CounterMetricFamily(
            "dicomledger_tamper_alarms",
            "tamper-alarm entries appended by this process",
            value=kinds.get(TAMPER_ALARM, 0),
        )
        retrievals = CounterMetricFamily(
            "dicomledger_retrievals",
            "C-MOVE/C-GET retrieval entries appended by this process, by outcome",
            labels=["outcome"],
        )
        retrievals.add_metric(["retrieved"], kinds.get(RETRIEVED, 0))
        retrievals.add_metric(["refused"], kinds.get(RETRIEVE_REFUSED, 0))
        yield retrievals

        snap = self.snapshot
        lag = GaugeMetricFamily(
            "dicomledger_peer_lag_entries",
            "entries of a peer's newest known checkpoint this gateway does not hold yet",
            labels=["peer"],
        )
        reachable = GaugeMetricFamily(
            "dicomledger_peer_reachable",
            "1 if the last contact with the peer worked",
            labels=["peer"],
        )
        flagged = GaugeMetricFamily(
            "dicomledger_peer_flagged", "1 if the peer is flagged for equivocation", labels=["peer"]
        )
        for origin, behind, up, flag in snap.peers:
            if behind is not None:
                lag.add_metric([origin], behind)
            reachable.add_metric([origin], int(up))
            flagged.add_metric([origin], int(flag))
        yield from (lag, reachable, flagged)
        jobs = GaugeMetricFamily(
            "dicomledger_forward_jobs",
            "forward queue jobs by destination and state (queued is the depth)",
            labels=["destination", "state"],
        )
        for (destination, state), n in sorted(snap.forward_jobs.items()):
            jobs.add_metric([destination, state], n)
        yield jobs


async def take_snapshot(gw: Gateway) -> Snapshot:
    snap = Snapshot()
    if gw.peers is not None and gw.ledger is not None:
        flagged = await gw.peers.state.flagged()
        for origin in sorted(gw.peers.peers):
            status = await gw.peers.state.peer_status(origin)
            held = await gw.ledger.size(origin)
            behind = None
            if status is not None and status.their_size is not None:
                behind = max(0, status.their_size - held)
            snap.peers.append(
                (origin, behind, bool(status and status.reachable), origin in flagged)
            )
    if gw.forwarder is not None:
        counts = await gw.forwarder.queue.shown_counts()
        destinations = [d.ae_title for d in gw.forwarder.config.destinations]
        for destination in destinations:  # every configured destination shows its depth, even at 0
            for state in ("queued", "failed", "parked"):
                counts.setdefault((destination, state), 0)
        snap.forward_jobs = counts
    return snap


def readiness(gw: Gateway, config: MetricsConfig) -> dict[str, Any]:
    """The checks of /readyz: each a bool, and why one fails."""
    checks: dict[str, Any] = {}
    server, writer = gw.server, gw.writer
    checks["dicom_listening"] = server is not None and server.listening
    database = gw.config.ledger.database
    checks["ledger_writable"] = (
        writer is not None
        and writer.running
        and os.access(database, os.W_OK)
        and os.access(database.parent, os.W_OK)
    )
    age, unsigned = gw.checkpoint_age(), gw.unsigned_entries()
    checks["checkpoint_fresh"] = unsigned == 0 or age <= config.checkpoint_stale_after
    if not checks["checkpoint_fresh"]:
        checks["checkpoint_problem"] = (
            f"{unsigned} entries unsigned for {age:.0f} s "
            f"(more than {config.checkpoint_stale_after:g} s)"
        )
    return checks


class MetricsServer:
    def __init__(self, config: MetricsConfig, gateway: Gateway, ingest: IngestMetrics) -> None:
        self.config = config
        self.gateway = gateway
        self.collector = GatewayCollector(gateway, ingest)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        ProcessCollector(
            registry=self.registry
        )  # process_cpu_seconds_total, resident memory, open fds
        self._runner: web.AppRunner | None = None
        self.port = config.port
        self.started = time.monotonic()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        sockets = getattr(
            site._server, "sockets", None
        )  # asyncio.Server (aiohttp types it abstractly)
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info(
            "metrics endpoint listening",
            address=f"{self.config.host}:{self.port}",
            paths=["/metrics", "/healthz", "/readyz"],
        )

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            self.collector.snapshot = await take_snapshot(self.gateway)
        except Exception as exc:  # a database busy or gone: serve the rest, say why once per scrape
            log.warning(
                "metrics: peer and queue figures not read", error=f"{type(exc).__name__}: {exc}"
            )
            self.collector.snapshot = Snapshot()
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "alive", "uptime_seconds": round(time.monotonic() - self.started, 1)}
        )

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = readiness(self.gateway, self.config)
        ready = all(v for k, v in checks.items() if k != "checkpoint_problem")
        return web.json_response(
            {"status": "ready" if ready else "not ready", **checks}, status=200 if ready else 503
        )
