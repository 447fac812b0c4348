"""Witnessing other gateways' checkpoints, and evidence of equivocation. Pure: no I/O, no clock.

A gateway witnesses every other gateway's log as in c2sp.org/tlog-witness ("add-checkpoint"):
for each origin it remembers the last checkpoint it cosigned (``WitnessState``) and cosigns a
new one (c2sp.org/tlog-cosignature/v1, ``note.cosign_checkpoint``) only if it is signed by the
origin's key and provably extends the remembered one. The caller persists the returned state
*before* answering, atomically with reading the old one (tlog-witness: the check and the update
must be atomic, or a slow request can roll the state back).

Checks, in the order of tlog-witness "add-checkpoint", and the HTTP status each error carries
in ``.status`` for a witness endpoint:

====================  ======  ============================================================
error                 status  when
====================  ======  ============================================================
WitnessError          400     malformed request body, note or checkpoint, old size >
                              checkpoint size, more than 63 proof hashes
UnknownLogError       404     origin not among the logs this witness follows
BadSignatureError     403     no valid signature by the origin's key, or a signature line
                              with its name and key ID that does not verify
StaleError            409     old size != the size last cosigned (0 if none); ``.size`` is it
InconsistentError     422     the consistency proof does not verify; a non-empty proof from
                              size 0; same size as the last cosigned checkpoint with another
                              root; a size-0 checkpoint whose root is not the empty tree's
====================  ======  ============================================================

(The spec moved "same size, other root" from 409 to 422 in July 2026, so that every 409
means "retry from this size"; the transparency-dev witness still answers 409 there.)

The HTTP request and answer bodies of add-checkpoint (``format_add_checkpoint``,
``parse_add_checkpoint``, ``format_size``, ``parse_size``; the cosignature lines are
``note.format_signature_lines``)::

    old <old size, ASCII decimal>\n
    <base64 of a consistency proof hash>\n      (0 to 63 lines, RFC 6962 section 2.1.2 order)
    \n
    <the signed checkpoint note, verbatim>

    200: "— <witness name> base64(key ID || u64 timestamp || Ed25519 signature)\n"
    409: "<size last cosigned>\n", Content-Type text/x.tlog.size

Evidence. Two checkpoints of one origin, both validly signed by its key, prove that the origin
lied when they cannot both be true (``check_equivocation``):

* same size, different roots; or
* sizes m < n and a *fork proof*: hashes that, run through RFC 9162 section 2.1.4.2, lead to the
  larger checkpoint's root but to a size-m root other than the smaller checkpoint's. Since the
  larger root fixes every hash the algorithm uses (SHA-256 collision resistance), that shows the
  larger tree's first m leaves are not the smaller tree. The larger tree's ordinary consistency
  proof from m is such a proof, except when m is a power of two: the RFC proof then omits
  MTH(D[0:m]) (the verifier supplies the old root), so a fork proof starts with it (the
  RFC 6962 section 2.1.2 SUBPROOF(m, D[n], false) form, one hash longer).

A proof that merely *fails* proves nothing: anyone relaying an honest log's checkpoint can send
a corrupted proof. So ``InconsistentError.evidence`` is set only when the failure is provable
(same size, or a fork proof); otherwise it is None and the witness simply does not cosign
(tlog-witness: it "MAY log the request ... as it might be proof of log misbehavior").

Evidence file (``format_evidence``/``parse_evidence``), UTF-8, every line ending in "\\n"::

    dicomledger-equivocation/v1
    origin <the checkpoints' origin line>
    a <base64 of the first signed checkpoint note, verbatim>
    b <base64 of the second signed checkpoint note, verbatim>
    proof <base64 of a 32-byte hash>        (0 to 64 lines: the fork proof, in proof order)
    reason <one line of text, for humans>

Base64 is standard, padded and canonical (RFC 4648 section 4). The reason is informative only:
a receiver re-checks the notes and proof with ``check_equivocation`` and the origin's public key
before believing or forwarding anything.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dicomledger.common.errors import LedgerFormatError
from dicomledger.ledger.checkpoint import Checkpoint, CheckpointError, parse_checkpoint
from dicomledger.ledger.keychain import KeyChain, single_key
from dicomledger.ledger.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    MAX_TREE_SIZE,
    ProofError,
    consistency_proof_plan,
    node_hash,
    verify_consistency,
)
from dicomledger.ledger.note import (
    MAX_NOTE_BYTES,
    Note,
    NoteError,
    Signature,
    canonical_b64decode,
    cosign_checkpoint,
    parse_note,
)

# tlog-witness: "The client MUST NOT send more than 63 consistency proof lines"
MAX_PROOF_HASHES = 63
MAX_FORK_PROOF_HASHES = MAX_PROOF_HASHES + 1  # plus MTH(D[0:m]) for a power-of-two m
EVIDENCE_MAGIC = "dicomledger-equivocation/v1"
MAX_REASON_CHARS = 1024
MAX_EVIDENCE_BYTES = 3 * MAX_NOTE_BYTES  # two base64 notes (4/3 each) plus small lines
SIZE_CONTENT_TYPE = "text/x.tlog.size"  # tlog-witness: the 409 answer's Content-Type
_DECIMAL = re.compile(rb"0|[1-9][0-9]{0,18}")


@dataclass(frozen=True)
class WitnessState:
    """What a witness remembers per origin: the last checkpoint it cosigned."""

    origin: str
    size: int
    root_hash: bytes
    note: bytes  # that checkpoint's full signed note, verbatim (evidence if the origin forks)


@dataclass(frozen=True)
class Equivocation:
    """Two validly signed checkpoints of one origin that cannot both be true.

    ``consistency_proof`` is empty for same-size evidence, and the fork proof (see the module
    docstring) for checkpoints of different sizes.
    """

    origin: str
    note_a: bytes
    note_b: bytes
    reason: str
    consistency_proof: tuple[bytes, ...] = ()


class WitnessError(LedgerFormatError, ValueError):
    """A checkpoint was not cosigned or evidence was not accepted; the message says why."""

    status: int = 400  # tlog-witness "400 Bad Request"


class UnknownLogError(WitnessError):
    """tlog-witness: "If the checkpoint origin is unknown ... 404 Not Found"."""

    status = 404


class BadSignatureError(WitnessError):
    """tlog-witness 403: no signature from a trusted key for the origin, or one whose key name
    and ID match a trusted key but that fails to verify."""

    status = 403


class StaleError(WitnessError):
    """tlog-witness 409 Conflict: the old size is not the size last cosigned. ``size`` is that
    size (the response body, ``text/x.tlog.size``), so the requester can retry from it."""

    status = 409

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class InconsistentError(WitnessError):
    """tlog-witness 422: the new checkpoint does not provably extend the last one cosigned.
    ``evidence`` is set only when the failure proves equivocation (see the module docstring);
    gossip it, never a bare failure."""

    status = 422

    def __init__(self, message: str, evidence: Equivocation | None) -> None:
        super().__init__(message)
        self.evidence = evidence


def _read_note(data: bytes, what: str) -> tuple[Note, Checkpoint]:
    """Parse a signed checkpoint note strictly (signed-note "Format", tlog-checkpoint)."""
    try:
        note = parse_note(data)
        return note, parse_checkpoint(note.text)
    except (NoteError, CheckpointError) as exc:
        raise WitnessError(f"{what} is malformed: {exc}") from None


def checkpoint_origin(note: bytes) -> str:
    """The origin of a signed checkpoint note (unverified), so the caller can load the
    ``WitnessState`` to pass to ``witness_checkpoint``. WitnessError if malformed."""
    return _read_note(note, "checkpoint note")[1].origin


def _check_signed(note: Note, cp: Checkpoint, key: Ed25519PublicKey | KeyChain, what: str) -> None:
    """The note is signed by the origin's key, or with a key chain, by the key in force at
    the checkpoint's size (keychain.py: a log that rotated or replaced its key)."""
    chain = single_key(cp.origin, key)
    if not chain.signs_checkpoint(note, cp.size):
        changed = " in force at that size" if chain.changes else ""
        raise BadSignatureError(f"{what} has no valid signature by {cp.origin}'s key{changed}")


def _is_power_of_two(m: int) -> bool:
    return m > 0 and m & (m - 1) == 0


def _fork_proof_roots(
    m: int, n: int, old_root: bytes, proof: Sequence[bytes]
) -> tuple[bytes, bytes] | None:
    """(size-m root, size-n root) that ``proof`` leads to by RFC 9162 section 2.1.4.2, for
    0 < m < n; None if it has the wrong length or a hash that is not 32 bytes.

    For a power-of-two m, a proof one hash longer than the RFC one starts with MTH(D[0:m]);
    the RFC-length one gets ``old_root`` prepended as the RFC says (and so can never show a
    different size-m root).
    """
    expected = len(consistency_proof_plan(m, n))
    if any(not isinstance(h, bytes) or len(h) != HASH_SIZE for h in proof):
        return None
    if _is_power_of_two(m) and len(proof) == expected + 1:
        path = list(proof)
    elif len(proof) == expected:
        path = [old_root, *proof] if _is_power_of_two(m) else list(proof)
    else:
        return None
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return (fr, sr) if sn == 0 else None


def check_equivocation(
    note_a: bytes,
    note_b: bytes,
    consistency_proof: Sequence[bytes] | None,
    origin_key: Ed25519PublicKey | KeyChain,
) -> Equivocation | None:
    """Decide whether two signed checkpoints of one origin prove that it equivocated.

    Both notes must parse and carry a valid signature by ``origin_key`` under the same origin
    name (with a key chain: each by the key in force at its size), else WitnessError
    (unsigned claims prove nothing). Then:

    * same size: an Equivocation if the roots differ, else None;
    * different sizes m < n: None if the smaller is the empty tree (consistent with any tree,
      tlog-witness), an Equivocation if it claims size 0 with another root; with no proof,
      None (cannot decide); with a proof that verifies (merkle.verify_consistency), None;
      with a fork proof (module docstring), an Equivocation carrying it; any other proof
      proves nothing and gives None.
    """
    na, cpa = _read_note(note_a, "note a")
    nb, cpb = _read_note(note_b, "note b")
    if cpa.origin != cpb.origin:
        raise WitnessError(
            f"notes are from different origins {cpa.origin!r} and {cpb.origin!r}: not equivocation"
        )
    _check_signed(na, cpa, origin_key, "note a")
    _check_signed(nb, cpb, origin_key, "note b")
    origin = cpa.origin

    def found(reason: str, proof: Sequence[bytes] = ()) -> Equivocation:
        return Equivocation(origin, bytes(note_a), bytes(note_b), reason, tuple(proof))

    if cpa.size == cpb.size:
        if cpa.root_hash == cpb.root_hash:
            return None
        return found(
            f"two roots for size {cpa.size}: {cpa.root_hash.hex()[:16]}... "
            f"and {cpb.root_hash.hex()[:16]}..."
        )
    small, large = (cpa, cpb) if cpa.size < cpb.size else (cpb, cpa)
    if small.size == 0:
        if small.root_hash == EMPTY_ROOT:
            return None
        return found("a checkpoint of size 0 whose root is not the empty tree's")
    if consistency_proof is None or len(consistency_proof) > MAX_FORK_PROOF_HASHES:
        return None
    proof = list(consistency_proof)
    try:
        verify_consistency(small.size, large.size, small.root_hash, large.root_hash, proof)
        return None
    except ProofError:
        pass
    roots = _fork_proof_roots(small.size, large.size, small.root_hash, proof)
    if roots is None or roots[1] != large.root_hash or roots[0] == small.root_hash:
        return None
    return found(
        f"the size-{large.size} tree's first {small.size} leaves have root "
        f"{roots[0].hex()[:16]}..., not the signed {small.root_hash.hex()[:16]}...",
        proof,
    )


def _evidence_or_none(
    state: WitnessState,
    note: bytes,
    proof: Sequence[bytes] | None,
    key: Ed25519PublicKey | KeyChain,
) -> Equivocation | None:
    try:
        return check_equivocation(state.note, note, proof, key)
    except WitnessError:  # the stored note is unreadable: refuse, but without evidence
        return None


def witness_checkpoint(
    *,
    note: bytes,
    old_size: int,
    consistency_proof: Sequence[bytes],
    state: WitnessState | None,
    logs: Mapping[str, Ed25519PublicKey | KeyChain],
    witness_name: str,
    witness_key: Ed25519PrivateKey,
    now: int,
) -> tuple[Signature, WitnessState]:
    """tlog-witness "add-checkpoint": check ``note`` against ``state`` (the last checkpoint
    cosigned for its origin, None if never) and cosign it (tlog-cosignature/v1, timestamp
    ``now`` in POSIX seconds).

    ``logs``: the key of each origin followed, or its key chain (the checkpoint must then be
    signed by the key in force at its size). Returns the cosignature and the new state, which
    the caller must persist, atomically with having read ``state``, before answering. Raises
    the errors in the module docstring.
    """
    parsed, cp = _read_note(note, "checkpoint note")
    key = logs.get(cp.origin)
    if key is None:
        raise UnknownLogError(f"origin {cp.origin!r} is not a log this witness follows")
    _check_signed(parsed, cp, key, "checkpoint")
    if isinstance(old_size, bool) or not isinstance(old_size, int):
        raise WitnessError(f"old size {old_size!r} is not an integer")
    if not 0 <= old_size <= MAX_TREE_SIZE:
        raise WitnessError(f"old size {old_size} is outside 0..2**63-1")
    if old_size > cp.size:
        raise WitnessError(f"old size {old_size} is larger than the checkpoint's size {cp.size}")
    if len(consistency_proof) > MAX_PROOF_HASHES:
        raise WitnessError(
            f"consistency proof has {len(consistency_proof)} hashes, at most {MAX_PROOF_HASHES}"
        )
    if state is not None and state.origin != cp.origin:
        raise WitnessError(f"state is for origin {state.origin!r}, checkpoint is {cp.origin!r}")
    current = 0 if state is None else state.size
    if old_size != current:
        raise StaleError(
            f"old size {old_size} is not {current}, the size last cosigned for {cp.origin}",
            current,
        )
    if cp.size == 0 and cp.root_hash != EMPTY_ROOT:
        raise InconsistentError("a checkpoint of size 0 must have the empty tree's root", None)
    if state is None:
        if consistency_proof:
            raise InconsistentError(
                f"consistency proof from size 0 must be empty, has {len(consistency_proof)} hashes",
                None,
            )
    elif cp.size == state.size:
        if cp.root_hash != state.root_hash:
            raise InconsistentError(
                f"{cp.origin} signed two roots for size {cp.size}",
                _evidence_or_none(state, note, None, key),
            )
        if consistency_proof:
            raise InconsistentError("consistency proof between equal sizes must be empty", None)
    else:
        try:
            verify_consistency(
                state.size, cp.size, state.root_hash, cp.root_hash, list(consistency_proof)
            )
        except ProofError as exc:
            raise InconsistentError(
                f"size {cp.size} is not shown consistent with size {state.size} "
                f"last cosigned for {cp.origin}: {exc}",
                _evidence_or_none(state, note, consistency_proof, key),
            ) from None
    try:
        sig = cosign_checkpoint(parsed.text, witness_name, witness_key, now)
    except NoteError as exc:
        raise WitnessError(f"cannot cosign: {exc}") from None
    return sig, WitnessState(cp.origin, cp.size, cp.root_hash, bytes(note))


@dataclass(frozen=True)
class AddCheckpointRequest:
    """A tlog-witness add-checkpoint request body, parsed (``parse_add_checkpoint``)."""

    old_size: int
    consistency_proof: tuple[bytes, ...]
    note: bytes  # the signed checkpoint note, verbatim: witness_checkpoint checks it


def _decimal(text: bytes, what: str) -> int:
    """ASCII decimal without leading zeroes, at most 2**63-1 (tlog-witness "old size line")."""
    if not _DECIMAL.fullmatch(text) or int(text) > MAX_TREE_SIZE:
        raise WitnessError(
            f"{what} {text[:24]!r} is not a decimal in 0..2**63-1 without leading zeroes"
        )
    return int(text)


def format_add_checkpoint(old_size: int, consistency_proof: Sequence[bytes], note: bytes) -> bytes:
    """tlog-witness add-checkpoint request body: the old size line, one base64 line per proof
    hash, an empty line, the signed checkpoint note. WitnessError on what would not parse."""
    if (
        isinstance(old_size, bool)
        or not isinstance(old_size, int)
        or not 0 <= old_size <= MAX_TREE_SIZE
    ):
        raise WitnessError(f"old size {old_size!r} is not an integer in 0..2**63-1")
    if len(consistency_proof) > MAX_PROOF_HASHES:
        raise WitnessError(f"more than {MAX_PROOF_HASHES} consistency proof hashes")
    if any(not isinstance(h, bytes) or len(h) != HASH_SIZE for h in consistency_proof):
        raise WitnessError(f"consistency proof hashes must be {HASH_SIZE} bytes")
    lines = [f"old {old_size}", *(_b64(h) for h in consistency_proof), ""]
    return "".join(line + "\n" for line in lines).encode("ascii") + bytes(note)


def parse_add_checkpoint(body: bytes) -> AddCheckpointRequest:
    """Parse a tlog-witness add-checkpoint request body strictly; WitnessError (400) names the
    first fault. The note itself is parsed and checked by ``witness_checkpoint``.

    Refused: no ``old N`` first line (decimal without leading zeroes, at most 2**63-1), a
    proof line that is not canonical base64 of a 32-byte hash, more than 63 proof lines, no
    empty line after them, nothing after the empty line.
    """
    if not isinstance(body, bytes | bytearray):
        raise WitnessError("request body must be bytes")
    data = bytes(body)
    end = data.find(b"\n")
    if end < 0 or not data.startswith(b"old "):
        raise WitnessError("request body does not start with an old size line 'old <size>'")
    old_size = _decimal(data[4:end], "old size")
    proof: list[bytes] = []
    at = end + 1
    while True:
        end = data.find(b"\n", at)
        if end < 0:
            raise WitnessError("request body has no empty line before the checkpoint")
        line = data[at:end]
        at = end + 1
        if not line:
            break
        if len(proof) == MAX_PROOF_HASHES:
            raise WitnessError(f"more than {MAX_PROOF_HASHES} consistency proof lines")
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            raise WitnessError(f"consistency proof line {len(proof) + 1} is not base64") from None
        h = _unb64(text, f"consistency proof line {len(proof) + 1}")
        if len(h) != HASH_SIZE:
            raise WitnessError(
                f"consistency proof line {len(proof) + 1} is {len(h)} bytes, not {HASH_SIZE}"
            )
        proof.append(h)
    if at == len(data):
        raise WitnessError("request body has no checkpoint after the empty line")
    return AddCheckpointRequest(old_size, tuple(proof), data[at:])


def format_size(size: int) -> bytes:
    """tlog-witness 409 answer body (Content-Type ``text/x.tlog.size``): the size last
    cosigned, in decimal, and a newline."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_TREE_SIZE:
        raise WitnessError(f"size {size!r} is not an integer in 0..2**63-1")
    return b"%d\n" % size


def parse_size(body: bytes) -> int:
    """The size in a tlog-witness 409 answer body; WitnessError if it is not ``<decimal>\\n``."""
    if not isinstance(body, bytes | bytearray) or not bytes(body).endswith(b"\n"):
        raise WitnessError("size body must be a decimal and a newline")
    return _decimal(bytes(body)[:-1], "size")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(s: str, what: str) -> bytes:
    return canonical_b64decode(s, what, WitnessError)


def format_evidence(e: Equivocation) -> bytes:
    """Serialize evidence (format in the module docstring); WitnessError if it would not
    parse back (bad notes, origin mismatch, multi-line reason, too many proof hashes)."""
    try:
        lines = [
            EVIDENCE_MAGIC,
            f"origin {e.origin}",
            f"a {_b64(e.note_a)}",
            f"b {_b64(e.note_b)}",
            *(f"proof {_b64(h)}" for h in e.consistency_proof),
            f"reason {e.reason}",
        ]
        data = "".join(line + "\n" for line in lines).encode("utf-8")
    except (TypeError, UnicodeEncodeError) as exc:
        raise WitnessError(f"evidence cannot be encoded: {exc}") from None
    if parse_evidence(data) != e:
        raise WitnessError("evidence does not round-trip")  # e.g. bytearray fields
    return data


def parse_evidence(data: bytes) -> Equivocation:
    """Parse evidence strictly (format in the module docstring). Checks the structure, the
    size limits and that both notes are checkpoints of the stated origin; signatures and the
    claim itself are ``check_equivocation``'s job. Raises only WitnessError."""
    if not isinstance(data, bytes | bytearray):
        raise WitnessError("evidence must be bytes")
    if len(data) > MAX_EVIDENCE_BYTES:
        raise WitnessError(f"evidence is longer than {MAX_EVIDENCE_BYTES} bytes")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WitnessError(f"evidence is not valid UTF-8 (byte {exc.start})") from None
    for c in text:
        if ord(c) < 0x20 and c != "\n":
            raise WitnessError(f"evidence contains control character U+{ord(c):04X}")
    if not text.endswith("\n"):
        raise WitnessError("evidence does not end in a newline")
    lines = text[:-1].split("\n")
    if lines[0] != EVIDENCE_MAGIC:
        raise WitnessError(f"first line is {lines[0][:40]!r}, not {EVIDENCE_MAGIC!r}")
    if len(lines) < 5:
        raise WitnessError(f"evidence has {len(lines)} lines, needs at least 5")

    def field(n: int, label: str) -> str:
        if not lines[n].startswith(label + " "):
            raise WitnessError(f"line {n + 1} is not a {label!r} line")
        return lines[n][len(label) + 1 :]

    origin = field(1, "origin")
    notes = []
    for n, label in ((2, "a"), (3, "b")):
        raw = _unb64(field(n, label), f"note {label}")
        _, cp = _read_note(raw, f"note {label}")
        if cp.origin != origin:
            raise WitnessError(f"note {label} is from {cp.origin!r}, not {origin!r}")
        notes.append(raw)
    proof_lines = lines[4:-1]
    if len(proof_lines) > MAX_FORK_PROOF_HASHES:
        raise WitnessError(f"more than {MAX_FORK_PROOF_HASHES} proof lines")
    proof = []
    for i, _ in enumerate(proof_lines):
        h = _unb64(field(4 + i, "proof"), f"proof line {i + 1}")
        if len(h) != HASH_SIZE:
            raise WitnessError(f"proof line {i + 1} is {len(h)} bytes, not {HASH_SIZE}")
        proof.append(h)
    reason = field(len(lines) - 1, "reason")
    if not reason or len(reason) > MAX_REASON_CHARS:
        raise WitnessError(f"reason must be 1 to {MAX_REASON_CHARS} characters")
    return Equivocation(origin, notes[0], notes[1], reason, tuple(proof))
