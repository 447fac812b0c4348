"""Read a received instance for the ingest: its header (InstanceHeader) and its hashes
(InstanceHashes), with a fast path that needs no pydicom for the common case.

The fast path reads the header region of the file with ``struct`` and hashes the pixel data
with pixelhash's own streaming code, straight from the file. It decides only what it can
decide exactly as the pydicom path (pixelhash.hash_instance_file + instance.instance_header)
does: a Part 10 file (preamble, 'DICM', Explicit VR Little Endian File Meta) whose dataset is
Explicit or Implicit VR Little Endian, with native Pixel Data (or Float / Double Float Pixel
Data), or no pixel data at all. Everything else, and anything it has the slightest doubt
about, it defers (raises Deferred) and read_instance asks the pydicom path, which gives the
answer or the refusal: big endian, deflated, encapsulated pixel data, pixel data that would
need a decoder for its canonical hash (planar or YBR_FULL_422), undefined lengths outside
sequences, an element or item that does not fill its length exactly, duplicate or
out-of-order tags, unknown VRs, a VR other than the dictionary's for an attribute we read,
multi-valued, escaped (ISO 2022) or undecodable text in those attributes, character sets
other than the default, ISO_IR 100 and ISO_IR 192, sequences nested more than
MAX_SEQUENCE_DEPTH deep, and every refusal (PixelHashError, InstanceError).

So a malformed instance is never refused here: it is refused by the pydicom path, with the
same status and message as before. Equality of both paths is tested over pydicom's test
files, generated datasets and mutated files (tests/test_fastread.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, NoReturn

from pydicom import config as pydicom_config
from pydicom import uid
from pydicom.datadict import dictionary_VR
from pydicom.valuerep import EXPLICIT_VR_LENGTH_16

from dicomledger.dicom.canonical import NotCanonical, canonical_dataset
from dicomledger.dicom.instance import (
    HEADER_KEYWORDS,
    LONG_LENGTH_VRS,
    MAX_SEQUENCE_DEPTH,
    InstanceError,
    InstanceHeader,
    checked_header,
    instance_header,
)
from dicomledger.dicom.pixelhash import (
    CONTENT,
    CONTENT_CANONICAL,
    InstanceHashes,
    NeedsDecoder,
    PixelHashError,
    _check_single_pixel_element,
    _hash_native,
    _Layout,
    hash_instance_file,
)

__all__ = ["FAST", "PYDICOM", "Deferred", "ReadInstance", "read_instance", "read_instance_fast"]

FAST, PYDICOM = "fast", "pydicom"  # which parser read an instance (the c-store log's `parse`)

# The first read: a typical image file whole, else its header. A header that runs beyond
# it is read again whole, up to MAX_HEADER (beyond: the pydicom path).
FIRST_READ = 64 << 10
MAX_HEADER = 64 << 20

_ITEM, _SEQ_DELIM = 0xFFFEE000, 0xFFFEE0DD
_ITEM_DELIM_GROUP_ELEMENT = (0xFFFE, 0xE00D)
_UNDEFINED = 0xFFFFFFFF
_PIXEL_TAGS = {
    0x7FE00008: "FloatPixelData",
    0x7FE00009: "DoubleFloatPixelData",
    0x7FE00010: "PixelData",
}
_PIXEL_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"UN"})  # as pixelhash accepts them
_SHORT_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_16)
_SPECIFIC_CHARACTER_SET = 0x00080005
_TRANSFER_SYNTAX_UID = 0x00020010
_SYNTAXES: dict[str, bool] = {  # the dataset encodings the fast path reads: UID -> implicit VR
    uid.ImplicitVRLittleEndian: True,
    uid.ExplicitVRLittleEndian: False,
}
# Specific Character Set -> the codec pydicom decodes SH, LO and PN with (charset.py); the
# other VRs we read (UI, DA, TM, CS, IS) are decoded as Latin-1 whatever it says.
_TEXT_CODECS = {
    "": "latin_1",
    "ISO_IR 6": "latin_1",
    "ISO_IR 100": "latin_1",
    "ISO_IR 192": "utf_8",
}

# The attributes we read: tag -> (keyword, VR); for the header fields, the layout of the
# pixel data and the checks of an object without pixel data.
_IMAGE_PIXEL = {
    0x00280002: ("SamplesPerPixel", "US"),
    0x00280004: ("PhotometricInterpretation", "CS"),
    0x00280006: ("PlanarConfiguration", "US"),
    0x00280008: ("NumberOfFrames", "IS"),
    0x00280010: ("Rows", "US"),
    0x00280011: ("Columns", "US"),
    0x00280100: ("BitsAllocated", "US"),
    0x00280101: ("BitsStored", "US"),
    0x00280102: ("HighBit", "US"),
    0x00280103: ("PixelRepresentation", "US"),
    0x00287FE0: ("PixelDataProviderURL", "UR"),
}
_HEADER_TAGS = {
    0x00080016: ("SOPClassUID", "UI"),
    0x00080018: ("SOPInstanceUID", "UI"),
    0x0020000D: ("StudyInstanceUID", "UI"),
    0x0020000E: ("SeriesInstanceUID", "UI"),
    0x00100020: ("PatientID", "LO"),
    0x00100010: ("PatientName", "PN"),
    0x00100030: ("PatientBirthDate", "DA"),
    0x00100040: ("PatientSex", "CS"),
    0x00080020: ("StudyDate", "DA"),
    0x00080030: ("StudyTime", "TM"),
    0x00080050: ("AccessionNumber", "SH"),
    0x00200010: ("StudyID", "SH"),
    0x00081030: ("StudyDescription", "LO"),
    0x00080090: ("ReferringPhysicianName", "PN"),
    0x00080060: ("Modality", "CS"),
    0x00200011: ("SeriesNumber", "IS"),
    0x0008103E: ("SeriesDescription", "LO"),
    0x00200013: ("InstanceNumber", "IS"),
}
_WANTED = {
    tag: (keyword, vr.encode())
    for tag, (keyword, vr) in {
        _SPECIFIC_CHARACTER_SET: ("SpecificCharacterSet", "CS"),
        **_HEADER_TAGS,
        **_IMAGE_PIXEL,
    }.items()
}
# An integer string that pydicom's IS keeps as an int and prints as written (longer ones
# may become ISfloat, printed as a float)
_PLAIN_INTEGER = re.compile(r"[+-]?[0-9]{1,15}")


class Deferred(Exception):
    """The fast path does not decide this file; the pydicom path must. The message says why
    (a tag or an offset, never a value)."""


@dataclass(frozen=True)
class ReadInstance:
    header: InstanceHeader
    hashes: InstanceHashes  # hashes.header (a pydicom Dataset) is None when parser is FAST
    parser: str  # FAST or PYDICOM


def read_instance(
    path: str | os.PathLike[str],
    transfer_syntax_uid: str | None,
    *,
    max_inflated_size: int | None,
    sop_class_uid: str,
    sop_instance_uid: str,
) -> ReadInstance:
    """The header and hashes of the received instance at `path`, checked against the
    C-STORE request's SOP Class/Instance UIDs: the fast path when it applies, else the
    pydicom path. Raises what the pydicom path raises (PixelHashError, InstanceError,
    OSError): the fast path never refuses anything itself."""
    try:
        return read_instance_fast(
            path,
            transfer_syntax_uid,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
        )
    except Exception:  # Deferred, or anything unforeseen: the pydicom path decides
        pass
    hashes = hash_instance_file(path, transfer_syntax_uid, max_inflated_size=max_inflated_size)
    assert hashes.header is not None
    header = instance_header(hashes.header, hashes.header_sha256, sop_class_uid, sop_instance_uid)
    return ReadInstance(header, hashes, PYDICOM)


def read_instance_fast(
    path: str | os.PathLike[str],
    transfer_syntax_uid: str | None,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
) -> ReadInstance:
    """read_instance's fast path alone: its answer, or Deferred."""
    settings = pydicom_config.settings
    if (
        settings.reading_validation_mode == pydicom_config.RAISE
        or pydicom_config.datetime_conversion
        or pydicom_config.use_IS_numpy
    ):
        raise Deferred("pydicom is configured to convert values otherwise")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                return _read(
                    f,
                    f.read(min(size, FIRST_READ)),
                    size,
                    transfer_syntax_uid,
                    sop_class_uid,
                    sop_instance_uid,
                )
            except _NeedMore:
                pass
            if size > MAX_HEADER:
                raise Deferred(f"header beyond the first {MAX_HEADER} bytes")
            f.seek(0)
            return _read(
                f, f.read(size), size, transfer_syntax_uid, sop_class_uid, sop_instance_uid
            )
    except Deferred:
        raise
    except (PixelHashError, InstanceError, NeedsDecoder) as exc:
        raise Deferred(f"for the pydicom path: {type(exc).__name__}") from exc
    except (_NeedMore, OSError, struct.error, ValueError, IndexError) as exc:
        raise Deferred(type(exc).__name__) from exc


class _NeedMore(Exception):
    """The header runs past the bytes read so far."""


_EXPLICIT = struct.Struct("<HH2sH").unpack_from  # group, element, VR, 16-bit length
_IMPLICIT = struct.Struct("<HHL").unpack_from  # group, element, 32-bit length (or an item's)
_U32 = struct.Struct("<L").unpack_from
_U16 = struct.Struct("<H").unpack


def _read(
    f: IO[bytes],
    data: bytes,
    size: int,
    ts_given: str | None,
    sop_class_uid: str,
    sop_instance_uid: str,
) -> ReadInstance:
    implicit, dataset_start = _file_meta(data, ts_given)
    walk = _Walk(data, implicit, complete=len(data) == size)
    walk.top_level(dataset_start)
    values = _values(data, walk.found)
    if walk.pixel_at is None:  # no (top-level) pixel data: the content hash of the whole dataset
        hashes = _content_hashes(data, dataset_start, implicit, walk.found, values)
    else:
        hashes = _pixel_hashes(f, size, implicit, walk, values, data[dataset_start : walk.pixel_at])
    header_values = {kw: values.get(kw, "") for kw in HEADER_KEYWORDS}
    # (nesting deeper than MAX_SEQUENCE_DEPTH: the walk deferred it, pydicom's path refuses it)
    header = checked_header(
        header_values, hashes.header_sha256, sop_class_uid, sop_instance_uid, lambda: False
    )
    return ReadInstance(header, hashes, FAST)


def _file_meta(buf: bytes, ts_given: str | None) -> tuple[bool, int]:
    """Check preamble and File Meta; return (dataset is implicit VR, dataset offset)."""
    if buf[128:132] != b"DICM":
        raise Deferred("no DICM preamble")
    end = len(buf)
    pos, last_tag, ts = 132, -1, None
    while True:
        if pos + 8 > end:
            raise Deferred("File Meta or dataset cut short")
        group, element, vr, length = _EXPLICIT(buf, pos)
        if group != 2:
            break
        tag = group << 16 | element
        if tag <= last_tag:
            raise Deferred(f"File Meta tag {_show(tag)} out of order")
        last_tag = tag
        if vr in _SHORT_VRS:
            pos += 8
        elif vr in LONG_LENGTH_VRS and pos + 12 <= end:
            (length,) = _U32(buf, pos + 8)
            pos += 12
        else:
            raise Deferred(f"File Meta element {_show(tag)} has an unknown VR")
        if length == _UNDEFINED or pos + length > end:
            raise Deferred(f"File Meta element {_show(tag)} runs past the data")
        if tag == _TRANSFER_SYNTAX_UID:
            if vr != b"UI":
                raise Deferred("Transfer Syntax UID is not a UI")
            ts = buf[pos : pos + length].decode("latin_1").rstrip("\x00 ").strip()
        pos += length
    if ts not in _SYNTAXES:
        raise Deferred("not an Implicit or Explicit VR Little Endian dataset")
    if ts_given and ts_given.strip() != ts:
        raise Deferred("File Meta and given transfer syntax differ")
    return _SYNTAXES[ts], pos


class _Walk:
    """A strict walk over the dataset: the top level up to its first pixel data element (or
    its end), every sequence in it item by item. It collects the top-level attributes we
    read and the pixel data element's offset, and defers at anything pydicom might read
    otherwise than it does, and at sequences nested deeper than MAX_SEQUENCE_DEPTH."""

    def __init__(self, buf: bytes, implicit: bool, complete: bool) -> None:
        self.buf, self.implicit, self.complete = buf, implicit, complete
        self.found: dict[
            int, tuple[bytes | None, int, int]
        ] = {}  # tag -> (VR, value offset, length)
        self.pixel_at: int | None = None  # offset of the pixel data element
        self.pixel: tuple[int, bytes | None, int, int] = (0, None, 0, 0)  # its _element()

    def top_level(self, pos: int) -> None:
        buf, implicit, found = self.buf, self.implicit, self.found
        end = len(buf)
        if pos == end and self.complete:
            raise Deferred("the dataset has no data elements")
        if (
            implicit
            and pos + 6 <= end
            and 0x40 < buf[pos + 4] < 0x5B
            and 0x40 < buf[pos + 5] < 0x5B
        ):
            raise Deferred("implicit VR dataset that pydicom would read as explicit VR")
        last_tag = -1
        while pos < end:
            tag, vr, length, value_at = self._element(pos, end)
            if tag <= last_tag:
                raise Deferred(f"tag {_show(tag)} out of order or repeated")
            last_tag = tag
            if tag in _PIXEL_TAGS:
                self.pixel_at, self.pixel = pos, (tag, vr, length, value_at)
                return
            if length == _UNDEFINED:
                if not _is_sequence(tag, vr):
                    raise Deferred(f"undefined length outside a sequence at {_show(tag)}")
                pos = self._items(value_at, None, end, 1)
                continue
            pos = value_at + length
            if pos > end:
                self._cut(value_at)
            if vr == b"SQ" or vr is None and _is_sequence(tag, vr):
                self._items(value_at, pos, pos, 1)
            elif tag in _WANTED:
                found[tag] = (vr, value_at, length)
        if not self.complete:
            raise _NeedMore()  # no pixel data in what was read: the rest may hold it

    def _element(self, pos: int, limit: int) -> tuple[int, bytes | None, int, int]:
        """(tag, explicit VR or None, value length, value offset) of the element at `pos`."""
        buf = self.buf
        if pos + 8 > limit:
            self._cut(pos)
        if self.implicit:
            group, element, length = _IMPLICIT(buf, pos)
            vr, value_at = None, pos + 8
        else:
            group, element, vr, length = _EXPLICIT(buf, pos)
            if vr in _SHORT_VRS:
                value_at = pos + 8
            elif vr in LONG_LENGTH_VRS:
                if pos + 12 > limit:
                    self._cut(pos)
                (length,) = _U32(buf, pos + 8)
                value_at = pos + 12
            else:
                raise Deferred(f"unknown VR at offset {pos}")
        if group == 0xFFFE:
            raise Deferred(f"item tag at offset {pos} among data elements")
        return group << 16 | element, vr, length, value_at

    def _cut(self, pos: int) -> NoReturn:
        if not self.complete:
            raise _NeedMore()
        raise Deferred(f"element cut at offset {pos}")

    def _items(self, pos: int, end: int | None, limit: int, depth: int) -> int:
        """Walk a sequence at `depth` (top level: 1) from `pos` to exactly `end` (None: up to
        its Sequence Delimitation Item, before `limit`); return the offset after it."""
        if depth > MAX_SEQUENCE_DEPTH:  # pydicom's path refuses it
            raise Deferred(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH}")
        buf = self.buf
        while pos != end:
            if pos + 8 > limit:
                self._cut(pos)
            group, element, length = _IMPLICIT(buf, pos)
            tag = group << 16 | element
            pos += 8
            if tag == _SEQ_DELIM and end is None:
                if length:
                    raise Deferred("Sequence Delimitation Item with a length")
                return pos
            if tag != _ITEM:
                raise Deferred(f"{_show(tag)} where an item was expected")
            if length == _UNDEFINED:
                pos = self._item(pos, None, limit, depth)
            else:
                if pos + length > limit:
                    self._cut(pos)
                pos = self._item(pos, pos + length, pos + length, depth)
        return pos

    def _item(self, pos: int, end: int | None, limit: int, depth: int) -> int:
        """Walk an item's elements from `pos` to exactly `end` (None: up to its Item
        Delimitation Item, before `limit`); return the offset after it."""
        buf = self.buf
        last_tag = -1
        while pos != end:
            if (
                end is None
                and pos + 8 <= limit
                and _IMPLICIT(buf, pos)[:2] == _ITEM_DELIM_GROUP_ELEMENT
            ):
                if _U32(buf, pos + 4)[0]:
                    raise Deferred("Item Delimitation Item with a length")
                return pos + 8
            tag, vr, length, value_at = self._element(pos, limit)
            if tag <= last_tag:
                raise Deferred(f"tag {_show(tag)} out of order or repeated in an item")
            last_tag = tag
            if length == _UNDEFINED:
                if not _is_sequence(tag, vr):
                    raise Deferred(f"undefined length outside a sequence at {_show(tag)}")
                pos = self._items(value_at, None, limit, depth + 1)
                continue
            pos = value_at + length
            if pos > limit:
                self._cut(value_at)
            if _is_sequence(tag, vr):
                self._items(value_at, pos, pos, depth + 1)
            elif tag == _SPECIFIC_CHARACTER_SET:  # pydicom converts it while reading
                _codec(buf[value_at:pos])
        return pos


def _is_sequence(tag: int, vr: bytes | None) -> bool:
    """A sequence as pydicom reads it: explicit VR SQ, or implicit VR and the dictionary's SQ
    (an undefined length that is neither is deferred by the caller)."""
    return vr == b"SQ" if vr is not None else _dictionary_vr(tag) == "SQ"


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


# --- values ---------------------------------------------------------------------------------


def _values(buf: bytes, found: dict[int, tuple[bytes | None, int, int]]) -> dict[str, str]:
    """The attributes we read, as ``str(ds.get(keyword)).strip()`` gives them with pydicom
    (absent: no key)."""
    codec = "latin_1"
    charset = found.get(_SPECIFIC_CHARACTER_SET)
    if charset is not None:
        _, start, length = charset
        codec = _codec(buf[start : start + length])
    values = {}
    for tag, (vr, start, length) in found.items():
        keyword, wanted_vr = _WANTED[tag]
        if vr is not None and vr != wanted_vr:  # pydicom would convert by the VR read
            raise Deferred(f"{keyword} has another VR")
        raw = buf[start : start + length]
        if wanted_vr == b"US":
            if length not in (0, 2):
                raise Deferred(f"{keyword} is not one US value")
            values[keyword] = str(_U16(raw)[0]) if raw else ""
            continue
        if b"\\" in raw or b"\x1b" in raw:
            raise Deferred(f"{keyword} is multi-valued or escaped")
        if (
            wanted_vr == b"PN"
        ):  # convert_PN: bytes stripped, decoded; PersonName drops empty trailing groups
            text = _decode(raw.rstrip(b"\x00 "), codec, keyword).rstrip("=")
        elif wanted_vr in (b"SH", b"LO"):  # convert_text: decoded, then stripped
            text = _decode(raw, codec, keyword).rstrip("\x00 ")
        else:  # UI, DA, TM, CS, IS, UR: Latin-1 (pydicom's default_encoding), stripped
            text = raw.decode("latin_1").rstrip(" \x00")
            if wanted_vr == b"IS" and text and not _PLAIN_INTEGER.fullmatch(text.strip()):
                # pydicom keeps white space as a str, prints a long integer as a float
                raise Deferred(f"{keyword} is not a plain integer string")
        values[keyword] = text.strip()
    return values


def _codec(raw: bytes) -> str:
    value = raw.decode("latin_1").rstrip(" \x00")
    if value not in _TEXT_CODECS:
        raise Deferred("a Specific Character Set the fast path does not read")
    return _TEXT_CODECS[value]


def _decode(raw: bytes, codec: str, keyword: str) -> str:
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:  # pydicom would decode it with replacement characters
        raise Deferred(f"{keyword} does not decode") from None


def _int(values: dict[str, str], keyword: str) -> int | None:
    text = values.get(keyword, "")
    return int(text) if text else None


# --- hashes ---------------------------------------------------------------------------------


def _content_hashes(
    buf: bytes,
    dataset_start: int,
    implicit: bool,
    found: dict[int, tuple[bytes | None, int, int]],
    values: dict[str, str],
) -> InstanceHashes:
    """An object without pixel data (pixelhash: the content hashes), unless it is evidently
    an image whose pixel data is missing: that is pydicom's path to refuse."""
    is_image = "Image Storage" in uid.UID(values.get("SOPClassUID", "")).name or 0x00280010 in found
    if is_image and 0x00287FE0 not in found:
        raise Deferred("an image without pixel data")
    dataset = memoryview(buf)[dataset_start:]
    received = hashlib.sha256(dataset).digest()
    try:
        canonical = canonical_dataset(dataset, implicit, True)
    except NotCanonical as exc:
        note = f"no canonical encoding: {exc}"
        return InstanceHashes(CONTENT, received, (), None, note, 0, None, received)
    digest = hashlib.sha256(canonical).digest()
    return InstanceHashes(CONTENT_CANONICAL, digest, (), None, None, 0, None, received)


def _pixel_hashes(
    f: IO[bytes], size: int, implicit: bool, walk: _Walk, values: dict[str, str], header: bytes
) -> InstanceHashes:
    """Native pixel data: pixelhash's own code hashes it, streamed from the file."""
    tag, vr, length, value_at = walk.pixel
    if vr is not None and vr not in _PIXEL_VRS:
        raise Deferred("pixel data with an unexpected VR")
    if length == _UNDEFINED or value_at + length > size:
        raise Deferred("pixel data of undefined length, or cut short")
    keyword = _PIXEL_TAGS[tag]
    layout = _layout(values, keyword, _number_of_frames(values))
    tsyntax = uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian
    h = _hash_native(
        f, value_at, length, layout, tsyntax, None if vr is None else vr.decode(), None
    )
    _check_single_pixel_element(f, value_at + length, True)
    header_sha256 = hashlib.sha256(header).digest()  # the dataset before the pixel data element
    return InstanceHashes(
        h.method,
        h.sha256,
        h.frame_hashes,
        h.decoded_sha256,
        h.decode_note,
        h.number_of_frames,
        None,
        header_sha256,
    )


def _number_of_frames(values: dict[str, str]) -> int:
    frames = _int(values, "NumberOfFrames")
    if frames is None:
        return 1
    if frames < 1:
        raise Deferred("Number of Frames is not positive")
    return frames


def _layout(values: dict[str, str], keyword: str, frames: int) -> _Layout:
    """pixelhash._layout(required=True) from the values read; its refusals are deferred."""
    rows, columns, bits_allocated = (
        _int(values, "Rows"),
        _int(values, "Columns"),
        _int(values, "BitsAllocated"),
    )
    samples = _int(values, "SamplesPerPixel")
    samples = 1 if samples is None else samples
    if rows is None or columns is None or rows < 1 or columns < 1 or samples < 1:
        raise Deferred("Rows, Columns or Samples per Pixel missing or not positive")
    if bits_allocated not in (1, 8, 16, 32, 64):
        raise Deferred("Bits Allocated not 1, 8, 16, 32 or 64")
    return _Layout(
        keyword=keyword,
        frames=frames,
        rows=rows,
        columns=columns,
        samples=samples,
        bits_allocated=bits_allocated,
        bits_stored=_int(values, "BitsStored"),
        high_bit=_int(values, "HighBit"),
        pixel_representation=_int(values, "PixelRepresentation"),
        planar_configuration=_int(values, "PlanarConfiguration") or 0,
        photometric=values.get("PhotometricInterpretation", ""),
    )


def _show(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
