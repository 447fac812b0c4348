"""Erasure with real gateway processes driven by DCMTK: a patient's images,
index rows and pending forwards leave the gateway, an `erased` entry stays on a ledger that
still verifies, nothing of the patient's PHI stays in any file under the data directory, and
a consortium gateway that holds forwarded copies honours the erasure if configured to."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from tests import dicomdata
from tests.conftest import DCMTK_ENV, ROOT, GatewayProcess, consortium, dcmtk, free_port
from tests.test_consortium import wait_until
from tests.test_forwarding import entries_of_kind, forwarding_gateway

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


def phi_of(patient: dicomdata.FakePatient) -> list[bytes]:
    """What of a fake patient must not stay: the ID, the name, the unique token in both, the
    accession number."""
    token = patient.patient_id.split("-", 1)[1]
    return [
        patient.patient_id.encode(),
        patient.name.encode(),
        token.encode(),
        (patient.accession or "").encode(),
    ]


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    """Every file under ``root`` (databases, their -wal and -shm, images, temp files) whose
    bytes contain one of ``needles``."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.relative_to(root)} holds {n!r}" for n in needles if n in data]
    return found


def index_count(gw: GatewayProcess, patient_id: str | None = None) -> int:
    con = sqlite3.connect(gw.dir / "data" / "index.db")
    try:
        if patient_id is None:
            return con.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        return con.execute(
            "SELECT COUNT(*) FROM instances WHERE patient_id = ?", (patient_id,)
        ).fetchone()[0]
    finally:
        con.close()


def erased_indexes(gw: GatewayProcess) -> list[int]:
    """The indexes of the gateway's own erased entries."""
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'ledger.db'}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT e.idx, e.data FROM entries e JOIN origins o ON o.id = e.origin_id WHERE o.name = ? ORDER BY e.idx",
            (gw.origin,),
        ).fetchall()
    finally:
        con.close()
    return [idx for idx, data in rows if b'"kind":"erased"' in bytes(data)]


def stored_files(gw: GatewayProcess) -> list[Path]:
    return [p for p in (gw.dir / "data" / "images").rglob("*.dcm")]


def study_records(
    gw: GatewayProcess, aet: str, out: Path, patient_id: str
) -> list[pydicom.Dataset]:
    out.mkdir(parents=True)
    result = dcmtk(
        "findscu",
        "-aet",
        aet,
        "-aec",
        gw.ae_title,
        "-S",
        "-X",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"PatientID={patient_id}",
        "-k",
        "StudyInstanceUID",
        "127.0.0.1",
        str(gw.port),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def move_study(gw: GatewayProcess, aet: str, port: int, out: Path, study_uid: str) -> str:
    out.mkdir(parents=True)
    result = dcmtk(
        "movescu",
        "-v",
        "-aet",
        aet,
        "-aec",
        gw.ae_title,
        "-aem",
        aet,
        "+P",
        str(port),
        "-od",
        str(out),
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "127.0.0.1",
        str(gw.port),
    )
    return result.stdout + result.stderr


def two_studies(tmp: Path, patient: dicomdata.FakePatient, tag: str) -> tuple[str, str, list[Path]]:
    mr_uid, ct_uid = dicomdata.fake_uid("study", tag, "mr"), dicomdata.fake_uid("study", tag, "ct")
    files = dicomdata.make_mr_series(
        tmp / f"{tag}-mr", 3, patient=patient, study_uid=mr_uid, seed=f"{tag}-mr"
    )
    files += dicomdata.make_ct_series(
        tmp / f"{tag}-ct", 2, 64, 64, patient=patient, study_uid=ct_uid, seed=f"{tag}-ct"
    )
    return mr_uid, ct_uid, files


def test_erasure_at_a_custodian_is_honoured_by_a_configured_peer_and_shown_by_another(tmp_path):
    a, b, c = consortium(tmp_path, 3)
    ws1_port = free_port()
    a.set(
        'allowed_calling_aes = ["STORESCU", "ECHOSCU"]',
        'allowed_calling_aes = ["STORESCU", "ECHOSCU", "WS1"]',
    )
    with open(a.config, "a") as f:
        f.write(
            "\n[forwarding]\nretry_initial = 0.2\nretry_max = 1.0\n"
            f'\n[[destinations]]\nae_title = "GWB"\naddress = "127.0.0.1:{b.port}"\nsite = "{b.origin}"\n'
            f'\n[[destinations]]\nae_title = "GWC"\naddress = "127.0.0.1:{c.port}"\nsite = "{c.origin}"\n'
            f'\n[[destinations]]\nae_title = "WS1"\naddress = "127.0.0.1:{ws1_port}"\n'
            '\n[[routes]]\nto = ["GWB", "GWC"]\n'
        )
    for gw in (b, c):
        gw.set(
            'allowed_calling_aes = ["STORESCU", "ECHOSCU"]',
            'allowed_calling_aes = ["STORESCU", "ECHOSCU", "GWA"]',
        )
        with open(gw.config, "a") as f:
            f.write(
                "\n[erasure]\npoll_interval = 0.3\n"
                + (f'honour_from = ["{a.origin}"]\n' if gw is b else "")
            )
    x, y = dicomdata.fake_patient("erase-x"), dicomdata.fake_patient("erase-y")
    mr_uid, ct_uid, files_x = two_studies(tmp_path, x, "x")
    files_y = dicomdata.make_mr_series(tmp_path / "y", 2, patient=y, seed="y")
    for gw in (a, b, c):
        gw.start()
    try:
        for grantee in (f"@{b.origin}", f"@{c.origin}", "WS1"):
            assert a.cli("grant", "--patient-id", x.patient_id, "--to", grantee).returncode == 0
        assert a.cli("grant", "--patient-id", y.patient_id, "--to", "WS1").returncode == 0
        assert a.storescu(*files_x, *files_y).returncode == 0
        for gw in (b, c):  # forwarded copies of X (Y has no grant to them)
            wait_until(
                lambda gw=gw: index_count(gw, x.patient_id) == 5,
                what=f"{gw.origin} to hold X's 5 copies",
            )
        assert index_count(b, y.patient_id) == 0
        assert len(study_records(a, "WS1", tmp_path / "find-before", x.patient_id)) == 2

        dry = a.cli(
            "erase", "--patient-id", x.patient_id, "--reason", "patient-request", "--dry-run"
        )
        assert dry.returncode == 0, dry.stderr
        assert (
            "would erase 5 instances" in dry.stdout
            and mr_uid in dry.stdout
            and ct_uid in dry.stdout
        ), dry.stdout
        assert index_count(a, x.patient_id) == 5 and not entries_of_kind(a, "erased")

        erased = a.cli("erase", "--patient-id", x.patient_id, "--reason", "patient-request")
        assert erased.returncode == 0, erased.stderr
        assert "erased 5 instances (5 files)" in erased.stdout, erased.stdout
        [entry] = entries_of_kind(a, "erased")
        assert (entry["instances"], entry["files"], entry["reason"], entry["study"]) == (
            5,
            5,
            "patient-request",
            None,
        )
        assert len(entry["studies"]) == 2 and entry["request"] is None

        # A: nothing of X left, Y untouched
        assert index_count(a, x.patient_id) == 0 and index_count(a, y.patient_id) == 2
        assert len(stored_files(a)) == 2
        assert study_records(a, "WS1", tmp_path / "find-after", x.patient_id) == []
        assert len(study_records(a, "WS1", tmp_path / "find-y", y.patient_id)) == 1
        moved = tmp_path / "moved"
        output = move_study(a, "WS1", ws1_port, moved, mr_uid)
        assert list(moved.iterdir()) == [], output
        assert "Received Final Move Response (Success)" in output, output
        refused = entries_of_kind(a, "retrieve-refused")
        assert (
            refused and "erased by entry" in refused[-1]["reason"] and refused[-1]["instances"] == 0
        ), refused
        found = a.cli("verify-file", str(files_x[0]))  # C still holds a copy it anchored
        assert f"also ERASED: anchored as this instance by {a.origin}" in found.stdout, found.stdout
        assert "reason patient-request" in found.stdout
        assert a.cli("verify-file", str(files_y[0])).returncode == 0
        audit = a.cli("audit", "--patient-id", x.patient_id)
        assert (
            "erased" in audit.stdout
            and "ERASED every study of the patient: 5 instances" in audit.stdout
        ), audit.stdout
        study_audit = a.cli("audit", "--study", ct_uid)
        assert "ERASED every study" in study_audit.stdout, study_audit.stdout

        # B honours A's erasure (its copies of A's instances) with its own entry citing A's
        wait_until(lambda: index_count(b, x.patient_id) == 0, what="B to erase its copies")
        wait_until(lambda: entries_of_kind(b, "erased") != [], what="B's erased entry")
        [b_entry] = entries_of_kind(b, "erased")
        assert b_entry["reason"] == "custodian-erasure" and b_entry["instances"] == 5
        assert b_entry["request"] == {"origin": a.origin, "index": erased_indexes(a)[0]}, b_entry
        found_b = b.cli("verify-file", str(files_x[1]))
        assert f"also ERASED: anchored as this instance by {b.origin}" in found_b.stdout, (
            found_b.stdout
        )
        assert f"applying the erasure {a.origin} entry {erased_indexes(a)[0]}" in found_b.stdout
        assert "honoured" not in b.cli("status").stdout  # B shows no pending request
        assert "erasures of other gateways applied here: 1" in b.cli("status").stdout

        # C is not configured to honour A: keeps its copies and shows the request
        wait_until(
            lambda: "NOT applied here" in c.cli("status").stdout, what="C to show A's request"
        )
        status = c.cli("status").stdout
        assert f"{a.origin} entry" in status and "5 copies held here" in status, status
        assert index_count(c, x.patient_id) == 5 and not entries_of_kind(c, "erased")
        found_c = c.cli("verify-file", str(files_x[0]))
        assert found_c.returncode == 0 and "also ERASED" in found_c.stdout, found_c.stdout
        # C's administrator applies it by hand: the request is resolved
        assert (
            c.cli("erase", "--patient-id", x.patient_id, "--reason", "custodian-erasure").returncode
            == 0
        )
        wait_until(
            lambda: "NOT applied here" not in c.cli("status").stdout,
            what="C's request to be resolved",
        )
        # now every gateway that anchored the image has erased it
        wait_until(
            lambda: a.cli("verify-file", str(files_x[0])).returncode == 5,
            what="A to hold C's erasure",
        )
        found = a.cli("verify-file", str(files_x[0]))
        assert found.stdout.startswith("ERASED: this pixel data was anchored"), found.stdout
        assert found.stdout.count("ERASED") == 3, found.stdout
        wait_until(
            lambda: b.cli("verify-file", str(files_x[1])).returncode == 5,
            what="B to hold C's erasure",
        )
    finally:
        for gw in (a, b, c):
            gw.stop()
    for gw in (a, b, c):
        verified = gw.cli("verify")
        assert verified.returncode == 0, verified.stdout
        assert files_holding(gw.dir / "data", phi_of(x)) == [], gw.origin
        assert files_holding(gw.dir, [x.patient_id.encode(), x.name.encode()]) == []  # the log too
    assert files_holding(a.dir / "data", [y.patient_id.encode()]) != []  # the search does find PHI


def test_erase_one_study_keeps_the_other(tmp_path, gateway):
    x = dicomdata.fake_patient("erase-study")
    mr_uid, ct_uid, files = two_studies(tmp_path, x, "study")
    # the two studies get their own accession numbers, so the CT's must go and the MR's stay
    for path in files:
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = "ACCMR0001" if ds.StudyInstanceUID == mr_uid else "ACCCT0002"
        ds.save_as(path)
    assert gateway.storescu(*files).returncode == 0
    result = gateway.cli(
        "erase", "--patient-id", x.patient_id, "--study", ct_uid, "--reason", "unlawful-processing"
    )
    assert result.returncode == 0, result.stderr
    assert "erased 2 instances (2 files)" in result.stdout, result.stdout
    [entry] = entries_of_kind(gateway, "erased")
    assert (
        entry["study"] is not None
        and len(entry["studies"]) == 1
        and entry["reason"] == "unlawful-processing"
    )
    assert index_count(gateway, x.patient_id) == 3
    assert (
        gateway.cli("verify-file", str(files[0])).returncode == 0
    )  # an MR image: still anchored and held
    assert gateway.cli("verify-file", str(files[-1])).returncode == 5  # a CT image: erased
    again = gateway.cli(
        "erase", "--patient-id", x.patient_id, "--study", ct_uid, "--reason", "patient-request"
    )
    assert again.returncode == 1 and "nothing of this patient in this study" in again.stderr, (
        again.stderr
    )
    bad = gateway.cli("erase", "--patient-id", x.patient_id, "--reason", "because I said so")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    gateway.stop()
    down = gateway.cli("erase", "--patient-id", x.patient_id, "--reason", "patient-request")
    assert down.returncode == 2 and "not running" in down.stderr, (
        down.stderr
    )  # the gateway erases, or nobody
    assert index_count(gateway, x.patient_id) == 3
    data = gateway.dir / "data"
    assert files_holding(data, [b"ACCCT0002"]) == []
    assert files_holding(data, [b"ACCMR0001", x.patient_id.encode()]) != []  # the MR study stays
    assert gateway.cli("verify").returncode == 0


def erase_and_kill_at(gw: GatewayProcess, patient: dicomdata.FakePatient, line: bytes) -> None:
    """Run `erase` and kill -9 the gateway as soon as its log shows ``line``."""
    offset = gw.log_path.stat().st_size
    erase = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dicomledger.cli",
            "erase",
            "--config",
            str(gw.config),
            "--patient-id",
            patient.patient_id,
            "--reason",
            "patient-request",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while line not in gw.log_path.read_bytes()[offset:]:
        assert time.monotonic() < deadline, gw.log()[-2000:]
        time.sleep(0.001)
    gw.kill()
    erase.communicate(timeout=30)


def test_kill_9_during_an_erasure_leaves_a_consistent_state(tmp_path):
    """The gateway is killed during two erasures: once right after the erased entry is
    durable (nothing removed yet), once right after the rows left the index (files not yet
    removed). Each restart finishes the erasure: one erased entry per patient, none of its rows
    or files (leftover files are not taken back into the index), the other patient intact,
    the ledger valid."""
    gw = GatewayProcess(tmp_path / "gw")
    x, z, y = (dicomdata.fake_patient(f"kill-{t}") for t in "xzy")
    files_x = dicomdata.make_mr_series(tmp_path / "x", 200, 16, 16, patient=x, seed="kill-x")
    files_z = dicomdata.make_mr_series(tmp_path / "z", 200, 16, 16, patient=z, seed="kill-z")
    files_y = dicomdata.make_mr_series(tmp_path / "y", 3, patient=y, seed="kill-y")
    kept = sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files_y)
    gw.start()
    try:
        assert gw.storescu(*files_x, *files_z, *files_y).returncode == 0

        erase_and_kill_at(gw, x, b'"erasure recorded"')
        rows_left = index_count(
            gw, x.patient_id
        )  # 200 unless the rows went within the kill's millisecond
        gw.start()
        if rows_left:
            assert "erasure completed" in gw.log()
        assert len(erased_indexes(gw)) == 1 and index_count(gw, x.patient_id) == 0

        erase_and_kill_at(gw, z, b'"erased instances are out of the index')
        assert index_count(gw, z.patient_id) == 0
        leftover = len(stored_files(gw)) - 3
        gw.start()
        if leftover:  # killed while the files went
            assert "removed the files of an erasure interrupted by a crash" in gw.log()
        assert (
            "index row rebuilt" not in gw.log()
        )  # leftover files were not taken back into the index

        assert len(erased_indexes(gw)) == 2
        assert index_count(gw, x.patient_id) == index_count(gw, z.patient_id) == 0
        assert index_count(gw, y.patient_id) == 3
        assert sorted(".".join(p.name.split(".")[:-2]) for p in stored_files(gw)) == kept
        assert gw.cli("verify-file", str(files_x[0])).returncode == 5
        assert gw.cli("verify-file", str(files_z[-1])).returncode == 5
    finally:
        gw.stop()
    assert gw.cli("verify").returncode == 0
    assert files_holding(gw.dir / "data", phi_of(x) + phi_of(z)) == []


def test_audit_messages_already_sent_leave_no_trace_of_an_erased_patient(tmp_path):
    """With the ATNA trail on, the audit queue (data/atna.db) held messages naming the patient;
    once they are sent, an erasure leaves nothing of them in that file or its WAL."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the audit repository, over UDP
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(30)
    gw = GatewayProcess(tmp_path / "gw")
    with open(gw.config, "a") as f:
        f.write(
            f'\n[atna]\nenabled = true\nrepository = "127.0.0.1:{receiver.getsockname()[1]}"\n'
            'transport = "udp"\ntransfer_window = 0.2\n'
        )
    x, y = dicomdata.fake_patient("atna-x"), dicomdata.fake_patient("atna-y")
    gw.start()
    try:
        assert (
            gw.storescu(
                *dicomdata.make_mr_series(tmp_path / "x", 3, patient=x, seed="atna-x"),
                *dicomdata.make_mr_series(tmp_path / "y", 2, patient=y, seed="atna-y"),
            ).returncode
            == 0
        )
        while x.patient_id.encode() not in receiver.recv(65536):
            pass  # the repository got the message naming X

        def queue_empty() -> bool:
            con = sqlite3.connect(gw.dir / "data" / "atna.db")
            try:
                return (
                    con.execute(
                        "SELECT (SELECT COUNT(*) FROM messages) + (SELECT COUNT(*) FROM pending)"
                    ).fetchone()[0]
                    == 0
                )
            finally:
                con.close()

        wait_until(queue_empty, what="the audit queue to be sent")
        assert (
            files_holding(gw.dir / "data", [x.patient_id.encode()]) != []
        )  # still in the queue's files
        assert (
            gw.cli("erase", "--patient-id", x.patient_id, "--reason", "patient-request").returncode
            == 0
        )
        assert files_holding(gw.dir / "data", phi_of(x)) == []
    finally:
        gw.stop()
        receiver.close()


def pending_jobs(gw: GatewayProcess) -> list[dict]:
    listed = gw.cli("queue", "--json", "--limit", "1000")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)["jobs"]


def test_erasure_cancels_the_patients_pending_forwards(tmp_path):
    pacs_port = free_port()
    gw = forwarding_gateway(tmp_path, pacs_port)  # the PACS is down: nobody listens on its port yet
    x, y = dicomdata.fake_patient("erase-fw-x"), dicomdata.fake_patient("erase-fw-y")
    files_x = dicomdata.make_mr_series(tmp_path / "x", 3, patient=x, seed="erase-fw-x")
    files_y = dicomdata.make_mr_series(tmp_path / "y", 2, patient=y, seed="erase-fw-y")
    uids = {
        p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in [*files_x, *files_y]
    }
    received = tmp_path / "pacs"
    received.mkdir()
    storescp = None
    gw.start()
    try:
        for patient in (x, y):
            assert (
                gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS").returncode == 0
            )
        assert gw.storescu(*files_x, *files_y).returncode == 0
        wait_until(
            lambda: gw.log().count("forward failed; will retry") >= 5,
            what="every forward to fail once",
        )
        assert {j["sop_instance_uid"] for j in pending_jobs(gw)} == set(uids.values())

        erased = gw.cli("erase", "--patient-id", x.patient_id, "--reason", "patient-request")
        assert erased.returncode == 0, erased.stderr
        [entry] = entries_of_kind(gw, "erased")
        assert (entry["instances"], entry["forward_jobs"]) == (3, 3), entry
        assert {j["sop_instance_uid"] for j in pending_jobs(gw)} == {uids[p] for p in files_y}

        log = open(tmp_path / "storescp.log", "w")  # the PACS comes up
        storescp = subprocess.Popen(
            ["storescp", "-v", "-aet", "PACS", "-od", str(received), "+uf", str(pacs_port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
        )
        wait_until(lambda: len(entries_of_kind(gw, "forwarded")) == 2, what="Y's 2 forwards")
        time.sleep(2)  # two more retry intervals (retry_max = 1 s): nothing of X follows
        sent = {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in received.iterdir()
        }
        assert sent == {uids[p] for p in files_y}
        assert len(entries_of_kind(gw, "forwarded")) == 2 and pending_jobs(gw) == []
    finally:
        gw.stop()
        if storescp is not None:
            storescp.terminate()
            storescp.wait(timeout=10)
    assert files_holding(received, [x.patient_id.encode(), x.name.encode()]) == []
    assert gw.cli("verify").returncode == 0
