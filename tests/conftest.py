"""Fixtures that run real gateways as processes on loopback, driven by real DCMTK tools."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DCMTK_ENV = {
    **os.environ,
    "TCP_NODELAY": "1",
}  # without it DCMTK and Orthanc keep Nagle's algorithm on (~50x slower on loopback)


def jpeg_lossless_decoder_installed() -> bool:
    """pylibjpeg-libjpeg (the jpeg-gpl extra, GPLv3) or python-gdcm: pydicom can decode JPEG Lossless."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    return get_decoder(uid.JPEGLosslessSV1).is_available


_START_PROCESS = subprocess.Popen.__init__


def _no_process(self: subprocess.Popen, args: object, *rest: object, **options: object) -> None:
    raise RuntimeError(
        f"a test not marked e2e started a process ({str(args)[:100]}): put `pytestmark = pytest.mark.e2e` "
        "in its module (the quick unit run, `-m 'not e2e'`, starts none)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """In the quick unit run (``-m "not e2e"``), a test that starts a process (gateway, DCMTK,
    Orthanc, the CLI) fails and says to mark its module e2e."""
    unit_run = "not e2e" in (item.config.getoption("markexpr") or "")
    if unit_run and item.get_closest_marker("e2e") is None:
        subprocess.Popen.__init__ = _no_process  # type: ignore[method-assign]
    try:
        yield
    finally:
        subprocess.Popen.__init__ = _START_PROCESS  # type: ignore[method-assign]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("jpeg_gpl") and not jpeg_lossless_decoder_installed():
        pytest.skip(
            "needs a JPEG Lossless decoder: pip install -e '.[jpeg-gpl]' (pylibjpeg-libjpeg, GPLv3) "
            "or python-gdcm; ./scripts/test installs the extra"
        )


# Ports for the servers tests start: below the kernel's ephemeral range (32768 and up here),
# from which the kernel hands out ports for bind(0) and outgoing connections, so no other
# process takes one between the test choosing it and its server binding it (tests choose a
# gateway's ports at init and bind them at start). Each xdist worker takes its own share of
# the range, in turn from a random start, so no port is handed out twice before the share wraps.
PORT_RANGE = (20000, 32000)
_next_port: list[int] = []


def _port_share() -> tuple[int, int]:
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    size = (PORT_RANGE[1] - PORT_RANGE[0]) // workers
    low = PORT_RANGE[0] + (int(worker) % workers if worker.isdigit() else 0) * size
    return low, size


def free_port() -> int:
    low, size = _port_share()
    if not _next_port:
        _next_port.append(random.randrange(size))
    for _ in range(size):
        port = low + _next_port[0] % size
        _next_port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use
            return port
    raise RuntimeError(f"no free port in {low}..{low + size - 1}")


def dicomledger(
    *args: str, check: bool = False, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicomledger.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        cwd=ROOT,
    )


def dcmtk(tool: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} not installed: run ./scripts/test, which installs DCMTK")
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV
    )


class GatewayProcess:
    def __init__(
        self,
        directory: Path,
        ae_title: str = "GATEWAY",
        allow: tuple[str, ...] = ("STORESCU", "ECHOSCU"),
        secret_file: Path | None = None,
        init_args: tuple[str, ...] = (),  # more `init` options, e.g. ("--tls", "--tls-port", "N")
    ) -> None:
        self.dir = directory
        self.ae_title = ae_title
        self.port = free_port()
        self.peer_port = free_port()
        self.origin = f"{ae_title.lower()}.test/dicomledger"
        args = [
            "init",
            "--dir",
            str(directory),
            "--ae-title",
            ae_title,
            "--port",
            str(self.port),
            "--origin",
            self.origin,
            "--peer-port",
            str(self.peer_port),
        ]
        if secret_file is not None:
            args += ["--secret-file", str(secret_file)]
        for ae in allow:
            args += ["--allow", ae]
        dicomledger(*args, *init_args, check=True)
        self.config = directory / "config.toml"
        self.log_path = directory / "gateway.log"
        self.proc: subprocess.Popen | None = None
        self.serve_module = "dicomledger.cli"  # `python -m <this> serve`: a test may wrap it
        self.group: list[GatewayProcess] = [self]  # the gateways of its consortium (``consortium``)
        self._waiting_from: int | None = None  # log offset of a start still waiting for a peer
        self.python = sys.executable  # a test may run the gateway in another environment

    @property
    def vkey(self) -> str:
        return (self.dir / "trust.txt").read_text().splitlines()[1]

    def add_peer(self, other: GatewayProcess) -> None:
        """List ``other`` under [[peers]] in this gateway's config (restart to apply)."""
        with open(self.config, "a") as f:
            f.write(
                f'\n[[peers]]\norigin = "{other.origin}"\naddress = "127.0.0.1:{other.peer_port}"\n'
                f'vkey = "{other.vkey}"\ntls_cert = "{other.dir / "keys" / "peer-tls.crt"}"\n'
            )

    def set(self, old: str, new: str) -> None:
        text = self.config.read_text()
        assert old in text, old
        self.config.write_text(text.replace(old, new, 1))

    def start(self, accept_local_tip: bool = False) -> None:
        """Start ``serve`` and wait until it logs "gateway started".

        A gateway with peers waits at start for one of them to confirm its log. Started while
        none of its consortium runs yet, it says so in its log ("waiting for a peer"): then
        this returns at once, and the next gateway of its group to start waits until this one
        has started too, so ``for gw in gateways: gw.start()`` leaves them all started."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0  # a restart appends
        self.log_file = open(self.log_path, "ab")
        extra = ["--accept-local-tip"] if accept_local_tip else []
        self.proc = subprocess.Popen(
            [self.python, "-m", self.serve_module, "serve", "--config", str(self.config), *extra],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self._waiting_from = None
        if self._wait_started(offset, may_wait_for_peers=len(self.group) > 1):
            for other in self.group:
                if other is not self and other._waiting_from is not None and other.proc is not None:
                    other._wait_started(other._waiting_from, may_wait_for_peers=False)
        else:
            self._waiting_from = offset

    def _wait_started(self, offset: int, may_wait_for_peers: bool) -> bool:
        """True once it logged "gateway started"; False if it waits for a peer (and may)."""
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited at start:\n{self.log()}")
            logged = self.log_path.read_bytes()[offset:]
            if b'"gateway started"' in logged:
                self._waiting_from = None
                return True
            if may_wait_for_peers and b'"waiting for a peer to confirm' in logged:
                return False
            time.sleep(0.05)
        self.stop(signal.SIGKILL)  # leave no process behind
        raise RuntimeError(f"gateway did not start:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self._waiting_from = None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log_file.close()
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, command: str, *args: str) -> subprocess.CompletedProcess:
        return dicomledger(command, "--config", str(self.config), *args)

    def storescu_in_background(self, paths: list[Path], output: Path) -> subprocess.Popen:
        """storescu -v sending ``paths`` in one association, its output going to ``output``."""
        with open(output, "w") as out:
            return subprocess.Popen(
                [
                    "storescu",
                    "-v",
                    "-aet",
                    "STORESCU",
                    "-aec",
                    self.ae_title,
                    "127.0.0.1",
                    str(self.port),
                    *map(str, paths),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=DCMTK_ENV,
            )

    def storescu(
        self, *paths: Path | str, aet: str = "STORESCU", options: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess:
        return dcmtk(
            "storescu",
            "-v",
            "-aet",
            aet,
            "-aec",
            self.ae_title,
            *options,
            "127.0.0.1",
            str(self.port),
            *map(str, paths),
        )


def consortium(tmp_path: Path, n: int, gossip_interval: float = 0.2) -> list[GatewayProcess]:
    """n gateways (not started) that list each other as peers and share a pseudonym secret."""
    secret = tmp_path / "consortium.secret"
    secret.write_text("ab" * 32)
    names = [f"GW{chr(ord('A') + i)}" for i in range(n)]
    gateways = [
        GatewayProcess(tmp_path / name, ae_title=name, secret_file=secret) for name in names
    ]
    for gw in gateways:
        gw.group = gateways
        gw.set("gossip_interval = 1.0", f"gossip_interval = {gossip_interval}")
        gw.set("checkpoint_interval = 1.0", "checkpoint_interval = 0.3")
        for other in gateways:
            if other is not gw:
                gw.add_peer(other)
    return gateways


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path / "gw")
    gw.start()
    yield gw
    if gw.proc is not None and gw.proc.poll() is None:
        gw.stop()
