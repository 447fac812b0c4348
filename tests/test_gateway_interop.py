"""The gateway process (its asyncio DICOM layer) with senders and requestors the
rest of the suite does not use: GDCM's gdcmscu (echo, store, find, move), pynetdicom's own
apps (storescu, findscu, movescu, getscu) and Orthanc through its REST API (store to the
gateway, query it and retrieve from it by C-MOVE); a PACS that opens one association per
image; C-GET sending the stored bytes as they were hash-checked; and connections stalled
inside a PDU header, which hold no association place."""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests import dicomdata
from tests.conftest import DCMTK_ENV, GatewayProcess, dcmtk, free_port
from tests.netharness import dataset_bytes
from tests.test_forwarding import entries_of_kind
from tests.test_patient_conflict import log_events
from tests.test_retrieve import pixels_by_uid, received, stored_path
from tests.test_storage_scp import index_rows

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

HOST = "127.0.0.1"
ORTHANC = "/usr/sbin/Orthanc"


@dataclass
class Site:
    gw: GatewayProcess
    ws1_port: int  # WS1, the requestor's own move destination, listens here
    orthanc_port: int  # the ORTHANC destination's DICOM port (each Orthanc test starts one there)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("interop")
    ws1_port, orthanc_port = free_port(), free_port()
    gw = GatewayProcess(tmp / "gw", allow=("STORESCU", "GDCMSCU", "WS1", "ORTHANC", "PACS"))
    with open(gw.config, "a") as f:
        f.write(
            f'\n[[destinations]]\nae_title = "WS1"\naddress = "{HOST}:{ws1_port}"\n'
            f'\n[[destinations]]\nae_title = "ORTHANC"\naddress = "{HOST}:{orthanc_port}"\n'
        )
    gw.start()
    try:
        yield Site(gw, ws1_port, orthanc_port)
    finally:
        gw.stop()


def patient_files(
    tmp: Path, seed: str, n: int = 3
) -> tuple[dicomdata.FakePatient, str, list[Path]]:
    patient = dicomdata.fake_patient(seed)
    study = dicomdata.fake_uid("study", seed)
    return (
        patient,
        study,
        dicomdata.make_mr_series(tmp / seed, n, patient=patient, study_uid=study, seed=seed),
    )


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def anchored(gw: GatewayProcess, files: list[Path]) -> bool:
    uids = "', '".join(uid_of(f) for f in files)
    rows = index_rows(
        gw,
        f"SELECT COUNT(*) FROM instances WHERE ledger_index IS NOT NULL AND sop_instance_uid IN ('{uids}')",
    )
    return rows == [(len(files),)]


def grant(gw: GatewayProcess, patient: dicomdata.FakePatient, ae: str) -> None:
    result = gw.cli("grant", "--patient-id", patient.patient_id, "--to", ae)
    assert result.returncode == 0, result.stderr


# --- GDCM -----------------------------------------------------------------------------------


def gdcmscu(site: Site, *args: str, timeout: float = 60) -> str:
    """gdcmscu aborts (exit 134) on every A-RELEASE-RP: judge by its -D trace and by what arrived."""
    result = subprocess.run(
        ["gdcmscu", *args, "--call", site.gw.ae_title, HOST, str(site.gw.port)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.stdout + result.stderr


def statuses_in(trace: str, command_field: int) -> set[int]:
    """The Statuses of the responses with ``command_field`` in gdcmscu's -D trace (which
    prints each command set more than once)."""
    found = set()
    for block in re.split(r"\(0000,0000\) \?\? \(UL\)", trace):
        field = re.search(r"\(0000,0100\) \?\? \(US\) (\d+)", block)
        status = re.search(r"\(0000,0900\) \?\? \(US\) (\d+)", block)
        if field and status and int(field[1]) == command_field:
            found.add(int(status[1]))
    return found


def test_gdcmscu_echo_store_find_and_move(site: Site, tmp_path: Path) -> None:
    trace = gdcmscu(site, "--echo", "-D")
    assert statuses_in(trace, 0x8030) == {0}, trace[-3000:]  # C-ECHO-RSP Success

    patient, study, files = patient_files(tmp_path, "gdcm")
    for f in files:
        gdcmscu(site, "--store", "-i", str(f))  # calling AE GDCMSCU
    assert anchored(site.gw, files)
    stores = [e for e in log_events(site.gw, "c-store") if e["calling_ae"] == "GDCMSCU"]
    assert [e["status"] for e in stores] == ["0x0000"] * 3
    grant(site.gw, patient, "WS1")

    trace = gdcmscu(
        site,
        "--find",
        "--studyroot",
        "--study",
        "--aetitle",
        "WS1",
        "--key",
        f"10,20={patient.patient_id}",
        "--key",
        "20,d=",
        "-D",
    )
    assert statuses_in(trace, 0x8020) == {0xFF00, 0}, trace[-3000:]  # a match, then Success
    (found,) = [e for e in log_events(site.gw, "c-find") if e["calling_ae"] == "WS1"][-1:]
    assert found["results"] == 1

    out = tmp_path / "moved"
    out.mkdir()
    gdcmscu(
        site,
        "--move",
        "--studyroot",
        "--study",
        "--aetitle",
        "WS1",
        "--key",
        f"20,d={study}",
        "--port-scp",
        str(site.ws1_port),
        "-o",
        str(out),
    )
    assert pixels_by_uid(received(out)) == pixels_by_uid(files)
    moved = [e for e in entries_of_kind(site.gw, "retrieved") if e["service"] == "C-MOVE"][-1]
    assert (moved["destination"], moved["completed"], moved["status"]) == ("WS1", 3, "0x0000")


# --- pynetdicom's apps ----------------------------------------------------------------------


def pynetdicom_app(app: str, site: Site, *args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pynetdicom",
            app,
            HOST,
            str(site.gw.port),
            "-aec",
            site.gw.ae_title,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    return result.stdout + result.stderr


def test_pynetdicom_apps_store_find_move_and_get(site: Site, tmp_path: Path) -> None:
    patient, study, files = patient_files(tmp_path, "pynetdicom-apps")
    output = pynetdicom_app("storescu", site, *map(str, files), "-aet", "STORESCU")
    assert anchored(site.gw, files), output
    grant(site.gw, patient, "WS1")

    output = pynetdicom_app(
        "findscu",
        site,
        "-aet",
        "WS1",
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"PatientID={patient.patient_id}",
        "-k",
        "StudyInstanceUID",
        "-k",
        "NumberOfStudyRelatedInstances",
    )
    assert output.count("(Pending)") == 1 and "Find SCP Result: 0x0000 (Success)" in output, output
    assert study in output and re.search(r"\(0020,1208\) IS \[3\]", output), output

    moved = tmp_path / "moved"
    moved.mkdir()
    output = pynetdicom_app(
        "movescu",
        site,
        "-aet",
        "WS1",
        "-aem",
        "WS1",
        "--store",
        "--store-aet",
        "WS1",
        "--store-port",
        str(site.ws1_port),
        "-od",
        str(moved),
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
    )
    assert "Move SCP Result: 0x0000 (Success)" in output, output
    assert pixels_by_uid(received(moved)) == pixels_by_uid(files), output

    got = tmp_path / "got"
    got.mkdir()
    output = pynetdicom_app(
        "getscu",
        site,
        "-aet",
        "WS1",
        "-od",
        str(got),
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
    )
    assert "Get SCP Result: 0x0000 (Success)" in output, output
    assert pixels_by_uid(received(got)) == pixels_by_uid(files), output
    services = {
        e["service"]
        for e in entries_of_kind(site.gw, "retrieved")
        if e["completed"] == 3 and e["calling_ae"] == "WS1" and e["destination"] == "WS1"
    }
    assert {"C-MOVE", "C-GET"} <= services


def test_c_get_sends_the_stored_bytes(site: Site, tmp_path: Path) -> None:
    """DCMTK getscu, bit-preserving (+B), proposing the stored transfer syntax: each data set
    arrives byte for byte as the gateway stored (and hash-checked) it."""
    patient, study, files = patient_files(tmp_path, "get-bytes")
    assert site.gw.storescu(*files).returncode == 0
    grant(site.gw, patient, "WS1")
    got = tmp_path / "got"
    got.mkdir()
    result = dcmtk(
        "getscu",
        "-aet",
        "WS1",
        "-aec",
        site.gw.ae_title,
        "-S",
        "+B",
        "+xe",
        "-od",
        str(got),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
        HOST,
        str(site.gw.port),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(received(got)) == 3
    for path in received(got):
        assert dataset_bytes(path) == dataset_bytes(stored_path(site, uid_of(path))), path.name


# --- Orthanc --------------------------------------------------------------------------------


class Orthanc:
    """Orthanc (the Debian package) with a fresh JSON config: its defaults, DICOM on ``port``,
    REST on a free loopback port, the gateway as modality "gateway"; TCP_NODELAY=1 in its
    environment (DCMTK leaves Nagle's algorithm on otherwise)."""

    def __init__(self, directory: Path, port: int, gateway: GatewayProcess) -> None:
        self.dir = directory
        self.http_port = free_port()
        self.log_path = directory / "orthanc.log"
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "interop",
            "StorageDirectory": str(directory / "storage"),
            "IndexDirectory": str(directory / "index"),
            "DicomAet": "ORTHANC",
            "DicomPort": port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "DicomModalities": {"gateway": [gateway.ae_title, HOST, gateway.port]},
        }
        (directory / "orthanc.json").write_text(json.dumps(config))
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [ORTHANC, str(directory / "orthanc.json")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log_path.read_text(errors="replace")[-3000:]
            try:
                self.rest("GET", "/system")
                break
            except OSError:
                assert time.monotonic() < deadline, "Orthanc did not answer"
                time.sleep(0.1)

    def rest(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://{HOST}:{self.http_port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = response.read()
        return json.loads(answer) if answer else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def orthanc(site: Site, tmp_path: Path) -> Iterator[Orthanc]:
    if not Path(ORTHANC).exists():
        pytest.fail("Orthanc not installed: run ./scripts/test, which installs it")
    server = Orthanc(tmp_path / "orthanc", site.orthanc_port, site.gw)
    yield server
    server.stop()


def test_orthanc_stores_queries_and_retrieves_through_its_rest_api(
    site: Site, orthanc: Orthanc, tmp_path: Path
) -> None:
    patient, study, files = patient_files(tmp_path, "orthanc")
    for f in files:
        orthanc.rest("POST", "/instances", raw=f.read_bytes())
    (study_id,) = orthanc.rest("GET", "/studies")
    answer = orthanc.rest(
        "POST", "/modalities/gateway/store", {"Resources": [study_id], "Synchronous": True}
    )
    assert answer["InstancesCount"] == 3 and answer["FailedInstancesCount"] == 0, answer
    assert anchored(site.gw, files)
    assert {
        e["calling_ae"]
        for e in log_events(site.gw, "c-store")
        if e["sop_instance"] in map(uid_of, files)
    } == {"ORTHANC"}

    # Orthanc forgets the study, then finds it at the gateway and retrieves it (C-MOVE to itself)
    orthanc.rest("DELETE", f"/studies/{study_id}")
    assert orthanc.rest("GET", "/instances") == []
    grant(site.gw, patient, "ORTHANC")
    query = orthanc.rest(
        "POST",
        "/modalities/gateway/query",
        {"Level": "Study", "Query": {"StudyInstanceUID": study, "PatientID": ""}},
    )
    answers = orthanc.rest("GET", f"/queries/{query['ID']}/answers?expand")
    assert [a["0010,0020"]["Value"] for a in answers] == [patient.patient_id], answers
    orthanc.rest("POST", f"/queries/{query['ID']}/retrieve", {"Synchronous": True})
    instances = orthanc.rest("GET", "/instances")
    assert len(instances) == 3
    back = {
        orthanc.rest("GET", f"/instances/{i}/simplified-tags")["SOPInstanceUID"]: i
        for i in instances
    }
    for f in files:
        data = urllib.request.urlopen(
            f"http://{HOST}:{orthanc.http_port}/instances/{back[uid_of(f)]}/file"
        ).read()
        assert dataset_bytes_of(data) == dataset_bytes(f), f.name  # stored as sent, sent as stored
    moved = [e for e in entries_of_kind(site.gw, "retrieved") if e["destination"] == "ORTHANC"][-1]
    assert (moved["service"], moved["completed"], moved["status"]) == ("C-MOVE", 3, "0x0000")


def dataset_bytes_of(data: bytes) -> bytes:
    """The data set of a Part 10 file's bytes (after File Meta)."""
    (group_length,) = struct.unpack_from("<I", data, 140)
    return data[144 + group_length :]


# --- one association per image, and stalled connections -------------------------------------


def test_thirty_single_image_associations_in_a_row(site: Site, tmp_path: Path) -> None:
    files = dicomdata.make_ct_series(tmp_path / "ct", 30, seed="one-each", rows=64, cols=64)
    for f in files:
        result = dcmtk(
            "storescu", "-aet", "PACS", "-aec", site.gw.ae_title, HOST, str(site.gw.port), str(f)
        )
        assert result.returncode == 0, result.stdout + result.stderr
    assert anchored(site.gw, files)
    deadline = time.monotonic() + 10
    while (
        len(ended := [e for e in log_events(site.gw, "association") if e["calling_ae"] == "PACS"])
        < 30
    ):
        assert time.monotonic() < deadline, ended
        time.sleep(0.05)
    assert all(e["ended"] == "released" and e["stores"] == 1 and e["failures"] == 0 for e in ended)
    assert list((site.gw.dir / "data" / "images" / "tmp").iterdir()) == []


def test_connections_stalled_in_a_pdu_header_hold_no_association_place(tmp_path: Path) -> None:
    """Twice max_associations connections that send 3 bytes of a PDU header and stop: a real
    sender is still served at once (the pynetdicom server counted them and refused it)."""
    gw = GatewayProcess(tmp_path / "gw")
    gw.set("max_associations = 64", "max_associations = 4")
    gw.start()
    stalled = []
    try:
        for _ in range(8):
            sock = socket.create_connection((HOST, gw.port))
            sock.sendall(b"\x01\x00\x00")
            stalled.append(sock)
        (f,) = dicomdata.make_mr_series(tmp_path / "mr", 1, seed="stalled")
        started = time.monotonic()
        result = gw.storescu(f)
        assert (
            result.returncode == 0
            and "Received Store Response (Success)" in result.stdout + result.stderr
        ), result.stdout + result.stderr
        assert time.monotonic() - started < 10
    finally:
        for sock in stalled:
            sock.close()
        gw.stop()
