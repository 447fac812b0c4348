"""Forwarding benchmark: gateway -> DCMTK storescp throughput, and revoke enforcement across gateways.

    .venv/bin/python bench/forward_bench.py [--quick] [--modality mr|ct] [--images 500] [--reps 3]
                                            [--revokes 20] [--skip throughput|revoke] [--keep]

1. Throughput. One gateway (`dicomledger init` + serve) with [forwarding] to destination
   PACS (DCMTK `storescp -aet PACS -od DIR`, TCP_NODELAY=1) and a grant for the test patient.
   Per rep, N MR images of the patient are sent to the gateway while storescp is DOWN, so
   all N wait in the forward queue; then storescp is started (fresh output dir) and the time
   from its spawn to the gateway's N-th "forwarded" log line is taken. The forwarder backs
   off a down destination, so the bench sets retry_initial/retry_max small (printed) and
   max_attempts high (no job is parked while the destination is down).
   Anchor: Orthanc (Debian package, fresh config, TCP_NODELAY=1) as a router: the same N
   files are uploaded to it first (storescu, untimed), then `POST /modalities/pacs/store`
   with "Synchronous": true sends the study to a fresh storescp; timed from the storescp
   spawn to the REST call's return. Baseline: a bare pynetdicom SCU (one association,
   TCP_NODELAY on its socket, files sent chunked from disk) sending the same N source files to
   a fresh storescp; timed from the storescp spawn to the release (connect retried). Median of
   --reps; targets gateway / Orthanc >= 1.0 and gateway / bare >= 2.
   --modality ct: CT 512x512 16-bit instead of MR 64x64.
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
    Orthanc,
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
import pydicom  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402
from pynetdicom import AE, _config, evt  # noqa: E402
from pynetdicom.association import Association  # noqa: E402

from tests.dicomdata import CT_IMAGE, MR_IMAGE, fake_patient, make_ct_series, make_mr_series  # noqa: E402

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
TARGET_RATIO = 2.0  # gateway / bare pynetdicom SCU
TARGET_ORTHANC = 1.0  # gateway / Orthanc as router
TARGET_P99_S = 2.0
SENDERS = ("gateway", "orthanc", "bare")
# pynetdicom 3.0's reactor race (a C-STORE response taken by the reactor thread, then a stall
# until the DIMSE timeout; see retrieve_bench.py): a bare run that hits it is repeated
BARE_DIMSE_TIMEOUT = 2
BARE_ATTEMPTS = 10
BARE_RACES = [0]


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
            f'\n[[routes]]\nto = ["{PACS_AE}"]\n'
        )


def start_storescp(port: int, out: Path, log: Path) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    return spawn(["storescp", "-aet", PACS_AE, "-od", str(out), str(port)], log=log, env=DCMTK_ENV)


def storescu(gw: Gateway, files: Sequence[Path], log: Path) -> None:
    with open(log, "ab") as out:
        result = subprocess.run(
            ["storescu", "-aet", SENDER_AE, "-aec", gw.name, HOST, str(gw.port), *map(str, files)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
            timeout=600,
        )
    if result.returncode != 0:
        raise BenchError(f"storescu to {gw.name} failed ({result.returncode}); see {log}")


# --- pynetdicom SCU -------------------------------------------------------------------


def make_ae(ae_title: str) -> AE:
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream from the file
    ae = AE(ae_title=ae_title)
    ae.dimse_timeout = BARE_DIMSE_TIMEOUT
    ae.add_requested_context(MR_IMAGE, ExplicitVRLittleEndian)
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    return ae


def associate(ae: AE, port: int, ae_title: str) -> Association:
    return ae.associate(HOST, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])


def store(assoc: Association, path: Path) -> None:
    status = assoc.send_c_store(path)
    if getattr(status, "Status", None) != 0x0000:
        state = (
            "aborted" if assoc.is_aborted else "released" if assoc.is_released else "established"
        )
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


def gateway_run(
    gw: Gateway, pacs_port: int, files: Sequence[Path], run_dir: Path
) -> tuple[float, float]:
    """Queue ``files`` at ``gw`` while PACS is down, start storescp, time to the N-th "forwarded"."""
    n = len(files)
    before = gw.log_size()
    storescu(gw, files, run_dir / "storescu.log")
    queued = sum(
        1
        for r in log_lines(gw.log_path, before)
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
        wait_for(
            lambda: forwarded_count(gw, offset) >= n, 300, f"{n} forwarded instances", poll=0.02
        )
        times = [
            parse_time(r["timestamp"])
            for r in log_lines(gw.log_path, offset)
            if r.get("event") == "forwarded"
        ]
        wall, steady = times[-1] - t_start, times[-1] - times[0]
        wait_for(lambda: stored_files(out) >= n, 30, f"storescp to hold {n} files")
    finally:
        end_process(proc)
    got = stored_files(out)
    shutil.rmtree(out, ignore_errors=True)
    if got != n:
        raise BenchError(f"gateway: storescp holds {got} of {n} files")
    return wall, steady


def forwarded_count(gw: Gateway, offset: int) -> int:
    """Instances forwarded since ``offset``: the worker logs one "forwarded" line per batch."""
    return sum(
        int(r.get("instances", 1))
        for r in log_lines(gw.log_path, offset)
        if r.get("event") == "forwarded"
    )


def orthanc_run(
    orthanc: Orthanc, pacs_port: int, files: Sequence[Path], run_dir: Path
) -> tuple[float, float]:
    """Orthanc as a router: upload ``files`` (untimed), then POST /modalities/pacs/store
    (synchronous) to a fresh storescp; seconds from the storescp spawn to the call's return."""
    n = len(files)
    with open(run_dir / "storescu-orthanc.log", "ab") as out:
        result = subprocess.run(
            [
                "storescu",
                "-aet",
                SENDER_AE,
                "-aec",
                orthanc.ae_title,
                HOST,
                str(orthanc.port),
                *map(str, files),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
            timeout=600,
        )
    if result.returncode != 0:
        raise BenchError(f"storescu into Orthanc failed ({result.returncode})")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    found = orthanc.rest(
        "POST", "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
    )
    if len(found) != 1:
        raise BenchError(
            f"Orthanc holds {len(found)} studies with UID {study_uid}:\n{orthanc.log_tail()}"
        )
    study_id = found[0]
    out_dir = run_dir / "pacs"
    started = time.perf_counter()
    proc = start_storescp(pacs_port, out_dir, run_dir / "storescp.log")
    try:
        wait_for(lambda: port_open(pacs_port), 30, "storescp to listen", poll=0.005)
        first = time.perf_counter()
        orthanc.rest(
            "POST", "/modalities/pacs/store", {"Resources": [study_id], "Synchronous": True}
        )
        wall = time.perf_counter() - started
        steady = time.perf_counter() - first
    finally:
        end_process(proc)
    got = stored_files(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    if got != n:
        raise BenchError(f"orthanc: storescp holds {got} of {n} files")
    return wall, steady


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == 0


Walls = dict[str, list[tuple[float, float]]]  # sender -> [(wall, steady)]


def make_series(directory: Path, modality: str, n: int, seed: str, patient: Any) -> list[Path]:
    if modality == "ct":
        return make_ct_series(directory, n, 512, 512, seed=seed, patient=patient)
    return make_mr_series(directory, n, seed=seed, patient=patient)


def measure_throughput(work: Path, n: int, reps: int, modality: str) -> Walls:
    tdir = work / "throughput"
    (tdir / "run").mkdir(parents=True)
    patient = fake_patient("forward-bench")
    gw = Gateway(tdir / "gw", "GATEWAY", allow=(SENDER_AE,))
    init_gateways([gw])
    pacs_port = free_port()
    add_forwarding(gw, pacs_port)
    start_all([gw])
    orthanc = (
        Orthanc(tdir / "orthanc", modalities={"pacs": (PACS_AE, pacs_port)})
        if Orthanc.available()
        else None
    )
    if orthanc is not None:
        orthanc.start()
    ae = make_ae(BASELINE_AE)
    walls: Walls = {k: [] for k in SENDERS}
    senders = [k for k in SENDERS if k != "orthanc" or orthanc is not None]

    def one(kind: str, files: list[Path]) -> tuple[float, float]:
        if kind == "gateway":
            return gateway_run(gw, pacs_port, files, tdir / "run")
        if kind == "orthanc":
            assert orthanc is not None
            return orthanc_run(orthanc, pacs_port, files, tdir / "run")
        for attempt in range(1, BARE_ATTEMPTS + 1):
            try:
                return baseline_run(ae, files, tdir / "run")
            except BenchError as exc:
                BARE_RACES[0] += 1
                print(
                    f"  bare run failed ({str(exc).splitlines()[0]}): pynetdicom's reactor race; attempt "
                    f"{attempt} of {BARE_ATTEMPTS} discarded",
                    flush=True,
                )
                if attempt == BARE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    try:
        gw.cli("grant", "--patient-id", patient.patient_id, "--to", PACS_AE)
        # untimed warm-up of every path (imports, page cache, first association)
        warm = make_series(tdir / "data" / "warm", modality, 20, "fb-warm", patient)
        for kind in senders:
            one(kind, warm)
        for rep in range(reps):
            files = make_series(tdir / "data" / f"rep{rep}", modality, n, f"fb-rep{rep}", patient)
            order = senders[rep % len(senders) :] + senders[: rep % len(senders)]
            for kind in order:
                wall, steady = one(kind, files)
                walls[kind].append((wall, steady))
                print(
                    f"  throughput rep {rep + 1} {kind:<8} {n / wall:7.0f} img/s ({wall:.2f} s for {n}); "
                    f"first -> last image {(n - 1) / steady:7.0f} img/s",
                    flush=True,
                )
    finally:
        stop_all([gw])
        if orthanc is not None:
            orthanc.stop()
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
        path = make_mr_series(
            self.data_dir / f"p{self.count}", 1, seed=f"probe-{self.count}", patient=self.patient
        )[0]
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = associate(self.ae, self.gw.port, self.gw.name)
            if not self.assoc.is_established:
                raise BenchError(
                    f"{self.gw.name} refused the probe association:\n{self.gw.log_tail()}"
                )
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
            raise BenchError(
                f"timed out after {timeout:.0f} s waiting for {what}:\n{prober.gw.log_tail()}"
            )
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


def measure_revokes(
    work: Path, n_gateways: int, reps: int
) -> tuple[list[float], list[int], dict[str, str]]:
    rdir = work / "revoke"
    rdir.mkdir()
    secret = rdir / "consortium.secret"
    secret.write_text("ab" * 32)
    gateways = [
        Gateway(
            rdir / f"GW{chr(ord('A') + i)}",
            f"GW{chr(ord('A') + i)}",
            secret=secret,
            allow=(SENDER_AE,),
        )
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
        key: next(
            (ln.split("=", 1)[1].strip() for ln in cfg.splitlines() if ln.strip().startswith(key)),
            "default",
        )
        for key in ("checkpoint_interval", "gossip_interval")
    }
    patient = fake_patient("revoke-bench")
    pacs = start_storescp(pacs_port, rdir / "pacs", rdir / "storescp.log")
    start_all(gateways)
    prober = Prober(b, patient, rdir / "probes")
    times: list[float] = []
    probes: list[int] = []
    try:
        storescu(
            a,
            make_mr_series(rdir / "a", 1, seed="custodian", patient=patient),
            rdir / "storescu.log",
        )
        wait_for(lambda: b.holds(a.origin) >= a.holds(a.origin) > 0, 60, "B to hold A's anchor")
        for rep in range(reps):
            offset = b.log_size()
            a.cli(
                "grant", "--patient-id", patient.patient_id, "--to", PACS_AE, "--force"
            )  # B's destination
            probe_until(
                prober,
                lambda offset=offset: first_forwarded(b, offset),
                60,
                "B to forward after the grant",
            )
            offset = b.log_size()
            a.cli("revoke", "--patient-id", patient.patient_id, "--to", PACS_AE)
            t0 = time.time()
            sent_before = prober.count
            refused_at = probe_until(
                prober,
                lambda offset=offset: first_refusal(b, offset),
                60,
                "B to refuse after the revoke",
            )
            times.append(refused_at - t0)
            probes.append(prober.count - sent_before)
            print(
                f"  revoke rep {rep + 1}: enforced at B after {refused_at - t0:.3f} s "
                f"({prober.count - sent_before} probes)",
                flush=True,
            )
    finally:
        prober.close()
        stop_all(gateways)
        end_process(pacs)
    return times, probes, intervals


# --- report ----------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    n: int,
    walls: Walls,
    times: list[float],
    probes: list[int],
    intervals: dict[str, str],
    elapsed: float,
) -> str:
    lines = [""]
    add = lines.append
    add(
        f"dicomledger forwarding benchmark ({'quick' if args.quick else 'full'}; {elapsed / 60:.1f} min)"
    )
    add(machine_facts())
    add(
        f"forwarding config: retry_initial = {RETRY_INITIAL}, retry_max = {RETRY_MAX}, max_attempts = {MAX_ATTEMPTS}, "
        "concurrency = 1; destination storescp -aet PACS -od DIR (TCP_NODELAY=1)"
    )
    add("")
    if walls["gateway"]:
        what = "CT 512x512" if args.modality == "ct" else "MR 64x64"
        med = {k: statistics.median(w for w, _ in walls[k]) for k in SENDERS if walls[k]}
        steady = {k: statistics.median(s for _, s in walls[k]) for k in SENDERS if walls[k]}
        labels = {
            "gateway": "gateway forward queue -> storescp",
            "orthanc": "Orthanc router (REST, synchronous)",
            "bare": "bare pynetdicom SCU -> storescp",
        }
        add(
            f"throughput, {n} {what} images, median of {len(walls['gateway'])}; wall = storescp spawn -> "
            "last image stored; steady = first -> last image:"
        )
        add(f"  {'':<36}{'wall':>23}{'steady':>14}   per run (wall img/s)")
        for k in med:
            per = "  ".join(f"{n / w:5.0f}" for w, _ in walls[k])
            add(
                f"  {labels[k]:<36}{n / med[k]:>8.0f} img/s ({med[k]:.2f} s){(n - 1) / steady[k]:>8.0f} img/s   {per}"
            )
        ratio = med["bare"] / med["gateway"]
        add(
            f"  {'ratio gateway / bare':<36}{ratio:>23.2f}{steady['bare'] / steady['gateway']:>14.2f}   "
            f"target (wall) >= {TARGET_RATIO}: {mark(ratio >= TARGET_RATIO)}"
        )
        add(f"  bare runs discarded after pynetdicom's reactor race: {BARE_RACES[0]}")
        if "orthanc" in med:
            ratio = med["orthanc"] / med["gateway"]
            add(
                f"  {'ratio gateway / Orthanc':<36}{ratio:>23.2f}{steady['orthanc'] / steady['gateway']:>14.2f}   "
                f"target (wall) >= {TARGET_ORTHANC}: {mark(ratio >= TARGET_ORTHANC)}"
            )
        add("")
    if times:
        p99 = percentile(times, 0.99)
        add(
            f"revoke at A -> enforced at B, {args.gateways} gateways, {len(times)} revokes, "
            f"checkpoint_interval {intervals['checkpoint_interval']}, gossip_interval {intervals['gossip_interval']}, "
            f"probe every {PROBE_INTERVAL * 1000:.0f} ms:"
        )
        add(
            f"  p50 {percentile(times, 0.5):.3f} s   p99 {p99:.3f} s   max {max(times):.3f} s   "
            f"min {min(times):.3f} s   target p99 < {TARGET_P99_S:g} s: {mark(p99 < TARGET_P99_S)}"
        )
        add(f"  probes per revoke: median {statistics.median(probes):.0f}, max {max(probes)}")
        add("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100 images, 5 revokes")
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="images per throughput run (default 500; quick 100)",
    )
    parser.add_argument(
        "--reps", type=int, default=3, help="throughput runs per sender (median reported)"
    )
    parser.add_argument(
        "--modality", choices=("mr", "ct"), default="mr", help="MR 64x64 or CT 512x512 images"
    )
    parser.add_argument(
        "--revokes", type=int, default=None, help="revoke reps (default 20; quick 5)"
    )
    parser.add_argument(
        "--gateways", type=int, default=5, help="gateways in the revoke consortium (>= 2)"
    )
    parser.add_argument(
        "--skip", choices=("throughput", "revoke"), default=None, help="skip one part"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="parent of the temporary work dir"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (data and logs)")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} (DCMTK) is not installed")
    n = args.images or (100 if args.quick else 500)
    revokes = args.revokes or (5 if args.quick else 20)
    if args.reps < 1 or n < 1 or revokes < 1 or args.gateways < 2:
        parser.error("--reps, --images, --revokes must be >= 1, --gateways >= 2")

    return run_in_work_dir(
        "forward-bench-", args.work_dir, args.keep, lambda work: run(args, n, revokes, work)
    )


def run(args: argparse.Namespace, n: int, revokes: int, work: Path) -> int:
    began = time.perf_counter()
    print(f"work dir {work}", flush=True)
    walls: Walls = {k: [] for k in SENDERS}
    times: list[float] = []
    probes: list[int] = []
    intervals: dict[str, str] = {}
    if args.skip != "throughput":
        walls = measure_throughput(work, n, args.reps, args.modality)
    if args.skip != "revoke":
        times, probes, intervals = measure_revokes(work, args.gateways, revokes)
    print(report(args, n, walls, times, probes, intervals, time.perf_counter() - began))
    return 0


if __name__ == "__main__":
    sys.exit(main())
