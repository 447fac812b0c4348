"""The asyncio DICOM layer (dicomledger/dicom/net), standalone, driven by real third-party
senders: DCMTK echoscu/storescu/dcmsend/findscu, pynetdicom's apps and its SCU, and GDCM's
gdcmscu. The server runs in the test's process (tests/netharness.py) with an on_store that
only records what arrived; files are checked byte for byte against what was sent."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicomledger.dicom.net import dimse, pdu
from dicomledger.dicom.net.operation import MemorySink, Operation, Sink
from dicomledger.dicom.qr import QRRequest
from dicomledger.dicom.query import QueryError
from tests import dicomdata
from tests.conftest import DCMTK_ENV, dcmtk, free_port
from tests.netharness import (
    AE_TITLE,
    HOST,
    VERIFICATION,
    NetServer,
    associate_rq,
    captured_logs,
    dataset_bytes,
    established,
    events,
    rss,
    wait_until,
    write_large_multiframe,
)
from tests.test_storage_scp import OPTION_FOR_SYNTAX

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.e2e]
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    yield from captured_logs()


@pytest.fixture
def server(tmp_path: Path) -> Any:
    with NetServer(tmp_path / "server") as srv:
        yield srv


def pynetdicom_app(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pynetdicom", *args], capture_output=True, text=True, timeout=timeout
    )


def assert_arrived_as_sent(server: NetServer, files: list[Path]) -> None:
    """Every file arrived once, in its own transfer syntax, data set byte-identical."""
    by_uid = {r.sop_instance_uid: r for r in server.received}
    for f in files:
        sent = pydicom.dcmread(f, stop_before_pixels=True)
        got = by_uid[str(sent.SOPInstanceUID)]
        assert got.request.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID, f.name
        assert got.request.sop_class_uid == sent.SOPClassUID
        meta = pydicom.dcmread(got.path, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
        assert dataset_bytes(got.path) == dataset_bytes(f), f"{f.name}: data set bytes differ"


def test_echo_from_dcmtk_pynetdicom_and_gdcm(server: NetServer, logs: list[dict[str, Any]]) -> None:
    result = dcmtk("echoscu", "-v", "-aet", "ECHOSCU", "-aec", AE_TITLE, HOST, str(server.port))
    assert result.returncode == 0, result.stderr
    result = pynetdicom_app("echoscu", HOST, str(server.port), "-aec", AE_TITLE)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(
        ["gdcmscu", "--echo", "-D", "--call", AE_TITLE, HOST, str(server.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # gdcmscu aborts on every A-RELEASE-RP (exit 134): judge by its trace of our C-ECHO-RSP
    trace = result.stdout + result.stderr
    assert "(0000,0100) ?? (US) 32816" in trace and "(0000,0900) ?? (US) 0 " in trace, trace[-3000:]
    ended = events(logs, "association")
    assert [e["calling_ae"] for e in ended] == ["ECHOSCU", "ECHOSCU", "GDCMSCU"]
    assert [e["ended"] for e in ended] == ["released"] * 3
    assert server.received == []


def test_storescu_series_and_directories_arrive_byte_identical(
    server: NetServer, tmp_path: Path
) -> None:
    mr = dicomdata.make_mr_series(tmp_path / "send" / "mr", 12, seed="net")
    ct = dicomdata.make_ct_series(
        tmp_path / "send" / "ct" / "deeper", 3, seed="net", rows=128, cols=128
    )
    sr = dicomdata.make_sr(tmp_path / "send" / "sr")
    result = dcmtk(
        "storescu",
        "-v",
        "-aet",
        "STORESCU",
        "-aec",
        AE_TITLE,
        "+sd",
        "+r",
        HOST,
        str(server.port),
        str(tmp_path / "send"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).count("Received Store Response (Success)") == 16
    assert_arrived_as_sent(server, [*mr, *ct, sr])
    first = server.received[0].request
    assert first.calling_ae == "STORESCU" and first.peer.startswith("127.0.0.1:")
    assert server.temp_files() == []
    wait_until(lambda: server.associations() == 0, what="the association to end")


def storescp_receives(files: list[Path], options: list[str], directory: Path) -> list[bytes]:
    """The data sets DCMTK's storescp +B (bit-preserving, all syntaxes) writes when storescu
    sends ``files`` with ``options``: what went on the wire (storescu re-encodes some files)."""
    directory.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "+B", "+xa", "+uf", "-aet", "STORESCP", "-od", str(directory), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: dcmtk("echoscu", "-aec", "STORESCP", HOST, str(port)).returncode == 0,
            what="storescp",
        )
        dcmtk(
            "storescu",
            "-aet",
            "STORESCU",
            "-aec",
            "STORESCP",
            *options,
            HOST,
            str(port),
            *map(str, files),
        )
    finally:
        proc.terminate()
        proc.wait(30)
    return sorted(dataset_bytes(p) for p in directory.iterdir())


def test_compressed_files_are_received_in_their_own_syntax(
    server: NetServer, tmp_path: Path
) -> None:
    by_option: dict[str, list[Path]] = {}
    for path, syntax in dicomdata.wheel_test_files(compressed_only=True):
        if syntax in OPTION_FOR_SYNTAX:
            by_option.setdefault(OPTION_FOR_SYNTAX[syntax], []).append(path)
    assert {"-xs", "-xy", "-xt", "-xv", "-xr", "-xd"} <= set(by_option)
    for option, paths in sorted(by_option.items()):
        before = len(server.received)
        result = dcmtk(
            "storescu",
            "-v",
            "-aet",
            "STORESCU",
            "-aec",
            AE_TITLE,
            option,
            "--no-halt",
            HOST,
            str(server.port),
            *map(str, paths),
        )
        arrived = server.received[before:]
        assert (
            len(arrived)
            == (result.stdout + result.stderr).count("Received Store Response (Success)")
            > 0
        )
        # byte for byte what DCMTK's own bit-preserving receiver gets from the same sender
        wire = storescp_receives(paths, [option, "--no-halt"], tmp_path / f"storescp{option}")
        assert sorted(dataset_bytes(r.path) for r in arrived) == wire, option
        for got in arrived:
            meta = pydicom.dcmread(got.path, stop_before_pixels=True).file_meta
            assert meta.TransferSyntaxUID == got.request.transfer_syntax_uid
    syntaxes = {r.request.transfer_syntax_uid for r in server.received}
    for wanted in (
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.1.99",
    ):
        assert wanted in syntaxes, f"nothing arrived in {wanted}"


def test_dcmsend_keeps_each_files_syntax(server: NetServer, tmp_path: Path) -> None:
    """dcmsend proposes a compressed file's own syntax first, then Explicit, Big Endian and
    Implicit: taking the sender's first choice means it does not decompress."""
    (mr,) = dicomdata.make_mr_series(tmp_path / "mr", 1, seed="dcmsend")
    copies = dicomdata.make_compressed_copies(mr, tmp_path / "copies")
    files = [mr, *copies.values()]
    for f in files:  # one file each: its context proposes its own syntax first
        result = dcmtk(
            "dcmsend", "-aet", "STORESCU", "-aec", AE_TITLE, HOST, str(server.port), str(f)
        )
        assert result.returncode == 0, result.stdout + result.stderr
    assert len(server.received) == len(files) >= 10
    for f, got in zip(files, server.received, strict=True):
        own = pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
        # dcmsend proposes [Explicit LE, Explicit BE, Implicit] for any uncompressed file
        expected = own if own.is_encapsulated or own.is_deflated else ExplicitVRLittleEndian
        assert got.request.transfer_syntax_uid == expected, f.name
        if expected == own:
            assert dataset_bytes(got.path) == dataset_bytes(f), f.name


def test_pynetdicom_storescu_app_and_gdcmscu_store(server: NetServer, tmp_path: Path) -> None:
    mr = dicomdata.make_mr_series(tmp_path / "mr", 3, seed="apps")
    result = pynetdicom_app("storescu", HOST, str(server.port), *map(str, mr[:2]), "-aec", AE_TITLE)
    assert result.returncode == 0, result.stderr
    assert {r.sop_instance_uid for r in server.received} == {
        str(pydicom.dcmread(f).SOPInstanceUID) for f in mr[:2]
    }
    for got in server.received:  # pynetdicom's app re-encodes: compare element by element
        sent = next(f for f in mr if str(pydicom.dcmread(f).SOPInstanceUID) == got.sop_instance_uid)
        assert pydicom.dcmread(got.path).PixelData == pydicom.dcmread(sent).PixelData

    before = len(server.received)
    subprocess.run(
        ["gdcmscu", "--store", "--call", AE_TITLE, "-i", str(mr[2]), HOST, str(server.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )  # its exit code: 134 on every A-RELEASE-RP
    assert [r.sop_instance_uid for r in server.received[before:]] == [
        str(pydicom.dcmread(mr[2]).SOPInstanceUID)
    ]
    assert pydicom.dcmread(server.received[-1].path).PixelData == pydicom.dcmread(mr[2]).PixelData


def test_thirty_single_image_associations_in_a_row(
    server: NetServer, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    files = dicomdata.make_ct_series(tmp_path / "ct", 30, seed="one-each", rows=64, cols=64)
    for f in files:
        result = dcmtk("storescu", "-aet", "PACS", "-aec", AE_TITLE, HOST, str(server.port), str(f))
        assert result.returncode == 0, result.stdout + result.stderr
    assert_arrived_as_sent(server, files)
    wait_until(lambda: len(events(logs, "association")) == 30, what="30 association lines")
    assert all(e["ended"] == "released" and e["stores"] == 1 for e in events(logs, "association"))
    assert server.associations() == 0 and server.temp_files() == []


@pytest.mark.parametrize(
    "proposed, expected",
    [
        ((ExplicitVRLittleEndian, ImplicitVRLittleEndian), ExplicitVRLittleEndian),
        ((ImplicitVRLittleEndian, ExplicitVRLittleEndian), ImplicitVRLittleEndian),
    ],
)
def test_transfer_syntax_is_the_senders_choice_on_the_wire(
    server: NetServer, tmp_path: Path, proposed: tuple[str, ...], expected: str
) -> None:
    (f,) = dicomdata.make_ct_series(tmp_path / "ct", 1, seed="order", rows=32, cols=32)
    ae = AE(ae_title="ORDER")
    ae.requested_contexts = [build_context(dicomdata.CT_IMAGE, list(proposed))]
    assoc = ae.associate(HOST, server.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        assert assoc.accepted_contexts[0].transfer_syntax[0] == expected
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
    finally:
        assoc.release()
    assert server.received[0].request.transfer_syntax_uid == expected


def test_refusals_over_the_wire(tmp_path: Path, logs: list[dict[str, Any]]) -> None:
    (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1, seed="refused")
    with NetServer(
        tmp_path / "srv", allowed_calling_aes=["STORESCU"], max_associations=2
    ) as server:
        result = dcmtk(
            "storescu", "-aet", "INTRUDER", "-aec", AE_TITLE, HOST, str(server.port), str(f)
        )
        assert result.returncode != 0 and "Association Rejected" in result.stdout + result.stderr
        assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
        result = dcmtk(
            "storescu", "-aet", "STORESCU", "-aec", "SOMEONE", HOST, str(server.port), str(f)
        )
        assert "Called AE Title Not Recognized" in result.stdout + result.stderr
        refused = events(logs, "association refused")
        assert [r["calling_ae"] for r in refused] == ["INTRUDER", "STORESCU"]
        assert "allowed_calling_aes" in refused[0]["reason"] and "'SOMEONE'" in refused[1]["reason"]

        holders = [established(server.port, associate_rq(calling="STORESCU")) for _ in range(2)]
        result = dcmtk(
            "storescu", "-v", "-aet", "STORESCU", "-aec", AE_TITLE, HOST, str(server.port), str(f)
        )
        out = result.stdout + result.stderr
        assert "Rejected Transient" in out and "Local Limit Exceeded" in out, out
        assert "max_associations" in events(logs, "association refused")[-1]["reason"], logs
        for holder in holders:
            holder.release()
            holder.close()
        wait_until(lambda: server.associations() == 0, what="places to free")
        result = dcmtk(
            "storescu", "-aet", "STORESCU", "-aec", AE_TITLE, HOST, str(server.port), str(f)
        )
        assert result.returncode == 0
    assert len(server.received) == 1


# --- C-FIND ------------------------------------------------------------------------------


class ListCore:
    """A RetrieveCore whose find() answers a fixed list of studies (the gateway's core
    decides matches and permissions; this layer only speaks DIMSE)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.requests: list[QRRequest] = []

    async def find(self, request: QRRequest) -> list[Dataset]:
        self.requests.append(request)
        if "PatientID" in request.identifier and request.identifier.PatientID == "REFUSE":
            raise QueryError("refused by the core", 0xA900)
        out = []
        for k in range(self.count):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = f"1.2.3.{k + 1}"
            ds.RetrieveAETitle = AE_TITLE
            out.append(ds)
        return out

    async def plan(self, request: QRRequest) -> Any:
        raise NotImplementedError

    async def load(self, sub: Any) -> Any:
        raise NotImplementedError

    async def finish(self, request: QRRequest, plan: Any, outcome: Any) -> None:
        raise NotImplementedError


def test_c_find_with_findscu_pynetdicom_and_cancel(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    core = ListCore(5)
    with NetServer(tmp_path / "srv", query_retrieve=core) as server:
        result = dcmtk(
            "findscu",
            "-v",
            "-aet",
            "WS1",
            "-aec",
            AE_TITLE,
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
            HOST,
            str(server.port),
        )
        out = result.stdout + result.stderr
        assert result.returncode == 0, out
        assert out.count("(Pending)") == 5 and "Received Final Find Response (Success)" in out, out
        assert core.requests[0].calling_ae == "WS1" and core.requests[0].model == "study"

        result = pynetdicom_app(
            "findscu",
            HOST,
            str(server.port),
            "-aec",
            AE_TITLE,
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientID=REFUSE",
        )
        assert "0xA900" in result.stdout + result.stderr or "A900" in result.stderr, result.stderr

        core.count = 3000
        ae = AE(ae_title="WS1")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate(HOST, server.port, ae_title=AE_TITLE)
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        statuses = []
        for status, _identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind, msg_id=7
        ):
            statuses.append(status.Status)
            if len(statuses) == 3:
                assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
        assert statuses[-1] == 0xFE00, statuses[-10:]
        assert 3 <= len(statuses) < 3000
        assoc.release()
    assert events(logs, "association")[-1]["ended"] == "released"


# --- a 1 GB multi-frame object: streamed, never in memory ----------------------------------


@pytest.mark.slow
def test_a_1_gb_multiframe_streams_to_disk_with_flat_memory(tmp_path: Path) -> None:
    big = tmp_path / "big.dcm"
    size = write_large_multiframe(big, frames=2000)  # 1.05 GB
    assert size > 1_000_000_000
    with NetServer(tmp_path / "srv") as server:
        baseline = peak = rss()
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.05):
                peak = max(peak, rss())

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            started = time.monotonic()
            result = subprocess.run(
                [
                    "storescu",
                    "-aet",
                    "STORESCU",
                    "-aec",
                    AE_TITLE,
                    HOST,
                    str(server.port),
                    str(big),
                ],
                capture_output=True,
                text=True,
                timeout=600,
                env=DCMTK_ENV,
            )
            elapsed = time.monotonic() - started
        finally:
            done.set()
            sampler.join()
        assert result.returncode == 0, result.stdout + result.stderr
        (got,) = server.received
        assert dataset_digest(got.path) == dataset_digest(big)
        got.path.unlink()  # 2 GB in pytest's kept temp dirs otherwise
        big.unlink()
    grown = (peak - baseline) / 1e6
    print(
        f"1 GB multi-frame: {size / 1e6 / elapsed:.0f} MB/s, server RSS grew {grown:.0f} MB "
        f"(peak {peak / 1e6:.0f} MB)"
    )
    assert grown < 100, f"RSS grew {grown:.0f} MB while receiving"
    assert peak < 400e6


def dataset_digest(path: Path) -> str:
    """SHA-256 of the data set part of a Part 10 file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(144)
        f.seek(144 + int.from_bytes(head[140:144], "little"))
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- the shape of C-GET (phase 2): a service that sends requests on the requestor's association


class AskBack:
    """Sends a C-ECHO-RQ of its own to the requestor on the same association and answers
    the request with the status the requestor gave it: what C-GET does with C-STOREs."""

    name = "C-GET"
    cancellable = True  # reads go on: the responses to our requests must reach us
    abstract_syntaxes = {STUDY_ROOT_GET: ("1.2.840.10008.1.2",)}

    def check(self, op: Operation) -> None:
        pass

    def open_sink(self, op: Operation, temp_name: str) -> Sink:
        return MemorySink()

    async def serve(self, op: Operation) -> None:
        op.expect_responses()
        verification = next(cx for cx in op.contexts.values() if cx.abstract_syntax == VERIFICATION)
        op.send_request(
            verification.context_id,
            dimse.request(dimse.C_ECHO_RQ, 77, VERIFICATION.encode(), has_data_set=False),
        )
        answer = await op.response()
        assert answer is not None and answer.message_id == 77
        status = answer.us(dimse.STATUS) or 0
        op.respond(dimse.failure_response(op.command, status), status)


def test_a_service_can_send_requests_on_the_association_and_read_their_responses(
    tmp_path: Path,
) -> None:
    with NetServer(tmp_path / "srv", services={dimse.C_GET_RQ: AskBack()}) as server:
        rq = associate_rq(
            [(1, VERIFICATION, ("1.2.840.10008.1.2",)), (3, STUDY_ROOT_GET, ("1.2.840.10008.1.2",))]
        )
        with established(server.port, rq) as client:
            client.send_message(
                3,
                dimse.request(dimse.C_GET_RQ, 5, STUDY_ROOT_GET.encode(), has_data_set=True),
                b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ",
            )
            asked = client.read_response()  # the server's own C-ECHO-RQ
            assert (asked.field, asked.message_id) == (dimse.C_ECHO_RQ, 77)
            client.send_message(1, dimse.echo_response(77, VERIFICATION.encode(), 0xABCD))
            answer = client.read_response()
            assert (answer.field, answer.message_id, answer.us(dimse.STATUS)) == (
                dimse.C_GET_RSP,
                5,
                0xABCD,
            )
            assert client.echo() == 0
            assert client.release() == pdu.A_RELEASE_RP
