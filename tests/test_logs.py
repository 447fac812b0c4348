"""The log: JSON line by line, no PHI, third-party noise at the right level and never with a
traceback (the fuzzed-dataset half is in test_bad_input.py)."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Collection, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian

from tests import dicomdata
from tests.conftest import GatewayProcess, free_port
from tests.dimse import associate, send_as_is
from tests.test_forwarding import entries_of_kind, forwarding_gateway

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


def log_records(gw: GatewayProcess) -> list[dict]:
    """Every line of the gateway's log, each of which must be a JSON object."""
    records = []
    for n, line in enumerate(gw.log_path.read_text(errors="replace").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"log line {n} is not JSON: {line[:300]!r}") from None
    return records


def assert_json_log_without(gw: GatewayProcess, phi: Collection[str] = ()) -> list[dict]:
    """The log's records, once every line is JSON, no line has a traceback and no PHI value
    (as text or as hex) is anywhere in it."""
    records = log_records(gw)
    text = gw.log_path.read_text(errors="replace")
    assert "Traceback" not in text and '"exception"' not in text
    for value in phi:
        assert value not in text, f"PHI {value!r} in the log"
        assert value.encode().hex() not in text.lower()
    return records


@pytest.fixture
def resetting_destination() -> Iterator[int]:
    """A "PACS" that reads the association request and then resets the connection, like a
    destination shutting down under its sender."""
    server = socket.create_server(("127.0.0.1", free_port()))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def test_a_destination_that_resets_is_our_warning_and_pynetdicoms_info(
    tmp_path, resetting_destination
):
    gw = forwarding_gateway(tmp_path, resetting_destination)
    patient = dicomdata.fake_patient("resets")
    gw.start()
    try:
        assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS").returncode == 0
        files = dicomdata.make_mr_series(tmp_path / "mr", 2, seed="resets", patient=patient)
        assert gw.storescu(*files).returncode == 0
        deadline = time.monotonic() + 15
        while gw.log().count("forward failed; will retry") < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        gw.stop()
    records = assert_json_log_without(gw)
    ours = [r for r in records if r.get("event") == "forward failed; will retry"]
    assert len(ours) >= 3 and all(r["level"] == "warning" for r in ours)
    # pynetdicom no longer sends (our own requestor does), so it has nothing to say;
    # were it to speak, only at info
    theirs = [r for r in records if str(r.get("logger", "")).startswith("pynetdicom")]
    assert {r["level"] for r in theirs} <= {"info"}, theirs
    assert entries_of_kind(gw, "forwarded") == []


def test_redaction_removes_values_where_libraries_put_them():
    from dicomledger.logs import redact, redact_pydicom

    name = "Doe^Jane"
    for text in (
        f"Invalid value for VR UI: {name!r}",  # repr
        f"Invalid value for VR UI: {name.encode()!r}",  # bytes repr
        f"Unable to convert '{name}' to 'DA' object",  # hand-quoted
        'Value "Doe^Jane O\'Hara" is not valid for elements with a VR of DS',
    ):
        assert "Doe" not in redact(text), text
    # pydicom prints some values unquoted after a colon
    text = "Value 'ISO 2022 IR 6' for Specific Character Set does not allow code extensions, ignoring: Doe^Jane"
    assert "Doe" not in redact_pydicom(text)
    assert redact_pydicom(
        "Expected explicit VR, but found implicit VR - using implicit VR for reading"
    ) == ("Expected explicit VR, but found implicit VR - using implicit VR for reading")


LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def top_level_elements(body: bytes, little: bool) -> dict[int, tuple[int, int, int]]:
    """{tag: (offset of its length field, of its value, its length)} of an explicit VR
    dataset's top-level elements, up to the first of undefined length."""
    order, pos, found = "<" if little else ">", 0, {}
    while pos + 8 <= len(body):
        group, element = struct.unpack_from(order + "HH", body, pos)
        long = body[pos + 4 : pos + 6].decode("latin-1") in LONG_VRS
        field, value_at = (pos + 8, pos + 12) if long else (pos + 6, pos + 8)
        length = struct.unpack_from(order + ("L" if long else "H"), body, field)[0]
        found[(group << 16) | element] = (field, value_at, length)
        if length == 0xFFFFFFFF:
            break
        pos = value_at + length
    return found


def swallowing_patient(source: Path, out: Path, tag: int) -> Path:
    """``source`` with element ``tag``'s (short) length made to swallow every element after
    it up to the end of Patient's Birth Date: its value then holds the raw bytes of the
    accession number, the patient's name, ID and birth date. Deflated datasets are inflated,
    changed and deflated again; the File Meta is unchanged."""
    data = source.read_bytes()
    syntax = pydicom.dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID
    start = 144 + struct.unpack_from("<L", data, 140)[0]  # after preamble, DICM and File Meta
    body = data[start:]
    if syntax == DeflatedExplicitVRLittleEndian:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    little = syntax != ExplicitVRBigEndian
    elements = top_level_elements(body, little)
    field, value_at, _ = elements[tag]
    _, birth_date_at, birth_date_length = elements[0x00100030]
    length = struct.pack("<H" if little else ">H", birth_date_at + birth_date_length - value_at)
    body = body[:field] + length + body[field + 2 :]
    if syntax == DeflatedExplicitVRLittleEndian:
        deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = deflate.compress(body) + deflate.flush()
    out.write_bytes(data[:start] + body)
    return out


MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
PHI_PATIENT = dicomdata.FakePatient(
    name="Logname-RT4WZ^Hildegard",
    patient_id="DLFAKE-RT4WZ81",
    birth_date="19410317",
    accession="ACCRT4WZ8155",
)
PHI_VALUES = [
    PHI_PATIENT.name,
    "Logname-RT4WZ",
    "Hildegard",
    PHI_PATIENT.patient_id,
    PHI_PATIENT.birth_date,
    PHI_PATIENT.accession,
]
SOP_INSTANCE_UID, SPECIFIC_CHARACTER_SET = 0x00080018, 0x00080005


def test_pydicom_warnings_and_refusals_quoting_swallowed_patient_elements_log_no_phi(
    tmp_path, gateway
):
    """Per transfer syntax (explicit VR little endian; big endian and deflated, which only the
    pydicom path reads): a valid file; one whose SOP Instance UID's length swallows the
    accession number and the patient's name, ID and birth date (refused: the reason must not
    quote that "UID"); one whose Specific Character Set does so, after a misspelt "ISO IR 100"
    (pydicom warns "Unknown encoding" quoting the whole value). The warnings are JSON lines,
    and no PHI value is anywhere in the log."""
    syntaxes = [ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
    valid, uid_swallows, charset_swallows = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own say on the misspelt character set, here
        for n, syntax in enumerate(syntaxes):
            (source,) = dicomdata.make_mr_series(
                tmp_path / f"ts{n}",
                1,
                rows=16,
                cols=16,
                patient=PHI_PATIENT,
                seed=f"log-phi-{n}",
                transfer_syntax=syntax,
            )
            valid.append(source)
            uid_swallows.append(
                swallowing_patient(source, tmp_path / f"uid-{n}.dcm", SOP_INSTANCE_UID)
            )
            misspelt = tmp_path / f"misspelt-{n}.dcm"
            ds = pydicom.dcmread(source)
            ds.SpecificCharacterSet = (
                "ISO IR 100"  # a common misspelling of ISO_IR 100 (same length)
            )
            ds.save_as(misspelt)
            charset_swallows.append(
                swallowing_patient(misspelt, tmp_path / f"charset-{n}.dcm", SPECIFIC_CHARACTER_SET)
            )
    # the cases are what they claim: pydicom's own text would carry the PHI
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert PHI_PATIENT.patient_id in pydicom.dcmread(uid_swallows[1]).SOPInstanceUID
        caught.clear()
        pydicom.dcmread(charset_swallows[2]).get("StudyDescription")
    assert any(PHI_PATIENT.patient_id in str(w.message) for w in caught), [
        str(w.message)[:80] for w in caught
    ]

    sent = [*valid, *uid_swallows, *charset_swallows]
    assoc = associate(gateway.port, gateway.ae_title, [MR_IMAGE_STORAGE], syntaxes)
    try:
        statuses = [send_as_is(assoc, path) for path in sent]
    finally:
        assoc.release()
    assert statuses == [0x0000] * 3 + [0xC000] * 6, [
        hex(s) if s is not None else s for s in statuses
    ]
    gateway.stop()

    records = assert_json_log_without(gateway, PHI_VALUES)
    stores = [r for r in records if r.get("event") == "c-store"]
    assert len(stores) == len(sent)
    assert [r["transfer_syntax"] for r in stores] == syntaxes * 3
    assert all("not a valid UID" in r["outcome"] for r in stores[3:6]), stores[3:6]
    warned = [r for r in records if r.get("logger") == "pydicom" and r["level"] == "warning"]
    assert len(warned) >= 3 and all(r["event"].startswith("Unknown encoding") for r in warned), (
        warned
    )
