"""Upper-layer PDUs with ``struct`` (PS3.8 section 9.3): the streaming reader of incoming
PDUs, and encoders for the PDUs this side sends on the per-image path (P-DATA-TF) or that
are fixed-size (A-ASSOCIATE-RJ, A-RELEASE-RP, A-ABORT). A-ASSOCIATE-RQ/AC go through
pynetdicom's codecs (negotiation.py).

Memory is bounded whatever a peer declares: a P-DATA-TF PDU is never buffered; its PDVs are
handed on piece by piece as bytes arrive (the data set goes to disk). Other PDUs are
buffered whole only up to a fixed limit (``CONTROL_PDU_LIMITS``).
"""

from __future__ import annotations

import struct
from typing import Protocol

from dicomledger.common.errors import DicomError

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_NAMES = {
    A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    A_RELEASE_RQ: "A-RELEASE-RQ",
    A_RELEASE_RP: "A-RELEASE-RP",
    A_ABORT: "A-ABORT",
}

# Largest body we buffer for each non-P-DATA PDU. An A-ASSOCIATE-RQ of 128 contexts with
# 30 transfer syntaxes each is about 100 KiB; DCMTK's storescu sends about 10 KiB.
ASSOCIATE_RQ_LIMIT = 256 * 1024
CONTROL_PDU_LIMITS = {
    A_ASSOCIATE_RQ: ASSOCIATE_RQ_LIMIT,
    A_ASSOCIATE_AC: ASSOCIATE_RQ_LIMIT,
    A_ASSOCIATE_RJ: 4,
    A_RELEASE_RQ: 4,
    A_RELEASE_RP: 4,
    A_ABORT: 4,
}

# A-ABORT source (PS3.8 Table 9-26) and reason when the source is the service provider
ABORT_SOURCE_USER = 0x00
ABORT_SOURCE_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00
REASON_UNRECOGNIZED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_UNRECOGNIZED_PARAMETER = 0x04
REASON_UNEXPECTED_PARAMETER = 0x05
REASON_INVALID_PARAMETER = 0x06

# A-ASSOCIATE-RJ result, source and reason (PS3.8 Table 9-21)
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
RJ_SOURCE_USER = 0x01  # reasons: 1 no reason, 2 application context, 3 calling AE, 7 called AE
RJ_SOURCE_ACSE = 0x02  # reasons: 1 no reason, 2 protocol version not supported
RJ_SOURCE_PRESENTATION = 0x03  # reasons: 1 temporary congestion, 2 local limit exceeded

PDU_HEADER = struct.Struct(">BxI")
PDV_HEADER = struct.Struct(">IBB")  # item length, presentation context ID, message control header
PDU_HEADER_SIZE = PDU_HEADER.size
PDV_HEADER_SIZE = PDV_HEADER.size

MESSAGE_COMMAND = 0x01  # message control header bit 0: command (else data set)
MESSAGE_LAST = 0x02  # bit 1: last fragment of the command or data set


class FramingError(DicomError, ValueError):
    """The peer broke PDU framing; ``reason`` is the A-ABORT reason to answer with."""

    def __init__(self, message: str, reason: int = REASON_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


class PduSink(Protocol):
    def pdu_started(self, pdu_type: int, length: int) -> None:
        """A PDU header arrived (raise FramingError to refuse it before its body is read)."""

    def control_pdu(self, pdu_type: int, body: bytes) -> None:
        """A whole non-P-DATA PDU (body without the 6-byte header)."""

    def pdv(self, context_id: int, control: int, data: memoryview, done: bool) -> None:
        """A piece of a PDV's data; ``done`` on its last piece (a PDV may come in many)."""


_PDU_HEADER_STATE, _PDV_HEADER_STATE, _PDV_DATA_STATE, _BODY_STATE = range(4)


class PduReader:
    """Cuts a byte stream into PDUs and PDV pieces for a ``PduSink``.

    ``halt()`` (from inside a sink call) stops after the current piece and keeps the rest in
    ``stashed`` until ``resume()``; an association halts while an operation runs.
    """

    def __init__(self, sink: PduSink, max_pdu_length: int = 0) -> None:
        self._sink = sink
        self._max_pdu = max_pdu_length  # what we advertised; 0: no limit
        self._state = _PDU_HEADER_STATE
        self._stash = b""
        self._pdu_type = 0
        self._pdu_left = 0
        self._pdv_left = 0
        self._context_id = 0
        self._control = 0
        self._body = bytearray()
        self.halted = False

    @property
    def stashed(self) -> int:
        return len(self._stash)

    def halt(self) -> None:
        self.halted = True

    def resume(self) -> None:
        self.halted = False
        stash, self._stash = self._stash, b""
        if stash:
            self.feed(stash)

    def feed(self, data: bytes) -> None:
        if self._stash:
            data = (
                self._stash + data
            )  # a partial header (6 bytes at most) or bytes held while halted
            self._stash = b""
        if self.halted:
            self._stash = data
            return
        view = memoryview(data)
        pos, end = 0, len(data)
        sink = self._sink
        while pos < end:
            state = self._state
            if state == _PDV_DATA_STATE:
                take = min(self._pdv_left, end - pos)
                self._pdv_left -= take
                self._pdu_left -= take
                done = self._pdv_left == 0
                if done:
                    self._state = _PDV_HEADER_STATE if self._pdu_left else _PDU_HEADER_STATE
                sink.pdv(self._context_id, self._control, view[pos : pos + take], done)
                pos += take
            elif state == _PDU_HEADER_STATE:
                if end - pos < PDU_HEADER_SIZE:
                    break
                pdu_type, length = PDU_HEADER.unpack_from(data, pos)
                pos += PDU_HEADER_SIZE
                self._start_pdu(pdu_type, length)
                if pdu_type != P_DATA_TF and length == 0:
                    self._state = _PDU_HEADER_STATE
                    sink.control_pdu(pdu_type, b"")
            elif state == _PDV_HEADER_STATE:
                if end - pos < PDV_HEADER_SIZE:
                    break
                item_length, context_id, control = PDV_HEADER.unpack_from(data, pos)
                pos += PDV_HEADER_SIZE
                if item_length < 2 or item_length + 4 > self._pdu_left:
                    raise FramingError(
                        f"PDV item of length {item_length} in a P-DATA-TF PDU with {self._pdu_left} bytes left"
                    )
                self._pdu_left -= PDV_HEADER_SIZE
                self._pdv_left = item_length - 2
                self._context_id, self._control = context_id, control
                self._state = _PDV_DATA_STATE
                if self._pdv_left == 0:  # a PDV with no data: legal, if odd
                    self._state = _PDV_HEADER_STATE if self._pdu_left else _PDU_HEADER_STATE
                    sink.pdv(context_id, control, view[pos:pos], True)
            else:  # _BODY_STATE
                take = min(self._pdu_left, end - pos)
                self._body += view[pos : pos + take]
                self._pdu_left -= take
                pos += take
                if self._pdu_left == 0:
                    body, self._body = bytes(self._body), bytearray()
                    self._state = _PDU_HEADER_STATE
                    sink.control_pdu(self._pdu_type, body)
            if self.halted:
                break
        if pos < end:
            self._stash = bytes(view[pos:])

    def _start_pdu(self, pdu_type: int, length: int) -> None:
        if pdu_type == P_DATA_TF:
            if length < PDV_HEADER_SIZE:
                raise FramingError(f"P-DATA-TF PDU of length {length} cannot hold a PDV")
            if self._max_pdu and length > self._max_pdu:
                raise FramingError(
                    f"P-DATA-TF PDU of {length} bytes, above the maximum of {self._max_pdu} we advertised"
                )
        elif pdu_type in CONTROL_PDU_LIMITS:
            if length > CONTROL_PDU_LIMITS[pdu_type]:
                limit = CONTROL_PDU_LIMITS[pdu_type]
                raise FramingError(
                    f"{PDU_NAMES[pdu_type]} PDU declares {length} bytes (at most {limit})"
                )
        else:
            raise FramingError(f"unknown PDU type 0x{pdu_type:02X}", REASON_UNRECOGNIZED_PDU)
        self._sink.pdu_started(pdu_type, length)
        self._pdu_type = pdu_type
        self._pdu_left = length
        self._state = _PDV_HEADER_STATE if pdu_type == P_DATA_TF else _BODY_STATE


# --- encoders ------------------------------------------------------------------------------


def p_data(
    context_id: int, payload: bytes | memoryview, *, command: bool, max_pdu_length: int
) -> bytes:
    """A command set or data set as P-DATA-TF PDUs of one PDV each, fragmented to the peer's
    maximum PDU length (0: no limit), as pynetdicom and DCMTK send them."""
    return b"".join(
        p_data_parts(context_id, payload, command=command, max_pdu_length=max_pdu_length)
    )


def p_data_parts(
    context_id: int, payload: bytes | memoryview, *, command: bool, max_pdu_length: int
) -> list[bytes | memoryview]:
    """``p_data`` as pieces for ``transport.writelines``: headers and views of ``payload``,
    so a large data set is never copied to be framed."""
    kind = MESSAGE_COMMAND if command else 0
    size = len(payload)
    room = max_pdu_length - PDV_HEADER_SIZE if max_pdu_length else size
    if size <= room:
        return [
            PDU_HEADER.pack(P_DATA_TF, size + PDV_HEADER_SIZE)
            + PDV_HEADER.pack(size + 2, context_id, kind | MESSAGE_LAST),
            payload,
        ]
    parts: list[bytes | memoryview] = []
    view = memoryview(payload)
    for start in range(0, size, room):
        piece = view[start : start + room]
        last = MESSAGE_LAST if start + room >= size else 0
        parts += (
            PDU_HEADER.pack(P_DATA_TF, len(piece) + PDV_HEADER_SIZE)
            + PDV_HEADER.pack(len(piece) + 2, context_id, kind | last),
            piece,
        )
    return parts


def a_associate_rj(result: int, source: int, reason: int) -> bytes:
    return PDU_HEADER.pack(A_ASSOCIATE_RJ, 4) + bytes((0, result, source, reason))


def a_abort(source: int, reason: int) -> bytes:
    return PDU_HEADER.pack(A_ABORT, 4) + bytes((0, 0, source, reason))


A_RELEASE_RP_PDU = PDU_HEADER.pack(A_RELEASE_RP, 4) + bytes(4)
A_RELEASE_RQ_PDU = PDU_HEADER.pack(A_RELEASE_RQ, 4) + bytes(4)
