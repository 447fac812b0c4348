"""Receive benchmark of the asyncio DICOM layer alone, against bare pynetdicom and DCMTK.

    .venv/bin/python bench/net_bench.py [--quick] [--reps 3] [--multiframe] [--keep] [--work-dir DIR]

One run generates the data once (as bench/ingest_bench.py does: MR 64x64 and CT 512x512,
16 bit, from tests/dicomdata.py) and sends it with DCMTK storescu (TCP_NODELAY=1) to three
receivers, each started fresh on 127.0.0.1 for every measurement:

  net       bench/net_scp.py: dicomledger/dicom/net with an on_store that only moves the
            temp file into the output folder and answers Success (no fsync, no hash)
  bare      bench/bare_scp.py: pynetdicom's server with the same handler
  storescp  DCMTK storescp +B -pdu 131072 -dhl (--fork for several senders)

Sets: MR and CT with 1 sender (one association) and with 4 concurrent senders (a quarter of
the set each); with --multiframe also one object of 2,000 frames (1 GB) with the receiver's
peak RSS. Every cell is repeated --reps times with the receivers in rotating order; the
median is reported. Received files stay on disk until the run ends (on this machine's ext4,
creating files right after deleting many is slow; deleting between runs would cost every
receiver). Then, per receiver, the C-STORE round trip of 100 CT files sent one at a time on
one association from a raw-socket SCU (p50, p99). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# this checkout's dicomledger (benchlib imports it), not another one installed in the venv
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pydicom  # noqa: E402
from benchlib import (  # noqa: E402  (bench/ is on sys.path when run as a script)
    HOST,
    ROOT,
    free_port,
    machine_facts,
    mark,
    percentile,
    run_in_work_dir,
    spawn,
)
from ingest_bench import (  # noqa: E402
    LATENCY_AE,
    MB,
    SENDER_AE,
    RssSampler,
    Server,
    prefetch,
    start_receiver,
    storescp_options,
    storescu,
    wait_ready,
)
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402
from pynetdicom.pdu import A_ASSOCIATE_AC  # noqa: E402
from pynetdicom.pdu_primitives import MaximumLengthNotification  # noqa: E402

from dicomledger.dicom.net import dimse, pdu  # noqa: E402
from tests.dicomdata import CT_IMAGE, make_ct_series, make_mr_series  # noqa: E402
from tests.netharness import RawClient, associate_rq, dataset_bytes, write_large_multiframe  # noqa: E402

RECEIVERS = ("net", "bare", "storescp")
LABELS = {"net": "dicom/net", "bare": "bare pynetdicom", "storescp": "DCMTK storescp"}
TARGET_VS_BARE = 1.5  # the new layer must be well above pynetdicom's server
TARGET_PEAK_RSS_MB = 400


@dataclass(frozen=True)
class DataSet:
    key: str
    label: str
    files: tuple[Path, ...]

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    data: DataSet
    senders: int


@dataclass(frozen=True)
class Sample:
    wall: float
    peak_rss: int | None


def start_net(run_dir: Path) -> Server:
    run_dir.mkdir(parents=True)
    port = free_port()
    out, log = run_dir / "out", run_dir / "net.log"
    proc = spawn(
        [
            sys.executable,
            str(ROOT / "bench" / "net_scp.py"),
            "--host",
            HOST,
            "--port",
            str(port),
            "--output-dir",
            str(out),
            "--allow",
            SENDER_AE,
            "--allow",
            LATENCY_AE,
        ],
        log=log,
    )
    server = Server("net", "NETSCP", port, proc, out, log)
    try:
        wait_ready(server, b"ready")
    except BaseException:
        server.stop()
        raise
    return server


_runs = itertools.count(1)


@contextlib.contextmanager
def receiver(kind: str, runs: Path, *, concurrent: bool = False) -> Iterator[Server]:
    """A fresh receiver in a run dir of its own, kept until the end of the bench."""
    run_dir = runs / f"{next(_runs):03d}-{kind}"
    server = (
        start_net(run_dir)
        if kind == "net"
        else start_receiver(kind, run_dir, concurrent=concurrent)
    )
    try:
        yield server
    finally:
        server.stop()


def measure(kind: str, scenario: Scenario, warm: DataSet, work: Path) -> Sample:
    with receiver(kind, work / "runs", concurrent=scenario.senders > 1) as server:
        storescu(server, warm.files, 1, work / "logs")
        prefetch(scenario.data.files)
        if scenario.key == "MF":
            with RssSampler(server.proc.pid) as rss:
                wall = storescu(server, scenario.data.files, 1, work / "logs")
            return Sample(wall, rss.peak)
        return Sample(storescu(server, scenario.data.files, scenario.senders, work / "logs"), None)


def round_trips(kind: str, files: Sequence[Path], work: Path) -> list[float]:
    """ms per C-STORE round trip, one file at a time on one association, from a raw-socket
    SCU (tests/netharness.py) that costs next to nothing itself (pynetdicom's SCU adds its
    own milliseconds and sometimes stalls in its reactor, see docs/design.md)."""
    messages = []
    for path in files:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        messages.append(
            (
                dimse.request(
                    dimse.C_STORE_RQ,
                    1,
                    CT_IMAGE.encode(),
                    has_data_set=True,
                    sop_instance_uid=str(sop).encode(),
                ),
                dataset_bytes(path),
            )
        )
    with receiver(kind, work / "runs") as server:
        rq = associate_rq(
            [(1, CT_IMAGE, (ExplicitVRLittleEndian,))], calling=LATENCY_AE, called=server.ae_title
        )
        with RawClient(server.port) as client:
            pdu_type, body = client.associate(rq)
            if pdu_type != pdu.A_ASSOCIATE_AC:
                raise RuntimeError(f"{kind}: association refused:\n{server.log_tail()}")
            ac = A_ASSOCIATE_AC()
            ac.decode(pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_AC, len(body)) + body)
            max_pdu = next(
                i.maximum_length_received
                for i in ac.to_primitive().user_information
                if isinstance(i, MaximumLengthNotification)
            )
            times = []
            for command, data in [*messages[:5], *messages]:  # the first five: warm-up
                started = time.perf_counter()
                client.send_message(1, command, data, max_pdu=max_pdu)
                status = client.read_response().us(dimse.STATUS)
                times.append((time.perf_counter() - started) * 1000)
                if status != 0:
                    raise RuntimeError(f"{kind}: C-STORE answered 0x{status or 0:04X}")
            client.release()
    return times[5:]


def num(value: float) -> str:
    return f"{value:>7,.0f}" if value >= 100 else f"{value:>7.1f}"


def report(
    args: argparse.Namespace,
    scenarios: Sequence[Scenario],
    results: dict[tuple[str, str], list[Sample]],
    latency: dict[str, list[float]],
    elapsed: float,
) -> str:
    lines = [
        "",
        f"dicom/net receive benchmark ({'quick' if args.quick else 'full'}; median of {args.reps} runs "
        f"per cell, receivers in rotating order; {elapsed / 60:.1f} min)",
        machine_facts(),
        "sender: DCMTK storescu (TCP_NODELAY=1), one association per sender; wall time of the storescu run(s); "
        "MB = 10^6 bytes",
        "receivers: net = bench/net_scp.py, bare = bench/bare_scp.py (both: move the temp file, Success; no "
        f"fsync); storescp {' '.join(storescp_options(False))} (--fork with 4 senders)",
        "",
    ]
    head = f"{'img/s (median)':<30}" + "".join(f"{LABELS[k]:>26}" for k in RECEIVERS)
    lines.append(f"{head}{'net/bare':>10}{'net/scp':>9}  target")
    for sc in scenarios:
        n, nbytes = len(sc.data.files), sc.data.nbytes
        med = {k: statistics.median(s.wall for s in results[(sc.key, k)]) for k in RECEIVERS}
        cells = "".join(
            f"  {num(n / med[k])} img/s {num(nbytes / MB / med[k])} MB/s" for k in RECEIVERS
        )
        vs_bare, vs_scp = med["bare"] / med["net"], med["storescp"] / med["net"]
        target = (
            f"net/bare >= {TARGET_VS_BARE}: {mark(vs_bare >= TARGET_VS_BARE)}"
            if sc.key != "MF"
            else ""
        )
        lines.append(f"{sc.label:<30}{cells}{vs_bare:>10.2f}{vs_scp:>9.2f}  {target}")
    mf = [sc for sc in scenarios if sc.key == "MF"]
    if mf:
        lines += [
            "",
            f"peak RSS of the receiver while receiving {mf[0].data.label} (every 50 ms, max over runs):",
        ]
        for k in RECEIVERS:
            peak = max(s.peak_rss or 0 for s in results[("MF", k)]) / MB
            target = (
                f"   target < {TARGET_PEAK_RSS_MB} MB: {mark(peak < TARGET_PEAK_RSS_MB)}"
                if k == "net"
                else ""
            )
            lines.append(f"  {LABELS[k]:<18}{peak:>8,.0f} MB{target}")
    if latency:
        lines += [
            "",
            f"C-STORE round trip from a raw-socket SCU, {len(latency['net'])} CT files one at a time:",
        ]
        lines.append(f"  {'':<8}" + "".join(f"{LABELS[k]:>18}" for k in RECEIVERS))
        for name, q in (("p50 ms", 0.5), ("p99 ms", 0.99)):
            lines.append(
                f"  {name:<8}" + "".join(f"{percentile(latency[k], q):>18.2f}" for k in RECEIVERS)
            )
    lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace, work: Path) -> int:
    began = time.perf_counter()
    mr_n, ct_n = (300, 60) if args.quick else (2000, 400)
    print(f"work dir {work}; generating data ...", flush=True)
    data = work / "data"
    mr = DataSet("MR", f"MR {mr_n} x 64x64", tuple(make_mr_series(data / "mr", mr_n, seed="bench")))
    ct = DataSet(
        "CT", f"CT {ct_n} x 512x512", tuple(make_ct_series(data / "ct", ct_n, seed="bench"))
    )
    warm = DataSet(
        "warm",
        "warm-up",
        (
            *make_mr_series(data / "warm", 30, seed="warmup"),
            *make_ct_series(data / "warm", 5, seed="warmup"),
        ),
    )
    scenarios = [
        Scenario("MR", mr.label, mr, 1),
        Scenario("CT", ct.label, ct, 1),
        Scenario("MRx4", f"{mr.label}, 4 senders", mr, 4),
        Scenario("CTx4", f"{ct.label}, 4 senders", ct, 4),
    ]
    if args.multiframe:
        frames = 200 if args.quick else 2000
        (data / "mf").mkdir(parents=True)
        big = data / "mf" / "mf.dcm"
        write_large_multiframe(big, frames)
        mf = DataSet("MF", f"MF 1 x {frames} fr ({big.stat().st_size / MB:,.0f} MB)", (big,))
        scenarios.append(Scenario("MF", mf.label, mf, 1))
    (work / "logs").mkdir()
    print(f"generated in {time.perf_counter() - began:.0f} s", flush=True)

    for kind in RECEIVERS:  # warm-up, untimed
        with receiver(kind, work / "runs") as server:
            storescu(server, warm.files, 1, work / "logs")
            storescu(server, ct.files[: max(1, len(ct.files) // 4)], 1, work / "logs")

    results: dict[tuple[str, str], list[Sample]] = {}
    for sc in scenarios:
        for rep in range(args.reps):
            for kind in RECEIVERS[rep % 3 :] + RECEIVERS[: rep % 3]:
                sample = measure(kind, sc, warm, work)
                results.setdefault((sc.key, kind), []).append(sample)
                extra = f", peak RSS {sample.peak_rss / MB:,.0f} MB" if sample.peak_rss else ""
                print(
                    f"  {sc.label:<30} run {rep + 1} {kind:<9} {num(len(sc.data.files) / sample.wall)} img/s "
                    f"{num(sc.data.nbytes / MB / sample.wall)} MB/s ({sample.wall:.2f} s){extra}",
                    flush=True,
                )

    latency: dict[str, list[float]] = {}
    if not args.no_latency:
        for kind in RECEIVERS:
            latency[kind] = round_trips(kind, ct.files[:100], work)
            print(f"  round trip {kind:<9} p50 {percentile(latency[kind], 0.5):.2f} ms", flush=True)
    print(report(args, scenarios, results, latency, time.perf_counter() - began))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="300 MR, 60 CT (and a 100 MB multi-frame)"
    )
    parser.add_argument(
        "--reps", type=int, default=3, help="runs per receiver and set (median reported)"
    )
    parser.add_argument(
        "--multiframe", action="store_true", help="also one 1 GB multi-frame object, with peak RSS"
    )
    parser.add_argument("--no-latency", action="store_true", help="skip the C-STORE round trips")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="parent of the temporary work dir"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work dir (data, received files, logs)"
    )
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} (DCMTK) is not installed")
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    return run_in_work_dir("net-bench-", args.work_dir, args.keep, lambda work: run(args, work))


if __name__ == "__main__":
    sys.exit(main())
