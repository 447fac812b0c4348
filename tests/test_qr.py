"""The Query/Retrieve services of the asyncio DICOM layer (dicom/net/retrieve.py, rules in
dicom/qr.py) on the wire: order of responses, C-CANCEL, unsent instances counted as failed
and listed, sub-operations that could not be sent counted as failed. The core here is a
small in-memory one; tests/test_retrieve.py drives the gateway's core with DCMTK."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

from dicomledger.dicom.net import dimse, pdu, retrieve
from dicomledger.dicom.net.dimse import Command
from dicomledger.dicom.qr import (
    CANCEL,
    PENDING,
    SUB_OPERATIONS_FAILED,
    SUCCESS,
    UNABLE_TO_PERFORM,
    Loaded,
    QRRequest,
    RetrieveOutcome,
    RetrievePlan,
    SubOperation,
)
from tests.conftest import free_port
from tests.netharness import (
    AE_TITLE,
    CT_IMAGE,
    HOST,
    NetServer,
    RawClient,
    associate_rq,
    established,
    wait_until,
)

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
IDENTIFIER = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "  # QueryRetrieveLevel=STUDY, Implicit VR LE


class Core:
    """Plans what the test says; load() fails the check for ``bad``; finish() records."""

    def __init__(
        self, plan: RetrievePlan | None = None, bad: frozenset[str] = frozenset(), finds: int = 5
    ) -> None:
        self._plan = plan or RetrievePlan([], {})
        self.bad = bad
        self.finds = finds
        self.finished: list[RetrieveOutcome] = []

    async def find(self, request: QRRequest) -> list[Dataset]:
        out = []
        for k in range(self.finds):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = f"1.2.3.{k + 1}"
            out.append(ds)
        return out

    async def plan(self, request: QRRequest) -> RetrievePlan:
        return self._plan

    async def load(self, sub: SubOperation) -> Loaded:
        if sub.sop_instance_uid in self.bad:
            return Loaded(None, "tamper check failed")
        ds = Dataset()
        ds.SOPClassUID = sub.sop_class_uid
        ds.SOPInstanceUID = sub.sop_instance_uid
        ds.file_meta = FileMetaDataset()  # as read from a stored file
        ds.file_meta.TransferSyntaxUID = sub.transfer_syntax_uid
        ds.set_original_encoding(False, True)
        # (the stored data set's bytes, as the gateway's core hands them on)
        data = (
            b"\x08\x00\x16\x00"
            + _ui(sub.sop_class_uid, explicit=True)
            + b"\x08\x00\x18\x00"
            + _ui(sub.sop_instance_uid, explicit=True)
        )
        return Loaded(ds, data_set=data)

    async def finish(
        self, request: QRRequest, plan: RetrievePlan, outcome: RetrieveOutcome
    ) -> None:
        self.finished.append(outcome)


def _ui(uid: str, explicit: bool) -> bytes:
    value = uid.encode() + (b"\x00" if len(uid) % 2 else b"")
    return (
        b"UI" + len(value).to_bytes(2, "little") if explicit else len(value).to_bytes(4, "little")
    ) + value


def subs(n: int, syntax: str = ExplicitVRLittleEndian) -> list[SubOperation]:
    return [SubOperation(f"1.2.{i}", CT_IMAGE, syntax, None) for i in range(n)]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    servers: list[NetServer] = []

    def start(core: Core, **kwargs: Any) -> NetServer:
        server = NetServer(
            tmp_path / f"srv{len(servers)}", query_retrieve=core, **kwargs
        ).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def read_message(client: RawClient) -> tuple[Command, bytes | None]:
    """One whole DIMSE message: its command set and its data set, if it has one."""
    command, data = bytearray(), bytearray()
    parsed: Command | None = None
    while True:
        pdu_type, body = client.read_pdu()
        assert pdu_type == pdu.P_DATA_TF, (pdu_type, body.hex())
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
                        return parsed, None
            else:
                data += value
                if control & pdu.MESSAGE_LAST:
                    assert parsed is not None
                    return parsed, bytes(data)


@contextmanager
def get_association(server: NetServer, syntax: str = ExplicitVRLittleEndian) -> Iterator[RawClient]:
    """A C-GET requestor that takes the Storage SCP role for CT in ``syntax`` only; released
    at the end unless the test ended the association itself."""
    rq = associate_rq(
        [(1, STUDY_ROOT_GET, (ImplicitVRLittleEndian,)), (3, CT_IMAGE, (syntax,))],
        roles=[(CT_IMAGE, False, True)],
    )
    client = established(server.port, rq)
    try:
        yield client
        with suppress(OSError, EOFError):
            client.release()
    finally:
        client.close()


def c_get(
    client: RawClient, answer: dict[str, int] | None = None
) -> tuple[list[tuple[str, bytes]], list[Command]]:
    """Send a C-GET, answer each C-STORE-RQ (Success unless ``answer`` names another status for
    its SOP Instance UID); what was stored, and the C-GET responses in order."""
    client.send_message(
        1, dimse.request(dimse.C_GET_RQ, 5, STUDY_ROOT_GET.encode(), has_data_set=True), IDENTIFIER
    )
    stored, responses = [], []
    while True:
        command, data = read_message(client)
        if command.field == dimse.C_STORE_RQ:
            uid = (command.uid(dimse.AFFECTED_SOP_INSTANCE_UID) or b"").decode()
            stored.append((uid, data or b""))
            client.send_message(
                3,
                dimse.store_response(
                    command.message_id,
                    CT_IMAGE.encode(),
                    uid.encode(),
                    (answer or {}).get(uid, SUCCESS),
                ),
            )
            continue
        assert command.field == dimse.C_GET_RSP and command.message_id == 5, command
        responses.append(command)
        if command.us(dimse.STATUS) != PENDING:
            return stored, responses


def counts(response: Command) -> tuple[int | None, ...]:
    return tuple(
        response.us(e)
        for e in (
            dimse.NUMBER_OF_REMAINING_SUBOPERATIONS,
            dimse.NUMBER_OF_COMPLETED_SUBOPERATIONS,
            dimse.NUMBER_OF_FAILED_SUBOPERATIONS,
            dimse.NUMBER_OF_WARNING_SUBOPERATIONS,
        )
    )


def test_find_stops_at_cancel(serve):
    server = serve(Core(finds=5))
    rq = associate_rq([(1, STUDY_ROOT_FIND, (ImplicitVRLittleEndian,))])
    with established(server.port, rq) as client:
        # the C-CANCEL-RQ arrives with the request: no match is sent
        client.send(
            pdu.p_data(
                1,
                dimse.request(dimse.C_FIND_RQ, 7, STUDY_ROOT_FIND.encode(), has_data_set=True),
                command=True,
                max_pdu_length=0,
            )
            + pdu.p_data(1, IDENTIFIER, command=False, max_pdu_length=0)
            + pdu.p_data(1, _cancel(7), command=True, max_pdu_length=0)
        )
        statuses = []
        while True:
            response, _ = read_message(client)
            statuses.append(response.us(dimse.STATUS))
            if statuses[-1] != PENDING:
                break
        assert statuses == [CANCEL]
        assert client.release() == pdu.A_RELEASE_RP


def _cancel(message_id: int) -> bytes:
    """A C-CANCEL-RQ command set (PS3.7 9.3.2.3: Command Field, Message ID Being Responded To)."""
    body = (
        struct.pack("<HHIH", 0, dimse.COMMAND_FIELD, 2, dimse.C_CANCEL_RQ)
        + struct.pack("<HHIH", 0, dimse.MESSAGE_ID_BEING_RESPONDED_TO, 2, message_id)
        + struct.pack("<HHIH", 0, dimse.COMMAND_DATA_SET_TYPE, 2, dimse.NO_DATA_SET)
    )
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def test_get_sends_checked_instances_and_fails_the_rest(serve):
    core = Core(
        RetrievePlan(subs(3), {"1.2.9": "not authorised: no grant"}), bad=frozenset({"1.2.1"})
    )
    server = serve(core)
    with get_association(server) as client:
        stored, responses = c_get(client)
        assert [uid for uid, _ in stored] == ["1.2.0", "1.2.2"]  # 1.2.1 failed the check
        assert stored[0][1] == b"\x08\x00\x16\x00" + _ui(
            CT_IMAGE, True
        ) + b"\x08\x00\x18\x00" + _ui("1.2.0", True)
        # a Pending response after each one sent; the refused one is not a sub-operation
        assert [counts(r) for r in responses[:-1]] == [(2, 1, 0, 0), (1, 2, 0, 0)]
        final = responses[-1]
        assert final.us(dimse.STATUS) == SUB_OPERATIONS_FAILED
        assert counts(final) == (None, 2, 1, 0)  # the unsent one counts as failed
        assert final.has_data_set
    (outcome,) = core.finished
    assert outcome.not_sent == {"1.2.1": "tamper check failed"}
    assert outcome.completed == ["1.2.0", "1.2.2"] and outcome.status == SUB_OPERATIONS_FAILED


def test_pending_responses_are_throttled_with_exact_counts(serve, monkeypatch):
    """Not a Pending response per sub-operation: after the first, then every PENDING_EVERY
    (time does not trigger one here) and after the last, each with the counts as of when it
    leaves."""
    monkeypatch.setattr(retrieve, "PENDING_EVERY", 4)
    monkeypatch.setattr(retrieve, "PENDING_SECONDS", 3600.0)
    core = Core(RetrievePlan(subs(10), {}))
    server = serve(core)
    with get_association(server) as client:
        stored, responses = c_get(client)
        assert len(stored) == 10
        assert [counts(r) for r in responses[:-1]] == [
            (9, 1, 0, 0),
            (5, 5, 0, 0),
            (1, 9, 0, 0),
            (0, 10, 0, 0),
        ]
        assert responses[-1].us(dimse.STATUS) == SUCCESS and counts(responses[-1]) == (
            None,
            10,
            0,
            0,
        )


def test_failed_sop_instance_uid_list_names_the_unsent_one(serve):
    """The final response's identifier: one Failed SOP Instance UID, never the refused one
    (read with pynetdicom's decoder from the raw response)."""
    from io import BytesIO

    from pynetdicom.dsutils import decode

    core = Core(
        RetrievePlan(subs(3), {"1.2.9": "not authorised: no grant"}), bad=frozenset({"1.2.1"})
    )
    server = serve(core)
    with get_association(server) as client:
        client.send_message(
            1,
            dimse.request(dimse.C_GET_RQ, 5, STUDY_ROOT_GET.encode(), has_data_set=True),
            IDENTIFIER,
        )
        while True:
            command, data = read_message(client)
            if command.field == dimse.C_STORE_RQ:
                uid = command.uid(dimse.AFFECTED_SOP_INSTANCE_UID) or b""
                client.send_message(
                    3, dimse.store_response(command.message_id, CT_IMAGE.encode(), uid, SUCCESS)
                )
            elif command.us(dimse.STATUS) != PENDING:
                break
        assert data is not None
        failed = decode(BytesIO(data), True, True)
        assert failed.FailedSOPInstanceUIDList == "1.2.1"  # one value


def test_sub_operations_that_could_not_be_sent_count_as_failed(serve):
    """An instance the requestor accepted no context for (its stored syntax is compressed,
    the requestor takes Explicit VR only) gets no C-STORE: it is failed, without a response,
    and the final status follows the rule (0xB000; 0xA702 when nothing was sent)."""
    core = Core(RetrievePlan(subs(1) + subs(3, JPEGLSLossless)[1:], {}))
    server = serve(core)
    with get_association(server) as client:
        stored, responses = c_get(client)
        assert [uid for uid, _ in stored] == ["1.2.0"]
        assert responses[-1].us(dimse.STATUS) == SUB_OPERATIONS_FAILED and counts(
            responses[-1]
        ) == (None, 1, 2, 0)
    outcome = core.finished[0]
    assert outcome.completed == ["1.2.0"] and outcome.failed == outcome.no_response == [
        "1.2.1",
        "1.2.2",
    ]
    assert outcome.status == SUB_OPERATIONS_FAILED

    core = Core(RetrievePlan(subs(1, JPEGLSLossless), {}))
    server = serve(core)
    with get_association(server) as client:
        stored, responses = c_get(client)
        assert (
            stored == [] and responses[-1].us(dimse.STATUS) == UNABLE_TO_PERFORM
        )  # all failed: 0xA702
    assert core.finished[0].status == UNABLE_TO_PERFORM

    # an instance in another uncompressed syntax is re-encoded in the requestor's
    core = Core(RetrievePlan(subs(1), {}))
    server = serve(core)
    with get_association(server, ImplicitVRLittleEndian) as client:
        stored, responses = c_get(client)
        assert stored == [
            (
                "1.2.0",
                b"\x08\x00\x16\x00"
                + _ui(CT_IMAGE, False)
                + b"\x08\x00\x18\x00"
                + _ui("1.2.0", False),
            )
        ]
        assert responses[-1].us(dimse.STATUS) == SUCCESS


def test_a_failed_c_store_response_is_a_failed_sub_operation(serve):
    core = Core(RetrievePlan(subs(2), {}))
    server = serve(core)
    with get_association(server) as client:
        _, responses = c_get(client, answer={"1.2.1": 0xA700})
        assert responses[-1].us(dimse.STATUS) == SUB_OPERATIONS_FAILED and counts(
            responses[-1]
        ) == (None, 1, 1, 0)
    assert core.finished[0].failed == ["1.2.1"] and core.finished[0].no_response == []


def move(server: NetServer, destination: str, cancel_after: int | None = None) -> list[Dataset]:
    ae = AE(ae_title="WS1")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(HOST, server.port, ae_title=AE_TITLE)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3"
    responses = []
    try:
        for status, _identifier in assoc.send_c_move(
            query, destination, StudyRootQueryRetrieveInformationModelMove, msg_id=11
        ):
            responses.append(status)
            if cancel_after is not None and len(responses) == cancel_after:
                assoc.send_c_cancel(11, assoc.accepted_contexts[0].context_id)
    finally:
        assoc.release()
    return responses


def test_all_refused_is_answered_as_nothing_found_and_cancel_stops_sending(serve, tmp_path):
    core = Core(RetrievePlan([], {"1.2.5": "not authorised"}))
    with get_association(serve(core)) as client:
        stored, (final,) = c_get(client)
        assert stored == [] and final.us(dimse.STATUS) == SUCCESS  # as for an unknown study
        assert counts(final) == (None, 0, 0, 0) and not final.has_data_set
    assert core.finished[0].status == SUCCESS

    with NetServer(tmp_path / "dest", ae_title="DEST", store_delay=0.3) as destination:
        core = Core(RetrievePlan(subs(5), {}, destination=(HOST, destination.port)))
        server = serve(core)
        responses = move(server, "DEST", cancel_after=1)
        assert responses[0].Status == PENDING and responses[0].NumberOfCompletedSuboperations == 1
        assert responses[-1].Status == CANCEL and responses[-1].NumberOfRemainingSuboperations >= 1
        assert len(destination.received) < 5
    assert core.finished[0].cancelled and core.finished[0].status == CANCEL


def test_unknown_destination_and_unreachable_destination_are_recorded(serve):
    core = Core(RetrievePlan([], {}, unknown_destination=True))
    (final,) = move(serve(core), "NOWHERE")
    assert final.Status == 0xA801
    assert core.finished[0].status == 0xA801

    core = Core(RetrievePlan(subs(2), {}, destination=(HOST, free_port())))  # nobody listens there
    (final,) = move(serve(core), "DEST")
    assert final.Status == 0xA801
    assert len(core.finished) == 1 and not core.finished[0].associated


def test_a_c_get_requestor_that_does_not_answer_its_c_store_is_aborted(serve):
    """No C-STORE response within network_timeout: the association is aborted (a C-GET must not
    hang on a silent requestor), and the core records a retrieval cut short."""
    core = Core(RetrievePlan(subs(2), {}))
    server = serve(core, network_timeout=1.0)
    with get_association(server) as client:
        client.send_message(
            1,
            dimse.request(dimse.C_GET_RQ, 5, STUDY_ROOT_GET.encode(), has_data_set=True),
            IDENTIFIER,
        )
        command, _ = read_message(client)
        assert command.field == dimse.C_STORE_RQ  # never answered
        started = time.monotonic()
        pdu_type, body = client.read_pdu()
        assert pdu_type == pdu.A_ABORT and body[2] == pdu.ABORT_SOURCE_PROVIDER, body.hex()
        assert 0.5 < time.monotonic() - started < 5
    wait_until(lambda: core.finished, what="the core's record")
    (outcome,) = core.finished
    assert outcome.status is None and outcome.completed == outcome.failed == []
