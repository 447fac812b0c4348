"""Two patients under one Study Instance UID (a colliding UID from a misconfigured modality,
or a deliberate one): the second patient's instance is refused at store time (0xA778), and
every retrieval is decided per instance on the instance's own patient, also for mixed data
an older index holds. Driven by DCMTK storescu/findscu and pynetdicom's getscu app."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from dicomledger.dicom.index import (
    CONFLICTING_PATIENT,
    Index,
    IndexRecord,
    InstanceRow,
    PatientRow,
    SeriesRow,
    StudyPatientConflict,
    StudyRow,
)
from dicomledger.dicom.query import STUDY_ROOT, parse_query
from tests import dicomdata
from tests.conftest import DCMTK_ENV, GatewayProcess, dcmtk
from tests.test_retrieve import findscu, gw_site, received

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


def variant(
    source: Path,
    out: Path,
    patient: dicomdata.FakePatient,
    study_uid: str,
    series_uid: str | None = None,
    seed: str = "",
) -> Path:
    """``source`` with another patient, study (and series), and its own SOP Instance UID."""
    ds = pydicom.dcmread(source)
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = (
        patient.patient_id,
        patient.name,
        patient.birth_date,
    )
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or dicomdata.fake_uid("series", seed)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = dicomdata.fake_uid("sop", seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def pynetdicom_getscu(gw: GatewayProcess, aet: str, out: Path, *keys: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        "-m",
        "pynetdicom",
        "getscu",
        "-v",
        "-aet",
        aet,
        "-aec",
        gw.ae_title,
        "-S",
        "-od",
        str(out),
    ]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run(
        [*args, "127.0.0.1", str(gw.port)],
        capture_output=True,
        text=True,
        timeout=120,
        env=DCMTK_ENV,
    )
    return result.stdout + result.stderr


def uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}


def log_events(gw: GatewayProcess, event: str) -> list[dict]:
    lines = [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


@dataclass
class Mixed:
    gw: GatewayProcess
    a: dicomdata.FakePatient
    b: dicomdata.FakePatient
    study: str  # A's study, which B's colliding instance names too
    files_a: list[Path]
    file_b: Path  # B's instance under A's study UID
    file_b_own: Path  # B's instance in B's own study
    b_study: str


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mixed]:
    tmp = tmp_path_factory.mktemp("conflict")
    gw = GatewayProcess(tmp / "gw", allow=("STORESCU", "WS1", "WS2"))
    a, b = dicomdata.fake_patient("conflict-a"), dicomdata.fake_patient("conflict-b")
    study, b_study = (
        dicomdata.fake_uid("study", "conflict-a"),
        dicomdata.fake_uid("study", "conflict-b"),
    )
    files_a = dicomdata.make_mr_series(tmp / "a", 2, patient=a, study_uid=study, seed="conflict-a")
    file_b = variant(files_a[0], tmp / "b" / "collides.dcm", b, study, seed="conflict-b1")
    file_b_own = variant(files_a[1], tmp / "b" / "own.dcm", b, b_study, seed="conflict-b2")
    gw.start()
    try:
        assert gw.storescu(*files_a).returncode == 0
        for patient, ae in ((a, "WS1"), (b, "WS2")):
            assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", ae).returncode == 0
        yield Mixed(gw, a, b, study, files_a, file_b, file_b_own, b_study)
    finally:
        gw.stop()


def test_second_patients_instance_under_a_study_uid_is_refused_with_a778(mixed, tmp_path):
    gw = mixed.gw
    output = gw.storescu(mixed.file_b).stdout
    assert "Received Store Response (Success)" not in output, output
    debug = dcmtk(
        "storescu",
        "-d",
        "-aet",
        "STORESCU",
        "-aec",
        gw.ae_title,
        "127.0.0.1",
        str(gw.port),
        str(mixed.file_b),
    )
    assert re.search(r"Status\s*: 0xa778", debug.stdout + debug.stderr, re.IGNORECASE), debug.stderr
    assert gw.storescu(mixed.file_b_own).returncode == 0  # B's own study is fine
    refused_uid = str(pydicom.dcmread(mixed.file_b).SOPInstanceUID)
    (line,) = [e for e in log_events(gw, "c-store") if e["sop_instance"] == refused_uid][:1]
    assert line["status"] == f"0x{CONFLICTING_PATIENT:04X}"
    assert (
        "already holds instances of another patient" in line["outcome"]
        and mixed.study in line["outcome"]
    )
    assert (
        mixed.a.patient_id not in gw.log() and mixed.b.patient_id not in gw.log()
    )  # no PHI in the log
    # nothing of it stays: no index row, no stored file
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'index.db'}?mode=ro", uri=True)
    try:
        assert con.execute(
            "SELECT COUNT(*) FROM instances WHERE sop_instance_uid = ?", (refused_uid,)
        ).fetchone() == (0,)
    finally:
        con.close()
    assert not list((gw.dir / "data" / "images").rglob(f"{refused_uid}.*"))


def test_a_refused_copy_of_a_stored_instance_leaves_the_stored_file_as_it_was(mixed, tmp_path):
    """A's instance sent again with B's Patient ID (same SOP Instance UID, study, series and
    pixels) is refused: the copy of A's instance already stored must not be overwritten
    by the refused one's header."""
    gw = mixed.gw
    uid = str(pydicom.dcmread(mixed.files_a[0]).SOPInstanceUID)
    (stored,) = [p for p in (gw.dir / "data" / "images").rglob(f"{uid}.*") if p.suffix == ".dcm"]
    before = stored.read_bytes()
    relabelled = pydicom.dcmread(mixed.files_a[0])
    relabelled.PatientID, relabelled.PatientName = mixed.b.patient_id, mixed.b.name
    relabelled.save_as(tmp_path / "relabelled.dcm", enforce_file_format=True)
    output = gw.storescu(tmp_path / "relabelled.dcm").stdout
    assert "Received Store Response (Success)" not in output, output
    assert stored.read_bytes() == before
    assert pydicom.dcmread(stored).PatientID == mixed.a.patient_id
    assert [p.name for p in (gw.dir / "data" / "images").rglob(f"{uid}.*")] == [stored.name]
    assert gw.cli("verify-file", str(mixed.files_a[0])).returncode == 0


def test_patient_b_grantee_gets_and_finds_nothing_of_patient_a(mixed, tmp_path):
    gw = mixed.gw
    gw.storescu(mixed.file_b)  # the colliding instance (refused), and B's own study
    gw.storescu(mixed.file_b_own)
    got = tmp_path / "ws2"
    output = pynetdicom_getscu(
        gw, "WS2", got, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={mixed.study}"
    )
    assert uids(received(got)) == set(), output
    site = gw_site(gw, 0)
    studies = findscu(
        site,
        "WS2",
        tmp_path / "f2",
        "QueryRetrieveLevel=STUDY",
        "PatientID",
        "StudyInstanceUID",
        "NumberOfStudyRelatedInstances",
    )
    assert [(str(d.PatientID), str(d.StudyInstanceUID)) for d in studies] == [
        (mixed.b.patient_id, mixed.b_study)
    ]
    images = findscu(
        site,
        "WS2",
        tmp_path / "i2",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={mixed.study}",
        "SOPInstanceUID",
        "PatientID",
    )
    assert images == []
    # A's grantee still has all of A's study, under A's Patient ID
    ws1 = findscu(
        site,
        "WS1",
        tmp_path / "f1",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={mixed.study}",
        "PatientID",
        "NumberOfStudyRelatedInstances",
    )
    assert [(str(d.PatientID), int(d.NumberOfStudyRelatedInstances)) for d in ws1] == [
        (mixed.a.patient_id, 2)
    ]
    got1 = tmp_path / "ws1"
    pynetdicom_getscu(
        gw, "WS1", got1, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={mixed.study}"
    )
    assert uids(received(got1)) == uids(mixed.files_a)


# -- the index itself ----------------------------------------------------------------------


def record(patient: str, study: str, series: str, sop: str, sha: bytes = b"p" * 32) -> IndexRecord:
    row = InstanceRow(
        sop,
        series,
        dicomdata.MR_IMAGE,
        "1",
        "1.2.840.10008.1.2.1",
        f"{sop}.dcm",
        1,
        "pixel",
        sha,
        b"h" * 32 + sha,
        None,
        1,
        "STORESCU",
        "2026-01-01T00:00:00.000+00:00",
    )
    return IndexRecord(
        PatientRow(patient, patient + "^N", "", ""),
        StudyRow(study, patient, "", "", "", "", "", ""),
        SeriesRow(series, study, "MR", "1", ""),
        row,
    )


async def test_index_refuses_another_patient_under_a_study_or_series_uid(tmp_path):
    index = await Index.open(tmp_path / "index.db")
    try:
        await index.record_received(record("PID-A", "1.5", "1.5.1", "1.1"))
        with pytest.raises(StudyPatientConflict, match="study UID 1.5 already holds") as caught:
            await index.record_received(record("PID-B", "1.5", "1.5.2", "2.1"))
        assert caught.value.status == CONFLICTING_PATIENT and "PID-A" not in str(caught.value)
        with pytest.raises(StudyPatientConflict, match="series UID 1.5.1 already holds"):
            await index.record_received(record("PID-B", "1.6", "1.5.1", "2.2"))
        # an instance re-sent with a corrected Patient ID, alone in its study, is accepted
        await index.record_received(record("PID-C", "1.7", "1.7.1", "3.1"))
        await index.record_received(record("PID-D", "1.7", "1.7.1", "3.1", sha=b"q" * 32))
        query = parse_query(
            _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.7"), STUDY_ROOT
        )
        assert [r["PatientID"] for r in await index.matching("STUDY", query)] == ["PID-D"]
        assert await index.count_instances() == 2
    finally:
        await index.close()


def _identifier(**values: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for k, v in values.items():
        setattr(ds, k, v)
    ds.PatientID = ""
    return ds


# -- mixed data an older index holds (schema version 1: one patient per study) ---------------

V1_INSTANCE_COLUMNS = (
    "sop_instance_uid, series_uid, sop_class_uid, instance_number, transfer_syntax_uid, path, size, "
    "hash_method, sha256, header_sha256, decoded_sha256, number_of_frames, calling_ae, received_at, "
    "ledger_origin, ledger_index"
)


def make_version_1_index(index_db: Path, study: str, last_patient: str) -> None:
    """Rewrite the index as the version 1 schema held it after two patients' instances
    arrived under ``study``: one studies row per study UID (the last sender's patient), series
    pointing at studies, instances without their own study and patient."""
    con = sqlite3.connect(index_db)
    try:
        con.executescript(f"""
            BEGIN;
            CREATE TABLE studies_v1 (study_uid TEXT PRIMARY KEY, patient_id TEXT NOT NULL,
                study_date TEXT, study_time TEXT, accession_number TEXT, study_id TEXT,
                study_description TEXT, referring_physician TEXT);
            INSERT OR REPLACE INTO studies_v1 SELECT study_uid, patient_id, study_date, study_time,
                accession_number, study_id, study_description, referring_physician FROM studies;
            UPDATE studies_v1 SET patient_id = '{last_patient}' WHERE study_uid = '{study}';
            DELETE FROM studies_v1 WHERE study_uid NOT IN (SELECT study_uid FROM studies WHERE study_uid = '{study}');
            CREATE TABLE series_v1 (series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL,
                modality TEXT, series_number TEXT, series_description TEXT);
            INSERT OR REPLACE INTO series_v1 SELECT series_uid, '{study}', modality, series_number,
                series_description FROM series;
            CREATE TABLE instances_v1 AS SELECT {V1_INSTANCE_COLUMNS} FROM instances;
            DROP TABLE studies; DROP TABLE series; DROP TABLE instances;
            ALTER TABLE studies_v1 RENAME TO studies;
            ALTER TABLE series_v1 RENAME TO series;
            ALTER TABLE instances_v1 RENAME TO instances;
            CREATE INDEX studies_patient ON studies (patient_id);
            CREATE INDEX series_study ON series (study_uid);
            COMMIT;
            PRAGMA user_version = 0;
        """)
    finally:
        con.close()


def test_mixed_study_in_an_older_index_is_decided_per_instance(tmp_path):
    gw = GatewayProcess(tmp_path / "gw", allow=("STORESCU", "WS1", "WS2"))
    a, b = dicomdata.fake_patient("legacy-a"), dicomdata.fake_patient("legacy-b")
    study = dicomdata.fake_uid("study", "legacy-a")
    files_a = dicomdata.make_mr_series(
        tmp_path / "a", 2, patient=a, study_uid=study, seed="legacy-a"
    )
    # B's instance arrives under its own study; on disk it is then made to name A's study,
    # which is what an older gateway stored and indexed under A's study
    file_b = variant(
        files_a[0], tmp_path / "b.dcm", b, dicomdata.fake_uid("study", "legacy-b"), seed="legacy-b"
    )
    uid_b = str(pydicom.dcmread(file_b).SOPInstanceUID)
    gw.start()
    try:
        assert gw.storescu(*files_a, file_b).returncode == 0
        for patient, ae in ((a, "WS1"), (b, "WS2")):
            assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", ae).returncode == 0
    finally:
        gw.stop()
    index_db = gw.dir / "data" / "index.db"
    con = sqlite3.connect(index_db)
    (relative,) = con.execute(
        "SELECT path FROM instances WHERE sop_instance_uid = ?", (uid_b,)
    ).fetchone()
    con.close()
    stored_b = gw.dir / "data" / "images" / relative
    ds = pydicom.dcmread(stored_b)
    ds.StudyInstanceUID = study  # a header edit: the pixels, and so the anchor, still match
    ds.save_as(stored_b, enforce_file_format=True)
    make_version_1_index(index_db, study, b.patient_id)

    gw.start()
    try:
        site = gw_site(gw, 0)
        got = tmp_path / "ws2"
        output = pynetdicom_getscu(
            gw, "WS2", got, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"
        )
        assert uids(received(got)) == {uid_b}, output
        ws2 = findscu(
            site,
            "WS2",
            tmp_path / "f2",
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study}",
            "PatientID",
            "NumberOfStudyRelatedInstances",
        )
        assert [(str(d.PatientID), int(d.NumberOfStudyRelatedInstances)) for d in ws2] == [
            (b.patient_id, 1)
        ]
        ws1 = findscu(
            site,
            "WS1",
            tmp_path / "f1",
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study}",
            "PatientID",
            "SOPInstanceUID",
        )
        assert {(str(d.PatientID), str(d.SOPInstanceUID)) for d in ws1} == {
            (a.patient_id, u) for u in uids(files_a)
        }
        got1 = tmp_path / "ws1"
        pynetdicom_getscu(gw, "WS1", got1, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
        assert uids(received(got1)) == uids(files_a)
        (flag,) = log_events(
            gw,
            "a study UID holds instances of more than one patient (stored before such "
            "instances were refused): each instance is shown and retrieved only as its "
            "own patient's",
        )
        assert flag["study_uid"] == study
    finally:
        gw.stop()
