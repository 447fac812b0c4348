"""The auditor's `dicomledger verify --ledger --trust` and witness policies in `check-proof`,
against real gateway processes on loopback that replicate and cosign each other's logs."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dicomledger.ledger.note import SIG_COSIGNATURE_V1, format_note, parse_note, verifier_key
from dicomledger.ledger.verify import ProgressLine, VerifyReport
from tests import dicomdata
from tests.conftest import ROOT, GatewayProcess, consortium, dicomledger

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

SUMMARY = re.compile(r"^verified \d+ entries of \d+ log\(s\) in \d+\.\d s \([\d,]+ entries/s\)$")


def ledger_path(gw: GatewayProcess) -> Path:
    return gw.dir / "data" / "ledger.db"


def newest_checkpoint(path: Path, origin: str) -> tuple[int, bytes] | None:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = con.execute(
            "SELECT c.size, c.note FROM checkpoints c JOIN origins o ON o.id = c.origin_id "
            "WHERE o.name = ? ORDER BY c.size DESC LIMIT 1",
            (origin,),
        ).fetchone()
    finally:
        con.close()
    return None if row is None else (row[0], bytes(row[1]))


def wait_until(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def witness_vkey(gw: GatewayProcess) -> str:
    """The cosigner vkey a gateway's trust.txt offers for other gateways' policies."""
    line = next(
        ln
        for ln in (gw.dir / "trust.txt").read_text().splitlines()
        if ln.startswith("# witness this-gateway ")
    )
    return line.split()[-1]


class Consortium:
    def __init__(self, tmp: Path, a: GatewayProcess, b: GatewayProcess, c: GatewayProcess) -> None:
        self.tmp, self.a, self.b, self.c = tmp, a, b, c
        self.d_key = Ed25519PrivateKey.generate()  # a witness that never cosigns

    def trust(self, policy: str = "", name: str = "trust.txt") -> Path:
        """An auditor's trust file: the three gateways' vkeys (line 2 of their trust.txt) and a policy."""
        path = self.tmp / name
        path.write_text("".join(gw.vkey + "\n" for gw in (self.a, self.b, self.c)) + policy)
        return path

    def policy(self, quorum: str, *, d: bool = False) -> str:
        lines = [f"witness B {witness_vkey(self.b)}", f"witness C {witness_vkey(self.c)}"]
        if d:
            lines.append(
                f"witness D {verifier_key('d.test/dicomledger', self.d_key.public_key(), SIG_COSIGNATURE_V1)}"
            )
        return "\n".join([*lines, quorum, ""])


@pytest.fixture(scope="module")
def cosigned(tmp_path_factory) -> Consortium:
    """A's log of 5 entries, its checkpoint cosigned by B and C; all three stopped."""
    tmp = tmp_path_factory.mktemp("auditor")
    a, b, c = consortium(tmp, 3)
    for gw in (a, b, c):
        gw.start()
    try:
        assert a.storescu(*dicomdata.make_mr_series(tmp / "mr", 5)).returncode == 0

        def cosigners() -> set[str]:
            held = newest_checkpoint(ledger_path(a), a.origin)
            if held is None or held[0] != 5:
                return set()
            return {s.name for s in parse_note(held[1]).signatures} - {a.origin}

        wait_until(
            lambda: cosigners() == {b.origin, c.origin},
            what="B's and C's cosignatures on A's checkpoint",
        )
    finally:
        for gw in (a, b, c):
            gw.stop()
    return Consortium(tmp, a, b, c)


def verify(*args: str) -> tuple[int, str, str]:
    result = dicomledger("verify", *args)
    return result.returncode, result.stdout, result.stderr


def test_auditor_verifies_a_copy_with_public_keys_only(cosigned, tmp_path):
    a, b, c = cosigned.a, cosigned.b, cosigned.c
    copy = tmp_path / "given-to-the-auditor.db"
    shutil.copy(ledger_path(a), copy)
    before = hashlib.sha256(copy.read_bytes()).hexdigest()
    trust = cosigned.trust(cosigned.policy("group consortium 2 B C\nquorum consortium"))
    code, out, err = verify("--ledger", str(copy), "--trust", str(trust))
    assert code == 0, out + err
    assert f"{a.origin}: 5 entries" in out
    assert (
        f"cosigned by {b.origin}, {c.origin}; witness quorum met (group consortium: 2 of {{B, C}})"
        in out
    )
    assert out.splitlines()[-1].startswith("OK: ")
    assert {line.split(":")[0] for line in out.splitlines()[:-1]} == {a.origin, b.origin, c.origin}
    assert SUMMARY.match(err.strip()), err  # not a terminal: one summary line, no progress
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == before  # read-only
    code, out, _ = verify("--ledger", str(copy), "--trust", str(trust), "--origin", a.origin)
    assert code == 0 and len(out.splitlines()) == 2, out


def test_checkpoint_below_the_quorum_fails_naming_the_missing_witness(cosigned):
    a = cosigned.a
    trust = cosigned.trust(cosigned.policy("group consortium all B C D\nquorum consortium", d=True))
    code, out, _ = verify(
        "--ledger", str(ledger_path(a)), "--trust", str(trust), "--origin", a.origin
    )
    assert code == 1
    assert out.splitlines()[-1] == (
        f"FAILED: {a.origin}: checkpoint at size 5: newest checkpoint is below the witness quorum: "
        "group consortium needs 3 of {B, C, D} and has 2 (B, C); missing cosignatures from D (d.test/dicomledger)"
    )
    # 2 of the same three is met by B and C
    trust = cosigned.trust(
        cosigned.policy("group consortium 2 B C D\nquorum consortium", d=True), "two.txt"
    )
    assert (
        verify("--ledger", str(ledger_path(a)), "--trust", str(trust), "--origin", a.origin)[0] == 0
    )


def test_check_proof_under_a_policy(cosigned, tmp_path):
    a, b, c = cosigned.a, cosigned.b, cosigned.c
    proof = tmp_path / "e3.proof"
    assert a.cli("prove", "--entry", "3", "-o", str(proof)).returncode == 0
    policy = tmp_path / "policy.txt"  # a separate C2SP tlog-policy file beside the trust file
    policy.write_text(
        f"log {a.vkey}\n" + cosigned.policy("group consortium 2 B C D\nquorum consortium", d=True)
    )
    trust = cosigned.trust()

    def check(proof_file: Path, policy_file: Path = policy) -> tuple[int, str]:
        result = dicomledger(
            "check-proof", str(proof_file), "--trust", str(trust), "--policy", str(policy_file)
        )
        return result.returncode, result.stdout + result.stderr

    code, out = check(proof)
    assert code == 0, out
    assert (
        "VALID: image-anchored entry 3" in out
        and "witness quorum met: group consortium: 2 of {B, C, D}" in out
    )

    # the same proof without C's cosignature is below the quorum
    note_at = proof.read_bytes().index(b"\n\n") + 2
    head, note = proof.read_bytes()[:note_at], parse_note(proof.read_bytes()[note_at:])
    without_c = tmp_path / "without-c.proof"
    without_c.write_bytes(
        head
        + format_note(
            type(note)(note.text, tuple(s for s in note.signatures if s.name != c.origin))
        )
    )
    code, out = check(without_c)
    assert code == 1
    assert out.strip() == (
        "INVALID: checkpoint of size 5 is below the witness quorum: group consortium needs 2 of {B, C, D} "
        f"and has 1 (B); missing cosignatures from C ({c.origin}), D (d.test/dicomledger)"
    )
    # B's cosignature with one bit flipped
    damaged = tmp_path / "damaged.proof"
    sigs = tuple(
        s
        if s.name != b.origin
        else type(s)(s.name, s.key_id, s.data[:-1] + bytes([s.data[-1] ^ 1]))
        for s in note.signatures
    )
    damaged.write_bytes(head + format_note(type(note)(note.text, sigs)))
    code, out = check(damaged)
    assert code == 1 and out.strip() == f"INVALID: cosignature by {b.origin} does not verify"
    # the same proof passes without a policy: cosignatures are listed, not required
    plain = dicomledger("check-proof", str(without_c), "--trust", str(trust))
    assert plain.returncode == 0 and "witness quorum" not in plain.stdout


def test_mutated_policies_are_refused_with_the_reason(cosigned, tmp_path):
    a, b = cosigned.a, cosigned.b
    proof = tmp_path / "e0.proof"
    assert a.cli("prove", "--entry", "0", "-o", str(proof)).returncode == 0
    cases = {
        # B's log key (type 0x01, line 2 of its trust.txt) where its cosigner key belongs
        cosigned.policy("quorum B").replace(
            witness_vkey(b), b.vkey
        ): f"witness vkey {b.origin} has key type 0x01",
        cosigned.policy("group g 3 B C\nquorum g"): "threshold 3 of group g is outside 1..2",
        cosigned.policy(
            "quorum consortium"
        ): "quorum 'consortium' is not defined on an earlier line",
        cosigned.policy(
            "group g any B C\nquorum g\nquorum B"
        ): "a policy has exactly one quorum line",
    }
    for n, (policy, reason) in enumerate(cases.items()):
        trust = cosigned.trust(policy, f"bad{n}.txt")
        result = dicomledger("check-proof", str(proof), "--trust", str(trust))
        assert (
            result.returncode == 1
            and result.stdout.startswith("INVALID: ")
            and reason in result.stdout
        ), result.stdout
        if (
            n == 0
        ):  # verify reads trust files with the same code: one case shows its exit code and line
            code, out, err = verify("--ledger", str(ledger_path(a)), "--trust", str(trust))
            assert code == 2 and reason in err and re.search(r"trust line \d+: ", err), err


def test_tampered_copies_name_the_first_bad_place(cosigned, tmp_path):
    a, b = cosigned.a, cosigned.b
    trust = cosigned.trust(cosigned.policy("group consortium 2 B C\nquorum consortium"))

    def tampered(name: str, sql: str, *params) -> Path:
        path = tmp_path / name
        shutil.copy(ledger_path(a), path)
        con = sqlite3.connect(path)
        con.execute(sql, params)
        con.commit()
        con.close()
        return path

    con = sqlite3.connect(f"file:{ledger_path(a)}?mode=ro", uri=True)
    (oid,) = con.execute("SELECT id FROM origins WHERE name = ?", (a.origin,)).fetchone()
    (data,) = con.execute(
        "SELECT data FROM entries WHERE origin_id = ? AND idx = 2", (oid,)
    ).fetchone()
    con.close()
    body = tampered(
        "body.db",
        "UPDATE entries SET data = ? WHERE origin_id = ? AND idx = 2",
        bytes(data).replace(b'"frames":1', b'"frames":2'),
        oid,
    )
    code, out, _ = verify("--ledger", str(body), "--trust", str(trust))
    assert code == 1 and out.splitlines()[-1].startswith(
        f"FAILED: {a.origin}: entry 2: signature of"
    ), out

    size, note = newest_checkpoint(ledger_path(a), a.origin)
    parsed = parse_note(note)
    sigs = tuple(
        s
        if s.name != b.origin
        else type(s)(s.name, s.key_id, s.data[:-1] + bytes([s.data[-1] ^ 1]))
        for s in parsed.signatures
    )
    cosig = tampered(
        "cosig.db",
        "UPDATE checkpoints SET note = ? WHERE origin_id = ? AND size = ?",
        format_note(type(parsed)(parsed.text, sigs)),
        oid,
        size,
    )
    code, out, _ = verify("--ledger", str(cosig), "--trust", str(trust))
    assert (
        out.splitlines()[-1]
        == f"FAILED: {a.origin}: checkpoint at size 5: cosignature by {b.origin} does not verify"
    )
    assert code == 1


def test_every_origin_needs_a_trusted_key(cosigned, tmp_path):
    a, b = cosigned.a, cosigned.b
    only_a = tmp_path / "only-a.txt"
    only_a.write_text(a.vkey + "\n")
    code, out, _ = verify("--ledger", str(ledger_path(a)), "--trust", str(only_a))
    assert (
        code == 1
        and out.splitlines()[-1]
        == f"FAILED: {b.origin}: origin key: the trust file has no key for this origin (add its vkey, or check others with --origin)"
    )
    assert (
        verify("--ledger", str(ledger_path(a)), "--trust", str(only_a), "--origin", a.origin)[0]
        == 0
    )
    wrong = tmp_path / "wrong.txt"  # A's name with another key
    assert (
        dicomledger("init", "--dir", str(tmp_path / "impostor"), "--origin", a.origin).returncode
        == 0
    )
    shutil.copy(tmp_path / "impostor" / "trust.txt", wrong)
    code, out, _ = verify(
        "--ledger", str(ledger_path(a)), "--trust", str(wrong), "--origin", a.origin
    )
    assert code == 1 and out.splitlines()[-1] == (
        f"FAILED: {a.origin}: origin key: stored public key differs from the trusted key"
    )


def test_usage_errors(cosigned, tmp_path):
    a = cosigned.a
    trust = cosigned.trust()
    assert verify()[0] == 2
    assert verify("--ledger", str(ledger_path(a)))[0] == 2
    code, _, err = verify("--ledger", str(tmp_path / "none.db"), "--trust", str(trust))
    assert code == 2 and "does not exist" in err
    code, out, _ = verify(
        "--ledger", str(ledger_path(a)), "--trust", str(trust), "--origin", "nobody.test"
    )
    assert (
        code == 1
        and out.splitlines()[-1]
        == "FAILED: nobody.test: origin: the ledger holds no log for this origin"
    )
    not_a_db = tmp_path / "not.db"
    not_a_db.write_bytes(b"not a database" * 100)
    code, out, err = verify("--ledger", str(not_a_db), "--trust", str(trust))
    assert (
        code == 1
        and err.startswith(f"dicomledger: cannot read ledger database {not_a_db}: ")
        and err.count("\n") == 1
    )
    assert a.cli("verify", "--trust", str(trust)).returncode == 2  # --config and --trust do not mix


def test_verify_on_the_live_file_and_on_a_copy_while_the_gateway_stores(gateway, tmp_path):
    """Three rounds of storescu sending 40 images; during each, verify the live database and a
    copy taken with SQLite's online backup, both while the gateway runs and appends."""
    files = dicomdata.make_mr_series(tmp_path / "mr", 120)
    live = ledger_path(gateway)
    trust = gateway.dir / "trust.txt"
    for start in range(0, 120, 40):
        sender = gateway.storescu_in_background(
            files[start : start + 40], tmp_path / f"storescu{start}.log"
        )
        try:
            code, out, err = verify("--ledger", str(live), "--trust", str(trust))
            assert code == 0, out + err
            copy = tmp_path / "copy.db"
            source, target = (
                sqlite3.connect(f"file:{live}?mode=ro", uri=True),
                sqlite3.connect(copy),
            )
            source.backup(target)  # a consistent copy of a live database
            source.close()
            target.close()
            code, out, err = verify("--ledger", str(copy), "--trust", str(trust))
            assert code == 0, out + err
            copy.unlink()
        finally:
            assert sender.wait(timeout=120) == 0
    assert (
        f"{gateway.origin}: 120 entries" in verify("--ledger", str(live), "--trust", str(trust))[1]
    )


def test_progress_on_a_terminal_shows_rate_and_time_left():
    stream = io.StringIO()
    progress = ProgressLine(stream, interactive=True)
    progress.start -= 2.0  # two seconds in
    progress(50_000, 200_000)
    shown = stream.getvalue()
    assert re.search(
        r"\rverifying: 50,000 of 200,000 entries, [\d,]+ entries/s, \d+ s left", shown
    ), shown
    progress(60_000, 200_000)  # redrawn at most twice a second
    assert stream.getvalue() == shown
    progress.finish(VerifyReport((), None))
    assert stream.getvalue().endswith(
        "\r\033[Kverified 0 entries of 0 log(s) in 2.0 s (0 entries/s)\n"
    )


def test_a_copy_on_read_only_media(cosigned, tmp_path):
    """An auditor's copy in a folder the verifier cannot write (here: run as user nobody)."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to run verify as another user")
    outside = Path(tempfile.mkdtemp(prefix="auditor-media-"))  # pytest's tmp folders are root-only
    outside.chmod(0o755)
    try:
        read_only_media(cosigned, outside / "media", tmp_path)
    finally:
        shutil.rmtree(outside)


def read_only_media(cosigned: Consortium, media: Path, tmp_path: Path) -> None:
    media.mkdir()
    shutil.copy(ledger_path(cosigned.a), media / "ledger.db")
    trust = media / "trust.txt"
    shutil.copy(cosigned.trust(), trust)
    for path in (media / "ledger.db", trust):
        path.chmod(0o444)
    media.chmod(0o555)

    def as_nobody() -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-m",
                "dicomledger.cli",
                "verify",
                "--ledger",
                str(media / "ledger.db"),
                "--trust",
                str(trust),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )

    result = as_nobody()
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in media.iterdir()) == ["ledger.db", "trust.txt"]
    # a copy with a -wal file holding part of the database cannot be read from there: said so
    media.chmod(0o755)
    con = sqlite3.connect(media / "ledger.db")
    con.execute("PRAGMA wal_autocheckpoint = 0")
    con.execute("CREATE TABLE auditor_note (x)")  # a commit that stays in the -wal file
    con.commit()
    shutil.copy(media / "ledger.db-wal", tmp_path / "wal")
    con.close()  # (closing checkpoints the -wal away: put it back, as a copy would have it)
    shutil.copy(tmp_path / "wal", media / "ledger.db-wal")
    (media / "ledger.db-wal").chmod(0o444)
    for leftover in media.glob("ledger.db-shm"):
        leftover.unlink()
    media.chmod(0o555)
    result = as_nobody()
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert (
        "the folder is not writable and ledger.db-wal holds part of the database" in result.stderr
    )


def test_a_replica_collects_the_cosignatures_its_origin_gathered(tmp_path):
    """B pulls A's entries with A's checkpoint as announced, before anyone cosigned it; the
    cosignatures B and C add at A must reach B's copy too (merged from A's checkpoint in a
    later gossip round, each verified), so an auditor's policy verify of B's ledger file passes
    for A's log."""
    a, b, c = consortium(tmp_path, 3)
    for gw in (a, b, c):
        gw.start()
    try:
        assert a.storescu(*dicomdata.make_mr_series(tmp_path / "mr", 3)).returncode == 0

        def cosigners(gw: GatewayProcess) -> set[str]:
            held = newest_checkpoint(ledger_path(gw), a.origin)
            if held is None or held[0] != 3:
                return set()
            return {s.name for s in parse_note(held[1]).signatures} - {a.origin}

        wait_until(
            lambda: cosigners(a) == {b.origin, c.origin}, what="B's and C's cosignatures at A"
        )
        wait_until(
            lambda: cosigners(b) == {b.origin, c.origin},
            timeout=15,
            what="the same cosignatures on B's copy",
        )
    finally:
        for gw in (a, b, c):
            gw.stop()
    trust = tmp_path / "auditor.txt"
    trust.write_text(
        "".join(gw.vkey + "\n" for gw in (a, b, c))
        + f"witness B {witness_vkey(b)}\nwitness C {witness_vkey(c)}\ngroup g 2 B C\nquorum g\n"
    )
    code, out, err = verify(
        "--ledger", str(ledger_path(b)), "--trust", str(trust), "--origin", a.origin
    )
    assert code == 0, out + err
    assert f"cosigned by {b.origin}, {c.origin}; witness quorum met" in out
