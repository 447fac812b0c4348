"""C2SP signed-note (Ed25519, type 0x01) and tlog-cosignature/v1 (type 0x04). Pure, no I/O.

A signed note (c2sp.org/signed-note, "Format") is UTF-8 text ending in a newline, a blank
line, then one or more lines ``— <key name> base64(key ID || signature)``. The key ID is
``SHA-256(name || 0x0A || type || public key)[:4]`` ("Signatures"); a verifier key (vkey) is
``name+hex(key ID)+base64(type || public key)`` ("Verifier keys").

A cosignature (c2sp.org/tlog-cosignature, "Format", "Ed25519 signed message") is a note
signature of type 0x04 whose bytes after the key ID are ``u64 timestamp (big-endian) ||
Ed25519 signature`` over ``"cosignature/v1\\ntime <timestamp>\\n" || checkpoint text``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dicomledger.common.errors import LedgerFormatError
from dicomledger.ledger.checkpoint import CheckpointError, parse_checkpoint

SIG_ED25519 = 0x01
SIG_COSIGNATURE_V1 = 0x04
MAX_NOTE_BYTES = 1 << 20  # a checkpoint with 100 post-quantum signatures still fits
MAX_SIGNATURES = 100  # the spec requires accepting at least 16
MAX_TIMESTAMP = 2**63 - 1  # tlog-cosignature: "It MUST NOT exceed 2^63 - 1"
_DASH = "\u2014 "  # em dash, space


class NoteError(LedgerFormatError, ValueError):
    """A note, signature line or verifier key is malformed; the message says how."""


@dataclass(frozen=True)
class Signature:
    name: str
    key_id: bytes  # 4 bytes
    data: bytes  # the signature bytes after the key ID


@dataclass(frozen=True)
class Note:
    text: str  # ends in "\n"; excludes the blank separator line
    signatures: tuple[Signature, ...]


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def canonical_b64decode(s: str, what: str, error: type[ValueError] = NoteError) -> bytes:
    """Standard, padded, canonical base64 (RFC 4648 section 4), or ``error`` naming ``what``.

    Shared by every ledger text format (notes, proof files, evidence)."""
    try:
        raw = base64.b64decode(s.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise error(f"{what} is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != s:
        raise error(f"{what} is not canonical base64")
    return raw


def check_key_name(name: str) -> None:
    """signed-note "Format": key names are non-empty, without Unicode spaces or "+"."""
    if not isinstance(name, str) or not name:
        raise NoteError("key name is empty")
    if "+" in name or any(c.isspace() for c in name):
        raise NoteError(f"key name {name!r} contains a space or '+'")
    if any(ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise NoteError(f"key name {name!r} contains a control character or a lone surrogate")


def check_note_text(text: str) -> None:
    """signed-note "Format": the text ends in a newline and has no control character but
    newline (UTF-8 validity is a property of ``str``, checked when decoding bytes)."""
    if not isinstance(text, str) or not text.endswith("\n"):
        raise NoteError("note text must end in a newline")
    for c in text:
        if ord(c) < 0x20 and c != "\n":
            raise NoteError(f"note text contains control character U+{ord(c):04X}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise NoteError("note text is not valid Unicode (lone surrogate)") from None
    if size > MAX_NOTE_BYTES:
        raise NoteError(f"note text is longer than {MAX_NOTE_BYTES} bytes")


def key_id(name: str, public_key: Ed25519PublicKey, sig_type: int = SIG_ED25519) -> bytes:
    """signed-note "Signatures": SHA-256(key name || 0x0A || type || public key)[:4]."""
    if not 0 <= sig_type <= 0xFF:
        raise ValueError(f"signature type {sig_type} is not a byte")
    h = hashes.Hash(hashes.SHA256())
    h.update(name.encode("utf-8") + b"\n" + bytes([sig_type]) + _raw(public_key))
    return h.finalize()[:4]


def verifier_key(name: str, public_key: Ed25519PublicKey, sig_type: int = SIG_ED25519) -> str:
    """signed-note "Verifier keys": ``name+hex8(key ID)+base64(type || public key)``.

    Type 0x01 (the default) verifies note signatures; type 0x04 is the same key as a
    tlog-cosignature/v1 cosigner, the form standard witnesses publish their keys in.
    """
    check_key_name(name)
    if sig_type not in (SIG_ED25519, SIG_COSIGNATURE_V1):
        raise NoteError(f"signature type 0x{sig_type:02x} is not Ed25519 (0x01 or 0x04)")
    kid = key_id(name, public_key, sig_type)
    material = bytes([sig_type]) + _raw(public_key)
    return f"{name}+{kid.hex()}+{base64.b64encode(material).decode('ascii')}"


def parse_verifier_key(vkey: str) -> tuple[str, Ed25519PublicKey]:
    """Parse a vkey (signed-note "Verifier keys") into (name, Ed25519 public key).

    Accepts type 0x01 (Ed25519 note signatures) and, as tlog-cosignature allows for Ed25519
    cosigners, type 0x04; the key ID must match the one computed for that type. Anything
    else (wrong part count, non-canonical encodings, other types, wrong length) is a
    NoteError.
    """
    if not isinstance(vkey, str):
        raise NoteError("verifier key is not a string")
    parts = vkey.split("+", 2)  # the base64 part may itself contain "+"
    if len(parts) != 3:
        raise NoteError(f"verifier key {vkey!r} does not have the form name+keyid+key")
    name, hex_id, b64 = parts
    check_key_name(name)
    if len(hex_id) != 8 or any(c not in "0123456789abcdef" for c in hex_id):
        raise NoteError(f"verifier key {name!r}: key ID {hex_id!r} is not 8 lowercase hex digits")
    material = canonical_b64decode(b64, f"verifier key {name!r}: key material")
    if not material or material[0] not in (SIG_ED25519, SIG_COSIGNATURE_V1):
        kind = f"0x{material[0]:02x}" if material else "none"
        raise NoteError(
            f"verifier key {name!r}: signature type {kind} is not Ed25519 (0x01 or 0x04)"
        )
    if len(material) != 33:
        raise NoteError(f"verifier key {name!r}: Ed25519 key is {len(material) - 1} bytes, not 32")
    try:
        public_key = Ed25519PublicKey.from_public_bytes(material[1:])
    except ValueError:
        raise NoteError(f"verifier key {name!r}: not an Ed25519 public key") from None
    if key_id(name, public_key, material[0]) != bytes.fromhex(hex_id):
        raise NoteError(f"verifier key {name!r}: key ID {hex_id} does not match the key")
    return name, public_key


def sign_note_text(text: str, name: str, private_key: Ed25519PrivateKey) -> Signature:
    """signed-note "Ed25519 signatures": Ed25519 (RFC 8032) over the note text."""
    check_note_text(text)
    check_key_name(name)
    return Signature(name, key_id(name, private_key.public_key()), private_key.sign(text.encode()))


def _signature_line(sig: Signature) -> str:
    check_key_name(sig.name)
    if len(sig.key_id) != 4 or not sig.data:
        raise NoteError(f"signature by {sig.name!r} needs a 4-byte key ID and signature bytes")
    return f"{_DASH}{sig.name} {base64.b64encode(sig.key_id + sig.data).decode('ascii')}\n"


def format_signature_lines(signatures: Sequence[Signature]) -> bytes:
    """Note signature lines alone, each ``— name base64(key ID || signature)\n``: the body of
    a tlog-witness add-checkpoint answer (c2sp.org/tlog-witness)."""
    if not signatures:
        raise NoteError("no signature lines to format")
    return "".join(_signature_line(s) for s in signatures).encode()


def format_note(note: Note) -> bytes:
    """signed-note "Format": text, a blank line, one signature line per signature."""
    check_note_text(note.text)
    if not note.signatures:
        raise NoteError("a signed note needs at least one signature")
    if len(note.signatures) > MAX_SIGNATURES:
        raise NoteError(f"more than {MAX_SIGNATURES} signatures")
    data = (note.text + "\n" + "".join(_signature_line(s) for s in note.signatures)).encode()
    if len(data) > MAX_NOTE_BYTES:
        raise NoteError(f"note is longer than {MAX_NOTE_BYTES} bytes")
    return data


def parse_note(data: bytes) -> Note:
    """Parse a signed note strictly (signed-note "Format"); signatures are not verified.

    Rejects: more than MAX_NOTE_BYTES or MAX_SIGNATURES, invalid UTF-8, control characters
    other than newline, no blank line, no signature line, a line in the signature block that
    is not ``— name base64``, bad key names, non-canonical base64, and signatures shorter
    than a key ID plus one byte.
    """
    if not isinstance(data, bytes | bytearray):
        raise NoteError("note must be bytes")
    if len(data) > MAX_NOTE_BYTES:
        raise NoteError(f"note is longer than {MAX_NOTE_BYTES} bytes")
    try:
        s = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NoteError(f"note is not valid UTF-8 (byte {exc.start})") from None
    for c in s:
        if ord(c) < 0x20 and c != "\n":
            raise NoteError(f"note contains control character U+{ord(c):04X}")
    if not s.endswith("\n"):
        raise NoteError("note does not end in a newline")
    split = s.rfind("\n\n")
    if split < 0:
        raise NoteError("note has no blank line before its signatures")
    text, block = s[: split + 1], s[split + 2 :]
    if not block:
        raise NoteError("note has no signature lines")
    return Note(text, _parse_signature_block(block))


def _parse_signature_block(block: str) -> tuple[Signature, ...]:
    """Signature lines, each ending in a newline, at least one and at most MAX_SIGNATURES."""
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"note has more than {MAX_SIGNATURES} signatures")
    sigs = []
    for n, line in enumerate(lines, 1):
        if not line.startswith(_DASH):
            raise NoteError(f"signature line {n} does not start with an em dash and a space")
        name, sep, b64 = line[len(_DASH) :].partition(" ")
        if not sep:
            raise NoteError(f"signature line {n} has no space between key name and signature")
        check_key_name(name)
        raw = canonical_b64decode(b64, f"signature line {n}")
        if len(raw) < 5:
            raise NoteError(f"signature line {n} is too short for a key ID and a signature")
        sigs.append(Signature(name, raw[:4], raw[4:]))
    return tuple(sigs)


def parse_signature_lines(data: bytes) -> tuple[Signature, ...]:
    """Parse note signature lines alone (a tlog-witness add-checkpoint answer) as strictly as
    the signature block of ``parse_note``; signatures are not verified. NoteError if the
    bytes are not one or more lines ``— name base64``, each ending in a newline."""
    if not isinstance(data, bytes | bytearray):
        raise NoteError("signature lines must be bytes")
    if len(data) > MAX_NOTE_BYTES:
        raise NoteError(f"signature lines are longer than {MAX_NOTE_BYTES} bytes")
    try:
        s = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NoteError(f"signature lines are not valid UTF-8 (byte {exc.start})") from None
    for c in s:
        if ord(c) < 0x20 and c != "\n":
            raise NoteError(f"signature lines contain control character U+{ord(c):04X}")
    if not s or not s.endswith("\n"):
        raise NoteError("signature lines must be one or more lines, each ending in a newline")
    return _parse_signature_block(s)


def _ed25519_ok(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    if len(signature) != 64:
        return False
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def verify_note_signature(note: Note, name: str, public_key: Ed25519PublicKey) -> bool:
    """True iff the note has a type-0x01 signature line by this key (name and key ID match)
    and every such line verifies (signed-note "Signatures": a failing signature from a known
    key SHOULD reject the note). Lines by other keys are ignored. Never raises on bad bytes.
    """
    kid = key_id(name, public_key)
    message = note.text.encode("utf-8")
    mine = [s for s in note.signatures if s.name == name and s.key_id == kid]
    return bool(mine) and all(_ed25519_ok(public_key, s.data, message) for s in mine)


def _cosigned_message(checkpoint_text: str, timestamp: int) -> bytes:
    """tlog-cosignature "Ed25519 signed message"."""
    return f"cosignature/v1\ntime {timestamp}\n{checkpoint_text}".encode()


def cosign_checkpoint(
    checkpoint_text: str, name: str, private_key: Ed25519PrivateKey, timestamp: int
) -> Signature:
    """A tlog-cosignature/v1 Ed25519 cosignature (type 0x04) on a checkpoint's note text.

    Signs only what it is given; the caller (a witness) must first have checked that the
    checkpoint is consistent with the last one it cosigned for that origin.
    """
    check_key_name(name)
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise NoteError("cosignature timestamp must be an int")
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise NoteError(f"cosignature timestamp {timestamp} is outside 0..2**63-1")
    check_note_text(checkpoint_text)
    try:
        parse_checkpoint(checkpoint_text)
    except CheckpointError as exc:
        raise NoteError(f"refusing to cosign a malformed checkpoint: {exc}") from None
    sig = private_key.sign(_cosigned_message(checkpoint_text, timestamp))
    kid = key_id(name, private_key.public_key(), SIG_COSIGNATURE_V1)
    return Signature(name, kid, timestamp.to_bytes(8, "big") + sig)


def cosignature_timestamp(sig: Signature) -> int | None:
    """The timestamp a cosignature/v1 signature claims (unverified), or None if malformed."""
    if len(sig.data) != 8 + 64:
        return None
    ts = int.from_bytes(sig.data[:8], "big")
    return ts if ts <= MAX_TIMESTAMP else None


def verify_cosignature(
    checkpoint_text: str, sig: Signature, name: str, public_key: Ed25519PublicKey
) -> int | None:
    """The cosignature's timestamp if ``sig`` is a valid tlog-cosignature/v1 signature by
    (``name``, ``public_key``) on ``checkpoint_text``; None otherwise. Never raises on bad
    signature bytes."""
    if sig.name != name or sig.key_id != key_id(name, public_key, SIG_COSIGNATURE_V1):
        return None
    ts = cosignature_timestamp(sig)
    if ts is None:
        return None
    if not _ed25519_ok(public_key, sig.data[8:], _cosigned_message(checkpoint_text, ts)):
        return None
    return ts
