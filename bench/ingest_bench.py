"""Ingest benchmark: the gateway against Orthanc, a bare pynetdicom SCP and DCMTK storescp, side by side.

    .venv/bin/python bench/ingest_bench.py [--quick] [--reps 3] [--keep] [--work-dir DIR]

One run generates the data once (MR, CT, two large multi-frame objects) and sends it with
the same DCMTK storescu to four receivers, each started fresh on 127.0.0.1 for every
measurement (the gateway answers a re-sent instance as a duplicate, so a receiver that has
seen the data would measure something else):

  gateway   `dicomledger init` + `dicomledger serve` (parse, hash, fsync, index, anchor)
  orthanc   Orthanc (Debian package), fresh config with its defaults: SQLite index and
            SyncStorageArea (every file fsynced), TCP_NODELAY=1: the durable receiver to beat
  bare      bench/bare_scp.py: same pynetdicom settings, handler only renames the temp file
  storescp  DCMTK storescp +B (bit-preserving: streams to the file), -pdu 131072

Every receiver's files stay on disk until the run ends (on this VM's ext4, creating files
soon after deleting many is slow and would penalise whoever runs next); only the multi-frame
copies are deleted between measurements.

Every measurement is repeated (--reps, default 3) with the receivers in rotating order and
the median is reported. Before each timed send the receiver gets a small warm-up set and
the sender's files are read once (this VM drops idle page cache). Also measured: per-C-STORE
round trip from a pynetdicom SCU (gateway vs bare, alternating file by file), peak RSS of the
receiver's process tree while it receives the multi-frame objects, and 4 concurrent senders.
Prints one table at the end. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
from benchlib import (  # bench/ is sys.path[0] when run as a script
    DCMTK_ENV,
    HOST,
    ROOT,
    Orthanc,
    close_association,
    dicomledger_cli,
    end_process,
    free_port,
    machine_facts,
    mark,
    nodelay,
    percentile,
    run_in_work_dir,
    spawn,
)

sys.path.insert(0, str(ROOT))
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402
from pynetdicom import AE, _config, evt  # noqa: E402
from pynetdicom.association import Association  # noqa: E402

from tests.dicomdata import CT_IMAGE, MR_IMAGE, make_ct_series, make_mr_series, make_multiframe  # noqa: E402

SENDER_AE = "STORESCU"  # storescu's calling AE
LATENCY_AE = "BENCHSCU"  # the pynetdicom SCU's calling AE
LATENCY_RECEIVERS = ("gateway", "orthanc", "bare")
MB = 1_000_000
RSS_INTERVAL = 0.05

# Targets (same run, medians)
TARGET_ORTHANC_RATIO = 1.0  # gateway / Orthanc, MR and CT, 1 and 4 senders
TARGET_BARE_RATIO = 1.5  # gateway / bare pynetdicom
TARGET_MF_MB_S = 200  # gateway, 1 GB multi-frame objects
TARGET_PEAK_RSS_MB = 400


# --- processes: every child is tracked and ended by its id -----------------------------

# setpriv (util-linux) execs the command with a parent-death signal: children get SIGTERM
# even if the benchmark itself is killed with SIGKILL.


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


class RssSampler:
    """Peak RSS of a process tree, sampled every RSS_INTERVAL seconds in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(self.pid))
            if self._stop.wait(RSS_INTERVAL):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))


# --- data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSet:
    key: str
    label: str
    files: tuple[Path, ...]

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


@dataclass(frozen=True)
class Sizes:
    mr: int
    ct: int
    mf_frames: int  # per multi-frame object (512 x 512 x 16 bit = 0.5 MB a frame)
    warm_mr: int = 30
    warm_ct: int = 5


FULL = Sizes(mr=2000, ct=400, mf_frames=2000)
QUICK = Sizes(mr=300, ct=60, mf_frames=200)


def generate(data_dir: Path, sizes: Sizes) -> tuple[DataSet, DataSet, DataSet, DataSet]:
    mr = make_mr_series(data_dir / "mr", sizes.mr, seed="bench")
    ct = make_ct_series(data_dir / "ct", sizes.ct, seed="bench")
    mf = [
        make_multiframe(
            data_dir / "mf", sizes.mf_frames, 512, 512, seed=f"bench-{k}", filename=f"mf{k}.dcm"
        )
        for k in (1, 2)
    ]
    warm = [
        *make_mr_series(data_dir / "warm", sizes.warm_mr, seed="warmup"),
        *make_ct_series(data_dir / "warm", sizes.warm_ct, seed="warmup"),
    ]
    mf_mb = mf[0].stat().st_size / MB
    return (
        DataSet("MR", f"MR {sizes.mr} x 64x64", tuple(mr)),
        DataSet("CT", f"CT {sizes.ct} x 512x512", tuple(ct)),
        DataSet("MF", f"MF 2 x {sizes.mf_frames} fr ({mf_mb:,.0f} MB)", tuple(mf)),
        DataSet("warm", "warm-up", tuple(warm)),
    )


def prefetch(files: Sequence[Path]) -> None:
    """Read the sender's files once so every receiver gets them from the page cache."""
    buf = bytearray(8 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# --- receivers -------------------------------------------------------------------------


class ReceiverError(RuntimeError):
    pass


@dataclass
class Server:
    """One running receiver process."""

    kind: str
    ae_title: str
    port: int
    proc: subprocess.Popen[bytes]
    stored_dir: Path
    log: Path
    orthanc: Orthanc | None = None
    scraper: Scraper | None = None

    def stored(self) -> int:
        """Instances stored: Orthanc's own count; else every regular file under stored_dir
        except temp files."""
        if self.orthanc is not None:
            return self.orthanc.count_instances()
        count = 0
        for _, dirs, files in os.walk(self.stored_dir):
            dirs[:] = [d for d in dirs if d != "tmp"]
            count += len(files)
        return count

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.scraper is not None:
            self.scraper.stop()
        end_process(self.proc)


RECEIVERS = ("gateway", "orthanc", "bare", "storescp")
LABELS = {
    "gateway": "gateway",
    "orthanc": "Orthanc",
    "bare": "bare pynetdicom",
    "storescp": "DCMTK storescp",
}


def dicomledger(*args: str, log: Path) -> None:
    result = dicomledger_cli(*args)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise ReceiverError(
            f"dicomledger {args[0]} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )


def storescp_options(concurrent: bool) -> list[str]:
    # +B: bit-preserving, the dataset is streamed to the file as received (no re-encoding, no
    # whole object in memory); largest PDU it allows; no reverse DNS. --fork: one process per
    # association, needed to receive 4 senders at once (single-process serves one at a time).
    return ["+B", "-pdu", "131072", "-dhl", *(["--fork"] if concurrent else [])]


class Scraper:
    """Scrapes a gateway's /metrics every ``interval`` seconds in a thread, as Prometheus
    would (its default is 15 s; we scrape more often, so the cost shows if there is one)."""

    def __init__(self, port: int, interval: float = 1.0) -> None:
        self.url = f"http://{HOST}:{port}/metrics"
        self.interval = interval
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import urllib.request

        while not self._stop.wait(self.interval):
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url, timeout=5) as answer,
            ):
                answer.read()
                self.scrapes += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def start_receiver(kind: str, run_dir: Path, *, concurrent: bool = False) -> Server:
    run_dir.mkdir(parents=True)
    port = free_port()
    log = run_dir / f"{kind}.log"
    if kind in ("gateway", "gateway+metrics"):
        gw = run_dir / "gw"
        dicomledger(
            "init",
            "--dir",
            str(gw),
            "--ae-title",
            "DICOMLEDGER",
            "--host",
            HOST,
            "--port",
            str(port),
            "--allow",
            SENDER_AE,
            "--allow",
            LATENCY_AE,
            "--origin",
            "bench.test/dicomledger",
            log=run_dir / "init.log",
        )
        metrics_port = free_port()
        if kind == "gateway+metrics":
            with open(gw / "config.toml", "a") as f:
                f.write(f'\n[metrics]\nenabled = true\nhost = "{HOST}"\nport = {metrics_port}\n')
        proc = spawn(
            [sys.executable, "-m", "dicomledger.cli", "serve", "--config", str(gw / "config.toml")],
            log=log,
        )
        server = Server(kind, "DICOMLEDGER", port, proc, gw / "data" / "images", log)
        marker = b'"gateway started"'
    elif kind == "bare":
        out = run_dir / "out"
        proc = spawn(
            [
                sys.executable,
                str(ROOT / "bench" / "bare_scp.py"),
                "--host",
                HOST,
                "--port",
                str(port),
                "--ae-title",
                "BARESCP",
                "--output-dir",
                str(out),
                "--allow",
                SENDER_AE,
                "--allow",
                LATENCY_AE,
            ],
            log=log,
        )
        server = Server(kind, "BARESCP", port, proc, out, log)
        marker = b"ready"
    elif kind == "orthanc":
        orthanc = Orthanc(run_dir / "orthanc")
        orthanc.start()
        server = Server(
            kind,
            orthanc.ae_title,
            orthanc.port,
            orthanc.proc,
            orthanc.dir / "storage",  # type: ignore[arg-type]
            orthanc.log_path,
            orthanc,
        )
        marker = b""
    elif kind == "storescp":
        out = run_dir / "out"
        out.mkdir()
        proc = spawn(
            [
                "storescp",
                *storescp_options(concurrent),
                "-aet",
                "STORESCP",
                "-od",
                str(out),
                str(port),
            ],
            log=log,
            env=DCMTK_ENV,
        )
        server = Server(kind, "STORESCP", port, proc, out, log)
        marker = b""  # it says nothing; the C-ECHO tells
    else:
        raise ValueError(kind)
    try:
        wait_ready(server, marker)
    except BaseException:
        server.stop()
        raise
    if kind == "gateway+metrics":
        server.scraper = Scraper(metrics_port)
    return server


def wait_ready(server: Server, marker: bytes, timeout: float = 60.0) -> None:
    """Until `marker` is in the receiver's log and it answers a C-ECHO."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ReceiverError(
                f"{server.kind} exited at start ({server.proc.returncode}):\n{server.log_tail()}"
            )
        if marker in server.log.read_bytes() and echo(server):
            return
        time.sleep(0.05)
    raise ReceiverError(f"{server.kind} not ready after {timeout:.0f} s:\n{server.log_tail()}")


def echo(server: Server) -> bool:
    result = subprocess.run(
        ["echoscu", "-to", "2", "-aet", SENDER_AE, "-aec", server.ae_title, HOST, str(server.port)],
        capture_output=True,
        env=DCMTK_ENV,
        timeout=30,
    )
    return result.returncode == 0


@contextlib.contextmanager
def receiver(
    kind: str, run_dir: Path, *, concurrent: bool = False, delete: bool = False
) -> Iterator[Server]:
    """A fresh receiver in ``run_dir`` (which must not exist); its files are kept unless ``delete``."""
    server = start_receiver(kind, run_dir, concurrent=concurrent)
    try:
        yield server
    finally:
        server.stop()
        if delete:
            shutil.rmtree(run_dir, ignore_errors=True)
        os.sync()  # no write-back of this run's files during the next measurement


# --- measurements ----------------------------------------------------------------------


def storescu(server: Server, files: Sequence[Path], senders: int, log_dir: Path) -> float:
    """Send `files` split over `senders` concurrent storescu runs (one association each);
    returns the wall time from the first start to the last exit."""
    per = -(-len(files) // senders)
    chunks = [files[i : i + per] for i in range(0, len(files), per)]
    before = server.stored()
    started = time.perf_counter()
    procs = [
        spawn(
            [
                "storescu",
                "-aet",
                SENDER_AE,
                "-aec",
                server.ae_title,
                HOST,
                str(server.port),
                *map(str, chunk),
            ],
            log=log_dir / f"storescu-{k}.log",
            env=DCMTK_ENV,
        )
        for k, chunk in enumerate(chunks)
    ]
    try:
        for proc in procs:
            proc.wait()
    finally:
        for proc in procs:
            end_process(proc)
    wall = time.perf_counter() - started
    failed = [k for k, p in enumerate(procs) if p.returncode != 0]
    stored = server.stored() - before
    if failed or stored != len(files):
        tail = (log_dir / f"storescu-{failed[0] if failed else 0}.log").read_text(errors="replace")[
            -2000:
        ]
        raise ReceiverError(
            f"{server.kind}: storescu exit codes {[p.returncode for p in procs]}, "
            f"{stored} of {len(files)} instances stored\nstorescu: {tail}\n{server.kind}: {server.log_tail()}"
        )
    return wall


def gateway_handler_ms(log: Path, skip: int) -> list[float]:
    """duration_ms of the gateway's own c-store log lines (parse+hash+store+index+anchor)."""
    found: list[float] = []
    for line in log.read_text(errors="replace").splitlines():
        if '"c-store"' in line:
            with contextlib.suppress(ValueError, KeyError):
                found.append(float(json.loads(line)["duration_ms"]))
    return found[skip:]


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    data: DataSet
    senders: int

    @property
    def concurrent(self) -> bool:
        return self.senders > 1


@dataclass
class Sample:
    wall: float
    peak_rss: int | None
    handler_ms: list[float] = field(default_factory=list)


def measure(kind: str, scenario: Scenario, warm: DataSet, work: Path, rep: int) -> Sample:
    run_dir = work / "run" / f"{scenario.key}-{rep}-{kind}"
    big = scenario.data.key == "MF"
    with receiver(kind, run_dir / "srv", concurrent=scenario.concurrent, delete=big) as server:
        storescu(server, warm.files, 1, run_dir)
        prefetch(scenario.data.files)
        if scenario.data.key == "MF":
            with RssSampler(server.proc.pid) as rss:
                wall = storescu(server, scenario.data.files, scenario.senders, run_dir)
            peak: int | None = rss.peak
        else:
            wall = storescu(server, scenario.data.files, scenario.senders, run_dir)
            peak = None
        handler = (
            gateway_handler_ms(server.log, len(warm.files)) if kind.startswith("gateway") else []
        )
    return Sample(wall, peak, handler)


def latency_round(files: Sequence[Path], warm: DataSet, run_dir: Path) -> dict[str, list[float]]:
    """One fresh gateway, Orthanc and bare SCP; send each file to each (rotating who goes
    first) over one association each; returns the send_c_store round trips in ms."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream from the file: no SCU-side re-encoding
    ae = AE(ae_title=LATENCY_AE)
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    ae.add_requested_context(MR_IMAGE, ExplicitVRLittleEndian)
    times: dict[str, list[float]] = {kind: [] for kind in LATENCY_RECEIVERS}
    with contextlib.ExitStack() as stack:
        assocs: dict[str, Association] = {}
        for kind in times:
            server = stack.enter_context(receiver(kind, run_dir / kind))
            assoc = ae.associate(
                HOST,
                server.port,
                ae_title=server.ae_title,
                evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)],
            )  # no Nagle wait per PDU
            if not assoc.is_established:
                raise ReceiverError(
                    f"{kind}: association from {LATENCY_AE} refused:\n{server.log_tail()}"
                )
            stack.callback(close_association, assoc)
            assocs[kind] = assoc
        for path in warm.files:
            for kind in assocs:
                _store(assocs[kind], path, kind)
        prefetch(files)
        for i, path in enumerate(files):
            k = i % len(LATENCY_RECEIVERS)
            for kind in LATENCY_RECEIVERS[k:] + LATENCY_RECEIVERS[:k]:
                started = time.perf_counter()
                _store(assocs[kind], path, kind)
                times[kind].append((time.perf_counter() - started) * 1000)
    return times


def _store(assoc: Association, path: Path, kind: str) -> None:
    status = assoc.send_c_store(path)
    if getattr(status, "Status", None) != 0x0000:
        raise ReceiverError(f"{kind}: C-STORE of {path.name} answered {status!r}")


# --- report ----------------------------------------------------------------------------


def num(value: float) -> str:
    """7 characters wide; decimals only where they matter."""
    return f"{value:>7,.0f}" if value >= 100 else f"{value:>7.1f}"


def fmt_ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"


def report(
    args: argparse.Namespace,
    scenarios: Sequence[Scenario],
    results: dict[tuple[str, str], list[Sample]],
    latency: dict[str, list[float]],
    latency_rounds: int,
    elapsed: float,
) -> str:
    lines: list[str] = []
    add = lines.append
    mode = "quick" if args.quick else "full"
    add("")
    add(
        f"dicomledger ingest benchmark ({mode}; median of {args.reps} runs per cell, receivers in rotating "
        f"order; {elapsed / 60:.1f} min)"
    )
    add(machine_facts())
    add(
        "sender: DCMTK storescu (TCP_NODELAY=1), all files of a set in one association per sender; wall time "
        "of the storescu run(s). MB = 10^6 bytes"
    )
    add(
        "receivers: gateway = dicomledger serve (fresh init per run); bare = bench/bare_scp.py (pynetdicom, "
        "rename only);"
    )
    add(f"           storescp {' '.join(storescp_options(False))} (with --fork for the x4 rows)")
    add("")
    head = f"{'throughput (median)':<32}" + "".join(f"{LABELS[k]:>28}" for k in RECEIVERS)
    add(f"{head}{'gw/orth':>9}{'gw/bare':>9}{'gw/scp':>8}  targets")
    for sc in scenarios:
        n, nbytes = len(sc.data.files), sc.data.nbytes
        med = {k: statistics.median(s.wall for s in results[(sc.key, k)]) for k in RECEIVERS}
        cells = "".join(
            f"  {num(n / med[k])} img/s {num(nbytes / MB / med[k])} MB/s" for k in RECEIVERS
        )
        ratio = {k: med[k] / med["gateway"] for k in RECEIVERS}
        target = ""
        if sc.data.key in ("MR", "CT"):
            target = (
                f"gw/orthanc >= {TARGET_ORTHANC_RATIO}: {mark(ratio['orthanc'] >= TARGET_ORTHANC_RATIO)}, "
                f"gw/bare >= {TARGET_BARE_RATIO}: {mark(ratio['bare'] >= TARGET_BARE_RATIO)}"
            )
        elif sc.data.key == "MF":
            mb_s = nbytes / MB / med["gateway"]
            target = f"gateway >= {TARGET_MF_MB_S} MB/s: {mark(mb_s >= TARGET_MF_MB_S)}"
        add(
            f"{sc.label:<32}{cells}{ratio['orthanc']:>9.2f}{ratio['bare']:>9.2f}{ratio['storescp']:>8.2f}  {target}"
        )
    add("")
    mf = next(sc for sc in scenarios if sc.data.key == "MF")
    add(
        f"peak RSS of the receiver's process tree while receiving {mf.data.label} (sampled every "
        f"{RSS_INTERVAL * 1000:.0f} ms, max over runs):"
    )
    for k in RECEIVERS:
        peak = max(s.peak_rss or 0 for s in results[(mf.key, k)]) / MB
        target = (
            f"   target < {TARGET_PEAK_RSS_MB} MB: {mark(peak < TARGET_PEAK_RSS_MB)}"
            if k == "gateway"
            else ""
        )
        add(f"  {LABELS[k]:<18}{peak:>8,.0f} MB{target}")
    add("")
    n_files = len(latency["gateway"]) // latency_rounds
    add(
        f"C-STORE round trip, pynetdicom SCU ({LATENCY_AE}), {n_files} CT files x {latency_rounds} rounds, one at a "
        "time, receivers in rotating order:"
    )
    add(f"  {'':<8}" + "".join(f"{LABELS[k]:>18}" for k in LATENCY_RECEIVERS))
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        values = {k: percentile(latency[k], q) for k in LATENCY_RECEIVERS}
        target = ""
        if q == 0.5:
            target = f"   target gateway <= Orthanc: {mark(values['gateway'] <= values['orthanc'])}"
        add(
            f"  {name + ' ms':<8}"
            + "".join(f"{values[k]:>18.2f}" for k in LATENCY_RECEIVERS)
            + target
        )
    add("")
    per_image = ", ".join(
        f"{sc.key} {fmt_ms([v for s in results[(sc.key, 'gateway')] for v in s.handler_ms])} ms"
        for sc in scenarios
    )
    add(
        f"gateway handler time per C-STORE from its log (parse+hash+fsync+index+anchor, p50): {per_image}"
    )
    add("")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"small sets: {QUICK}")
    parser.add_argument(
        "--reps", type=int, default=3, help="runs per receiver and set (median reported)"
    )
    parser.add_argument(
        "--latency-rounds", type=int, default=3, help="fresh gateway+bare pairs for latency"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="parent of the temporary work dir"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (data and logs)")
    parser.add_argument(
        "--metrics-cost",
        action="store_true",
        help="only the gateway, with the metrics endpoint off and on (scraped every second), "
        "alternating: the cost of metrics on ingest throughput",
    )
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} (DCMTK) is not installed")
    if args.reps < 1 or args.latency_rounds < 1:
        parser.error("--reps and --latency-rounds must be at least 1")

    sizes = QUICK if args.quick else FULL
    if args.metrics_cost:
        return run_in_work_dir(
            "metrics-bench-", args.work_dir, args.keep, lambda work: metrics_cost(args, sizes, work)
        )
    return run_in_work_dir(
        "ingest-bench-", args.work_dir, args.keep, lambda work: run(args, sizes, work)
    )


def run(args: argparse.Namespace, sizes: Sizes, work: Path) -> int:
    began = time.perf_counter()
    print(f"work dir {work}; generating data ...", flush=True)
    mr, ct, mf, warm = generate(work / "data", sizes)
    scenarios = [
        Scenario("MR", mr.label, mr, 1),
        Scenario("CT", ct.label, ct, 1),
        Scenario("MF", mf.label, mf, 1),
        Scenario("MRx4", f"{mr.label}, 4 senders", mr, 4),
        Scenario("CTx4", f"{ct.label}, 4 senders", ct, 4),
    ]
    print(
        f"generated in {time.perf_counter() - began:.0f} s: "
        + ", ".join(f"{d.label} = {d.nbytes / MB:,.0f} MB" for d in (mr, ct, mf)),
        flush=True,
    )

    # Warm-up: every receiver once, untimed
    for kind in RECEIVERS:
        with receiver(kind, work / "run" / f"warm-{kind}" / "srv") as server:
            storescu(server, warm.files, 1, work / "run" / f"warm-{kind}")
            storescu(
                server, ct.files[: max(1, len(ct.files) // 4)], 1, work / "run" / f"warm-{kind}"
            )

    results: dict[tuple[str, str], list[Sample]] = {}
    for sc in scenarios:
        for rep in range(args.reps):
            k = rep % len(RECEIVERS)
            for kind in RECEIVERS[k:] + RECEIVERS[:k]:
                sample = measure(kind, sc, warm, work, rep)
                results.setdefault((sc.key, kind), []).append(sample)
                rss = f", peak RSS {sample.peak_rss / MB:,.0f} MB" if sample.peak_rss else ""
                print(
                    f"  {sc.label:<30} run {rep + 1} {kind:<9} {num(len(sc.data.files) / sample.wall)} img/s "
                    f"{num(sc.data.nbytes / MB / sample.wall)} MB/s ({sample.wall:.2f} s){rss}",
                    flush=True,
                )

    latency: dict[str, list[float]] = {kind: [] for kind in LATENCY_RECEIVERS}
    for r in range(args.latency_rounds):
        got = latency_round(ct.files, warm, work / f"latency-{r}")
        for kind, values in got.items():
            latency[kind] += values
        print(
            f"  latency round {r + 1}: p50 "
            + ", ".join(
                f"{kind} {percentile(got[kind], 0.5):.2f} ms" for kind in LATENCY_RECEIVERS
            ),
            flush=True,
        )

    print(
        report(args, scenarios, results, latency, args.latency_rounds, time.perf_counter() - began)
    )
    return 0


def metrics_cost(args: argparse.Namespace, sizes: Sizes, work: Path) -> int:
    """Gateway throughput with metrics off and on, MR and CT, receivers alternating; medians."""
    began = time.perf_counter()
    mr, ct, _, warm = generate(work / "data", replace(sizes, mf_frames=1))
    kinds = ("gateway", "gateway+metrics")
    for kind in kinds:
        with receiver(kind, work / "run" / f"warm-{kind}" / "srv") as server:
            storescu(server, warm.files, 1, work / "run" / f"warm-{kind}")
    reps = max(args.reps, 3)
    scenarios = [
        Scenario("MR", mr.label, mr, 1),
        Scenario("CT", ct.label, ct, 1),
        Scenario("MRx4", f"{mr.label}, 4 senders", mr, 4),
    ]
    walls: dict[tuple[str, str], list[float]] = {}
    for sc in scenarios:
        for rep in range(reps):
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                sample = measure(kind, sc, warm, work, rep)
                walls.setdefault((sc.key, kind), []).append(sample.wall)
                print(
                    f"  {sc.label:<30} run {rep + 1} {kind:<16} {num(len(sc.data.files) / sample.wall)} img/s "
                    f"({sample.wall:.2f} s)",
                    flush=True,
                )
    print(
        f"\nmetrics cost on ingest (median of {reps} runs each, alternating; metrics on = [metrics] enabled "
        f"and /metrics scraped every second; {(time.perf_counter() - began) / 60:.1f} min)"
    )
    print(machine_facts())
    print(f"{'':<32}{'metrics off':>16}{'metrics on':>16}{'cost':>9}  target < 2%")
    for sc in scenarios:
        off, on = (len(sc.data.files) / statistics.median(walls[(sc.key, k)]) for k in kinds)
        cost = (off - on) / off * 100
        print(
            f"{sc.label:<32}{num(off):>10} img/s{num(on):>10} img/s{cost:>8.1f}%  {mark(cost < 2)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
