"""Signed notes (C2SP signed-note) and cosignatures (C2SP tlog-cosignature/v1)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomledger.ledger.note import (
    MAX_SIGNATURES,
    Note,
    NoteError,
    Signature,
    cosign_checkpoint,
    cosignature_timestamp,
    format_note,
    key_id,
    parse_note,
    parse_verifier_key,
    sign_note_text,
    verifier_key,
    verify_cosignature,
    verify_note_signature,
)

# golang.org/x/mod/sumdb/note note_test.go
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
ENOCH_SIG = "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"


def peter_private_key() -> Ed25519PrivateKey:
    # The Go signer key format: PRIVATE+KEY+name+hash+base64(0x01 || 32-byte seed).
    material = base64.b64decode(PETER_SKEY.split("+", 4)[4])  # base64 may hold "+"
    assert material[0] == 0x01 and len(material) == 33
    return Ed25519PrivateKey.from_private_bytes(material[1:])


def raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_peter_neumann_vkey() -> None:
    name, pub = parse_verifier_key(PETER_VKEY)
    assert name == "PeterNeumann"
    assert key_id(name, pub).hex() == "c74f20a3"
    assert verifier_key(name, pub) == PETER_VKEY
    assert raw(peter_private_key().public_key()) == raw(pub)


def test_peter_neumann_signature_reproduced_byte_for_byte() -> None:
    sig = sign_note_text(TEXT, "PeterNeumann", peter_private_key())
    assert format_note(Note(TEXT, (sig,))) == (TEXT + "\n" + PETER_SIG).encode()


def test_peter_neumann_published_note_verifies() -> None:
    note = parse_note((TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode())
    assert note.text == TEXT
    assert [s.name for s in note.signatures] == ["PeterNeumann", "EnochRoot"]
    assert note.signatures[0].key_id.hex() == "c74f20a3"
    assert note.signatures[1].key_id.hex() == "af0cfe78"
    peter, enoch = parse_verifier_key(PETER_VKEY), parse_verifier_key(ENOCH_VKEY)
    assert verify_note_signature(note, *peter)
    assert verify_note_signature(note, *enoch)
    only_enoch = parse_note((TEXT + "\n" + ENOCH_SIG).encode())
    assert not verify_note_signature(only_enoch, *peter)
    assert format_note(note) == (TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode()


def test_go_invalid_signature_is_rejected_not_raised() -> None:
    # note_test.go "Invalid signature": four base64 characters inserted into the signature.
    bad = PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    note = parse_note((TEXT + "\n" + bad).encode())
    assert not verify_note_signature(note, *parse_verifier_key(PETER_VKEY))


def test_go_vkey_manglings_rejected() -> None:
    # note_test.go TestNewVerifier: every proper substring and every one-byte increment.
    b = PETER_VKEY.encode()
    for i in range(len(b) + 1):
        for j in range(i + 1, len(b) + 1):
            if (i, j) != (0, len(b)):
                with pytest.raises(NoteError):
                    parse_verifier_key(b[i:j].decode())
    for i in range(len(b)):
        mangled = bytearray(b)
        mangled[i] += 1
        with pytest.raises(NoteError):
            parse_verifier_key(mangled.decode())
    # wrong key length and unknown algorithm, each with an adjusted key hash
    for vkey in [
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ]:
        with pytest.raises(NoteError):
            parse_verifier_key(vkey)


def test_go_malformed_notes_rejected() -> None:
    # note_test.go TestOpen "Invalid encoded message syntax", plus too many signatures.
    bad_messages = [
        TEXT,
        TEXT + "\n",
        TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + TEXT + "\n" + PETER_SIG,
        TEXT
        + "\n"
        + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
        TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
        TEXT + "\n" + PETER_SIG * (MAX_SIGNATURES + 1),
    ]
    for msg in bad_messages:
        with pytest.raises(NoteError):
            parse_note(msg.encode())
    with pytest.raises(NoteError):
        parse_note(b"\xff" + (TEXT + "\n" + PETER_SIG).encode())
    parse_note((TEXT + "\n" + PETER_SIG * MAX_SIGNATURES).encode())


def test_c2sp_signed_note_example() -> None:
    # c2sp.org/signed-note "Verifier keys", "Example".
    name, pub = parse_verifier_key(
        "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
    )
    note = parse_note(
        "This is an example message.\n\n— example.com/foo "
        "Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n".encode()
    )
    assert note.text == "This is an example message.\n"
    assert verify_note_signature(note, name, pub)


def test_c2sp_note_text_with_blank_lines() -> None:
    # c2sp.org/signed-note opening example: the text is separated by the *last* blank line.
    data = (
        "Ognuno sta solo sul cuor della terra\ntrafitto da un raggio di sole:\n\ned è subito sera.\n"
        "\n— quasimodo.example/salvatore NnugSzTjtVAewIS+Z/iJhUPeFDkO/5QQ2i5ddnGITLlC+EhfLW9oJKONrMouFSQU0xMcXxj99ihAQwaqP3ZekRwNtIc=\n"
    ).encode()
    note = parse_note(data)
    assert note.text.endswith(":\n\ned è subito sera.\n")
    assert note.signatures[0].name == "quasimodo.example/salvatore"
    assert len(note.signatures[0].data) == 64
    assert format_note(note) == data


def test_published_vkeys_with_plus_in_base64_and_cosignature_type() -> None:
    # transparency-dev/formats note/note_cosigv1_test.go TestCoSigV1NewVerifier: a type-0x01
    # key whose base64 contains "+", and a native type-0x04 (cosignature/v1) key.
    name, pub = parse_verifier_key("TEST+7997405c+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6")
    assert name == "TEST" and key_id(name, pub).hex() == "7997405c"
    name, pub = parse_verifier_key(
        "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2"
    )
    assert key_id(name, pub, 0x04).hex() == "da77ade7"
    for bad in [
        "bananas.sigstore.dev+12344556",
        "rekor.sigstore.dev+12345678+THIS_IS_NOT_BASE64!",
        "rekor.sigstore.dev+12345678+AwEB",
        "remora.n621.de+00000000+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2",
        "remora.n621.de+DA77ADE7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2",
        "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw3",  # non-canonical
    ]:
        with pytest.raises(NoteError):
            parse_verifier_key(bad)


def test_key_id_matches_spec_formula() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    for t in (0x01, 0x04):
        want = hashlib.sha256(b"log.example/a\n" + bytes([t]) + raw(key)).digest()[:4]
        assert key_id("log.example/a", key, t) == want


def test_unknown_keys_sharing_name_or_id_are_ignored() -> None:
    # signed-note "Signatures": ignore unknown keys even if they share a name or ID.
    k1, k2 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    text = "hello\n"
    s1 = sign_note_text(text, "a.example", k1)
    impostor = sign_note_text(text, "a.example", k2)  # same name, other key
    same_id = Signature("b.example", s1.key_id, s1.data)  # same id, other name
    note = Note(text, (impostor, same_id))
    assert not verify_note_signature(note, "a.example", k1.public_key())
    assert verify_note_signature(Note(text, (impostor, same_id, s1)), "a.example", k1.public_key())
    # a failing line by the known key rejects the note even next to a good one
    broken = Signature("a.example", s1.key_id, bytes(64))
    assert not verify_note_signature(Note(text, (s1, broken)), "a.example", k1.public_key())
    short = Signature("a.example", s1.key_id, b"\x01")
    assert not verify_note_signature(Note(text, (short,)), "a.example", k1.public_key())


def test_format_and_sign_refuse_bad_input() -> None:
    key = Ed25519PrivateKey.generate()
    for name in ["", "a b", "a+b", "a\u2003b", "a\nb"]:
        with pytest.raises(NoteError):
            sign_note_text("x\n", name, key)
        with pytest.raises(NoteError):
            verifier_key(name, key.public_key())
    for text in ["no newline", "tab\there\n", "\x00\n"]:
        with pytest.raises(NoteError):
            sign_note_text(text, "a.example", key)
    with pytest.raises(NoteError):
        format_note(Note("x\n", ()))


def test_parse_rejects_noncanonical_and_short_signatures() -> None:
    good = format_note(
        Note("x\n", (sign_note_text("x\n", "a.example", Ed25519PrivateKey.generate()),))
    )
    line = good.decode().split("\n")[2]
    b64 = line.split(" ", 2)[2]
    for bad_b64 in [b64.rstrip("="), b64 + "=", b64[:-2] + "B=", "AAAA", "AAAAAA=="]:
        with pytest.raises(NoteError):
            parse_note(f"x\n\n— a.example {bad_b64}\n".encode())
    for bad_line in [
        "— a.example",
        "—  a.example AAAAAAA=",
        "-- a.example AAAAAAA=",
        "— a.example  AAAAAAA=",
    ]:
        with pytest.raises(NoteError):
            parse_note(f"x\n\n{bad_line}\n".encode())
    with pytest.raises(NoteError):
        parse_note(b"x\r\n\n" + line.encode() + b"\n")
    with pytest.raises(NoteError):
        parse_note(b"x" * (1 << 20) + b"\n\n" + line.encode() + b"\n")


NAMES = st.text(
    alphabet=st.characters(
        exclude_categories=("Cs", "Zs", "Zl", "Zp", "Cc"), exclude_characters="+"
    ),
    min_size=1,
    max_size=30,
).filter(lambda s: not any(c.isspace() for c in s))
TEXTS = st.lists(
    st.text(alphabet=st.characters(exclude_categories=("Cs", "Cc")), max_size=40),
    min_size=1,
    max_size=5,
).map(lambda lines: "".join(line + "\n" for line in lines))
KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in range(1, 4)]


@settings(max_examples=60, deadline=None)
@given(TEXTS, st.lists(st.tuples(NAMES, st.sampled_from(KEYS)), min_size=1, max_size=3))
def test_round_trip_and_every_byte_flip_fails(
    text: str, signers: list[tuple[str, Ed25519PrivateKey]]
) -> None:
    sigs = tuple(sign_note_text(text, name, key) for name, key in signers)
    data = format_note(Note(text, sigs))
    note = parse_note(data)
    assert note == Note(text, sigs)
    assert format_note(note) == data
    name, key = signers[0]
    pub = key.public_key()
    assert verify_note_signature(note, name, pub)
    for i in range(len(data)):
        for bit in (0x01, 0x40):
            mangled = bytearray(data)
            mangled[i] ^= bit
            try:
                other = parse_note(bytes(mangled))
            except NoteError:
                continue
            if verify_note_signature(other, name, pub):  # only flips outside this signer's
                assert other.text == text and sigs[0] in other.signatures, i  # text and line


# --- tlog-cosignature/v1 ---------------------------------------------------------------

CHECKPOINT = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"


def test_c2sp_cosignature_example_layout() -> None:
    # c2sp.org/tlog-cosignature: the example cosignature carries time 1679315147, the time
    # of the example signed message in "Ed25519 signed message".
    note = parse_note(
        (
            CHECKPOINT
            + "\n— example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
            + "— witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==\n"
        ).encode()
    )
    witness = note.signatures[1]
    assert witness.key_id.hex() == "8d66cf3f"
    assert len(witness.data) == 72
    assert cosignature_timestamp(witness) == 1679315147


def test_cosignature_round_trip_and_independent_message_check() -> None:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    sig = cosign_checkpoint(CHECKPOINT, "witness.example/w1", key, 1679315147)
    assert sig.key_id == hashlib.sha256(b"witness.example/w1\n\x04" + raw(pub)).digest()[:4]
    assert sig.data[:8] == (1679315147).to_bytes(8, "big")
    # The signed message, built here by hand from the spec's example.
    pub.verify(sig.data[8:], b"cosignature/v1\ntime 1679315147\n" + CHECKPOINT.encode())
    assert verify_cosignature(CHECKPOINT, sig, "witness.example/w1", pub) == 1679315147
    # it round-trips through a note next to the log's own signature
    log_key = Ed25519PrivateKey.generate()
    note = Note(
        CHECKPOINT, (sign_note_text(CHECKPOINT, "example.com/behind-the-sofa", log_key), sig)
    )
    again = parse_note(format_note(note))
    assert (
        verify_cosignature(again.text, again.signatures[1], "witness.example/w1", pub) == 1679315147
    )
    # a cosignature is not a note signature, and the reverse
    assert not verify_note_signature(again, "witness.example/w1", pub)
    assert (
        verify_cosignature(
            CHECKPOINT, again.signatures[0], "example.com/behind-the-sofa", log_key.public_key()
        )
        is None
    )


def test_cosignature_mutations_fail() -> None:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    sig = cosign_checkpoint(CHECKPOINT, "w.example", key, 1700000000)
    other = Ed25519PrivateKey.generate().public_key()
    assert verify_cosignature(CHECKPOINT, sig, "w.example", other) is None
    assert verify_cosignature(CHECKPOINT, sig, "v.example", pub) is None
    assert (
        verify_cosignature(CHECKPOINT.replace("20852163", "20852164"), sig, "w.example", pub)
        is None
    )
    assert verify_cosignature(CHECKPOINT + "ext\n", sig, "w.example", pub) is None
    for i in range(len(sig.data)):
        data = bytearray(sig.data)
        data[i] ^= 0x01
        assert (
            verify_cosignature(
                CHECKPOINT, Signature("w.example", sig.key_id, bytes(data)), "w.example", pub
            )
            is None
        )
    for data in (sig.data[:-1], sig.data + b"\x00", b""):
        assert (
            verify_cosignature(
                CHECKPOINT, Signature("w.example", sig.key_id, data), "w.example", pub
            )
            is None
        )
    top = Signature("w.example", sig.key_id, (2**63).to_bytes(8, "big") + sig.data[8:])
    assert verify_cosignature(CHECKPOINT, top, "w.example", pub) is None


def test_cosign_refuses_bad_input() -> None:
    key = Ed25519PrivateKey.generate()
    for ts in (-1, 2**63, True):
        with pytest.raises(NoteError):
            cosign_checkpoint(CHECKPOINT, "w.example", key, ts)  # type: ignore[arg-type]
    assert (
        cosign_checkpoint(CHECKPOINT, "w.example", key, 2**63 - 1).data[:8] == b"\x7f" + b"\xff" * 7
    )
    for bad in [
        "origin\n12\n",
        "origin\n012\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n",
        "no newline",
    ]:
        with pytest.raises(NoteError):
            cosign_checkpoint(bad, "w.example", key, 1)
