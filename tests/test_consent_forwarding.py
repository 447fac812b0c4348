"""Consent drives forwarding, with real gateway processes and DCMTK storescp
destinations: a grant sends the patient's images already stored (in its scope, none twice),
also a grant recorded at another gateway and replicated here; a revoke stops what is not yet
sent; parked jobs go again after `queue unpark` / `queue retry`; `status` counts are the
ledger's and the queue's."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from dicomledger.ledger.pseudonym import pseudonym
from tests import dicomdata
from tests.conftest import DCMTK_ENV, GatewayProcess, consortium, free_port
from tests.test_consortium import log_size, wait_until
from tests.test_forwarding import add_forwarding, effective, entries_of_kind, forwarding_gateway

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


class Storescp:
    """A DCMTK storescp as the forwarding destination PACS, on a fixed port (it can be
    restarted with other options, as a fixed destination would be)."""

    def __init__(self, tmp_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.out = tmp_path / "pacs"
        self.out.mkdir(exist_ok=True)
        self.log_path = tmp_path / "storescp.log"
        self.proc: subprocess.Popen | None = None

    def start(self, *options: str) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [
                    "storescp",
                    "-v",
                    "-aet",
                    "PACS",
                    "-od",
                    str(self.out),
                    "+uf",
                    *options,
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=DCMTK_ENV,
            )
        wait_until(self._listening, timeout=10, what="storescp to listen")

    def _listening(self) -> bool:
        import socket

        assert self.proc is not None and self.proc.poll() is None, self.log_path.read_text()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def received(self) -> list[str]:
        """The SOP Instance UIDs of the files it stored (one per file, duplicates kept)."""
        return [
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in self.out.iterdir()
        ]


@pytest.fixture
def pacs(tmp_path: Path):
    scp = Storescp(tmp_path)
    yield scp
    scp.stop()


def uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def queue_jobs(gw: GatewayProcess, *args: str) -> dict:
    out = gw.cli("queue", "--json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def status_counts(gw: GatewayProcess, destination: str = "PACS") -> dict[str, int]:
    out = gw.cli("status")
    assert out.returncode == 0, out.stderr
    line = next(
        ln for ln in out.stdout.splitlines() if ln.startswith(f"forwarding to {destination} ")
    )
    return {
        state: int(n) for n, state in re.findall(r"(\d+) (queued|done|refused|failed|parked)", line)
    }


def queue_db_states(gw: GatewayProcess) -> dict[str, int]:
    """The forward queue's jobs by stored state (parked jobs are stored as 'failed')."""
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'forward.db'}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
    finally:
        con.close()


def assert_status_matches_ledger_and_queue(gw: GatewayProcess) -> dict[str, int]:
    counts = status_counts(gw)
    assert counts["done"] == len(entries_of_kind(gw, "forwarded")), counts
    assert counts["refused"] == len(entries_of_kind(gw, "forward-refused")), counts
    states = queue_db_states(gw)
    listed = queue_jobs(gw)["destinations"]["PACS"]
    assert counts["parked"] == states.get("failed", 0) == listed["parked"], (counts, states, listed)
    assert counts["queued"] + counts["failed"] == states.get("queued", 0), (counts, states)
    assert (counts["queued"], counts["failed"]) == (listed["queued"], listed["failed"])
    return counts


def test_a_grant_sends_the_patients_stored_images_in_its_scope_once(tmp_path, pacs):
    pacs.start()
    gw = forwarding_gateway(tmp_path, pacs.port)  # routes MR to PACS
    patient, other = dicomdata.fake_patient("consent-p"), dicomdata.fake_patient("consent-q")
    study1, study2 = (
        dicomdata.fake_uid("study", "consent-1"),
        dicomdata.fake_uid("study", "consent-2"),
    )
    first = dicomdata.make_mr_series(
        tmp_path / "s1", 3, seed="s1", patient=patient, study_uid=study1
    )
    second = dicomdata.make_mr_series(
        tmp_path / "s2", 2, seed="s2", patient=patient, study_uid=study2
    )
    ct = dicomdata.make_ct_series(
        tmp_path / "ct", 1, 64, 64, seed="ct", patient=patient, study_uid=study2
    )
    others = dicomdata.make_mr_series(tmp_path / "q", 2, seed="q", patient=other)
    gw.start()
    try:
        assert gw.storescu(*first, *second, *ct, *others).returncode == 0
        # no grant yet: every routed instance refused (the CT is not routed to PACS)
        wait_until(lambda: len(entries_of_kind(gw, "forward-refused")) == 7, what="7 refusals")

        granted = gw.cli(
            "grant", "--patient-id", patient.patient_id, "--to", "PACS", "--study", study1
        )
        assert granted.returncode == 0, granted.stderr
        ref = re.search(r"ref ([0-9a-f]{64})", granted.stdout).group(1)
        wait_until(
            lambda: len(entries_of_kind(gw, "forwarded")) == 3,
            what="the study's 3 images forwarded",
        )
        secret = (gw.dir / "keys" / "consortium.secret").read_bytes().strip()
        queued = entries_of_kind(gw, "forwards-queued")
        assert queued == [
            {
                "destination": "PACS",
                "site": None,
                "patient": pseudonym(secret, "patient", patient.patient_id),
                "study": pseudonym(secret, "study", study1),
                "grant": ref,
                "queued": 3,
                "already_delivered": 0,
                "already_queued": 0,
            }
        ]

        # a grant for all studies sends the other study's MR; nothing is sent twice
        granted = gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS")
        assert granted.returncode == 0, granted.stderr
        wait_until(lambda: len(entries_of_kind(gw, "forwarded")) == 5, what="5 images forwarded")
        queued = entries_of_kind(gw, "forwards-queued")
        assert len(queued) == 2 and queued[1]["queued"] == 2 and queued[1]["study"] is None, queued
        assert queued[1]["grant"] == re.search(r"ref ([0-9a-f]{64})", granted.stdout).group(1)

        # the same again, after a restart: everything is delivered, nothing more is queued
        assert gw.stop() == 0
        gw.start()
        assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS").returncode == 0
        time.sleep(2)  # the grant wakes the scan at once; it runs at least every second
        assert len(entries_of_kind(gw, "forwards-queued")) == 2
        assert len(entries_of_kind(gw, "forwarded")) == 5
        received = pacs.received()
        assert sorted(received) == sorted(
            uids(first) | uids(second)
        )  # each once; not the CT nor Q's
        counts = assert_status_matches_ledger_and_queue(gw)
        assert counts == {"queued": 0, "done": 5, "refused": 7, "failed": 0, "parked": 0}
        audit = gw.cli("audit", "--patient-id", patient.patient_id)
        assert audit.stdout.count("forwards queued to PACS by grant") == 2, audit.stdout
    finally:
        gw.stop()
    ledger = (gw.dir / "data" / "ledger.db").read_bytes()
    assert patient.patient_id.encode() not in ledger and study1.encode() not in ledger
    assert gw.cli("verify").returncode == 0


def test_a_grant_recorded_at_a_peer_sends_the_images_stored_here(tmp_path, pacs):
    pacs.start()
    a, b = consortium(tmp_path, 2)
    add_forwarding(b, pacs.port)  # B routes everything to PACS; A has no destinations
    patient = dicomdata.fake_patient("consent-peer")
    for gw in (a, b):
        gw.start()
    try:
        # A anchors the patient's first image (A is a custodian and may sign for the patient)
        assert (
            a.storescu(
                *dicomdata.make_mr_series(tmp_path / "a", 1, seed="pa", patient=patient)
            ).returncode
            == 0
        )
        at_b = dicomdata.make_mr_series(tmp_path / "b", 3, seed="pb", patient=patient)
        assert b.storescu(*at_b).returncode == 0
        wait_until(
            lambda: len(entries_of_kind(b, "forward-refused")) == 3, what="B to refuse 3 forwards"
        )
        wait_until(lambda: log_size(b, a.origin) >= 1, what="B to hold A's anchor")
        # the consent is recorded at A; PACS is B's destination, so A signs it only with --force
        assert (
            a.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS", "--force").returncode
            == 0
        )
        wait_until(
            lambda: len(entries_of_kind(b, "forwarded")) == 3,
            what="B to forward its 3 stored images",
        )
        assert sorted(pacs.received()) == sorted(uids(at_b))
        queued = entries_of_kind(b, "forwards-queued")
        assert len(queued) == 1 and queued[0]["queued"] == 3, queued
        assert entries_of_kind(a, "forwards-queued") == []  # A routes nothing to PACS

        # a grant for a patient of whom B stores nothing queues nothing there
        elsewhere = dicomdata.fake_patient("consent-elsewhere")
        assert (
            a.storescu(
                *dicomdata.make_mr_series(tmp_path / "e", 1, seed="pe", patient=elsewhere)
            ).returncode
            == 0
        )
        assert (
            a.cli(
                "grant", "--patient-id", elsewhere.patient_id, "--to", "PACS", "--force"
            ).returncode
            == 0
        )
        wait_until(
            lambda: "to PACS" in effective(b, elsewhere.patient_id),
            what="the second grant to reach B",
        )
        time.sleep(1.5)  # B scans at least every second
        assert len(entries_of_kind(b, "forwards-queued")) == 1 and len(pacs.received()) == 3
    finally:
        for gw in (a, b):
            gw.stop()


def test_a_revoke_between_grant_and_delivery_stops_the_rest(tmp_path, pacs):
    pacs.start("--sleep-during", "1")  # a slow destination: one image a second
    gw = forwarding_gateway(tmp_path, pacs.port)
    patient = dicomdata.fake_patient("consent-revoke")
    files = dicomdata.make_mr_series(tmp_path / "mr", 8, seed="revoke", patient=patient)
    gw.start()
    try:
        assert gw.storescu(*files).returncode == 0
        assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS").returncode == 0
        wait_until(
            lambda: len(entries_of_kind(gw, "forwarded")) >= 1, what="a first image delivered"
        )
        assert gw.cli("revoke", "--patient-id", patient.patient_id, "--to", "PACS").returncode == 0
        wait_until(lambda: queue_jobs(gw)["jobs"] == [], timeout=30, what="the queue to empty")
        forwarded = entries_of_kind(gw, "forwarded")
        stopped = [
            r
            for r in entries_of_kind(gw, "forward-refused")
            if "no longer authorised" in r["reason"]
        ]
        assert 1 <= len(forwarded) < 8 and len(forwarded) + len(stopped) == 8, (
            len(forwarded),
            len(stopped),
        )
        assert all("revoked" in r["reason"] for r in stopped), stopped
        received = pacs.received()
        assert len(received) == len(set(received)) == len(forwarded)
        assert entries_of_kind(gw, "forwards-queued")[0]["queued"] == 8
        counts = assert_status_matches_ledger_and_queue(gw)
        assert counts["done"] == len(forwarded) and counts["refused"] == 8 + len(stopped)
    finally:
        gw.stop()


CT_ONLY = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[CTOnly]
PresentationContext1 = CTImageStorage\\Uncompressed

[[Profiles]]
[CTOnly]
PresentationContexts = CTOnly
"""


def test_parked_jobs_are_sent_after_unpark_and_retry(tmp_path, pacs):
    profile = tmp_path / "ct-only.cfg"
    profile.write_text(CT_ONLY)
    pacs.start("-xf", str(profile), "CTOnly")  # accepts no MR: every MR job is parked at once
    gw = forwarding_gateway(tmp_path, pacs.port)
    patient = dicomdata.fake_patient("consent-parked")
    files = dicomdata.make_mr_series(tmp_path / "mr", 4, seed="parked", patient=patient)
    # the admin commands need the running gateway, and say so
    down = gw.cli("queue", "retry")
    assert down.returncode == 2 and "not running" in down.stderr, down.stderr
    gw.start()
    try:
        assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS").returncode == 0
        assert gw.storescu(*files).returncode == 0
        wait_until(
            lambda: queue_jobs(gw)["destinations"]["PACS"]["parked"] == 4, what="4 parked jobs"
        )
        listing = queue_jobs(gw, "--destination", "PACS")
        assert {j["state"] for j in listing["jobs"]} == {"parked"} and len(listing["jobs"]) == 4
        assert all(
            "does not accept" in j["last_error"] and j["attempts"] == 1 for j in listing["jobs"]
        )
        shown = gw.cli("queue").stdout
        assert (
            "PACS: 0 queued, 0 failed, 4 parked, 0 done, 0 refused" in shown
            and "does not accept" in shown
        ), shown
        assert status_counts(gw)["parked"] == 4
        assert_status_matches_ledger_and_queue(gw)
        assert pacs.received() == []

        pacs.stop()
        pacs.start()  # fixed: it accepts every storage SOP class now
        jobs = [j["job"] for j in listing["jobs"]]
        unparked = gw.cli("queue", "unpark", "--job", str(jobs[0]))
        assert unparked.returncode == 0 and "1 parked job of PACS put back" in unparked.stdout, (
            unparked
        )
        wait_until(
            lambda: len(entries_of_kind(gw, "forwarded")) == 1, what="the unparked job delivered"
        )
        time.sleep(1)
        assert len(entries_of_kind(gw, "forwarded")) == 1  # the others stay parked
        assert queue_jobs(gw)["destinations"]["PACS"]["parked"] == 3
        retried = gw.cli("queue", "retry", "--destination", "PACS")
        assert (
            retried.returncode == 0 and "3 failed or parked jobs of PACS put back" in retried.stdout
        ), retried
        wait_until(lambda: len(entries_of_kind(gw, "forwarded")) == 4, what="all 4 delivered")
        assert sorted(pacs.received()) == sorted(uids(files))
        counts = assert_status_matches_ledger_and_queue(gw)
        assert counts == {"queued": 0, "done": 4, "refused": 0, "failed": 0, "parked": 0}
        nothing = gw.cli("queue", "unpark")
        assert nothing.returncode == 0 and "no parked jobs to put back" in nothing.stdout, nothing
        unknown = gw.cli("queue", "retry", "--destination", "NOPE")
        assert unknown.returncode == 1 and "not a [[destinations]] AE title" in unknown.stderr, (
            unknown
        )
    finally:
        gw.stop()
    lines = [json.loads(ln) for ln in gw.log().splitlines() if ln.startswith("{")]
    put_back = [ln for ln in lines if ln.get("event") == "forward jobs put back in the queue"]
    assert [ln["jobs"] for ln in put_back] == [1, 3], put_back


def test_status_counts_failed_jobs_of_a_destination_that_is_down(tmp_path):
    gw = forwarding_gateway(tmp_path, free_port())  # nothing listens there
    patient = dicomdata.fake_patient("consent-down")
    gw.start()
    try:
        assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS").returncode == 0
        assert (
            gw.storescu(
                *dicomdata.make_mr_series(tmp_path / "mr", 2, seed="down", patient=patient)
            ).returncode
            == 0
        )
        wait_until(lambda: status_counts(gw)["failed"] >= 1, what="a failed job")
        listing = queue_jobs(gw)
        failed = [j for j in listing["jobs"] if j["state"] == "failed"]
        assert failed and all(j["last_error"] and j["next_attempt"] for j in failed), listing
        assert_status_matches_ledger_and_queue(gw)
    finally:
        gw.stop()


def test_the_forwards_queued_entry_survives_a_failed_append_and_crashes(tmp_path, pacs):
    """The jobs a grant queues and its forwards-queued entry: the entry is appended once,
    whether its append fails (then the gateway is killed) or the note that it was appended
    fails (killed again)."""
    pacs.start()
    gw = forwarding_gateway(tmp_path, pacs.port)
    patient = dicomdata.fake_patient("consent-crash")
    files = dicomdata.make_mr_series(tmp_path / "mr", 3, seed="crash", patient=patient)
    ledger = sqlite3.connect(gw.dir / "data" / "ledger.db", isolation_level=None)
    queue = sqlite3.connect(gw.dir / "data" / "forward.db", isolation_level=None)

    def failures() -> int:
        return gw.log().count('"consent scan failed; trying again"')

    gw.start()
    try:
        assert gw.storescu(*files).returncode == 0
        ledger.execute(
            "CREATE TRIGGER fail_forwards_queued BEFORE INSERT ON entries "
            'WHEN CAST(NEW.data AS TEXT) LIKE \'%"kind":"forwards-queued"%\' '
            "BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
        )
        assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS").returncode == 0
        # the jobs were committed: they are sent though their entry cannot be appended
        wait_until(lambda: len(entries_of_kind(gw, "forwarded")) == 3, what="3 forwarded")
        assert entries_of_kind(gw, "forwards-queued") == [] and failures() == 1
        gw.kill()

        ledger.execute("DROP TRIGGER fail_forwards_queued")
        queue.execute(
            "CREATE TRIGGER fail_recorded BEFORE UPDATE ON backfills "
            "BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
        )
        gw.start()  # appends the pending entry, but cannot note that it did
        wait_until(
            lambda: len(entries_of_kind(gw, "forwards-queued")) == 1, what="the pending entry"
        )
        wait_until(lambda: failures() == 2, what="the note to fail")
        time.sleep(1.5)  # scans that find the entry in the log append no other
        assert len(entries_of_kind(gw, "forwards-queued")) == 1
        gw.kill()

        queue.execute("DROP TRIGGER fail_recorded")
        gw.start()
        wait_until(
            lambda: queue.execute("SELECT entry_index FROM backfills").fetchall() != [(None,)],
            what="the entry to be noted",
        )
        time.sleep(1.5)
        assert [e["queued"] for e in entries_of_kind(gw, "forwards-queued")] == [3]
        assert len(entries_of_kind(gw, "forwarded")) == 3 and failures() == 2
        assert sorted(pacs.received()) == sorted(uids(files))
    finally:
        gw.stop()
        ledger.close()
        queue.close()
    assert gw.cli("verify").returncode == 0
