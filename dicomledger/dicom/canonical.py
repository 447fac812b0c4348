"""The canonical encoding of a dataset, over which objects without pixel data are hashed
(docs/pixel-hash.md §6): the same bytes whatever legal re-encoding the dataset went through
on its way (transfer syntax, sequence and item length encoding, group lengths, trailing
padding), different bytes for any change of an element's value.

A pure function of the dataset bytes. The parse is strict: anything it cannot read exactly
(a cut header, an item that does not fill its length, a duplicate tag, an unknown VR or one
the data dictionary does not allow for a standard element) raises NotCanonical, and the
caller falls back to hashing the bytes as received.
"""

from __future__ import annotations

import struct
from functools import lru_cache

from pydicom.datadict import dictionary_VR

from dicomledger.common.errors import DicomError
from dicomledger.dicom.instance import LONG_LENGTH_VRS

__all__ = ["MAX_DEPTH", "NotCanonical", "canonical_dataset"]

# Sequences nested deeper than this are not canonicalised (the recursion stays bounded).
MAX_DEPTH = 64

_ITEM, _ITEM_DELIM, _SEQ_DELIM = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_LENGTH_TO_END = 0x00080001  # retired; a length, like a group length
_TRAILING_PADDING = 0xFFFCFFFC
_ITEM_TAG_LE = b"\xfe\xff\x00\xe0"

# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1)
_SHORT_VRS = frozenset(
    {
        b"AE",
        b"AS",
        b"AT",
        b"CS",
        b"DA",
        b"DS",
        b"DT",
        b"FL",
        b"FD",
        b"IS",
        b"LO",
        b"LT",
        b"PN",
        b"SH",
        b"SL",
        b"SS",
        b"ST",
        b"TM",
        b"UI",
        b"UL",
        b"US",
    }
)
# Big Endian values are swapped to little endian in units of this many bytes
_SWAP_WIDTH = {
    b"AT": 2,
    b"OW": 2,
    b"SS": 2,
    b"US": 2,
    b"FL": 4,
    b"OF": 4,
    b"OL": 4,
    b"SL": 4,
    b"UL": 4,
    b"FD": 8,
    b"OD": 8,
    b"OV": 8,
    b"SV": 8,
    b"UV": 8,
}


class NotCanonical(DicomError, ValueError):
    """The dataset bytes are not a well-formed dataset the canonical form is defined for."""


def canonical_dataset(data: bytes | memoryview, implicit_vr: bool, little_endian: bool) -> bytes:
    """The canonical encoding of the dataset `data` (no File Meta; inflated if it was
    deflated), read as Implicit or Explicit VR, little or big endian: every element in
    ascending tag order, written as Implicit VR Little Endian with explicit lengths, without
    group lengths (gggg,0000), Length to End (0008,0001) and Data Set Trailing Padding
    (FFFC,FFFC), at every nesting level. Raises NotCanonical."""
    if implicit_vr and not little_endian:
        raise NotCanonical("implicit VR big endian is not a DICOM encoding")
    buf = memoryview(data).cast("B")
    out, _ = _dataset(_Reader(buf, implicit_vr, little_endian), 0, len(buf), 0, delimited=False)
    return out


class _Reader:
    def __init__(self, buf: memoryview, implicit: bool, little: bool) -> None:
        self.buf, self.implicit, self.little = buf, implicit, little
        self.endian = "<" if little else ">"

    def nested(self, implicit: bool, little: bool) -> _Reader:
        return (
            self
            if (implicit, little) == (self.implicit, self.little)
            else _Reader(self.buf, implicit, little)
        )

    def tag_length(self, pos: int, end: int) -> tuple[int, int]:
        if pos + 8 > end:
            raise NotCanonical(f"header cut at offset {pos}")
        group, element, length = struct.unpack_from(self.endian + "HHL", self.buf, pos)
        return group << 16 | element, length


def _dataset(r: _Reader, pos: int, end: int, depth: int, delimited: bool) -> tuple[bytes, int]:
    """Canonical bytes of the elements from `pos` up to `end`, or (`delimited`, an item of
    undefined length) up to its Item Delimitation Item; returns them and where it stopped."""
    elements: list[tuple[int, bytes]] = []  # (tag, canonical element)
    last_tag, in_order = -1, True
    buf, endian, implicit = r.buf, r.endian, r.implicit
    while True:
        if pos == end:
            if delimited:
                raise NotCanonical("item of undefined length without Item Delimitation Item")
            break
        tag, length = r.tag_length(pos, end)
        if tag == _ITEM_DELIM:
            if not delimited or length != 0:
                raise NotCanonical(f"unexpected Item Delimitation Item at offset {pos}")
            pos += 8
            break
        if tag >> 16 == 0xFFFE:
            raise NotCanonical(f"item tag {_show(tag)} among data elements")
        vr: bytes | None = None
        if implicit:
            pos += 8
        else:
            vr = bytes(buf[pos + 4 : pos + 6])
            if vr in LONG_LENGTH_VRS:
                if pos + 12 > end:
                    raise NotCanonical(f"header cut at offset {pos}")
                (length,) = struct.unpack_from(endian + "L", buf, pos + 8)
                pos += 12
            elif vr in _SHORT_VRS:
                (length,) = struct.unpack_from(endian + "H", buf, pos + 6)
                pos += 8
            else:
                raise NotCanonical(f"unknown VR {vr!r} at offset {pos}")
        if tag > last_tag:
            last_tag = tag
        else:
            in_order = False
        value, undefined, pos = _value(r, tag, vr, length, pos, end, depth)
        if tag & 0xFFFF == 0 or tag in (_LENGTH_TO_END, _TRAILING_PADDING):
            continue  # describes the encoding, not the content
        n = _UNDEFINED if undefined else len(value)
        elements.append((tag, struct.pack("<HHL", tag >> 16, tag & 0xFFFF, n) + value))
    if not in_order:  # the standard wants ascending tags; a re-encoder sorts them
        elements.sort(key=lambda e: e[0])
        for (tag, _), (following, _) in zip(elements, elements[1:], strict=False):
            if tag == following:
                raise NotCanonical(f"tag {_show(tag)} appears twice")
    return b"".join([e for _, e in elements]), pos


def _value(
    r: _Reader, tag: int, vr: bytes | None, length: int, pos: int, end: int, depth: int
) -> tuple[bytes, bool, int]:
    """(canonical value, keeps undefined length, position after the value)."""
    if vr is None:
        vr_name = _dictionary_vr(tag)  # implicit VR: the dictionary's
    else:
        vr_name = vr.decode()
        _check_vr(tag, vr_name)
    if length == _UNDEFINED:
        if vr == b"SQ" or vr is None:
            value, pos = _items(r, pos, end, depth, delimited=True)
            return value, False, pos
        if vr == b"UN":  # PS3.5 6.2.2: a sequence in Implicit VR Little Endian
            value, pos = _items(r.nested(True, True), pos, end, depth, delimited=True)
            return value, False, pos
        if vr in (b"OB", b"OW"):
            value, pos = _encapsulated(r, pos, end)
            return value, True, pos
        raise NotCanonical(f"undefined length with VR {vr!r} at offset {pos}")
    if pos + length > end:
        raise NotCanonical(f"value of {length} bytes at offset {pos} runs past its end {end}")
    stop = pos + length
    if vr_name == "SQ":
        value, _ = _items(r, pos, stop, depth, delimited=False)
        return value, False, stop
    raw = r.buf[pos:stop]
    if vr_name in (None, "UN") and raw[:4] == _ITEM_TAG_LE:
        # A sequence whose VR the sender did not know (private, or UN): its value is in
        # Implicit VR Little Endian (PS3.5 6.2.2). Binary data that merely starts like an
        # item and does not parse exactly stays an opaque value.
        try:
            value, _ = _items(r.nested(True, True), pos, stop, depth, delimited=False)
            return value, False, stop
        except NotCanonical:
            pass
    if not r.little and vr is not None and vr in _SWAP_WIDTH:
        return _to_little_endian(raw, _SWAP_WIDTH[vr]), False, stop
    return bytes(raw), False, stop


def _items(r: _Reader, pos: int, end: int, depth: int, delimited: bool) -> tuple[bytes, int]:
    """Canonical items of a sequence value (each with its explicit length)."""
    if depth >= MAX_DEPTH:
        raise NotCanonical(f"sequences nested more than {MAX_DEPTH} deep")
    items = []
    while True:
        if pos == end:
            if delimited:
                raise NotCanonical(
                    "sequence of undefined length without Sequence Delimitation Item"
                )
            break
        tag, length = r.tag_length(pos, end)
        pos += 8
        if tag == _SEQ_DELIM and delimited and length == 0:
            break
        if tag != _ITEM:
            raise NotCanonical(f"expected an item at offset {pos - 8}")
        if length == _UNDEFINED:
            content, pos = _dataset(r, pos, end, depth + 1, delimited=True)
        else:
            if pos + length > end:
                raise NotCanonical(f"item of {length} bytes at offset {pos - 8} runs past its end")
            content, _ = _dataset(r, pos, pos + length, depth + 1, delimited=False)
            pos += length
        items.append(struct.pack("<HHL", 0xFFFE, 0xE000, len(content)) + content)
    return b"".join(items), pos


def _encapsulated(r: _Reader, pos: int, end: int) -> tuple[bytes, int]:
    """Encapsulated (pixel) data nested in a dataset: its items verbatim, with the
    Sequence Delimitation Item; the element keeps its undefined length."""
    out = []
    while True:
        tag, length = r.tag_length(pos, end)
        if tag == _SEQ_DELIM and length == 0:
            out.append(struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
            return b"".join(out), pos + 8
        if tag != _ITEM or length == _UNDEFINED or pos + 8 + length > end:
            raise NotCanonical(f"malformed encapsulated value at offset {pos}")
        out.append(struct.pack("<HHL", 0xFFFE, 0xE000, length) + r.buf[pos + 8 : pos + 8 + length])
        pos += 8 + length


def _to_little_endian(raw: memoryview, width: int) -> bytes:
    if len(raw) % width:
        raise NotCanonical(
            f"a value of {len(raw)} bytes is not a whole number of {width}-byte values"
        )
    data = bytes(raw)
    swapped = bytearray(len(data))
    for k in range(width):
        swapped[k::width] = data[width - 1 - k :: width]
    return bytes(swapped)


def _check_vr(tag: int, vr: str) -> None:
    """The canonical form has no VR (Implicit VR has none), so an explicit VR must be one
    the data dictionary allows for a standard element (or UN): a VR changed to make a
    reader see other values in the same bytes (US -> SS) is then not hidden."""
    allowed = _dictionary_vr(tag)
    if allowed is not None and vr != "UN" and vr not in allowed.split(" or "):
        raise NotCanonical(f"VR {vr} of {_show(tag)} is not its dictionary VR {allowed}")


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    """The standard data dictionary's VR of a tag, None for private or unknown tags."""
    if tag >> 16 & 1:
        return None
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _show(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
