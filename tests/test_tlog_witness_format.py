"""The C2SP tlog-witness add-checkpoint wire format and tlog-cosignature/v1 lines, against the
specs' own examples, another implementation's vectors and real standard witnesses' output.

Sources of the vectors (copied verbatim):

* c2sp.org/tlog-witness, "add-checkpoint": the example request body and response body.
* sigsum-go (pkg/requests/witness_test.go): its add-checkpoint request vector.
* A checkpoint of the staging CT log arche2025h1.staging.ct.transparency.dev cosigned by four
  witnesses of the public witness network (transparency.dev's omniwitness "little-garden",
  witness1.smartit.nu, remora.n621.de, witness.stagemole.eu), with the vkeys they publish.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dicomledger.ledger.checkpoint import Checkpoint, format_checkpoint, parse_checkpoint
from dicomledger.ledger.note import (
    SIG_COSIGNATURE_V1,
    SIG_ED25519,
    Note,
    NoteError,
    format_note,
    format_signature_lines,
    parse_note,
    parse_signature_lines,
    parse_verifier_key,
    sign_note_text,
    verifier_key,
    verify_cosignature,
    verify_note_signature,
)
from dicomledger.ledger.witness import (
    AddCheckpointRequest,
    WitnessError,
    format_add_checkpoint,
    format_size,
    parse_add_checkpoint,
    parse_size,
    witness_checkpoint,
)

# c2sp.org/tlog-witness, "add-checkpoint", example request body
SPEC_REQUEST = """old 20852014
PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=
jrJZDmY8Y7SyJE0MWLpLozkIVMSMZcD5kvuKxPC3swk=
5+pKlUdi2LeF/BcMHBn+Ku6yhPGNCswZZD1X/6QgPd8=
/6WVhPs2CwSsb5rYBH5cjHV/wSmA79abXAwhXw3Kj/0=

example.com/behind-the-sofa
20852163
CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=

— example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=
— example.com/behind-the-sofa opLqBQsREYCgu6xQkYQwJr9fo45a62DN9EdmHXnZdXNqlcVGlCum2Wks+49/V6267UEjw6QUXTS5Rovnzv++qbSzm9Q=
""".encode()

# c2sp.org/tlog-witness, "add-checkpoint", example response body
SPEC_RESPONSE = """— witness.example/w1 CMp+6LWBU0anHGH5aNDTJkH/gj79sG+T6+iP2ThYN5krrDJbR1HDnucjL39QsZTSvVjyQLrdk3DXDqI5G2HgLatVs0pWh6Up69HVOw==
— witness.example/w1 I7rEps0pvK2UqkS2gSpVUDhrhVtQV9lgF6pRrWAvjJHjyWpW7VcE3SiOlVlbQNt64vWhO+DlkL0+UfzuOBMh9ChdMkP1vi/lCAsmlw==
— witness.example/w2 AWui8Sk55XjYLOijihBjhqEH6nS1ndDymE0a+6idX7pLcnoB+dhnz0854aLZgrrKbYKA7nC3HNJhm/kWl7oJlqU3rXXvpysAdyP3wQ==
""".encode()

# sigsum-go pkg/requests/witness_test.go, testAddCheckpointASCII
SIGSUM_REQUEST = """old 3
AAAAHA5HAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=

example.org/log
5
HA5HAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=

— example.org/log DEADBEEFAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=
""".encode()

# a real checkpoint cosigned by four standard witnesses of the public witness network
CT_CHECKPOINT_TEXT = """arche2025h1.staging.ct.transparency.dev
1432088532
U7WM79jrzyhGZ5/GUBTpM7NzwdyfFx61t3RovgcC4Ro=
"""
CT_LOG_LINES = """— arche2025h1.staging.ct.transparency.dev zTM8sQAAAZ5W0WdjBAMARjBEAiBjW5IQf9pvsYLfQFX6hoGREPMHbdQ3urbllzalApkptQIgIpwtEroeW2BXaHAI4kJXFbon5Ch9MNL5zRNZ55lvGt0=
— arche2025h1.staging.ct.transparency.dev ui8GwCF1+kWqZrxGdhj4aX3gcw7XUlXQQabg/27lefwhUkzbC3NygNI75MdhL1bfTW9g8Ei59RA23oHP7Ry1k3ZFWwQ=
"""
CT_WITNESS_LINES = """— transparency.dev/DEV:witness-little-garden 2AQqhwAAAABqEiEgzgFIqqhbUoDwjMWE6UP8nd8/KYTzwZ2rhIgcqoXHAwVkjZr4AscylP3v7sEodkRAErumC2q44vdgJY096st5BQ==
— witness1.smartit.nu/witness1 pIyCDwAAAABqEiEghIp82KWebrw7/oHQwlTAm3g2RKS4+eebl8eO0WH+/iEcxZ75W3u5hNI7TOQtmJbqmNWVuE0tgh0XwzdZsDsUAQ==
— remora.n621.de 2net5wAAAABqEiEgPlfF3V06o0Y+fHM+J5J9s27wgxxcOVSpZ/2g/KSiXCg9DEZI+aVCIobWX9sXTynk5XeU/zZ0WBxtqB0DrAWfBw==
— witness.stagemole.eu Z/euoAAAAABqEiEgw0i+7g2ENfDAWHmtRzCfKTHSDwYDJA2NmKeGi9Y8FtEyOUvVr+AJmIY/2TUFucgKi7lI7cUiOvKFYe/TmN9DAg==
"""
CT_LOG_VKEY = (
    "arche2025h1.staging.ct.transparency.dev+ba2f06c0+AU0vHmlGCS/PdN8b2OaGmKprLI8HKM+dJ472xgFYh15f"
)
WITNESS_VKEYS = [  # as the witnesses publish them: type 0x04, cosignature/v1
    "transparency.dev/DEV:witness-little-garden+d8042a87+BCtusOxINQNUTN5Oj8HObRkh2yHf/MwYaGX4CPdiVEPM",
    "witness1.smartit.nu/witness1+a48c820f+BPSFWg9G6KPiO7QPryYO5Xq4oYJJ+kAvLKLSimDhoxMO",
    "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2",
    "witness.stagemole.eu+67f7aea0+BEqSG3yu9YrmcM3BHvQYTxwFj3uSWakQepafafpUqklv",
]
# the same little-garden key as a plain note verifier (type 0x01), as Tessera's docs give it
LITTLE_GARDEN_NOTE_VKEY = "transparency.dev/DEV:witness-little-garden+4b7fca75+AStusOxINQNUTN5Oj8HObRkh2yHf/MwYaGX4CPdiVEPM"


def unb64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


# -- request bodies ------------------------------------------------------------------------


def test_spec_example_request_parses_and_formats_back_byte_for_byte() -> None:
    req = parse_add_checkpoint(SPEC_REQUEST)
    assert req.old_size == 20852014
    assert [base64.b64encode(h).decode() for h in req.consistency_proof] == [
        "PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=",
        "jrJZDmY8Y7SyJE0MWLpLozkIVMSMZcD5kvuKxPC3swk=",
        "5+pKlUdi2LeF/BcMHBn+Ku6yhPGNCswZZD1X/6QgPd8=",
        "/6WVhPs2CwSsb5rYBH5cjHV/wSmA79abXAwhXw3Kj/0=",
    ]
    note = parse_note(req.note)  # the checkpoint note is everything after the empty line
    cp = parse_checkpoint(note.text)
    assert (cp.origin, cp.size) == ("example.com/behind-the-sofa", 20852163)
    assert [s.name for s in note.signatures] == ["example.com/behind-the-sofa"] * 2
    assert format_add_checkpoint(req.old_size, req.consistency_proof, req.note) == SPEC_REQUEST


def test_sigsum_go_request_vector() -> None:
    req = parse_add_checkpoint(SIGSUM_REQUEST)
    assert req == AddCheckpointRequest(
        3,
        (bytes([0, 0, 0, 28, 14, 71]) + bytes(26),),
        SIGSUM_REQUEST[SIGSUM_REQUEST.index(b"example.org") :],
    )
    cp = parse_checkpoint(parse_note(req.note).text)
    assert (cp.origin, cp.size, cp.root_hash) == (
        "example.org/log",
        5,
        bytes([28, 14, 71]) + bytes(29),
    )
    assert format_add_checkpoint(3, req.consistency_proof, req.note) == SIGSUM_REQUEST


def test_old_size_zero_has_no_proof_lines() -> None:
    note = b"o.example/log\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n\n\xe2\x80\x94 o.example/log AAAAAAE=\n"
    body = format_add_checkpoint(0, [], note)
    assert body == b"old 0\n\n" + note
    assert parse_add_checkpoint(body) == AddCheckpointRequest(0, (), note)


HASH = base64.b64encode(bytes(range(32))).decode()
NOTE = "o.example/log\n5\n" + HASH + "\n\n\u2014 o.example/log AAAAAAE=\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", "old size line"),
        ("\n", "old size line"),
        ("old 5", "old size line"),  # no newline at all
        ("Old 5\n\n" + NOTE, "old size line"),
        ("old  5\n\n" + NOTE, "not a decimal"),
        ("old 05\n\n" + NOTE, "not a decimal"),
        ("old -1\n\n" + NOTE, "not a decimal"),
        ("old +1\n\n" + NOTE, "not a decimal"),
        ("old 0x1\n\n" + NOTE, "not a decimal"),
        ("old 1.0\n\n" + NOTE, "not a decimal"),
        ("old 5 \n\n" + NOTE, "not a decimal"),
        ("old 5\r\n\r\n" + NOTE, "not a decimal"),  # lines end in U+000A only
        ("old 9223372036854775808\n\n" + NOTE, "not a decimal"),  # 2**63
        ("old " + "9" * 5000 + "\n\n" + NOTE, "not a decimal"),
        ("old 5\n" + NOTE, "is not valid base64"),  # no empty line: the note is read as proof
        ("old 5\n" + HASH + "\n", "no empty line"),
        ("old 5\n" + HASH, "no empty line"),
        ("old 5\n\n", "no checkpoint"),
        ("old 5\n!!!!\n\n" + NOTE, "not valid base64"),
        ("old 5\n" + HASH.rstrip("=") + "\n\n" + NOTE, "not valid base64"),
        ("old 5\n" + HASH[:-2] + "B=\n\n" + NOTE, "not canonical"),
        ("old 5\n-" + HASH[1:] + "\n\n" + NOTE, "base64"),  # URL-safe alphabet
        ("old 5\n " + HASH + "\n\n" + NOTE, "base64"),
        ("old 5\n" + base64.b64encode(bytes(31)).decode() + "\n\n" + NOTE, "31 bytes, not 32"),
        ("old 5\n" + base64.b64encode(bytes(33)).decode() + "\n\n" + NOTE, "33 bytes, not 32"),
        ("old 5\n\u00e9\n\n" + NOTE, "not base64"),
        ("old 5\n" + (HASH + "\n") * 64 + "\n" + NOTE, "more than 63"),
        ('{"note": "", "old_size": 5, "proof": []}', "old size line"),  # our JSON, on the text path
    ],
)
def test_malformed_request_bodies_are_400(body: str, message: str) -> None:
    with pytest.raises(WitnessError, match=message) as exc:
        parse_add_checkpoint(body.encode())
    assert exc.value.status == 400


def test_63_proof_lines_are_accepted() -> None:
    body = ("old 5\n" + (HASH + "\n") * 63 + "\n" + NOTE).encode()
    assert len(parse_add_checkpoint(body).consistency_proof) == 63


def test_format_refuses_what_would_not_parse() -> None:
    for old in (-1, 2**63, True, "5"):
        with pytest.raises(WitnessError):
            format_add_checkpoint(old, [], NOTE.encode())  # type: ignore[arg-type]
    with pytest.raises(WitnessError):
        format_add_checkpoint(5, [bytes(31)], NOTE.encode())
    with pytest.raises(WitnessError):
        format_add_checkpoint(5, [bytes(32)] * 64, NOTE.encode())


def test_size_body() -> None:
    assert format_size(0) == b"0\n" and format_size(20852014) == b"20852014\n"
    assert parse_size(b"20852014\n") == 20852014
    for bad in (b"", b"\n", b"12", b"012\n", b"-1\n", b"1 \n", b"1\n\n", b"9223372036854775808\n"):
        with pytest.raises(WitnessError):
            parse_size(bad)


# -- cosignature lines ---------------------------------------------------------------------


def test_spec_example_response_parses_and_formats_back() -> None:
    sigs = parse_signature_lines(SPEC_RESPONSE)
    assert [s.name for s in sigs] == [
        "witness.example/w1",
        "witness.example/w1",
        "witness.example/w2",
    ]
    assert all(len(s.key_id) == 4 and len(s.data) == 72 for s in sigs)  # 8-byte time + 64
    assert format_signature_lines(sigs) == SPEC_RESPONSE
    # "the client MAY concatenate it to the checkpoint and use a note verification function"
    note = parse_note(
        b"example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n"
        + SPEC_RESPONSE
    )
    assert note.signatures == sigs


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n",
        SPEC_RESPONSE[:-1],
        SPEC_RESPONSE + b"\n",
        b"- witness.example/w1 AAAAAAE=\n",
        "\u2014 witness.example/w1\n".encode(),
        "\u2014 witness.example/w1 !!!!\n".encode(),
        "\u2014 witness.example/w1 AAAA\n".encode(),
        "\u2014 w 1 AAAAAAE=\n".encode(),
        "\u2014 witness.example/w1 AAAAAAE=\r\n".encode(),
        b"\xff\n",
    ],
)
def test_malformed_signature_lines_are_refused(data: bytes) -> None:
    with pytest.raises(NoteError):
        parse_signature_lines(data)


def test_real_standard_witnesses_cosignatures_verify() -> None:
    """Four public witnesses (three implementations) cosigned this checkpoint: our parser
    and verifier accept each of their lines, and write the lines back byte for byte."""
    note_bytes = (CT_CHECKPOINT_TEXT + "\n" + CT_LOG_LINES + CT_WITNESS_LINES).encode()
    note = parse_note(note_bytes)
    assert format_note(note) == note_bytes
    assert verify_note_signature(note, *parse_verifier_key(CT_LOG_VKEY))
    witness_lines = parse_signature_lines(CT_WITNESS_LINES.encode())
    assert format_signature_lines(witness_lines) == CT_WITNESS_LINES.encode()
    for vkey, line in zip(WITNESS_VKEYS, witness_lines, strict=True):
        name, key = parse_verifier_key(vkey)
        assert verify_cosignature(CT_CHECKPOINT_TEXT, line, name, key) == 1779573024
        # any change to the checkpoint text breaks it
        assert (
            verify_cosignature(
                CT_CHECKPOINT_TEXT.replace("1432088532", "1432088533"), line, name, key
            )
            is None
        )
    # the log's own signature line is not a cosignature
    name, key = parse_verifier_key(CT_LOG_VKEY)
    assert all(
        verify_cosignature(CT_CHECKPOINT_TEXT, s, name, key) is None for s in note.signatures
    )


def test_cosigner_vkey_is_the_note_vkey_with_type_0x04() -> None:
    """A standard witness publishes its key as a type-0x04 vkey; verifier_key writes that form
    from the same key, and both forms are accepted in a trust file."""
    name, key = parse_verifier_key(LITTLE_GARDEN_NOTE_VKEY)
    assert verifier_key(name, key) == LITTLE_GARDEN_NOTE_VKEY
    assert verifier_key(name, key, SIG_COSIGNATURE_V1) == WITNESS_VKEYS[0]
    assert parse_verifier_key(WITNESS_VKEYS[0])[1].public_bytes_raw() == key.public_bytes_raw()
    with pytest.raises(NoteError):
        verifier_key(name, key, 0x02)


def independent_cosignature_check(line: bytes, text: str, vkey: str) -> int:
    """tlog-cosignature/v1 checked from the spec alone (hashlib, cryptography): the timestamp."""
    name, _, b64 = line.decode().removeprefix("\u2014 ").removesuffix("\n").partition(" ")
    vname, vid, material = vkey.split("+", 2)
    raw, key = unb64(b64), unb64(material)
    assert name == vname and key[0] == 0x04 and len(raw) == 4 + 8 + 64
    assert (
        raw[:4].hex()
        == vid
        == hashlib.sha256(name.encode() + b"\n\x04" + key[1:]).digest()[:4].hex()
    )
    timestamp = int.from_bytes(raw[4:12], "big")
    Ed25519PublicKey.from_public_bytes(key[1:]).verify(
        raw[12:], f"cosignature/v1\ntime {timestamp}\n{text}".encode()
    )
    return timestamp


def test_our_cosignature_is_what_a_standard_witness_sends() -> None:
    """What our witness answers to add-checkpoint is a line a standard client reads with the
    witness's type-0x04 vkey: same layout as the real witnesses' lines above."""
    log_key, witness_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    origin, witness = "hospital-a.example/dicomledger", "hospital-b.example/dicomledger"
    text = format_checkpoint(Checkpoint(origin, 1, hashlib.sha256(b"\x00entry").digest()))
    note = format_note(Note(text, (sign_note_text(text, origin, log_key),)))
    sig, _ = witness_checkpoint(
        note=note,
        old_size=0,
        consistency_proof=[],
        state=None,
        logs={origin: log_key.public_key()},
        witness_name=witness,
        witness_key=witness_key,
        now=1779573024,
    )
    line = format_signature_lines([sig])
    assert line.startswith(f"\u2014 {witness} ".encode()) and line.count(b"\n") == 1
    vkey = verifier_key(witness, witness_key.public_key(), SIG_COSIGNATURE_V1)
    assert independent_cosignature_check(line, text, vkey) == 1779573024
    # and the real witnesses' lines pass the same independent check
    for vkey, real in zip(
        WITNESS_VKEYS, CT_WITNESS_LINES.encode().splitlines(keepends=True), strict=True
    ):
        assert independent_cosignature_check(real, CT_CHECKPOINT_TEXT, vkey) == 1779573024


def test_log_key_and_cosigner_key_ids_differ() -> None:
    """A gateway signs its checkpoints (type 0x01) and cosigns others' (type 0x04) with one
    key: the key IDs differ, so a verifier never mistakes one for the other."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    pub = key.public_key()
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    name = "hospital-b.example/dicomledger"
    ids = {
        t: hashlib.sha256(name.encode() + b"\n" + bytes([t]) + raw).digest()[:4]
        for t in (SIG_ED25519, SIG_COSIGNATURE_V1)
    }
    assert verifier_key(name, pub).split("+")[1] == ids[SIG_ED25519].hex()
    assert (
        verifier_key(name, pub, SIG_COSIGNATURE_V1).split("+")[1] == ids[SIG_COSIGNATURE_V1].hex()
    )
    assert ids[SIG_ED25519] != ids[SIG_COSIGNATURE_V1]
