"""Witness policies (C2SP tlog-policy) in trust files and in the offline proof check."""

from __future__ import annotations

import base64
import re
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dicomledger.ledger.checkpoint import Checkpoint, format_checkpoint
from dicomledger.ledger.merkle import inclusion_proof, leaf_hash, root_of_leaf_hashes
from dicomledger.ledger.note import (
    SIG_COSIGNATURE_V1,
    Note,
    NoteError,
    cosign_checkpoint,
    format_note,
    parse_note,
    parse_verifier_key,
    sign_note_text,
    verifier_key,
)
from dicomledger.ledger.policy import PolicyError, parse_policy
from dicomledger.ledger.proof import InclusionProofFile, ProofFileError, check_proof_file
from dicomledger.ledger.trust import load_trust, render_trust_file

ORIGIN = "a.example/dicomledger"
LOG = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KEYS = {
    name: Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32)
    for n, name in enumerate("BCDXYZ", 1)
}


def key_name(w: str) -> str:
    return f"gw{w.lower()}.example/dicomledger"


def witness_line(w: str) -> str:
    return f"witness {w} {verifier_key(key_name(w), KEYS[w].public_key(), SIG_COSIGNATURE_V1)}"


def two_of_bcd() -> str:
    return "\n".join(
        [
            witness_line("B"),
            witness_line("C"),
            witness_line("D"),
            "group consortium 2 B C D",
            "quorum consortium",
            "",
        ]
    )


def proof_cosigned_by(*witnesses: str, size: int = 6, index: int = 2) -> InclusionProofFile:
    entries = [f"entry {i}".encode() for i in range(size)]
    hashes = [leaf_hash(e) for e in entries]
    text = format_checkpoint(Checkpoint(ORIGIN, size, root_of_leaf_hashes(hashes)))
    cosigs = [
        cosign_checkpoint(text, key_name(w), KEYS[w], 1_760_000_000 + i)
        for i, w in enumerate(witnesses)
    ]
    note = format_note(Note(text, (sign_note_text(text, ORIGIN, LOG), *cosigs)))
    return InclusionProofFile(
        entries[index], index, tuple(inclusion_proof(index, size, hashes)), note
    )


def trust_with(policy: str) -> str:
    return f"# the log\n{verifier_key(ORIGIN, LOG.public_key())}\n\n# the consortium's policy\n{policy}"


# --- the format ------------------------------------------------------------------------


def test_spec_example_two_levels_of_groups():
    text = "\n".join(
        [
            f"log {verifier_key(ORIGIN, LOG.public_key())}",
            "",
            witness_line("B"),
            witness_line("C"),
            witness_line("D"),
            "group X-witnesses 2 B C D",
            "",
            witness_line("X"),
            witness_line("Y"),
            witness_line("Z"),
            "group Y-witnesses any X Y Z",
            "",
            "group X-and-Y all X-witnesses Y-witnesses",
            "quorum X-and-Y",
            "",
        ]
    )
    policy = parse_policy(text)
    assert [g.threshold for g in policy.groups] == [2, 1, 2]
    assert policy.logs[0].key_name == ORIGIN
    assert policy.describe() == "group X-and-Y: 2 of {X-witnesses, Y-witnesses}"
    names = {w: key_name(w) for w in KEYS}
    assert policy.satisfied_by({names["B"], names["D"], names["Z"]})
    assert not policy.satisfied_by({names["B"], names["D"]})
    assert not policy.satisfied_by({names["B"], names["X"], names["Y"], names["Z"]})
    assert policy.shortfall({names["B"], names["Y"]}) == (
        "group X-and-Y needs 2 of {X-witnesses, Y-witnesses} and has 1 (Y-witnesses); "
        "group X-witnesses needs 2 of {B, C, D} and has 1 (B); "
        f"missing cosignatures from C ({names['C']}), D ({names['D']})"
    )


def test_whitespace_comments_urls_and_quorum_none():
    text = f"\n# comment\n\t # another\n\twitness \t w1  {verifier_key('w1.example', KEYS['B'].public_key(), SIG_COSIGNATURE_V1)}   https://w1.example/  \n\n  quorum\tw1"
    policy = parse_policy(text)
    assert policy.witnesses[0].url == "https://w1.example/" and policy.quorum == "w1"
    assert policy.shortfall(set()) == "missing cosignatures from w1 (w1.example)"
    assert parse_policy("quorum none\n").satisfied_by(set())
    # keywords other than "none" are valid names (the grammar is positional)
    odd = parse_policy(
        f"{witness_line('B').replace(' B ', ' all ')}\n{witness_line('C').replace(' C ', ' any ')}\ngroup group 2 all any\nquorum group\n"
    )
    assert odd.satisfied_by({key_name("B"), key_name("C")})


@pytest.mark.parametrize(
    "text, reason",
    [
        ("quorum none\n\x01", "character U+0001"),
        ("quorum none\r\n", "character U+000D"),
        ("quibble w1\nquorum none\n", "unknown keyword 'quibble'"),
        ("log\nquorum none\n", "a log line is"),
        ("log garbage\nquorum none\n", "invalid log vkey"),
        ("witness w1\nquorum none\n", "a witness line is"),
        (
            f"witness w1 {verifier_key('w1.example', KEYS['B'].public_key())}\nquorum w1\n",
            "key type 0x01; a witness needs a cosignature key",
        ),
        (
            f"log {verifier_key(ORIGIN, LOG.public_key(), SIG_COSIGNATURE_V1)}\nquorum none\n",
            "key type 0x04; a log needs an Ed25519 note key",
        ),
        (
            f"log {verifier_key(ORIGIN, LOG.public_key())}\nlog {verifier_key('other', LOG.public_key())}\nquorum none\n",
            "duplicate log public key",
        ),
        (f"{witness_line('B')} https://b.example/ # comment\nquorum B\n", "a witness line is"),
        (
            f"witness none {verifier_key('n', KEYS['B'].public_key(), SIG_COSIGNATURE_V1)}\nquorum none\n",
            "'none' is reserved",
        ),
        (
            f"{witness_line('B')}\n{witness_line('C').replace(' C ', ' B ')}\nquorum B\n",
            "name 'B' is already defined",
        ),
        (
            f"{witness_line('B')}\nwitness B2 {verifier_key('impostor.example', KEYS['B'].public_key(), SIG_COSIGNATURE_V1)}\nquorum B\n",
            "duplicate witness public key",
        ),
        (f"{witness_line('B')}\ngroup B any B\nquorum B\n", "already defined"),
        (f"{witness_line('B')}\ngroup g1 1\nquorum B\n", "a group line is"),
        (f"{witness_line('B')}\ngroup g1 0 B\nquorum g1\n", "threshold '0'"),
        (f"{witness_line('B')}\ngroup g1 -1 B\nquorum g1\n", "threshold '-1'"),
        (
            f"{witness_line('B')}\ngroup g1 2 B\nquorum g1\n",
            "threshold 2 of group g1 is outside 1..1",
        ),
        (f"{witness_line('B')}\ngroup g1 any C\nquorum g1\n", "member 'C' is not defined"),
        (f"group g1 any B\n{witness_line('B')}\nquorum g1\n", "member 'B' is not defined"),
        (f"{witness_line('B')}\ngroup g1 any none B\nquorum g1\n", "member 'none' is not defined"),
        (f"{witness_line('B')}\ngroup g1 all B B\nquorum g1\n", "'B' is already a member"),
        (
            f"{witness_line('B')}\n{witness_line('C')}\ngroup g1 any B C\ngroup g2 any B\nquorum g1\n",
            "'B' is already a member",
        ),
        (f"{witness_line('B')}\n", "no quorum line"),
        (f"{witness_line('B')}\nquorum B\nquorum B\n", "exactly one quorum line"),
        ("quorum unknown\n", "quorum 'unknown' is not defined"),
        (f"quorum B\n{witness_line('B')}\n", "quorum 'B' is not defined"),
        ("quorum\n", "a quorum line is"),
    ],
)
def test_malformed_policies_are_refused_with_the_line_and_reason(text, reason):
    with pytest.raises(PolicyError, match=r"^policy line \d+: .*" + re.escape(reason)):
        parse_policy(text)


def test_a_witness_vkey_names_the_key_of_cosignature_lines():
    vkey = verifier_key(key_name("B"), KEYS["B"].public_key(), SIG_COSIGNATURE_V1)
    name, key = parse_verifier_key(vkey)
    assert (
        name == key_name("B")
        and key.public_bytes_raw() == KEYS["B"].public_key().public_bytes_raw()
    )
    assert base64.b64decode(vkey.split("+")[2])[0] == 0x04
    text = format_checkpoint(Checkpoint(ORIGIN, 1, bytes(32)))
    sig = cosign_checkpoint(text, key_name("B"), KEYS["B"], 1)
    assert sig.key_id.hex() == vkey.split("+")[1]


# --- trust files ---------------------------------------------------------------------------


def test_trust_file_with_bare_vkeys_and_a_policy():
    trust = load_trust(trust_with(two_of_bcd()))
    assert list(trust.logs) == [ORIGIN]
    assert set(trust.witnesses) == {ORIGIN, key_name("B"), key_name("C"), key_name("D")}
    assert (
        trust.policy is not None and trust.policy.describe() == "group consortium: 2 of {B, C, D}"
    )
    # a trust file without policy lines has no policy: cosignatures are listed, not required
    assert load_trust(trust_with("")).policy is None


def test_trust_file_policy_errors_name_the_trust_line():
    with pytest.raises(
        NoteError, match=r"^trust line 8: threshold 4 of group consortium is outside 1..3$"
    ):
        load_trust(trust_with(two_of_bcd().replace("consortium 2", "consortium 4")))
    with pytest.raises(NoteError, match="stands for two different keys"):
        load_trust(
            trust_with(two_of_bcd()) + f"{verifier_key(key_name('B'), KEYS['C'].public_key())}\n"
        )


def test_init_trust_file_policy_section_works_once_uncommented():
    text = render_trust_file(ORIGIN, LOG.public_key())
    assert text.splitlines()[1] == verifier_key(
        ORIGIN, LOG.public_key()
    )  # line 2: the vkey, as before
    assert load_trust(text).policy is None  # all commented out
    own = next(line for line in text.splitlines() if line.startswith("# witness this-gateway "))
    assert (
        own
        == f"# witness this-gateway {verifier_key(ORIGIN, LOG.public_key(), SIG_COSIGNATURE_V1)}"
    )
    completed = (
        text.replace(
            "# witness B <the witness line's vkey from gateway B's trust.txt>", witness_line("B")
        )
        .replace(
            "# witness C <the witness line's vkey from gateway C's trust.txt>", witness_line("C")
        )
        .replace(
            "# witness D <the witness line's vkey from gateway D's trust.txt>", witness_line("D")
        )
        .replace("# group consortium", "group consortium")
        .replace("# quorum consortium", "quorum consortium")
    )
    policy = load_trust(completed).policy
    assert policy is not None and policy.describe() == "group consortium: 2 of {B, C, D}"


# --- proofs under a policy -------------------------------------------------------------


def test_proof_meeting_the_quorum_is_valid():
    trust = load_trust(trust_with(two_of_bcd()))
    check = check_proof_file(proof_cosigned_by("B", "D"), trust)
    assert [name for name, _ in check.witnesses] == [key_name("B"), key_name("D")]
    assert check.quorum == "group consortium: 2 of {B, C, D}"


def test_proof_below_the_quorum_names_the_missing_witnesses():
    trust = load_trust(trust_with(two_of_bcd()))
    with pytest.raises(ProofFileError) as caught:
        check_proof_file(proof_cosigned_by("B"), trust)
    assert str(caught.value) == (
        "checkpoint of size 6 is below the witness quorum: group consortium needs 2 of {B, C, D} "
        f"and has 1 (B); missing cosignatures from C ({key_name('C')}), D ({key_name('D')})"
    )
    # cosignatures by witnesses outside the policy do not count
    with pytest.raises(ProofFileError, match="has 1 \\(C\\)"):
        check_proof_file(proof_cosigned_by("C", "X", "Y"), trust)
    # nor does a line by a policy witness's name under another key ID
    p = proof_cosigned_by("B", "C")
    note = parse_note(p.checkpoint_note)
    other_kid = [
        s if s.name != key_name("C") else replace(s, key_id=bytes(4)) for s in note.signatures
    ]
    with pytest.raises(ProofFileError, match=r"missing cosignatures from C "):
        check_proof_file(
            replace(p, checkpoint_note=format_note(Note(note.text, tuple(other_kid)))), trust
        )


def test_a_damaged_cosignature_by_a_policy_witness_is_invalid():
    trust = load_trust(trust_with(two_of_bcd()))
    p = proof_cosigned_by("B", "C", "D")
    note = parse_note(p.checkpoint_note)
    damaged = [
        s if s.name != key_name("C") else replace(s, data=s.data[:-1] + bytes([s.data[-1] ^ 1]))
        for s in note.signatures
    ]
    with pytest.raises(ProofFileError, match=f"^cosignature by {key_name('C')} does not verify$"):
        check_proof_file(
            replace(p, checkpoint_note=format_note(Note(note.text, tuple(damaged)))), trust
        )


def test_without_a_policy_cosignatures_are_listed_not_required():
    trust = load_trust(trust_with(""))
    check = check_proof_file(proof_cosigned_by(), trust)
    assert check.witnesses == () and check.quorum is None
