"""A grant or revocation is signed, replicated and permanent, so the running gateway checks it
before signing: the grantee must name something it knows (unless --force), `--until` must not
be past, a patient without anchored images draws a warning, and --dry-run signs nothing."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from dicomledger.ledger.entries import decode_entry
from tests import dicomdata
from tests.conftest import GatewayProcess, free_port

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


def own_entries(gw: GatewayProcess) -> list:
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'ledger.db'}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT e.data FROM entries e JOIN origins o ON o.id = e.origin_id WHERE o.name = ? ORDER BY e.idx",
            (gw.origin,),
        ).fetchall()
    finally:
        con.close()
    return [decode_entry(bytes(r[0])) for r in rows]


class Site:
    def __init__(
        self, gw: GatewayProcess, peer: GatewayProcess, patient: dicomdata.FakePatient, study: str
    ):
        self.gw, self.peer, self.patient, self.study = gw, peer, patient, study

    def grant(self, *args: str, patient: str | None = None):
        return self.gw.cli("grant", "--patient-id", patient or self.patient.patient_id, *args)

    def revoke(self, *args: str, patient: str | None = None):
        return self.gw.cli("revoke", "--patient-id", patient or self.patient.patient_id, *args)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("grants")
    gw = GatewayProcess(tmp / "gw", allow=("STORESCU", "WS1"))
    peer = GatewayProcess(tmp / "peer", ae_title="PEERGW")  # listed, never started
    gw.add_peer(peer)
    with open(gw.config, "a") as f:
        f.write(
            f'\n[[destinations]]\nae_title = "PACS"\naddress = "127.0.0.1:{free_port()}"\n'
            f'\n[[destinations]]\nae_title = "ARCHIVE"\naddress = "127.0.0.1:{free_port()}"\n'
            'site = "archive.example/dicomledger"\n'
        )
    patient = dicomdata.fake_patient("grant-checks")
    study = dicomdata.fake_uid("study", "grant-checks")
    gw.start(accept_local_tip=True)  # its one peer never runs to confirm its log
    try:
        files = dicomdata.make_mr_series(
            tmp / "mr", 2, patient=patient, study_uid=study, seed="grant-checks"
        )
        assert gw.storescu(*files).returncode == 0
        yield Site(gw, peer, patient, study)
    finally:
        gw.stop()


def refused(result, *needles: str) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    return result.stderr


def test_a_grantee_that_names_nothing_known_is_refused_unless_forced(site):
    before = len(own_entries(site.gw))
    refused(site.grant("--to", "PACS_TYPO"), "PACS_TYPO", "--force")
    refused(
        site.grant("--to", "WS1@typo.example/dicomledger"), "typo.example/dicomledger", "--force"
    )
    refused(site.grant("--to", "@typo.example/dicomledger"), "typo.example/dicomledger")
    refused(site.grant("--to", f"PACS_TYPO@{site.gw.origin}"), "PACS_TYPO")
    refused(
        site.grant("--to", "PACS@archive.example/dicomledger"), "PACS"
    )  # ARCHIVE is that site's AE
    assert len(own_entries(site.gw)) == before  # nothing signed

    for known in (
        "PACS",
        "WS1",
        "STORESCU",
        f"@{site.peer.origin}",
        f"ANYAE@{site.peer.origin}",
        f"PACS@{site.gw.origin}",
        "ARCHIVE@archive.example/dicomledger",
        "@archive.example/dicomledger",
    ):
        ok = site.grant("--to", known)
        assert ok.returncode == 0 and ok.stdout.startswith("granted: ref "), (known, ok.stderr)
    forced = site.grant("--to", "NEWPACS", "--force")
    assert forced.returncode == 0, forced.stderr
    grants = [e.payload["grantee"] for e in own_entries(site.gw)[before:]]
    assert len(grants) == 9 and {"ae": "NEWPACS", "gateway": None} in grants


def test_a_revoke_of_a_grantee_nobody_was_granted_is_refused_unless_forced(site):
    before = len(own_entries(site.gw))
    refused(
        site.revoke("--to", "PACSB_TYPO"),
        "PACSB_TYPO",
        "no grant of this patient names it",
        "--force",
    )
    assert len(own_entries(site.gw)) == before
    assert site.grant("--to", "OLDPACS", "--force").returncode == 0
    # a grantee no longer configured, but granted before: revoking it needs no --force
    assert site.revoke("--to", "OLDPACS").returncode == 0
    assert site.revoke("--to", "PACS").returncode == 0
    assert site.revoke("--to", "PACSB_TYPO", "--force").returncode == 0
    kinds = [e.kind for e in own_entries(site.gw)[before:]]
    assert kinds == ["grant", "revoke", "revoke", "revoke"]


def test_a_grant_ending_in_the_past_is_refused(site):
    before = len(own_entries(site.gw))
    today = datetime.now(UTC).date()
    refused(site.grant("--to", "PACS", "--until", "2020-01-01"), "2020-01-01 is in the past")
    refused(
        site.grant("--to", "PACS", "--until", str(today - timedelta(days=1)), "--force"),
        "in the past",
    )
    assert len(own_entries(site.gw)) == before
    assert site.grant("--to", "PACS", "--until", str(today)).returncode == 0  # the last day counts


def test_a_patient_or_study_without_anchored_images_draws_a_warning(site):
    unknown = site.grant("--to", "PACS", patient="NO-SUCH-PATIENT")
    assert unknown.returncode == 0, unknown.stderr
    assert "warning: no image of this patient is anchored" in unknown.stderr
    known = site.grant("--to", "PACS")
    assert known.returncode == 0 and "warning" not in known.stderr, known.stderr
    other_study = site.grant("--to", "PACS", "--study", "1.2.3.999")
    assert (
        other_study.returncode == 0
        and "no image of this patient in this study" in other_study.stderr
    )
    own_study = site.grant("--to", "PACS", "--study", site.study)
    assert own_study.returncode == 0 and "warning" not in own_study.stderr, own_study.stderr
    typo_revoke = site.revoke("--to", "PACS", "--force", patient="NO-SUCH-PATIENT-2")
    assert typo_revoke.returncode == 0 and "warning: no image of this patient" in typo_revoke.stderr


def test_dry_run_prints_the_record_and_signs_nothing(site):
    before = own_entries(site.gw)
    result = site.grant(
        "--to", "WS1", "--until", "2099-12-31", "--purpose", "second opinion", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    first, _, rest = result.stdout.partition("\n")
    assert first == f"dry run, nothing signed: {site.gw.origin} would sign and append this grant:"
    record = json.loads(rest)
    assert record["grantee"] == {"ae": "WS1", "gateway": None}
    assert record["until"] == "2099-12-31" and record["purpose"] == "second opinion"
    assert record["issuer"] == site.gw.origin and "issuer_sig" not in record
    assert site.patient.patient_id not in result.stdout  # pseudonyms only
    assert len(record["patient"]) >= 16
    # the heads it cites are the patient's current frontier: the next real grant cites the same
    assert own_entries(site.gw) == before
    real = site.grant("--to", "WS1", "--until", "2099-12-31", "--purpose", "second opinion")
    assert real.returncode == 0
    signed = own_entries(site.gw)[-1].payload
    assert {k: v for k, v in signed.items() if k != "issuer_sig"} == record

    dry_revoke = site.revoke("--to", "WS1", "--reason", "withdrawn", "--dry-run")
    assert dry_revoke.returncode == 0 and "would sign and append this revoke:" in dry_revoke.stdout
    assert json.loads(dry_revoke.stdout.partition("\n")[2])["grantee"] == {
        "ae": "WS1",
        "gateway": None,
    }
    refused(site.grant("--to", "WS1_TYPO", "--dry-run"), "WS1_TYPO")
    assert len(own_entries(site.gw)) == len(before) + 1
