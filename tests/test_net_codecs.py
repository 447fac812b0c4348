"""The asyncio layer's own codecs, byte for byte against pynetdicom's and pydicom's encodings,
its PDU reader, and its negotiation (with pynetdicom's codecs): sender's transfer syntax
first, roles, the asynchronous operations window, and invalid A-ASSOCIATE-RQs.
Includes a bounded fuzz (hypothesis) of the reader, the command parser and negotiation."""

from __future__ import annotations

import copy
import io
import random
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
)
from pynetdicom.dimse_messages import (
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_FIND_RSP,
    C_GET_RSP,
    C_MOVE_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
)
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
)
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRqPdu
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)

from dicomledger.dicom.net import dimse, pdu
from dicomledger.dicom.net.filemeta import IMPLEMENTATION_CLASS_UID, part10_header
from dicomledger.dicom.net.negotiation import Accepted, AssociateRqError, Negotiator, Rejected
from tests.netharness import AE_TITLE, CT_IMAGE, MR_IMAGE, VERIFICATION, associate_rq

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.1234567890123456789012345"  # odd length
FIND_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"


def pynetdicom_pdus(message: Any, primitive: Any, context_id: int = 1, max_pdu: int = 0) -> bytes:
    message.primitive_to_message(primitive)
    return b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(context_id, max_pdu))


def command_set_of(pdus: bytes) -> bytes:
    """The command-set bytes inside P-DATA-TF PDUs (data-set PDVs skipped)."""
    out, pos = bytearray(), 0
    while pos < len(pdus):
        _type, length = pdu.PDU_HEADER.unpack_from(pdus, pos)
        body, pos = pdus[pos + 6 : pos + 6 + length], pos + 6 + length
        item = 0
        while item < len(body):
            size, _cid, control = pdu.PDV_HEADER.unpack_from(body, item)
            if control & pdu.MESSAGE_COMMAND:
                out += body[item + 6 : item + 4 + size]
            item += 4 + size
    return bytes(out)


# --- responses: byte for byte as pynetdicom writes them ---------------------------------------


@pytest.mark.parametrize(
    "status, comment",
    [
        (0x0000, None),
        (0xC000, "Pixel Data is short"),
        (0xA700, None),
        (0xB000, "odd"),
        (0x0117, None),
    ],
)
@pytest.mark.parametrize("max_pdu", [0, 16384, 60])  # 60: the command set spans several PDUs
def test_c_store_rsp_is_byte_identical_to_pynetdicom(
    status: int, comment: str | None, max_pdu: int
) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 517
    primitive.AffectedSOPClassUID = CT_IMAGE
    primitive.AffectedSOPInstanceUID = SOP_INSTANCE
    primitive.Status = status
    if comment:
        primitive.ErrorComment = comment
    theirs = pynetdicom_pdus(C_STORE_RSP(), primitive, 3, max_pdu)
    ours = pdu.p_data(
        3,
        dimse.store_response(517, CT_IMAGE.encode(), SOP_INSTANCE.encode(), status, comment),
        command=True,
        max_pdu_length=max_pdu,
    )
    assert ours == theirs


def test_c_echo_rsp_is_byte_identical_to_pynetdicom() -> None:
    primitive = C_ECHO()
    primitive.MessageIDBeingRespondedTo = 65535
    primitive.AffectedSOPClassUID = VERIFICATION
    primitive.Status = 0
    assert pdu.p_data(
        1, dimse.echo_response(65535, VERIFICATION.encode()), command=True, max_pdu_length=16384
    ) == pynetdicom_pdus(C_ECHO_RSP(), primitive, 1, 16384)


@pytest.mark.parametrize("status", [0xFF00, 0x0000, 0xFE00, 0xA900])
def test_c_find_rsp_is_byte_identical_to_pynetdicom(status: int) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.2.3.4.5"
    data = encode(identifier, True, True)
    primitive = C_FIND()
    primitive.MessageIDBeingRespondedTo = 9
    primitive.AffectedSOPClassUID = FIND_ROOT
    primitive.Status = status
    pending = status == 0xFF00
    if pending:
        primitive.Identifier = io.BytesIO(data)
    theirs = pynetdicom_pdus(C_FIND_RSP(), primitive, 5, 16384)
    ours = pdu.p_data(
        5,
        dimse.find_response(9, FIND_ROOT.encode(), status, with_identifier=pending),
        command=True,
        max_pdu_length=16384,
    )
    if pending:
        ours += pdu.p_data(5, data, command=False, max_pdu_length=16384)
    assert ours == theirs


MOVE_ROOT, GET_ROOT = "1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.2.3"


@pytest.mark.parametrize("kind", ["C-MOVE", "C-GET"])
@pytest.mark.parametrize(
    "status, counts, failed",
    [
        (0xFF00, (3, 1, 0, 0), None),  # pending, after a sub-operation
        (0x0000, (None, 4, 0, 0), None),  # final Success
        (
            0xB000,
            (None, 2, 1, 1),
            ["1.2.3.4", "1.2.3.5"],
        ),  # final, with the Failed SOP Instance UID List
        (0xFE00, (2, 1, 1, 0), ["1.2.3.4"]),  # cancelled
        (0xA801, (None, None, None, None), None),  # move destination unknown: no counts
        (0xC511, (None, None, None, None), None),
    ],
)
def test_c_move_and_c_get_rsp_are_byte_identical_to_pynetdicom(
    kind: str, status: int, counts: tuple[int | None, ...], failed: list[str] | None
) -> None:
    sop_class = MOVE_ROOT if kind == "C-MOVE" else GET_ROOT
    primitive = C_MOVE() if kind == "C-MOVE" else C_GET()
    primitive.MessageIDBeingRespondedTo = 11
    primitive.AffectedSOPClassUID = sop_class
    primitive.Status = status
    remaining, completed, failures, warning = counts
    primitive.NumberOfRemainingSuboperations = remaining
    primitive.NumberOfCompletedSuboperations = completed
    primitive.NumberOfFailedSuboperations = failures
    primitive.NumberOfWarningSuboperations = warning
    data = None
    if failed is not None:
        identifier = Dataset()
        identifier.FailedSOPInstanceUIDList = failed
        data = encode(identifier, True, True)
        primitive.Identifier = io.BytesIO(data)
    theirs = pynetdicom_pdus(C_MOVE_RSP() if kind == "C-MOVE" else C_GET_RSP(), primitive, 1, 16384)
    field = dimse.C_MOVE_RSP if kind == "C-MOVE" else dimse.C_GET_RSP
    ours = pdu.p_data(
        1,
        dimse.retrieve_response(
            field,
            11,
            sop_class.encode(),
            status,
            remaining=remaining,
            completed=completed,
            failed=failures,
            warning=warning,
            with_identifier=data is not None,
        ),
        command=True,
        max_pdu_length=16384,
    )
    if data is not None:
        ours += pdu.p_data(1, data, command=False, max_pdu_length=16384)
    assert ours == theirs


def test_c_get_sub_operation_c_store_rq_is_byte_identical_to_pynetdicom() -> None:
    primitive = C_STORE()
    primitive.MessageID = 12
    primitive.AffectedSOPClassUID = CT_IMAGE
    primitive.AffectedSOPInstanceUID = SOP_INSTANCE
    primitive.Priority = 2
    primitive.DataSet = io.BytesIO(b"\x08\x00\x18\x00\x02\x00\x00\x001\x00")
    theirs = command_set_of(pynetdicom_pdus(C_STORE_RQ(), primitive, 3, 16384))
    assert (
        dimse.request(
            dimse.C_STORE_RQ,
            12,
            CT_IMAGE.encode(),
            has_data_set=True,
            sop_instance_uid=SOP_INSTANCE.encode(),
            priority=2,
        )
        == theirs
    )


@pytest.mark.parametrize("originator", ["MOVESCU", "ODD_AE", "A"])
def test_c_move_sub_operation_c_store_rq_is_byte_identical_to_pynetdicom(originator: str) -> None:
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = MR_IMAGE
    primitive.AffectedSOPInstanceUID = SOP_INSTANCE
    primitive.Priority = 2
    primitive.MoveOriginatorApplicationEntityTitle = originator
    primitive.MoveOriginatorMessageID = 3
    primitive.DataSet = io.BytesIO(b"\x08\x00\x18\x00\x02\x00\x00\x001\x00")
    theirs = command_set_of(pynetdicom_pdus(C_STORE_RQ(), primitive, 5, 0))
    assert (
        dimse.request(
            dimse.C_STORE_RQ,
            7,
            MR_IMAGE.encode(),
            has_data_set=True,
            sop_instance_uid=SOP_INSTANCE.encode(),
            priority=2,
            move_originator=(originator, 3),
        )
        == theirs
    )


def test_c_echo_rq_and_a_release_rq_are_byte_identical_to_pynetdicom() -> None:
    primitive = C_ECHO()
    primitive.MessageID = 9
    primitive.AffectedSOPClassUID = VERIFICATION
    theirs = command_set_of(pynetdicom_pdus(C_ECHO_RQ(), primitive, 1, 0))
    assert dimse.request(dimse.C_ECHO_RQ, 9, VERIFICATION.encode(), has_data_set=False) == theirs
    assert pdu.A_RELEASE_RQ_PDU == A_RELEASE_RQ().encode()


def test_data_set_pieces_join_to_the_framed_bytes() -> None:
    data = bytes(random.Random(2).randbytes(50_000))
    for max_pdu in (0, 16384, 100):
        parts = pdu.p_data_parts(3, memoryview(data), command=False, max_pdu_length=max_pdu)
        assert b"".join(bytes(p) for p in parts) == pdu.p_data(
            3, data, command=False, max_pdu_length=max_pdu
        )


def test_data_set_fragments_are_byte_identical_to_pynetdicom() -> None:
    data = bytes(random.Random(1).randbytes(40_001 * 2))
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = CT_IMAGE
    primitive.AffectedSOPInstanceUID = SOP_INSTANCE
    primitive.Priority = 0
    primitive.DataSet = io.BytesIO(data)
    theirs = pynetdicom_pdus(C_STORE_RQ(), primitive, 7, 16384)
    command = command_set_of(theirs)
    ours = pdu.p_data(7, command, command=True, max_pdu_length=16384)
    ours += pdu.p_data(7, data, command=False, max_pdu_length=16384)
    assert ours == theirs


@pytest.mark.parametrize("source, reason", [(0, 0), (2, 1), (2, 2), (2, 6)])
def test_a_abort_is_byte_identical_to_pynetdicom(source: int, reason: int) -> None:
    theirs = A_ABORT_RQ()
    theirs.source, theirs.reason_diagnostic = source, reason
    assert pdu.a_abort(source, reason) == theirs.encode()


@pytest.mark.parametrize(
    "result, source, reason", [(1, 1, 3), (1, 1, 7), (1, 2, 2), (2, 3, 2), (1, 1, 2)]
)
def test_a_associate_rj_and_release_rp_are_byte_identical_to_pynetdicom(
    result: int, source: int, reason: int
) -> None:
    theirs = A_ASSOCIATE_RJ()
    theirs.result, theirs.source, theirs.reason_diagnostic = result, source, reason
    assert pdu.a_associate_rj(result, source, reason) == theirs.encode()
    assert pdu.A_RELEASE_RP_PDU == A_RELEASE_RP().encode()


@pytest.mark.parametrize("ae", [b"STORESCU", b"CT1", b""])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless])
def test_file_meta_is_byte_identical_to_pydicom(ae: bytes, syntax: str) -> None:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = MR_IMAGE
    meta.MediaStorageSOPInstanceUID = SOP_INSTANCE
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    from dicomledger.dicom.net.filemeta import IMPLEMENTATION_VERSION_NAME

    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if ae:
        meta.SourceApplicationEntityTitle = ae.decode()
    out = io.BytesIO()
    write_file_meta_info(out, meta, enforce_standard=True)
    header = part10_header(MR_IMAGE.encode(), SOP_INSTANCE.encode(), str(syntax).encode(), ae)
    assert header == bytes(128) + b"DICM" + out.getvalue()


# --- command sets -------------------------------------------------------------------------


def test_parse_command_reads_what_pynetdicom_encodes() -> None:
    primitive = C_STORE()
    primitive.MessageID = 4242
    primitive.AffectedSOPClassUID = CT_IMAGE
    primitive.AffectedSOPInstanceUID = SOP_INSTANCE
    primitive.Priority = 2
    primitive.MoveOriginatorApplicationEntityTitle = "MOVER"
    primitive.MoveOriginatorMessageID = 3
    primitive.DataSet = io.BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    command = dimse.parse_command(command_set_of(pynetdicom_pdus(C_STORE_RQ(), primitive)))
    assert (command.field, command.message_id, command.has_data_set) == (
        dimse.C_STORE_RQ,
        4242,
        True,
    )
    assert command.uid(dimse.AFFECTED_SOP_CLASS_UID) == CT_IMAGE.encode()
    assert command.uid(dimse.AFFECTED_SOP_INSTANCE_UID) == SOP_INSTANCE.encode()
    assert command.us(dimse.PRIORITY) == 2
    assert command.text(dimse.MOVE_ORIGINATOR_AE_TITLE) == "MOVER"

    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = VERIFICATION
    command = dimse.parse_command(command_set_of(pynetdicom_pdus(C_ECHO_RQ(), echo)))
    assert (command.field, command.message_id, command.has_data_set) == (dimse.C_ECHO_RQ, 1, False)


GOOD_ECHO = dimse.request(dimse.C_ECHO_RQ, 1, VERIFICATION.encode(), has_data_set=False)


@pytest.mark.parametrize(
    "data, problem",
    [
        (GOOD_ECHO[:-1], "declares"),  # truncated value
        (GOOD_ECHO[:13], "inside an element header"),
        (GOOD_ECHO + b"\x08\x00\x16\x00\x00\x00\x00\x00", "group 0000 only"),
        (GOOD_ECHO + GOOD_ECHO[12:], "twice"),
        (dimse._group(dimse._ui(2, b"1.2")), "no Command Field"),
        (dimse._group(dimse._element(0x0100, b"\x30")), "has 1 bytes"),
        (
            dimse._group(dimse._US.pack(0, 0x0100, 2, 0x30) + dimse._US.pack(0, 0x0800, 2, 0x101)),
            "no Message ID",
        ),
        (GOOD_ECHO[:12] + struct.pack("<HHI", 0, 2, 0xFFFFFFFF), "declares"),
    ],
    ids=[
        "truncated",
        "header",
        "group",
        "twice",
        "no-field",
        "short-us",
        "no-message-id",
        "huge-length",
    ],
)
def test_parse_command_names_what_is_wrong(data: bytes, problem: str) -> None:
    with pytest.raises(dimse.CommandError, match=problem):
        dimse.parse_command(data)


@pytest.mark.parametrize(
    "value, ok",
    [
        (b"1.2.840.10008.1.1", True),
        (b"", False),
        (b"1" * 64, True),
        (b"1" * 65, False),
        (None, False),
        (b"1.2.3a", False),
        (b"1.02.3", True),
    ],
)
def test_uid_problem(value: bytes | None, ok: bool) -> None:
    assert (dimse.uid_problem(value, "UID") is None) == ok


# --- the PDU reader -----------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._pdv = bytearray()

    def pdu_started(self, pdu_type: int, length: int) -> None:
        self.events.append(("start", pdu_type, length))

    def control_pdu(self, pdu_type: int, body: bytes) -> None:
        self.events.append(("pdu", pdu_type, body))

    def pdv(self, context_id: int, control: int, data: memoryview, done: bool) -> None:
        self._pdv += data
        if done:
            self.events.append(("pdv", context_id, control, bytes(self._pdv)))
            self._pdv = bytearray()


def a_session() -> bytes:
    store = dimse.request(
        dimse.C_STORE_RQ, 2, CT_IMAGE.encode(), has_data_set=True, sop_instance_uid=b"1.2.3"
    )
    return (
        associate_rq()
        + pdu.p_data(1, GOOD_ECHO, command=True, max_pdu_length=0)
        + pdu.p_data(3, store, command=True, max_pdu_length=20)
        + pdu.p_data(3, bytes(range(256)) * 40, command=False, max_pdu_length=1000)
        + pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 6)
        + pdu.PDV_HEADER.pack(2, 5, 0)  # an empty PDV
        + pdu.PDU_HEADER.pack(pdu.A_RELEASE_RQ, 4)
        + bytes(4)
    )


def test_reader_gives_the_same_pieces_whatever_the_reads() -> None:
    stream = a_session()
    whole = Recorder()
    pdu.PduReader(whole).feed(stream)
    assert [e[0] for e in whole.events][:2] == ["start", "pdu"] and whole.events[-1][:2] == (
        "pdu",
        pdu.A_RELEASE_RQ,
    )
    rng = random.Random(7)
    for _ in range(30):
        split = Recorder()
        reader = pdu.PduReader(split)
        pos = 0
        while pos < len(stream):
            step = rng.choice((1, 2, 5, 6, 7, 100, 4096))
            reader.feed(stream[pos : pos + step])
            pos += step
        assert split.events == whole.events


def test_reader_streams_a_pdu_of_declared_length_0xffffffff() -> None:
    """Memory stays flat: PDV pieces are handed on as they arrive, nothing is stashed."""
    pieces: list[int] = []

    class Sink(Recorder):
        def pdv(self, context_id: int, control: int, data: memoryview, done: bool) -> None:
            pieces.append(len(data))

    reader = pdu.PduReader(Sink())
    reader.feed(
        pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 0xFFFFFFFF) + pdu.PDV_HEADER.pack(0xFFFFFFF0, 1, 0)
    )
    chunk = bytes(256 * 1024)
    for _ in range(40):  # 10 MiB
        reader.feed(chunk)
        assert reader.stashed == 0
    assert sum(pieces) == 40 * len(chunk) and max(pieces) == len(chunk)


@pytest.mark.parametrize(
    "stream, match",
    [
        (pdu.PDU_HEADER.pack(0x09, 4) + bytes(4), "unknown PDU type 0x09"),
        (pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_RQ, 0xFFFFFFFF), "declares 4294967295 bytes"),
        (pdu.PDU_HEADER.pack(pdu.A_ABORT, 5), "declares 5 bytes"),
        (pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 2), "cannot hold a PDV"),
        (
            pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 10) + pdu.PDV_HEADER.pack(9, 1, 3),
            "PDV item of length 9",
        ),
        (
            pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 10) + pdu.PDV_HEADER.pack(1, 1, 3),
            "PDV item of length 1",
        ),
    ],
)
def test_reader_refuses_broken_framing_at_the_header(stream: bytes, match: str) -> None:
    with pytest.raises(pdu.FramingError, match=match):
        pdu.PduReader(Recorder()).feed(stream)


def test_reader_enforces_the_maximum_pdu_length_we_advertised() -> None:
    reader = pdu.PduReader(Recorder(), max_pdu_length=16384)
    reader.feed(pdu.p_data(1, bytes(16378), command=False, max_pdu_length=0))  # exactly 16384
    with pytest.raises(pdu.FramingError, match="above the maximum of 16384"):
        reader.feed(pdu.p_data(1, bytes(16379), command=False, max_pdu_length=0))


# --- negotiation --------------------------------------------------------------------------


STORAGE = (
    str(ImplicitVRLittleEndian),
    str(ExplicitVRLittleEndian),
    str(ExplicitVRBigEndian),
    str(DeflatedExplicitVRLittleEndian),
    str(JPEGLSLossless),
)


def negotiator(**kwargs: Any) -> Negotiator:
    return Negotiator(
        **{
            "ae_title": AE_TITLE,
            "allowed_calling_aes": None,
            "supported": {VERIFICATION: STORAGE[:2], CT_IMAGE: STORAGE, MR_IMAGE: STORAGE},
            **kwargs,
        }
    )


def accepted(answer: Accepted | Rejected) -> Accepted:
    assert isinstance(answer, Accepted), answer
    return answer


def ac_of(answer: Accepted) -> Any:
    ac = A_ASSOCIATE_AC()
    ac.decode(answer.pdu)
    return ac.to_primitive()


def body(rq: bytes) -> bytes:
    return rq[6:]


@pytest.mark.parametrize(
    "proposed, chosen",
    [
        ((ExplicitVRLittleEndian, ImplicitVRLittleEndian), ExplicitVRLittleEndian),
        ((ImplicitVRLittleEndian, ExplicitVRLittleEndian), ImplicitVRLittleEndian),
        ((JPEGLSLossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian), JPEGLSLossless),
        (
            ("1.2.840.10008.1.2.4.100", ExplicitVRBigEndian, ImplicitVRLittleEndian),
            ExplicitVRBigEndian,
        ),
    ],
)
def test_the_senders_first_supported_transfer_syntax_wins(
    proposed: tuple[str, ...], chosen: str
) -> None:
    answer = accepted(negotiator().negotiate(body(associate_rq([(1, CT_IMAGE, proposed)]))))
    assert answer.contexts[1].transfer_syntax == chosen
    (cx,) = ac_of(answer).presentation_context_definition_results_list
    assert (cx.context_id, cx.result, cx.transfer_syntax) == (1, 0, [chosen])


def test_negotiation_results_roles_window_and_identity() -> None:
    rq = associate_rq(
        [
            (1, CT_IMAGE, (ExplicitVRLittleEndian,)),
            (3, "1.2.3.4.5.6", (ExplicitVRLittleEndian,)),
            (5, MR_IMAGE, ("1.2.840.10008.1.2.4.100",)),
            (7, VERIFICATION, (ImplicitVRLittleEndian,)),
        ],
        roles=[(CT_IMAGE, False, True)],
        async_ops=True,
        max_pdu=32768,
    )
    answer = accepted(
        negotiator(both_roles=frozenset({CT_IMAGE}), max_pdu_length=65536).negotiate(body(rq))
    )
    assert (
        set(answer.contexts) == {1, 7} and answer.contexts[1].as_scu
    )  # C-GET: we send C-STOREs on it
    assert answer.peer_max_pdu == 32768 and answer.calling_ae == "RAWSCU" and answer.proposed == 4
    ac = ac_of(answer)
    assert [
        (cx.context_id, cx.result) for cx in ac.presentation_context_definition_results_list
    ] == [(1, 0), (3, 3), (5, 4), (7, 0)]  # 3: abstract syntax, 4: transfer syntax not supported
    info = {type(item): item for item in ac.user_information}
    assert info[MaximumLengthNotification].maximum_length_received == 65536
    assert (
        info[ImplementationClassUIDNotification].implementation_class_uid
        == IMPLEMENTATION_CLASS_UID
    )
    window = info[AsynchronousOperationsWindowNegotiation]
    assert (
        window.maximum_number_operations_invoked,
        window.maximum_number_operations_performed,
    ) == (1, 1)
    role = info[SCP_SCU_RoleSelectionNegotiation]
    assert (role.sop_class_uid, role.scu_role, role.scp_role) == (CT_IMAGE, False, True)
    assert negotiator().negotiate(body(rq)) is not None
    cached = negotiator()
    assert cached.negotiate(body(rq)) is cached.negotiate(body(rq))  # decoded once per distinct RQ


@pytest.mark.parametrize(
    "kwargs, rq, code, reason",
    [
        (
            {"allowed_calling_aes": ["STORESCU"]},
            associate_rq(calling="INTRUDER"),
            (1, 1, 3),
            "allowed_calling_aes",
        ),
        ({}, associate_rq(called="OTHER"), (1, 1, 7), "called AE title 'OTHER'"),
    ],
)
def test_rejections_carry_dcmtk_and_pynetdicom_codes(
    kwargs: dict[str, Any], rq: bytes, code: tuple[int, ...], reason: str
) -> None:
    answer = negotiator(**kwargs).negotiate(body(rq))
    assert isinstance(answer, Rejected) and reason in answer.reason
    assert answer.pdu == pdu.a_associate_rj(*code)


def test_protocol_version_and_application_context_are_checked() -> None:
    rq = bytearray(associate_rq())
    rq[6:8] = b"\x00\x02"  # protocol version without bit 0
    answer = negotiator().negotiate(bytes(rq[6:]))
    assert isinstance(answer, Rejected) and answer.pdu == pdu.a_associate_rj(1, 2, 2)
    name = b"1.2.840.10008.3.1.1.1"
    other = bytes(associate_rq()).replace(name, b"1.2.840.10008.3.1.1.9")
    answer = negotiator().negotiate(other[6:])
    assert isinstance(answer, Rejected) and answer.pdu == pdu.a_associate_rj(1, 1, 2)


def rq_with_context_ids(ids: list[int]) -> bytes:
    """An A-ASSOCIATE-RQ whose presentation context items carry these IDs, as they are."""
    rq = AssociateRqPdu()
    rq.decode(associate_rq([(1, CT_IMAGE, (ExplicitVRLittleEndian,))]))
    (item,) = rq.presentation_context
    others = [i for i in rq.variable_items if i is not item]
    items = []
    for cid in ids:
        clone = copy.deepcopy(item)
        clone.presentation_context_id = cid
        items.append(clone)
    rq.variable_items = [others[0], *items, *others[1:]]
    return bytes(rq.encode())


@pytest.mark.parametrize(
    "rq, match",
    [
        (rq_with_context_ids([2]), "ID 2 "),
        (rq_with_context_ids([0]), "ID 0 "),
        (rq_with_context_ids([1, 3, 1]), "proposed twice"),
        (
            rq_with_context_ids([1 + 2 * (k % 128) for k in range(1000)]),
            "1000 presentation contexts",
        ),
        (rq_with_context_ids([]), "no presentation context"),
        (associate_rq()[:40], "shorter than its fixed fields"),
    ],
    ids=["even", "zero", "twice", "1000", "none", "truncated"],
)
def test_invalid_associate_rq_is_an_error_not_a_crash(rq: bytes, match: str) -> None:
    with pytest.raises(AssociateRqError, match=match):
        negotiator().negotiate(body(rq))


# --- bounded fuzz: random and mutated bytes never raise anything but the refusals ---------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=64))
def test_fuzz_reader_on_random_bytes(data: bytes, step: int) -> None:
    reader = pdu.PduReader(Recorder(), max_pdu_length=4096)
    try:
        for pos in range(0, len(data), step):
            reader.feed(data[pos : pos + step])
    except pdu.FramingError:
        pass


@FUZZ
@given(st.data())
def test_fuzz_reader_on_a_mutated_session(data: st.DataObject) -> None:
    stream = bytearray(a_session())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(stream) - 1))
        stream[pos] = data.draw(st.integers(0, 255))
    reader = pdu.PduReader(Recorder())
    try:
        reader.feed(bytes(stream))
    except pdu.FramingError:
        pass


@FUZZ
@given(st.data())
def test_fuzz_command_sets(data: st.DataObject) -> None:
    raw = bytearray(
        dimse.request(
            dimse.C_STORE_RQ,
            7,
            CT_IMAGE.encode(),
            has_data_set=True,
            sop_instance_uid=SOP_INSTANCE.encode(),
        )
    )
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        command = dimse.parse_command(bytes(raw))
    except dimse.CommandError:
        return
    for element in (dimse.AFFECTED_SOP_CLASS_UID, dimse.AFFECTED_SOP_INSTANCE_UID):
        dimse.uid_problem(command.uid(element), "UID")
    dimse.failure_response(command, 0xC000, "fuzz")
    dimse.parse_command(dimse.failure_response(command, 0xC000, "fuzz"))


@FUZZ
@given(st.data())
@pytest.mark.filterwarnings(
    "ignore::UserWarning"
)  # pydicom's "Invalid value for VR UI" on mutated UIDs
def test_fuzz_associate_rq(data: st.DataObject) -> None:
    rq = bytearray(
        associate_rq(
            [
                (1, CT_IMAGE, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
                (3, VERIFICATION, (ImplicitVRLittleEndian,)),
            ],
            roles=[(CT_IMAGE, True, True)],
        )
    )
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(6, len(rq) - 1))
        rq[pos] = data.draw(st.integers(0, 255))
    try:
        answer = negotiator(both_roles=frozenset({CT_IMAGE})).negotiate(bytes(rq[6:]))
    except AssociateRqError:
        return
    assert isinstance(answer, (Accepted, Rejected))


# --- Storage Commitment: N-ACTION-RSP and N-EVENT-REPORT-RQ as pynetdicom writes them ----------

COMMITMENT_CLASS, COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1", "1.2.840.10008.1.20.1.1"


@pytest.mark.parametrize(
    "status, comment", [(0x0000, None), (0x0110, "cannot decide"), (0x0123, None)]
)
@pytest.mark.parametrize("max_pdu", [0, 16384, 40])
def test_n_action_rsp_is_byte_identical_to_pynetdicom(
    status: int, comment: str | None, max_pdu: int
) -> None:
    from pynetdicom.dimse_messages import N_ACTION_RSP
    from pynetdicom.dimse_primitives import N_ACTION

    primitive = N_ACTION()
    primitive.MessageIDBeingRespondedTo = 77
    primitive.AffectedSOPClassUID = COMMITMENT_CLASS
    primitive.AffectedSOPInstanceUID = COMMITMENT_INSTANCE
    primitive.Status = status
    if status == 0:
        primitive.ActionTypeID = 1
    if comment:
        primitive.ErrorComment = comment
    theirs = pynetdicom_pdus(N_ACTION_RSP(), primitive, 7, max_pdu)
    ours = pdu.p_data(
        7,
        dimse.n_action_response(
            77,
            COMMITMENT_CLASS.encode(),
            COMMITMENT_INSTANCE.encode(),
            status,
            1 if status == 0 else None,
            comment,
        ),
        command=True,
        max_pdu_length=max_pdu,
    )
    assert ours == theirs


@pytest.mark.parametrize("event_type", [1, 2])
def test_n_event_report_rq_is_byte_identical_to_pynetdicom(event_type: int) -> None:
    from pynetdicom.dimse_messages import N_EVENT_REPORT_RQ
    from pynetdicom.dimse_primitives import N_EVENT_REPORT

    info = Dataset()
    info.TransactionUID = "1.2.3.4.5.6"
    data = encode(info, True, True)
    primitive = N_EVENT_REPORT()
    primitive.MessageID = 3
    primitive.AffectedSOPClassUID = COMMITMENT_CLASS
    primitive.AffectedSOPInstanceUID = COMMITMENT_INSTANCE
    primitive.EventTypeID = event_type
    primitive.EventInformation = io.BytesIO(data)
    theirs = pynetdicom_pdus(N_EVENT_REPORT_RQ(), primitive, 9, 16384)
    ours = pdu.p_data(
        9,
        dimse.n_event_report_request(
            3, COMMITMENT_CLASS.encode(), COMMITMENT_INSTANCE.encode(), event_type
        ),
        command=True,
        max_pdu_length=16384,
    )
    ours += pdu.p_data(9, data, command=False, max_pdu_length=16384)
    assert ours == theirs
