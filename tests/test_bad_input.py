"""Bad datasets on the wire, sent byte for byte by a real SCU (pynetdicom, nothing re-encoded):
each gets a DICOM status and one c-store log line naming the reason, never a traceback; the
log stays JSON, line by line, and never shows a patient's name, ID, birth date or accession,
whatever pydicom or a decoder has to say about the bytes."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from tests import dicomdata
from tests.conftest import GatewayProcess
from tests.dimse import associate, send_as_is
from tests.test_logs import assert_json_log_without
from tests.test_storage_scp import index_rows, ledger_payloads

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

MR, SR = "1.2.840.10008.5.1.4.1.1.4", dicomdata.BASIC_TEXT_SR
PATIENT = dicomdata.FakePatient(
    name="Phiname-QX7ZK^Wilhelmina",
    patient_id="DLFAKE-QX7ZK44",
    birth_date="19370629",
    accession="ACCQX7ZK4491",
)
PHI = [
    PATIENT.name,
    PATIENT.name.split("^")[0],
    PATIENT.name.split("^")[1],
    PATIENT.patient_id,
    PATIENT.birth_date,
    PATIENT.accession,
]


def assert_clean_log(gw: GatewayProcess) -> list[dict]:
    return assert_json_log_without(gw, PHI)


def c_stores(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("event") == "c-store"]


def sources(directory: Path) -> list[Path]:
    """Valid files of the known patient: image and report, explicit and implicit VR."""
    files = [
        dicomdata.make_sr(directory / "sr", patient=PATIENT, seed="fz-sr"),
        dicomdata.make_sr(
            directory / "sr-implicit",
            patient=PATIENT,
            seed="fz-sri",
            transfer_syntax=ImplicitVRLittleEndian,
        ),
        *dicomdata.make_mr_series(
            directory / "mr", 1, rows=16, cols=16, patient=PATIENT, seed="fz-mr"
        ),
        *dicomdata.make_mr_series(
            directory / "mri",
            1,
            rows=16,
            cols=16,
            patient=PATIENT,
            seed="fz-mri",
            transfer_syntax=ImplicitVRLittleEndian,
        ),
    ]
    (mr,) = dicomdata.make_mr_series(
        directory / "mr-rle", 1, rows=32, cols=32, patient=PATIENT, seed="fz-rle"
    )
    files.append(dicomdata.make_compressed_copies(mr, directory / "rle", ["rle"])["rle"])
    return files


def dataset_offset(data: bytes) -> int:
    group_length = struct.unpack_from("<L", data, 140)[0]  # (0002,0000) UL, after preamble + DICM
    return 144 + group_length


def explicit_elements(data: bytes, start: int) -> list[tuple[int, str, int]]:
    """(offset, VR, offset of the length field) of each top-level explicit VR LE element."""
    found, pos = [], start
    while pos + 8 <= len(data):
        vr = data[pos + 4 : pos + 6].decode("latin-1")
        if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"):
            length, field = struct.unpack_from("<L", data, pos + 8)[0], pos + 8
            value_at = pos + 12
        else:
            length, field = struct.unpack_from("<H", data, pos + 6)[0], pos + 6
            value_at = pos + 8
        found.append((pos, vr, field))
        if length == 0xFFFFFFFF:
            break
        pos = value_at + length
    return found


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded mutation of a dataset's bytes (the File Meta stays valid, so it is sent)."""
    start = dataset_offset(data)
    out = bytearray(data)
    kind = rng.choice(
        ["flip", "flip", "length", "uid-length", "vr", "truncate", "insert", "delete"]
    )
    # (in an implicit VR source these "elements" are garbage, which is fine for a fuzzer)
    explicit = [e for e in explicit_elements(data, start) if e[1].isalpha() and e[1].isupper()]
    if kind in ("length", "uid-length", "vr") and explicit:
        candidates = [e for e in explicit if e[1] == "UI"] if kind == "uid-length" else explicit
        offset, vr, field = rng.choice(candidates or explicit)
        if kind == "vr":
            out[offset + 4 : offset + 6] = rng.choice(
                [b"ZZ", b"Lq", b"UL", b"SQ", b"OB", b"US", b"\x00\x00"]
            )
        else:  # a wrong length: the value swallows the elements after it, or ends early
            size = 4 if field == offset + 8 else 2
            old = int.from_bytes(out[field : field + size], "little")
            new = rng.choice([old + 2, old + 20, old + 60, max(0, old - 2), 1, 0xFFFF, 0xFFFFFFFF])
            out[field : field + size] = (new % (1 << (8 * size))).to_bytes(size, "little")
        return bytes(out)
    pos = rng.randrange(start, len(out))
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(start, len(out))] = rng.randrange(256)
    elif kind == "truncate":
        del out[pos:]
    elif kind == "insert":
        out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        del out[pos : pos + rng.randint(1, 16)]
    return bytes(out)


def crafted(directory: Path, mr: Path, sr: Path) -> dict[str, Path]:
    """The malformed datasets that escaped as 0xC211 with a traceback."""
    data = mr.read_bytes()
    start = dataset_offset(data)
    head = {vr: (off, field) for off, vr, field in explicit_elements(data, start)}
    ds = pydicom.dcmread(mr, stop_before_pixels=True)
    cases = {}
    # a dataset that ends inside a sequence item
    item = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    cases["ends inside a sequence item"] = (
        sr.read_bytes() + item + struct.pack("<HH2sH", 0x0040, 0xA010, b"CS", 8) + b"CONT"
    )
    # an unknown VR in the header (on Patient ID)
    pid = next(
        off
        for off, _, _ in explicit_elements(data, start)
        if data[off : off + 4] == b"\x10\x00\x20\x00"
    )
    cases["unknown VR"] = data[: pid + 4] + b"Lq" + data[pid + 6 :]
    # a UL value of 2 bytes (Instance Number given VR UL)
    num = next(
        off
        for off, _, _ in explicit_elements(data, start)
        if data[off : off + 4] == b"\x20\x00\x13\x00"
    )
    length = struct.unpack_from("<H", data, num + 6)[0]
    cases["UL of 2 bytes"] = (
        data[:num]
        + struct.pack("<HH2sH", 0x0020, 0x0013, b"UL", 2)
        + b"\x01\x00"
        + data[num + 8 + length :]
    )
    # a UID whose length swallows the patient module: pydicom's warning would quote it
    off, field = head["UI"]
    cases["UID too long"] = data[:field] + struct.pack("<H", 400) + data[field + 2 :]
    assert ds.SOPInstanceUID
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, raw in cases.items():
        path = directory / f"{name.replace(' ', '-')}.dcm"
        path.write_bytes(raw)
        paths[name] = path
    return paths


def panicking_rle(directory: Path, rle: Path) -> Path:
    """The RLE file with one frame the Rust RLE decoder panics on (found by a seeded search)."""
    from rle.rle import decode_frame

    ds = pydicom.dcmread(rle)
    frame = list(generate_fragments(ds.PixelData))[-1]
    rng = random.Random(3)
    for _ in range(5000):
        mutated = bytearray(frame)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(64, len(mutated))] = rng.randrange(256)
        try:
            decode_frame(bytes(mutated), ds.Rows * ds.Columns, ds.BitsAllocated, "<")
        except ValueError:
            continue
        except BaseException:  # pyo3's PanicException
            ds.PixelData = encapsulate([bytes(mutated)])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            path = directory / "panic.dcm"
            ds.save_as(path)
            return path
    raise AssertionError("no panicking RLE frame found")


def test_fuzzed_and_malformed_datasets_get_a_status_and_a_clean_log(gateway, tmp_path):
    files = sources(tmp_path / "src")
    rng = random.Random(20251130)
    fuzzed = []
    for n in range(240):
        src = files[n % len(files)]
        path = tmp_path / "fuzz" / f"{n:03d}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(mutate(src.read_bytes(), rng))
        fuzzed.append(path)
    cases = crafted(tmp_path / "crafted", files[2], files[0])
    panic = panicking_rle(tmp_path, files[-1])

    statuses: dict[Path, int | None] = {}
    batches = [fuzzed[i : i + 60] for i in range(0, len(fuzzed), 60)] + [
        list(cases.values()) + [panic] + files
    ]
    for batch in batches:
        assoc = associate(
            gateway.port,
            gateway.ae_title,
            [MR, SR],
            [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless],
        )
        for path in batch:
            assert assoc.is_established, "the gateway ended the association"
            statuses[path] = send_as_is(assoc, path)
        assoc.release()

    sent = fuzzed + list(cases.values()) + [panic] + files
    assert [p for p in sent if statuses.get(p) is None] == [], "stores without an answer"
    assert {statuses[p] for p in sent} <= {0x0000, 0xC000}, {hex(s) for s in statuses.values()}
    for name, path in cases.items():
        assert statuses[path] == 0xC000, name
    assert all(statuses[p] == 0x0000 for p in files), "the valid files must still be stored"
    assert statuses[panic] == 0x0000  # a frame that cannot be decoded: stored, its hash as received

    records = assert_clean_log(gateway)
    stores = c_stores(records)
    assert len(stores) == len(sent), (len(stores), len(sent))
    refused = [r for r in stores if r["status"] == "0xC000"]
    assert all(r["outcome"].startswith("refused: ") and len(r["outcome"]) > 12 for r in refused)
    for path, line in zip(sent, stores, strict=True):  # one association at a time: in order
        assert line["status"] == f"0x{statuses[path]:04X}", (path.name, line)
    for name, path in cases.items():
        print(f"{name}: {stores[sent.index(path)]['outcome']}")
    # the decoder's panic message became a JSON line too
    assert any(r.get("event") == "native panic" for r in records), "no native panic line"


def nested_sequences(directory: Path, depth: int) -> Path:
    """An SR whose content tree nests ``depth`` sequences (defined lengths, written by hand:
    pydicom cannot write 5,000 levels)."""
    (sr,) = [dicomdata.make_sr(directory, seed=f"deep{depth}", patient=PATIENT)]
    ds = pydicom.dcmread(sr)
    del ds.ContentSequence
    ds.save_as(sr)
    value = struct.pack("<HH2sH", 0x0040, 0xA040, b"CS", 4) + b"TEXT"
    for _ in range(depth):
        item = struct.pack("<HHL", 0xFFFE, 0xE000, len(value)) + value
        value = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
    sr.write_bytes(sr.read_bytes() + value)  # (0040,A730) sorts after every element of the SR
    return sr


def test_deeply_nested_sequences_are_refused_at_receive(gateway, tmp_path):
    from dicomledger.dicom import instance

    limit = getattr(instance, "MAX_SEQUENCE_DEPTH", 64)
    deep = nested_sequences(tmp_path / "deep", 5000)
    fine = nested_sequences(tmp_path / "fine", limit)
    assoc = associate(gateway.port, gateway.ae_title, SR, [ExplicitVRLittleEndian])
    assert send_as_is(assoc, deep) == 0xC000
    assert send_as_is(assoc, fine) == 0x0000
    assoc.release()
    stores = c_stores(assert_clean_log(gateway))
    assert stores[0]["status"] == "0xC000" and f"deeper than {limit}" in stores[0]["outcome"]
    assert len(ledger_payloads(gateway)) == 1  # only the one within the limit is anchored
    assert list((gateway.dir / "data" / "images" / "tmp").iterdir()) == []


def deflated_bomb(directory: Path, inflated: int) -> Path:
    """A Deflated Explicit VR Little Endian file of about 1 MB that inflates to ``inflated``
    bytes: an SR with a long private OB value (mostly zeros, 900 kB of noise)."""
    (sr,) = [dicomdata.make_sr(directory, seed="bomb", patient=PATIENT)]
    ds = pydicom.dcmread(sr)
    noise = random.Random(7).randbytes(900_000)
    blob = noise + bytes(inflated - len(noise))
    block = ds.private_block(0x0009, "DLTEST", create=True)
    block.add_new(0x10, "OB", blob)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = directory / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)  # pydicom deflates it
    return path


def test_a_deflate_bomb_is_refused_beyond_the_configured_cap(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    gw.set("max_inflated_size = 536870912", "max_inflated_size = 8388608")  # 8 MiB
    gw.start()
    try:
        bomb = deflated_bomb(tmp_path / "bomb", 64 * 2**20)
        assert 0.8e6 < bomb.stat().st_size < 1.5e6
        small = deflated_bomb(tmp_path / "small", 2 * 2**20)
        assoc = associate(gw.port, gw.ae_title, SR, [DeflatedExplicitVRLittleEndian])
        assert send_as_is(assoc, bomb) == 0xC000
        assert send_as_is(assoc, small) == 0x0000  # within the cap: stored as received
        assoc.release()
        stores = c_stores(assert_clean_log(gw))
        assert stores[0]["status"] == "0xC000"
        assert "inflates to more than 8388608 bytes" in stores[0]["outcome"], stores[0]
        assert len(ledger_payloads(gw)) == 1
        assert index_rows(gw, "SELECT transfer_syntax_uid FROM instances") == [
            (DeflatedExplicitVRLittleEndian,)
        ]
        assert list((gw.dir / "data" / "images" / "tmp").iterdir()) == []
    finally:
        gw.stop()
