"""Forwarding benchmark: gateway -> DCMTK storescp throughput, and revoke enforcement across gateways.

    .venv/bin/python bench/forward_bench.py [--quick] [--images 500] [--reps 3] [--revokes 20] [--keep]

1. Throughput. One gateway (`dicomledger init` + serve) with [forwarding] to destination
   PACS (DCMTK `storescp -aet PACS -od DIR`, TCP_NODELAY=1) and a grant for the test patient.
   Per rep, N MR images of the patient are sent to the gateway while storescp is DOWN, so
   all N wait in the forward queue; then storescp is started (fresh output dir) and the time
   from its spawn to the gateway's N-th "forwarded" log line is taken. The forwarder backs
   off a down destination, so the bench sets retry_initial/retry_max small (printed) and
   max_attempts high (no job is parked while the destination is down).
   Baseline: a bare pynetdicom SCU (one association, TCP_NODELAY on its socket as in
   dicomledger/dicom/scu.py, files sent chunked from disk) sending the same N source files
   to a fresh storescp; timed from the storescp spawn to the release (connect retried).
   Median of --reps; ratio gateway / bare, target >= 0.9.
2. Revoke enforcement. 5 gateways (all each other's peers, shared pseudonym secret,
   checkpoint/gossip intervals at the config defaults, printed); only B forwards (to a
   storescp PACS). One image of the patient goes to A first (A is the custodian), then B
   must hold A's entries. Per rep: `grant --to PACS` on A; probe B (one MR image of the
   patient every ~100 ms) until B logs "forwarded"; `revoke --to PACS` on A, t0 = when that
   command returned; probe B every ~100 ms until B refuses. Enforcement time = log timestamp
   of B's first refusal after t0 (the refused probe's "c-store" line, whose route decision
   is made before the C-STORE's Success; or a "forward refused" line if a queued probe was
   stopped by the worker) minus t0. p50/p99/max, target p99 < 2 s.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import (  # bench/ is sys.path[0] when run as a script
    DCMTK_ENV,
    HOST,
    ROOT,
    BenchError,
    Gateway,
    close_association,
    end_process,
    free_port,
    init_gateways,
    log_lines,
    machine_facts,
    mark,
    nodelay,
    parse_time,
    percentile,
    run_in_work_dir,
    spawn,
    start_all,
    stop_all,
    wait_for,
)

sys.path.insert(0, str(ROOT))
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402
from pynetdicom import AE, _config, evt  # noqa: E402
from pynetdicom.association import Association  # noqa: E402

from tests.dicomdata import MR_IMAGE, fake_patient, make_mr_series  # noqa: E402

SENDER_AE = "STORESCU"  # storescu's and the probe SCU's calling AE
BASELINE_AE = "BENCHSCU"
PACS_AE = "PACS"

# forwarding settings for the bench (printed): a short backoff so that the retry pause
# after the destination comes up does not dominate; no parking while it is down
RETRY_INITIAL = 0.05
RETRY_MAX = 0.1
MAX_ATTEMPTS = 1_000_000
PROBE_INTERVAL = 0.1

# Targets from the issue
TARGET_RATIO = 0.9
TARGET_P99_S = 2.0


def count_in_log(path: Path, needle: bytes, offset: int = 0) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().count(needle)


# --- gateways and storescp ------------------------------------------------------------


def add_forwarding(gw: Gateway, pacs_port: int) -> None:
    """[forwarding] with the bench's retry settings, destination PACS and a route for MR."""
    with open(gw.config_path, "a") as f:
        f.write(
            f"\n[forwarding]\nretry_initial = {RETRY_INITIAL}\nretry_max = {RETRY_MAX}\n"
            f"max_attempts = {MAX_ATTEMPTS}\n"
            f'\n[[destinations]]\nae_title = "{PACS_AE}"\naddress = "{HOST}:{pacs_port}"\n'
            f'\n[[routes]]\nto = ["{PACS_AE}"]\nmodality = "MR"\n'
        )


def start_storescp(port: int, out: Path, log: Path) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    return spawn(["storescp", "-aet", PACS_AE, "-od", str(out), str(port)], log=log, env=DCMTK_ENV)


def storescu(gw: Gateway, files: Sequence[Path], log: Path) -> None:
    with open(log, "ab") as out:
        result = subprocess.run(
            ["storescu", "-aet", SENDER_AE, "-aec", gw.name, HOST, str(gw.port), *map(str, files)],
            stdout=out, stderr=subprocess.STDOUT, env=DCMTK_ENV, timeout=600,
        )
    if result.returncode != 0:
        raise BenchError(f"storescu to {gw.name} failed ({result.returncode}); see {log}")


# --- pynetdicom SCU -------------------------------------------------------------------


def make_ae(ae_title: str) -> AE:
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream from the file, as the gateway's StoreSCU
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(MR_IMAGE, ExplicitVRLittleEndian)
    return ae


def associate(ae: AE, port: int, ae_title: str) -> Association:
    return ae.associate(HOST, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])


def store(assoc: Association, path: Path) -> None:
    status = assoc.send_c_store(path)
    if getattr(status, "Status", None) != 0x0000:
        state = "aborted" if assoc.is_aborted else "released" if assoc.is_released else "established"
        raise BenchError(f"C-STORE of {path.name} answered {status!r} (association {state})")


# --- 1. throughput ----------------------------------------------------------------------


def stored_files(out: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(out))


def baseline_run(ae: AE, files: Sequence[Path], run_dir: Path) -> tuple[float, float]:
    """Fresh storescp; seconds from its spawn until one association sent all files, and
    from the end of the first C-STORE to the end of the last."""
    port = free_port()
    out = run_dir / "pacs"
    started = time.perf_counter()
    proc = start_storescp(port, out, run_dir / "storescp.log")
    try:
        deadline = time.monotonic() + 30
        while True:
            assoc = associate(ae, port, PACS_AE)
            if assoc.is_established:
                break
            if time.monotonic() > deadline:
                raise BenchError("storescp did not accept the baseline association")
            time.sleep(0.01)
        try:
            first = 0.0
            for k, path in enumerate(files):
                store(assoc, path)
                if k == 0:
                    first = time.perf_counter()
        finally:
            close_association(assoc)
        wall = time.perf_counter() - started
        steady = time.perf_counter() - first
    finally:
        end_process(proc)
    got = stored_files(out)
    shutil.rmtree(out, ignore_errors=True)
    if got != len(files):
        raise BenchError(f"baseline: storescp holds {got} of {len(files)} files")
    return wall, steady


def gateway_run(gw: Gateway, pacs_port: int, files: Sequence[Path], run_dir: Path) -> tuple[float, float]:
    """Queue ``files`` at ``gw`` while PACS is down, start storescp, time to the N-th "forwarded"."""
    n = len(files)
    before = gw.log_size()
    storescu(gw, files, run_dir / "storescu.log")
    queued = sum(
        1 for r in log_lines(gw.log_path, before)
        if r.get("event") == "c-store" and f"{PACS_AE}: queued" in str(r.get("outcome"))
    )
    if queued != n:
        raise BenchError(f"gateway queued {queued} of {n} images for {PACS_AE}:\n{gw.log_tail()}")
    if count_in_log(gw.log_path, b'"forwarded"', before):
        raise BenchError("gateway forwarded while the destination was down?")
    offset = gw.log_size()
    out = run_dir / "pacs"
    t_start = time.time()
    proc = start_storescp(pacs_port, out, run_dir / "storescp.log")
    try:
        wait_for(lambda: count_in_log(gw.log_path, b'"forwarded"', offset) >= n, 300,
                 f"{n} forwarded log lines", poll=0.02)
        times = [parse_time(r["timestamp"]) for r in log_lines(gw.log_path, offset) if r.get("event") == "forwarded"]
        wall, steady = times[n - 1] - t_start, times[n - 1] - times[0]
        wait_for(lambda: stored_files(out) >= n, 30, f"storescp to hold {n} files")
    finally:
        end_process(proc)
    got = stored_files(out)
    shutil.rmtree(out, ignore_errors=True)
    if got != n:
        raise BenchError(f"gateway: storescp holds {got} of {n} files")
    return wall, steady


Walls = dict[str, list[tuple[float, float]]]  # sender -> [(wall, steady)]


def measure_throughput(work: Path, n: int, reps: int) -> Walls:
    tdir = work / "throughput"
    (tdir / "run").mkdir(parents=True)
    patient = fake_patient("forward-bench")
    gw = Gateway(tdir / "gw", "GATEWAY", allow=(SENDER_AE,))
    init_gateways([gw])
    pacs_port = free_port()
    add_forwarding(gw, pacs_port)
    start_all([gw])
    ae = make_ae(BASELINE_AE)
    walls: Walls = {"gateway": [], "bare": []}
    try:
        gw.cli("grant", "--patient-id", patient.patient_id, "--to", PACS_AE)
        # untimed warm-up of both paths (imports, page cache, first association)
        warm = make_mr_series(tdir / "data" / "warm", 20, seed="fb-warm", patient=patient)
        gateway_run(gw, pacs_port, warm, tdir / "run")
        baseline_run(ae, warm, tdir / "run")
        for rep in range(reps):
            files = make_mr_series(tdir / "data" / f"rep{rep}", n, seed=f"fb-rep{rep}", patient=patient)
            order = ("gateway", "bare") if rep % 2 == 0 else ("bare", "gateway")
            for kind in order:
                if kind == "gateway":
                    wall, steady = gateway_run(gw, pacs_port, files, tdir / "run")
                else:
                    wall, steady = baseline_run(ae, files, tdir / "run")
                walls[kind].append((wall, steady))
                print(f"  throughput rep {rep + 1} {kind:<8} {n / wall:7.0f} img/s ({wall:.2f} s for {n}); "
                      f"first -> last image {(n - 1) / steady:7.0f} img/s", flush=True)
    finally:
        stop_all([gw])
    return walls


# --- 2. revoke enforcement -----------------------------------------------------------------


class Prober:
    """Sends B one fresh MR image of the patient per call, over one reused association."""

    def __init__(self, gw: Gateway, patient: Any, data_dir: Path) -> None:
        self.gw = gw
        self.patient = patient
        self.data_dir = data_dir
        self.ae = make_ae(SENDER_AE)
        self.assoc: Association | None = None
        self.count = 0

    def send(self) -> None:
        self.count += 1
        path = make_mr_series(self.data_dir / f"p{self.count}", 1, seed=f"probe-{self.count}", patient=self.patient)[0]
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = associate(self.ae, self.gw.port, self.gw.name)
            if not self.assoc.is_established:
                raise BenchError(f"{self.gw.name} refused the probe association:\n{self.gw.log_tail()}")
        store(self.assoc, path)
        shutil.rmtree(path.parent, ignore_errors=True)

    def close(self) -> None:
        if self.assoc is not None:
            close_association(self.assoc)
            self.assoc = None


def probe_until(prober: Prober, found: Any, timeout: float, what: str) -> Any:
    """Probe every PROBE_INTERVAL s until found() returns something; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        next_at = time.monotonic() + PROBE_INTERVAL
        prober.send()
        result = found()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}:\n{prober.gw.log_tail()}")
        time.sleep(max(0.0, next_at - time.monotonic()))


def first_forwarded(gw: Gateway, offset: int) -> float | None:
    for r in log_lines(gw.log_path, offset):
        if r.get("event") == "forwarded":
            return parse_time(r["timestamp"])
    return None


def first_refusal(gw: Gateway, offset: int) -> float | None:
    for r in log_lines(gw.log_path, offset):
        event = r.get("event")
        if event == "c-store" and f"{PACS_AE}: refused" in str(r.get("outcome")):
            return parse_time(r["timestamp"])
        if event == "forward refused":
            return parse_time(r["timestamp"])
    return None


def measure_revokes(work: Path, n_gateways: int, reps: int) -> tuple[list[float], list[int], dict[str, str]]:
    rdir = work / "revoke"
    rdir.mkdir()
    secret = rdir / "consortium.secret"
    secret.write_text("ab" * 32)
    gateways = [
        Gateway(rdir / f"GW{chr(ord('A') + i)}", f"GW{chr(ord('A') + i)}", secret=secret, allow=(SENDER_AE,))
        for i in range(n_gateways)
    ]
    init_gateways(gateways)
    for gw in gateways:
        for other in gateways:
            if other is not gw:
                gw.add_peer(other)
    a, b = gateways[0], gateways[1]
    pacs_port = free_port()
    add_forwarding(b, pacs_port)
    cfg = b.config_path.read_text()
    intervals = {
        key: next((ln.split("=", 1)[1].strip() for ln in cfg.splitlines() if ln.strip().startswith(key)), "default")
        for key in ("checkpoint_interval", "gossip_interval")
    }
    patient = fake_patient("revoke-bench")
    pacs = start_storescp(pacs_port, rdir / "pacs", rdir / "storescp.log")
    start_all(gateways)
    prober = Prober(b, patient, rdir / "probes")
    times: list[float] = []
    probes: list[int] = []
    try:
        storescu(a, make_mr_series(rdir / "a", 1, seed="custodian", patient=patient), rdir / "storescu.log")
        wait_for(lambda: b.holds(a.origin) >= a.holds(a.origin) > 0, 60, "B to hold A's anchor")
        for rep in range(reps):
            offset = b.log_size()
            a.cli("grant", "--patient-id", patient.patient_id, "--to", PACS_AE, "--force")  # B's destination
            probe_until(prober, lambda offset=offset: first_forwarded(b, offset), 60, "B to forward after the grant")
            offset = b.log_size()
            a.cli("revoke", "--patient-id", patient.patient_id, "--to", PACS_AE)
            t0 = time.time()
            sent_before = prober.count
            refused_at = probe_until(prober, lambda offset=offset: first_refusal(b, offset), 60,
                                     "B to refuse after the revoke")
            times.append(refused_at - t0)
            probes.append(prober.count - sent_before)
            print(f"  revoke rep {rep + 1}: enforced at B after {refused_at - t0:.3f} s "
                  f"({prober.count - sent_before} probes)", flush=True)
    finally:
        prober.close()
        stop_all(gateways)
        end_process(pacs)
    return times, probes, intervals


# --- report ----------------------------------------------------------------------------


def report(args: argparse.Namespace, n: int, walls: Walls,
           times: list[float], probes: list[int], intervals: dict[str, str], elapsed: float) -> str:
    lines = [""]
    add = lines.append
    add(f"dicomledger forwarding benchmark ({'quick' if args.quick else 'full'}; {elapsed / 60:.1f} min)")
    add(machine_facts())
    add(f"forwarding config: retry_initial = {RETRY_INITIAL}, retry_max = {RETRY_MAX}, max_attempts = {MAX_ATTEMPTS}, "
        "concurrency = 1; destination storescp -aet PACS -od DIR (TCP_NODELAY=1)")
    add("")
    if walls["gateway"]:
        g, bare = (statistics.median(w for w, _ in walls[k]) for k in ("gateway", "bare"))
        gs, bs = (statistics.median(s for _, s in walls[k]) for k in ("gateway", "bare"))
        ratio, steady_ratio = bare / g, bs / gs
        add(f"throughput, {n} MR 64x64 images, median of {len(walls['gateway'])}; wall = storescp spawn -> "
            "last image stored; steady = first -> last image:")
        add(f"  {'':<36}{'wall':>23}{'steady':>14}")
        add(f"  {'gateway forward queue -> storescp':<36}{n / g:>8.0f} img/s ({g:.2f} s){(n - 1) / gs:>8.0f} img/s")
        add(f"  {'bare pynetdicom SCU -> storescp':<36}{n / bare:>8.0f} img/s ({bare:.2f} s){(n - 1) / bs:>8.0f} img/s")
        add(f"  {'ratio gateway / bare':<36}{ratio:>23.2f}{steady_ratio:>14.2f}   target (wall) >= {TARGET_RATIO}: "
            f"{mark(ratio >= TARGET_RATIO)}")
        add("")
    if times:
        p99 = percentile(times, 0.99)
        add(f"revoke at A -> enforced at B, {args.gateways} gateways, {len(times)} revokes, "
            f"checkpoint_interval {intervals['checkpoint_interval']}, gossip_interval {intervals['gossip_interval']}, "
            f"probe every {PROBE_INTERVAL * 1000:.0f} ms:")
        add(f"  p50 {percentile(times, 0.5):.3f} s   p99 {p99:.3f} s   max {max(times):.3f} s   "
            f"min {min(times):.3f} s   target p99 < {TARGET_P99_S:g} s: {mark(p99 < TARGET_P99_S)}")
        add(f"  probes per revoke: median {statistics.median(probes):.0f}, max {max(probes)}")
        add("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 images, 5 revokes")
    parser.add_argument("--images", type=int, default=None, help="images per throughput run (default 500; quick 100)")
    parser.add_argument("--reps", type=int, default=3, help="throughput runs per sender (median reported)")
    parser.add_argument("--revokes", type=int, default=None, help="revoke reps (default 20; quick 5)")
    parser.add_argument("--gateways", type=int, default=5, help="gateways in the revoke consortium (>= 2)")
    parser.add_argument("--skip", choices=("throughput", "revoke"), default=None, help="skip one part")
    parser.add_argument("--work-dir", type=Path, default=None, help="parent of the temporary work dir")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (data and logs)")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} (DCMTK) is not installed")
    n = args.images or (100 if args.quick else 500)
    revokes = args.revokes or (5 if args.quick else 20)
    if args.reps < 1 or n < 1 or revokes < 1 or args.gateways < 2:
        parser.error("--reps, --images, --revokes must be >= 1, --gateways >= 2")

    return run_in_work_dir("forward-bench-", args.work_dir, args.keep, lambda work: run(args, n, revokes, work))


def run(args: argparse.Namespace, n: int, revokes: int, work: Path) -> int:
    began = time.perf_counter()
    print(f"work dir {work}", flush=True)
    walls: Walls = {"gateway": [], "bare": []}
    times: list[float] = []
    probes: list[int] = []
    intervals: dict[str, str] = {}
    if args.skip != "throughput":
        walls = measure_throughput(work, n, args.reps)
    if args.skip != "revoke":
        times, probes, intervals = measure_revokes(work, args.gateways, revokes)
    print(report(args, n, walls, times, probes, intervals, time.perf_counter() - began))
    return 0


if __name__ == "__main__":
    sys.exit(main())
