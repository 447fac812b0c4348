"""prove / check-proof / verify / status / audit from the command line, against a gateway that
anchored real images; each failure is one line and an exit code, never a traceback."""

import json
import shutil
import sqlite3
import subprocess
import sys

import pytest

from tests import dicomdata
from tests.conftest import ROOT, GatewayProcess, dicomledger, free_port

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


@pytest.fixture(scope="module")
def anchored(tmp_path_factory) -> GatewayProcess:
    tmp = tmp_path_factory.mktemp("cli")
    gw = GatewayProcess(tmp / "gw")
    gw.start()
    files = dicomdata.make_mr_series(tmp / "mr", 5)
    assert gw.storescu(*files).returncode == 0
    gw.stop()  # a clean stop signs a final checkpoint
    return gw


def test_prove_and_check_offline(anchored, tmp_path):
    proof = tmp_path / "e3.proof"
    result = anchored.cli("prove", "--entry", "3", "-o", str(proof))
    assert result.returncode == 0, result.stderr
    assert proof.read_text().startswith("c2sp.org/tlog-proof@v1\n")
    check = dicomledger("check-proof", str(proof), "--trust", str(anchored.dir / "trust.txt"))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "VALID: image-anchored entry 3 of gateway.test/dicomledger" in check.stdout
    assert "checkpoint of size 5" in check.stdout


def test_mutated_proofs_fail_and_say_why(anchored, tmp_path):
    proof = tmp_path / "e1.proof"
    assert anchored.cli("prove", "--entry", "1", "-o", str(proof)).returncode == 0
    lines = proof.read_text().split("\n")
    trust = str(anchored.dir / "trust.txt")

    def check(text: str) -> str:
        bad = tmp_path / "bad.proof"
        bad.write_text(text)
        result = dicomledger("check-proof", str(bad), "--trust", trust)
        assert result.returncode == 1, result.stdout
        return result.stdout

    hash_line = 3  # magic, extra, index, first proof hash
    flipped = (
        lines[hash_line][:5] + ("A" if lines[hash_line][5] != "A" else "B") + lines[hash_line][6:]
    )
    assert "INVALID" in check("\n".join(lines[:hash_line] + [flipped] + lines[hash_line + 1 :]))
    assert "INVALID" in check("\n".join([lines[0], lines[1], "index 2", *lines[3:]]))
    root_line = next(
        i for i, line in enumerate(lines) if line.endswith("=") and i > 4 and len(line) == 44
    )
    other_root = lines[root_line][:-3] + ("AA=" if lines[root_line][-3:] != "AA=" else "BB=")
    assert "INVALID" in check("\n".join(lines[:root_line] + [other_root] + lines[root_line + 1 :]))
    assert "INVALID" in check(proof.read_text().replace("extra ", "extra AAAA", 1))


def test_check_proof_with_a_foreign_trust_file_fails(anchored, tmp_path):
    proof = tmp_path / "e0.proof"
    assert anchored.cli("prove", "--entry", "0", "-o", str(proof)).returncode == 0
    assert (
        dicomledger(
            "init", "--dir", str(tmp_path / "other"), "--origin", "gateway.test/dicomledger"
        ).returncode
        == 0
    )
    result = dicomledger(
        "check-proof", str(proof), "--trust", str(tmp_path / "other" / "trust.txt")
    )
    assert result.returncode == 1 and "INVALID" in result.stdout


def test_prove_unknown_entry_is_a_clear_error(anchored, tmp_path):
    result = anchored.cli("prove", "--entry", "99", "-o", str(tmp_path / "x"))
    assert result.returncode == 1 and "there is no entry 99" in result.stderr


def test_check_proof_json_prints_one_json_document(anchored, tmp_path):
    proof = tmp_path / "e2.proof"
    assert anchored.cli("prove", "--entry", "2", "-o", str(proof)).returncode == 0
    trust = str(anchored.dir / "trust.txt")
    check = dicomledger("check-proof", str(proof), "--trust", trust, "--json")
    assert check.returncode == 0, check.stderr
    verdict = json.loads(check.stdout)  # nothing before or after the JSON
    assert verdict["valid"] is True and verdict["kind"] == "image-anchored"
    assert verdict["origin"] == anchored.origin and verdict["index"] == 2
    assert verdict["checkpoint"]["size"] == 5 and verdict["entry"]["index"] == 2
    bad = tmp_path / "bad.proof"
    bad.write_text(proof.read_text().replace("index 2", "index 3", 1))
    invalid = dicomledger("check-proof", str(bad), "--trust", trust, "--json")
    assert invalid.returncode == 1
    assert json.loads(invalid.stdout)["valid"] is False


def copy_of(gw: GatewayProcess, tmp_path) -> GatewayProcess:
    """A stopped copy of a gateway's directory (its config uses relative paths)."""
    copy = object.__new__(GatewayProcess)
    copy.__dict__.update(gw.__dict__)
    copy.dir = tmp_path / "copy"
    shutil.copytree(gw.dir, copy.dir)
    copy.config = copy.dir / "config.toml"
    return copy


def assert_one_line(result, *needles: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("dicomledger: ") and result.stderr.count("\n") == 1, (
        result.stderr
    )
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_a_broken_ledger_database_is_one_line_in_every_command(anchored, tmp_path):
    gw = copy_of(anchored, tmp_path)
    ledger = gw.dir / "data" / "ledger.db"
    ledger.write_bytes(b"not an SQLite database; " * 1000)
    for command in (
        ("status",),
        ("peers",),
        ("prove", "--entry", "1", "-o", str(tmp_path / "p")),
        ("audit", "--patient-id", "P-1"),
        ("verify",),
    ):
        assert_one_line(gw.cli(*command), str(ledger))


def test_a_broken_index_database_is_one_line_in_status(anchored, tmp_path):
    gw = copy_of(anchored, tmp_path)
    index = gw.dir / "data" / "index.db"
    index.write_bytes(b"\x00garbage" * 1000)
    assert_one_line(gw.cli("status"), str(index))


def test_audit_into_a_closed_pipe_stops_quietly(anchored):
    """`dicomledger audit | head`: the reader goes away before the report is written."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dicomledger.cli",
            "audit",
            "--config",
            str(anchored.config),
            "--patient-id",
            dicomdata.fake_patient(0).patient_id,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    proc.stdout.close()  # like `head` that has read its lines and exited
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, stderr
    assert stderr == ""


def test_status_says_whether_the_gateway_runs(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    never = gw.cli("status")
    assert never.returncode == 0, never.stderr
    assert "NOT RUNNING" in never.stdout and "has never run" in never.stdout
    assert not (gw.dir / "data" / "ledger.db").exists()  # status created nothing
    gw.start()
    try:
        assert gw.storescu(*dicomdata.make_mr_series(tmp_path / "mr", 2)).returncode == 0
        up = gw.cli("status").stdout
    finally:
        gw.stop()
    down = gw.cli("status").stdout
    head = f"gateway GATEWAY on 127.0.0.1:{gw.port}"
    assert f"{head}: running (process {gw.proc.pid})" in up, up
    assert f"{head}: NOT RUNNING" in down, down
    assert "stored instances: 2" in up and "stored instances: 2" in down


def test_status_counts_forwards_and_refusals_as_the_ledger_records_them(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    with open(gw.config, "a") as f:  # a destination nobody granted: every forward is refused
        f.write(
            f'\n[[destinations]]\nae_title = "PACS"\naddress = "127.0.0.1:{free_port()}"\n'
            '\n[[routes]]\nto = ["PACS"]\n'
        )
    gw.start()
    try:
        assert gw.storescu(*dicomdata.make_mr_series(tmp_path / "mr", 4)).returncode == 0
    finally:
        gw.stop()
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'ledger.db'}?mode=ro", uri=True)
    refused = sum(
        b'"kind":"forward-refused"' in bytes(row[0])
        for row in con.execute("SELECT data FROM entries")
    )
    con.close()
    assert refused == 4
    status = gw.cli("status").stdout
    assert "forwarding to PACS at 127.0.0.1:" in status
    assert "0 queued, 0 done, 4 refused, 0 failed" in status, status


def test_verify_cli_passes_then_names_a_tampered_entry(anchored, tmp_path):
    ok = anchored.cli("verify")
    assert ok.returncode == 0 and "5 entries" in ok.stdout
    db = anchored.dir / "data" / "ledger.db"
    con = sqlite3.connect(db)
    (data,) = con.execute("SELECT data FROM entries WHERE idx = 2").fetchone()
    con.execute(
        "UPDATE entries SET data = ? WHERE idx = 2",
        (bytes(data).replace(b'"frames":1', b'"frames":2'),),
    )
    con.commit()
    con.close()
    bad = anchored.cli("verify")
    assert bad.returncode == 1
    assert "FAILED: gateway.test/dicomledger: entry 2:" in bad.stdout
