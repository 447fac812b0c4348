"""Retrieve benchmark: the gateway's C-MOVE throughput against a bare pynetdicom C-STORE SCU.

    .venv/bin/python bench/retrieve_bench.py [--quick] [--modality ct|mr] [--images 400] [--reps 3] [--keep]

One gateway (`dicomledger init --allow STORESCU --allow MOVESCU` + serve) with the move
destination STORESCP under [[destinations]]; a CT study of N images (512x512, 16 bit) and a
small warm-up study of another patient are stored into it with storescu, and both patients
are granted to STORESCP. The receiver is DCMTK `storescp +B -pdu 131072 -dhl -aet STORESCP`
(TCP_NODELAY=1), started fresh (new output dir) for every measurement and timed only once
it answers a C-ECHO. Per rep (--reps, rotating order), three senders:

  gateway   movescu -S -aem STORESCP (StudyInstanceUID) -> the gateway reads each stored file,
            checks its pixel hash against the anchor on the ledger, sends it (its own asyncio
            requestor). Timed from the movescu spawn to its exit; storescp must hold
            all N files and movescu must report a final Success.
  orthanc   the same movescu to Orthanc (Debian package, fresh config, TCP_NODELAY=1), which
            holds the same study (stored with storescu) and knows STORESCP as a modality:
            the anchor (target gateway / Orthanc >= 1.0).
  bare      a pynetdicom SCU sending the same stored files (the gateway's D/data/images/<study>,
            the bytes the gateway sends) over one association, TCP_NODELAY on its socket, timed
            from the association request to the release; two variants:
              dataset   send_c_store(pydicom.dcmread(path))      (a plain pynetdicom SCU)
              chunked   STORE_SEND_CHUNKED_DATASET, send_c_store(path)  (streamed from the file)

Before each timed run the sender moves/sends the warm-up study to that storescp, and the
study's stored files are read once (page cache). Ratio = gateway img/s / faster bare
variant img/s (by median), target >= 2. --modality mr: MR 64x64 instead of CT
512x512. A run stalled by pynetdicom's reactor race (RACE
below) is reported and repeated (up to MAX_ATTEMPTS); any other failure stops the bench.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (  # bench/ is sys.path[0] when run as a script
    DCMTK_ENV,
    HOST,
    ROOT,
    BenchError,
    Gateway,
    Orthanc,
    end_process,
    free_port,
    init_gateways,
    log_lines,
    machine_facts,
    mark,
    nodelay,
    parse_time,
    run_in_work_dir,
    spawn,
    start_all,
    stop_all,
    wait_for,
)

sys.path.insert(0, str(ROOT))
import pydicom  # noqa: E402
from pynetdicom import AE, _config, evt  # noqa: E402

from tests.dicomdata import (  # noqa: E402
    CT_IMAGE,
    MR_IMAGE,
    fake_patient,
    fake_uid,
    make_ct_series,
    make_mr_series,
)

SENDER_AE = "STORESCU"  # storescu's calling AE (stores the studies into the gateway)
MOVE_AE = "MOVESCU"  # movescu's calling AE
DEST_AE = "STORESCP"  # the move destination: storescp's AE title
BARE_AE = "BENCHSCU"  # the bare pynetdicom SCU's calling AE
STORESCP_OPTIONS = ["+B", "-pdu", "131072", "-dhl"]  # as ingest_bench.py: bit-preserving, no DNS
FINAL_SUCCESS = "Received Final Move Response (Success)"
MB = 1_000_000
SIDES = ("gateway", "orthanc", "dataset", "chunked")
LABELS = {
    "gateway": "gateway C-MOVE (movescu -> storescp)",
    "orthanc": "Orthanc C-MOVE (movescu -> storescp)",
    "dataset": "bare SCU, send_c_store(dcmread(path))",
    "chunked": "bare SCU, chunked send_c_store(path)",
}
WARM_IMAGES = 20
# pynetdicom 3.0's reactor pause handshake (Association._run_reactor vs send_c_store) has a window in
# which the reactor thread takes the C-STORE response off the queue ("Received unexpected C-STORE
# service message"); send_c_store then waits for the DIMSE timeout and the association is aborted.
# A run that hits it is not a throughput figure: it is counted, reported and repeated.
RACE = "Received unexpected C-STORE service message"
MAX_ATTEMPTS = 3
BARE_DIMSE_TIMEOUT = 10  # s; only shortens the stall after a race hit

TARGET_RATIO = 2.0  # gateway / faster bare variant
TARGET_ORTHANC = 1.0  # gateway / Orthanc as C-MOVE SCP
ORTHANC: list[Orthanc] = []  # the anchor, when the Debian package is installed


@dataclass
class Study:
    patient_id: str
    uid: str
    source: list[Path]
    stored: list[Path] = field(default_factory=list)  # the gateway's copies, as it sends them
    syntaxes: set[str] = field(default_factory=set)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.stored)


class RaceHit(BenchError):
    """A run stalled by pynetdicom's reactor race (see RACE)."""


class _RaceLog(logging.Handler):
    """Counts RACE warnings of this process's pynetdicom (the bare SCU)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        if RACE in record.getMessage():
            self.hits += 1


RACE_LOG = _RaceLog()
logging.getLogger("pynetdicom").addHandler(RACE_LOG)


@dataclass
class Run:
    seconds: float
    inside: float | None = None  # gateway: "retrieve" -> "retrieved" log lines
    retrieved: dict[str, Any] | None = None  # gateway: its "retrieved" log line


# --- children -----------------------------------------------------------------------------


def run_child(
    args: Sequence[str], log: Path, timeout: float, env: dict[str, str] | None = DCMTK_ENV
) -> tuple[int, float]:
    """Spawn (own session, tracked), wait; returns the exit code and spawn -> exit seconds."""
    started = time.perf_counter()
    proc = spawn(args, log=log, env=env)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{args[0]} did not finish within {timeout:.0f} s; see {log}") from None
    finally:
        end_process(proc)
    return code, time.perf_counter() - started


def start_storescp(port: int, out: Path, log: Path) -> subprocess.Popen[bytes]:
    """A fresh storescp with a new output dir; returns once it answers a C-ECHO."""
    out.mkdir(parents=True)
    proc = spawn(
        ["storescp", *STORESCP_OPTIONS, "-aet", DEST_AE, "-od", str(out), str(port)],
        log=log,
        env=DCMTK_ENV,
    )
    try:

        def answers() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"storescp exited at start ({proc.returncode}); see {log}")
            echo = subprocess.run(
                ["echoscu", "-to", "2", "-aet", BARE_AE, "-aec", DEST_AE, HOST, str(port)],
                capture_output=True,
                env=DCMTK_ENV,
                timeout=30,
            )
            return echo.returncode == 0

        wait_for(answers, 30, "storescp to answer a C-ECHO")
    except BaseException:
        end_process(proc)
        raise
    return proc


def received(out: Path) -> set[str]:
    return {name for _, _, files in os.walk(out) for name in files}


def warm_page_cache(files: Sequence[Path]) -> None:
    for path in files:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


# --- senders ------------------------------------------------------------------------------


def movescu(gw: Gateway, study: Study, log: Path, scp: tuple[str, int] | None = None) -> float:
    """C-MOVE the study to STORESCP (from the gateway, or ``scp``: AE title and port); spawn ->
    exit seconds. Fails unless a final Success."""
    before = log.stat().st_size if log.exists() else 0
    ae_title, port = scp or (gw.name, gw.port)
    code, seconds = run_child(
        [
            "movescu",
            "-v",
            "-aet",
            MOVE_AE,
            "-aec",
            ae_title,
            "-aem",
            DEST_AE,
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study.uid}",
            HOST,
            str(port),
        ],
        log,
        timeout=600,
    )
    with open(log, "rb") as f:
        f.seek(before)
        output = f.read().decode(errors="replace")
    if code != 0 or FINAL_SUCCESS not in output:
        pending = output.count("(Pending)")
        said = "\n".join(ln for ln in output.splitlines() if "(Pending)" not in ln)
        raise BenchError(
            f"movescu of {study.uid} failed (exit {code}, no {FINAL_SUCCESS!r}; {pending} pending "
            f"responses):\n{said[-3000:]}\ngateway log:\n{gw.log_tail()}"
        )
    return seconds


def bare_send(variant: str, study: Study, port: int) -> float:
    """One association to storescp sending the study's stored files; association request -> release."""
    _config.STORE_SEND_CHUNKED_DATASET = variant == "chunked"
    ae = AE(ae_title=BARE_AE)
    ae.dimse_timeout = BARE_DIMSE_TIMEOUT
    for ts in sorted(study.syntaxes):
        ae.add_requested_context(CT_IMAGE, ts)
        ae.add_requested_context(MR_IMAGE, ts)
    started = time.perf_counter()
    assoc = ae.associate(HOST, port, ae_title=DEST_AE, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
    if not assoc.is_established:
        raise BenchError(f"storescp refused the bare association on port {port}")
    try:
        for path in study.stored:
            status = assoc.send_c_store(pydicom.dcmread(path) if variant == "dataset" else path)
            if getattr(status, "Status", None) != 0x0000:
                state = (
                    "aborted"
                    if assoc.is_aborted
                    else "released"
                    if assoc.is_released
                    else "established"
                )
                raise BenchError(
                    f"bare {variant}: C-STORE of {path.name} answered {status!r} "
                    f"(association {state})"
                )
        assoc.release()
        return time.perf_counter() - started
    finally:
        if assoc.is_alive():
            assoc.abort()


def measure(side: str, gw: Gateway, big: Study, warm: Study, port: int, run_dir: Path) -> Run:
    """Fresh storescp; warm-up study; page cache; the timed transfer of the big study; checks."""
    out = run_dir / "storescp"
    shutil.rmtree(out, ignore_errors=True)  # left by a run that failed
    proc = start_storescp(port, out, run_dir / "storescp.log")
    gw_start, races = gw.log_size(), RACE_LOG.hits
    try:
        if side == "gateway":
            movescu(gw, warm, run_dir / "movescu.log")
        elif side == "orthanc":
            movescu(gw, warm, run_dir / "movescu.log", (ORTHANC[0].ae_title, ORTHANC[0].port))
        else:
            bare_send(side, warm, port)
        warm_page_cache(big.stored)
        before = received(out)
        offset = gw.log_size()
        if side == "gateway":
            run = Run(movescu(gw, big, run_dir / "movescu.log"))
        elif side == "orthanc":
            run = Run(
                movescu(gw, big, run_dir / "movescu.log", (ORTHANC[0].ae_title, ORTHANC[0].port))
            )
        else:
            run = Run(bare_send(side, big, port))
        n = len(big.stored)
        wait_for(
            lambda: len(received(out) - before) >= n, 30, f"storescp to hold {n} files", poll=0.02
        )
    except BenchError as exc:
        if RACE_LOG.hits > races or RACE.encode() in gw.log_path.read_bytes()[gw_start:]:
            raise RaceHit(str(exc).splitlines()[0]) from None
        state = "running" if proc.poll() is None else f"exited with {proc.returncode}"
        tail = (run_dir / "storescp.log").read_text(errors="replace")[-2000:]
        raise BenchError(f"{exc}\nstorescp ({state}) log:\n{tail}") from None
    finally:
        end_process(proc)
    got = received(out) - before
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # no write-back of this run's files during the next measurement
    prefix = (
        "CT"
        if CT_IMAGE
        in {pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID for p in big.stored[:1]}
        else "MR"
    )
    expected = {
        f"{prefix}.{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}"
        for p in big.stored[:1]
    }
    if len(got) != n or not expected <= got:
        raise BenchError(
            f"{side}: storescp got {len(got)} new files, expected {n} (names like {expected})"
        )
    if side == "gateway":
        lines = log_lines(gw.log_path, offset)
        plan = [r for r in lines if r.get("event") == "retrieve"]
        done = [r for r in lines if r.get("event") == "retrieved"]
        if len(plan) != 1 or len(done) != 1:
            raise BenchError(
                f"expected one retrieve and one retrieved log line, got {len(plan)}, {len(done)}"
            )
        run.retrieved = done[0]
        run.inside = parse_time(done[0]["timestamp"]) - parse_time(plan[0]["timestamp"])
        if done[0].get("completed") != n or done[0].get("status") != "0x0000":
            raise BenchError(f"gateway retrieved line: {done[0]}")
    return run


# --- setup --------------------------------------------------------------------------------


def add_destination(gw: Gateway, port: int) -> None:
    with open(gw.config_path, "a") as f:
        f.write(f'\n[[destinations]]\nae_title = "{DEST_AE}"\naddress = "{HOST}:{port}"\n')


def stored_files(gw: Gateway, study: Study) -> None:
    """The gateway's stored copies of the study (data/images/<study>/<series>/<instance>.dcm)."""
    files = sorted((gw.dir / "data" / "images" / study.uid).glob("*/*.dcm"))
    if len(files) != len(study.source):
        raise BenchError(
            f"the gateway stored {len(files)} of {len(study.source)} files of {study.uid}"
        )
    meta = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    meta.sort(key=lambda ds: int(ds.InstanceNumber))  # send in slice order, as the source
    study.stored = [Path(ds.filename) for ds in meta]
    study.syntaxes = {str(ds.file_meta.TransferSyntaxUID) for ds in meta}


def setup(work: Path, n: int, dest_port: int, modality: str = "ct") -> tuple[Gateway, Study, Study]:
    data = work / "data"
    studies = []
    for key, count in (("big", n), ("warm", WARM_IMAGES)):
        patient = fake_patient(f"retrieve-bench-{key}")
        uid = fake_uid("study", "retrieve-bench", key)
        if modality == "mr":
            files = make_mr_series(
                data / key, count, patient=patient, study_uid=uid, seed=f"rb-{key}"
            )
        else:
            files = make_ct_series(
                data / key, count, 512, 512, patient=patient, study_uid=uid, seed=f"rb-{key}"
            )
        studies.append(Study(patient.patient_id, uid, files))
    big, warm = studies
    gw = Gateway(work / "gw", "GATEWAY", allow=(SENDER_AE, MOVE_AE))
    init_gateways([gw])
    add_destination(gw, dest_port)
    start_all([gw])
    for study in (warm, big):
        code, _ = run_child(
            [
                "storescu",
                "-aet",
                SENDER_AE,
                "-aec",
                gw.name,
                HOST,
                str(gw.port),
                *map(str, study.source),
            ],
            work / "storescu.log",
            timeout=600,
        )
        if code != 0:
            raise BenchError(
                f"storescu into the gateway failed ({code}); see {work / 'storescu.log'}"
            )
        stored_files(gw, study)
        gw.cli("grant", "--patient-id", study.patient_id, "--to", DEST_AE)
    if Orthanc.available():
        orthanc = Orthanc(
            work / "orthanc", modalities={"storescp": (DEST_AE, dest_port), "movescu": (MOVE_AE, 1)}
        )
        orthanc.config["DicomAlwaysAllowMove"] = True
        orthanc.start()
        ORTHANC.append(orthanc)
        for study in (warm, big):
            code, _ = run_child(
                [
                    "storescu",
                    "-aet",
                    SENDER_AE,
                    "-aec",
                    orthanc.ae_title,
                    HOST,
                    str(orthanc.port),
                    *map(str, study.source),
                ],
                work / "storescu.log",
                timeout=600,
            )
            if code != 0:
                raise BenchError(
                    f"storescu into Orthanc failed ({code}); see {work / 'storescu.log'}"
                )
    return gw, big, warm


# --- report ---------------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    big: Study,
    runs: dict[str, list[Run]],
    races: dict[str, int],
    tamper: int,
    elapsed: float,
) -> str:
    n, mb = len(big.stored), big.nbytes / MB
    sides = [k for k in SIDES if runs[k]]
    med = {k: statistics.median(r.seconds for r in runs[k]) for k in sides}
    base = min(("dataset", "chunked"), key=lambda k: med[k])
    other = "chunked" if base == "dataset" else "dataset"
    ratio = med[base] / med["gateway"]
    reps = len(runs["gateway"])
    lines = [""]
    add = lines.append
    add(
        f"dicomledger retrieve benchmark ({'quick' if args.quick else 'full'}; {elapsed / 60:.1f} min)"
    )
    add(machine_facts())
    add(
        f"study: {n} {'MR 64x64' if args.modality == 'mr' else 'CT 512x512'} 16 bit ({mb:.0f} MB as stored, {', '.join(sorted(big.syntaxes))}); warm-up study "
        f"{WARM_IMAGES} of the same kind (another patient, granted) before every timed run"
    )
    add(
        f"receiver: storescp {' '.join(STORESCP_OPTIONS)} -aet {DEST_AE} (TCP_NODELAY=1), fresh for every run, "
        "timed once it answers a C-ECHO"
    )
    add(
        f"gateway: movescu -S -aem {DEST_AE}, timed spawn -> exit; bare: pynetdicom SCU, one association, "
        "TCP_NODELAY, timed association request -> release"
    )
    add("")
    add(f"C-MOVE retrieve throughput, {n} images, median of {reps} runs (rotating order):")
    add(f"  {'':<40}{'img/s':>8}{'MB/s':>8}{'s':>8}   per run img/s")
    for k in sides:
        per = "  ".join(f"{n / r.seconds:5.0f}" for r in runs[k])
        tag = "  <- baseline" if k == base else ""
        add(f"  {LABELS[k]:<40}{n / med[k]:>8.0f}{mb / med[k]:>8.0f}{med[k]:>8.2f}   {per}{tag}")
    inside = [r.inside for r in runs["gateway"] if r.inside]
    if inside:
        mi = statistics.median(inside)
        per = "  ".join(f"{n / s:5.0f}" for s in inside)
        add(
            f"  {'  gateway inside: log retrieve->retrieved':<40}{n / mi:>8.0f}{mb / mi:>8.0f}{mi:>8.2f}   {per}"
        )
    add("")
    add(
        f"  baseline = bare {base} (faster of the two bare variants by median; {other}: "
        f"gateway / {other} = {med[other] / med['gateway']:.2f})"
    )
    add(
        f"  ratio gateway / baseline{ratio:>24.2f}   target >= {TARGET_RATIO}: {mark(ratio >= TARGET_RATIO)}"
    )
    if "orthanc" in med:
        vs = med["orthanc"] / med["gateway"]
        add(
            f"  ratio gateway / Orthanc{vs:>25.2f}   target >= {TARGET_ORTHANC}: {mark(vs >= TARGET_ORTHANC)}"
        )
    add("")
    r = runs["gateway"][0].retrieved or {}
    fields = ", ".join(
        f"{k}={r.get(k)}"
        for k in ("completed", "warning", "failed", "refused", "tampered", "cancelled", "status")
    )
    add(f'hash check: gateway log "retrieved" line of run 1: {fields}')
    add(f'  "TAMPER" lines in the gateway log: {tamper}   must be 0: {mark(tamper == 0)}')
    add(
        f"runs discarded and repeated after pynetdicom's reactor race ({RACE!r}, then a stall until the DIMSE "
        f"timeout): " + ", ".join(f"{k} {races[k]}" for k in SIDES)
    )
    add("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100 images")
    parser.add_argument(
        "--images", type=int, default=None, help="images in the study (default 400; quick 100)"
    )
    parser.add_argument("--reps", type=int, default=3, help="runs per sender (median reported)")
    parser.add_argument(
        "--modality", choices=("ct", "mr"), default="ct", help="CT 512x512 or MR 64x64 images"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="parent of the temporary work dir"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (data and logs)")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp", "movescu", "echoscu"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} (DCMTK) is not installed")
    n = args.images or (100 if args.quick else 400)
    if args.reps < 1 or n < 1:
        parser.error("--reps and --images must be >= 1")

    return run_in_work_dir(
        "retrieve-bench-", args.work_dir, args.keep, lambda work: run(args, n, work)
    )


def run(args: argparse.Namespace, n: int, work: Path) -> int:
    began = time.perf_counter()
    gw: Gateway | None = None
    try:
        print(f"work dir {work}", flush=True)
        dest_port = free_port()
        gw, big, warm = setup(work, n, dest_port, args.modality)
        runs: dict[str, list[Run]] = {k: [] for k in SIDES}
        races = dict.fromkeys(SIDES, 0)
        sides = tuple(k for k in SIDES if k != "orthanc" or ORTHANC)
        for rep in range(args.reps):
            order = sides[rep % len(sides) :] + sides[: rep % len(sides)]
            for side in order:
                for attempt in range(1, MAX_ATTEMPTS + 1):
                    try:
                        run = measure(side, gw, big, warm, dest_port, work / "run")
                        break
                    except RaceHit:
                        races[side] += 1
                        what = (
                            "movescu got no final Success"
                            if side == "gateway"
                            else "a C-STORE got no response"
                        )
                        print(
                            f"  rep {rep + 1} {side:<8} RACE: pynetdicom's {RACE!r}, then {what} (stalled until "
                            f"the DIMSE timeout); attempt {attempt} of {MAX_ATTEMPTS} discarded",
                            flush=True,
                        )
                        if attempt == MAX_ATTEMPTS:
                            raise
                runs[side].append(run)
                extra = f"; inside the gateway {n / run.inside:.0f} img/s" if run.inside else ""
                print(
                    f"  rep {rep + 1} {side:<8} {n / run.seconds:6.0f} img/s ({run.seconds:.2f} s){extra}",
                    flush=True,
                )
        tamper = gw.log_path.read_bytes().count(b"TAMPER")
        stop_all([gw])
        for orthanc in ORTHANC:
            orthanc.stop()
        print(report(args, big, runs, races, tamper, time.perf_counter() - began))
        return 0
    finally:
        if gw is not None:
            stop_all([gw])
        for orthanc in ORTHANC:
            orthanc.stop()


if __name__ == "__main__":
    sys.exit(main())
