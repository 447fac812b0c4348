"""What the benchmark scripts share: child processes that never outlive the bench, free
ports, polling (wait_for), gateway JSON logs (log_lines), the `dicomledger` CLI, the machine
facts line of every report, percentiles and the ok/MISSED mark, pynetdicom association
helpers, the main() frame (work dir, signals, clean-up), and Gateway: one `dicomledger
serve` process with its init arguments, config, peers, log and ledger, started and stopped
in parallel by init_gateways / start_all / stop_all. Bench-specific config edits stay in
their bench. Not a test helper; the suite does not use it."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import pydicom
import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association

from dicomledger.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DCMTK_ENV = {
    **os.environ,
    "TCP_NODELAY": "1",
}  # Debian DCMTK/Orthanc leave Nagle on without it (~50x slower)

_LIVE: set[subprocess.Popen[bytes]] = set()
# Children die with us even on SIGKILL of the bench (Linux parent-death signal).
_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []


class BenchError(RuntimeError):
    pass


def spawn(
    args: Sequence[str], *, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a child in its own session (a terminal's Ctrl-C reaches only us; we stop it)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*_WITH_PARENT, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
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


def wait_for(condition: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> float:
    """Poll ``condition`` until true; returns the seconds waited; BenchError on timeout."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - began


def log_lines(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """The JSON lines of a gateway log from byte ``offset`` (non-JSON lines skipped)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    found = []
    for line in data.splitlines():
        if line.startswith(b"{"):
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
    return found


def dicomledger_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`dicomledger ARGS` (this checkout, this Python), output captured; the caller checks the code."""
    return subprocess.run(
        [sys.executable, "-m", "dicomledger.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def machine_facts() -> str:
    """One report line: the box, its load, and the versions of what the bench runs."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    dcmtk = ""
    if shutil.which("storescp"):
        out = subprocess.run(
            ["storescp", "--version"], capture_output=True, text=True
        ).stdout.splitlines()
        dcmtk = ", DCMTK " + next(
            (ln.strip("$ ").removeprefix("dcmtk: ") for ln in out if "dcmtk" in ln), "?"
        )
    return (
        f"machine: nproc {os.cpu_count()} ({cpu}), RAM {psutil.virtual_memory().total / 2**30:.1f} GiB, "
        f"{platform.system()} {platform.release()}, load avg at end {load}; Python {platform.python_version()}, "
        f"pydicom {pydicom.__version__}, pynetdicom {pynetdicom.__version__}{dcmtk}"
    )


def run_in_work_dir(
    prefix: str, work_dir: Path | None, keep: bool, body: Callable[[Path], int]
) -> int:
    """main()'s frame: ``body(work)`` in a fresh temp dir, SIGTERM/SIGHUP handled as Ctrl-C
    (exit code 130); afterwards every child is ended and the dir deleted unless ``keep``."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir))
    try:
        return body(work)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        end_all_processes()
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


# --- pynetdicom associations -------------------------------------------------------------


def nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for the bare pynetdicom SCUs: TCP_NODELAY on the association's
    socket, and the race-free reactor pause below."""
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    current = getattr(event.assoc, "_reactor_checkpoint", None)
    if isinstance(current, threading.Event) and current.is_set():
        event.assoc._reactor_checkpoint = ReactorCheckpoint(event.assoc)


class ReactorCheckpoint:
    """pynetdicom 3.0.4 pauses an association's reactor thread while another thread sends a
    request and waits for its response, but the reactor says "paused" before it waits, so a
    sender can go on while the reactor is about to read: it then takes the C-STORE response
    ("Received unexpected C-STORE service message") and the sender stalls until the DIMSE
    timeout. On this loaded 2-core machine that stopped most bare 500-image runs. This
    replaces the checkpoint (same methods as the threading.Event): ``clear()`` returns only
    once the reactor is parked in ``wait()``. (The gateway used it while it sent with
    pynetdicom; it now sends with its own requestor, so only the bench's baselines need it.)"""

    def __init__(self, assoc: Any) -> None:
        self._assoc = assoc
        self._cond = threading.Condition()
        self._open = True
        self._parked = False

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._open = False
            if threading.current_thread() is self._assoc:
                return  # the reactor's own thread (an SCP handler sending): it is not reading
            while (
                not self._parked
                and self._assoc.is_alive()
                and not getattr(self._assoc, "_kill", False)
            ):
                self._cond.wait(0.005)

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            self._parked = True
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._open, timeout)
            finally:
                self._parked = False


def close_association(assoc: Association) -> None:
    """Release if still established; abort whatever is left."""
    if assoc.is_established:
        assoc.release()
    if assoc.is_alive():
        assoc.abort()


# --- gateways ------------------------------------------------------------------------------


class Gateway:
    """One `dicomledger serve` process; its log (stdout+stderr) in <dir>/gateway.log."""

    def __init__(
        self,
        directory: Path,
        name: str,
        *,
        secret: Path | None = None,
        allow: Sequence[str] = ("STORESCU",),
    ) -> None:
        self.dir = directory
        self.name = name
        self.port = free_port()
        self.peer_port = free_port()
        self.origin = f"{name.lower()}.bench/dicomledger"
        self.config_path = directory / "config.toml"
        self.log_path = directory / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_args = [
            "init",
            "--dir",
            str(directory),
            "--ae-title",
            name,
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--origin",
            self.origin,
            "--peer-port",
            str(self.peer_port),
            *(["--secret-file", str(secret)] if secret else []),
            *(arg for ae in allow for arg in ("--allow", ae)),
        ]
        self.spawned_at = 0.0  # time.time() of the last start
        self.log_offset = 0  # log size before the last start

    @property
    def vkey(self) -> str:
        return (self.dir / "trust.txt").read_text().splitlines()[1]

    @property
    def config(self) -> Config:
        return load_config(self.config_path)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def add_peer(self, other: Gateway) -> None:
        with open(self.config_path, "a") as f:
            f.write(
                f'\n[[peers]]\norigin = "{other.origin}"\naddress = "{HOST}:{other.peer_port}"\n'
                f'vkey = "{other.vkey}"\ntls_cert = "{other.dir / "keys" / "peer-tls.crt"}"\n'
            )

    def spawn(self) -> None:
        self.log_offset = self.log_size()  # a restart appends
        self.spawned_at = time.time()
        self.proc = spawn(
            [sys.executable, "-m", "dicomledger.cli", "serve", "--config", str(self.config_path)],
            log=self.log_path,
        )

    def started(self) -> bool:
        """Whether it logged "gateway started" since the last spawn; BenchError if it exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(
                f"{self.name} exited at start ({self.proc.returncode}):\n{self.log_tail()}"
            )
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            return b'"gateway started"' in f.read()

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
            if self.proc.returncode not in (0, -signal.SIGTERM):
                print(f"  warning: {self.name} exited with {self.proc.returncode}", flush=True)
            self.proc = None

    def cpu_seconds(self) -> float:
        try:
            assert self.proc is not None
            t = psutil.Process(self.proc.pid).cpu_times()
        except (AssertionError, psutil.NoSuchProcess):
            return 0.0
        return float(t.user + t.system)

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cli(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`dicomledger COMMAND --config <this gateway's> ARGS`; BenchError unless it succeeds."""
        result = dicomledger_cli(command, "--config", str(self.config_path), *args)
        if result.returncode != 0:
            raise BenchError(
                f"{self.name}: dicomledger {command} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def holds(self, origin: str) -> int:
        """Entries of ``origin``'s log in this gateway's ledger.db (read-only)."""
        db = self.dir / "data" / "ledger.db"
        if not db.exists():
            return 0
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            row = con.execute(
                "SELECT MAX(e.idx) FROM entries e JOIN origins o ON o.id = e.origin_id WHERE o.name = ?",
                (origin,),
            ).fetchone()
        except sqlite3.OperationalError:  # tables not created yet
            return 0
        finally:
            con.close()
        return 0 if row is None or row[0] is None else row[0] + 1

    def own_entries(self) -> list[bytes]:
        """The encoded entries of this gateway's own log, in order."""
        con = sqlite3.connect(
            f"file:{self.dir / 'data' / 'ledger.db'}?mode=ro", uri=True, timeout=10
        )
        try:
            rows = con.execute(
                "SELECT e.data FROM entries e JOIN origins o ON o.id = e.origin_id WHERE o.name = ? ORDER BY e.idx",
                (self.origin,),
            ).fetchall()
        finally:
            con.close()
        return [bytes(r[0]) for r in rows]


def init_gateways(gateways: Sequence[Gateway]) -> None:
    """`dicomledger init` of all the gateways at once; BenchError if one fails."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dicomledger.cli", *gw.init_args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for gw in gateways
    ]
    for gw, proc in zip(gateways, procs, strict=True):
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise BenchError(
                f"dicomledger init of {gw.name} failed:\n{out.decode(errors='replace')}"
            )


def start_all(gateways: Sequence[Gateway], timeout: float = 120.0) -> float:
    """Start the gateways at once; returns seconds until all logged "gateway started"."""
    began = time.monotonic()
    for gw in gateways:
        gw.spawn()
    waiting = list(gateways)
    deadline = began + timeout
    while waiting:
        if time.monotonic() > deadline:
            raise BenchError(
                f"{waiting[0].name} not started after {timeout:.0f} s:\n{waiting[0].log_tail()}"
            )
        waiting = [gw for gw in waiting if not gw.started()]
        time.sleep(0.05)
    return time.monotonic() - began


def stop_all(gateways: Sequence[Gateway]) -> None:
    """SIGTERM to all at once, then wait for each (a peer's stop is not held up by the others)."""
    for gw in gateways:
        if gw.running:
            assert gw.proc is not None
            gw.proc.terminate()
    for gw in gateways:
        gw.stop()


# --- Orthanc -------------------------------------------------------------------------------


class Orthanc:
    """One Orthanc process (Debian package) with a fresh config in ``directory``: its defaults
    (SQLite index, SyncStorageArea true: every stored file fsynced), DICOM on ``dicom_port``, REST on
    a free loopback port, no authentication, TCP_NODELAY=1 in its environment. ``modalities``:
    {id: (AE title, port)} on 127.0.0.1, the AEs it may send to."""

    BINARY = "/usr/sbin/Orthanc"

    def __init__(
        self,
        directory: Path,
        *,
        ae_title: str = "ORTHANC",
        modalities: dict[str, tuple[str, int]] | None = None,
    ) -> None:
        self.dir = directory
        self.ae_title = ae_title
        self.port = free_port()
        self.http_port = free_port()
        self.log_path = directory / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = {
            "Name": f"bench-{ae_title.lower()}",
            "StorageDirectory": str(directory / "storage"),
            "IndexDirectory": str(directory / "index"),
            "DicomAet": ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "DicomModalities": {
                mid: [aet, HOST, port] for mid, (aet, port) in (modalities or {}).items()
            },
        }

    @staticmethod
    def available() -> bool:
        return os.access(Orthanc.BINARY, os.X_OK)

    def start(self, timeout: float = 60.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        config_path = self.dir / "orthanc.json"
        config_path.write_text(json.dumps(self.config, indent=2))
        self.proc = spawn([self.BINARY, str(config_path)], log=self.log_path, env=DCMTK_ENV)
        wait_for(self._answers, timeout, f"Orthanc on REST port {self.http_port}")

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(
                f"Orthanc exited at start ({self.proc.returncode}):\n{self.log_tail()}"
            )
        try:
            self.rest("GET", "/system", timeout=2)
        except OSError:
            return False
        return True

    def rest(self, method: str, path: str, body: Any = None, timeout: float = 600) -> Any:
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://{HOST}:{self.http_port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def count_instances(self) -> int:
        return int(self.rest("GET", "/statistics")["CountInstances"])

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
            self.proc = None

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
