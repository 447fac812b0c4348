"""The content hash of objects without pixel data (docs/pixel-hash.md §6): one hash for every
legal re-encoding of a dataset, another for any changed value; the test vectors of the docs."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from dicomledger.dicom.canonical import MAX_DEPTH, NotCanonical, canonical_dataset
from dicomledger.dicom.pixelhash import (
    CONTENT,
    CONTENT_CANONICAL,
    PixelHashError,
    hash_instance_file,
    stored_sha256,
)
from tests import dicomdata
from tests.conftest import dcmtk

ROOT = Path(__file__).resolve().parent.parent
WHEEL = Path(pydicom.__file__).parent / "data" / "test_files"
REPORTS = [
    "waveform_ecg.dcm",
    "reportsi.dcm",
    "rtplan.dcm",
    "test-SR.dcm",
    "priv_SQ.dcm",
    "UN_sequence.dcm",
    "empty_charset_LEI.dcm",
    "no_meta_group_length.dcm",
    "reportsi_with_empty_number_tags.dcm",
]

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.e2e,
]  # pydicom on odd test files


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def element(
    tag: int, vr: bytes | None, value: bytes, big: bool = False, length: int | None = None
) -> bytes:
    """One data element, encoded by hand (independent of the code under test)."""
    e = ">" if big else "<"
    n = len(value) if length is None else length
    if vr is None:
        return struct.pack(e + "HHL", tag >> 16, tag & 0xFFFF, n) + value
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack(e + "HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, n) + value
    return struct.pack(e + "HH2sH", tag >> 16, tag & 0xFFFF, vr, n) + value


def item(content: bytes, big: bool = False, undefined: bool = False) -> bytes:
    e = ">" if big else "<"
    if undefined:
        return (
            struct.pack(e + "HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
            + content
            + struct.pack(e + "HHL", 0xFFFE, 0xE00D, 0)
        )
    return struct.pack(e + "HHL", 0xFFFE, 0xE000, len(content)) + content


def seq_delimiter(big: bool = False) -> bytes:
    return struct.pack(">HHL" if big else "<HHL", 0xFFFE, 0xE0DD, 0)


def part10(path: Path, dataset: bytes, tsyntax: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3"
    meta.TransferSyntaxUID = tsyntax
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        pydicom.filewriter.write_file_meta_info(f, meta)
        f.write(dataset)
    return path


# --- the test vectors of docs/pixel-hash.md §6 -----------------------------------------------

UI, US, TEXT = b"1.2\0", struct.pack("<HH", 1, 2), b"ok"
VECTOR_1_CANONICAL = (
    "08001600 04000000 312e3200"  # (0008,0016) UI "1.2\0"
    "4000b0a0 04000000 01000200"  # (0040,A0B0) US 1\2
    "400030a7 12000000"  # (0040,A730) SQ, 18 bytes
    "feff00e0 0a000000"  #   item, 10 bytes
    "400060a1 02000000 6f6b"  #     (0040,A160) UT "ok"
).replace(" ", "")
VECTOR_1_SHA256 = "31aea78e43c05ac8b67a3e1047c33f1c709fac5174fe5e0af4a0c1924f6b432c"
VECTOR_2_CANONICAL = (
    "09001000 04000000 41434d45"  # (0009,0010) LO "ACME" (private creator)
    "09000110 12000000"  # (0009,1001) private sequence, 18 bytes
    "feff00e0 0a000000"  #   item, 10 bytes
    "08000001 02000000 4131"  #     (0008,0100) SH "A1"
).replace(" ", "")
VECTOR_2_SHA256 = "0a710b580ad72637127d3e4cf78f2dc28666c18b9755b6b71c841a57d78cd2e1"


def vector_1_encodings() -> dict[str, tuple[bytes, bool, bool]]:
    """Vector 1 written four ways: label -> (dataset bytes, implicit VR, little endian)."""
    text = element(0x0040A160, b"UT", TEXT)
    explicit_le = (
        element(0x00080000, b"UL", struct.pack("<L", 12))  # group length
        + element(0x00080016, b"UI", UI)
        + element(0x0040A0B0, b"US", US)
        + element(
            0x0040A730, b"SQ", item(text, undefined=True) + seq_delimiter(), length=0xFFFFFFFF
        )
        + element(0xFFFCFFFC, b"OB", b"\0\0")  # Data Set Trailing Padding
    )
    implicit = (
        element(0x00080016, None, UI)
        + element(0x0040A0B0, None, US)
        + element(0x0040A730, None, item(element(0x0040A160, None, TEXT)))
    )
    big_text = element(0x0040A160, b"UT", TEXT, big=True)
    explicit_be = (
        element(0x00080016, b"UI", UI, big=True)
        + element(0x0040A0B0, b"US", struct.pack(">HH", 1, 2), big=True)
        + element(0x0040A730, b"SQ", item(big_text, big=True), big=True)
    )
    explicit_defined = (
        element(0x00080016, b"UI", UI)
        + element(0x0040A0B0, b"US", US)
        + element(0x0040A730, b"SQ", item(text))
        + element(0x40000000, b"UL", struct.pack("<L", 0))  # another group's length: none
    )
    return {
        "explicit LE, undefined lengths, group length, padding": (explicit_le, False, True),
        "implicit LE, defined lengths": (implicit, True, True),
        "explicit BE": (explicit_be, False, False),
        "explicit LE, defined lengths": (explicit_defined, False, True),
    }


def vector_2_encodings() -> dict[str, tuple[bytes, bool, bool]]:
    code = element(0x00080100, b"SH", b"A1")
    return {
        "explicit LE, private SQ": (
            element(0x00090010, b"LO", b"ACME")
            + element(
                0x00091001, b"SQ", item(code, undefined=True) + seq_delimiter(), length=0xFFFFFFFF
            ),
            False,
            True,
        ),
        "explicit LE, private UN": (
            element(0x00090010, b"LO", b"ACME")
            + element(0x00091001, b"UN", item(element(0x00080100, None, b"A1"))),
            False,
            True,
        ),
        "implicit LE, private value of defined length": (
            element(0x00090010, None, b"ACME")
            + element(0x00091001, None, item(element(0x00080100, None, b"A1"))),
            True,
            True,
        ),
    }


@pytest.mark.parametrize(
    "vectors,canonical,digest",
    [
        (vector_1_encodings, VECTOR_1_CANONICAL, VECTOR_1_SHA256),
        (vector_2_encodings, VECTOR_2_CANONICAL, VECTOR_2_SHA256),
    ],
    ids=["vector-1", "vector-2"],
)
def test_test_vectors_from_the_docs(vectors, canonical, digest, tmp_path):
    docs = (ROOT / "docs" / "pixel-hash.md").read_text()
    assert digest in docs and all(line in docs for line in _hex_lines(canonical))
    assert hashlib.sha256(bytes.fromhex(canonical)).hexdigest() == digest
    syntax = {
        (True, True): uid.ImplicitVRLittleEndian,
        (False, True): uid.ExplicitVRLittleEndian,
        (False, False): uid.ExplicitVRBigEndian,
    }
    for label, (data, implicit, little) in vectors().items():
        assert canonical_dataset(data, implicit, little).hex() == canonical, label
        h = hash_instance_file(part10(tmp_path / "v.dcm", data, syntax[implicit, little]))
        assert (h.method, h.sha256.hex()) == (CONTENT_CANONICAL, digest), label
        assert h.header_sha256 == sha(data)  # the bytes as received: the CONTENT hash
        assert h.sha256_for(CONTENT) == sha(data) and h.sha256_for("pixel") is None


def _hex_lines(canonical: str) -> list[str]:
    """The canonical bytes as the docs print them: 16 bytes a line, space-separated."""
    data = bytes.fromhex(canonical)
    return [data[i : i + 16].hex(" ") for i in range(0, len(data), 16)]


# --- legal re-encodings by third-party tools --------------------------------------------------

DCMCONV = {
    "implicit": ["+ti"],
    "explicit": ["+te"],
    "big-endian": ["+tb"],
    "deflated": ["+td"],
    "undefined-lengths": ["+te", "-e"],
    "group-lengths": ["+ti", "+g"],
    "big-endian-undefined-group": ["+tb", "-e", "+g"],
    "padding": ["+te", "+p", "256", "64"],
}


@pytest.mark.parametrize("name", REPORTS)
def test_dcmtk_re_encodings_keep_the_content_hash(name, tmp_path):
    original = hash_instance_file(WHEEL / name)
    assert original.method == CONTENT_CANONICAL, original.decode_note
    for label, options in DCMCONV.items():
        out = tmp_path / f"{label}.dcm"
        result = dcmtk("dcmconv", *options, str(WHEEL / name), str(out))
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() != (WHEEL / name).read_bytes()
        h = hash_instance_file(out)
        assert (h.method, h.sha256) == (CONTENT_CANONICAL, original.sha256), label


@pytest.mark.parametrize("name", REPORTS)
def test_dcmtk_writes_the_canonical_encoding_itself(name, tmp_path):
    """An auditor without our code: DCMTK's dcmconv writes the canonical bytes (dataset only,
    Implicit VR Little Endian, explicit lengths, no group lengths, no padding)."""
    out = tmp_path / "canonical.bin"
    result = dcmtk("dcmconv", "-F", "+ti", "+e", "-g", str(WHEEL / name), str(out))
    assert result.returncode == 0, result.stderr
    assert sha(out.read_bytes()) == hash_instance_file(WHEEL / name).sha256


def test_pydicom_re_encodings_keep_the_content_hash(tmp_path):
    sr = dicomdata.make_sr(tmp_path)
    original = hash_instance_file(sr)
    for label in ("implicit", "big-endian", "deflated"):
        copy = dicomdata.make_compressed_copies(sr, tmp_path / "copies", [label])[label]
        h = hash_instance_file(copy)
        assert h.header_sha256 != original.header_sha256  # other bytes...
        assert (h.method, h.sha256) == (CONTENT_CANONICAL, original.sha256), label  # same content
    ds = pydicom.dcmread(sr)
    for seq in (
        ds.ContentSequence,
        ds.ConceptNameCodeSequence,
        ds.ContentSequence[0].ConceptNameCodeSequence,
    ):
        seq.is_undefined_length = False  # explicit lengths
    ds.DataSetTrailingPadding = b"\0" * 8
    ds.save_as(tmp_path / "defined.dcm")
    assert hash_instance_file(tmp_path / "defined.dcm").sha256 == original.sha256


# --- changes of content ---------------------------------------------------------------------


def test_a_changed_value_anywhere_changes_the_content_hash(tmp_path):
    sr = dicomdata.make_sr(tmp_path)
    original = hash_instance_file(sr).sha256
    edits = {
        "report text": lambda ds: setattr(ds.ContentSequence[0], "TextValue", "Acute findings."),
        "nested code": lambda ds: setattr(
            ds.ContentSequence[0].ConceptNameCodeSequence[0], "CodeValue", "121072"
        ),
        "patient name": lambda ds: setattr(ds, "PatientName", "Other^Name"),
        "trailing spaces": lambda ds: setattr(
            ds.ContentSequence[0], "TextValue", ds.ContentSequence[0].TextValue + "  "
        ),
        "an empty item more": lambda ds: ds.ContentSequence.append(Dataset()),
        "an empty element more": lambda ds: setattr(ds, "StationName", ""),
    }
    seen = {original}
    for label, edit in edits.items():
        ds = pydicom.dcmread(sr)
        edit(ds)
        ds.save_as(tmp_path / "edited.dcm")
        h = hash_instance_file(tmp_path / "edited.dcm").sha256
        assert h not in seen, label
        seen.add(h)


def test_every_flipped_byte_of_a_report_changes_its_hash(tmp_path):
    """Flip each byte of reportsi.dcm's dataset: the file fails to parse, falls back to the
    bytes as received (CONTENT), or has another canonical hash, except in the 2 reserved
    bytes after a long explicit VR (OB, SQ, UT...), which every reader ignores."""
    data = bytearray((WHEEL / "reportsi.dcm").read_bytes())
    original = hash_instance_file(WHEEL / "reportsi.dcm").sha256
    meta_end = 132 + 12 + struct.unpack("<L", data[140:144])[0]
    path = tmp_path / "flipped.dcm"
    unchanged = []
    for at in range(meta_end, len(data)):
        data[at] ^= 0x01
        path.write_bytes(data)
        data[at] ^= 0x01
        try:
            h = hash_instance_file(path)
        except (PixelHashError, OSError):  # (pydicom's OSError for some)
            continue
        if h.sha256 == original:
            unchanged.append(at)
    long_vrs = {
        b"OB",
        b"OD",
        b"OF",
        b"OL",
        b"OV",
        b"OW",
        b"SQ",
        b"SV",
        b"UC",
        b"UN",
        b"UR",
        b"UT",
        b"UV",
    }
    reserved = [
        at
        for at in unchanged
        if bytes(data[at - 2 : at]) in long_vrs or bytes(data[at - 3 : at - 1]) in long_vrs
    ]
    headers = sum(
        1 for e in pydicom.dcmread(WHEEL / "reportsi.dcm").iterall() if e.VR.encode() in long_vrs
    )
    assert unchanged == reserved and len(unchanged) == 2 * headers, unchanged


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    texts=st.lists(
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12),
        min_size=1,
        max_size=4,
    ),
    numbers=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=3),
    depth=st.integers(0, 3),
    syntax=st.sampled_from(
        [
            uid.ImplicitVRLittleEndian,
            uid.ExplicitVRLittleEndian,
            uid.ExplicitVRBigEndian,
            uid.DeflatedExplicitVRLittleEndian,
        ]
    ),
    undefined=st.booleans(),
)
def test_generated_reports_keep_their_hash_in_every_encoding(
    tmp_path, texts, numbers, depth, syntax, undefined
):
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = dicomdata.BASIC_TEXT_SR, "1.2.3.4"
    ds.ReferencedWaveformChannels = numbers
    node = ds
    for level in range(depth):
        child = Dataset()
        child.TextValue = texts[level % len(texts)]
        child.add_new(0x00091010 + level, "US", numbers[0])  # private, VR lost in implicit VR
        node.add_new(0x00090010, "LO", "ACME")
        node.ContentSequence = Sequence([child])
        node.ContentSequence.is_undefined_length = undefined
        node = child
    reference = _write(ds, uid.ExplicitVRLittleEndian, tmp_path / "ref.dcm")
    copy = _write(ds, syntax, tmp_path / "copy.dcm")
    a, b = hash_instance_file(reference), hash_instance_file(copy)
    assert a.method == b.method == CONTENT_CANONICAL
    assert a.sha256 == b.sha256
    ds.ReferencedWaveformChannels = [n ^ 1 for n in numbers]
    assert hash_instance_file(_write(ds, syntax, tmp_path / "changed.dcm")).sha256 != a.sha256


def _write(ds: Dataset, syntax: str, path: Path) -> Path:
    ds = ds.copy()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID,
        ds.SOPInstanceUID,
    )
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


# --- where the canonical encoding is not defined ---------------------------------------------


def test_malformed_structure_falls_back_to_the_bytes_as_received(tmp_path):
    good = element(0x00080016, b"UI", UI)
    text = element(0x0040A160, b"UT", TEXT)
    cases = {
        "duplicate tag": good + good,
        "item shorter than its content": good
        + element(0x0040A730, b"SQ", struct.pack("<HHL", 0xFFFE, 0xE000, 12) + text + b"\0\0"),
        "Item Delimitation Item in an item of defined length": good
        + element(0x0040A730, b"SQ", item(text + struct.pack("<HHL", 0xFFFE, 0xE00D, 0))),
        "sequence without items": good + element(0x0040A730, b"SQ", text),
        "explicit VR not the dictionary's": good + element(0x0040A0B0, b"SS", US),
        "unknown VR": good + element(0x0040A0B0, b"ZZ", US),
    }
    # pydicom reads all of these to the end; we refuse to canonicalise them
    for label, data in cases.items():
        with pytest.raises(NotCanonical):
            canonical_dataset(data, False, True)
        h = hash_instance_file(part10(tmp_path / "bad.dcm", data, uid.ExplicitVRLittleEndian))
        assert (h.method, h.sha256) == (CONTENT, sha(data)), label
        assert "no canonical encoding" in (h.decode_note or ""), label
    deep = text
    for _ in range(MAX_DEPTH + 1):
        deep = element(0x0040A730, b"SQ", item(deep))
    with pytest.raises(NotCanonical, match="nested more than"):
        canonical_dataset(good + deep, False, True)


def test_stored_sha256_uses_the_method_the_anchor_names(tmp_path):
    sr = dicomdata.make_sr(tmp_path)
    data = sr.read_bytes()
    ds = pydicom.dcmread(sr)
    h = hash_instance_file(sr)
    syntax = uid.ExplicitVRLittleEndian
    assert stored_sha256(data, ds, syntax) == h.sha256
    assert stored_sha256(data, ds, syntax, CONTENT_CANONICAL) == h.sha256
    assert stored_sha256(data, ds, syntax, CONTENT) == h.header_sha256 != h.sha256
    with pytest.raises(PixelHashError, match="the anchor names 'pixel'"):
        stored_sha256(data, ds, syntax, "pixel")
    (mr,) = dicomdata.make_mr_series(tmp_path / "mr", 1)
    with pytest.raises(PixelHashError, match="the file has pixel hashes"):
        stored_sha256(mr.read_bytes(), pydicom.dcmread(mr), syntax, CONTENT_CANONICAL)
