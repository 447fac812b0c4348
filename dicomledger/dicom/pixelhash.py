"""Pixel hashes of a received DICOM instance; the exact definition is docs/pixel-hash.md.

The header is read with pydicom; the pixel data value is then streamed from the file in
fixed-size chunks (native) or one frame at a time (encapsulated), so the memory used is
bounded by CHUNK or one frame, never by the size of the object.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from math import ceil
from typing import IO, Any, BinaryIO, cast

import numpy as np
from pydicom import uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_dataset, read_preamble
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import as_pixel_options

from dicomledger.common.errors import DicomError
from dicomledger.dicom.canonical import NotCanonical, canonical_dataset

__all__ = [
    "CONTENT",
    "CONTENT_CANONICAL",
    "LOSSLESS_TRANSFER_SYNTAXES",
    "PIXEL",
    "InstanceHashes",
    "PixelHashError",
    "hash_instance_file",
]

# Hash methods (the ledger's `hash_method`), docs/pixel-hash.md
PIXEL = "pixel"  # the top-level pixel data element's value as received
CONTENT_CANONICAL = "content-canonical"  # no pixel data: the dataset's canonical encoding
# No pixel data: the dataset bytes as received. The only content method of anchors written
# before CONTENT_CANONICAL existed; now the fallback for a dataset it is not defined for.
CONTENT = "content"

CHUNK = 8 << 20  # bytes read per step: a multiple of every sample size
# Largest frame we decode (or unpack) in memory. A header can claim any Rows x Columns over
# a tiny compressed fragment; beyond this the canonical hash is skipped, not allocated.
MAX_DECODED_FRAME = 128 << 20

# Transfer syntaxes whose decoded values are the original values (docs/pixel-hash.md, §5)
LOSSLESS_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRLittleEndian,
        uid.ExplicitVRBigEndian,
        uid.DeflatedExplicitVRLittleEndian,
        uid.RLELossless,
        uid.JPEGLossless,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEG2000Lossless,
        uid.HTJ2KLossless,
        uid.HTJ2KLosslessRPCL,
    }
)

_PIXEL_KEYWORDS = {
    0x7FE00008: "FloatPixelData",
    0x7FE00009: "DoubleFloatPixelData",
    0x7FE00010: "PixelData",
}
_NAMES = {
    "FloatPixelData": "Float Pixel Data",
    "DoubleFloatPixelData": "Double Float Pixel Data",
    "PixelData": "Pixel Data",
}
_ITEM, _SEQ_DELIM = 0xFFFEE000, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


class PixelHashError(DicomError, ValueError):
    """The file is not a dataset whose hashes can be defined (malformed or truncated)."""


class NeedsDecoder(Exception):
    """The canonical hash of this native pixel data needs pydicom's decoder, hence the
    header as a pydicom Dataset, which the caller did not give (fastread defers)."""


@dataclass(frozen=True)
class InstanceHashes:
    method: str  # PIXEL (top-level pixel data element), else CONTENT_CANONICAL or CONTENT
    sha256: bytes  # pixel data value as received, or the dataset's content hash
    frame_hashes: tuple[bytes, ...]  # each frame's bytes as received; () for content
    decoded_sha256: bytes | None  # canonical decoded pixel values (lossless syntaxes only)
    # why decoded_sha256 is None; for CONTENT, why the canonical encoding is not defined
    decode_note: str | None
    number_of_frames: int  # Number of Frames (1 if absent); 0 for content
    # The parsed header (everything before the pixel data) and the SHA-256 of its bytes as
    # received, so the caller needs no second parse and can tell header edits apart. For
    # content methods the header is the whole dataset, so header_sha256 is its CONTENT hash.
    header: Dataset | None = field(default=None, compare=False, repr=False)
    header_sha256: bytes = field(default=b"", compare=False)

    def sha256_for(self, method: str) -> bytes | None:
        """This file's ``sha256`` under hash method `method` (what an anchor names), None
        when that method does not apply to it: an instance anchored as CONTENT before the
        canonical encoding existed is checked against the bytes as received."""
        if method == self.method:
            return self.sha256
        if method == CONTENT and self.method == CONTENT_CANONICAL:
            return self.header_sha256
        return None


def hash_instance_file(
    path: str | os.PathLike[str],
    transfer_syntax_uid: str | None = None,
    *,
    max_inflated_size: int | None = None,
) -> InstanceHashes:
    """Hash the DICOM file at `path` (Part 10, or a bare dataset when `transfer_syntax_uid`
    is given). Raises PixelHashError for malformed or truncated data, and for a deflated
    dataset that inflates beyond `max_inflated_size` bytes; OSError for I/O."""
    with open(path, "rb") as f:
        return hash_instance_stream(f, transfer_syntax_uid, max_inflated_size=max_inflated_size)


def hash_instance_stream(
    f: IO[bytes], transfer_syntax_uid: str | None = None, *, max_inflated_size: int | None = None
) -> InstanceHashes:
    """hash_instance_file for an open binary file or an in-memory copy (``io.BytesIO``): a
    retrieval hashes the very bytes it is about to send."""
    try:
        return _hash_file(f, transfer_syntax_uid, max_inflated_size)
    except OSError as exc:
        if exc.errno is not None:  # reading the file failed
            raise
        # pydicom's reader reports malformed data as an OSError without an errno
        raise PixelHashError(f"malformed dataset: {exc}") from exc
    except (PixelHashError, MemoryError):
        raise
    except Exception as exc:  # pydicom/struct/zlib parse failures: say so, never crash
        raise PixelHashError(f"malformed dataset: {type(exc).__name__}: {exc}") from exc


def native_pixel_sha256(ds: Dataset, transfer_syntax_uid: str) -> bytes | None:
    """The ``sha256`` that hash_instance_* gives (method "pixel") for an instance already
    parsed by pydicom, when that is just the SHA-256 of the Pixel Data value: native pixel
    data in a little-endian, non-deflated syntax, whose value pydicom holds as read. None
    otherwise (compressed, big endian, deflated, no Pixel Data): use hash_instance_stream.
    A retrieval's tamper check needs only this hash, not the frame and decoded hashes."""
    tsyntax = uid.UID(transfer_syntax_uid)
    if not tsyntax.is_transfer_syntax or tsyntax.is_encapsulated or tsyntax.is_deflated:
        return None
    if not tsyntax.is_little_endian or any(
        k in ds for k in _PIXEL_KEYWORDS.values() if k != "PixelData"
    ):
        return None
    value = ds.get("PixelData")
    if not isinstance(value, bytes):
        return None
    return hashlib.sha256(value).digest()  # releases the GIL while it hashes


def stored_sha256(
    data: bytes, dataset: Dataset, transfer_syntax_uid: str, method: str | None = None
) -> bytes:
    """The ``sha256`` hash_instance_* gives for a file's ``data``, already parsed as
    ``dataset``, under hash method `method` (the anchor's; None: the file's own method):
    quick for native little-endian pixel data, the full hash otherwise. Raises
    PixelHashError when `method` does not apply to the file (pixel data where the anchor
    hashed content, or the reverse)."""
    quick = native_pixel_sha256(dataset, transfer_syntax_uid) if method in (None, PIXEL) else None
    if quick is not None:
        return quick
    hashes = hash_instance_stream(io.BytesIO(data), transfer_syntax_uid)
    found = hashes.sha256 if method is None else hashes.sha256_for(method)
    if found is None:
        raise PixelHashError(f"the file has {hashes.method} hashes, the anchor names {method!r}")
    return found


# --- file structure ---------------------------------------------------------------------


def _hash_file(
    f: IO[bytes], ts_given: str | None, max_inflated_size: int | None = None
) -> InstanceHashes:
    tsyntax, dataset_start = _read_meta(f, ts_given)
    file_end = _size(f)
    src: IO[bytes] = f
    if tsyntax.is_deflated:
        src = _inflate(
            f, max_inflated_size
        )  # parse the inflated copy; the content hash still covers f
    try:
        return _hash_dataset(f, src, tsyntax, dataset_start, file_end)
    finally:
        if src is not f:
            src.close()


def _read_meta(f: IO[bytes], ts_given: str | None) -> tuple[uid.UID, int]:
    """Skip preamble and File Meta (both optional); return the transfer syntax and the
    offset where the dataset starts."""
    read_preamble(cast(BinaryIO, f), force=True)  # rewinds to 0 when there is no 'DICM' prefix
    meta = _read_file_meta_info(cast(BinaryIO, f))
    in_meta = meta.get("TransferSyntaxUID")
    if in_meta and ts_given and uid.UID(ts_given) != in_meta:
        raise PixelHashError(
            f"File Meta Transfer Syntax UID {in_meta} differs from the given {ts_given}"
        )
    ts = in_meta or ts_given
    if not ts:
        raise PixelHashError(
            "no Transfer Syntax UID: the file has no File Meta Information and none was given"
        )
    tsyntax = uid.UID(str(ts))
    if not tsyntax.is_transfer_syntax:
        raise PixelHashError(f"unknown transfer syntax {tsyntax}")
    return tsyntax, f.tell()


def _hash_dataset(
    f: IO[bytes], src: IO[bytes], tsyntax: uid.UID, dataset_start: int, file_end: int
) -> InstanceHashes:
    parse_start = 0 if src is not f else dataset_start
    src_end = _size(src)
    src.seek(parse_start)
    little = tsyntax.is_little_endian
    reader = _ShortReadLog(src)
    implicit = tsyntax.is_implicit_VR
    header = read_dataset(cast(BinaryIO, reader), implicit, little, stop_when=_at_pixel_data)
    # pydicom detects (and tolerates) an implicit VR dataset under an explicit syntax
    implicit = bool(header.original_encoding[0])

    pixel_element_at = src.tell()
    header_sha256 = (
        _sha256_range(f, dataset_start, pixel_element_at)
        if src is f
        else _sha256_range(f, dataset_start, file_end)  # deflated: the whole stream
    )
    src.seek(pixel_element_at)
    head = src.read(8)
    tag = _tag(head, little) if len(head) == 8 else None
    if tag not in _PIXEL_KEYWORDS:  # read to the end: no (top-level) pixel data element
        if reader.short_read_at is not None:
            raise PixelHashError(
                f"the dataset ends inside an element at offset {reader.short_read_at} (truncated?)"
            )
        if not header._dict:
            raise PixelHashError("the dataset has no data elements")
        _check_complete(header, src_end)
        _check_not_an_image(header)
        received = _sha256_range(f, dataset_start, file_end)
        src.seek(parse_start)
        try:
            canonical = canonical_dataset(src.read(src_end - parse_start), implicit, little)
        except NotCanonical as exc:
            note = f"no canonical encoding: {exc}"
            return InstanceHashes(CONTENT, received, (), None, note, 0, header, received)
        digest = hashlib.sha256(canonical).digest()
        return InstanceHashes(CONTENT_CANONICAL, digest, (), None, None, 0, header, received)

    keyword = _PIXEL_KEYWORDS[tag]
    name = _NAMES[keyword]
    endian = "<" if little else ">"
    vr: str | None = None
    if implicit:
        length = struct.unpack(f"{endian}L", head[4:])[0]
    else:
        vr = head[4:6].decode("ascii", "replace")
        if vr not in ("OB", "OW", "OF", "OD", "UN"):
            raise PixelHashError(f"{name} has VR {vr!r}, expected OB, OW, OF or OD")
        length = struct.unpack(f"{endian}L", _read_exact(src, 4))[0]
    value_offset = src.tell()
    nframes = _number_of_frames(header)

    if length == _UNDEFINED:
        if keyword != "PixelData" or not tsyntax.is_encapsulated:
            raise PixelHashError(
                f"{name} has undefined length but {tsyntax.name} is not an encapsulated "
                "transfer syntax"
            )
        value_end, hashes = _hash_encapsulated(src, value_offset, src_end, header, tsyntax, nframes)
    else:
        if tsyntax.is_encapsulated:
            raise PixelHashError(f"{name} has a defined length but {tsyntax.name} is encapsulated")
        if value_offset + length > src_end:
            raise PixelHashError(
                f"{name} value is {length} bytes but the file ends after "
                f"{src_end - value_offset} (truncated?)"
            )
        layout = _layout(header, keyword, nframes, required=True)
        hashes = _hash_native(src, value_offset, length, layout, tsyntax, vr, header)
        value_end = value_offset + length

    _check_single_pixel_element(src, value_end, little)
    return replace(hashes, header=header, header_sha256=header_sha256)


def _check_single_pixel_element(src: IO[bytes], offset: int, little: bool) -> None:
    # Anything after the pixel data is header; a second pixel data element would be an
    # unhashed image, so refuse it.
    src.seek(offset)
    head = src.read(4)
    if len(head) == 4 and _tag(head, little) in _PIXEL_KEYWORDS:
        raise PixelHashError("more than one pixel data element in the dataset")


class _ShortReadLog:
    """File proxy for pydicom's reader, which treats a short read as the end of the data:
    remembers where the first read returned some but not all of the bytes asked for."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.short_read_at: int | None = None
        self.seek, self.tell = f.seek, f.tell

    def read(self, size: int = -1) -> bytes:
        start = self._f.tell()
        data = self._f.read(size)
        if 0 < len(data) < size and self.short_read_at is None:
            self.short_read_at = start
        return data


def _check_complete(ds: Dataset, end: int) -> None:
    """pydicom's reader also accepts a value cut to 0 bytes: check that every top-level
    value is complete and the last one ends the file."""
    last_end: int | None = None
    for elem in ds._dict.values():
        length = getattr(elem, "length", None)
        value = getattr(elem, "value", None)
        if length is None or length == _UNDEFINED or not isinstance(value, bytes | bytearray):
            last_end = None
            continue
        if len(value) != length:
            raise PixelHashError(
                f"element {elem.tag} is {length} bytes long but the file ends after "
                f"{len(value)} (truncated?)"
            )
        last_end = cast(RawDataElement, elem).value_tell + length  # a value read from the file
    if last_end is not None and last_end != end:
        raise PixelHashError(
            f"{end - last_end} trailing bytes after the last data element (truncated?)"
        )


def _check_not_an_image(header: Dataset) -> None:
    """A file cut at an element boundary is a well-formed shorter dataset; for an image the
    missing pixel data still gives it away (JPIP-referenced images excepted)."""
    sop_class = uid.UID(str(header.get("SOPClassUID", "")))
    is_image = "Image Storage" in sop_class.name or "Rows" in header
    if is_image and "PixelDataProviderURL" not in header:
        what = sop_class.name or "Image Pixel module"
        raise PixelHashError(f"{what} instance without pixel data (truncated?)")


def _number_of_frames(header: Dataset) -> int:
    elem = header.get("NumberOfFrames")
    if elem is None or elem == "":
        return 1
    try:
        n = int(elem)
    except (TypeError, ValueError):
        raise PixelHashError(f"Number of Frames {elem!r} is not an integer") from None
    if n < 1:
        raise PixelHashError(f"Number of Frames {n} is not a positive integer")
    return n


@dataclass(frozen=True)
class _Layout:
    keyword: str
    frames: int
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int | None
    high_bit: int | None
    pixel_representation: int | None
    planar_configuration: int
    photometric: str

    @property
    def frame_bits(self) -> int:
        # YBR_FULL_422 stores two samples per pixel on average (PS3.3 C.7.6.3.1.2)
        per_pixel = 2 if self.photometric == "YBR_FULL_422" else self.samples
        return self.rows * self.columns * per_pixel * self.bits_allocated


def _layout(header: Dataset, keyword: str, frames: int, required: bool) -> _Layout:
    """Image Pixel attributes; `required` (native data) makes the frame size mandatory."""

    def get(name: str, default: int | None = None) -> int | None:
        value = header.get(name)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except (TypeError, ValueError):
            raise PixelHashError(f"{name} {value!r} is not an integer") from None

    rows, columns, bits_allocated = get("Rows"), get("Columns"), get("BitsAllocated")
    samples = get("SamplesPerPixel", 1)
    if required:
        for name, value in (("Rows", rows), ("Columns", columns), ("SamplesPerPixel", samples)):
            if value is None:
                raise PixelHashError(f"{_NAMES[keyword]} present but {name} is missing")
            if value < 1:
                raise PixelHashError(f"{name} {value} is not a positive integer")
        if bits_allocated not in (1, 8, 16, 32, 64):
            raise PixelHashError(f"Bits Allocated {bits_allocated} is not 1, 8, 16, 32 or 64")
    return _Layout(
        keyword=keyword,
        frames=frames,
        rows=rows or 0,
        columns=columns or 0,
        samples=samples or 1,
        bits_allocated=bits_allocated or 0,
        bits_stored=get("BitsStored"),
        high_bit=get("HighBit"),
        pixel_representation=get("PixelRepresentation"),
        planar_configuration=get("PlanarConfiguration", 0) or 0,
        photometric=str(header.get("PhotometricInterpretation", "")).strip(),
    )


def _canonical_problem(lay: _Layout, tsyntax: uid.UID) -> str | None:
    """Why the canonical decoded form is undefined for this dataset, or None."""
    if tsyntax not in LOSSLESS_TRANSFER_SYNTAXES:
        return f"{tsyntax.name} ({tsyntax}) is not a lossless transfer syntax"
    if lay.rows < 1 or lay.columns < 1 or lay.samples < 1:
        return "Rows, Columns or Samples per Pixel missing or not positive"
    ba, bs, hb, pr = lay.bits_allocated, lay.bits_stored, lay.high_bit, lay.pixel_representation
    if lay.keyword != "PixelData":
        expected = 32 if lay.keyword == "FloatPixelData" else 64
        return None if ba == expected else f"{lay.keyword} needs Bits Allocated {expected}"
    if ba not in (1, 8, 16, 32, 64):
        return f"Bits Allocated {ba} is not 1, 8, 16, 32 or 64"
    if bs is None or not 1 <= bs <= ba:
        return f"Bits Stored {bs} is not between 1 and Bits Allocated {ba}"
    if hb != bs - 1:
        return f"High Bit {hb} is not Bits Stored - 1"
    if pr not in (0, 1):
        return f"Pixel Representation {pr} is not 0 or 1"
    return None


def _too_big(lay: _Layout) -> str | None:
    size = lay.rows * lay.columns * lay.samples * max(lay.bits_allocated, 8) // 8
    if size > MAX_DECODED_FRAME:
        return f"decoded frame of {size} bytes exceeds the {MAX_DECODED_FRAME}-byte limit"
    return None


# --- native pixel data --------------------------------------------------------------------


def _hash_native(
    src: IO[bytes],
    offset: int,
    length: int,
    lay: _Layout,
    tsyntax: uid.UID,
    vr: str | None,
    header: Dataset | None,
) -> InstanceHashes:
    n, ba = lay.frames, lay.bits_allocated
    data_len = ceil(n * lay.frame_bits / 8)
    # Bytes beyond the last frame (padding, or excess that pydicom also ignores) are
    # covered by the value hash only; too few bytes is an error.
    if length < data_len:
        name, frame_size = _NAMES[lay.keyword], lay.frame_bits / 8
        if ba != 1 and length % frame_size:
            raise PixelHashError(
                f"{name} length {length} is not a multiple of the frame size {frame_size:g}"
            )
        raise PixelHashError(
            f"{name} length {length} is less than Number of Frames {n} x frame size "
            f"{frame_size:g} bytes = {data_len}"
        )

    problem = _canonical_problem(lay, tsyntax)
    fast = (
        problem is None
        and ba != 1
        and (tsyntax.is_little_endian or tsyntax.is_deflated)
        and (lay.samples == 1 or lay.planar_configuration == 0)
        and lay.photometric != "YBR_FULL_422"
    )
    frame_len = lay.frame_bits // 8 if ba != 1 else None
    value_hash, frame_hashes, decoded = _stream_native(
        src, offset, length, data_len, frame_len, n, fast, _chunk_fixer(lay) if fast else None
    )
    note = problem
    if ba == 1:
        if big := _too_big(lay):
            raise PixelHashError(f"1-bit frame too large: {big}")
        frame_hashes, decoded = _bitpacked_frames(src, offset, lay, problem is None)
    elif not fast:
        decoded, note = None, problem or _too_big(lay)
        if note is None:
            if header is None:
                raise NeedsDecoder(f"{_NAMES[lay.keyword]} needs decoding for its canonical hash")
            decoded, note = _decode_native(src, offset, lay, tsyntax, vr, header)
    return InstanceHashes(PIXEL, value_hash, frame_hashes, decoded, note, n)


def _stream_native(
    src: IO[bytes],
    offset: int,
    length: int,
    data_len: int,
    frame_len: int | None,
    nframes: int,
    canonical: bool,
    fixer: Callable[[memoryview], np.ndarray | None] | None,
) -> tuple[bytes, tuple[bytes, ...], bytes | None]:
    """One sequential pass over the value: the value hash, the frame hashes (when frames
    are byte-aligned) and, if `canonical`, the canonical hash. That costs nothing extra
    while the received bytes are canonical; `fixer` (None: always canonical) says when
    they are not, and the canonical hash then forks off the value hash."""
    value = hashlib.sha256()
    canon: Any = None  # forked from `value` at the first chunk that needs fixing
    per_frame = frame_len is not None and nframes > 1
    frames: list[bytes] = []
    frame = hashlib.sha256()
    in_frame = 0
    buf = memoryview(bytearray(min(CHUNK, max(data_len, 1))))
    src.seek(offset)
    remaining = data_len
    while remaining:
        chunk = buf[: _readinto_exact(src, buf[: min(len(buf), remaining)])]
        remaining -= len(chunk)
        if fixer is not None:
            fixed = fixer(chunk)
            if fixed is not None and canon is None:
                canon = value.copy()
            if canon is not None:
                canon.update(chunk if fixed is None else fixed)
        value.update(chunk)
        if per_frame:
            assert frame_len is not None
            pos = 0
            while pos < len(chunk):
                take = min(frame_len - in_frame, len(chunk) - pos)
                frame.update(chunk[pos : pos + take])
                pos += take
                in_frame += take
                if in_frame == frame_len:
                    frames.append(frame.digest())
                    frame, in_frame = hashlib.sha256(), 0
    decoded = (value if canon is None else canon).digest() if canonical else None
    if frame_len is not None and nframes == 1:
        frames = [value.digest()]
    _update_from(value, src, length - data_len)  # padding or excess after the last frame
    return value.digest(), tuple(frames), decoded


def _chunk_fixer(lay: _Layout) -> Callable[[memoryview], np.ndarray | None] | None:
    """For little-endian interleaved data: a function returning the canonical form of a
    chunk, or None when the chunk already is canonical (the usual case)."""
    if lay.keyword != "PixelData" or lay.bits_stored == lay.bits_allocated:
        return None  # every bit pattern is canonical: nothing to check
    width, bs = lay.bits_allocated // 8, lay.bits_stored
    assert bs is not None
    if lay.pixel_representation == 0:
        top = (1 << bs) - 1

        def fix_unsigned(chunk: memoryview) -> np.ndarray | None:
            values = np.frombuffer(chunk, f"<u{width}")
            return None if values.max() <= top else _canonical_array(values, lay)

        return fix_unsigned
    low, high = -(1 << (bs - 1)), (1 << (bs - 1)) - 1

    def fix_signed(chunk: memoryview) -> np.ndarray | None:
        values = np.frombuffer(chunk, f"<i{width}")
        ok = low <= values.min() and values.max() <= high
        return None if ok else _canonical_array(values, lay)

    return fix_signed


def _bitpacked_frames(
    src: IO[bytes], offset: int, lay: _Layout, canonical: bool
) -> tuple[tuple[bytes, ...], bytes | None]:
    """Bits Allocated 1: frames need not start on a byte boundary, so each frame's bits
    are repacked from bit 0 (LSB first) before hashing."""
    npix = lay.rows * lay.columns * lay.samples
    decoded = hashlib.sha256()
    frames = []
    for k in range(lay.frames):
        first_bit = k * npix
        start, stop = first_bit // 8, ceil((first_bit + npix) / 8)
        src.seek(offset + start)
        raw = np.frombuffer(_read_exact(src, stop - start), np.uint8)
        skip = first_bit - 8 * start
        bits = np.unpackbits(raw, bitorder="little")[skip : skip + npix]
        frames.append(hashlib.sha256(np.packbits(bits, bitorder="little")).digest())  # type: ignore[arg-type]  # numpy's stubs give ndarray no __buffer__ before 3.12
        decoded.update(bits)  # type: ignore[arg-type]  # canonical: one byte, 0 or 1, per pixel
    return tuple(frames), decoded.digest() if canonical else None


def _decode_native(
    src: IO[bytes], offset: int, lay: _Layout, tsyntax: uid.UID, vr: str | None, header: Dataset
) -> tuple[bytes | None, str | None]:
    """Big endian, planar or YBR_FULL_422 data: let pydicom decode frame by frame."""
    decoder = get_decoder(uid.ExplicitVRLittleEndian if tsyntax.is_deflated else tsyntax)
    opts = _decode_options(header, lay)
    if vr:
        opts["pixel_vr"] = vr
    src.seek(offset)
    digest = hashlib.sha256()
    try:
        for arr, _ in decoder.iter_array(cast(BinaryIO, src), raw=True, **opts):
            digest.update(_canonical_array(arr, lay))  # type: ignore[arg-type]  # an ndarray: a buffer
    except BaseException as exc:  # see _describe
        return None, f"decoding failed: {_describe(exc)}"
    return digest.digest(), None


def _decode_options(header: Dataset, lay: _Layout) -> dict[str, Any]:
    opts = as_pixel_options(header)
    opts.pop("extended_offsets", None)
    opts["pixel_keyword"] = lay.keyword
    opts["number_of_frames"] = lay.frames
    return opts


def _canonical_array(arr: np.ndarray, lay: _Layout) -> np.ndarray:
    """Decoded samples -> canonical form: C order (rows, columns, samples), little endian,
    Bits Allocated wide, zero- or sign-extended from Bits Stored."""
    width = lay.bits_allocated // 8
    if lay.keyword != "PixelData":
        return np.ascontiguousarray(arr, dtype=f"<f{width}")
    signed = lay.pixel_representation == 1
    arr = np.ascontiguousarray(arr, dtype=f"<i{width}" if signed else f"<u{width}")
    bs = lay.bits_stored
    assert bs is not None
    if bs == lay.bits_allocated:
        return arr
    values = arr.view(f"<u{width}") & ((1 << bs) - 1)
    if signed:
        sign = 1 << (bs - 1)
        values = (values ^ sign) - sign  # two's-complement sign extension, modulo 2**width
    return values


# --- encapsulated pixel data -------------------------------------------------------------


def _hash_encapsulated(
    src: IO[bytes],
    offset: int,
    src_end: int,
    header: Dataset,
    tsyntax: uid.UID,
    nframes: int,
) -> tuple[int, InstanceHashes]:
    items, value_end = _scan_items(src, offset, src_end)
    value_hash = _sha256_range(src, offset, value_end - 8)  # delimiter excluded, as in pydicom
    fragments = items[1:]
    if not fragments:
        raise PixelHashError("encapsulated Pixel Data has no fragments")
    _check_offset_tables(src, items, fragments[0][0], header)

    if tsyntax in uid.MPEGTransferSyntaxes:  # one video stream: frames are not separable
        stream = hashlib.sha256()
        for item_offset, size in fragments:
            stream.update(_read_range(src, item_offset + 8, size))
        video = f"{tsyntax.name} is a video transfer syntax: not decoded"
        return value_end, InstanceHashes(
            PIXEL, value_hash, (stream.digest(),), None, video, nframes
        )

    lay = _layout(header, "PixelData", nframes, required=False)
    note = _canonical_problem(lay, tsyntax) or _too_big(lay)
    decoder = None
    opts: dict[str, Any] = {}
    if note is None:
        try:
            decoder = get_decoder(tsyntax)
            opts = _decode_options(header, lay) | {"number_of_frames": 1}  # one at a time
        except Exception as exc:
            decoder, note = None, f"cannot decode: {_describe(exc)}"
        if decoder is not None and not decoder.is_available:
            note, decoder = f"no decoder installed for {tsyntax.name}", None
    decoded = hashlib.sha256()

    frame_hashes = []
    for index, parts in enumerate(_fragmented_frames(src, offset, nframes, header)):
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        frame_hashes.append(digest.digest())
        if decoder is None:
            continue
        try:
            arr, _ = decoder.as_array(encapsulate([b"".join(parts)]), raw=True, **opts)
            decoded.update(_canonical_array(arr, lay))  # type: ignore[arg-type]  # an ndarray: a buffer
        except BaseException as exc:  # see _describe
            note, decoder = f"decoding frame {index} failed: {_describe(exc)}", None
    if len(frame_hashes) != nframes:
        raise PixelHashError(
            f"encapsulated Pixel Data holds {len(frame_hashes)} frames but Number of Frames "
            f"is {nframes}"
        )
    result = decoded.digest() if note is None else None
    return value_end, InstanceHashes(PIXEL, value_hash, tuple(frame_hashes), result, note, nframes)


def _scan_items(src: IO[bytes], offset: int, end: int) -> tuple[list[tuple[int, int]], int]:
    """Validate the item structure (pydicom's parse_fragments stops silently at EOF):
    return [(item offset, value length)], Basic Offset Table first, and the offset after
    the Sequence Delimitation Item."""
    items: list[tuple[int, int]] = []
    pos = offset
    src.seek(pos)
    while True:
        head = src.read(8)
        if len(head) < 8:
            raise PixelHashError(
                "encapsulated Pixel Data ends without a Sequence Delimitation Item (truncated?)"
            )
        group, element, length = struct.unpack("<HHL", head)
        tag = group << 16 | element
        if tag == _SEQ_DELIM:
            if not items:
                raise PixelHashError("encapsulated Pixel Data has no Basic Offset Table item")
            return items, pos + 8
        if tag != _ITEM:
            raise PixelHashError(
                f"unexpected tag ({group:04X},{element:04X}) at offset {pos} in encapsulated "
                "Pixel Data"
            )
        if length == _UNDEFINED or pos + 8 + length > end:
            raise PixelHashError(
                f"item at offset {pos} in encapsulated Pixel Data has length {length} but the "
                f"file ends after {end - pos - 8} (truncated?)"
            )
        items.append((pos, length))
        pos += 8 + length
        src.seek(pos)


def _check_offset_tables(
    src: IO[bytes], items: list[tuple[int, int]], frames_start: int, header: Dataset
) -> None:
    """Frame boundaries come from the offset tables: they must point at fragment starts
    (pydicom follows them without checking)."""
    starts = [item_offset - frames_start for item_offset, _ in items[1:]]
    bot_offset, bot_len = items[0]
    if bot_len % 4:
        raise PixelHashError(f"Basic Offset Table length {bot_len} is not a multiple of 4")
    bot = struct.unpack(f"<{bot_len // 4}L", _read_range(src, bot_offset + 8, bot_len))
    if bot and (bot[0] != 0 or list(bot) != sorted(set(bot)) or not set(bot) <= set(starts)):
        raise PixelHashError(f"Basic Offset Table {list(bot)[:8]} does not point at fragments")
    eot = header.get("ExtendedOffsetTable")
    if eot is not None:
        lengths = header.get("ExtendedOffsetTableLengths") or b""
        offsets = list(struct.unpack(f"<{len(eot) // 8}Q", eot))
        sizes = list(struct.unpack(f"<{len(lengths) // 8}Q", lengths))
        if offsets != starts or sizes != [size for _, size in items[1:]]:
            raise PixelHashError(
                "Extended Offset Table does not list every fragment (one fragment per frame)"
            )


def _fragmented_frames(
    src: IO[bytes], offset: int, nframes: int, header: Dataset
) -> Iterator[tuple[bytes, ...]]:
    src.seek(offset)
    eot = header.get("ExtendedOffsetTable")
    extended = (eot, header.ExtendedOffsetTableLengths) if eot is not None else None
    try:
        yield from generate_fragmented_frames(
            src, number_of_frames=nframes, extended_offsets=extended
        )
    except ValueError as exc:
        raise PixelHashError(f"encapsulated Pixel Data: {exc}") from exc


# --- small I/O helpers ------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """A decoder failure, for decode_note. Decoders fail any way on bad input; the Rust ones
    (pylibjpeg-rle via pyo3) even raise PanicException, a BaseException."""
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        raise exc
    return f"{type(exc).__name__}: {exc}"[:300]


def _tag(head: bytes, little: bool) -> int:
    group, element = struct.unpack("<HH" if little else ">HH", head[:4])
    return group << 16 | element


def _size(f: IO[bytes]) -> int:
    pos = f.tell()
    end = f.seek(0, os.SEEK_END)
    f.seek(pos)
    return end


def _readinto_exact(f: IO[bytes], buf: memoryview) -> int:
    done = 0
    while done < len(buf):
        n = f.readinto(buf[done:])  # type: ignore[attr-defined]
        if not n:
            raise PixelHashError("file ended inside the pixel data (truncated?)")
        done += n
    return done


def _read_exact(f: IO[bytes], size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise PixelHashError("file ended inside the pixel data (truncated?)")
    return data


def _read_range(f: IO[bytes], offset: int, size: int) -> bytes:
    f.seek(offset)
    return _read_exact(f, size)


def _sha256_range(f: IO[bytes], start: int, end: int) -> bytes:
    digest = hashlib.sha256()
    f.seek(start)
    _update_from(digest, f, end - start)
    return digest.digest()


def _update_from(digest: Any, f: IO[bytes], size: int) -> None:
    """Feed the next `size` bytes of `f` to `digest`, CHUNK at a time."""
    buf = memoryview(bytearray(min(CHUNK, max(size, 1))))
    while size:
        n = _readinto_exact(f, buf[: min(len(buf), size)])
        digest.update(buf[:n])
        size -= n


def _inflate(f: IO[bytes], limit: int | None = None) -> IO[bytes]:
    """Inflate a deflated dataset into a spooled temporary file, in bounded steps
    (pydicom would inflate it whole into memory); refuse one that inflates beyond `limit`
    bytes (a deflate bomb: 1 MB can inflate to 1 GB) before writing much more than that."""
    out = tempfile.SpooledTemporaryFile(max_size=4 * CHUNK)  # the caller closes it
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        while data := f.read(CHUNK):
            while data:
                out.write(inflater.decompress(data, CHUNK))
                data = inflater.unconsumed_tail
                _check_inflated(out, limit)
        out.write(inflater.flush())
        _check_inflated(out, limit)
        if not inflater.eof:
            raise PixelHashError("deflated dataset stream is truncated")
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


def _check_inflated(out: IO[bytes], limit: int | None) -> None:
    if limit is not None and out.tell() > limit:
        raise PixelHashError(
            f"the deflated dataset inflates to more than {limit} bytes (gateway.max_inflated_size)"
        )
