"""Helpers the benchmark scripts share: child processes that never outlive the bench,
free ports, percentiles and the ok/MISSED mark. Not a test helper; the suite does not use it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType

import psutil

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # see /work/shared/DICOM-TOOLS.md

_LIVE: set[subprocess.Popen[bytes]] = set()
# Children die with us even on SIGKILL of the bench (Linux parent-death signal).
_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []


class BenchError(RuntimeError):
    pass


def spawn(args: Sequence[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a child in its own session (a terminal's Ctrl-C reaches only us; we stop it)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*_WITH_PARENT, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=env, cwd=ROOT, start_new_session=True,
        )
    _LIVE.add(proc)
    return proc


def end_process(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM, wait, SIGKILL; then kill any descendant it left (storescp --fork children)."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.is_running():  # psutil checks the start time: never a reused pid
                child.kill()
    _LIVE.discard(proc)


def end_all_processes() -> None:
    for proc in list(_LIVE):
        end_process(proc, grace=10.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def parse_time(stamp: str) -> float:
    """A structlog ISO UTC timestamp -> seconds since the epoch."""
    return datetime.fromisoformat(stamp).timestamp()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
