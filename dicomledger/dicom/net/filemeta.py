"""The Part 10 header of a received instance (preamble, 'DICM', File Meta Information,
PS3.10 7.1) built with ``struct`` from pre-encoded parts: the same bytes pydicom's
``write_file_meta_info`` writes for the same values (tests/test_net_codecs.py checks)."""

from __future__ import annotations

import struct
import uuid
from importlib import metadata

# Our own implementation identity (A-ASSOCIATE-AC and File Meta): a UUID-derived UID
# (PS3.5 B.2), fixed for the product; the version name follows the package version.
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'https://dicomledger/implementation').int}"
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
_IMPLEMENTATION = (_short(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode(), b"\x00")
                   + _short(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode(), b" "))


def part10_header(sop_class_uid: bytes, sop_instance_uid: bytes, transfer_syntax_uid: bytes,
                  source_ae_title: bytes = b"") -> bytes:
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
