"""Retention: studies past their keep period by Study Date and modality are
erased by the erase path (one `erased` entry per study, reason `retention`), after a dry run
that lists exactly what would go; the policy also runs by itself."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from dicomledger.config import RetentionRule
from dicomledger.dicom.index import StudySummary
from dicomledger.retention import due, years_before
from tests import dicomdata
from tests.conftest import GatewayProcess
from tests.test_consortium import wait_until
from tests.test_erasure import files_holding, index_count, phi_of
from tests.test_forwarding import entries_of_kind

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


def dated(files: list[Path], study_date: str) -> list[Path]:
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyDate = study_date
        ds.save_as(path)
    return files


RULES = (
    '\n[retention]\ncheck_interval_hours = {hours}\n\n[[retention.rules]]\nmodality = "MR"\nkeep_years = 5\n'
    '\n[[retention.rules]]\nmodality = ["CT", "PT"]\nkeep_years = 30\n'
)


def test_retention_dry_run_lists_what_goes_then_erases_only_that(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    with open(gw.config, "a") as f:
        f.write(RULES.format(hours=0))
    old_mr, old_ct, new_mr, undated, mixed = (
        dicomdata.fake_patient(f"ret-{t}")
        for t in ("old-mr", "old-ct", "new-mr", "undated", "mixed")
    )
    today = datetime.now(UTC).strftime("%Y%m%d")
    old_mr_study = dicomdata.fake_uid("study", "ret-old-mr")
    mixed_study = dicomdata.fake_uid("study", "ret-mixed")
    files = {
        "old-mr": dated(
            dicomdata.make_mr_series(
                tmp_path / "a", 3, patient=old_mr, study_uid=old_mr_study, seed="ret-a"
            ),
            "20100104",
        ),
        "old-ct": dated(
            dicomdata.make_ct_series(tmp_path / "b", 2, 64, 64, patient=old_ct, seed="ret-b"),
            "20100104",
        ),
        "new-mr": dated(
            dicomdata.make_mr_series(tmp_path / "c", 2, patient=new_mr, seed="ret-c"), today
        ),
        "undated": dated(
            dicomdata.make_mr_series(tmp_path / "d", 1, patient=undated, seed="ret-d"), ""
        ),
        # an old study with an MR and a CT series keeps the CT's 30 years
        "mixed": dated(
            dicomdata.make_mr_series(
                tmp_path / "e", 1, patient=mixed, study_uid=mixed_study, seed="ret-e"
            )
            + dicomdata.make_ct_series(
                tmp_path / "e", 1, 64, 64, patient=mixed, study_uid=mixed_study, seed="ret-e"
            ),
            "20100104",
        ),
    }
    gw.start()
    try:
        assert gw.storescu(*[f for group in files.values() for f in group]).returncode == 0
        dry = gw.cli("retention", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would erase 1 studies" in dry.stdout and old_mr_study in dry.stdout, dry.stdout
        assert "kept 5 years" in dry.stdout and "skipped study" in dry.stdout, dry.stdout
        assert mixed_study not in dry.stdout
        assert not entries_of_kind(gw, "erased") and index_count(gw) == 10

        applied = gw.cli("retention")
        assert applied.returncode == 0 and "erased 1 studies" in applied.stdout, applied.stdout
        [entry] = entries_of_kind(gw, "erased")
        assert (
            entry["reason"] == "retention"
            and entry["study"] is not None
            and entry["instances"] == 3
        )
        assert index_count(gw, old_mr.patient_id) == 0 and index_count(gw) == 7
        assert gw.cli("verify-file", str(files["old-mr"][0])).returncode == 5
        assert gw.cli("verify-file", str(files["mixed"][0])).returncode == 0
        assert "no study is past its retention period" in gw.cli("retention", "--dry-run").stdout
    finally:
        gw.stop()
    assert gw.cli("verify").returncode == 0
    assert files_holding(gw.dir / "data", phi_of(old_mr)) == []


def test_retention_runs_by_itself(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    with open(gw.config, "a") as f:
        f.write(RULES.format(hours=0.0003))  # about a second
    files = dated(dicomdata.make_mr_series(tmp_path / "mr", 2, seed="ret-auto"), "19990101")
    gw.start()
    try:
        assert gw.storescu(*files).returncode == 0
        wait_until(
            lambda: '"retention applied"' in gw.log(), what="the policy to erase the old study"
        )
        assert len(entries_of_kind(gw, "erased")) == 1 and index_count(gw) == 0
    finally:
        gw.stop()


def test_keep_periods():
    rules = [RetentionRule(5, ("MR",)), RetentionRule(30, ("CT", "PT")), RetentionRule(10)]
    today = datetime(2026, 3, 1, tzinfo=UTC).date()

    def study(modalities: tuple[str, ...], date: str) -> StudySummary:
        return StudySummary(
            f"1.2.{date}.{'.'.join(str(len(m)) for m in modalities)}", "P", date, modalities, 1, ""
        )

    studies = [
        study(("MR",), "20160302"),  # 10 years (the rule without modality applies too): kept
        study(("US",), "20150101"),  # only the 10-year rule: due
        study(("CT",), "19970101"),  # 30 years: kept until 2027
        study(("CT",), "19951231"),  # due
        study(("MR",), "2015"),  # no valid date: skipped
    ]
    found, skipped = due(studies, rules, today)
    assert [d.study.study_date for d in found] == ["20150101", "19951231"]
    assert [s.study_date for s in skipped] == ["2015"]
    assert due(studies, [], today) == ([], [])  # no rule: nothing ever goes
    assert years_before(datetime(2028, 2, 29).date(), 1) == datetime(2027, 2, 28).date()
