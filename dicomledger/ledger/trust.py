"""Trust files: the keys of logs and witnesses a verifier trusts, and its witness policy.

A trust file holds, one per line (blank lines and lines starting with ``#``, after optional
spaces, are ignored):

- a bare verifier key (signed-note vkey): trusted both as a log (checkpoints of the origin
  of that name) and as a witness (cosignatures by that name), as before policies existed;
- C2SP tlog-policy lines (``log``, ``witness``, ``group``, ``quorum``; see ``policy.py``).
  The policy lines of a trust file, taken alone, form a tlog-policy file, so a tlog-policy
  file is itself a trust file. A trust file with policy lines has exactly one quorum line;
- ``key-change <base64 entry>``: a key-rotation or key-replacement entry of a log whose
  first key the file lists (``keychain.py``). The log's key chain follows them from that
  first key, each checked against the key before it (a replacement: against the policy's
  quorum), so a verifier accepts checkpoints and entries signed by the later keys where the
  log put them, and a gateway's cosignatures by its later keys. `rotate-key` appends its
  line to the gateway's own ``trust.txt``.

One key name stands for one key across the whole file.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dicomledger.ledger.entries import KEY_ROTATION, Entry, EntryError, decode_entry
from dicomledger.ledger.keychain import (
    KeyChain,
    KeyChangeError,
    check_change,
    given,
    parse_statement,
    statement_of,
)
from dicomledger.ledger.note import (
    SIG_COSIGNATURE_V1,
    NoteError,
    canonical_b64decode,
    parse_verifier_key,
    verifier_key,
)
from dicomledger.ledger.policy import (
    PolicyError,
    WitnessPolicy,
    is_policy_line,
    parse_policy_lines,
)

KEY_CHANGE = "key-change"


def key_change_line(entry: bytes) -> str:
    """The trust-file line that carries a key-rotation or key-replacement entry."""
    return f"{KEY_CHANGE} {base64.b64encode(entry).decode('ascii')}"


@dataclass(frozen=True)
class Trust:
    logs: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)  # by origin: first keys
    witnesses: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)  # by key name
    policy: WitnessPolicy | None = None
    key_changes: tuple[tuple[int, bytes], ...] = ()  # (line number, entry) of key-change lines

    @cached_property
    def chains(self) -> dict[str, KeyChain]:
        """The key chain of every log with key-change lines, each change checked in order
        from the log's first key; NoteError naming the line of one that does not verify."""
        entries: dict[str, list[tuple[int, Entry]]] = {}
        for n, data in self.key_changes:
            try:
                entry = decode_entry(data)
            except EntryError as exc:
                raise NoteError(f"trust line {n}: {exc}") from None
            if entry.origin not in self.logs:
                raise NoteError(
                    f"trust line {n}: a key change of {entry.origin}, whose first key the trust file lacks"
                )
            entries.setdefault(entry.origin, []).append((n, entry))
        rotated = {
            o: self._chain(o, found, None, lambda name: (), rotations_only=True)
            for o, found in entries.items()
        }
        return {
            o: self._chain(
                o,
                found,
                self.policy,
                lambda name: rotated[name].trusted_keys() if name in rotated else [],
            )
            for o, found in entries.items()
        }

    def _chain(
        self,
        origin: str,
        found: list[tuple[int, Entry]],
        policy: WitnessPolicy | None,
        signer_keys: Callable[[str], Sequence[Ed25519PublicKey]],
        rotations_only: bool = False,
    ) -> KeyChain:
        """The chain through ``found``; with ``rotations_only``, up to its first replacement
        (the signers' own chains, for counting a replacement's signers)."""
        chain = KeyChain(origin, self.logs[origin])
        for n, entry in sorted(found, key=lambda item: item[1].index):
            if rotations_only and entry.kind != KEY_ROTATION:
                break
            try:
                pinned = (
                    parse_statement(statement_of(entry)).root if entry.kind != KEY_ROTATION else b""
                )
                chain = check_change(
                    entry, chain, root=given(pinned), policy=policy, signer_keys=signer_keys
                )
            except KeyChangeError as exc:
                raise NoteError(f"trust line {n}: {exc}") from None
        return chain

    def log_chain(self, origin: str) -> KeyChain | None:
        """The trusted key chain of ``origin``'s log (one key without key-change lines)."""
        if origin not in self.logs:
            return None
        return self.chains.get(origin) or KeyChain(origin, self.logs[origin])

    def witness_keys(self) -> dict[str, list[Ed25519PublicKey]]:
        """Each witness's keys by key name: the one the file lists and, for a gateway whose
        log has key-change lines, its later keys (those a replacement took over from left out)."""
        found: dict[str, list[Ed25519PublicKey]] = {}
        for name, key in self.witnesses.items():
            keys = [key]
            chain = self.chains.get(name)
            if chain is not None:
                replaced = {k.public_bytes_raw() for k in chain.keys()} - {
                    k.public_bytes_raw() for k in chain.trusted_keys()
                }
                keys = [k for k in keys if k.public_bytes_raw() not in replaced]
                keys += [
                    k
                    for k in chain.trusted_keys()
                    if all(k.public_bytes_raw() != m.public_bytes_raw() for m in keys)
                ]
            found[name] = keys
        return found

    def keys(self) -> dict[str, Ed25519PublicKey]:
        """Every trusted key by name, logs' and witnesses' alike."""
        return {**self.logs, **self.witnesses}

    def merged(self, other: Trust, what: str = "trust files") -> Trust:
        """Both files' keys (one key per name) and the one policy they hold between them."""
        if self.policy is not None and other.policy is not None:
            raise NoteError(f"{what}: two witness policies given; keep one quorum line")
        mine = self.keys()
        for name, key in other.keys().items():
            if name in mine and mine[name].public_bytes_raw() != key.public_bytes_raw():
                raise NoteError(f"{what}: key name {name!r} stands for two different keys")
        return Trust(
            {**self.logs, **other.logs},
            {**self.witnesses, **other.witnesses},
            self.policy or other.policy,
            self.key_changes + other.key_changes,
        )


def load_trust(text: str) -> Trust:
    """Parse a trust file; NoteError naming the line on a malformed vkey or policy line, or
    a key name given twice (bare vkeys) or for two different keys."""
    bare: dict[str, Ed25519PublicKey] = {}
    first_line: dict[str, int] = {}
    policy_lines: list[tuple[int, str]] = []
    changes: list[tuple[int, bytes]] = []
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(KEY_CHANGE + " "):
            changes.append(
                (
                    n,
                    canonical_b64decode(
                        line[len(KEY_CHANGE) + 1 :].strip(), f"trust line {n}: {KEY_CHANGE}"
                    ),
                )
            )
            continue
        if is_policy_line(raw):
            policy_lines.append((n, raw))
            continue
        try:
            name, key = parse_verifier_key(line)
        except NoteError as exc:
            raise NoteError(f"trust line {n}: {exc}") from None
        if name in bare:
            raise NoteError(
                f"trust line {n}: key name {name!r} already given on line {first_line[name]}"
            )
        bare[name], first_line[name] = key, n
    trust = Trust(dict(bare), dict(bare), key_changes=tuple(changes))
    if not policy_lines:
        return trust
    try:
        policy = parse_policy_lines(policy_lines, "trust line")
    except PolicyError as exc:
        raise NoteError(str(exc)) from None
    from_policy = Trust(
        {log.key_name: log.key for log in policy.logs},
        {w.key_name: w.key for w in policy.witnesses},
        policy,
    )
    return trust.merged(from_policy, "trust file")


def load_trust_text(text: str) -> dict[str, Ed25519PublicKey]:
    """Every key of a trust file by name (see ``load_trust`` for its policy)."""
    return load_trust(text).keys()


def format_trust_text(vkeys: Iterable[str]) -> str:
    """One vkey per line, each checked with ``parse_verifier_key``, names distinct."""
    lines, names = [], set()
    for vkey in vkeys:
        name, _ = parse_verifier_key(vkey)
        if name in names:
            raise NoteError(f"key name {name!r} given twice")
        names.add(name)
        lines.append(vkey + "\n")
    return "".join(lines)


def render_trust_file(origin: str, public_key: Ed25519PublicKey) -> str:
    """The trust.txt `dicomledger init` writes: the gateway's verifier key on line 2, then a
    commented witness policy to complete, and the line other gateways' policies need to
    name this gateway as a witness."""
    vkey = verifier_key(origin, public_key)
    witness = verifier_key(origin, public_key, SIG_COSIGNATURE_V1)
    return f"""\
# Verifier key of {origin}: give this file to auditors and peers.
{vkey}

# Witness policy (C2SP tlog-policy, c2sp.org/tlog-policy). Uncomment and complete it so
# that `check-proof` and `verify --trust` accept a checkpoint of this log only once enough
# other gateways have cosigned it: one `witness` line per gateway, copied from the last
# line of that gateway's trust.txt, then the quorum (here: any 2 of B, C and D). A gateway
# never cosigns its own log. Without a quorum line, cosignatures are listed, not required.
# witness B <the witness line's vkey from gateway B's trust.txt>
# witness C <the witness line's vkey from gateway C's trust.txt>
# witness D <the witness line's vkey from gateway D's trust.txt>
# group consortium 2 B C D
# quorum consortium

# This gateway as a witness of other gateways' logs (its cosigner key, type 0x04), for
# their auditors' policies; replace the name "this-gateway" by a short local name:
# witness this-gateway {witness}
"""


def read_trust(trust_file: Path, policy_file: Path | None = None) -> Trust:
    """The trust file, plus the keys and quorum of a separate tlog-policy file if given.
    OSError if a file cannot be read; NoteError naming the file and line otherwise."""
    trust = _read(trust_file)
    if policy_file is None:
        return trust
    policy = _read(policy_file)
    if policy.policy is None:
        raise NoteError(f"{policy_file}: no quorum line, so it is not a witness policy")
    merged = trust.merged(policy, f"{trust_file} and {policy_file}")
    try:
        _ = merged.chains  # key-change lines are checked once the policy is known
    except NoteError as exc:
        raise NoteError(f"{trust_file}: {exc}") from None
    return merged


def _read(path: Path) -> Trust:
    try:
        trust = load_trust(path.read_text(encoding="utf-8", errors="surrogateescape"))
        if trust.policy is not None or not any(
            b'"kind":"key-replacement"' in d for _, d in trust.key_changes
        ):
            _ = trust.chains  # checked now, unless a separate policy must count a replacement
        return trust
    except NoteError as exc:
        raise NoteError(f"{path}: {exc}") from None
