"""Test helpers for the asyncio DICOM layer (dicomledger/dicom/net): the standalone server
in a thread of its own with a recording on_store, and a raw-socket DICOM client that sends
exactly the bytes a test wants (good or bad) and reads PDUs back.

    with NetServer(tmp_path) as server:          # or the net_server fixture
        dcmtk("echoscu", "-aec", server.ae_title, "127.0.0.1", str(server.port))
        assert server.received[0].sop_instance_uid == ...
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRqPdu
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext

from dicomledger.dicom.net import DicomServer, StoreRequest, dimse, pdu
from tests.dicomdata import MF_GRAY_WORD_SC, fake_uid

HOST = "127.0.0.1"
AE_TITLE = "NETSCP"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass(frozen=True)
class Received:
    request: StoreRequest
    path: Path  # where the harness moved the temp file

    @property
    def sop_instance_uid(self) -> str:
        return self.request.sop_instance_uid


class NetServer:
    """DicomServer on 127.0.0.1:<free port> in a thread with its own event loop.

    on_store records the request, moves the temp file to ``received_dir`` (so nothing
    fsyncs) and answers ``status`` (a number, or a callable of the request)."""

    def __init__(
        self,
        directory: Path,
        *,
        status: int | Callable[[StoreRequest], int] = 0,
        store_delay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.dir = directory
        self.temp_dir = directory / "tmp"
        self.received_dir = directory / "received"
        self.received_dir.mkdir(parents=True, exist_ok=True)
        self.received: list[Received] = []
        self.status = status
        self.store_delay = store_delay
        self.kwargs = {
            "ae_title": AE_TITLE,
            "host": HOST,
            "port": 0,
            "allowed_calling_aes": None,
            "temp_dir": self.temp_dir,
            "network_timeout": 30.0,
            **kwargs,
        }
        self.ae_title = self.kwargs["ae_title"]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="net-server", daemon=True)
        self.server: DicomServer | None = None
        self.port = 0
        self._count = 0

    async def _on_store(self, request: StoreRequest) -> int:
        if self.store_delay:
            await asyncio.sleep(self.store_delay)
        self._count += 1
        target = self.received_dir / f"{self._count:05d}.dcm"
        os.replace(request.dataset_path, target)
        self.received.append(Received(request, target))
        return self.status(request) if callable(self.status) else self.status

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> NetServer:
        self.thread.start()

        async def start() -> DicomServer:
            server = DicomServer(on_store=self._on_store, **self.kwargs)
            await server.start()
            return server

        self.server = self.call(start())
        self.port = self.server.port
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.server is not None:
                self.call(self.server.stop(grace=2.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def temp_files(self) -> list[Path]:
        return sorted(self.temp_dir.iterdir()) if self.temp_dir.exists() else []

    def connections(self) -> int:
        assert self.server is not None
        return self.call(_value(lambda: self.server.connections))  # type: ignore[union-attr]

    def associations(self) -> int:
        assert self.server is not None
        return self.call(_value(lambda: self.server.associations))  # type: ignore[union-attr]


async def _value(get: Callable[[], Any]) -> Any:
    return get()


def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """For a test module's ``logs`` fixture: structlog events of the test (all threads)."""
    with structlog.testing.capture_logs() as captured:
        yield captured


def events(captured: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in captured if e.get("event") == name]


def wait_until(
    condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition"
) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def dataset_bytes(path: Path) -> bytes:
    """The bytes after a Part 10 file's File Meta Information (its data set as encoded)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", path
    (group_length,) = struct.unpack_from("<I", data, 132 + 8)
    return data[132 + 12 + group_length :]


def rss(pid: int | None = None) -> int:
    return int(psutil.Process(pid or os.getpid()).memory_info().rss)


def copy_files(paths: Sequence[Path], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, directory / f"{i:03d}-{p.name}")) for i, p in enumerate(paths)]


def write_large_multiframe(path: Path, frames: int, rows: int = 512, cols: int = 512) -> int:
    """A valid multi-frame secondary capture of frames x rows x cols x 16 bit, written in
    chunks (pydicom would hold the pixels in memory). Returns the file size."""
    ds = Dataset()
    ds.SOPClassUID = MF_GRAY_WORD_SC
    ds.SOPInstanceUID = fake_uid("large-mf", frames)
    ds.StudyInstanceUID = fake_uid("large-mf-study")
    ds.SeriesInstanceUID = fake_uid("large-mf-series")
    ds.PatientID = "DLFAKE-LARGE"
    ds.Modality = "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    size = frames * rows * cols * 2
    frame = bytes(range(256)) * (rows * cols * 2 // 256)
    with open(path, "ab") as f:
        f.write(b"\xe0\x7f\x10\x00OW\x00\x00" + size.to_bytes(4, "little"))
        for k in range(frames):
            f.write(frame[k % 256 :] + frame[: k % 256])
    return path.stat().st_size


# --- a raw DICOM client ----------------------------------------------------------------------


def associate_rq(
    contexts: Sequence[tuple[int, str, Sequence[str]]] = (
        (1, VERIFICATION, (ImplicitVRLittleEndian,)),
    ),
    *,
    calling: str = "RAWSCU",
    called: str = AE_TITLE,
    max_pdu: int = 16384,
    roles: Sequence[tuple[str, bool, bool]] = (),
    async_ops: bool = False,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU encoded by pynetdicom; contexts as (id, abstract, syntaxes)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    for cid, abstract, syntaxes in contexts:
        cx = PresentationContext()
        cx.context_id = cid
        cx.abstract_syntax = abstract
        cx.transfer_syntax = list(syntaxes)
        primitive.presentation_context_definition_list.append(cx)
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3.4"
    info: list[Any] = [length, implementation]
    for uid, scu, scp in roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = uid, scu, scp
        info.append(role)
    if async_ops:
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 5
        info.append(window)
    primitive.user_information = info
    return bytes(AssociateRqPdu(primitive).encode())


class RawClient:
    """A TCP connection speaking PDUs byte by byte."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.message_id = 0

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def read_pdu(self) -> tuple[int, bytes]:
        pdu_type, length = pdu.PDU_HEADER.unpack(self.read_exactly(6))
        return pdu_type, self.read_exactly(length)

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """Reads until EOF (True) or timeout (False), dropping what comes."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def associate(self, rq: bytes | None = None) -> tuple[int, bytes]:
        self.send(rq if rq is not None else associate_rq())
        return self.read_pdu()

    def send_message(
        self, context_id: int, command: bytes, data_set: bytes | None = None, max_pdu: int = 0
    ) -> None:
        data = pdu.p_data(context_id, command, command=True, max_pdu_length=max_pdu)
        if data_set is not None:
            data += pdu.p_data(context_id, data_set, command=False, max_pdu_length=max_pdu)
        self.send(data)

    def read_response(self) -> dimse.Command:
        """One command set (reassembled from its PDVs); data sets of Pending responses are skipped."""
        command = bytearray()
        while True:
            pdu_type, body = self.read_pdu()
            if pdu_type != pdu.P_DATA_TF:
                raise AssertionError(f"expected P-DATA-TF, got PDU type {pdu_type}: {body.hex()}")
            pos = 0
            while pos < len(body):
                length, _cid, control = pdu.PDV_HEADER.unpack_from(body, pos)
                value = body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if control & pdu.MESSAGE_COMMAND:
                    command += value
                    if control & pdu.MESSAGE_LAST:
                        parsed = dimse.parse_command(command)
                        if not parsed.has_data_set:
                            return parsed
                        self.pending_command = parsed
                elif control & pdu.MESSAGE_LAST:
                    return self.pending_command

    def echo(self, context_id: int = 1) -> int:
        self.message_id += 1
        self.send_message(
            context_id,
            dimse.request(
                dimse.C_ECHO_RQ, self.message_id, VERIFICATION.encode(), has_data_set=False
            ),
        )
        status = self.read_response().us(dimse.STATUS)
        assert status is not None
        return status

    def release(self) -> int:
        self.send(pdu.PDU_HEADER.pack(pdu.A_RELEASE_RQ, 4) + bytes(4))
        return self.read_pdu()[0]


def established(port: int, rq: bytes | None = None) -> RawClient:
    client = RawClient(port)
    pdu_type, body = client.associate(rq)
    assert pdu_type == pdu.A_ASSOCIATE_AC, (pdu_type, body.hex())
    return client


def run_in_threads(funcs: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run callables concurrently; their results in order (exceptions re-raised)."""
    futures: list[Future[Any]] = []
    threads = []
    for func in funcs:
        fut: Future[Any] = Future()

        def run(f: Callable[[], Any] = func, out: Future[Any] = fut) -> None:
            try:
                out.set_result(f())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                out.set_exception(exc)

        thread = threading.Thread(target=run)
        thread.start()
        threads.append(thread)
        futures.append(fut)
    for thread in threads:
        thread.join()
    return [f.result() for f in futures]


EXPLICIT = ExplicitVRLittleEndian
IMPLICIT = ImplicitVRLittleEndian
