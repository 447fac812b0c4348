"""`dicomledger serve` as a daemon: start-up failures end the process with one line, one gateway
per data directory, and a private data tree (file modes)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests import dicomdata
from tests.conftest import ROOT, GatewayProcess, free_port

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


def serve_once(gw: GatewayProcess, timeout: float = 30) -> subprocess.CompletedProcess:
    """`dicomledger serve` expected to stop by itself; a hang fails the test (TimeoutExpired)."""
    return subprocess.run(
        [sys.executable, "-m", "dicomledger.cli", "serve", "--config", str(gw.config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def error_lines(stderr: str) -> list[dict]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    return [line for line in lines if line["level"] == "error"]


def assert_one_line_failure(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = error_lines(result.stderr)  # also: every stderr line is JSON
    assert len(errors) == 1 and errors[0]["event"] == "gateway cannot start", result.stderr
    for needle in needles:
        assert needle in errors[0]["reason"], errors[0]
    return errors[0]["reason"]


@pytest.mark.parametrize("which", ["dicom", "peer"])
def test_serve_exits_with_one_line_when_a_port_is_in_use(tmp_path, which):
    gw = GatewayProcess(tmp_path / "gw")
    port = gw.port if which == "dicom" else gw.peer_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = serve_once(gw)
    what = "DICOM listener" if which == "dicom" else "peer API"
    assert_one_line_failure(result, f"{what} on 127.0.0.1:{port}", "in use")
    gw.start()  # nothing left behind that stops a normal start once the port is free
    assert gw.stop() == 0


def test_serve_exits_with_one_line_when_the_host_does_not_resolve(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    text = gw.config.read_text()
    gw.config.write_text(text.replace('host = "127.0.0.1"', 'host = "no-such-host.invalid"'))
    assert_one_line_failure(serve_once(gw), "no-such-host.invalid")


def test_serve_exits_with_one_line_when_the_ledger_database_is_not_a_database(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    (gw.dir / "data" / "ledger.db").write_bytes(b"this is not an SQLite database" * 100)
    assert_one_line_failure(serve_once(gw), "ledger.db")


def test_a_second_serve_on_the_same_data_refuses_and_touches_nothing(
    gateway: GatewayProcess, tmp_path
):
    data = gateway.dir / "data"
    upload = data / "images" / "tmp" / "upload-in-progress"  # a running store's temp file
    upload.write_bytes(b"partial dataset")
    socket_inode = (data / "admin.sock").stat().st_ino
    before = {
        p: p.stat().st_mtime_ns
        for p in data.rglob("*")
        if "wal" not in p.name and "shm" not in p.name
    }

    reason = assert_one_line_failure(serve_once(gateway), str(data), f"process {gateway.proc.pid}")
    assert "in use by another gateway" in reason

    assert upload.read_bytes() == b"partial dataset"
    assert (data / "admin.sock").stat().st_ino == socket_inode
    after = {
        p: p.stat().st_mtime_ns
        for p in data.rglob("*")
        if "wal" not in p.name and "shm" not in p.name
    }
    assert after == before
    # the running gateway still owns its admin socket and its DICOM port
    assert gateway.cli("permissions", "--patient-id", "P-1").returncode == 0
    (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1)
    assert gateway.storescu(f).returncode == 0
    status = gateway.cli("status").stdout
    assert f"running (process {gateway.proc.pid})" in status, status


def test_a_killed_gateway_leaves_no_lock_behind(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    gw.start()
    gw.kill()
    gw.start()  # the kernel dropped the lock with the process
    assert gw.stop() == 0


def modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]
    }


# Public data (the verifier key and the peer certificate are handed to auditors and peers): `init`
# creates them private like everything else, and `serve` leaves them as the administrator set them.
PUBLIC = {"trust.txt", "keys/peer-tls.crt"}


@pytest.fixture
def usual_umask():
    """The usual default umask (022): the gateway must not depend on its caller's."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_init_and_serve_create_everything_private(tmp_path, usual_umask):
    gw = GatewayProcess(tmp_path / "gw")
    with open(gw.config, "a") as f:  # a forward queue too, and a route that refuses (no grant)
        f.write(
            f'\n[[destinations]]\nae_title = "PACS"\naddress = "127.0.0.1:{free_port()}"\n'
            '\n[[routes]]\nto = ["PACS"]\n'
        )
    gw.start()
    try:
        assert gw.storescu(*dicomdata.make_mr_series(tmp_path / "mr", 3)).returncode == 0
        seen = modes(gw.dir)
    finally:
        gw.stop()
    for name in (
        "data/index.db",
        "data/ledger.db",
        "data/forward.db",
        "data/admin.sock",
        "config.toml",
        "data/images/tmp",
    ):
        assert name in seen, sorted(seen)
    assert sum(1 for name in seen if name.endswith(".dcm")) == 3
    too_open = {
        name: oct(mode)
        for name, mode in seen.items()
        if name not in PUBLIC and name != "gateway.log" and mode & 0o077
    }
    assert not too_open, too_open
    assert {name: oct(seen[name]) for name in PUBLIC} == {name: "0o600" for name in PUBLIC}
    dirs = [name for name in seen if (gw.dir / name).is_dir() and name != "."]
    assert all(seen[name] == 0o700 for name in dirs), {d: oct(seen[d]) for d in dirs}


def test_serve_makes_an_open_tree_private_and_says_so(tmp_path, usual_umask):
    gw = GatewayProcess(tmp_path / "gw")
    gw.start()
    try:
        assert gw.storescu(*dicomdata.make_mr_series(tmp_path / "mr", 2)).returncode == 0
    finally:
        gw.stop()
    # as an earlier version left it: 0644 / 0755, and no mark that the image store was checked
    (gw.dir / "data" / "images" / "dicomledger.private").unlink(missing_ok=True)
    for p in [gw.dir, *gw.dir.rglob("*")]:
        if p.is_file() and p.name not in ("gateway.key", "peer-tls.key"):  # serve refuses open keys
            p.chmod(0o644)
        elif p.is_dir():
            p.chmod(0o755)
    gw.start()
    gw.stop()
    fixed = [
        line
        for line in map(json.loads, gw.log().splitlines())
        if line["event"].startswith("took group and other access off")
    ]
    assert len(fixed) == 1 and fixed[0]["level"] == "warning", fixed
    assert fixed[0]["in_image_store"] >= 2 + 3  # two images, their study/series folders, tmp
    assert str(gw.dir / "data" / "index.db") in fixed[0]["paths"]
    seen = modes(gw.dir)
    too_open = {
        name: oct(mode)
        for name, mode in seen.items()
        if name not in PUBLIC | {".", "gateway.log"} and mode & 0o077
    }
    assert not too_open, too_open
    assert seen["."] == 0o755  # the config's own folder is not ours to change
