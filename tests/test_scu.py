"""The asyncio layer's requestor (forwarding's and C-MOVE's C-STORE SCU) against real
destinations: DCMTK storescp, and small in-test pynetdicom SCPs where storescp cannot play the
part (AE checks, SOP class limits, statuses). The tests drive it from blocking code through
``BlockingRequestor`` (an event loop in a thread of its own)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import uid
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, evt

from dicomledger.dicom.net.requestor import Destination, Requestor, SendResult
from tests import dicomdata
from tests.conftest import DCMTK_ENV, free_port

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

WHEEL = Path(pydicom.__file__).parent / "data" / "test_files"
# Files shipped in the pydicom wheel: several SOP classes and transfer syntaxes.
WHEEL_FILES = [
    "SC_rgb_jpeg_dcmtk.dcm",  # Secondary Capture, JPEG Baseline
    "MR_small_RLE.dcm",  # MR, RLE Lossless
    "MR_small_jp2klossless.dcm",  # MR, JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm",  # MR, JPEG-LS lossless
    "image_dfl.dcm",  # Secondary Capture, Deflated Explicit VR Little Endian
    "CT_small.dcm",  # CT, Explicit VR Little Endian
]


class BlockingRequestor:
    """A Requestor driven from blocking test code: its coroutines run on ``loop``'s thread."""

    def __init__(self, requestor: Requestor, loop: asyncio.AbstractEventLoop) -> None:
        self.requestor = requestor
        self._loop = loop

    def _run(self, coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(60)

    def send(self, path: Path, sop_class_uid: str, transfer_syntax_uid: str) -> SendResult:
        return self._run(self.requestor.send_file(path, sop_class_uid, transfer_syntax_uid))

    def close(self) -> None:
        self._run(self.requestor.close())

    def release_if_idle(self) -> bool:
        return self._run(self.requestor.release_if_idle())


StoreSCU = BlockingRequestor


def meta(path: Path) -> tuple[str, str]:
    m = read_file_meta_info(path)
    return str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)


def send(scu: StoreSCU, path: Path) -> SendResult:
    return scu.send(path, *meta(path))


def listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "0A":
                return True
    return False


class Storescp:
    """DCMTK storescp on 127.0.0.1:port, writing what it receives to `out`."""

    def __init__(self, tmp: Path, port: int, ae_title: str = "PACS") -> None:
        self.port, self.ae_title = port, ae_title
        self.out = tmp / f"received-{port}"
        self.log_path = tmp / f"storescp-{port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> Storescp:
        if shutil.which("storescp") is None:
            pytest.fail("storescp not installed: run ./scripts/test, which installs DCMTK")
        self.out.mkdir(exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                "storescp",
                "-v",
                "-aet",
                self.ae_title,
                "-od",
                str(self.out),
                "+xa",
                "+uf",
                *extra,
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
        )
        log.close()
        deadline = time.monotonic() + 10
        while not listening(self.port):
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, (
                f"storescp did not listen on {self.port}:\n{self.log()}"
            )
            time.sleep(0.02)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def associations(self) -> int:
        return self.log().count("Association Received")

    def received(self) -> list[pydicom.FileDataset]:
        return [pydicom.dcmread(p) for p in sorted(self.out.iterdir())]


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., Storescp]]:
    started: list[Storescp] = []

    def start(*extra: str, port: int | None = None) -> Storescp:
        server = Storescp(tmp_path, port or free_port()).start(*extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def scus() -> Iterator[Callable[..., StoreSCU]]:
    made: list[StoreSCU] = []
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def make(port: int, ae_title: str = "PACS", **kwargs: float) -> StoreSCU:
        scu = BlockingRequestor(
            Requestor("GATEWAY", Destination(ae_title, "127.0.0.1", port), **kwargs), loop
        )
        made.append(scu)
        return scu

    yield make
    for scu in made:
        scu.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


class PynetdicomSCP:
    """A pynetdicom Storage SCP in this process: only `sop_classes`, answering `statuses` in turn."""

    def __init__(
        self,
        sop_classes: list[str],
        *,
        require_calling: list[str] | None = None,
        statuses: list[int] | None = None,
    ) -> None:
        self.associations = 0
        self.received: list[str] = []
        self._statuses = list(statuses or [])
        ae = AE(ae_title="PACS")
        for sop in sop_classes:
            ae.add_supported_context(sop, [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian])
        if require_calling is not None:
            ae.require_calling_aet = require_calling
        handlers = [(evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_C_STORE, self._on_store)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _on_accepted(self, event: evt.Event) -> None:
        self.associations += 1

    def _on_store(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self._statuses.pop(0) if self._statuses else 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pynetdicom_scp() -> Iterator[Callable[..., PynetdicomSCP]]:
    started: list[PynetdicomSCP] = []

    def start(sop_classes: list[str], **kwargs: object) -> PynetdicomSCP:
        scp = PynetdicomSCP(sop_classes, **kwargs)  # type: ignore[arg-type]
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def test_series_goes_over_one_association_with_pixels_intact(tmp_path, storescp, scus):
    files = dicomdata.make_mr_series(tmp_path / "mr", 20)
    server = storescp()
    scu = scus(server.port)
    results, times = [], []
    for f in files:
        started = time.monotonic()
        results.append(send(scu, f))
        times.append(time.monotonic() - started)
    scu.close()
    assert all(r.ok and r.status == 0x0000 and r.error == "" for r in results), results
    assert server.associations() == 1, server.log()
    # ~4 ms a file here; with Nagle's algorithm on our socket every file waits for storescp's
    # delayed ACK (>= 40 ms)
    assert statistics.median(times[1:]) < 0.03, times
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f).PixelData for f in files}
    received = {ds.SOPInstanceUID: ds.PixelData for ds in server.received()}
    assert received == sent


def test_files_go_as_stored_and_a_new_pair_reassociates(tmp_path, storescp, scus):
    generated = dicomdata.make_mr_series(tmp_path / "mr", 2)
    wheel = [WHEEL / name for name in WHEEL_FILES]
    # the same pairs again at the end: no new association for them
    files = [*generated, *wheel, generated[0], wheel[0], wheel[2]]
    pairs = {meta(f) for f in files}
    server = storescp()
    scu = scus(server.port)
    for f in files:
        result = send(scu, f)
        assert result.ok, (f.name, result)
    scu.close()
    assert server.associations() == len(pairs), server.log()  # one per new pair, none after
    received = {(ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID): ds for ds in server.received()}
    for f in files:
        ds = pydicom.dcmread(f)
        got = received[(ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID)]  # same syntax as stored
        assert got.PixelData == ds.PixelData, f.name


def test_destination_down_then_up(tmp_path, storescp, scus):
    port = free_port()
    scu = scus(port)
    (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1)
    down = send(scu, f)
    assert not down.ok and down.retryable and down.status is None
    assert down.error == f"connection refused at 127.0.0.1:{port}"
    server = storescp(port=port)
    up = send(scu, f)
    assert up.ok, up
    assert server.associations() == 1


def test_silent_destination_times_out(tmp_path, scus):
    (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1)
    with socket.socket() as listener:  # the kernel accepts the connection; nobody answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = send(scus(port, acse_timeout=0.5), f)
    assert not result.ok and result.retryable
    assert result.error == f"no association response from PACS at 127.0.0.1:{port} within 0.5 s"


def test_rejected_calling_ae_is_named(tmp_path, pynetdicom_scp, scus):
    scp = pynetdicom_scp([dicomdata.MR_IMAGE], require_calling=["SOMEONE"])
    scu = scus(scp.port)
    (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1)
    result = send(scu, f)
    assert not result.ok and result.retryable and result.status is None
    assert result.error == (
        f"association rejected by PACS at 127.0.0.1:{scp.port}: "
        "calling AE title not recognised (permanent, source: Service User)"
    )
    assert scp.received == []


def test_storescp_refusing_associations(tmp_path, storescp, scus):
    server = storescp("--refuse")
    scu = scus(server.port)
    (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1)
    result = send(scu, f)
    assert not result.ok and result.retryable
    assert result.error.startswith("association rejected by PACS"), result.error


def test_unsupported_sop_class_is_a_permanent_failure(tmp_path, pynetdicom_scp, scus):
    scp = pynetdicom_scp([dicomdata.CT_IMAGE])
    (ct,) = dicomdata.make_ct_series(tmp_path / "ct", 1, rows=32, cols=32)
    mr = dicomdata.make_mr_series(tmp_path / "mr", 2)
    # MR first, alone: the destination accepts the association but none of its contexts
    alone = send(scus(scp.port), mr[0])
    assert not alone.ok and not alone.retryable and alone.status is None
    assert "does not accept MR Image Storage in Explicit VR Little Endian" in alone.error, (
        alone.error
    )

    scp.associations = 0
    scu = scus(scp.port)
    assert send(scu, ct).ok
    result = send(scu, mr[0])  # new pair: re-associate with CT and MR; MR is refused
    assert not result.ok and not result.retryable
    assert result.error == (
        "destination PACS does not accept MR Image Storage in Explicit VR Little Endian "
        "(abstract syntax not supported)"
    )
    assert not send(scu, mr[1]).retryable  # known refused: answered without asking again
    assert send(scu, ct).ok
    assert scp.associations == 2
    assert len(scp.received) == 2


def test_statuses(tmp_path, pynetdicom_scp, scus):
    statuses = [0xB000, 0xA700, 0xC000, 0xA900, 0x0110, 0x0122, 0x0000]
    scp = pynetdicom_scp([dicomdata.MR_IMAGE], statuses=statuses)
    scu = scus(scp.port)
    files = dicomdata.make_mr_series(tmp_path / "mr", len(statuses))
    got = [send(scu, f) for f in files]
    assert [(r.ok, r.status, r.retryable) for r in got] == [
        (True, 0xB000, False),
        (False, 0xA700, True),
        (False, 0xC000, False),
        (False, 0xA900, False),
        (False, 0x0110, True),
        (False, 0x0122, False),
        (True, 0x0000, False),
    ]
    assert got[0].error == "warning 0xB000: Coercion of Data Elements"
    assert got[1].error == "PACS answered 0xA700 (Refused: Out of Resources)"
    assert scp.associations == 1  # failures do not cost the association


def test_storescp_killed_mid_stream(tmp_path, storescp, scus):
    files = dicomdata.make_mr_series(tmp_path / "mr", 10)
    server = storescp()
    scu = scus(server.port)
    assert all(send(scu, f).ok for f in files[:5])
    server.stop(signal.SIGKILL)
    killed = send(scu, files[5])
    assert not killed.ok and killed.retryable, killed
    assert f"127.0.0.1:{server.port}" in killed.error
    server.start()
    results = [send(scu, f) for f in files[5:]]
    assert all(r.ok for r in results), results
    assert server.associations() == 2, server.log()
    assert len(list(server.out.iterdir())) == 10


def test_abort_during_store_is_retryable(tmp_path, storescp, scus):
    server = storescp("--abort-after")
    scu = scus(server.port)
    files = dicomdata.make_mr_series(tmp_path / "mr", 2)
    for f in files:  # every send: a new association, aborted; nothing escapes
        result = send(scu, f)
        assert not result.ok and result.retryable and result.status is None, result
        assert "aborted during the C-STORE" in result.error


def test_dimse_timeout(tmp_path, storescp, scus):
    server = storescp("--sleep-during", "3")
    scu = scus(server.port, dimse_timeout=1)
    (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1)
    started = time.monotonic()
    result = send(scu, f)
    assert time.monotonic() - started < 2.5
    assert not result.ok and result.retryable
    assert result.error == "no C-STORE response from PACS within 1 s"


def test_close_and_release_if_idle(tmp_path, storescp, scus):
    server = storescp()
    scu = scus(server.port, idle_release=0.2)
    files = dicomdata.make_mr_series(tmp_path / "mr", 3)
    assert send(scu, files[0]).ok
    assert not scu.release_if_idle()  # just used
    time.sleep(0.3)
    assert scu.release_if_idle()
    assert send(scu, files[1]).ok
    scu.close()
    scu.close()  # twice is fine
    assert send(scu, files[2]).ok
    assert server.associations() == 3
    assert "Association Release" in server.log()


def test_unreadable_file_is_a_permanent_failure(tmp_path, storescp, scus):
    server = storescp()
    scu = scus(server.port)
    (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1)
    sop, ts = meta(f)
    missing = scu.send(tmp_path / "gone.dcm", sop, ts)
    assert not missing.ok and not missing.retryable and "gone.dcm" in missing.error
    assert send(scu, f).ok  # the association survives
    assert server.associations() == 1


def test_c_echo_on_the_reused_association(tmp_path, storescp, scus):
    server = storescp()
    scu = scus(server.port)
    echo = scu._run(scu.requestor.echo())
    assert echo.ok and echo.status == 0x0000, echo
    (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1)
    assert send(scu, f).ok  # a new pair: re-associated with both
    assert scu._run(scu.requestor.echo()).ok  # proposed already: no new association
    scu.close()
    assert server.associations() == 2, server.log()
    assert server.log().count("Received Echo Request") == 2
