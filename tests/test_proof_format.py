"""Offline proof files (C2SP tlog-proof@v1, the entry in the "extra" line) and trust files."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomledger.ledger.checkpoint import Checkpoint, format_checkpoint
from dicomledger.ledger.merkle import inclusion_proof, leaf_hash, root_of_leaf_hashes
from dicomledger.ledger.note import (
    Note,
    NoteError,
    Signature,
    cosign_checkpoint,
    format_note,
    parse_note,
    sign_note_text,
    verifier_key,
)
from dicomledger.ledger.proof import (
    MAGIC,
    InclusionProofFile,
    ProofFileError,
    check_proof_file,
    format_proof_file,
    parse_proof_file,
)
from dicomledger.ledger.trust import format_trust_text, load_trust_text

ORIGIN = "gw1.example/ledger"
LOG = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
W1 = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
W2 = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
STRANGER = Ed25519PrivateKey.from_private_bytes(bytes(range(3, 35)))
TRUSTED = {ORIGIN: LOG.public_key(), "w1.example": W1.public_key(), "w2.example": W2.public_key()}


def build(
    size: int = 9, index: int = 5, extra_sigs: tuple[Signature, ...] | None = None
) -> InclusionProofFile:
    entries = [f"entry {i}".encode() for i in range(size)]
    hashes = [leaf_hash(e) for e in entries]
    text = format_checkpoint(Checkpoint(ORIGIN, size, root_of_leaf_hashes(hashes)))
    if extra_sigs is None:
        extra_sigs = (
            cosign_checkpoint(text, "w1.example", W1, 1_750_000_000),
            cosign_checkpoint(text, "w2.example", W2, 1_750_000_005),
            cosign_checkpoint(text, "stranger.example", STRANGER, 1_750_000_009),
        )
    note = format_note(Note(text, (sign_note_text(text, ORIGIN, LOG), *extra_sigs)))
    return InclusionProofFile(
        entries[index], index, tuple(inclusion_proof(index, size, hashes)), note
    )


def test_layout_is_tlog_proof_byte_for_byte() -> None:
    p = build()
    data = format_proof_file(p)
    # Built by hand from c2sp.org/tlog-proof "Format".
    want = (
        "c2sp.org/tlog-proof@v1\n"
        + "extra "
        + base64.b64encode(b"entry 5").decode()
        + "\n"
        + "index 5\n"
        + "".join(base64.b64encode(h).decode() + "\n" for h in p.proof)
        + "\n"
    ).encode() + p.checkpoint_note
    assert data == want
    assert data.startswith(MAGIC.encode() + b"\nextra ZW50cnkgNQ==\nindex 5\n")
    assert parse_proof_file(data) == p


def test_check_reports_log_and_witnesses() -> None:
    p = build()
    check = check_proof_file(parse_proof_file(format_proof_file(p)), TRUSTED)
    assert check.origin == ORIGIN and check.size == 9 and check.index == 5
    assert check.log_signature_ok
    assert check.witnesses == (("w1.example", 1_750_000_000), ("w2.example", 1_750_000_005))
    assert check.unverified == ("stranger.example",)
    assert check.root_hash == root_of_leaf_hashes(
        [leaf_hash(f"entry {i}".encode()) for i in range(9)]
    )
    # With only the log key trusted, every cosigner is merely listed.
    only_log = check_proof_file(p, {ORIGIN: LOG.public_key()})
    assert only_log.witnesses == ()
    assert only_log.unverified == ("w1.example", "w2.example", "stranger.example")


def test_single_entry_log_and_no_cosignatures() -> None:
    p = build(size=1, index=0, extra_sigs=())
    assert p.proof == ()
    data = format_proof_file(p)
    assert b"\nindex 0\n\n" in data
    check = check_proof_file(parse_proof_file(data), TRUSTED)
    assert check.size == 1 and check.witnesses == () and check.unverified == ()


def test_exact_failure_reasons() -> None:
    p = build()
    with pytest.raises(
        ProofFileError, match=r"^no trusted key for log origin 'gw1.example/ledger'$"
    ):
        check_proof_file(p, {"w1.example": W1.public_key()})
    with pytest.raises(
        ProofFileError, match=r"^checkpoint has no signature by gw1.example/ledger$"
    ):
        check_proof_file(p, {**TRUSTED, ORIGIN: STRANGER.public_key()})
    # The log's line with its signature bytes damaged.
    note = parse_note(p.checkpoint_note)
    log_sig = note.signatures[0]
    damaged = replace(log_sig, data=bytes([log_sig.data[0] ^ 1]) + log_sig.data[1:])
    bad = replace(p, checkpoint_note=format_note(Note(note.text, (damaged, *note.signatures[1:]))))
    with pytest.raises(
        ProofFileError, match=r"^checkpoint signature by gw1.example/ledger does not verify$"
    ):
        check_proof_file(bad, TRUSTED)
    # A checkpoint text changed under its signatures.
    forged = p.checkpoint_note.replace(b"\n9\n", b"\n10\n", 1)
    with pytest.raises(
        ProofFileError, match="checkpoint signature by gw1.example/ledger does not verify"
    ):
        check_proof_file(replace(p, checkpoint_note=forged), TRUSTED)
    with pytest.raises(ProofFileError, match=r"^entry not included at index 4 of size 9: "):
        check_proof_file(replace(p, index=4), TRUSTED)
    with pytest.raises(
        ProofFileError, match=r"^entry not included at index 5 of size 9: .*leads to root"
    ):
        check_proof_file(replace(p, entry=b"entry 6"), TRUSTED)
    with pytest.raises(ProofFileError, match=r"^entry not included at index 9 of size 9: "):
        check_proof_file(replace(p, index=9), TRUSTED)
    with pytest.raises(
        ProofFileError, match=r"^entry not included at index 5 of size 9: .*has 3 hashes"
    ):
        check_proof_file(replace(p, proof=p.proof[:3]), TRUSTED)
    # A trusted witness whose cosignature is damaged rejects the whole proof.
    w1 = note.signatures[1]
    broken = replace(w1, data=w1.data[:8] + bytes(64))
    bad = replace(p, checkpoint_note=format_note(Note(note.text, (log_sig, broken))))
    with pytest.raises(ProofFileError, match=r"^cosignature by w1.example does not verify$"):
        check_proof_file(bad, TRUSTED)


def test_witness_signing_as_note_signature_is_not_a_cosignature() -> None:
    p = build(extra_sigs=())
    note = parse_note(p.checkpoint_note)
    plain = sign_note_text(note.text, "w1.example", W1)  # type 0x01, not cosignature/v1
    q = replace(p, checkpoint_note=format_note(Note(note.text, (*note.signatures, plain))))
    check = check_proof_file(q, TRUSTED)
    assert check.witnesses == () and check.unverified == ("w1.example",)


def test_the_log_cannot_count_as_its_own_witness() -> None:
    p = build(extra_sigs=())
    note = parse_note(p.checkpoint_note)
    self_cosig = cosign_checkpoint(note.text, ORIGIN, LOG, 1)
    q = replace(p, checkpoint_note=format_note(Note(note.text, (*note.signatures, self_cosig))))
    check = check_proof_file(q, TRUSTED)
    assert check.witnesses == () and check.unverified == (ORIGIN,)


def test_tlog_proof_spec_example_header() -> None:
    # The header lines of the c2sp.org/tlog-proof example, over a checkpoint we sign (the
    # example's own signatures are elided there). Its proof is abbreviated (5 hashes where
    # index 73894 of 109482 needs 17), so it parses but does not verify.
    text = "example.com/fancylog\n109482\nsFodV/vSp5O8n9a8QpW6PRY97tfOSW5bsc2Xl/EQi08=\n"
    key = Ed25519PrivateKey.generate()
    note = format_note(Note(text, (sign_note_text(text, "example.com/fancylog", key),)))
    data = (
        b"c2sp.org/tlog-proof@v1\n"
        b"extra YWdlLXYxLjIuMS1kYXJ3aW4tYXJtNjQudGFyLmd6kYXJ3aW4tYXJ\n"
        b"index 73894\n"
        b"gSKyXoYZUgZ6jduWYrkDOARinOMGJveXjgMkBTcdPlQ=\n"
        b"B95lDa8R83lS8n0eG+o0buTxRKQTYFi//1U8anccXmA=\n"
        b"EKNzoDWG8LGC0Yp9o+sv3qllpMP9uHQ9B20KNL+Q1zs=\n"
        b"RoopEkOdqkYqMB4MJXrbt/hMjOxsVn0IrWjpz1ZMMes=\n"
        b"AHCioX9nLjsrse6YhjRRmk1WUEirVOLLRoOQ6vfO5vk=\n"
        b"\n"
    ) + note
    p = parse_proof_file(data)
    assert p.index == 73894 and len(p.proof) == 5
    assert p.entry.startswith(b"age-v1.2.1-darwin-arm64.tar.gz")
    assert format_proof_file(p) == data
    with pytest.raises(
        ProofFileError,
        match=r"^entry not included at index 73894 of size 109482: inclusion proof has 5 hashes",
    ):
        check_proof_file(p, {"example.com/fancylog": key.public_key()})


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (
            lambda d: d.replace(b"tlog-proof@v1", b"tlog-proof@v2", 1),
            "not 'c2sp.org/tlog-proof@v1'",
        ),
        (lambda d: d.replace(b"extra ZW50cnkgNQ==\n", b"", 1), "does not carry the log entry"),
        (
            lambda d: d.replace(b"extra ZW50cnkgNQ==", b"extra ZW50cnkgNQ=", 1),
            "extra line is not valid base64",
        ),
        (lambda d: d.replace(b"extra ZW50cnkgNQ==", b"extra ZW50cnkgNR==", 1), "not canonical"),
        (lambda d: d.replace(b"extra ZW50cnkgNQ==", b"extra ", 1), "entry is empty"),
        (lambda d: d.replace(b"index 5", b"index 05", 1), "leading zeroes"),
        (lambda d: d.replace(b"index 5", b"index  5", 1), "leading zeroes"),
        (lambda d: d.replace(b"index 5", b"Index 5", 1), "not an 'index' line"),
        # without the empty line, the checkpoint's origin reads as a proof hash
        (lambda d: d.replace(b"\n\n", b"\n", 1), "proof hash line 4 is not valid base64"),
        (lambda d: d.split(b"\n\n", 1)[0], "no empty line"),
        (lambda d: d.replace(b"\n", b"\r\n", 1), "not 'c2sp.org/tlog-proof@v1'"),
        (lambda d: d.replace(b"index 5\n", b"index 5\nAAAA\n", 1), "3 bytes, not 32"),
        (lambda d: d.replace(b"index 5\n", b"index 5\n\xc3\xa9\n", 1), "not ASCII"),
        (lambda d: d.split(b"\n\n", 1)[0] + b"\n\n", "checkpoint note is malformed"),
        (lambda d: d.replace(b"\n9\n", b"\n09\n", 1), "checkpoint is malformed"),
        (lambda d: d + b"trailing\n", "checkpoint note is malformed"),
        (lambda d: d + b"x" * (3 << 20), "longer than"),
    ],
)
def test_parse_rejects(mangle: Callable[[bytes], bytes], reason: str) -> None:
    data = format_proof_file(build())
    with pytest.raises(ProofFileError, match=reason):
        parse_proof_file(mangle(data))


def test_format_refuses_bad_fields() -> None:
    p = build()
    for bad in [
        replace(p, entry=b""),
        replace(p, index=-1),
        replace(p, proof=(*p.proof[:2], b"short")),
        replace(p, proof=(bytes(32),) * 64),
        replace(p, checkpoint_note=b"not a note"),
    ]:
        with pytest.raises(ProofFileError):
            format_proof_file(bad)


def test_every_byte_flip_is_caught_or_harmless() -> None:
    p = build(size=6, index=2)
    data = format_proof_file(p)
    for i in range(len(data)):
        mangled = bytearray(data)
        mangled[i] ^= 0x01
        try:
            q = parse_proof_file(bytes(mangled))
            check = check_proof_file(q, TRUSTED)
        except ProofFileError:
            continue
        # Only a signature line nobody trusts (or a trusted name mangled into an unknown
        # one) may change without failing; what the proof proves is unchanged.
        assert (q.entry, q.index, q.proof, check.origin, check.size) == (
            p.entry,
            2,
            p.proof,
            ORIGIN,
            6,
        ), i


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))))
def test_any_index_round_trips_and_verifies(case: tuple[int, int]) -> None:
    size, index = case
    p = build(size, index, extra_sigs=())
    assert parse_proof_file(format_proof_file(p)) == p
    assert check_proof_file(p, TRUSTED).index == index


# --- trust files ------------------------------------------------------------------------


def test_trust_text_round_trip() -> None:
    vkeys = [verifier_key(name, key) for name, key in TRUSTED.items()]
    text = format_trust_text(vkeys)
    assert text == "".join(v + "\n" for v in vkeys)
    commented = (
        "# consortium keys\n\n" + text.replace("\n", "\n   \n", 1) + "  # trailing comment line\n"
    )
    loaded = load_trust_text(commented)
    assert list(loaded) == list(TRUSTED)
    assert check_proof_file(build(), loaded).witnesses == (
        ("w1.example", 1_750_000_000),
        ("w2.example", 1_750_000_005),
    )
    # the published golang.org/x/mod/sumdb/note key loads too
    assert list(
        load_trust_text("PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW\n")
    ) == ["PeterNeumann"]


def test_trust_text_errors_name_the_line() -> None:
    good = verifier_key(ORIGIN, LOG.public_key())
    with pytest.raises(NoteError, match=r"^trust line 3: "):
        load_trust_text(f"# keys\n{good}\n{good[:-2]}\n")
    with pytest.raises(
        NoteError, match=r"^trust line 2: key name 'gw1.example/ledger' already given on line 1$"
    ):
        load_trust_text(f"{good}\n{verifier_key(ORIGIN, W1.public_key())}\n")
    with pytest.raises(NoteError):
        format_trust_text([good, good])
    with pytest.raises(NoteError):
        format_trust_text(["not a vkey"])
    assert load_trust_text("") == {}
