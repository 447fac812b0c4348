"""Trust files: the keys of logs and witnesses a verifier trusts, and its witness policy.

A trust file holds, one per line (blank lines and lines starting with ``#``, after optional
spaces, are ignored):

- a bare verifier key (signed-note vkey): trusted both as a log (checkpoints of the origin
  of that name) and as a witness (cosignatures by that name), as before policies existed;
- C2SP tlog-policy lines (``log``, ``witness``, ``group``, ``quorum``; see ``policy.py``).
  The policy lines of a trust file, taken alone, form a tlog-policy file, so a tlog-policy
  file is itself a trust file. A trust file with policy lines has exactly one quorum line.

One key name stands for one key across the whole file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dicomledger.ledger.note import SIG_COSIGNATURE_V1, NoteError, parse_verifier_key, verifier_key
from dicomledger.ledger.policy import (
    PolicyError,
    WitnessPolicy,
    is_policy_line,
    parse_policy_lines,
)


@dataclass(frozen=True)
class Trust:
    logs: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)  # by origin
    witnesses: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)  # by key name
    policy: WitnessPolicy | None = None

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
            {**self.logs, **other.logs}, {**self.witnesses, **other.witnesses}, self.policy or other.policy
        )


def load_trust(text: str) -> Trust:
    """Parse a trust file; NoteError naming the line on a malformed vkey or policy line, or
    a key name given twice (bare vkeys) or for two different keys."""
    bare: dict[str, Ed25519PublicKey] = {}
    first_line: dict[str, int] = {}
    policy_lines: list[tuple[int, str]] = []
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
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
    trust = Trust(dict(bare), dict(bare))
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
    return trust.merged(policy, f"{trust_file} and {policy_file}")


def _read(path: Path) -> Trust:
    try:
        return load_trust(path.read_text(encoding="utf-8", errors="surrogateescape"))
    except NoteError as exc:
        raise NoteError(f"{path}: {exc}") from None
