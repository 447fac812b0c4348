"""The pixel hash (docs/pixel-hash.md): definitions, invariances, errors, memory."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import pixel_array

from dicomledger.dicom.pixelhash import (
    CONTENT,
    CONTENT_CANONICAL,
    LOSSLESS_TRANSFER_SYNTAXES,
    InstanceHashes,
    PixelHashError,
    hash_instance_file,
    native_pixel_sha256,
)
from tests import dicomdata
from tests.dicomdata import (
    make_compressed_copies,
    make_image,
    make_mr_series,
    make_multiframe,
    make_sr,
    random_pixels,
    wheel_test_files,
)

ROOT = Path(__file__).resolve().parent.parent
WHEEL = Path(pydicom.__file__).parent / "data" / "test_files"
JPEG_LOSSLESS = (
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
)  # decoding them needs the jpeg-gpl extra (or GDCM)
NATIVE_LE = {"explicit", "implicit", "deflated"}  # same value bytes after inflation

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.e2e,
]  # pydicom on odd test files


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def reference_hashes(path: Path) -> tuple[bytes, tuple[bytes, ...], bytes]:
    """The definition restated with pydicom's whole-file API (independent of pixelhash)."""
    ds = pydicom.dcmread(path)
    value = ds.PixelData
    n = int(ds.get("NumberOfFrames") or 1)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        frames = tuple(sha(f) for f in generate_frames(value, number_of_frames=n))
    else:
        per_pixel = 2 if ds.PhotometricInterpretation == "YBR_FULL_422" else ds.SamplesPerPixel
        size = ds.Rows * ds.Columns * per_pixel * ds.BitsAllocated // 8
        frames = tuple(sha(value[k * size : (k + 1) * size]) for k in range(n))
    arr = pixel_array(ds, raw=True).astype(np.int64)
    bits, width = ds.BitsStored, ds.BitsAllocated // 8
    arr &= (1 << bits) - 1
    if ds.PixelRepresentation:
        arr = np.where(arr >= 1 << (bits - 1), arr - (1 << bits), arr)
    canonical = arr.astype(f"<i{width}" if ds.PixelRepresentation else f"<u{width}").tobytes()
    return sha(value), frames, sha(canonical)


def assert_matches_reference(path: Path, hashes: InstanceHashes) -> None:
    value, frames, decoded = reference_hashes(path)
    assert (hashes.sha256, hashes.frame_hashes, hashes.decoded_sha256) == (value, frames, decoded)


# --- the worked example ---------------------------------------------------------------------


def example_image(dirpath: Path) -> Path:
    value = bytes.fromhex("0100020003 00ff0f 0510060007000800".replace(" ", ""))
    arr = np.frombuffer(value, "<u2").reshape(2, 2, 2)
    extra = {"BitsStored": 12, "HighBit": 11}  # written after 16-bit data: bit 12 is set
    return make_image(dirpath, arr, filename="example.dcm", extra=extra)


def test_worked_example_from_the_docs(tmp_path):
    decoded = "aed46d9566021200802c2d13b4c292523d8d6b5e706fcd7117581e3672ed22a0"
    expected = {
        "explicit": (
            "876f0d5a92eca61b55c4dea8febc2a524d693eb707e18f19b41abedf419c723e",
            "15f32042f34f0b98f35d59586942d7610328946e57849f694b09a6efe9a3d1c1",
            "6ec546dda5613b5237cf8515816e8095a06bc404cf51d9919041c99a310cc7cf",
        ),
        "big-endian": (
            "103cebeb56099c5eaaa4f065d1d5630b6ab88af74dea05d6c00518e46d85f1d4",
            "85c74c00beab3a37711eff59768936ec1e6f8a23c01410c60e9783defbab227f",
            "bb3782663ce3c364bb79a65ef4e7937cf7284b520c98985adfef6e38b39e0942",
        ),
        "rle": (
            "d530198bf2bac6c2d1cb2864a9c1634c7fd3e45ba3b316381be8cbafb64e4744",
            "537584d84267d97739b54bc863b75dc414bd8512493b61c3df9bcf3845a6bbd8",
            "5f599a2619b924ae53aa2522466d38fd6a63c3628acca5fea40fade8088d641c",
        ),
    }
    expected["implicit"] = expected["deflated"] = expected["explicit"]
    copies = make_compressed_copies(example_image(tmp_path), tmp_path / "copies", expected)
    for label, path in copies.items():
        h = hash_instance_file(path)
        assert h.method == "pixel" and h.number_of_frames == 2 and h.decode_note is None
        got = (h.sha256.hex(), *(f.hex() for f in h.frame_hashes))
        assert got == expected[label], label
        assert h.decoded_sha256 is not None and h.decoded_sha256.hex() == decoded


# --- same pixels, every lossless encoding -----------------------------------------------------

IMAGES = {
    # name: (pixels, photometric, bits stored)
    "mono16-12bit": (
        random_pixels(np.random.default_rng(1), 64, 80, bits_stored=12),
        "MONOCHROME2",
        12,
    ),
    "mono16-signed": (
        random_pixels(np.random.default_rng(2), 64, 64, bits_stored=16, dtype="int16"),
        "MONOCHROME2",
        16,
    ),
    "rgb8-2frames": (
        random_pixels(
            np.random.default_rng(3), 64, 64, bits_stored=8, dtype="uint8", samples=3, frames=2
        ),
        "RGB",
        8,
    ),
    "mono8-odd-3frames": (
        random_pixels(np.random.default_rng(4), 33, 65, bits_stored=8, dtype="uint8", frames=3),
        "MONOCHROME2",
        8,
    ),
}


@pytest.mark.jpeg_gpl  # decodes the JPEG Lossless copies
@pytest.mark.parametrize("name", IMAGES)
def test_same_pixels_give_same_decoded_hash_in_every_lossless_encoding(tmp_path, name):
    pixels, photometric, bits = IMAGES[name]
    src = make_image(tmp_path, pixels, photometric=photometric, bits_stored=bits)
    copies = make_compressed_copies(src, tmp_path / "copies")
    assert {"rle", "jpeg-ls", "j2k", "big-endian", "deflated"} <= set(copies)
    if shutil.which("dcmcjpeg"):
        assert {"jpeg-lossless", "jpeg-lossless-sv1", "jpeg-lossless-fragments"} <= set(copies)
    original = hash_instance_file(src)
    frames = pixels.shape[0] if pixels.ndim == (4 if photometric == "RGB" else 3) else 1
    assert original.number_of_frames == len(original.frame_hashes) == frames
    value_hashes = {}
    for label, path in copies.items():
        h = hash_instance_file(path)
        assert h.decode_note is None, (label, h.decode_note)
        assert h.decoded_sha256 == original.decoded_sha256, label
        assert len(h.frame_hashes) == frames
        assert_matches_reference(path, h)
        value_hashes[label] = h.sha256
    assert {value_hashes[label] for label in NATIVE_LE} == {original.sha256}
    others = [v for label, v in value_hashes.items() if label not in NATIVE_LE]
    if photometric == "RGB" or bits == 8:  # 8-bit big endian (OB) is byte-identical
        others = [v for label, v in value_hashes.items() if label not in NATIVE_LE | {"big-endian"}]
    assert len(set(others)) == len(others) and original.sha256 not in others


def test_native_le_canonical_hash_is_the_received_hash(tmp_path):
    (path,) = make_mr_series(tmp_path, 1)
    h = hash_instance_file(path)
    assert h.decoded_sha256 == h.sha256 == h.frame_hashes[0]
    # odd length: a padding byte is in the value hash but in no frame
    odd = make_image(tmp_path, np.arange(15, dtype=np.uint8).reshape(3, 5), filename="odd.dcm")
    h = hash_instance_file(odd)
    assert h.decoded_sha256 == h.frame_hashes[0] == sha(bytes(range(15)))
    assert h.sha256 == sha(bytes(range(15)) + b"\0")


def test_planar_configuration_1_equals_interleaved(tmp_path):
    pixels = random_pixels(
        np.random.default_rng(5), 16, 16, bits_stored=8, dtype="uint8", samples=3
    )
    interleaved = make_image(tmp_path, pixels, photometric="RGB", filename="pc0.dcm")
    ds = pydicom.dcmread(interleaved)
    ds.PlanarConfiguration = 1
    ds.PixelData = np.ascontiguousarray(pixels.transpose(2, 0, 1)).tobytes()
    planar = tmp_path / "pc1.dcm"
    ds.save_as(planar)
    a, b = hash_instance_file(interleaved), hash_instance_file(planar)
    assert a.decoded_sha256 == b.decoded_sha256 and a.sha256 != b.sha256


def test_high_bit_not_bits_stored_minus_one_has_no_canonical_hash(tmp_path):
    pixels = random_pixels(np.random.default_rng(6), 8, 8, bits_stored=12)
    path = make_image(tmp_path, pixels, bits_stored=12, extra={"HighBit": 15})
    h = hash_instance_file(path)
    assert h.decoded_sha256 is None and "High Bit 15" in (h.decode_note or "")
    assert len(h.frame_hashes) == 1


def test_bit_packed_frames_are_repacked(tmp_path):
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2, size=(3, 3, 3), dtype=np.uint8)  # 9 bits a frame: unaligned
    path = write_bitpacked(tmp_path / "seg.dcm", bits)
    h = hash_instance_file(path)
    assert h.frame_hashes == tuple(sha(np.packbits(f, bitorder="little").tobytes()) for f in bits)
    assert h.decoded_sha256 == sha(bits.tobytes())
    bits[1, 2, 2] ^= 1
    changed = hash_instance_file(write_bitpacked(tmp_path / "seg2.dcm", bits))
    assert [a != b for a, b in zip(h.frame_hashes, changed.frame_hashes, strict=True)] == [
        False,
        True,
        False,
    ]


def write_bitpacked(path: Path, bits: np.ndarray) -> Path:
    ds = new_dataset()
    ds.Rows, ds.Columns, ds.NumberOfFrames = bits.shape[1], bits.shape[2], bits.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    packed = np.packbits(bits.ravel(), bitorder="little").tobytes()
    ds.PixelData = packed + b"\0" * (len(packed) % 2)
    ds.save_as(path, enforce_file_format=True)
    return path


def new_dataset(tsyntax: str = uid.ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.SOPClassUID = dicomdata.SC_IMAGE
    ds.SOPInstanceUID = dicomdata.fake_uid("pixelhash-test", tsyntax)
    ds.PatientName, ds.PatientID = dicomdata.fake_patient(99).name, "DLFAKE-TEST"
    return ds


# --- pydicom's shipped files ---------------------------------------------------------------


@pytest.mark.parametrize(
    "path,tsyntax",
    [
        pytest.param(p, t, marks=pytest.mark.jpeg_gpl if t in JPEG_LOSSLESS else ())  # decodes them
        for p, t in wheel_test_files(compressed_only=True)
    ],
    ids=lambda v: getattr(v, "name", ""),
)
def test_every_compressed_wheel_file_hashes(path, tsyntax):
    h = hash_instance_file(path)
    if h.method == CONTENT_CANONICAL:  # UN_sequence.dcm: a JPEG lossless syntax but no pixel data
        assert path.name == "UN_sequence.dcm"
        return
    assert len(h.frame_hashes) == h.number_of_frames >= 1
    if tsyntax in LOSSLESS_TRANSFER_SYNTAXES:
        assert h.decoded_sha256 is not None, h.decode_note
    else:
        assert h.decoded_sha256 is None and "not a lossless" in (h.decode_note or "")


def test_wheel_has_the_expected_compressed_files():
    syntaxes = [ts for _, ts in wheel_test_files()]
    assert len(syntaxes) >= 40
    for ts in (uid.RLELossless, uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.JPEGLosslessSV1):
        assert ts in syntaxes
    assert uid.DeflatedExplicitVRLittleEndian in syntaxes


def test_wheel_files_match_the_reference_computation():
    checked = 0
    for path, _ in wheel_test_files(compressed_only=False):
        try:
            h = hash_instance_file(path)
        except PixelHashError:
            continue
        if h.method != "pixel" or h.decoded_sha256 is None:
            continue
        if pydicom.dcmread(path, stop_before_pixels=True).BitsAllocated == 1:
            continue  # (the reference slices whole bytes; 1-bit has its own test)
        assert_matches_reference(path, h)
        checked += 1
    assert checked >= 50


@pytest.mark.parametrize(
    "family",
    [
        ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
         "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
         "MR_small_padded.dcm"],
        ["rtdose.dcm", "rtdose_expb.dcm", "rtdose_rle.dcm"],
        ["liver_1frame.dcm", "liver_expb_1frame.dcm"],
        ["SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm"],
        pytest.param(["SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm"],  # RLE and JPEG lossless of one RGB image
                     marks=pytest.mark.jpeg_gpl),
    ],
    ids=lambda family: family[0],
)  # fmt: skip
def test_wheel_families_share_the_decoded_hash(family):
    hashes = [hash_instance_file(WHEEL / name) for name in family]
    assert len({h.decoded_sha256 for h in hashes}) == 1 and hashes[0].decoded_sha256


# --- what changes a hash and what does not --------------------------------------------------


def test_header_edit_keeps_every_pixel_hash(tmp_path):
    sources = [
        make_mr_series(tmp_path / "mr", 1)[0],
        make_multiframe(tmp_path / "mf", 3, 32, 32, bits_stored=12),
    ]
    sources.append(make_compressed_copies(sources[1], tmp_path / "c", ["rle"])["rle"])
    for src in sources:
        ds = pydicom.dcmread(src)
        ds.PatientName = "Corrected^Name^After^Demographic^Update"
        ds.PatientBirthDate = "19991231"
        ds.file_meta.ImplementationVersionName = "OTHER_PACS"
        edited = tmp_path / f"edited-{src.name}"
        ds.save_as(edited)
        assert src.read_bytes() != edited.read_bytes()
        assert hash_instance_file(edited) == hash_instance_file(src)


def test_one_flipped_pixel_bit_changes_the_hashes(tmp_path):
    path = make_multiframe(tmp_path, 4, 16, 16, bits_stored=12)
    original = hash_instance_file(path)
    data = bytearray(path.read_bytes())
    value_start = len(data) - 4 * 16 * 16 * 2
    frame_2_pixel = value_start + 2 * 512 + 2 * 37

    data[frame_2_pixel] ^= 0x01  # lowest bit of one pixel in frame 2
    path.write_bytes(data)
    flipped = hash_instance_file(path)
    assert flipped.sha256 != original.sha256
    assert flipped.decoded_sha256 != original.decoded_sha256
    assert [a != b for a, b in zip(original.frame_hashes, flipped.frame_hashes, strict=True)] == [
        False,
        False,
        True,
        False,
    ]

    data[frame_2_pixel] ^= 0x01
    data[frame_2_pixel + 1] ^= 0x20  # bit 13: above Bits Stored, not pixel data
    path.write_bytes(data)
    unused = hash_instance_file(path)
    assert unused.sha256 != original.sha256 and unused.frame_hashes[2] != original.frame_hashes[2]
    assert unused.decoded_sha256 == original.decoded_sha256


def test_a_changed_compressed_frame_changes_only_its_hash(tmp_path):
    src = make_multiframe(tmp_path, 3, 32, 32, bits_stored=12)
    other = tmp_path / "other.dcm"
    ds = pydicom.dcmread(src)
    frames = pixel_array(src).copy()
    frames[1, 5, 5] ^= 1
    ds.PixelData = frames.tobytes()
    ds.save_as(other)
    a = hash_instance_file(make_compressed_copies(src, tmp_path / "a", ["rle"])["rle"])
    b = hash_instance_file(make_compressed_copies(other, tmp_path / "b", ["rle"])["rle"])
    assert a.sha256 != b.sha256 and a.decoded_sha256 != b.decoded_sha256
    assert [x != y for x, y in zip(a.frame_hashes, b.frame_hashes, strict=True)] == [
        False,
        True,
        False,
    ]


@pytest.mark.parametrize(
    "keyword,dtype", [("FloatPixelData", "f4"), ("DoubleFloatPixelData", "f8")]
)
def test_float_pixel_data_counts_as_pixel_data(tmp_path, keyword, dtype):
    values = np.random.default_rng(8).normal(size=(2, 4, 5)).astype(dtype)
    hashes = []
    for tsyntax, order in ((uid.ExplicitVRLittleEndian, "<"), (uid.ExplicitVRBigEndian, ">")):
        ds = new_dataset(tsyntax)
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map
        ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 4, 5, 2, 1
        ds.PhotometricInterpretation, ds.BitsAllocated = "MONOCHROME2", values.itemsize * 8
        setattr(ds, keyword, values.astype(order + dtype).tobytes())
        path = tmp_path / f"{keyword}-{order}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        hashes.append(hash_instance_file(path))
    little, big = hashes
    assert little.method == big.method == "pixel" and little.number_of_frames == 2
    assert little.sha256 == little.decoded_sha256 == sha(values.astype("<" + dtype).tobytes())
    assert big.decoded_sha256 == little.decoded_sha256 and big.sha256 != little.sha256
    assert little.frame_hashes == tuple(sha(f.astype("<" + dtype).tobytes()) for f in values)


def test_sr_gets_a_content_hash(tmp_path):
    path = make_sr(tmp_path)
    h = hash_instance_file(path)
    assert h == InstanceHashes(CONTENT_CANONICAL, h.sha256, (), None, None, 0)
    data = path.read_bytes()
    meta_end = 132 + 12 + struct.unpack("<L", data[140:144])[0]  # group length value
    # the bytes as received: the method of anchors made before the canonical encoding
    assert h.header_sha256 == h.sha256_for(CONTENT) == sha(data[meta_end:]) != h.sha256
    ds = pydicom.dcmread(path)
    ds.file_meta.ImplementationVersionName = "OTHER_PACS"  # File Meta: not content
    ds.save_as(tmp_path / "meta.dcm")
    assert hash_instance_file(tmp_path / "meta.dcm").sha256 == h.sha256
    ds.ContentSequence[0].TextValue = "Changed report text"
    ds.save_as(tmp_path / "edited.dcm")
    assert hash_instance_file(tmp_path / "edited.dcm").sha256 != h.sha256


def test_nested_icon_pixel_data_is_not_the_image(tmp_path):
    icon = Dataset()
    icon.Rows = icon.Columns = 2
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = b"\1\2\3\4"
    sr = pydicom.dcmread(make_sr(tmp_path))
    sr.IconImageSequence = [icon]
    sr.save_as(tmp_path / "sr-icon.dcm")
    assert hash_instance_file(tmp_path / "sr-icon.dcm").method == CONTENT_CANONICAL
    (mr,) = make_mr_series(tmp_path, 1)
    ds = pydicom.dcmread(mr)
    ds.IconImageSequence = [icon]
    ds.save_as(tmp_path / "mr-icon.dcm")
    assert hash_instance_file(tmp_path / "mr-icon.dcm") == hash_instance_file(mr)


# --- input forms: bare datasets, pynetdicom's received file ----------------------------------


def test_bare_dataset_needs_the_transfer_syntax(tmp_path):
    src = make_multiframe(tmp_path, 2, 16, 16)
    copies = make_compressed_copies(src, tmp_path / "c", ["implicit", "rle", "deflated"])
    for path in [src, *copies.values()]:
        tsyntax = read_file_meta_info(path).TransferSyntaxUID
        data = path.read_bytes()
        meta_end = 132 + 12 + struct.unpack("<L", data[140:144])[0]
        bare = tmp_path / f"bare-{path.name}"
        bare.write_bytes(data[meta_end:])
        assert hash_instance_file(bare, tsyntax) == hash_instance_file(path)
        assert hash_instance_file(path, tsyntax) == hash_instance_file(path)
        with pytest.raises(PixelHashError, match="no Transfer Syntax UID"):
            hash_instance_file(bare)
    with pytest.raises(PixelHashError, match="differs from the given"):
        hash_instance_file(src, uid.RLELossless)


def test_pynetdicom_chunked_receive_file(tmp_path):
    from pynetdicom import AE, _config, evt

    src = make_multiframe(tmp_path, 3, 32, 32, bits_stored=12)
    sources = [src, make_sr(tmp_path), make_mr_series(tmp_path, 1)[0]]
    sources += make_compressed_copies(src, tmp_path / "c", ["rle", "deflated", "implicit"]).values()
    received: list[tuple[bytes, str, InstanceHashes, InstanceHashes]] = []

    def on_store(event: evt.Event) -> int:
        path = event.dataset_path  # valid only inside the handler
        meta_ts = read_file_meta_info(path).TransferSyntaxUID
        context_ts = event.context.transfer_syntax
        received.append(
            (
                path.read_bytes()[:132],
                str(meta_ts) if meta_ts == context_ts else "mismatch",
                hash_instance_file(path),
                hash_instance_file(path, context_ts),
            )
        )
        return 0x0000

    pairs = {
        (str(pydicom.dcmread(p).SOPClassUID), str(read_file_meta_info(p).TransferSyntaxUID))
        for p in sources
    }
    scp = AE("HASHTEST")
    for sop_class in {sop for sop, _ in pairs}:
        scp.add_supported_context(sop_class, sorted({ts for sop, ts in pairs if sop == sop_class}))
    scu = AE("SENDER")
    for sop_class, tsyntax in pairs:
        scu.add_requested_context(sop_class, tsyntax)
    previous = _config.STORE_RECV_CHUNKED_DATASET
    _config.STORE_RECV_CHUNKED_DATASET = True
    server = scp.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="HASHTEST")
        assert assoc.is_established
        statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in sources]
        assoc.release()
    finally:
        server.shutdown()
        _config.STORE_RECV_CHUNKED_DATASET = previous
    assert statuses == [0] * len(sources)
    for path, (head, meta_ts, by_meta, by_context) in zip(sources, received, strict=True):
        assert head == b"\0" * 128 + b"DICM"  # preamble + File Meta, then the dataset as sent
        assert meta_ts == str(read_file_meta_info(path).TransferSyntaxUID)
        assert by_meta == by_context == hash_instance_file(path)


# --- malformed and truncated input ----------------------------------------------------------


def test_short_pixel_data_names_the_frame_size(tmp_path):
    (path,) = make_mr_series(tmp_path, 1)
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(path)
    with pytest.raises(
        PixelHashError, match="Pixel Data length 1000 is not a multiple of the frame size 8192"
    ):
        hash_instance_file(path)
    ds.PixelData = bytes(8192)
    ds.NumberOfFrames = 2
    ds.save_as(path)
    with pytest.raises(PixelHashError, match="less than Number of Frames 2"):
        hash_instance_file(path)


def test_encapsulated_frame_count_must_match(tmp_path):
    src = make_multiframe(tmp_path, 2, 16, 16)
    rle = make_compressed_copies(src, tmp_path / "c", ["rle"])["rle"]
    ds = pydicom.dcmread(rle)
    ds.NumberOfFrames = 3
    ds.save_as(rle)
    with pytest.raises(PixelHashError, match="holds 2 frames but Number of Frames is 3"):
        hash_instance_file(rle)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda ds: delattr(ds, "Rows"), "Pixel Data present but Rows is missing"),
        (lambda ds: setattr(ds, "NumberOfFrames", "0"), "Number of Frames 0"),
        (lambda ds: setattr(ds, "BitsAllocated", 12), "Bits Allocated 12"),
    ],
)
def test_malformed_image_attributes(tmp_path, edit, message):
    (path,) = make_mr_series(tmp_path, 1)
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)
    with pytest.raises(PixelHashError, match=message):
        hash_instance_file(path)


def rle_copy(tmp_path: Path, frames: int = 2) -> tuple[Path, bytearray, int]:
    """An RLE multi-frame file, its bytes, and the offset of its Pixel Data value."""
    src = make_multiframe(tmp_path, frames, 16, 16)
    path = make_compressed_copies(src, tmp_path / "c", ["rle"])["rle"]
    data = bytearray(path.read_bytes())
    return path, data, data.rindex(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12


def test_encapsulated_structure_errors(tmp_path):
    path, data, value = rle_copy(tmp_path)
    assert data[value : value + 4] == b"\xfe\xff\x00\xe0"  # the Basic Offset Table item
    bad_bot = bytearray(data)
    bad_bot[value + 12 : value + 16] = struct.pack("<L", 5)  # 2nd frame offset: mid-fragment
    bad_tag = bytearray(data)
    bad_tag[value + 16 : value + 18] = b"\x00\x00"  # first fragment's item tag
    no_fragments = data[: value + 8 + 8] + b"\xfe\xff\xdd\xe0\0\0\0\0"
    no_fragments[value + 4 : value + 8] = struct.pack("<L", 0)  # and an empty BOT
    no_fragments = no_fragments[: value + 8] + no_fragments[value + 16 :]
    cases = [
        (bad_bot, "Basic Offset Table \\[0, 5\\] does not point at fragments"),
        (bad_tag, "unexpected tag"),
        (no_fragments, "no fragments"),
    ]
    for content, message in cases:
        path.write_bytes(content)
        with pytest.raises(PixelHashError, match=message):
            hash_instance_file(path)


def test_failed_decoding_keeps_the_received_hashes(tmp_path):
    path, data, value = rle_copy(tmp_path)
    good = hash_instance_file(path)
    bot_length = struct.unpack("<L", data[value + 4 : value + 8])[0]
    first_fragment = value + 8 + bot_length + 8
    data[first_fragment + 4 : first_fragment + 8] = struct.pack("<L", 9999)  # segment offset
    path.write_bytes(data)
    h = hash_instance_file(path)
    assert h.decoded_sha256 is None and "decoding frame 0 failed" in (h.decode_note or "")
    assert h.frame_hashes[1] == good.frame_hashes[1] and h.frame_hashes[0] != good.frame_hashes[0]


def test_a_second_pixel_data_element_is_refused(tmp_path):
    (path,) = make_mr_series(tmp_path, 1)
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 2) + b"\0\0")
    with pytest.raises(PixelHashError, match="more than one pixel data element"):
        hash_instance_file(path)


def test_truncated_files_raise_at_every_cut(tmp_path):
    src = make_multiframe(tmp_path, 2, 16, 16)
    images = [src, *make_compressed_copies(src, tmp_path / "c", ["rle", "deflated"]).values()]
    sr = make_sr(tmp_path)
    cut = tmp_path / "cut.dcm"
    for path in [*images, sr]:
        data = path.read_bytes()
        meta_end = 132 + 12 + struct.unpack("<L", data[140:144])[0]
        # Undetectable in principle: a cut at an element boundary leaves a valid, shorter
        # dataset. For an image that is caught from the SOP Class UID, once it is in.
        ds = pydicom.dcmread(path)
        sop_class_end = ds["SOPClassUID"].file_tell + len(ds.SOPClassUID) + 1  # value, padded
        for size in range(meta_end, len(data)):
            cut.write_bytes(data[:size])
            try:
                h = hash_instance_file(cut)
            except PixelHashError:
                continue
            assert (
                h.method in (CONTENT, CONTENT_CANONICAL)
                and h.sha256 != hash_instance_file(path).sha256
            )
            assert path == sr or size < sop_class_end, size  # (deflated: always an error)
    with pytest.raises(PixelHashError, match="truncated"):
        hash_instance_file(WHEEL / "MR_truncated.dcm")
    with pytest.raises(PixelHashError, match="truncated"):
        hash_instance_file(WHEEL / "rtplan_truncated.dcm")


def test_garbage_and_empty_files(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "noise").write_bytes(np.random.default_rng(9).bytes(5000))
    (tmp_path / "text").write_bytes(b"not a DICOM file\n" * 20)
    for name in ("empty", "noise", "text"):
        with pytest.raises(PixelHashError):
            hash_instance_file(tmp_path / name)
        with pytest.raises(PixelHashError):
            hash_instance_file(tmp_path / name, uid.ExplicitVRLittleEndian)
    stub = WHEEL / "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000000"
    with pytest.raises(PixelHashError, match="CT Image Storage instance without pixel data"):
        hash_instance_file(stub)
    with pytest.raises(OSError):
        hash_instance_file(tmp_path / "missing.dcm")


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    dirpath = tmp_path_factory.mktemp("fuzz")
    src = make_multiframe(dirpath, 2, 8, 8, bits_stored=12)
    return [src, *make_compressed_copies(src, dirpath, ["rle", "deflated"]).values()]


@settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    which=st.integers(0, 2),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=4),
)
def test_corrupted_files_never_crash(fuzz_files, which, edits):
    """Any corruption gives hashes or PixelHashError, never another exception."""
    data = bytearray(fuzz_files[which].read_bytes())
    for where, byte in edits:
        data[int(where * len(data))] = byte
    path = fuzz_files[0].parent / "fuzz.dcm"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hash_instance_file(path)
        except PixelHashError:
            pass


# --- big objects ------------------------------------------------------------------------------

_MEASURE = """
import json, resource, sys, time
from dicomledger.dicom.pixelhash import hash_instance_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
h = hash_instance_file(sys.argv[1])
print(json.dumps({
    "seconds": time.perf_counter() - start,
    "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
    "frames": len(h.frame_hashes),
    "decoded_is_value_hash": h.decoded_sha256 == h.sha256,
}))
"""


def test_300mb_multiframe_hashes_with_bounded_memory(tmp_path):
    path = make_multiframe(tmp_path, 600, 512, 512, bits_stored=12)  # 315 MB
    try:
        assert path.stat().st_size > 300e6
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(path)],
            capture_output=True, text=True, check=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
        result = json.loads(out.stdout)
        assert result["frames"] == 600 and result["decoded_is_value_hash"]
        assert result["rss_growth_mb"] < 64, result
    finally:
        path.unlink()


# --- the generators ---------------------------------------------------------------------------


def test_make_multiframe_is_valid_for_pydicom_and_dcmtk(tmp_path):
    paths = [
        make_multiframe(tmp_path, 3, 7, 5, bits_allocated=8, samples_per_pixel=3, filename="a.dcm"),
        make_multiframe(tmp_path, 4, 16, 16, bits_stored=12, filename="b.dcm",
                        transfer_syntax=uid.ImplicitVRLittleEndian),
    ]  # fmt: skip
    for path in paths:
        ds = pydicom.dcmread(path)
        frames = ds.pixel_array
        assert frames.shape[0] == ds.NumberOfFrames
        mask = (1 << ds.BitsStored) - 1
        for k in range(1, ds.NumberOfFrames):
            assert (frames[k] == (frames[0].astype(np.int64) + k) & mask).all()
        assert_matches_reference(path, hash_instance_file(path))
        if shutil.which("dcmdump"):
            dump = subprocess.run(["dcmdump", "+M", str(path)], capture_output=True, text=True)
            assert dump.returncode == 0 and "E:" not in dump.stderr + dump.stdout
            assert "NumberOfFrames" in dump.stdout and "PixelData" in dump.stdout


def test_generators_are_deterministic_and_images_differ(tmp_path):
    a = make_mr_series(tmp_path / "a", 2, seed=5)
    b = make_mr_series(tmp_path / "b", 2, seed=5)
    c = make_mr_series(tmp_path / "c", 1, seed=6)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert len({hash_instance_file(p).sha256 for p in (*a, *c)}) == 3
    patient = dicomdata.fake_patient("grep-me")
    ct = dicomdata.make_ct_series(tmp_path / "ct", 2, rows=32, cols=32, patient=patient)
    data = ct[0].read_bytes()
    for value in (patient.name, patient.patient_id, patient.birth_date, patient.accession):
        assert value and value.encode() in data
    assert patient.patient_id.startswith(dicomdata.FAKE_ID_PREFIX)
    ds = pydicom.dcmread(ct[1])
    assert ds.Modality == "CT" and ds.BitsStored == 12 and ds.InstanceNumber == 2
    assert ds.StudyInstanceUID == pydicom.dcmread(ct[0]).StudyInstanceUID


@pytest.mark.parametrize(
    "path,tsyntax",
    dicomdata.wheel_test_files(compressed_only=False),
    ids=lambda v: v.name if isinstance(v, Path) else None,
)
def test_native_pixel_sha256_agrees_with_the_full_hash(path, tsyntax):
    """The retrieval's quick check gives the anchored sha256 wherever it answers at all."""
    try:
        full = hash_instance_file(path)
        ds = pydicom.dcmread(path)
    except Exception:  # files the gateway would not store are not retrieved either
        return
    quick = native_pixel_sha256(ds, str(tsyntax))
    if (
        full.method != "pixel"
        or tsyntax.is_encapsulated
        or tsyntax.is_deflated
        or not tsyntax.is_little_endian
    ):
        assert quick is None or full.method == "pixel" and quick == full.sha256
    else:
        assert quick == full.sha256


def test_native_pixel_sha256_on_generated_images(tmp_path):
    paths = [
        *dicomdata.make_ct_series(tmp_path / "ct", 1, 32, 32, seed="q"),
        *dicomdata.make_mr_series(tmp_path / "mr", 1, seed="q"),
        *dicomdata.make_mr_series(
            tmp_path / "imp", 1, seed="i", transfer_syntax=uid.ImplicitVRLittleEndian
        ),
        dicomdata.make_multiframe(tmp_path / "mf", 3, 16, 16),
    ]
    for p in paths:
        ds = pydicom.dcmread(p)
        quick = native_pixel_sha256(ds, str(ds.file_meta.TransferSyntaxUID))
        assert quick is not None and quick == hash_instance_file(p).sha256
        ds.PixelData = ds.PixelData[:-2] + b"\x00\x01"  # another pixel value
        assert native_pixel_sha256(ds, str(ds.file_meta.TransferSyntaxUID)) != quick
    big = pydicom.dcmread(paths[0])
    assert native_pixel_sha256(big, uid.ExplicitVRBigEndian) is None
