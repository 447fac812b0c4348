"""fastread: the ingest's pydicom-free fast path gives exactly what the pydicom path gives
(hashes, header fields, refusals) or defers to it; never another answer, never another error.

Checked over every file in pydicom's wheel, generated datasets (hypothesis), a seeded fuzz of
byte mutations of valid files, and end to end through a real gateway.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from math import ceil
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom import uid
from pydicom.dataset import FileMetaDataset

from dicomledger.dicom.fastread import FAST, PYDICOM, Deferred, read_instance, read_instance_fast
from dicomledger.dicom.instance import MAX_SEQUENCE_DEPTH, InstanceError, instance_header
from dicomledger.dicom.pixelhash import PixelHashError, hash_instance_file
from dicomledger.ledger import merkle
from tests import dicomdata
from tests.test_storage_scp import ledger_payloads, log_lines

WHEEL = Path(pydicom.__file__).parent / "data" / "test_files"
EXPLICIT, IMPLICIT = uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian
CT, MR, SR = dicomdata.CT_IMAGE, dicomdata.MR_IMAGE, dicomdata.BASIC_TEXT_SR

pytestmark = [
    pytest.mark.filterwarnings("ignore"),
    pytest.mark.e2e,
]  # pydicom warns on odd (generated) values


@pytest.fixture(autouse=True)
def pydicom_as_the_gateway_runs_it(monkeypatch):
    # dicom/scp.py: pydicom does not validate values on read (its warnings quote them)
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.IGNORE)


# --- the comparison ---------------------------------------------------------------------------


def pydicom_path(path: Path, ts: str | None, sop_class: str, sop_instance: str) -> tuple:
    """What the ingest got before the fast path existed: (header, hashes, header_sha256), or
    the refusal (exception type, message)."""
    try:
        hashes = hash_instance_file(path, ts)
        assert hashes.header is not None
        header = instance_header(hashes.header, hashes.header_sha256, sop_class, sop_instance)
    except (PixelHashError, InstanceError) as exc:
        return type(exc), str(exc)
    return header, hashes, hashes.header_sha256


def same_or_deferred(
    path: Path, ts: str | None = None, sop_class: str = "", sop_instance: str = ""
) -> str:
    """FAST when the fast path answered (and its answer is the pydicom path's), PYDICOM when
    it deferred; read_instance answers or refuses exactly as the pydicom path, either way."""
    expected = pydicom_path(path, ts, sop_class, sop_instance)
    try:
        fast = read_instance_fast(path, ts, sop_class_uid=sop_class, sop_instance_uid=sop_instance)
    except Deferred:
        outcome = PYDICOM
    else:  # any other exception fails the test
        assert (fast.header, fast.hashes, fast.hashes.header_sha256) == expected, path
        assert fast.parser == FAST and fast.hashes.header is None
        outcome = FAST
    try:
        read = read_instance(
            path, ts, max_inflated_size=None, sop_class_uid=sop_class, sop_instance_uid=sop_instance
        )
    except (PixelHashError, InstanceError) as exc:
        assert (type(exc), str(exc)) == expected
    else:
        assert (read.header, read.hashes, read.hashes.header_sha256) == expected
        assert read.parser == outcome
    return outcome


def own_uids(path: Path) -> tuple[str, str]:
    """The SOP Class and Instance UID a sender would put in the C-STORE request."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return str(ds.get("SOPClassUID", "")).strip(), str(ds.get("SOPInstanceUID", "")).strip()
    except Exception:
        return "1.2.3", "1.2.3.4"


# --- (a) pydicom's test files -----------------------------------------------------------------

WHEEL_FILES = sorted(p for p in WHEEL.rglob("*") if p.is_file())
# Native Little Endian files the pydicom path reads that the fast path leaves to it, and why
LEFT_TO_PYDICOM = {
    "SC_ybr_full_422_uncompressed.dcm": "YBR_FULL_422: the canonical hash needs pydicom's decoder",
}


@pytest.mark.parametrize("mode", ["IGNORE", "WARN"])
def test_wheel_files_fast_or_deferred_never_different(mode, monkeypatch):
    monkeypatch.setattr(
        pydicom_config.settings, "reading_validation_mode", getattr(pydicom_config, mode)
    )
    outcomes, plain = {}, []
    for path in WHEEL_FILES:
        name = path.relative_to(WHEEL).as_posix()
        outcomes[name] = same_or_deferred(path, None, *own_uids(path))
        try:
            syntax = pydicom.filereader.read_file_meta_info(path).get("TransferSyntaxUID")
        except Exception:
            continue
        if syntax in (EXPLICIT, IMPLICIT) and not isinstance(
            pydicom_path(path, None, *own_uids(path))[0], type
        ):
            plain.append(
                name
            )  # Part 10, Explicit/Implicit VR LE, hashed and read by the pydicom path
    assert len(plain) >= 40
    # every plain one is taken by the fast path, except those it leaves on purpose
    assert {Path(name).name for name in plain if outcomes[name] != FAST} == set(LEFT_TO_PYDICOM)
    assert outcomes["CT_small.dcm"] == outcomes["MR_small.dcm"] == FAST


def test_generated_images_and_reports_take_the_fast_path(tmp_path):
    made = [
        *dicomdata.make_mr_series(tmp_path / "mr", 2),
        *dicomdata.make_mr_series(tmp_path / "mri", 1, transfer_syntax=IMPLICIT),
        *dicomdata.make_ct_series(tmp_path / "ct", 1, rows=64, cols=64),
        dicomdata.make_multiframe(tmp_path / "mf", 5, 16, 16),
        dicomdata.make_multiframe(
            tmp_path / "mfc",
            3,
            8,
            8,
            bits_allocated=8,
            samples_per_pixel=3,
            transfer_syntax=IMPLICIT,
        ),
        dicomdata.make_multiframe(tmp_path / "mf12", 4, 8, 8, bits_stored=12),
        dicomdata.make_sr(tmp_path / "sr"),
        dicomdata.make_sr(tmp_path / "sri", transfer_syntax=IMPLICIT),
    ]
    for path in made:
        sop_class, sop_instance = own_uids(path)
        assert same_or_deferred(path, None, sop_class, sop_instance) == FAST, path
        ts = pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID
        assert same_or_deferred(path, ts, sop_class, sop_instance) == FAST, path


def test_refusals_are_the_pydicom_paths(tmp_path):
    """A request that contradicts the dataset, another transfer syntax, a cut file: the fast path
    defers and read_instance raises what the pydicom path raises."""
    (mr,) = dicomdata.make_mr_series(tmp_path / "mr", 1)
    sop_class, sop_instance = own_uids(mr)
    assert same_or_deferred(mr, None, sop_class, "1.2.3.999") == PYDICOM
    assert same_or_deferred(mr, None, "1.2.3.998", sop_instance) == PYDICOM
    assert same_or_deferred(mr, uid.ExplicitVRBigEndian, sop_class, sop_instance) == PYDICOM
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(mr.read_bytes()[:-100])
    assert same_or_deferred(cut, None, sop_class, sop_instance) == PYDICOM
    with pytest.raises(PixelHashError, match="truncated"):
        read_instance(
            cut,
            None,
            max_inflated_size=None,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
        )


def test_pydicom_configured_to_raise_or_convert_makes_it_defer(tmp_path, monkeypatch):
    (mr,) = dicomdata.make_mr_series(tmp_path / "mr", 1)
    sop_class, sop_instance = own_uids(mr)
    assert same_or_deferred(mr, None, sop_class, sop_instance) == FAST
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.RAISE)
    with pytest.raises(Deferred):
        read_instance_fast(mr, None, sop_class_uid=sop_class, sop_instance_uid=sop_instance)
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.IGNORE)
    monkeypatch.setattr(pydicom_config, "datetime_conversion", True)
    with pytest.raises(Deferred):
        read_instance_fast(mr, None, sop_class_uid=sop_class, sop_instance_uid=sop_instance)


# --- a dataset encoder, independent of the code under test ----------------------------------

LONG_VRS = {
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


@dataclass
class Item:
    elements: list[El]
    undefined: bool = False


@dataclass
class El:
    tag: int
    vr: bytes  # written in Explicit VR only
    value: bytes | list[Item] = b""  # a list: a sequence's items
    undefined: bool = False  # a sequence of undefined length


def encode(elements: list[El], implicit: bool) -> bytes:
    out = bytearray()
    for el in elements:
        if isinstance(el.value, list):
            value = b"".join(encode_item(i, implicit) for i in el.value)
            if el.undefined:
                value += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
            length = 0xFFFFFFFF if el.undefined else len(value)
        else:
            value, length = el.value, len(el.value)
        group, element = el.tag >> 16, el.tag & 0xFFFF
        if implicit:
            out += struct.pack("<HHL", group, element, length)
        elif el.vr in LONG_VRS:
            out += struct.pack("<HH2sHL", group, element, el.vr, 0, length)
        else:
            out += struct.pack("<HH2sH", group, element, el.vr, length & 0xFFFF)
        out += value
    return bytes(out)


def encode_item(item: Item, implicit: bool) -> bytes:
    content = encode(item.elements, implicit)
    if item.undefined:
        return (
            struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
            + content
            + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        )
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(content)) + content


def part10(
    path: Path, dataset: bytes, tsyntax: str, sop_class: str = "1.2", sop_instance: str = "1.2.3"
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class or "1.2"
    meta.MediaStorageSOPInstanceUID = sop_instance or "1.2.3"
    meta.TransferSyntaxUID = tsyntax
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        pydicom.filewriter.write_file_meta_info(f, meta)
        f.write(dataset)
    return path


def text(value: str) -> bytes:
    data = value.encode("latin_1")
    return data + b" " * (len(data) % 2)


def uid_value(value: str) -> bytes:
    data = value.encode()
    return data + b"\0" * (len(data) % 2)


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def image_elements(
    *,
    sop_class: str = MR,
    sop_instance: str = "1.2.3.4",
    rows: int = 4,
    columns: int = 4,
    samples: int = 1,
    bits_allocated: int = 16,
    bits_stored: int = 12,
    pixel_representation: int = 0,
    photometric: str = "MONOCHROME2",
    planar: int | None = None,
    frames: str | None = None,
    pixels: bytes = b"",
    pixel_vr: bytes = b"OW",
    extra: list[El] = (),  # type: ignore[assignment]
) -> list[El]:
    elements = [
        El(0x00080005, b"CS", text("ISO_IR 100")),
        El(0x00080016, b"UI", uid_value(sop_class)),
        El(0x00080018, b"UI", uid_value(sop_instance)),
        El(0x00080060, b"CS", text("MR")),
        El(0x00100010, b"PN", text("Doe^Jane")),
        El(0x00100020, b"LO", text("DLFAKE-1")),
        El(0x0020000D, b"UI", uid_value("1.2.3")),
        El(0x0020000E, b"UI", uid_value("1.2.3.1")),
        El(0x00280002, b"US", us(samples)),
        El(0x00280004, b"CS", text(photometric)),
        *([El(0x00280006, b"US", us(planar))] if planar is not None else []),
        *([El(0x00280008, b"IS", text(frames))] if frames is not None else []),
        El(0x00280010, b"US", us(rows)),
        El(0x00280011, b"US", us(columns)),
        El(0x00280100, b"US", us(bits_allocated)),
        El(0x00280101, b"US", us(bits_stored)),
        El(0x00280102, b"US", us(bits_stored - 1)),
        El(0x00280103, b"US", us(pixel_representation)),
        *extra,
        El(0x7FE00010, pixel_vr, pixels + b"\0" * (len(pixels) % 2)),
    ]
    return sorted(elements, key=lambda e: e.tag)


def nested(depth: int, undefined: bool) -> El:
    """A Content Sequence nesting `depth` sequences (this one included)."""
    inner: list[El] = [El(0x0040A160, b"UT", text("leaf"))]
    for _ in range(depth - 1):
        inner = [El(0x0040A730, b"SQ", [Item(inner, undefined)], undefined=undefined)]
    return El(0x0040A730, b"SQ", [Item(inner, undefined)], undefined=undefined)


@pytest.mark.parametrize("undefined", [False, True])
@pytest.mark.parametrize("implicit", [False, True])
def test_sequence_depth_limit_is_the_pydicom_paths(tmp_path, undefined, implicit):
    """Nesting up to MAX_SEQUENCE_DEPTH is read by the fast path; deeper, the pydicom path
    refuses it (and the fast path never answers)."""
    ts = IMPLICIT if implicit else EXPLICIT
    for depth in (
        1,
        2,
        MAX_SEQUENCE_DEPTH - 1,
        MAX_SEQUENCE_DEPTH,
        MAX_SEQUENCE_DEPTH + 1,
        MAX_SEQUENCE_DEPTH + 5,
    ):
        for image in (True, False):
            if image:
                pixels = bytes(range(32))
                elements = image_elements(extra=[nested(depth, undefined)], pixels=pixels)
            else:
                elements = [
                    El(0x00080016, b"UI", uid_value(SR)),
                    El(0x00080018, b"UI", uid_value("1.2.3.4")),
                    El(0x0020000D, b"UI", uid_value("1.2.3")),
                    El(0x0020000E, b"UI", uid_value("1.2.3.1")),
                    nested(depth, undefined),
                ]
            path = part10(tmp_path / f"d{depth}-{image}.dcm", encode(elements, implicit), ts)
            sop_class = MR if image else SR
            outcome = same_or_deferred(path, ts, sop_class, "1.2.3.4")
            assert outcome == (FAST if depth <= MAX_SEQUENCE_DEPTH else PYDICOM), depth
            if depth > MAX_SEQUENCE_DEPTH:
                assert isinstance(pydicom_path(path, ts, sop_class, "1.2.3.4")[1], str)  # refused


@pytest.mark.parametrize(
    "layout",
    [
        dict(bits_allocated=8, bits_stored=8),
        dict(bits_allocated=16, bits_stored=12),
        dict(bits_allocated=16, bits_stored=12, pixel_representation=1),
        dict(bits_allocated=32, bits_stored=32, pixel_representation=1),
        dict(bits_allocated=16, bits_stored=16, frames="3"),
        dict(bits_allocated=8, bits_stored=8, samples=3, photometric="RGB", planar=0),
        dict(bits_allocated=8, bits_stored=8, samples=3, photometric="RGB", planar=0, frames="2"),
        dict(bits_allocated=1, bits_stored=1, rows=5, columns=3, frames="3"),
        dict(bits_allocated=64, bits_stored=64, frames=" 2 "),
        dict(bits_allocated=16, bits_stored=10, pixel_representation=1, frames="+2"),
    ],
)
@pytest.mark.parametrize("implicit", [False, True])
def test_plain_layouts_take_the_fast_path(tmp_path, layout, implicit):
    rows, columns, samples = (
        layout.get("rows", 4),
        layout.get("columns", 4),
        layout.get("samples", 1),
    )
    frames = int(layout.get("frames", "1"))
    size = ceil(rows * columns * samples * layout["bits_allocated"] * frames / 8)
    pixels = random.Random(7).randbytes(
        size
    )  # values beyond Bits Stored too: the canonical hash masks them
    elements = image_elements(pixels=pixels, **layout)
    ts = IMPLICIT if implicit else EXPLICIT
    path = part10(tmp_path / "image.dcm", encode(elements, implicit), ts)
    assert same_or_deferred(path, ts, MR, "1.2.3.4") == FAST


def test_planar_and_ybr_full_422_are_left_to_pydicom(tmp_path):
    for layout in (
        dict(samples=3, photometric="RGB", planar=1),
        dict(samples=3, photometric="YBR_FULL_422"),
    ):
        per_pixel = 2 if layout["photometric"] == "YBR_FULL_422" else 3
        pixels = random.Random(3).randbytes(4 * 4 * per_pixel)
        elements = image_elements(pixels=pixels, bits_allocated=8, bits_stored=8, **layout)
        path = part10(tmp_path / "image.dcm", encode(elements, False), EXPLICIT)
        assert same_or_deferred(path, EXPLICIT, MR, "1.2.3.4") == PYDICOM


# --- (b) generated datasets (hypothesis) -----------------------------------------------------

# Text made of pieces: plain ones, and odd ones (multi-valued, escapes, bytes that are not
# UTF-8, white space pydicom strips differently than str.strip, padding in the middle)
PLAIN_ATOMS = [
    b"A",
    b"z",
    b"0",
    b"9",
    b".",
    b" ",
    b"=",
    b"^",
    b"-",
    b"+",
    b"Doe",
    b"1.2.840",
    b"\xc3\xa9",
]
ODD_ATOMS = [
    b"  ",
    b"\x00",
    b"\\",
    b"\x1b$B",
    b"\xe9",
    b"\xff",
    b"\t",
    b"\xa0",
    b"\x85",
    b"\r\n",
    b"\xe6\x97",
]
PLAIN_CHARSETS = [
    None,
    b"",
    b"ISO_IR 6",
    b"ISO_IR 100",
    b"ISO_IR 192",
    b"ISO_IR 100 ",
    b"ISO_IR 192\0",
]
ODD_CHARSETS = [
    b"ISO_IR 101",
    b"ISO_IR100",
    b" ISO_IR 100",
    b"ISO 2022 IR 100",
    b"ISO 2022 IR 6\\ISO 2022 IR 87",
    b"GB18030",
    b"\\ISO_IR 100",
]
PLAIN_INTEGERS = [b"", b"1", b"3", b" 2 ", b"+2", b"007", b"12 "]
ODD_INTEGERS = [
    b"-1",
    b"0",
    b"1.0",
    b"1.5",
    b"x",
    b"\t",
    b"  ",
    b"\t5",
    b"99999999999999999999",
    b"1\\2",
    b"\x002",
    b"2\x00",
    b"\xa02",
]
# tag -> dictionary VR: the attributes the ingest reads, and some it does not
TEXT_TAGS = {
    0x00080020: b"DA",
    0x00080030: b"TM",
    0x00080050: b"SH",
    0x00080060: b"CS",
    0x00080090: b"PN",
    0x00081030: b"LO",
    0x0008103E: b"LO",
    0x00100010: b"PN",
    0x00100020: b"LO",
    0x00100030: b"DA",
    0x00100040: b"CS",
    0x00200010: b"SH",
    0x00200011: b"IS",
    0x00200013: b"IS",
    0x00081090: b"LO",
    0x00180050: b"DS",
    0x00204000: b"LT",
}
SEQUENCE_TAGS = [0x00081115, 0x00081140, 0x00400260, 0x0040A730]
ITEM_TAGS = {
    0x00081150: b"UI",
    0x00081155: b"UI",
    0x00080100: b"SH",
    0x0040A160: b"UT",
    0x00080005: b"CS",
}


@st.composite
def odd(draw, odd_rate: int, plain: st.SearchStrategy, weird: st.SearchStrategy) -> object:
    """`weird` once in `odd_rate` draws (never when odd_rate is 0), else `plain`."""
    return draw(weird if odd_rate and draw(st.integers(1, odd_rate)) == odd_rate else plain)


def text_values(odd_rate: int) -> st.SearchStrategy[bytes]:
    atom = odd(odd_rate, st.sampled_from(PLAIN_ATOMS), st.sampled_from(ODD_ATOMS))
    return st.lists(atom, max_size=6).map(b"".join)


@st.composite
def items(draw, depth: int, odd_rate: int) -> list[Item]:
    found = []
    for _ in range(draw(st.integers(0, 2))):
        elements = []
        for tag in sorted(draw(st.sets(st.sampled_from(sorted(ITEM_TAGS)), max_size=3))):
            if tag == 0x00080005:
                value = draw(
                    odd(
                        odd_rate, st.sampled_from(PLAIN_CHARSETS[1:]), st.sampled_from(ODD_CHARSETS)
                    )
                )
            else:
                value = draw(text_values(odd_rate))
            elements.append(El(tag, ITEM_TAGS[tag], value))
        if depth < 3 and draw(st.booleans()):
            elements.append(
                El(
                    0x0040A730,
                    b"SQ",
                    draw(items(depth + 1, odd_rate)),
                    undefined=draw(st.booleans()),
                )
            )
        elements.sort(key=lambda e: e.tag)
        found.append(Item(elements, undefined=draw(st.booleans())))
    return found


@st.composite
def datasets(draw) -> tuple[bytes, str, str | None, str, str]:
    """(dataset bytes, its transfer syntax, the one the association names, SOP Class and
    Instance UID of the C-STORE request). Half of them plain; in the others, each choice is
    odd once in a few draws."""
    odd_rate = draw(st.sampled_from([0, 0, 0, 3, 10, 30]))
    implicit = draw(st.booleans())
    sop_class = draw(
        st.sampled_from([CT, MR, SR, "1.2.3.4.5"]) | odd(odd_rate, st.nothing(), st.just(""))
    )
    sop_instance = draw(
        odd(odd_rate, st.just("1.2.3.4"), st.sampled_from(["1.2.3.4 ", "", "1.2.3.4\\5", " 1.2"]))
    )
    elements = [
        El(0x00080016, b"UI", uid_value(sop_class)),
        El(0x00080018, b"UI", sop_instance.encode()),
    ]
    if (
        charset := draw(
            odd(odd_rate, st.sampled_from(PLAIN_CHARSETS), st.sampled_from(ODD_CHARSETS))
        )
    ) is not None:
        elements.append(El(0x00080005, b"CS", charset))
    for tag, vr in TEXT_TAGS.items():
        if draw(st.integers(0, 5)):
            if vr == b"IS":
                value = draw(
                    odd(odd_rate, st.sampled_from(PLAIN_INTEGERS), st.sampled_from(ODD_INTEGERS))
                )
            else:
                value = draw(text_values(odd_rate))
            written_vr = draw(
                odd(odd_rate, st.just(vr), st.sampled_from([b"LO", b"UN", b"SH", b"UT"]))
            )
            elements.append(El(tag, written_vr, value))
    for tag in (0x0020000D, 0x0020000E):
        if draw(odd(odd_rate, st.just(True), st.booleans())):
            plain_uid = st.just(uid_value(f"1.2.{tag}"))
            elements.append(
                El(
                    tag,
                    b"UI",
                    draw(odd(odd_rate, plain_uid, st.sampled_from([b"1.2\0", b" 1.2 ", b""]))),
                )
            )
    for tag in draw(st.sets(st.sampled_from(SEQUENCE_TAGS), max_size=2)):
        vr = draw(odd(odd_rate, st.just(b"SQ"), st.sampled_from([b"UN", b"OB"])))
        elements.append(El(tag, vr, draw(items(1, odd_rate)), undefined=draw(st.booleans())))
    if draw(st.booleans()):  # a private block: an opaque value, or a sequence
        elements.append(El(0x00090010, b"LO", text("ACME")))
        vr = draw(st.sampled_from([b"SQ", b"UN", b"OB"]))
        elements.append(El(0x00091001, vr, draw(items(1, odd_rate)), undefined=draw(st.booleans())))
    if sop_class != SR or draw(st.booleans()):
        elements += draw(image_pixel_module(odd_rate))
    elements.sort(key=lambda e: e.tag)
    for el in elements:
        if isinstance(el.value, list) and el.vr != b"SQ" and (el.vr != b"UN" or not el.undefined):
            # items in an opaque value (a sequence whose VR the writer did not know): Implicit VR
            el.value, el.undefined = b"".join(encode_item(i, True) for i in el.value), False
        elif isinstance(el.value, list) and implicit and el.tag >> 16 == 0x0009:
            el.undefined = draw(
                odd(odd_rate, st.just(False), st.just(True))
            )  # a private SQ in Implicit VR
    order = draw(odd(odd_rate, st.just("sorted"), st.sampled_from(["swapped", "repeated"])))
    if order == "swapped" and len(elements) > 2:
        i = draw(st.integers(0, len(elements) - 2))
        elements[i], elements[i + 1] = elements[i + 1], elements[i]
    elif order == "repeated":
        elements.insert(0, elements[0])
    data = encode(elements, implicit)
    if draw(st.integers(0, 9)) == 0:
        data += encode([El(0xFFFCFFFC, b"OB", b"\0\0")], implicit)  # Data Set Trailing Padding
    ts = IMPLICIT if implicit else EXPLICIT
    given_ts = draw(
        odd(odd_rate, st.sampled_from([None, ts]), st.just(EXPLICIT if implicit else IMPLICIT))
    )
    request_class = draw(odd(odd_rate, st.just(sop_class), st.just("1.2.9")))
    return data, ts, given_ts, request_class, sop_instance.strip("\x00 ")


@st.composite
def image_pixel_module(draw, odd_rate: int) -> list[El]:
    bits_allocated = draw(
        odd(odd_rate, st.sampled_from([1, 8, 8, 16, 16, 32, 64]), st.sampled_from([12, 0, 24]))
    )
    bits_stored = draw(
        st.sampled_from([bits_allocated, bits_allocated, max(bits_allocated - 4, 1)])
        | odd(odd_rate, st.nothing(), st.just(bits_allocated + 1))
    )
    samples = draw(st.sampled_from([1, 1, 3]))
    photometric = draw(
        st.sampled_from(["MONOCHROME2", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR"])
        | odd(odd_rate, st.nothing(), st.just("YBR_FULL_422"))
    )
    rows, columns = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    frames_text = draw(
        odd(odd_rate, st.sampled_from([None, None, *PLAIN_INTEGERS]), st.sampled_from(ODD_INTEGERS))
    )
    digits = frames_text.strip(b" +") if frames_text else b""
    frames = min(int(digits), 4) if digits.isdigit() and int(digits) > 0 else 1
    per_pixel = 2 if photometric == "YBR_FULL_422" else samples
    size = ceil(rows * columns * per_pixel * bits_allocated * frames / 8)
    size = max(
        0,
        size
        + draw(st.sampled_from([0, 0, 0, 0, 1, 2, 7]) | odd(odd_rate, st.nothing(), st.just(-1))),
    )
    pixels = random.Random(draw(st.integers(0, 1 << 30))).randbytes(size)
    elements = [
        El(0x00280002, b"US", us(samples)),
        El(0x00280004, b"CS", text(photometric)),
        El(
            0x00280010,
            b"US",
            draw(odd(odd_rate, st.just(us(rows)), st.sampled_from([b"", us(0), us(rows) * 2]))),
        ),
        El(0x00280011, b"US", us(columns)),
        El(0x00280100, b"US", us(bits_allocated)),
        El(
            0x00280101,
            b"US",
            draw(odd(odd_rate, st.just(us(bits_stored)), st.sampled_from([b"", us(99), b"\x01"]))),
        ),
        El(
            0x00280102,
            b"US",
            us(max(bits_stored - 1, 0) + draw(odd(odd_rate, st.just(0), st.just(1)))),
        ),
        El(
            0x00280103,
            b"US",
            draw(st.sampled_from([us(0), us(1)]) | odd(odd_rate, st.nothing(), st.just(us(2)))),
        ),
    ]
    if samples == 3 or draw(st.booleans()):
        planar = us(draw(st.sampled_from([0, 0, 1])))
        elements.append(El(0x00280006, draw(odd(odd_rate, st.just(b"US"), st.just(b"SS"))), planar))
    if frames_text is not None:
        elements.append(El(0x00280008, b"IS", frames_text + b" " * (len(frames_text) % 2)))
    if draw(odd(odd_rate, st.just(True), st.booleans())):  # else: an image without pixel data
        tag = draw(st.sampled_from([0x7FE00010] * 6 + [0x7FE00008, 0x7FE00009]))
        plain_vr = {0x7FE00008: b"OF", 0x7FE00009: b"OD"}.get(
            tag, b"OW" if bits_allocated > 8 else b"OB"
        )
        vr = draw(
            odd(
                odd_rate,
                st.sampled_from([plain_vr, b"OB"]),
                st.sampled_from([b"OW", b"UN", b"US", b"LO"]),
            )
        )
        elements.append(
            El(tag, vr, pixels + b"\0" * (len(pixels) % 2 if draw(st.booleans()) else 0))
        )
        if draw(odd(odd_rate, st.just(False), st.booleans())):  # a second pixel data element
            elements.append(El(0x7FE00010, b"OB", b"\0\0"))
    return elements


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=datasets())
def test_generated_datasets_fast_or_deferred_never_different(tmp_path_factory, case):
    data, ts, given_ts, sop_class, sop_instance = case
    path = part10(tmp_path_factory.mktemp("gen") / "x.dcm", data, ts)
    same_or_deferred(path, given_ts, sop_class, sop_instance)


# --- (c) a seeded fuzz of byte mutations of valid files ---------------------------------------

INTERESTING = [
    b"\x00",
    b"\xff",
    b"\xff\xff",
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x00",
    b"\xfe\xff\x00\xe0",
    b"\xfe\xff\xdd\xe0",
    b"\xfe\xff\x0d\xe0",
    b"SQ",
    b"UN",
    b"OB",
    b"\\",
    b"\x1b",
    b"\xe0\x7f\x10\x00",
    b"\x01\x00",
    b"\x10\x00",
]


def mutate(data: bytes, rng: random.Random, header_end: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if len(out) < 130:
            break
        # mostly in the header (where the parser works), sometimes anywhere
        pos = rng.randrange(128, min(header_end, len(out)) if rng.random() < 0.85 else len(out))
        kind = rng.randrange(7)
        if kind == 0:
            out[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[pos] = rng.randrange(256)
        elif kind == 2:
            blob = rng.choice(INTERESTING)
            out[pos : pos + len(blob)] = blob
        elif kind == 3:
            out[pos:pos] = rng.randbytes(rng.choice([1, 2, 4, 8]))
        elif kind == 4:
            del out[pos : pos + rng.choice([1, 2, 4, 8, 12])]
        elif kind == 5:
            del out[pos:]
        else:
            start = rng.randrange(128, len(out) - 1)
            out[pos:pos] = out[start : start + rng.choice([8, 12, 20])]
    return bytes(out)


def fuzz_sources(tmp_path: Path) -> list[Path]:
    sources = [
        *dicomdata.make_mr_series(tmp_path / "mr", 1, rows=8, cols=8),
        *dicomdata.make_mr_series(tmp_path / "mri", 1, rows=8, cols=8, transfer_syntax=IMPLICIT),
        *dicomdata.make_ct_series(tmp_path / "ct", 1, rows=8, cols=8),
        dicomdata.make_multiframe(tmp_path / "mf", 3, 4, 4, bits_allocated=8, samples_per_pixel=3),
        dicomdata.make_sr(tmp_path / "sr"),
        dicomdata.make_sr(tmp_path / "sri", transfer_syntax=IMPLICIT),
        part10(
            tmp_path / "seq.dcm",
            encode(
                image_elements(extra=[nested(3, True), nested(2, False)], pixels=bytes(32)), False
            ),
            EXPLICIT,
        ),
    ]
    sources += [
        WHEEL / name
        for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "OBXXXX1A.dcm")
        if (WHEEL / name).exists()
    ]
    return sources


def test_fuzzed_files_fast_or_deferred_never_different(tmp_path):
    rng = random.Random(20240117)
    outcomes = {FAST: 0, PYDICOM: 0}
    for source in fuzz_sources(tmp_path):
        data = source.read_bytes()
        sop_class, sop_instance = own_uids(source)
        pixel_at = data.rfind(b"\xe0\x7f\x10\x00")
        header_end = pixel_at + 16 if pixel_at > 0 else len(data)
        for n in range(150):
            path = tmp_path / f"fuzz-{source.stem}-{n}.dcm"
            path.write_bytes(mutate(data, rng, header_end))
            outcomes[same_or_deferred(path, None, sop_class, sop_instance)] += 1
            path.unlink()
    # the mutations reach both: fast answers (equal to pydicom's) and deferrals
    assert outcomes[FAST] > 200 and outcomes[PYDICOM] > 200, outcomes


# --- (d) end to end: a real gateway, DCMTK storescu -------------------------------------------


def test_gateway_parses_plain_images_on_the_fast_path_and_anchors_the_same(gateway, tmp_path):
    plain = [
        *dicomdata.make_mr_series(tmp_path / "mr", 3),
        *dicomdata.make_ct_series(tmp_path / "ct", 2, rows=128, cols=128),
        dicomdata.make_multiframe(tmp_path / "mf", 4, 32, 32),
        dicomdata.make_sr(tmp_path / "sr"),
    ]
    (big_endian,) = dicomdata.make_mr_series(
        tmp_path / "be", 1, seed="big", transfer_syntax=uid.ExplicitVRBigEndian
    )
    result = gateway.storescu(*plain)
    assert result.returncode == 0, result.stderr
    result = gateway.storescu(big_endian, options=("-xb", "+C"))
    assert result.returncode == 0, result.stderr

    stores = {
        line["sop_instance"]: line for line in log_lines(gateway) if line.get("event") == "c-store"
    }
    assert len(stores) == len(plain) + 1
    for path in plain:
        assert stores[own_uids(path)[1]]["parse"] == FAST
    assert stores[own_uids(big_endian)[1]]["parse"] == PYDICOM
    assert {line["status"] for line in stores.values()} == {"0x0000"}

    # the anchors are what the pydicom path gives for the same files
    anchors = {p["instance"]: p for p in ledger_payloads(gateway)}
    assert len(anchors) == len(plain) + 1
    for path in [*plain, big_endian]:
        hashes = hash_instance_file(path)
        expected = {
            "hash_method": hashes.method,
            "sha256": hashes.sha256.hex(),
            "decoded_sha256": hashes.decoded_sha256.hex() if hashes.decoded_sha256 else None,
            "frames": hashes.number_of_frames,
            "frame_root": merkle.root_of_leaf_hashes(
                [merkle.leaf_hash(h) for h in hashes.frame_hashes]
            ).hex()
            if hashes.frame_hashes
            else None,
        }
        matching = [p for p in anchors.values() if {k: p[k] for k in expected} == expected]
        assert len(matching) == 1, path
    assert gateway.cli("verify").returncode == 0
    for path in plain:
        check = gateway.cli("verify-file", str(path))
        assert check.returncode == 0 and "ANCHORED" in check.stdout, check.stdout
