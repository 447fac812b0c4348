"""Consortium consistency at peering: gateways exchange a keyed check value of their pseudonym
secret (never the secret) and the digest of their witness policy; a peer that differs is
refused with one clear log line and shown by `dicomledger peers`. Real gateway processes on
loopback."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dicomledger.ledger.note import SIG_COSIGNATURE_V1, verifier_key
from dicomledger.ledger.peer_api import consortium_mismatch, consortium_value
from dicomledger.ledger.policy import canonical_text, parse_policy
from dicomledger.ledger.pseudonym import secret_check
from tests import dicomdata
from tests.conftest import consortium
from tests.test_audit_verify import witness_vkey
from tests.test_consortium import log_size, wait_until

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

W = verifier_key(
    "w.example", Ed25519PrivateKey.from_private_bytes(bytes(32)).public_key(), SIG_COSIGNATURE_V1
)


def test_the_check_value_is_an_hmac_of_a_fixed_message_under_the_secret():
    secret = b"ab" * 32
    assert (
        secret_check(secret)
        == hmac.new(secret, b"dicomledger pseudonym secret check v1", hashlib.sha256).hexdigest()
    )
    assert secret_check(secret) != secret_check(b"ab" * 31 + b"ac")


def test_policies_compare_by_what_they_require_not_by_how_the_file_is_written():
    one = parse_policy(f"witness W {W}\ngroup g any W\nquorum g\n")
    same = parse_policy(
        f"# the consortium\nwitness   W\t{W} https://w.example/\n\ngroup g 1 W\nquorum g\n"
    )
    other = parse_policy(f"witness W {W}\nquorum W\n")
    assert canonical_text(one) == canonical_text(same) != canonical_text(other)
    check = secret_check(b"x" * 32)
    assert consortium_mismatch(consortium_value(check, one), consortium_value(check, same)) is None
    assert "witness policy differs" in str(
        consortium_mismatch(consortium_value(check, one), consortium_value(check, other))
    )
    assert "witness policy differs" in str(
        consortium_mismatch(consortium_value(check, one), consortium_value(check, None))
    )
    assert "pseudonym secret differs" in str(
        consortium_mismatch(
            consortium_value(check, one), consortium_value(secret_check(b"y" * 32), one)
        )
    )


def test_a_peer_with_another_secret_or_policy_is_refused_and_shown(tmp_path):
    a, b = consortium(tmp_path, 2)
    secret = "cd" * 32
    (b.dir / "keys" / "consortium.secret").write_text(
        secret + "\n"
    )  # B was set up with another secret
    for gw in (a, b):
        gw.start(accept_local_tip=True)  # neither can confirm the other's log
    try:
        wait_until(
            lambda: (
                "peer refused: consortium settings differ" in a.log()
                and "peer refused: consortium settings differ" in b.log()
            ),
            what="both to refuse the other",
        )
        assert a.storescu(*dicomdata.make_mr_series(tmp_path / "m", 2)).returncode == 0
        time.sleep(2)
        assert log_size(b, a.origin) == 0  # nothing replicated
        for gw, other in ((a, b), (b, a)):
            lines = [
                ln
                for ln in gw.log().splitlines()
                if "peer refused: consortium settings differ" in ln
            ]
            assert (
                len(lines) == 1 and '"level": "error"' in lines[0] and other.origin in lines[0]
            ), lines
            assert (
                "its pseudonym secret differs from ours" in lines[0]
                and "policy" not in lines[0].split("mismatch")[1]
            )
            shown = gw.cli("peers").stdout
            assert "REFUSED: its pseudonym secret differs from ours" in shown, shown
            assert (
                secret not in gw.log() + shown and "ab" * 32 not in gw.log() + shown
            )  # never the secret
    finally:
        for gw in (a, b):
            gw.stop()

    # the same secret again, but only B has the consortium's witness policy
    (b.dir / "keys" / "consortium.secret").write_text("ab" * 32 + "\n")
    policy = tmp_path / "policy.txt"
    policy.write_text(
        f"witness A {witness_vkey(a)}\nwitness B {witness_vkey(b)}\ngroup g any A B\nquorum g\n"
    )
    b.set("startup_wait = 60.0", f'startup_wait = 60.0\nwitness_policy = "{policy}"')
    for gw in (a, b):
        gw.start(accept_local_tip=True)
    try:
        wait_until(
            lambda: "REFUSED: its witness policy differs from ours" in a.cli("peers").stdout,
            what="A to show B's other policy",
        )
        assert "pseudonym secret" not in a.cli("peers").stdout
    finally:
        for gw in (a, b):
            gw.stop()

    # both hold it: they match, and A's entries replicate
    a.set("startup_wait = 60.0", f'startup_wait = 60.0\nwitness_policy = "{policy}"')
    for gw in (a, b):
        gw.start()
    try:
        wait_until(
            lambda: log_size(b, a.origin) == log_size(a, a.origin),
            what="B to replicate A's entries",
        )
        shown = a.cli("peers").stdout
        assert "same pseudonym secret and witness policy" in shown and "REFUSED" not in shown, shown
        assert "consortium settings of a peer match ours again" in a.log()
    finally:
        for gw in (a, b):
            gw.stop()
