"""Witnessing (C2SP tlog-witness add-checkpoint, tlog-cosignature/v1) and equivocation evidence."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomledger.ledger.checkpoint import Checkpoint, format_checkpoint
from dicomledger.ledger.merkle import (
    EMPTY_ROOT,
    consistency_proof,
    leaf_hash,
    root_of_leaf_hashes,
)
from dicomledger.ledger.note import (
    Note,
    Signature,
    format_note,
    parse_note,
    sign_note_text,
    verify_cosignature,
)
from dicomledger.ledger.witness import (
    EVIDENCE_MAGIC,
    BadSignatureError,
    Equivocation,
    InconsistentError,
    StaleError,
    UnknownLogError,
    WitnessError,
    WitnessState,
    check_equivocation,
    checkpoint_origin,
    format_evidence,
    parse_evidence,
    witness_checkpoint,
)

ORIGIN = "hospital-a.example/dicomledger"
WITNESS = "hospital-b.example/witness"
NOW = 1_763_890_000


def key(seed: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed.encode()).digest())


LOG_KEY = key("log")
OTHER_KEY = key("other")
WITNESS_KEY = key("witness")
LOGS = {ORIGIN: LOG_KEY.public_key()}

# Two histories of one log: 5 shared leaves, then they diverge.
COMMON = [leaf_hash(b"common-%d" % i) for i in range(5)]
A = COMMON + [leaf_hash(b"a-%d" % i) for i in range(40)]
B = COMMON + [leaf_hash(b"b-%d" % i) for i in range(40)]


def root(leaves: list[bytes], n: int) -> bytes:
    return root_of_leaf_hashes(leaves[:n])


def signed(
    size: int, root_hash: bytes, k: Ed25519PrivateKey = LOG_KEY, origin: str = ORIGIN
) -> bytes:
    text = format_checkpoint(Checkpoint(origin, size, root_hash))
    return format_note(Note(text, (sign_note_text(text, origin, k),)))


def cp(leaves: list[bytes], n: int) -> bytes:
    return signed(n, root(leaves, n))


def state(leaves: list[bytes], n: int) -> WitnessState:
    return WitnessState(ORIGIN, n, root(leaves, n), cp(leaves, n))


def witness(
    note: bytes, old_size: int, proof: list[bytes], st_: WitnessState | None
) -> tuple[Signature, WitnessState]:
    return witness_checkpoint(
        note=note,
        old_size=old_size,
        consistency_proof=proof,
        state=st_,
        logs=LOGS,
        witness_name=WITNESS,
        witness_key=WITNESS_KEY,
        now=NOW,
    )


def cosig_ok(note: bytes, sig: Signature) -> bool:
    ts = verify_cosignature(parse_note(note).text, sig, WITNESS, WITNESS_KEY.public_key())
    return ts == NOW


def fork_proof(leaves: list[bytes], m: int, n: int) -> list[bytes]:
    """The larger tree's consistency proof from m, with MTH(D[0:m]) first if m is a power of 2."""
    proof = consistency_proof(m, n, leaves)
    return [root(leaves, m), *proof] if m & (m - 1) == 0 else proof


# --- witness_checkpoint: success -------------------------------------------------------------


def test_first_sight_cosigns_any_size() -> None:
    note = cp(A, 6)
    sig, new = witness(note, 0, [], None)
    assert cosig_ok(note, sig)
    assert new == WitnessState(ORIGIN, 6, root(A, 6), note)
    assert checkpoint_origin(note) == ORIGIN


def test_consistent_growth_cosigns_and_verifies() -> None:
    note = cp(A, 10)
    sig, new = witness(note, 6, consistency_proof(6, 10, A), state(A, 6))
    assert cosig_ok(note, sig)
    assert (new.size, new.root_hash, new.note) == (10, root(A, 10), note)
    # the cosignature does not verify on another checkpoint or under another witness key
    assert (
        verify_cosignature(parse_note(cp(A, 6)).text, sig, WITNESS, WITNESS_KEY.public_key())
        is None
    )
    assert verify_cosignature(parse_note(note).text, sig, WITNESS, OTHER_KEY.public_key()) is None


def test_growth_across_powers_of_two() -> None:
    st_: WitnessState | None = None
    for size in (0, 1, 2, 3, 4, 7, 8, 9, 16, 17, 32, 45):
        old = 0 if st_ is None else st_.size
        note = cp(A, size)
        sig, st_ = witness(note, old, consistency_proof(old, size, A), st_)
        assert cosig_ok(note, sig) and st_.size == size


def test_same_checkpoint_again_is_cosigned_again() -> None:
    note = cp(A, 6)
    sig, new = witness(note, 6, [], state(A, 6))
    assert cosig_ok(note, sig) and new.size == 6


def test_empty_tree_first_sight() -> None:
    sig, new = witness(signed(0, EMPTY_ROOT), 0, [], None)
    assert new.size == 0 and new.root_hash == EMPTY_ROOT
    with pytest.raises(WitnessError, match="empty tree's root") as exc:
        witness(signed(0, root(A, 1)), 0, [], None)
    assert exc.value.status == 422  # tlog-witness since July 2026 (was 400 here)


def test_cosigned_note_may_carry_other_signatures() -> None:
    text = parse_note(cp(A, 6)).text
    extra = sign_note_text(text, "someone.example/else", OTHER_KEY)
    note = format_note(Note(text, (extra, sign_note_text(text, ORIGIN, LOG_KEY))))
    sig, _ = witness(note, 0, [], None)
    assert cosig_ok(note, sig)


# --- witness_checkpoint: refusals ------------------------------------------------------------


def test_stale_old_size_carries_witness_size() -> None:
    with pytest.raises(StaleError, match="not 6") as exc:
        witness(cp(A, 10), 3, consistency_proof(3, 10, A), state(A, 6))
    assert exc.value.size == 6 and exc.value.status == 409
    with pytest.raises(StaleError) as exc:  # never cosigned: the witness's size is 0
        witness(cp(A, 10), 6, consistency_proof(6, 10, A), None)
    assert exc.value.size == 0


def test_forked_log_gives_checkable_evidence() -> None:
    st_ = state(A, 6)
    forked = cp(B, 10)  # shares 5 leaves with A, then diverges
    with pytest.raises(InconsistentError, match="not shown consistent") as exc:
        witness(forked, 6, consistency_proof(6, 10, B), st_)
    assert exc.value.status == 422
    ev = exc.value.evidence
    assert ev is not None
    assert (ev.origin, ev.note_a, ev.note_b) == (ORIGIN, st_.note, forked)
    assert check_equivocation(ev.note_a, ev.note_b, ev.consistency_proof, LOG_KEY.public_key())
    back = parse_evidence(format_evidence(ev))
    assert back == ev
    again = check_equivocation(
        back.note_a, back.note_b, back.consistency_proof, LOG_KEY.public_key()
    )
    assert again == ev
    assert format_evidence(back) == format_evidence(ev)  # deterministic


def test_fork_at_power_of_two_size() -> None:
    # The RFC proof from a power-of-two size omits the old root, so the witness cannot show
    # the fork with it: it refuses without evidence. The fork proof (old root first) shows it.
    with pytest.raises(InconsistentError) as exc:
        witness(cp(B, 12), 8, consistency_proof(8, 12, B), state(A, 8))
    assert exc.value.evidence is None
    ev = check_equivocation(cp(A, 8), cp(B, 12), fork_proof(B, 8, 12), LOG_KEY.public_key())
    assert ev is not None and parse_evidence(format_evidence(ev)) == ev
    assert (
        check_equivocation(cp(A, 8), cp(A, 12), fork_proof(A, 8, 12), LOG_KEY.public_key()) is None
    )


def test_same_size_different_root_is_equivocation() -> None:
    st_ = state(A, 7)
    with pytest.raises(InconsistentError, match="two roots for size 7") as exc:
        witness(cp(B, 7), 7, [], st_)
    assert (
        exc.value.status == 422
    )  # tlog-witness since July 2026 (was 409): every 409 means "retry"
    ev = exc.value.evidence
    assert ev is not None and ev.consistency_proof == ()
    assert check_equivocation(cp(A, 7), cp(B, 7), None, LOG_KEY.public_key()) == ev
    assert parse_evidence(format_evidence(ev)) == ev


def test_unknown_origin() -> None:
    note = signed(6, root(A, 6), origin="hospital-z.example/dicomledger")
    with pytest.raises(UnknownLogError, match="hospital-z") as exc:
        witness(note, 0, [], None)
    assert exc.value.status == 404


def test_wrong_key() -> None:
    with pytest.raises(BadSignatureError, match="no valid signature") as exc:
        witness(signed(6, root(A, 6), k=OTHER_KEY), 0, [], None)
    assert exc.value.status == 403


def test_tampered_note() -> None:
    note = cp(A, 6).replace(b"\n6\n", b"\n7\n", 1)
    with pytest.raises(BadSignatureError):
        witness(note, 0, [], None)
    text = parse_note(cp(A, 6)).text
    sig = parse_note(cp(A, 6)).signatures[0]
    bad = format_note(Note(text, (Signature(sig.name, sig.key_id, bytes(64)),)))
    with pytest.raises(BadSignatureError):
        witness(bad, 0, [], None)


@pytest.mark.parametrize(
    "note", [b"", b"not a note\n", cp(A, 6)[:-1], cp(A, 6).replace(b"\n\n", b"\n")]
)
def test_malformed_note(note: bytes) -> None:
    with pytest.raises(WitnessError, match="malformed") as exc:
        witness(note, 0, [], None)
    assert type(exc.value) is WitnessError and exc.value.status == 400


def test_tampered_proof_is_refused_without_evidence() -> None:
    good = consistency_proof(6, 10, A)
    flipped = [bytes([good[0][0] ^ 1]) + good[0][1:], *good[1:]]
    for proof in (flipped, good[:-1], [*good, good[0]], [good[0][:31], *good[1:]]):
        with pytest.raises(InconsistentError) as exc:
            witness(cp(A, 10), 6, proof, state(A, 6))
        assert exc.value.evidence is None and exc.value.status == 422
        # an honest log cannot be framed with a corrupted proof
        assert check_equivocation(cp(A, 6), cp(A, 10), proof, LOG_KEY.public_key()) is None


def test_proof_must_be_empty_from_zero_and_between_equal_sizes() -> None:
    with pytest.raises(InconsistentError, match="from size 0"):
        witness(cp(A, 6), 0, [root(A, 1)], None)
    with pytest.raises(InconsistentError, match="equal sizes"):
        witness(cp(A, 6), 6, [root(A, 1)], state(A, 6))


def test_shrinking_size_rejected() -> None:
    with pytest.raises(WitnessError, match="larger than the checkpoint's size") as exc:
        witness(cp(A, 6), 10, [], state(A, 10))  # a replay of an older checkpoint
    assert type(exc.value) is WitnessError and exc.value.status == 400
    with pytest.raises(StaleError) as stale:  # claiming the old size 6 is stale instead
        witness(cp(A, 6), 6, [], state(A, 10))
    assert stale.value.size == 10


def test_bad_requests() -> None:
    with pytest.raises(WitnessError, match="at most 63"):
        witness(cp(A, 10), 6, [root(A, 1)] * 64, state(A, 6))
    with pytest.raises(WitnessError, match="not an integer"):
        witness(cp(A, 10), True, [], state(A, 6))  # type: ignore[arg-type]
    with pytest.raises(WitnessError, match="outside"):
        witness(cp(A, 10), -1, [], state(A, 6))
    other = WitnessState("hospital-c.example/dicomledger", 6, root(A, 6), cp(A, 6))
    with pytest.raises(WitnessError, match="state is for origin"):
        witness(cp(A, 10), 6, consistency_proof(6, 10, A), other)
    with pytest.raises(WitnessError, match="cannot cosign"):
        witness_checkpoint(
            note=cp(A, 6),
            old_size=0,
            consistency_proof=[],
            state=None,
            logs=LOGS,
            witness_name=WITNESS,
            witness_key=WITNESS_KEY,
            now=-1,
        )


# --- check_equivocation ------------------------------------------------------------------------


def test_check_equivocation_undecided_and_consistent() -> None:
    pub = LOG_KEY.public_key()
    assert check_equivocation(cp(A, 6), cp(A, 10), consistency_proof(6, 10, A), pub) is None
    assert check_equivocation(cp(A, 10), cp(A, 6), consistency_proof(6, 10, A), pub) is None
    assert check_equivocation(cp(A, 6), cp(B, 10), None, pub) is None  # cannot decide
    assert check_equivocation(cp(A, 6), cp(A, 6), None, pub) is None
    assert check_equivocation(signed(0, EMPTY_ROOT), cp(B, 10), None, pub) is None
    assert check_equivocation(signed(0, root(A, 1)), cp(B, 10), None, pub) is not None
    ev = check_equivocation(cp(B, 10), cp(A, 6), consistency_proof(6, 10, B), pub)
    assert ev is not None and ev.note_a == cp(B, 10)  # order as given


def test_evidence_needs_valid_signatures() -> None:
    pub = LOG_KEY.public_key()
    proof = consistency_proof(6, 10, B)
    with pytest.raises(BadSignatureError, match="note b"):
        check_equivocation(cp(A, 6), signed(10, root(B, 10), k=OTHER_KEY), proof, pub)
    with pytest.raises(BadSignatureError, match="note a"):
        check_equivocation(signed(7, root(A, 7), k=OTHER_KEY), cp(B, 7), None, pub)
    text = parse_note(cp(B, 7)).text
    unsigned = format_note(Note(text, (sign_note_text(text, "mallory.example/x", OTHER_KEY),)))
    with pytest.raises(BadSignatureError):
        check_equivocation(cp(A, 7), unsigned, None, pub)
    with pytest.raises(BadSignatureError):  # evidence with the same checkpoint under the wrong key
        check_equivocation(cp(A, 7), cp(B, 7), None, OTHER_KEY.public_key())
    forged = Equivocation(ORIGIN, cp(A, 7), unsigned, "forged")
    back = parse_evidence(format_evidence(forged))  # well-formed ...
    with pytest.raises(WitnessError):  # ... but not believed
        check_equivocation(back.note_a, back.note_b, back.consistency_proof, pub)
    with pytest.raises(WitnessError, match="different origins"):
        check_equivocation(cp(A, 7), signed(7, root(B, 7), origin="x.example/log"), None, pub)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fork_proofs_always_convict_and_honest_proofs_never(data: st.DataObject) -> None:
    pub = LOG_KEY.public_key()
    n = data.draw(st.integers(2, 45))
    m = data.draw(st.integers(1, n - 1))
    assert check_equivocation(cp(A, m), cp(A, n), consistency_proof(m, n, A), pub) is None
    assert check_equivocation(cp(A, m), cp(A, n), fork_proof(A, m, n), pub) is None
    if m > len(COMMON):  # B's first m leaves differ from A's
        assert check_equivocation(cp(A, m), cp(B, n), fork_proof(B, m, n), pub) is not None
    else:
        assert check_equivocation(cp(A, m), cp(B, n), fork_proof(B, m, n), pub) is None


# --- evidence format ---------------------------------------------------------------------------


def sample_evidence() -> Equivocation:
    ev = check_equivocation(cp(A, 6), cp(B, 10), consistency_proof(6, 10, B), LOG_KEY.public_key())
    assert ev is not None
    return ev


def test_evidence_layout() -> None:
    ev = sample_evidence()
    lines = format_evidence(ev).decode().split("\n")
    assert lines[0] == EVIDENCE_MAGIC
    assert lines[1] == f"origin {ORIGIN}"
    assert lines[2] == "a " + base64.b64encode(ev.note_a).decode()
    assert lines[3] == "b " + base64.b64encode(ev.note_b).decode()
    assert [x for x in lines if x.startswith("proof ")] == [
        "proof " + base64.b64encode(h).decode() for h in ev.consistency_proof
    ]
    assert lines[-2] == f"reason {ev.reason}" and lines[-1] == ""


def _replace_line(data: bytes, n: int, line: bytes) -> bytes:
    lines = data.split(b"\n")
    lines[n] = line
    return b"\n".join(lines)


GOOD = format_evidence(sample_evidence())
NOTE_B64 = base64.b64encode(cp(A, 6)).decode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "does not end in a newline|first line"),
        (GOOD[:-1], "does not end in a newline"),
        (GOOD.replace(b"/v1", b"/v2", 1), "first line"),
        (b"dicomledger-equivocation/v1\norigin x\n", "needs at least 5"),
        (GOOD + b"extra\n", "not a 'proof' line"),
        (GOOD.replace(b"\norigin ", b"\nOrigin ", 1), "line 2 is not a 'origin' line"),
        (_replace_line(GOOD, 1, b"origin other.example/log"), "note a is from"),
        (_replace_line(GOOD, 2, b"a " + NOTE_B64[:-2].encode()), "note a is not valid base64"),
        (_replace_line(GOOD, 2, b"a " + base64.b64encode(b"junk\n")), "note a is malformed"),
        (_replace_line(GOOD, 3, b"b !!!!"), "note b is not valid base64"),
        (_replace_line(GOOD, 4, b"proof " + base64.b64encode(bytes(31))), "31 bytes, not 32"),
        (_replace_line(GOOD, 4, b"proof AA=="), "not 32"),
        (_replace_line(GOOD, 4, b"proof AB=="), "not canonical"),
        (GOOD.rsplit(b"reason ", 1)[0] + b"reason \n", "reason must be"),
        (GOOD.rsplit(b"reason ", 1)[0] + b"reason " + b"x" * 1025 + b"\n", "reason must be"),
        (GOOD.rsplit(b"reason ", 1)[0], "line 5 is not a 'reason' line|not a 'reason' line"),
        (GOOD.replace(b"\n", b"\r\n"), "control character U\\+000D"),
        (GOOD.replace(b"reason ", b"reason \xff", 1), "not valid UTF-8"),
        (b"x" * (3 * (1 << 20) + 1), "longer than"),
    ],
)
def test_parse_evidence_rejects(data: bytes, message: str) -> None:
    with pytest.raises(WitnessError, match=message):
        parse_evidence(data)


def test_parse_evidence_limits_proof_lines() -> None:
    head, reason = GOOD.rsplit(b"reason ", 1)
    line = b"proof " + base64.b64encode(bytes(32)) + b"\n"
    assert len(parse_evidence(head + line * 2 + b"reason " + reason).consistency_proof) > 2
    with pytest.raises(WitnessError, match="more than 64 proof lines"):
        parse_evidence(head + line * 65 + b"reason " + reason)


def test_format_evidence_rejects_what_would_not_parse() -> None:
    ev = sample_evidence()
    for bad in (
        Equivocation(ev.origin, ev.note_a, ev.note_b, "two\nlines"),
        Equivocation(ev.origin, ev.note_a, ev.note_b, ""),
        Equivocation("other.example/log", ev.note_a, ev.note_b, "x"),
        Equivocation(ev.origin, b"junk\n", ev.note_b, "x"),
        Equivocation(ev.origin, ev.note_a, ev.note_b, "x", (bytes(31),)),
        Equivocation(ev.origin, ev.note_a, ev.note_b, "x", ("not bytes",)),  # type: ignore[arg-type]
    ):
        with pytest.raises(WitnessError):
            format_evidence(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_parse_evidence_random_bytes(data: bytes) -> None:
    try:
        parse_evidence(data)
    except WitnessError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, len(GOOD)),
)
def test_mutated_evidence_never_crashes(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(GOOD)
    for pos, value in flips:
        data[pos] = value
    for candidate in (bytes(data), bytes(data[:cut])):
        try:
            ev = parse_evidence(candidate)
        except WitnessError:
            continue
        try:  # whatever parses is re-checked before being believed
            check_equivocation(ev.note_a, ev.note_b, ev.consistency_proof, LOG_KEY.public_key())
        except WitnessError:
            pass
