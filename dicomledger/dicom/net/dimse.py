"""DIMSE command sets with ``struct``: parse a request, encode a response (PS3.7 section 9,
Annex E). A command set is always Implicit VR Little Endian and holds group 0000 only.

This is the per-image path: no pydicom Dataset is built for a C-STORE or C-ECHO. The
encoders write the elements pynetdicom writes, in the same order, so the bytes are the same
(tests/test_net_codecs.py compares them).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from dicomledger.common.errors import DicomError

# Command Field values (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP = 0x0100, 0x8100
N_ACTION_RQ, N_ACTION_RSP = 0x0130, 0x8130
N_REQUESTS = (0x0100, 0x0110, 0x0120, 0x0130, 0x0140, 0x0150)  # N-EVENT-REPORT .. N-DELETE
REQUESTS = frozenset((C_STORE_RQ, C_GET_RQ, C_FIND_RQ, C_MOVE_RQ, C_ECHO_RQ, *N_REQUESTS))
RESPONSE_BIT = 0x8000

# Element numbers in group 0000
AFFECTED_SOP_CLASS_UID = 0x0002
REQUESTED_SOP_CLASS_UID = 0x0003
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
MOVE_DESTINATION = 0x0600
PRIORITY = 0x0700
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE_UID = 0x1000
REQUESTED_SOP_INSTANCE_UID = 0x1001
EVENT_TYPE_ID = 0x1002
ACTION_TYPE_ID = 0x1008
NUMBER_OF_REMAINING_SUBOPERATIONS = 0x1020
NUMBER_OF_COMPLETED_SUBOPERATIONS = 0x1021
NUMBER_OF_FAILED_SUBOPERATIONS = 0x1022
NUMBER_OF_WARNING_SUBOPERATIONS = 0x1023
MOVE_ORIGINATOR_AE_TITLE = 0x1030
MOVE_ORIGINATOR_MESSAGE_ID = 0x1031

NO_DATA_SET = 0x0101  # Command Data Set Type: anything else means a data set follows
DATA_SET_PRESENT = 0x0001  # what pynetdicom (and DCMTK) send when one does

# Statuses this layer answers with itself (PS3.7 Annex C, PS3.4 B.2.3 / C.4.1.1.4)
SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNRECOGNIZED_OPERATION = 0x0211
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

MAX_UID_LENGTH = 64
_UID_CHARS = re.compile(rb"[0-9.]+")

_ELEMENT = struct.Struct("<HHI")  # group, element, value length
_US = struct.Struct("<HHIH")  # a whole US element: group, element, length 2, value
_UL = struct.Struct("<HHII")


class CommandError(DicomError, ValueError):
    """The bytes are not a usable command set: the association is aborted."""


@dataclass(frozen=True, slots=True)
class Command:
    """A received command set: raw values by element number (group 0000)."""

    field: int  # Command Field
    message_id: int  # Message ID, or Message ID Being Responded To for responses and C-CANCEL
    has_data_set: bool
    values: dict[int, bytes]

    def uid(self, element: int) -> bytes | None:
        """A UI value without its padding, or None if absent."""
        value = self.values.get(element)
        return None if value is None else value.rstrip(b"\x00 ")

    def text(self, element: int) -> str | None:
        """An AE/LO/SH value, stripped, decoded leniently (for names, never for identity checks)."""
        value = self.values.get(element)
        return None if value is None else value.strip(b"\x00 ").decode("ascii", "replace")

    def us(self, element: int) -> int | None:
        value = self.values.get(element)
        return None if value is None or len(value) != 2 else int.from_bytes(value, "little")


def parse_command(data: bytes | bytearray) -> Command:
    """Parse a command set; CommandError names the first problem."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 8:
            raise CommandError(f"command set ends inside an element header at byte {pos}")
        group, element, length = _ELEMENT.unpack_from(data, pos)
        if group != 0:
            raise CommandError(
                f"element ({group:04X},{element:04X}) in a command set (group 0000 only)"
            )
        pos += 8
        if length > end - pos:
            raise CommandError(
                f"element (0000,{element:04X}) declares {length} bytes, {end - pos} remain"
            )
        if element in values:
            raise CommandError(f"element (0000,{element:04X}) appears twice")
        values[element] = bytes(data[pos : pos + length])
        pos += length
    field = _us(values, COMMAND_FIELD, "Command Field")
    if field & RESPONSE_BIT or field == C_CANCEL_RQ:
        message_id = _us(values, MESSAGE_ID_BEING_RESPONDED_TO, "Message ID Being Responded To")
    else:
        message_id = _us(values, MESSAGE_ID, "Message ID")
    data_set_type = _us(values, COMMAND_DATA_SET_TYPE, "Command Data Set Type")
    return Command(field, message_id, data_set_type != NO_DATA_SET, values)


def _us(values: dict[int, bytes], element: int, name: str) -> int:
    value = values.get(element)
    if value is None:
        raise CommandError(f"no {name} (0000,{element:04X})")
    if len(value) != 2:
        raise CommandError(f"{name} (0000,{element:04X}) has {len(value)} bytes, not 2")
    return int.from_bytes(value, "little")


def uid_problem(value: bytes | None, name: str) -> str | None:
    """Why a UID from a command set cannot be used, or None. Only length and characters are
    checked (PS3.5 9.1): senders with leading zeros in a component exist and are served."""
    if value is None:
        return f"no {name}"
    if not value:
        return f"empty {name}"
    if len(value) > MAX_UID_LENGTH:
        return f"{name} of {len(value)} characters (at most {MAX_UID_LENGTH})"
    if not _UID_CHARS.fullmatch(value):
        return f"{name} has characters other than digits and '.'"
    return None


# --- encoding ------------------------------------------------------------------------------


def _padded(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0, element, len(value)) + value


def _ui(element: int, uid: bytes) -> bytes:
    return _element(element, _padded(uid, b"\x00"))


def _lo(element: int, text: str) -> bytes:
    # LO: at most 64 characters, no backslash or control characters
    clean = "".join(c if c.isprintable() and c != "\\" else "?" for c in text)[:64]
    return _element(element, _padded(clean.encode("ascii", "replace"), b" "))


def _group(body: bytes) -> bytes:
    return _UL.pack(0, 0x0000, 4, len(body)) + body


_NO_DATA_SET = _US.pack(0, COMMAND_DATA_SET_TYPE, 2, NO_DATA_SET)
_WITH_DATA_SET = _US.pack(0, COMMAND_DATA_SET_TYPE, 2, DATA_SET_PRESENT)
_FIELD = {
    f: _US.pack(0, COMMAND_FIELD, 2, f)
    for f in (C_STORE_RSP, C_FIND_RSP, C_ECHO_RSP, C_GET_RSP, C_MOVE_RSP)
}


def store_response(
    message_id: int,
    sop_class_uid: bytes,
    sop_instance_uid: bytes,
    status: int,
    comment: str | None = None,
) -> bytes:
    """C-STORE-RSP (PS3.7 9.3.1.2). UIDs as received (unpadded)."""
    return _group(
        _ui(AFFECTED_SOP_CLASS_UID, sop_class_uid)
        + _FIELD[C_STORE_RSP]
        + _US.pack(0, MESSAGE_ID_BEING_RESPONDED_TO, 2, message_id)
        + _NO_DATA_SET
        + _US.pack(0, STATUS, 2, status)
        + (_lo(ERROR_COMMENT, comment) if comment else b"")
        + _ui(AFFECTED_SOP_INSTANCE_UID, sop_instance_uid)
    )


def echo_response(message_id: int, sop_class_uid: bytes, status: int = SUCCESS) -> bytes:
    """C-ECHO-RSP (PS3.7 9.3.5.2)."""
    return _group(
        _ui(AFFECTED_SOP_CLASS_UID, sop_class_uid)
        + _FIELD[C_ECHO_RSP]
        + _US.pack(0, MESSAGE_ID_BEING_RESPONDED_TO, 2, message_id)
        + _NO_DATA_SET
        + _US.pack(0, STATUS, 2, status)
    )


def find_response(
    message_id: int,
    sop_class_uid: bytes,
    status: int,
    *,
    with_identifier: bool,
    comment: str | None = None,
) -> bytes:
    """C-FIND-RSP (PS3.7 9.3.2.2); a Pending one carries an identifier."""
    return _group(
        _ui(AFFECTED_SOP_CLASS_UID, sop_class_uid)
        + _FIELD[C_FIND_RSP]
        + _US.pack(0, MESSAGE_ID_BEING_RESPONDED_TO, 2, message_id)
        + (_WITH_DATA_SET if with_identifier else _NO_DATA_SET)
        + _US.pack(0, STATUS, 2, status)
        + (_lo(ERROR_COMMENT, comment) if comment else b"")
    )


def retrieve_response(
    field: int,
    message_id: int,
    sop_class_uid: bytes,
    status: int,
    *,
    remaining: int | None = None,
    completed: int | None = None,
    failed: int | None = None,
    warning: int | None = None,
    with_identifier: bool = False,
) -> bytes:
    """C-MOVE-RSP or C-GET-RSP (PS3.7 9.3.4.2, 9.3.3.2): the sub-operation counts given (a
    final response has no Remaining); a Failed SOP Instance UID List follows if
    ``with_identifier``."""
    counts = (
        (NUMBER_OF_REMAINING_SUBOPERATIONS, remaining),
        (NUMBER_OF_COMPLETED_SUBOPERATIONS, completed),
        (NUMBER_OF_FAILED_SUBOPERATIONS, failed),
        (NUMBER_OF_WARNING_SUBOPERATIONS, warning),
    )
    return _group(
        _ui(AFFECTED_SOP_CLASS_UID, sop_class_uid)
        + _FIELD[field]
        + _US.pack(0, MESSAGE_ID_BEING_RESPONDED_TO, 2, message_id)
        + (_WITH_DATA_SET if with_identifier else _NO_DATA_SET)
        + _US.pack(0, STATUS, 2, status)
        + b"".join(_US.pack(0, element, 2, value) for element, value in counts if value is not None)
    )


def failure_response(request: Command, status: int, comment: str | None = None) -> bytes:
    """The response to any request this layer refuses before a service ran (unrecognised
    operation, wrong SOP class, unusable UID): its command field with the status and,
    where the request had them, its Affected SOP Class and Instance UIDs."""
    sop_class = request.uid(AFFECTED_SOP_CLASS_UID) or request.uid(REQUESTED_SOP_CLASS_UID)
    sop_instance = request.uid(AFFECTED_SOP_INSTANCE_UID)
    field = request.field | RESPONSE_BIT
    return _group(
        (
            _ui(AFFECTED_SOP_CLASS_UID, sop_class)
            if sop_class and len(sop_class) <= MAX_UID_LENGTH
            else b""
        )
        + _US.pack(0, COMMAND_FIELD, 2, field)
        + _US.pack(0, MESSAGE_ID_BEING_RESPONDED_TO, 2, request.message_id)
        + _NO_DATA_SET
        + _US.pack(0, STATUS, 2, status)
        + (_lo(ERROR_COMMENT, comment) if comment else b"")
        + (
            _ui(AFFECTED_SOP_INSTANCE_UID, sop_instance)
            if sop_instance and len(sop_instance) <= MAX_UID_LENGTH
            else b""
        )
    )


def n_action_response(
    message_id: int,
    sop_class_uid: bytes,
    sop_instance_uid: bytes,
    status: int,
    action_type_id: int | None = None,
    comment: str | None = None,
) -> bytes:
    """N-ACTION-RSP (PS3.7 10.3.4.2) without an Action Reply. UIDs as received (unpadded);
    the Action Type ID is echoed on success, as pynetdicom does."""
    return _group(
        _ui(AFFECTED_SOP_CLASS_UID, sop_class_uid)
        + _US.pack(0, COMMAND_FIELD, 2, N_ACTION_RSP)
        + _US.pack(0, MESSAGE_ID_BEING_RESPONDED_TO, 2, message_id)
        + _NO_DATA_SET
        + _US.pack(0, STATUS, 2, status)
        + (_lo(ERROR_COMMENT, comment) if comment else b"")
        + _ui(AFFECTED_SOP_INSTANCE_UID, sop_instance_uid)
        + (_US.pack(0, ACTION_TYPE_ID, 2, action_type_id) if action_type_id is not None else b"")
    )


def n_event_report_request(
    message_id: int,
    sop_class_uid: bytes,
    sop_instance_uid: bytes,
    event_type_id: int,
    *,
    has_data_set: bool = True,
) -> bytes:
    """N-EVENT-REPORT-RQ (PS3.7 10.3.1.1); the Event Information follows as the data set."""
    return _group(
        _ui(AFFECTED_SOP_CLASS_UID, sop_class_uid)
        + _US.pack(0, COMMAND_FIELD, 2, N_EVENT_REPORT_RQ)
        + _US.pack(0, MESSAGE_ID, 2, message_id)
        + (_WITH_DATA_SET if has_data_set else _NO_DATA_SET)
        + _ui(AFFECTED_SOP_INSTANCE_UID, sop_instance_uid)
        + _US.pack(0, EVENT_TYPE_ID, 2, event_type_id)
    )


def request(
    field: int,
    message_id: int,
    sop_class_uid: bytes,
    *,
    has_data_set: bool,
    sop_instance_uid: bytes | None = None,
    priority: int = 0,
    move_originator: tuple[str, int] | None = None,
) -> bytes:
    """A C-xxx-RQ command set (C-ECHO, C-STORE with, for a C-MOVE's sub-operations, the Move
    Originator AE Title and Message ID)."""
    return _group(
        _ui(AFFECTED_SOP_CLASS_UID, sop_class_uid)
        + _US.pack(0, COMMAND_FIELD, 2, field)
        + _US.pack(0, MESSAGE_ID, 2, message_id)
        + (_US.pack(0, PRIORITY, 2, priority) if field != C_ECHO_RQ else b"")
        + (_WITH_DATA_SET if has_data_set else _NO_DATA_SET)
        + (
            _ui(AFFECTED_SOP_INSTANCE_UID, sop_instance_uid)
            if sop_instance_uid is not None
            else b""
        )
        + (
            _element(MOVE_ORIGINATOR_AE_TITLE, _padded(move_originator[0].encode("ascii"), b" "))
            + _US.pack(0, MOVE_ORIGINATOR_MESSAGE_ID, 2, move_originator[1])
            if move_originator
            else b""
        )
    )
