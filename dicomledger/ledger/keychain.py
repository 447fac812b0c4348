"""A log's chain of signing keys: rotations and replacements. Pure functions, no I/O.

Every origin starts with one Ed25519 key, its *first key* (the vkey in ``trust.txt`` line 2
and in the peers' ``[[peers]]`` tables, which never change). Two entry kinds change the key
that signs the origin's later entries and checkpoints, and every verifier learns them from
the log itself, starting from the first key (docs/ledger-formats.md, "Key changes"):

    key-rotation:    {"new_key":VKEY,"new_key_sig":B64}
        the routine change. Signed as every entry, by the key in force before it (the old
        key), and by the new key: ``new_key_sig`` is its Ed25519 signature over
        ``"dicomledger/key-rotation/v1\\n" || canonical JSON of the entry object without
        "sig" and without payload.new_key_sig``, so it names the origin, index, previous
        hash and time it was made for. VKEY: the new key's signed-note verifier key (type
        0x01) under the origin's name.
    key-replacement: {"statement":B64}
        the old key is lost or stolen. A *replacement statement* (below) signed by the new
        key and by a quorum of the consortium's other gateways (a witness policy counts
        them). In the origin's own log it sits at the index the statement names and is
        signed by the new key (the old one cannot be trusted any more); in another
        gateway's log it records that gateway's decision.

Which key signs what: a change whose entry sits at index i is in force for every entry after
i and for every checkpoint of a size above i, i.e. for trees that contain it. The rotation
entry itself is signed by the old key; the replacement entry by the new one.

Replacement statement: a C2SP signed note whose text is

    dicomledger-key-replacement/v1
    origin <origin>
    size <s: the index of the replacement entry; the log keeps its first s entries>
    root <base64 RFC 6962 root of those s entries>
    old <vkey (type 0x01) of the key replaced: the one in force at size s>
    new <vkey (type 0x01) of the new key, under the origin's name>
    reason <1 to 256 characters, no control characters>

and whose signature lines are one by the new key (under the origin's name: the new key's
holder asks for it) and one per consenting gateway (a note signature, type 0x01, under its
origin name, by its current key). Its first line keeps it from ever parsing as a checkpoint.
"""

from __future__ import annotations

import base64
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dicomledger.common.errors import LedgerFormatError
from dicomledger.ledger.entries import (
    FORMAT_VERSION,
    KEY_REPLACEMENT,
    KEY_ROTATION,
    Entry,
    EntryError,
    canonical_json,
    verify_entry_signature,
)
from dicomledger.ledger.note import (
    SIG_ED25519,
    Note,
    NoteError,
    canonical_b64decode,
    format_note,
    key_id,
    parse_note,
    parse_verifier_key,
    sign_note_text,
    verifier_key,
    verify_note_signature,
)
from dicomledger.ledger.policy import WitnessPolicy

ROTATION_PREFIX = b"dicomledger/key-rotation/v1\n"
STATEMENT_MAGIC = "dicomledger-key-replacement/v1"
MAX_REASON_CHARS = 256
KEY_CHANGE_KINDS = frozenset({KEY_ROTATION, KEY_REPLACEMENT})


class KeyChangeError(LedgerFormatError, ValueError):
    """A key-rotation or key-replacement entry, or a replacement statement, is not acceptable;
    the message says why."""


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes_raw()


@dataclass(frozen=True)
class KeyChange:
    index: int  # index of the change entry in the origin's log
    key: Ed25519PublicKey  # in force for entries after it and checkpoints of sizes above it
    replaced: bool = False  # a replacement: the key before it may be in other hands


@dataclass(frozen=True)
class KeyChain:
    """An origin's keys: its first key and the changes its log made, in index order."""

    origin: str
    first: Ed25519PublicKey
    changes: tuple[KeyChange, ...] = ()

    def key_for_size(self, size: int) -> Ed25519PublicKey:
        """The key that signs a checkpoint of ``size``, and entry ``size`` unless that entry
        is a replacement: the last change at an index below ``size``."""
        key = self.first
        for change in self.changes:
            if change.index >= size:
                break
            key = change.key
        return key

    def entry_key(self, index: int) -> Ed25519PublicKey:
        """The key that signs entry ``index``: a replacement entry is signed by its new key."""
        change = self.change_at(index)
        if change is not None and change.replaced:
            return change.key
        return self.key_for_size(index)

    def change_at(self, index: int) -> KeyChange | None:
        return next((c for c in self.changes if c.index == index), None)

    @property
    def current(self) -> Ed25519PublicKey:
        return self.changes[-1].key if self.changes else self.first

    @property
    def last_index(self) -> int:
        """Index of the last change, -1 if none."""
        return self.changes[-1].index if self.changes else -1

    def keys(self) -> list[Ed25519PublicKey]:
        return [self.first, *(c.key for c in self.changes)]

    def trusted_keys(self) -> list[Ed25519PublicKey]:
        """Keys whose signatures still count wherever they are not tied to a log position
        (cosignatures, statements): every key but those a replacement took over from."""
        keys = self.keys()
        return [
            k for i, k in enumerate(keys) if not (i + 1 < len(keys) and self.changes[i].replaced)
        ]

    def with_change(self, change: KeyChange) -> KeyChain:
        """The chain with one more change, after every change it holds; KeyChangeError if
        it is not after them or would bring back a key the chain already used."""
        if change.index <= self.last_index:
            raise KeyChangeError(
                f"a key change at entry {change.index} of {self.origin} comes after the one at entry {self.last_index}"
            )
        if any(_raw(k) == _raw(change.key) for k in self.keys()):
            raise KeyChangeError(
                f"the new key of {self.origin} at entry {change.index} was used by this log before"
            )
        return replace(self, changes=(*self.changes, change))

    def signs_checkpoint(self, note: Note, size: int) -> bool:
        """Whether ``note`` carries a valid signature by the key in force at ``size``."""
        return verify_note_signature(note, self.origin, self.key_for_size(size))


def single_key(origin: str, key: Ed25519PublicKey | KeyChain) -> KeyChain:
    """A chain as given, or the one-key chain of a log that never changed its key."""
    return key if isinstance(key, KeyChain) else KeyChain(origin, key)


# -- key-rotation entries ------------------------------------------------------------------


def _rotation_message(entry: Entry, new_key_vkey: str) -> bytes:
    unsigned = {
        "v": FORMAT_VERSION,
        "origin": entry.origin,
        "index": entry.index,
        "prev": entry.prev.hex(),
        "time": entry.time_ms,
        "kind": KEY_ROTATION,
        "payload": {"new_key": new_key_vkey},
    }
    return ROTATION_PREFIX + canonical_json(unsigned)


def rotation_payload(
    *, origin: str, index: int, prev: bytes, time_ms: int, new_key: Ed25519PrivateKey
) -> dict[str, Any]:
    """The payload of a key-rotation entry at this place in ``origin``'s log, with the new
    key's signature; the entry itself is then signed by the old key."""
    vkey = verifier_key(origin, new_key.public_key())
    placeholder = Entry(origin, index, prev, time_ms, KEY_ROTATION, {}, b"")
    sig = new_key.sign(_rotation_message(placeholder, vkey))
    return {"new_key": vkey, "new_key_sig": base64.b64encode(sig).decode("ascii")}


def _payload_key(value: Any, origin: str, what: str) -> Ed25519PublicKey:
    if not isinstance(value, str):
        raise KeyChangeError(f"{what} must be a verifier key string")
    try:
        name, key = parse_verifier_key(value)
    except NoteError as exc:
        raise KeyChangeError(f"{what} is not a verifier key: {exc}") from None
    if name != origin:
        raise KeyChangeError(f"{what} is named {name!r}, not the log's origin {origin!r}")
    if value != verifier_key(origin, key):
        raise KeyChangeError(f"{what} must be a type 0x01 (note signature) verifier key")
    return key


def check_rotation(entry: Entry, old_key: Ed25519PublicKey) -> KeyChange:
    """A key-rotation entry's change, checked: fields, the new key's signature, and the
    entry's own signature by ``old_key`` (the key in force before it)."""
    if entry.kind != KEY_ROTATION:
        raise KeyChangeError(f"entry {entry.index} is a {entry.kind}, not a {KEY_ROTATION}")
    payload = entry.payload
    if set(payload) != {"new_key", "new_key_sig"}:
        raise KeyChangeError(
            f"key-rotation entry {entry.index}: payload fields must be new_key and new_key_sig"
        )
    new_key = _payload_key(
        payload["new_key"], entry.origin, f"key-rotation entry {entry.index}: new_key"
    )
    if _raw(new_key) == _raw(old_key):
        raise KeyChangeError(f"key-rotation entry {entry.index}: the new key is the old key")
    try:
        if not isinstance(payload["new_key_sig"], str):
            raise KeyChangeError("not a string")
        sig = canonical_b64decode(payload["new_key_sig"], "new_key_sig", KeyChangeError)
        new_key.verify(sig, _rotation_message(entry, payload["new_key"]))
    except (KeyChangeError, InvalidSignature):
        raise KeyChangeError(
            f"key-rotation entry {entry.index}: the new key's signature (new_key_sig) does not verify"
        ) from None
    try:
        verify_entry_signature(entry, old_key)
    except EntryError:
        raise KeyChangeError(
            f"key-rotation entry {entry.index} is not signed by the key in force before it"
        ) from None
    return KeyChange(entry.index, new_key)


# -- replacement statements -------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    origin: str
    size: int
    root: bytes
    old_key: Ed25519PublicKey
    new_key: Ed25519PublicKey
    reason: str
    note: Note = field(compare=False)

    @property
    def signers(self) -> list[str]:
        """Names on its signature lines other than the origin's (unverified)."""
        return sorted({s.name for s in self.note.signatures if s.name != self.origin})


def check_reason(reason: Any) -> str:
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
        raise KeyChangeError(f"reason must be 1 to {MAX_REASON_CHARS} characters")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in reason):
        raise KeyChangeError("reason contains a control character")
    return reason


def statement_text(
    origin: str,
    size: int,
    root: bytes,
    old_key: Ed25519PublicKey,
    new_key: Ed25519PublicKey,
    reason: str,
) -> str:
    lines = [
        STATEMENT_MAGIC,
        f"origin {origin}",
        f"size {size}",
        f"root {base64.b64encode(root).decode('ascii')}",
        f"old {verifier_key(origin, old_key)}",
        f"new {verifier_key(origin, new_key)}",
        f"reason {check_reason(reason)}",
    ]
    return "".join(line + "\n" for line in lines)


def make_statement(
    origin: str,
    size: int,
    root: bytes,
    old_key: Ed25519PublicKey,
    new_key: Ed25519PrivateKey,
    reason: str,
) -> bytes:
    """A new replacement statement, signed by the new key only (the consortium signs next)."""
    text = statement_text(origin, size, root, old_key, new_key.public_key(), reason)
    return format_note(Note(text, (sign_note_text(text, origin, new_key),)))


def add_statement_signature(note_bytes: bytes, name: str, key: Ed25519PrivateKey) -> bytes:
    """The statement with one more signature line, by ``name``'s ``key`` (replacing an older
    line by that name and key)."""
    statement = parse_statement(note_bytes)
    sig = sign_note_text(statement.note.text, name, key)
    kept = tuple(
        s for s in statement.note.signatures if (s.name, s.key_id) != (sig.name, sig.key_id)
    )
    return format_note(Note(statement.note.text, (*kept, sig)))


def parse_statement(note_bytes: bytes) -> Statement:
    """Parse a replacement statement strictly (format in the module docstring); signatures
    are checked by ``check_statement``."""
    try:
        note = parse_note(note_bytes)
    except NoteError as exc:
        raise KeyChangeError(f"replacement statement is not a signed note: {exc}") from None
    lines = note.text[:-1].split("\n")
    labels = ("origin", "size", "root", "old", "new", "reason")
    if len(lines) != 1 + len(labels) or lines[0] != STATEMENT_MAGIC:
        raise KeyChangeError(
            f"replacement statement must be the line {STATEMENT_MAGIC!r} and the lines {', '.join(labels)}"
        )
    values = {}
    for label, line in zip(labels, lines[1:], strict=True):
        if not line.startswith(label + " "):
            raise KeyChangeError(
                f"replacement statement: expected a {label!r} line, found {line[:40]!r}"
            )
        values[label] = line[len(label) + 1 :]
    origin = values["origin"]
    if (
        not values["size"].isdigit()
        or values["size"] != str(int(values["size"]))
        or int(values["size"]) >= 2**63
    ):
        raise KeyChangeError(
            f"replacement statement: size {values['size'][:24]!r} is not a decimal"
        )
    root = canonical_b64decode(values["root"], "replacement statement root", KeyChangeError)
    if len(root) != 32:
        raise KeyChangeError("replacement statement: root is not 32 bytes")
    old_key = _payload_key(values["old"], origin, "replacement statement: old")
    new_key = _payload_key(values["new"], origin, "replacement statement: new")
    if _raw(old_key) == _raw(new_key):
        raise KeyChangeError("replacement statement: the new key is the old key")
    return Statement(
        origin, int(values["size"]), root, old_key, new_key, check_reason(values["reason"]), note
    )


def check_statement(
    note_bytes: bytes,
    policy: WitnessPolicy | None,
    signer_keys: Callable[[str], Sequence[Ed25519PublicKey]] = lambda name: (),
) -> Statement:
    """Parse a statement and check its signatures: the new key's, and enough consortium
    gateways' to meet ``policy``'s quorum. A gateway counts when its signature line verifies
    with the key the policy lists for it (its first key) or one of ``signer_keys(name)``
    (the later keys of its own chain); the origin never counts for itself. KeyChangeError
    names the witnesses that are missing."""
    statement = parse_statement(note_bytes)
    if not verify_note_signature(statement.note, statement.origin, statement.new_key):
        raise KeyChangeError(
            f"replacement statement for {statement.origin} is not signed by its new key"
        )
    if policy is None:
        raise KeyChangeError(
            "a key replacement needs a witness policy to count the gateways that signed it; none is configured"
        )
    signed: set[str] = set()
    for witness in policy.witnesses:
        if witness.key_name == statement.origin or witness.key_name in signed:
            continue
        for key in (witness.key, *signer_keys(witness.key_name)):
            if _signs(statement.note, witness.key_name, key):
                signed.add(witness.key_name)
                break
    shortfall = policy.shortfall(signed)
    if shortfall is not None:
        shortfall = shortfall.replace("missing cosignatures from", "missing signatures from")
        raise KeyChangeError(
            f"replacement statement for {statement.origin} lacks a quorum: {shortfall}"
        )
    return statement


def _signs(note: Note, name: str, key: Ed25519PublicKey) -> bool:
    kid = key_id(name, key, SIG_ED25519)
    return any(
        s.name == name and s.key_id == kid for s in note.signatures
    ) and verify_note_signature(note, name, key)


def changes_key_of(origin: str, kind: str, payload: Mapping[str, Any]) -> bool:
    """Whether an entry of ``origin``'s log with this kind and payload changes that log's
    key (a rotation, or a replacement of its own key) rather than recording another
    gateway's replacement. A malformed replacement counts as a change, to be refused."""
    if kind == KEY_ROTATION:
        return True
    if kind != KEY_REPLACEMENT:
        return False
    try:
        return (
            parse_statement(statement_of(Entry(origin, 0, b"", 0, kind, payload, b""))).origin
            == origin
        )
    except KeyChangeError:
        return True


def replacement_payload(statement: bytes) -> dict[str, Any]:
    return {"statement": base64.b64encode(statement).decode("ascii")}


def statement_of(entry: Entry) -> bytes:
    """The statement a key-replacement entry carries (bytes, unchecked)."""
    if entry.kind != KEY_REPLACEMENT:
        raise KeyChangeError(f"entry {entry.index} is a {entry.kind}, not a {KEY_REPLACEMENT}")
    if set(entry.payload) != {"statement"} or not isinstance(entry.payload["statement"], str):
        raise KeyChangeError(
            f"key-replacement entry {entry.index}: the payload must be one field, statement"
        )
    return canonical_b64decode(entry.payload["statement"], "statement", KeyChangeError)


def check_replacement(
    entry: Entry,
    chain: KeyChain,
    root: bytes,
    policy: WitnessPolicy | None,
    signer_keys: Callable[[str], Sequence[Ed25519PublicKey]] = lambda name: (),
) -> KeyChange:
    """A key-replacement entry *in the origin's own log* (at the index its statement names):
    the statement meets the quorum, pins ``root`` (the root of the entries before it), names
    the key ``chain`` has in force there as the old one, and the entry is signed by the new."""
    statement = check_statement(statement_of(entry), policy, signer_keys)
    where = f"key-replacement entry {entry.index} of {entry.origin}"
    if statement.origin != entry.origin or statement.size != entry.index:
        raise KeyChangeError(
            f"{where}: its statement is for {statement.origin} at size {statement.size}, not this place"
        )
    if statement.root != root:
        raise KeyChangeError(
            f"{where}: its statement pins another history (root) than the log's first {entry.index} entries"
        )
    if _raw(statement.old_key) != _raw(chain.key_for_size(entry.index)):
        raise KeyChangeError(
            f"{where}: its statement replaces a key that is not the one in force there"
        )
    try:
        verify_entry_signature(entry, statement.new_key)
    except EntryError:
        raise KeyChangeError(f"{where} is not signed by the new key its statement names") from None
    return KeyChange(entry.index, statement.new_key, replaced=True)


def given(root: bytes) -> Callable[[], bytes]:
    """A ``root`` for ``check_change`` known in advance."""
    return lambda: root


def check_change(
    entry: Entry,
    chain: KeyChain,
    *,
    root: Callable[[], bytes],
    policy: WitnessPolicy | None,
    signer_keys: Callable[[str], Sequence[Ed25519PublicKey]] = lambda name: (),
) -> KeyChain:
    """``chain`` extended by ``entry``, a key-rotation or key-replacement entry of the
    chain's origin at its place (``root()``: the root of the entries before it, needed for a
    replacement only); the entry's own signature is checked here. A replacement the chain
    already holds (learnt ahead from another log) must name the same new key."""
    if entry.origin != chain.origin:
        raise KeyChangeError(f"entry of {entry.origin} is not in the log of {chain.origin}")
    if entry.kind == KEY_ROTATION:
        change = check_rotation(entry, chain.key_for_size(entry.index))
    else:
        change = check_replacement(entry, chain, root(), policy, signer_keys)
    known = chain.change_at(entry.index)
    if known is not None:
        if not known.replaced or not change.replaced or _raw(known.key) != _raw(change.key):
            raise KeyChangeError(
                f"entry {entry.index} of {entry.origin} changes the key otherwise than the replacement "
                "statement already accepted for that place"
            )
        return chain
    return chain.with_change(change)


def chain_from_entries(
    origin: str,
    first: Ed25519PublicKey,
    entries: Iterable[Entry],
    *,
    roots: Mapping[int, bytes] | None = None,
    policy: WitnessPolicy | None = None,
    signer_keys: Callable[[str], Sequence[Ed25519PublicKey]] = lambda name: (),
) -> KeyChain:
    """The chain from ``first`` through these change entries (index order), each checked;
    ``roots``: for each replacement, the root of the entries before it (without it, the
    root a replacement statement pins is taken as given: a trust file holds no tree)."""
    chain = KeyChain(origin, first)
    known_roots = roots or {}
    for entry in sorted(entries, key=lambda e: e.index):
        if entry.kind == KEY_REPLACEMENT and roots is None:
            pinned = parse_statement(statement_of(entry)).root
            chain = check_change(
                entry, chain, root=given(pinned), policy=policy, signer_keys=signer_keys
            )
        else:
            chain = check_change(
                entry,
                chain,
                root=partial(known_roots.__getitem__, entry.index),
                policy=policy,
                signer_keys=signer_keys,
            )
    return chain


# -- the request file that travels between the consortium's administrators ------------------

REQUEST_MAGIC = "dicomledger-key-replacement-request/v1"
MAX_REQUEST_BYTES = 16 << 20


@dataclass(frozen=True)
class Request:
    """A replacement statement on its way round the consortium, with the origin's entries
    from ``tail_start`` to the statement's size: a signer that holds fewer of them than the
    statement keeps checks the rest against its own copy (each signed by the key in force,
    chained, and together giving the statement's root)."""

    tail_start: int
    tail: tuple[bytes, ...]
    statement: bytes  # the statement note, with the signatures gathered so far


def format_request(request: Request) -> bytes:
    """``REQUEST_MAGIC``, ``tail <start>``, one base64 entry per line, an empty line, then
    the statement note verbatim."""
    lines = [
        REQUEST_MAGIC,
        f"tail {request.tail_start}",
        *(base64.b64encode(e).decode("ascii") for e in request.tail),
    ]
    return "".join(line + "\n" for line in lines).encode("ascii") + b"\n" + request.statement


def parse_request(data: bytes) -> Request:
    """Parse a request file strictly; the statement is parsed (not checked) too."""
    if len(data) > MAX_REQUEST_BYTES:
        raise KeyChangeError(f"request file is longer than {MAX_REQUEST_BYTES} bytes")
    head, sep, statement = data.partition(b"\n\n")
    try:
        lines = head.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise KeyChangeError("request file: the lines before the statement are not ASCII") from None
    if not sep or lines[0] != REQUEST_MAGIC or len(lines) < 2 or not lines[1].startswith("tail "):
        raise KeyChangeError(
            f"not a key replacement request: it must start with {REQUEST_MAGIC!r} and a 'tail' line"
        )
    start = lines[1][len("tail ") :]
    if not start.isdigit() or start != str(int(start)):
        raise KeyChangeError(f"request file: tail start {start[:24]!r} is not a decimal")
    tail = tuple(
        canonical_b64decode(line, f"request file: tail entry {n}", KeyChangeError)
        for n, line in enumerate(lines[2:])
    )
    parsed = parse_statement(statement)
    if int(start) + len(tail) != parsed.size:
        raise KeyChangeError(
            f"request file: its tail ends at {int(start) + len(tail)}, not at the statement's size {parsed.size}"
        )
    return Request(int(start), tail, statement)
