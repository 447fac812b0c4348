"""Checkpoint note text (C2SP tlog-checkpoint)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomledger.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    format_checkpoint,
    parse_checkpoint,
)
from dicomledger.ledger.merkle import EMPTY_ROOT
from dicomledger.ledger.note import parse_note

ROOT_B64 = "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="
# c2sp.org/tlog-checkpoint, opening example
SPEC_EXAMPLE = (
    "example.com/behind-the-sofa\n20852163\n" + ROOT_B64 + "\n\n"
    "— example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
)


def test_spec_example() -> None:
    note = parse_note(SPEC_EXAMPLE.encode())
    cp = parse_checkpoint(note.text)
    assert cp == Checkpoint("example.com/behind-the-sofa", 20852163, base64.b64decode(ROOT_B64))
    assert format_checkpoint(cp) == note.text
    assert note.signatures[0].key_id.hex() == "033de0ae"


def test_empty_tree_and_extensions() -> None:
    cp = Checkpoint("log.example/x", 0, EMPTY_ROOT, ("ext one", "two"))
    text = format_checkpoint(cp)
    assert text == "log.example/x\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\next one\ntwo\n"
    assert parse_checkpoint(text) == cp


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        "origin\n1\n",  # two lines
        "origin\n1\n" + ROOT_B64,  # no final newline
        "\n1\n" + ROOT_B64 + "\n",  # empty origin
        "origin\n01\n" + ROOT_B64 + "\n",  # leading zero
        "origin\n00\n" + ROOT_B64 + "\n",
        "origin\n+1\n" + ROOT_B64 + "\n",
        "origin\n-1\n" + ROOT_B64 + "\n",
        "origin\n 1\n" + ROOT_B64 + "\n",
        "origin\n1 \n" + ROOT_B64 + "\n",
        "origin\n1_000\n" + ROOT_B64 + "\n",
        "origin\n\u0661\n" + ROOT_B64 + "\n",  # ARABIC-INDIC DIGIT ONE: not ASCII decimal
        "origin\n\n" + ROOT_B64 + "\n",
        "origin\n9223372036854775808\n" + ROOT_B64 + "\n",  # 2**63
        "origin\n1\n" + ROOT_B64[:-1] + "\n",  # unpadded
        "origin\n1\n" + ROOT_B64[:-2] + "J=\n",  # non-zero padding bits: non-canonical
        "origin\n1\n" + base64.b64encode(bytes(31)).decode() + "\n",  # 31 bytes
        "origin\n1\n" + base64.b64encode(bytes(33)).decode() + "\n",  # 33 bytes
        "origin\n1\n" + ROOT_B64.replace("/", "_") + "\n",  # URL-safe alphabet
        "origin\n1\n " + ROOT_B64 + "\n",
        "origin\n1\n" + ROOT_B64 + "\n\n",  # empty extension line
        "origin\n1\n" + ROOT_B64 + "\next\n\n",
        "ori\tgin\n1\n" + ROOT_B64 + "\n",  # control character
        "origin\r\n1\n" + ROOT_B64 + "\n",
        "origin\n1\n" + ROOT_B64 + "\nex\x00t\n",
    ],
)
def test_malformed(text: str) -> None:
    with pytest.raises(CheckpointError):
        parse_checkpoint(text)


def test_limits() -> None:
    top = "origin\n9223372036854775807\n" + ROOT_B64 + "\n"
    assert parse_checkpoint(top).size == 2**63 - 1
    # Spaces and "+" are allowed in an origin by the spec ("SHOULD" avoid, clients "MUST NOT
    # assume"); they just cannot be a signed-note key name.
    assert parse_checkpoint("a log+x\n5\n" + ROOT_B64 + "\n").origin == "a log+x"


@pytest.mark.parametrize(
    "cp",
    [
        Checkpoint("", 1, bytes(32)),
        Checkpoint("o\nx", 1, bytes(32)),
        Checkpoint("o", -1, bytes(32)),
        Checkpoint("o", 2**63, bytes(32)),
        Checkpoint("o", True, bytes(32)),
        Checkpoint("o", 1, bytes(31)),
        Checkpoint("o", 1, bytes(32), ("",)),
        Checkpoint("o", 1, bytes(32), ("a\nb",)),
    ],
)
def test_format_refuses(cp: Checkpoint) -> None:
    with pytest.raises(CheckpointError):
        format_checkpoint(cp)


LINE = st.text(alphabet=st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(
    LINE, st.integers(0, 2**63 - 1), st.binary(min_size=32, max_size=32), st.lists(LINE, max_size=3)
)
def test_round_trip(origin: str, size: int, root: bytes, extensions: list[str]) -> None:
    cp = Checkpoint(origin, size, root, tuple(extensions))
    text = format_checkpoint(cp)
    assert parse_checkpoint(text) == cp
    assert text.endswith("\n") and text.count("\n") == 3 + len(extensions)
