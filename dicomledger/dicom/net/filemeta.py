"""The Part 10 header of a received instance (preamble, 'DICM', File Meta Information,
PS3.10 7.1) built with ``struct`` from pre-encoded parts: the same bytes pydicom's
``write_file_meta_info`` writes for the same values (tests/test_net_codecs.py checks)."""

from __future__ import annotations

import struct
import uuid
from importlib import metadata

from dicomledger.dicom.instance import LONG_LENGTH_VRS

# Our own implementation identity (A-ASSOCIATE-AC and File Meta): a UUID-derived UID
# (PS3.5 B.2), fixed for the product; the version name follows the package version.
IMPLEMENTATION_CLASS_UID = (
    f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'https://dicomledger/implementation').int}"
)
try:
    _VERSION_DIGITS = metadata.version("dicomledger").replace(".", "")
except metadata.PackageNotFoundError:  # running from a checkout that is not installed
    _VERSION_DIGITS = "0"
IMPLEMENTATION_VERSION_NAME = f"DICOMLEDGER_{_VERSION_DIGITS}"[:16]  # SH: 16 characters at most

_SHORT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length (explicit VR LE)
_LONG = struct.Struct("<HH2s2xI")  # OB/UN/...: 2 reserved bytes, 32-bit length


def _short(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return _SHORT.pack(0x0002, element, vr, len(value)) + value


_PREAMBLE = bytes(128) + b"DICM"
_VERSION = _LONG.pack(0x0002, 0x0001, b"OB", 2) + b"\x00\x01"
_IMPLEMENTATION = _short(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode(), b"\x00") + _short(
    0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode(), b" "
)


def part10_header(
    sop_class_uid: bytes,
    sop_instance_uid: bytes,
    transfer_syntax_uid: bytes,
    source_ae_title: bytes = b"",
) -> bytes:
    """Preamble + 'DICM' + group 0002; the received data set follows it unchanged.
    UIDs as received (without padding); an empty AE title leaves out (0002,0016)."""
    elements = (
        _VERSION
        + _short(0x0002, b"UI", sop_class_uid, b"\x00")
        + _short(0x0003, b"UI", sop_instance_uid, b"\x00")
        + _short(0x0010, b"UI", transfer_syntax_uid, b"\x00")
        + _IMPLEMENTATION
        + (_short(0x0016, b"AE", source_ae_title, b" ") if source_ae_title else b"")
    )
    return _PREAMBLE + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(elements)) + elements


def file_meta(data: bytes | memoryview) -> tuple[int, dict[int, bytes]]:
    """Where the data set starts in a Part 10 file's bytes (after the preamble, 'DICM' and the
    File Meta elements, always Explicit VR Little Endian), and the File Meta values by element
    number; (0, {}) for bytes without a Part 10 header. ValueError if the meta is cut short."""
    if bytes(data[128:132]) != b"DICM":
        return 0, {}
    values: dict[int, bytes] = {}
    pos, end = 132, len(data)
    while pos + 8 <= end:
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 2:
            break
        vr = bytes(data[pos + 4 : pos + 6])
        if vr in LONG_LENGTH_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8
        if pos + length > end:
            raise ValueError(
                f"File Meta element (0002,{element:04X}) runs past the end of the file"
            )
        values[element] = bytes(data[pos : pos + length])
        pos += length
    return pos, values


def data_set_start(data: bytes | memoryview) -> int:
    """Where the data set starts in a Part 10 file's bytes (``file_meta``'s first value); the
    end of the bytes if the File Meta is cut short."""
    try:
        return file_meta(data)[0]
    except ValueError:
        return len(data)
