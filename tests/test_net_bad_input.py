"""Bad input on the asyncio DICOM layer: every case is answered as PS3.8's
state machine or PS3.7 says (A-ASSOCIATE-RJ, A-ABORT or a DIMSE failure status), with one
log line naming the reason, bounded memory, no temp file left, and other associations
unaffected (a bystander association answers a C-ECHO before and after). Ends with a seeded
fuzz of whole sessions on the wire."""

from __future__ import annotations

import asyncio
import random
import resource
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicomledger.dicom.net import dimse, pdu
from tests import dicomdata
from tests.conftest import dcmtk
from tests.netharness import (
    AE_TITLE,
    CT_IMAGE,
    EXPLICIT,
    HOST,
    IMPLICIT,
    VERIFICATION,
    NetServer,
    RawClient,
    associate_rq,
    captured_logs,
    established,
    events,
    rss,
    run_in_threads,
    wait_until,
)
from tests.test_net_codecs import rq_with_context_ids

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.e2e]


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    yield from captured_logs()


CT_CONTEXTS = ((1, VERIFICATION, (IMPLICIT,)), (3, CT_IMAGE, (EXPLICIT,)))
STORE_RQ = associate_rq(CT_CONTEXTS)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NetServer]:
    with NetServer(tmp_path / "server", artim_timeout=2.0, network_timeout=60.0) as srv:
        yield srv


@pytest.fixture
def bystander(server: NetServer) -> Iterator[RawClient]:
    """An association that must not notice anything."""
    client = established(server.port)
    assert client.echo() == 0
    yield client
    assert client.echo() == 0, "another association was affected"
    assert client.release() == pdu.A_RELEASE_RP
    client.close()


def expect_abort(client: RawClient, source: int, reason: int | None = None) -> None:
    pdu_type, body = client.read_pdu()
    assert pdu_type == pdu.A_ABORT, (pdu_type, body.hex())
    assert body[2] == source, body.hex()
    if reason is not None:
        assert body[3] == reason, body.hex()


def one_line(captured: list[dict[str, Any]], event: str, text: str) -> dict[str, Any]:
    """The one log line of ``event`` whose reason names ``text`` (waits for it)."""
    wait_until(
        lambda: [e for e in events(captured, event) if text in str(e.get("reason"))],
        10,
        f"{event}: {text}",
    )
    matching = [e for e in events(captured, event) if text in str(e.get("reason"))]
    assert len(matching) == 1, matching
    return matching[0]


def small_ct(tmp_path: Path) -> tuple[str, bytes]:
    (f,) = dicomdata.make_ct_series(tmp_path / "ct", 1, seed="bad-input", rows=16, cols=16)
    ds = pydicom.dcmread(f)
    from tests.netharness import dataset_bytes

    return str(ds.SOPInstanceUID), dataset_bytes(f)


def store_command(message_id: int, sop_instance_uid: bytes) -> bytes:
    return dimse.request(
        dimse.C_STORE_RQ,
        message_id,
        CT_IMAGE.encode(),
        has_data_set=True,
        sop_instance_uid=sop_instance_uid,
    )


# --- connections that never associate ----------------------------------------------------


def test_stalled_connections_neither_lock_out_senders_nor_stay(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """64 connections send 3 bytes of a PDU header and stop: a real sender still gets in at
    once (they hold no association place), and ARTIM closes each of them."""
    (f,) = dicomdata.make_ct_series(tmp_path / "ct", 1, seed="artim", rows=16, cols=16)
    with NetServer(tmp_path / "srv", max_associations=4, artim_timeout=1.5) as server:
        stalled = []
        for _ in range(64):
            client = RawClient(server.port)
            client.send(b"\x01\x00\x00")
            stalled.append(client)
        wait_until(lambda: server.connections() == 64, what="64 connections")
        started = time.monotonic()
        result = dcmtk(
            "storescu", "-aet", "STORESCU", "-aec", AE_TITLE, HOST, str(server.port), str(f)
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert time.monotonic() - started < 1.5  # not after ARTIM freed anything
        for client in stalled:
            assert client.closed_by_peer(timeout=10), "ARTIM did not close a stalled connection"
            client.close()
        artim = [e for e in events(logs, "connection closed") if "ARTIM" in e["reason"]]
        assert len(artim) == 64 and "no A-ASSOCIATE-RQ within 1.5 s" in artim[0]["reason"]
        wait_until(lambda: server.connections() == 0, what="all connections closed")
    assert len(server.received) == 1


def test_oldest_waiting_connections_are_closed_beyond_the_cap(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    with NetServer(tmp_path / "srv", max_associations=1, artim_timeout=30) as server:
        assert server.server is not None and server.server.max_waiting == 256
        silent = [RawClient(server.port) for _ in range(260)]
        wait_until(lambda: len(events(logs, "connection closed")) == 4, what="4 evictions")
        for client in silent[:4]:
            assert client.closed_by_peer(timeout=5)
        with established(server.port) as late:  # a real association is never the one closed
            assert late.echo() == 0
            late.release()
        for client in silent:
            client.close()


def test_p_data_before_association(
    server: NetServer, bystander: RawClient, logs: list[dict[str, Any]]
) -> None:
    with RawClient(server.port) as client:
        client.send_message(
            1, dimse.request(dimse.C_ECHO_RQ, 1, VERIFICATION.encode(), has_data_set=False)
        )
        expect_abort(client, pdu.ABORT_SOURCE_USER)  # PS3.8 AA-1
        assert client.closed_by_peer()  # Sta13: ARTIM closes it if the peer does not
    line = one_line(logs, "association aborted", "P-DATA-TF before an A-ASSOCIATE-RQ")
    assert line["state"] == "awaiting A-ASSOCIATE-RQ"


@pytest.mark.parametrize(
    "rq, reason",
    [
        (rq_with_context_ids([2]), "presentation context ID 2 "),
        (
            rq_with_context_ids([1 + 2 * (k % 128) for k in range(1000)]),
            "1000 presentation contexts",
        ),
        (pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_RQ, 0xFFFFFFFF), "declares 4294967295 bytes"),
        (pdu.PDU_HEADER.pack(0x09, 4) + bytes(4), "unknown PDU type 0x09"),
        (
            pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_RQ, 44) + associate_rq()[6:50],
            "shorter than its fixed fields",
        ),
    ],
    ids=["even-context-id", "1000-contexts", "length-0xffffffff", "unknown-pdu-type", "truncated"],
)
def test_invalid_associate_requests_are_aborted(
    server: NetServer, bystander: RawClient, rq: bytes, reason: str, logs: list[dict[str, Any]]
) -> None:
    before = rss()
    with RawClient(server.port) as client:
        client.send(rq)
        expect_abort(client, pdu.ABORT_SOURCE_USER)
    one_line(logs, "association aborted", reason)
    assert rss() - before < 20e6  # nothing was buffered for the declared length


def big_rq(k: int) -> bytes:
    """A valid A-ASSOCIATE-RQ of about 200 KiB, distinct for each k (pynetdicom needs a few
    tenths of a second of Python to decode one)."""
    syntaxes = [f"1.2.826.0.1.3680043.10.{k}.{n}" for n in range(50)] + [str(EXPLICIT)]
    return associate_rq([(2 * i + 1, f"1.2.840.10008.5.1.4.1.1.{i}", syntaxes) for i in range(60)])


def test_decoding_large_requests_does_not_stall_other_associations(tmp_path: Path) -> None:
    """Six never-seen 200 KiB A-ASSOCIATE-RQs at once: they are decoded one after the other
    in a worker thread, and the bystander's C-ECHO is answered before the last of them."""
    answered: list[tuple[str, float]] = []
    server = NetServer(tmp_path / "srv", artim_timeout=60).__enter__()
    bystander = established(server.port)
    requests = [big_rq(k) for k in range(6)]  # built first: they arrive together
    flood = [RawClient(server.port, timeout=60) for _ in range(6)]
    for client, rq in zip(flood, requests, strict=True):
        client.send(rq)

    def flood_answer(client: RawClient) -> None:
        assert client.read_pdu()[0] == pdu.A_ASSOCIATE_AC
        answered.append(("flood", time.monotonic()))

    def echo() -> None:
        time.sleep(0.05)  # after the flood has arrived
        assert bystander.echo() == 0
        answered.append(("echo", time.monotonic()))

    try:
        run_in_threads([*(lambda c=c: flood_answer(c) for c in flood), echo])
    finally:
        for client in [*flood, bystander]:
            client.close()
        server.__exit__(None, None, None)
    order = [who for who, _ in sorted(answered, key=lambda x: x[1])]
    assert order.index("echo") < len(order) - 1, order


@pytest.mark.parametrize(
    "patch, code",
    [
        (lambda rq: rq[:6] + b"\x00\x02" + rq[8:], (1, 2, 2)),  # protocol version without bit 0
        (lambda rq: rq.replace(b"1.2.840.10008.3.1.1.1", b"1.2.840.10008.3.1.1.9"), (1, 1, 2)),
    ],
    ids=["protocol-version", "application-context"],
)
def test_unsupported_protocol_version_and_context_are_rejected(
    server: NetServer, patch: Any, code: tuple[int, ...], logs: list[dict[str, Any]]
) -> None:
    with RawClient(server.port) as client:
        pdu_type, body = client.associate(patch(associate_rq()))
        assert (pdu_type, tuple(body[1:4])) == (pdu.A_ASSOCIATE_RJ, code)
    assert len(events(logs, "association refused")) == 1


# --- established associations --------------------------------------------------------------


@pytest.mark.parametrize(
    "uid, reason",
    [
        (b"", "empty Affected SOP Instance UID"),
        (b"1." + b"2" * 63, "Affected SOP Instance UID of 65 characters"),
        (b"1.2.3.x", "characters other than digits"),
    ],
    ids=["empty", "65-characters", "letters"],
)
def test_bad_affected_sop_instance_uid_gets_a_failure_status(
    server: NetServer,
    bystander: RawClient,
    tmp_path: Path,
    uid: bytes,
    reason: str,
    logs: list[dict[str, Any]],
) -> None:
    _, data = small_ct(tmp_path)
    with established(server.port, STORE_RQ) as client:
        client.send_message(3, store_command(11, uid), data, max_pdu=4096)
        response = client.read_response()
        assert (response.field, response.message_id) == (dimse.C_STORE_RSP, 11)
        assert response.us(dimse.STATUS) == dimse.CANNOT_UNDERSTAND
        assert reason in (response.text(dimse.ERROR_COMMENT) or "")
        assert client.echo() == 0  # the association goes on
        assert client.release() == pdu.A_RELEASE_RP
    line = one_line(logs, "request refused", reason)
    assert line["status"] == "0xC000" and line["service"] == "C-STORE"
    assert server.received == [] and server.temp_files() == []


def test_requests_not_served_or_on_the_wrong_context(
    server: NetServer, bystander: RawClient, logs: list[dict[str, Any]]
) -> None:
    with established(server.port, STORE_RQ) as client:
        client.send_message(
            1, dimse.request(0x0110, 5, VERIFICATION.encode(), has_data_set=False)
        )  # N-GET
        response = client.read_response()
        assert (response.field, response.message_id, response.us(dimse.STATUS)) == (
            0x8110,
            5,
            0x0211,
        )
        client.send_message(1, store_command(6, b"1.2.3"), b"\x08\x00\x16\x00\x00\x00\x00\x00")
        response = client.read_response()  # C-STORE on the Verification context
        assert (response.field, response.us(dimse.STATUS)) == (
            dimse.C_STORE_RSP,
            dimse.SOP_CLASS_NOT_SUPPORTED,
        )
        client.send_message(
            3, dimse.request(dimse.C_FIND_RQ, 7, CT_IMAGE.encode(), has_data_set=True), b""
        )
        assert client.read_response().us(dimse.STATUS) == 0x0211  # no Query/Retrieve configured
        assert client.echo() == 0
    assert [e["status"] for e in events(logs, "request refused")] == ["0x0211", "0x0122", "0x0211"]


GOOD = dimse.request(dimse.C_ECHO_RQ, 1, VERIFICATION.encode(), has_data_set=False)


@pytest.mark.parametrize(
    "bad, reason, source, code",
    [
        (
            pdu.p_data(2, GOOD, command=True, max_pdu_length=0),
            "presentation context 2, which was not accepted",
            2,
            6,
        ),
        (pdu.PDU_HEADER.pack(0x09, 4) + bytes(4), "unknown PDU type 0x09", 2, 1),
        (associate_rq(), "A-ASSOCIATE-RQ on an established association", 2, 2),
        (
            pdu.p_data(1, GOOD[:-5], command=True, max_pdu_length=0),
            "command set does not parse",
            0,
            0,
        ),
        (
            pdu.p_data(
                1,
                dimse._group(
                    dimse._US.pack(0, 0x100, 2, 0x1234)
                    + dimse._US.pack(0, 0x110, 2, 1)
                    + dimse._US.pack(0, 0x800, 2, 0x101)
                ),
                command=True,
                max_pdu_length=0,
            ),
            "unknown command field 0x1234",
            0,
            0,
        ),
        (
            pdu.p_data(1, b"\x08\x00\x16\x00\x00\x00\x00\x00", command=False, max_pdu_length=0),
            "data set fragment without a command",
            2,
            5,
        ),
        (
            pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 0xFFFFFFFF)
            + pdu.PDV_HEADER.pack(0xFFFFFF00, 1, 3)
            + bytes(70_000),
            "command set longer than 65536 bytes",
            2,
            6,
        ),
    ],
    ids=[
        "even-context-in-p-data",
        "unknown-pdu",
        "second-rq",
        "command-does-not-parse",
        "unknown-command",
        "data-without-command",
        "huge-command-set",
    ],
)
def test_protocol_violations_abort_the_association(
    server: NetServer,
    bystander: RawClient,
    bad: bytes,
    reason: str,
    source: int,
    code: int,
    logs: list[dict[str, Any]],
) -> None:
    with established(server.port) as client:
        client.send(bad)
        expect_abort(client, source, code)
    line = one_line(logs, "association aborted", reason)
    assert line["calling_ae"] == "RAWSCU"
    wait_until(lambda: server.associations() == 1, what="only the bystander left")


def test_a_pdu_declaring_0xffffffff_streams_with_flat_memory(
    server: NetServer, bystander: RawClient, logs: list[dict[str, Any]]
) -> None:
    """A P-DATA-TF PDU declaring 0xFFFFFFFF bytes with a data set in it: the bytes go to the
    temp file as they come, memory stays flat; a reset mid-way removes the file."""
    command = store_command(1, b"1.2.3.4")
    command_item = 4 + 2 + len(command)
    with established(server.port, STORE_RQ) as client:
        client.send(
            pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 0xFFFFFFFF)
            + pdu.PDV_HEADER.pack(len(command) + 2, 3, 3)
            + command
            + pdu.PDV_HEADER.pack(0xFFFFFFFF - command_item - 4, 3, 0)
        )
        chunk = bytes(1 << 20)
        before = rss()
        for _ in range(200):  # 200 MiB
            client.send(chunk)
        wait_until(
            lambda: server.temp_files() and server.temp_files()[0].stat().st_size > 150 << 20,
            what="the data set on disk",
        )
        assert rss() - before < 50e6
        client.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )  # reset
    wait_until(lambda: server.temp_files() == [], what="the temp file removed")
    assert one_line(logs, "association", "temp file removed")["ended"] == "connection closed"
    assert server.received == []


def test_a_abort_in_the_middle_of_a_data_set(
    server: NetServer, bystander: RawClient, logs: list[dict[str, Any]]
) -> None:
    with established(server.port, STORE_RQ) as client:
        client.send_message(3, store_command(1, b"1.2.3.4"))
        # PDUs of 16384 bytes, each one data set fragment that is not the last
        piece = (
            pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 16384)
            + pdu.PDV_HEADER.pack(16380, 3, 0)
            + bytes(16378)
        )
        for _ in range(600):  # about 10 MB of a data set that never ends
            client.send(piece)
        wait_until(
            lambda: server.temp_files() and server.temp_files()[0].stat().st_size > 8 << 20,
            what="the data set on disk",
        )
        client.send(pdu.a_abort(0, 0))
    wait_until(lambda: server.temp_files() == [], what="the temp file removed")
    assert one_line(logs, "association", "temp file removed")["ended"] == "aborted by the peer"
    assert server.received == []


def test_a_pdu_above_our_advertised_maximum_is_refused(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    with (
        NetServer(tmp_path / "srv", max_pdu_size=16384) as server,
        established(server.port, STORE_RQ) as client,
    ):
        client.send(pdu.p_data(3, bytes(20000), command=False, max_pdu_length=0))
        expect_abort(client, 2, 6)
    one_line(logs, "association aborted", "above the maximum of 16384 we advertised")


def test_an_idle_association_is_aborted_after_the_network_timeout(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    with (
        NetServer(tmp_path / "srv", network_timeout=1.0) as server,
        established(server.port) as client,
    ):
        assert client.echo() == 0
        time.sleep(0.6)
        assert client.echo() == 0  # activity restarts the clock
        started = time.monotonic()
        expect_abort(client, pdu.ABORT_SOURCE_PROVIDER, 0)
        assert 0.5 < time.monotonic() - started < 3
    one_line(logs, "association aborted", "no data from the peer for 1 s (network_timeout)")


def test_release_sent_while_storing_is_answered_after_the_store(tmp_path: Path) -> None:
    sop, data = small_ct(tmp_path)
    with (
        NetServer(tmp_path / "srv", store_delay=0.3) as server,
        established(server.port, STORE_RQ) as client,
    ):
        client.send_message(3, store_command(1, sop.encode()), data)
        client.send(
            pdu.PDU_HEADER.pack(pdu.A_RELEASE_RQ, 4) + bytes(4)
        )  # not waiting for the response
        response = client.read_response()
        assert (response.field, response.us(dimse.STATUS)) == (dimse.C_STORE_RSP, 0)
        assert client.read_pdu()[0] == pdu.A_RELEASE_RP
    assert [r.sop_instance_uid for r in server.received] == [sop]


def test_stopping_answers_the_store_in_flight_and_serves_nothing_new(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """SIGTERM's path: the store being served finishes and is answered; a request already
    waiting behind it is not served (A-ABORT), and nothing of it stays in tmp."""
    sop, data = small_ct(tmp_path)
    with (
        NetServer(tmp_path / "srv", store_delay=0.5) as server,
        established(server.port, STORE_RQ) as client,
    ):
        client.send_message(3, store_command(1, sop.encode()), data)
        client.send_message(
            3, store_command(2, b"1.2.3.4.5"), data
        )  # pipelined: waits for the first
        wait_until(lambda: server.temp_files(), what="the first store to be served")
        assert server.server is not None
        stopping = asyncio.run_coroutine_threadsafe(server.server.stop(grace=5.0), server.loop)
        response = client.read_response()
        assert (response.field, response.message_id, response.us(dimse.STATUS)) == (
            dimse.C_STORE_RSP,
            1,
            0,
        )
        expect_abort(client, pdu.ABORT_SOURCE_USER)
        stopping.result(10)
        assert [r.sop_instance_uid for r in server.received] == [sop]
        assert server.temp_files() == []
    one_line(logs, "association aborted", "the server is stopping")


def test_more_than_1024_descriptors(tmp_path: Path) -> None:
    """1,100 associations at once, then DCMTK's echoscu: no select() limit in the way."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2400:  # both ends live in this process
        pytest.skip("the system allows fewer than 2,400 descriptors per process")
    with NetServer(tmp_path / "srv", max_associations=1200) as server:
        rq = associate_rq()
        clients = []
        try:
            for _ in range(1100):
                client = RawClient(server.port)
                client.send(rq)
                clients.append(client)
            for client in clients:
                assert client.read_pdu()[0] == pdu.A_ASSOCIATE_AC
            assert server.associations() == 1100
            result = dcmtk("echoscu", "-aec", AE_TITLE, HOST, str(server.port))
            assert result.returncode == 0, result.stderr
            assert clients[-1].echo() == 0 and clients[0].echo() == 0
        finally:
            for client in clients:
                client.close()


# --- seeded fuzz on the wire -----------------------------------------------------------------


def a_session(sop: bytes, data: bytes) -> list[bytes]:
    return [
        STORE_RQ,
        pdu.p_data(
            1,
            dimse.request(dimse.C_ECHO_RQ, 1, VERIFICATION.encode(), has_data_set=False),
            command=True,
            max_pdu_length=0,
        ),
        pdu.p_data(3, store_command(2, sop), command=True, max_pdu_length=64),
        pdu.p_data(3, data, command=False, max_pdu_length=1024),
        pdu.PDU_HEADER.pack(pdu.A_RELEASE_RQ, 4) + bytes(4),
    ]


def mutate(rng: random.Random, parts: list[bytes]) -> bytes:
    stream = bytearray(b"".join(parts))
    kind = rng.randrange(6)
    if kind == 0:  # flip bytes anywhere
        for _ in range(rng.randint(1, 6)):
            stream[rng.randrange(len(stream))] = rng.randrange(256)
    elif kind == 1:  # flip bytes in the command set / PDV headers (after the RQ)
        for _ in range(rng.randint(1, 4)):
            stream[rng.randrange(len(parts[0]), len(parts[0]) + 200)] = rng.randrange(256)
    elif kind == 2:  # truncate
        del stream[rng.randrange(len(stream)) :]
    elif kind == 3:  # drop or repeat a PDU
        k = rng.randrange(len(parts))
        shuffled = parts[:k] + parts[k + 1 :] if rng.random() < 0.5 else parts[: k + 1] + parts[k:]
        stream = bytearray(b"".join(shuffled))
    elif kind == 4:  # random PDU in the middle
        junk = bytes([rng.choice((1, 2, 3, 4, 5, 6, 7, 8, 0x10, 0xFF)), 0]) + rng.randbytes(
            rng.randint(4, 40)
        )
        cut = rng.randrange(len(stream))
        stream[cut:cut] = junk
    else:  # a length field made huge
        pos = rng.randrange(0, len(stream) - 4)
        stream[pos : pos + 4] = rng.choice(
            (b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00")
        )
    return bytes(stream)


def test_fuzz_sessions_on_the_wire(tmp_path: Path, logs: list[dict[str, Any]]) -> None:
    """300 mutated sessions (seeded): each ends with an answer or a close within the
    timeouts, nothing raises inside the server, nothing is left behind, and a bystander
    association keeps working."""
    sop, data = small_ct(tmp_path)
    parts = a_session(sop.encode(), data)
    rng = random.Random(20261130)
    with NetServer(tmp_path / "srv", artim_timeout=1.0, network_timeout=1.5) as server:
        bystander = established(server.port)
        statuses: list[int] = []
        stop = threading.Event()

        def keep_asking() -> None:  # the bystander is busy all along (and never idle-aborted)
            while not stop.wait(0.2):
                statuses.append(bystander.echo())

        asker = threading.Thread(target=keep_asking)
        asker.start()

        def run(stream: bytes) -> None:
            with RawClient(server.port, timeout=10) as client:
                try:
                    client.send(stream)
                    while client.read_pdu()[0] not in (
                        pdu.A_ASSOCIATE_RJ,
                        pdu.A_RELEASE_RP,
                        pdu.A_ABORT,
                    ):
                        pass  # an A-ASSOCIATE-AC, responses: the session goes on
                except (EOFError, ConnectionError):
                    pass  # closed by the server (ARTIM, network timeout)
                except TimeoutError:
                    raise AssertionError("the server left a fuzzed connection hanging") from None

        streams = [mutate(rng, parts) for _ in range(300)]
        for batch in range(0, len(streams), 50):
            run_in_threads([lambda s=s: run(s) for s in streams[batch : batch + 50]])  # re-raises
        wait_until(
            lambda: server.connections() == 1, timeout=20, what="every fuzzed connection to end"
        )
        stop.set()
        asker.join()
        assert server.temp_files() == []
        assert len(statuses) > 5 and set(statuses) == {0}
        bystander.release()
        bystander.close()
    failures = [e for e in logs if e.get("log_level") in ("error", "critical") or e.get("exc_info")]
    assert failures == [], failures[:3]
    assert len(events(logs, "association aborted")) > 50  # the fuzz did reach the checks


def test_an_identifier_that_does_not_decode_gets_0xc000(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    from tests.test_net_interop import ListCore

    find = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root C-FIND
    core = ListCore(3)
    rq = associate_rq([(1, VERIFICATION, (IMPLICIT,)), (3, find, (EXPLICIT,))])
    with (
        NetServer(tmp_path / "srv", query_retrieve=core) as server,
        established(server.port, rq) as client,
    ):
        garbage = b"\x08\x00\x52\x00CS\x06\x00STUDY \x10\x00\x20\x00XX\x04\x00ABCD"  # an unknown VR
        client.send_message(
            3, dimse.request(dimse.C_FIND_RQ, 9, find.encode(), has_data_set=True), garbage
        )
        response = client.read_response()
        assert (response.field, response.message_id, response.us(dimse.STATUS)) == (
            dimse.C_FIND_RSP,
            9,
            0xC000,
        )
        assert client.echo() == 0
    assert core.requests == []
    line = one_line(logs, "query refused", "identifier cannot be decoded")
    assert line["calling_ae"] == "RAWSCU"
