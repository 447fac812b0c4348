"""prove / check-proof / verify from the command line, against a gateway that anchored real images."""

import sqlite3

import pytest

from tests import dicomdata
from tests.conftest import GatewayProcess, dicomledger


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
    flipped = lines[hash_line][:5] + ("A" if lines[hash_line][5] != "A" else "B") + lines[hash_line][6:]
    assert "INVALID" in check("\n".join(lines[:hash_line] + [flipped] + lines[hash_line + 1:]))
    assert "INVALID" in check("\n".join([lines[0], lines[1], "index 2", *lines[3:]]))
    root_line = next(i for i, line in enumerate(lines) if line.endswith("=") and i > 4 and len(line) == 44)
    other_root = lines[root_line][:-3] + ("AA=" if lines[root_line][-3:] != "AA=" else "BB=")
    assert "INVALID" in check("\n".join(lines[:root_line] + [other_root] + lines[root_line + 1:]))
    assert "INVALID" in check(proof.read_text().replace("extra ", "extra AAAA", 1))


def test_check_proof_with_a_foreign_trust_file_fails(anchored, tmp_path):
    proof = tmp_path / "e0.proof"
    assert anchored.cli("prove", "--entry", "0", "-o", str(proof)).returncode == 0
    assert dicomledger("init", "--dir", str(tmp_path / "other"), "--origin", "gateway.test/dicomledger").returncode == 0
    result = dicomledger("check-proof", str(proof), "--trust", str(tmp_path / "other" / "trust.txt"))
    assert result.returncode == 1 and "INVALID" in result.stdout


def test_prove_unknown_entry_is_a_clear_error(anchored, tmp_path):
    result = anchored.cli("prove", "--entry", "99", "-o", str(tmp_path / "x"))
    assert result.returncode == 1 and "there is no entry 99" in result.stderr


def test_verify_cli_passes_then_names_a_tampered_entry(anchored, tmp_path):
    ok = anchored.cli("verify")
    assert ok.returncode == 0 and "5 entries" in ok.stdout
    db = anchored.dir / "data" / "ledger.db"
    con = sqlite3.connect(db)
    (data,) = con.execute("SELECT data FROM entries WHERE idx = 2").fetchone()
    con.execute("UPDATE entries SET data = ? WHERE idx = 2", (bytes(data).replace(b'"frames":1', b'"frames":2'),))
    con.commit()
    con.close()
    bad = anchored.cli("verify")
    assert bad.returncode == 1
    assert "FAILED: gateway.test/dicomledger: entry 2:" in bad.stdout
