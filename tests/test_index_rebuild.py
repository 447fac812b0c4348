"""A lost index row (index.db commits with synchronous=NORMAL; a power loss can drop its last
rows) is rebuilt at start from the stored file its anchor names: the instance is found by
C-FIND and C-GET again. Real gateway process, rows deleted with sqlite3, DCMTK findscu/getscu."""

from __future__ import annotations

import sqlite3

import pydicom
import pytest

from tests import dicomdata
from tests.conftest import GatewayProcess
from tests.test_patient_conflict import log_events
from tests.test_retrieve import findscu, getscu, gw_site, pixels_by_uid, received

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

ROW = (
    "sop_instance_uid, series_uid, sop_class_uid, instance_number, transfer_syntax_uid, path, size, "
    "hash_method, sha256, header_sha256, decoded_sha256, number_of_frames, calling_ae, ledger_origin, "
    "ledger_index, study_uid, patient_id"
)


def index_rows(gw: GatewayProcess, sql: str, *params: object) -> list[tuple]:
    con = sqlite3.connect(gw.dir / "data" / "index.db")
    try:
        rows = con.execute(sql, params).fetchall()
        con.commit()
        return rows
    finally:
        con.close()


def test_lost_index_row_is_rebuilt_from_the_stored_file(tmp_path):
    gw = GatewayProcess(tmp_path / "gw", allow=("STORESCU", "WS1"))
    patient = dicomdata.fake_patient("rebuild")
    study = dicomdata.fake_uid("study", "rebuild")
    files = dicomdata.make_mr_series(
        tmp_path / "mr", 4, patient=patient, study_uid=study, seed="rebuild"
    )
    lost, erased = (str(pydicom.dcmread(f).SOPInstanceUID) for f in files[1:3])
    gw.start()
    try:
        assert gw.storescu(*files).returncode == 0
        assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", "WS1").returncode == 0
    finally:
        gw.stop()
    (original,) = index_rows(gw, f"SELECT {ROW} FROM instances WHERE sop_instance_uid = ?", lost)
    (erased_path,) = index_rows(
        gw, "SELECT path FROM instances WHERE sop_instance_uid = ?", erased
    )[0]
    index_rows(gw, "DELETE FROM instances WHERE sop_instance_uid IN (?, ?)", lost, erased)
    (gw.dir / "data" / "images" / erased_path).unlink()  # this one's file is gone too: not rebuilt

    gw.start()
    try:
        (rebuilt,) = log_events(
            gw, "index row rebuilt from the stored file: its anchor had no index row"
        )
        assert rebuilt["sop_instance"] == lost and rebuilt["anchor"] == original[14]
        (gone,) = log_events(
            gw, "anchored instances with neither an index row nor a stored file: not rebuilt"
        )
        assert gone["count"] == 1
        assert index_rows(gw, f"SELECT {ROW} FROM instances WHERE sop_instance_uid = ?", lost) == [
            original
        ]
        site = gw_site(gw, 0)
        found = findscu(
            site,
            "WS1",
            tmp_path / "find",
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study}",
            "SOPInstanceUID",
            "PatientID",
        )
        assert sorted(str(d.SOPInstanceUID) for d in found) == sorted(
            set(pixels_by_uid(files)) - {erased}
        )
        got = tmp_path / "got"
        output = getscu(
            site,
            "WS1",
            got,
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study}",
            f"SeriesInstanceUID={pydicom.dcmread(files[1]).SeriesInstanceUID}",
            f"SOPInstanceUID={lost}",
        )
        assert pixels_by_uid(received(got)) == {lost: pixels_by_uid(files)[lost]}, output
    finally:
        gw.stop()
    gw.start()  # rebuilt once: the next start finds nothing to rebuild
    try:
        assert (
            len(
                log_events(
                    gw, "index row rebuilt from the stored file: its anchor had no index row"
                )
            )
            == 1
        )
    finally:
        gw.stop()
