"""Offline proof files (C2SP tlog-proof@v1): one log entry, its inclusion proof, and the
checkpoint with its signatures. Pure functions, no I/O.

Format, byte for byte c2sp.org/tlog-proof "Format" (file extension ``.tlog-proof``)::

    c2sp.org/tlog-proof@v1
    extra <base64 of the log entry bytes>
    index <leaf index, ASCII decimal, no leading zeroes>
    <base64 inclusion proof hash, leaf's sibling first>    (zero or more lines)
    <empty line>
    <the checkpoint note, verbatim: text, blank line, log signature, cosignatures>

How the entry is carried: tlog-proof leaves computing the leaf hash to the application
("Verifying a tlog proof", step 1) and offers the optional ``extra`` line for "additional
data necessary to reconstruct the record hash". This application puts the whole entry
there, and its leaf hash is the RFC 6962 one, ``SHA-256(0x00 || extra)``. So in our files
the ``extra`` line is required and non-empty; any tlog-proof reader still parses them. The
extra data is not trusted as such: only its hash being included under a signed checkpoint
makes it count. This module treats the entry as opaque bytes; checking the entry's own
signature and meaning is the entry format's business.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dicomledger.common.errors import LedgerFormatError
from dicomledger.ledger.checkpoint import Checkpoint, CheckpointError, parse_checkpoint
from dicomledger.ledger.merkle import MAX_TREE_SIZE, ProofError, leaf_hash, verify_inclusion
from dicomledger.ledger.note import (
    Note,
    NoteError,
    canonical_b64decode,
    key_id,
    parse_note,
    verify_note_signature,
)
from dicomledger.ledger.policy import CosignatureError, verified_cosigners
from dicomledger.ledger.trust import Trust

MAGIC = "c2sp.org/tlog-proof@v1"
MAX_ENTRY_BYTES = 1 << 20
MAX_PROOF_HASHES = 63  # a tree of fewer than 2**63 leaves has paths of at most 63 hashes
MAX_PROOF_FILE_BYTES = 3 << 20
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")


class ProofFileError(LedgerFormatError, ValueError):
    """A proof file is malformed or does not verify; the message says exactly why."""


@dataclass(frozen=True)
class InclusionProofFile:
    entry: bytes  # the log entry (leaf data), carried in the "extra" line
    index: int
    proof: tuple[bytes, ...]
    checkpoint_note: bytes  # the signed checkpoint note, verbatim


@dataclass(frozen=True)
class ProofCheck:
    origin: str
    size: int
    index: int
    root_hash: bytes
    log_signature_ok: bool  # always True: a proof that fails raises instead
    witnesses: tuple[tuple[str, int], ...]  # (trusted cosigner name, cosignature timestamp)
    unverified: tuple[str, ...] = ()  # names on signature lines by keys not in `trusted`
    quorum: str | None = None  # the witness policy's quorum, met; None without a policy


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(s: str, what: str) -> bytes:
    return canonical_b64decode(s, what, ProofFileError)


def _read_checkpoint(note_bytes: bytes) -> tuple[Note, Checkpoint]:
    try:
        note = parse_note(note_bytes)
    except NoteError as exc:
        raise ProofFileError(f"checkpoint note is malformed: {exc}") from None
    try:
        cp = parse_checkpoint(note.text)
    except CheckpointError as exc:
        raise ProofFileError(f"checkpoint is malformed: {exc}") from None
    return note, cp


def _check_fields(p: InclusionProofFile) -> None:
    if not isinstance(p.entry, bytes) or not p.entry:
        raise ProofFileError("entry is empty")
    if len(p.entry) > MAX_ENTRY_BYTES:
        raise ProofFileError(f"entry is longer than {MAX_ENTRY_BYTES} bytes")
    if (
        isinstance(p.index, bool)
        or not isinstance(p.index, int)
        or not 0 <= p.index <= MAX_TREE_SIZE
    ):
        raise ProofFileError(f"index {p.index!r} is not an integer in 0..2**63-1")
    if len(p.proof) > MAX_PROOF_HASHES:
        raise ProofFileError(f"inclusion proof has more than {MAX_PROOF_HASHES} hashes")
    for i, h in enumerate(p.proof):
        if not isinstance(h, bytes) or len(h) != 32:
            raise ProofFileError(f"proof hash {i} is not 32 bytes")


def format_proof_file(p: InclusionProofFile) -> bytes:
    """Serialize per c2sp.org/tlog-proof "Format", the entry in the ``extra`` line."""
    _check_fields(p)
    _read_checkpoint(p.checkpoint_note)
    head = [MAGIC, f"extra {_b64(p.entry)}", f"index {p.index}"] + [_b64(h) for h in p.proof]
    return "".join(line + "\n" for line in head).encode("ascii") + b"\n" + p.checkpoint_note


def parse_proof_file(data: bytes) -> InclusionProofFile:
    """Parse a tlog-proof@v1 file strictly; the checkpoint note must parse too (signatures
    are checked by ``check_proof_file``)."""
    if not isinstance(data, bytes | bytearray):
        raise ProofFileError("proof file must be bytes")
    data = bytes(data)
    if len(data) > MAX_PROOF_FILE_BYTES:
        raise ProofFileError(f"proof file is longer than {MAX_PROOF_FILE_BYTES} bytes")
    split = data.find(b"\n\n")
    if split < 0:
        raise ProofFileError("no empty line between the proof and the checkpoint")
    try:
        lines = data[:split].decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise ProofFileError("proof lines are not ASCII") from None
    if lines[0] != MAGIC:
        raise ProofFileError(f"first line is {lines[0][:40]!r}, not {MAGIC!r}")
    if len(lines) < 2 or not lines[1].startswith("extra "):
        raise ProofFileError("no 'extra' line: this proof file does not carry the log entry")
    entry = _unb64(lines[1][len("extra ") :], "extra line")
    if len(lines) < 3 or not lines[2].startswith("index "):
        raise ProofFileError("the line after 'extra' is not an 'index' line")
    index_text = lines[2][len("index ") :]
    if not _DECIMAL.fullmatch(index_text) or int(index_text) > MAX_TREE_SIZE:
        raise ProofFileError(f"index {index_text!r} is not a decimal without leading zeroes")
    hashes = []
    for n, line in enumerate(lines[3:]):
        h = _unb64(line, f"proof hash line {n}")
        if len(h) != 32:
            raise ProofFileError(f"proof hash line {n} is {len(h)} bytes, not 32")
        hashes.append(h)
    p = InclusionProofFile(entry, int(index_text), tuple(hashes), data[split + 2 :])
    _check_fields(p)
    _read_checkpoint(p.checkpoint_note)
    return p


def check_proof_file(
    p: InclusionProofFile, trusted: Mapping[str, Ed25519PublicKey] | Trust
) -> ProofCheck:
    """Verify a proof file offline (c2sp.org/tlog-proof "Verifying a tlog proof").

    1. leaf hash = RFC 6962 leaf hash of the entry;
    2. the checkpoint carries a valid Ed25519 note signature by the key named after its
       origin, which must be a trusted log key;
    3. the inclusion proof binds the leaf hash at ``index`` to the checkpoint's root;
    4. cosignatures (tlog-cosignature/v1) by trusted witness keys are verified and listed;
       one that fails is an error (signed-note: a failing signature from a known key SHOULD
       reject the note); signature lines by other keys are listed as unverified;
    5. with a witness policy (a ``Trust`` holding one), the verified cosigners must meet
       its quorum, else the error names the witnesses that are missing.

    A log that changed its key (``keychain.py``) is followed from its first key through the
    trust file's key-change lines: the checkpoint must be signed by the key in force at its
    size, so a proof made before a rotation still verifies, and one made after it needs
    the rotation's line. Witnesses are counted by any of their keys the file knows.

    ``trusted`` is a ``Trust`` or, as before policies, one mapping of names to keys that
    are trusted both as logs and as witnesses. Returns a ProofCheck; raises ProofFileError
    with the exact reason otherwise. Freshness (how old a cosignature may be) is the caller's.
    """
    trust = trusted if isinstance(trusted, Trust) else Trust(trusted, trusted)
    _check_fields(p)
    note, cp = _read_checkpoint(p.checkpoint_note)
    try:
        chain = trust.log_chain(cp.origin)
        witness_keys = trust.witness_keys()
    except NoteError as exc:
        raise ProofFileError(str(exc)) from None
    if chain is None:
        raise ProofFileError(f"no trusted key for log origin {cp.origin!r}")
    log_key = chain.key_for_size(cp.size)
    log_kid = key_id(cp.origin, log_key)
    if not any(s.name == cp.origin and s.key_id == log_kid for s in note.signatures):
        raise ProofFileError(f"checkpoint has no signature by {cp.origin}")
    if not verify_note_signature(note, cp.origin, log_key):
        raise ProofFileError(f"checkpoint signature by {cp.origin} does not verify")
    try:
        verify_inclusion(leaf_hash(p.entry), p.index, cp.size, p.proof, cp.root_hash)
    except ProofError as exc:
        raise ProofFileError(
            f"entry not included at index {p.index} of size {cp.size}: {exc}"
        ) from None
    try:
        witnesses, unverified = verified_cosigners(note, (cp.origin, log_kid), witness_keys)
    except CosignatureError as exc:
        raise ProofFileError(str(exc)) from None
    if trust.policy is not None:
        shortfall = trust.policy.shortfall(witnesses)
        if shortfall is not None:
            raise ProofFileError(
                f"checkpoint of size {cp.size} is below the witness quorum: {shortfall}"
            )
    return ProofCheck(
        origin=cp.origin,
        size=cp.size,
        index=p.index,
        root_hash=cp.root_hash,
        log_signature_ok=True,
        witnesses=tuple(witnesses.items()),
        unverified=tuple(unverified),
        quorum=None if trust.policy is None else trust.policy.describe(),
    )
