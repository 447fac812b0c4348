"""Query/Retrieve gated by patient permissions, against a gateway process, driven by DCMTK
findscu, movescu (receiving on its own port) and getscu; a tampered file is refused on
retrieve and the alarm shows in `dicomledger audit`."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from dicomledger.dicom.net.retrieve import PENDING_EVERY
from tests import dicomdata
from tests.conftest import DCMTK_ENV, GatewayProcess, consortium, dcmtk, free_port
from tests.test_consortium import wait_until
from tests.test_forwarding import entries_of_kind

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


@dataclass
class Site:
    gw: GatewayProcess
    ws1_port: int  # WS1 (authorised) receives C-MOVEs here (movescu +P)
    ws2_port: int
    patient_a: dicomdata.FakePatient  # granted to WS1
    patient_b: dicomdata.FakePatient  # granted to nobody
    study_a: str
    study_b: str
    files_a: list[Path]
    files_b: list[Path]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("qr")
    ws1_port, ws2_port = free_port(), free_port()
    gw = GatewayProcess(tmp / "gw", allow=("STORESCU", "ECHOSCU", "WS1", "WS2"))
    with open(gw.config, "a") as f:
        f.write(
            f'\n[[destinations]]\nae_title = "WS1"\naddress = "127.0.0.1:{ws1_port}"\n'
            f'\n[[destinations]]\nae_title = "WS2"\naddress = "127.0.0.1:{ws2_port}"\n'
        )
    a, b = dicomdata.fake_patient("qr-a"), dicomdata.fake_patient("qr-b")
    study_a, study_b = dicomdata.fake_uid("study", "qr-a"), dicomdata.fake_uid("study", "qr-b")
    files_a = dicomdata.make_ct_series(
        tmp / "a", 4, 64, 64, patient=a, study_uid=study_a, seed="qr-a-ct"
    ) + dicomdata.make_mr_series(tmp / "a", 3, patient=a, study_uid=study_a, seed="qr-a-mr")
    files_b = dicomdata.make_mr_series(tmp / "b", 2, patient=b, study_uid=study_b, seed="qr-b")
    gw.start()
    try:
        assert gw.storescu(*files_a, *files_b).returncode == 0
        granted = gw.cli(
            "grant", "--patient-id", a.patient_id, "--to", "WS1", "--purpose", "reading"
        )
        assert granted.returncode == 0, granted.stderr
        yield Site(gw, ws1_port, ws2_port, a, b, study_a, study_b, files_a, files_b)
    finally:
        gw.stop()


def findscu(
    site: Site, aet: str, out: Path, *keys: str, model: str = "-S"
) -> list[pydicom.Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    args = ["-v", "-aet", aet, "-aec", site.gw.ae_title, model, "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = dcmtk("findscu", *args, "127.0.0.1", str(site.gw.port))
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def movescu(
    site: Site, aet: str, dest: str, port: int, out: Path, *keys: str, extra: tuple[str, ...] = ()
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "-v",
        "-aet",
        aet,
        "-aec",
        site.gw.ae_title,
        "-aem",
        dest,
        "+P",
        str(port),
        "-od",
        str(out),
        "-S",
        *extra,
    ]
    for key in keys:
        args += ["-k", key]
    result = dcmtk("movescu", *args, "127.0.0.1", str(site.gw.port))
    return result.stdout + result.stderr


def getscu(site: Site, aet: str, out: Path, *keys: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    args = ["-v", "-aet", aet, "-aec", site.gw.ae_title, "-od", str(out), "-S"]
    for key in keys:
        args += ["-k", key]
    result = dcmtk("getscu", *args, "127.0.0.1", str(site.gw.port))
    return result.stdout + result.stderr


def pixels_by_uid(paths: list[Path]) -> dict[str, bytes]:
    out = {}
    for p in paths:
        ds = pydicom.dcmread(p)
        out[str(ds.SOPInstanceUID)] = ds.PixelData
    return out


def received(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.is_file()]


def stored_path(site: Site, sop_instance_uid: str) -> Path:
    con = sqlite3.connect(f"file:{site.gw.dir / 'data' / 'index.db'}?mode=ro", uri=True)
    try:
        (relative,) = con.execute(
            "SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchone()
    finally:
        con.close()
    return site.gw.dir / "data" / "images" / relative


def study_key(site: Site, study: str) -> tuple[str, str]:
    return "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"


# -- C-FIND --------------------------------------------------------------------------------


def test_authorised_workstation_finds_its_patient_with_counts(site, tmp_path):
    found = findscu(
        site,
        "WS1",
        tmp_path,
        "QueryRetrieveLevel=STUDY",
        "PatientName",
        "PatientID",
        "StudyInstanceUID",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    )
    assert [str(d.StudyInstanceUID) for d in found] == [site.study_a]  # not patient B's study
    study = found[0]
    assert str(study.PatientID) == site.patient_a.patient_id
    assert sorted(study.ModalitiesInStudy) == ["CT", "MR"]
    assert int(study.NumberOfStudyRelatedSeries) == 2
    assert int(study.NumberOfStudyRelatedInstances) == 7


def test_matching_rules_on_the_wire(site, tmp_path):
    family = site.patient_a.name.split("^")[0]
    # PN matching is case-insensitive, with * and ? wildcards
    lower = findscu(
        site,
        "WS1",
        tmp_path / "pn",
        "QueryRetrieveLevel=PATIENT",
        f"PatientName={family[:3].lower()}*",
        "NumberOfPatientRelatedInstances",
        model="-P",
    )
    assert len(lower) == 1 and int(lower[0].NumberOfPatientRelatedInstances) == 7
    miss = findscu(
        site,
        "WS1",
        tmp_path / "miss",
        "QueryRetrieveLevel=PATIENT",
        f"PatientName={family[:3]}?",
        model="-P",
    )  # ? is exactly one character
    assert miss == []
    # series level with a modality, then a UID list at image level
    series = findscu(
        site,
        "WS1",
        tmp_path / "series",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={site.study_a}",
        "Modality=CT",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
    )
    assert len(series) == 1 and int(series[0].NumberOfSeriesRelatedInstances) == 4
    uids = [str(pydicom.dcmread(p).SOPInstanceUID) for p in site.files_a[:2]]
    images = findscu(
        site,
        "WS1",
        tmp_path / "images",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={site.study_a}",
        f"SeriesInstanceUID={series[0].SeriesInstanceUID}",
        "SOPInstanceUID=" + "\\".join(uids),
        "InstanceNumber",
    )
    assert sorted(str(d.SOPInstanceUID) for d in images) == sorted(uids)
    # a date range that excludes the study, and one that includes it
    date = str(pydicom.dcmread(site.files_a[0]).StudyDate)
    assert (
        findscu(site, "WS1", tmp_path / "d1", "QueryRetrieveLevel=STUDY", "StudyDate=-19000101")
        == []
    )
    assert (
        len(findscu(site, "WS1", tmp_path / "d2", "QueryRetrieveLevel=STUDY", f"StudyDate={date}-"))
        == 1
    )


def test_unauthorised_workstation_sees_nothing(site, tmp_path):
    assert (
        findscu(site, "WS2", tmp_path / "s", "QueryRetrieveLevel=STUDY", "StudyInstanceUID") == []
    )
    assert (
        findscu(site, "WS2", tmp_path / "p", "QueryRetrieveLevel=PATIENT", "PatientID", model="-P")
        == []
    )
    log = site.gw.log()
    assert '"studies_hidden": 1' in log and '"query_level": "PATIENT"' in log


# -- C-MOVE / C-GET ------------------------------------------------------------------------


def test_authorised_move_and_get_deliver_the_whole_study_unchanged(site, tmp_path):
    expected = pixels_by_uid(site.files_a)
    moved = tmp_path / "moved"
    output = movescu(site, "WS1", "WS1", site.ws1_port, moved, *study_key(site, site.study_a))
    assert pixels_by_uid(received(moved)) == expected, output
    got = tmp_path / "got"
    output = getscu(site, "WS1", got, *study_key(site, site.study_a))
    assert pixels_by_uid(received(got)) == expected, output
    # Patient Root, PATIENT level: everything of the patient WS1 may have
    by_patient = tmp_path / "by-patient"
    by_patient.mkdir()
    result = dcmtk(
        "getscu",
        "-v",
        "-aet",
        "WS1",
        "-aec",
        site.gw.ae_title,
        "-od",
        str(by_patient),
        "-P",
        "-k",
        "QueryRetrieveLevel=PATIENT",
        "-k",
        f"PatientID={site.patient_a.patient_id}",
        "127.0.0.1",
        str(site.gw.port),
    )
    assert pixels_by_uid(received(by_patient)) == expected, result.stdout + result.stderr
    retrieved = [e for e in entries_of_kind(site.gw, "retrieved") if e["calling_ae"] == "WS1"]
    services = {e["service"] for e in retrieved if e["completed"] == 7}
    assert services == {"C-MOVE", "C-GET"}, retrieved
    for entry in retrieved:
        assert entry["destination"] == "WS1" and entry["failed"] == entry["refused"] == 0
        assert site.patient_a.patient_id not in json.dumps(
            entry
        ) and site.study_a not in json.dumps(entry)


def test_unauthorised_move_and_get_are_refused(site, tmp_path):
    """Answered exactly as for a study that does not exist (the answer
    must not tell that the study exists), while the refusal goes on the ledger."""
    unknown = site.study_a[:-1] + (
        "1" if site.study_a[-1] != "1" else "2"
    )  # same length: same output
    moved = tmp_path / "moved"
    output = movescu(site, "WS2", "WS2", site.ws2_port, moved, *study_key(site, site.study_a))
    assert received(moved) == [], output
    absent = movescu(
        site, "WS2", "WS2", site.ws2_port, tmp_path / "absent-m", *study_key(site, unknown)
    )
    assert output.replace(site.study_a, "S") == absent.replace(unknown, "S"), output + absent
    assert "Received Final Move Response (Success)" in output, output
    got = tmp_path / "got"
    output = getscu(site, "WS2", got, *study_key(site, site.study_a))
    assert received(got) == [], output
    absent = getscu(site, "WS2", tmp_path / "absent-g", *study_key(site, unknown))
    assert output.replace(site.study_a, "S") == absent.replace(unknown, "S"), output + absent
    refused = [e for e in entries_of_kind(site.gw, "retrieve-refused") if e["destination"] == "WS2"]
    assert {e["service"] for e in refused} == {"C-MOVE", "C-GET"}
    assert all(e["instances"] == 7 and "no grant" in e["reason"] for e in refused), refused
    # WS1 may not have patient B's study moved to it either
    moved_b = tmp_path / "moved-b"
    movescu(site, "WS1", "WS1", site.ws1_port, moved_b, *study_key(site, site.study_b))
    assert received(moved_b) == []


def test_unknown_move_destination_is_refused_with_a801(site, tmp_path):
    output = movescu(
        site, "WS1", "NOWHERE", site.ws1_port, tmp_path / "x", *study_key(site, site.study_a)
    )
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in output, output
    refused = [
        e for e in entries_of_kind(site.gw, "retrieve-refused") if e["destination"] == "NOWHERE"
    ]
    assert refused and "unknown move destination" in refused[0]["reason"]


def test_tampered_pixels_are_not_sent_and_raise_an_alarm(site, tmp_path):
    victim = site.files_a[1]
    uid = str(pydicom.dcmread(victim).SOPInstanceUID)
    path = stored_path(site, uid)
    original = path.read_bytes()
    tampered = bytearray(original)
    tampered[-10] ^= 0xFF  # a pixel byte near the end of the file
    path.write_bytes(bytes(tampered))
    try:
        moved = tmp_path / "moved"
        output = movescu(site, "WS1", "WS1", site.ws1_port, moved, *study_key(site, site.study_a))
        got = pixels_by_uid(received(moved))
        assert uid not in got and len(got) == 6, output
        assert (
            "Received Final Move Response (Warning: SubOperationsCompleteOneOrMoreFailures)"
            in output
        ), output
        alarms = [e for e in entries_of_kind(site.gw, "tamper-alarm") if e["found_sha256"]]
        assert alarms and alarms[-1]["expected_sha256"] != alarms[-1]["found_sha256"]
        assert str(path) in site.gw.log() and "TAMPER ALARM" in site.gw.log()
        last = [e for e in entries_of_kind(site.gw, "retrieved") if e["service"] == "C-MOVE"][-1]
        assert (last["completed"], last["tampered"]) == (6, 1), last
        audit = site.gw.cli("audit", "--patient-id", site.patient_a.patient_id)
        assert audit.returncode == 0, audit.stderr
        assert "tamper" in audit.stdout.lower() and site.patient_a.patient_id not in audit.stdout
        events = json.loads(
            site.gw.cli("audit", "--patient-id", site.patient_a.patient_id, "--json").stdout
        )["events"]
        kinds = [e["kind"] for e in events]
        assert kinds[0] == "retrieved" and "tamper-alarm" in kinds and "image-anchored" in kinds
        times = [e["time_ms"] for e in events]
        assert times == sorted(times, reverse=True)  # newest first
    finally:
        path.write_bytes(original)


def test_a_missing_stored_file_is_an_alarm_not_a_crash(site, tmp_path):
    uid = str(pydicom.dcmread(site.files_a[3]).SOPInstanceUID)
    path = stored_path(site, uid)
    moved_away = path.with_suffix(".away")
    path.rename(moved_away)
    try:
        got = tmp_path / "got"
        output = getscu(site, "WS1", got, *study_key(site, site.study_a))
        assert uid not in pixels_by_uid(received(got)) and len(received(got)) == 6, output
        alarm = entries_of_kind(site.gw, "tamper-alarm")[-1]
        assert alarm["problem"] == "stored file is missing" and alarm["found_sha256"] is None
        assert (
            alarm["expected_sha256"]
            == hashlib.sha256(pydicom.dcmread(site.files_a[3]).PixelData).hexdigest()
        )
    finally:
        moved_away.rename(path)


def test_header_only_change_is_still_served(site, tmp_path):
    victim = site.files_a[2]
    uid = str(pydicom.dcmread(victim).SOPInstanceUID)
    path = stored_path(site, uid)
    original = path.read_bytes()
    ds = pydicom.dcmread(path)
    ds.PatientName = "Corrected^Name"
    ds.save_as(path, enforce_file_format=True)
    try:
        got = tmp_path / "got"
        getscu(
            site,
            "WS1",
            got,
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={site.study_a}",
            f"SeriesInstanceUID={ds.SeriesInstanceUID}",
            f"SOPInstanceUID={uid}",
        )
        files = received(got)
        assert len(files) == 1
        sent = pydicom.dcmread(files[0])
        assert str(sent.PatientName) == "Corrected^Name" and sent.PixelData == ds.PixelData
    finally:
        path.write_bytes(original)


def test_c_cancel_stops_a_running_move(tmp_path):
    ws_port = free_port()
    gw = GatewayProcess(tmp_path / "gw", allow=("STORESCU", "WS1"))
    with open(gw.config, "a") as f:
        f.write(f'\n[[destinations]]\nae_title = "WS1"\naddress = "127.0.0.1:{ws_port}"\n')
    patient = dicomdata.fake_patient("cancel")
    study = dicomdata.fake_uid("study", "cancel")
    # enough images that movescu's third Pending response (they come after the first
    # sub-operation, then every PENDING_EVERY or PENDING_SECONDS) leaves many still to send
    total = 3 * PENDING_EVERY + 40
    files = dicomdata.make_ct_series(
        tmp_path / "ct", total, 64, 64, patient=patient, study_uid=study, seed="cancel"
    )
    gw.start()
    try:
        assert gw.storescu(*files).returncode == 0
        assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", "WS1").returncode == 0
        moved = tmp_path / "moved"
        output = movescu(
            gw_site(gw, ws_port),
            "WS1",
            "WS1",
            ws_port,
            moved,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study}",
            extra=("--cancel", "3"),
        )
        count = len(received(moved))
        assert 3 <= count < total, output
        assert (
            "Received Final Move Response (Cancel: SubOperationsTerminatedDueToCancelIndication)"
            in output
        ), output
        entry = entries_of_kind(gw, "retrieved")[-1]
        assert (
            entry["cancelled"] is True
            and entry["completed"] == count
            and entry["not_sent"] == total - count
        ), entry
    finally:
        gw.stop()


def gw_site(gw: GatewayProcess, port: int) -> Site:
    return Site(gw, port, port, None, None, "", "", [], [])  # type: ignore[arg-type]


def test_storescp_as_move_destination(site, tmp_path):
    """A third-party receiver (DCMTK storescp) as the move destination, not movescu itself."""
    out = tmp_path / "pacs"
    out.mkdir()
    log = open(tmp_path / "storescp.log", "w")
    proc = subprocess.Popen(
        ["storescp", "-aet", "WS1", "-od", str(out), "+uf", str(site.ws1_port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=DCMTK_ENV,
    )
    try:
        time.sleep(0.5)
        output = movescu(
            site, "WS1", "WS1", free_port(), tmp_path / "unused", *study_key(site, site.study_a)
        )
        assert pixels_by_uid(received(out)) == pixels_by_uid(site.files_a), output
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_audit_at_another_gateway_shows_the_whole_history(tmp_path):
    """The auditor at B sees what happened at A (replicated log): receipt, grant, retrieval,
    refusal and tamper alarm, newest first, with A named as the gateway."""
    a, b = consortium(tmp_path, 2)
    a.set(
        'allowed_calling_aes = ["STORESCU", "ECHOSCU"]',
        'allowed_calling_aes = ["STORESCU", "ECHOSCU", "WS1", "WS2"]',
    )
    patient = dicomdata.fake_patient("audit")
    study = dicomdata.fake_uid("study", "audit")
    files = dicomdata.make_mr_series(
        tmp_path / "mr", 3, patient=patient, study_uid=study, seed="audit"
    )
    for gw in (a, b):
        gw.start()
    try:
        assert a.storescu(*files).returncode == 0
        assert a.cli("grant", "--patient-id", patient.patient_id, "--to", "WS1").returncode == 0
        uid = str(pydicom.dcmread(files[0]).SOPInstanceUID)
        site = gw_site(a, 0)
        path = stored_path(site, uid)
        path.write_bytes(path.read_bytes()[:-4] + b"\x00\x01\x02\x03")  # last pixel bytes
        getscu(
            site, "WS1", tmp_path / "ws1", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"
        )
        getscu(
            site, "WS2", tmp_path / "ws2", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"
        )
        wanted = {"image-anchored", "grant", "retrieved", "retrieve-refused", "tamper-alarm"}

        def audit_at_b() -> list[dict]:
            out = b.cli("audit", "--study", study, "--json")
            return json.loads(out.stdout)["events"] if out.returncode == 0 else []

        wait_until(
            lambda: wanted <= {e["kind"] for e in audit_at_b()}, 30, "A's history replicated to B"
        )
        events = audit_at_b()
        assert {e["gateway"] for e in events} == {a.origin}
        retrieved = next(e for e in events if e["kind"] == "retrieved")["payload"]
        assert (retrieved["calling_ae"], retrieved["completed"], retrieved["tampered"]) == (
            "WS1",
            2,
            1,
        )
        text = b.cli("audit", "--patient-id", patient.patient_id).stdout
        assert (
            a.origin in text
            and "TAMPER" in text
            and patient.patient_id not in text
            and study not in text
        )
    finally:
        for gw in (a, b):
            gw.stop()


def test_bad_retrieve_identifiers_get_a_failure_status_and_a_logged_reason(site, tmp_path):
    # no StudyInstanceUID at STUDY level: a retrieve must name what it retrieves
    output = movescu(
        site, "WS1", "WS1", site.ws1_port, tmp_path / "m", "QueryRetrieveLevel=STUDY", "PatientID=*"
    )
    assert "Received Final Move Response (Failed: UnableToProcess)" in output, output
    output = getscu(
        site, "WS1", tmp_path / "g", "QueryRetrieveLevel=BOGUS", f"StudyInstanceUID={site.study_a}"
    )
    assert "Failed" in output and received(tmp_path / "g") == [], output
    # C-FIND answers the identifier's own failure status
    result = dcmtk(
        "findscu",
        "-v",
        "-aet",
        "WS1",
        "-aec",
        site.gw.ae_title,
        "-S",
        "-k",
        "QueryRetrieveLevel=PATIENT",
        "127.0.0.1",
        str(site.gw.port),
    )
    assert (
        "Received Final Find Response (Error: DataSetDoesNotMatchSOPClass)"
        in result.stdout + result.stderr
    )  # 0xA900
    log = site.gw.log()
    assert "must name the StudyInstanceUID" in log and "Traceback" not in log
