"""Witness policies: which witnesses must cosign a checkpoint before a verifier trusts it.
Pure functions, no I/O.

Format: C2SP tlog-policy (c2sp.org/tlog-policy), the format transparency-dev's Go
``policy`` package and Sigsum's tools read, line for line::

    log <vkey> [<url>]                      a log whose checkpoints are accepted
    witness <name> <vkey> [<url>]           a witness; <vkey> is its cosigner key (type 0x04)
    group <name> all|any|<k> <member>...    k of its members (witnesses or earlier groups)
    quorum <name>|none                      exactly once: what must have cosigned

Whitespace is ASCII spaces and tabs; blank lines and lines starting with ``#`` are ignored;
a group or the quorum may only name witnesses and groups defined on earlier lines, and each
name may be a group member once. Names are local to the file; what a cosignature line
carries is the witness key's *key name*, so a witness ``B`` with vkey ``gwb.example+…``
is satisfied by a valid tlog-cosignature/v1 line ``— gwb.example …`` whose key ID matches.

As in transparency-dev's implementation, a witness vkey must be a cosignature key
(signature type 0x04, tlog-cosignature "Format"); a log vkey is an Ed25519 note key (0x01).
Only Ed25519 is supported (no ML-DSA-44 witnesses yet): other key types are refused.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dicomledger.common.errors import LedgerFormatError
from dicomledger.ledger.note import (
    SIG_COSIGNATURE_V1,
    SIG_ED25519,
    Note,
    NoteError,
    canonical_b64decode,
    key_id,
    parse_verifier_key,
    verifier_key,
    verify_cosignature,
)

KEYWORDS = frozenset({"log", "witness", "group", "quorum"})
NONE = "none"  # the predefined quorum that needs no cosignature
MAX_ENTITIES = 256  # logs, witnesses and groups each; the spec asks for at least 32
_FIELD_SEPARATORS = re.compile(r"[ \t]+")
_DECIMAL = re.compile(r"[1-9][0-9]{0,8}")


class PolicyError(LedgerFormatError, ValueError):
    """A policy line is malformed or inconsistent; the message names the line and the reason."""


@dataclass(frozen=True)
class PolicyLog:
    key_name: str  # the log's origin
    key: Ed25519PublicKey
    url: str | None = None


@dataclass(frozen=True)
class PolicyWitness:
    name: str  # local to the policy file
    key_name: str  # the name on the witness's cosignature lines
    key: Ed25519PublicKey
    url: str | None = None


@dataclass(frozen=True)
class PolicyGroup:
    name: str
    threshold: int  # 1 <= threshold <= len(members); "any" and "all" resolved
    members: tuple[str, ...]


@dataclass(frozen=True)
class WitnessPolicy:
    logs: tuple[PolicyLog, ...]
    witnesses: tuple[PolicyWitness, ...]
    groups: tuple[PolicyGroup, ...]
    quorum: str  # a witness or group name, or NONE

    def _witness(self, name: str) -> PolicyWitness | None:
        return next((w for w in self.witnesses if w.name == name), None)

    def _group(self, name: str) -> PolicyGroup | None:
        return next((g for g in self.groups if g.name == name), None)

    def describe(self) -> str:
        """The quorum in words, e.g. ``group consortium: 2 of {B, C, D}``."""
        if self.quorum == NONE:
            return "none (no cosignature required)"
        group = self._group(self.quorum)
        if group is None:
            return f"witness {self.quorum}"
        return f"group {group.name}: {group.threshold} of {{{', '.join(group.members)}}}"

    def satisfied_by(self, cosigned: Collection[str]) -> bool:
        """True iff witnesses whose *key names* are in ``cosigned`` meet the quorum."""
        return self.shortfall(cosigned) is None

    def shortfall(self, cosigned: Collection[str]) -> str | None:
        """None if the quorum is met by the witnesses (by key name) in ``cosigned``;
        otherwise one sentence saying which group fell short and which witnesses are missing."""
        if self.quorum == NONE:
            return None
        met: dict[str, bool] = {}
        for w in self.witnesses:
            met[w.name] = w.key_name in cosigned
        for g in self.groups:  # members are always defined on earlier lines
            met[g.name] = sum(met[m] for m in g.members) >= g.threshold
        if met[self.quorum]:
            return None
        reasons: list[str] = []
        missing: list[PolicyWitness] = []

        def explain(name: str) -> None:
            witness = self._witness(name)
            if witness is not None:
                missing.append(witness)
                return
            group = self._group(name)
            assert group is not None
            have = [m for m in group.members if met[m]]
            reasons.append(
                f"group {group.name} needs {group.threshold} of {{{', '.join(group.members)}}} "
                f"and has {len(have)}" + (f" ({', '.join(have)})" if have else "")
            )
            for m in group.members:
                if not met[m]:
                    explain(m)

        explain(self.quorum)
        who = ", ".join(f"{w.name} ({w.key_name})" for w in missing)
        return "; ".join([*reasons, f"missing cosignatures from {who}"])


def canonical_text(policy: WitnessPolicy) -> str:
    """The policy in one text form, whatever the spacing, comments and URLs of its file:
    its logs, witnesses (cosigner vkeys), groups (thresholds as numbers) and quorum, in the
    order defined. Two files with the same canonical text require the same cosignatures."""
    lines = [f"log {verifier_key(log.key_name, log.key)}" for log in policy.logs]
    lines += [
        f"witness {w.name} {verifier_key(w.key_name, w.key, SIG_COSIGNATURE_V1)}"
        for w in policy.witnesses
    ]
    lines += [f"group {g.name} {g.threshold} {' '.join(g.members)}" for g in policy.groups]
    lines.append(f"quorum {policy.quorum}")
    return "".join(line + "\n" for line in lines)


def is_policy_line(line: str) -> bool:
    """Whether a (non-comment) line is a tlog-policy line rather than a bare vkey."""
    fields = _fields(line)
    return bool(fields) and fields[0] in KEYWORDS


def _fields(line: str) -> list[str]:
    return [f for f in _FIELD_SEPARATORS.split(line) if f]


def _check_characters(line: str) -> None:
    """tlog-policy "Character set": tab, newline, 0x20-0x7E and non-ASCII only."""
    for c in line:
        if (ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F:
            raise PolicyError(f"character U+{ord(c):04X} is not allowed in a policy line")


def _vkey(vkey: str, want: int, role: str) -> tuple[str, Ed25519PublicKey]:
    try:
        name, key = parse_verifier_key(vkey)  # shape, Ed25519 type 0x01 or 0x04, key ID
    except NoteError as exc:
        raise PolicyError(f"invalid {role} vkey: {exc}") from None
    kind = canonical_b64decode(vkey.split("+", 2)[2], "key material")[0]
    if kind != want:
        needed = (
            "a cosignature key (type 0x04)"
            if want == SIG_COSIGNATURE_V1
            else "an Ed25519 note key (type 0x01)"
        )
        raise PolicyError(f"{role} vkey {name} has key type 0x{kind:02x}; a {role} needs {needed}")
    return name, key


def parse_policy_lines(
    lines: Iterable[tuple[int, str]], what: str = "policy line"
) -> WitnessPolicy:
    """Parse numbered tlog-policy lines (comments and blank lines may be included);
    PolicyError ``"<what> N: <reason>"`` on the first bad line."""
    logs: list[PolicyLog] = []
    witnesses: list[PolicyWitness] = []
    groups: list[PolicyGroup] = []
    quorum: str | None = None
    defined: set[str] = set()
    members_used: set[str] = set()
    log_keys: set[bytes] = set()
    witness_keys: set[bytes] = set()
    last = 0
    for n, line in lines:
        last = n
        fields = _fields(line)
        if not fields or fields[0].startswith("#"):
            continue
        try:
            _check_characters(line)
            keyword, args = fields[0], fields[1:]
            if keyword == "log":
                if not 1 <= len(args) <= 2:
                    raise PolicyError("a log line is: log <vkey> [<url>]")
                key_name, key = _vkey(args[0], SIG_ED25519, "log")
                if key.public_bytes_raw() in log_keys:
                    raise PolicyError(f"duplicate log public key ({key_name})")
                log_keys.add(key.public_bytes_raw())
                logs.append(PolicyLog(key_name, key, args[1] if len(args) == 2 else None))
            elif keyword == "witness":
                if not 2 <= len(args) <= 3:
                    raise PolicyError("a witness line is: witness <name> <vkey> [<url>]")
                name = args[0]
                _check_new_name(name, defined)
                key_name, key = _vkey(args[1], SIG_COSIGNATURE_V1, "witness")
                if key.public_bytes_raw() in witness_keys:
                    raise PolicyError(f"duplicate witness public key ({key_name})")
                witness_keys.add(key.public_bytes_raw())
                witnesses.append(
                    PolicyWitness(name, key_name, key, args[2] if len(args) == 3 else None)
                )
                defined.add(name)
            elif keyword == "group":
                if len(args) < 3:
                    raise PolicyError("a group line is: group <name> all|any|<k> <member>...")
                name, threshold, members = args[0], args[1], args[2:]
                _check_new_name(name, defined)
                if threshold == "any":
                    k = 1
                elif threshold == "all":
                    k = len(members)
                elif _DECIMAL.fullmatch(threshold):
                    k = int(threshold)
                else:
                    raise PolicyError(
                        f"threshold {threshold!r} of group {name} is not all, any or a decimal >= 1"
                    )
                if not 1 <= k <= len(members):
                    raise PolicyError(f"threshold {k} of group {name} is outside 1..{len(members)}")
                for m in members:
                    if m not in defined:
                        raise PolicyError(
                            f"group {name}: member {m!r} is not defined on an earlier line"
                        )
                    if m in members_used:
                        raise PolicyError(f"group {name}: {m!r} is already a member of a group")
                    members_used.add(m)
                groups.append(PolicyGroup(name, k, tuple(members)))
                defined.add(name)
            elif keyword == "quorum":
                if len(args) != 1:
                    raise PolicyError("a quorum line is: quorum <name>")
                if quorum is not None:
                    raise PolicyError("a policy has exactly one quorum line; this is a second one")
                if args[0] != NONE and args[0] not in defined:
                    raise PolicyError(f"quorum {args[0]!r} is not defined on an earlier line")
                quorum = args[0]
            else:
                raise PolicyError(f"unknown keyword {keyword!r}")
            if max(len(logs), len(witnesses), len(groups)) > MAX_ENTITIES:
                raise PolicyError(f"more than {MAX_ENTITIES} {keyword}s")
        except PolicyError as exc:
            raise PolicyError(f"{what} {n}: {exc}") from None
    if quorum is None:
        raise PolicyError(
            f"{what} {last}: the policy has no quorum line (use 'quorum none' to require no cosignature)"
        )
    return WitnessPolicy(tuple(logs), tuple(witnesses), tuple(groups), quorum)


def _check_new_name(name: str, defined: set[str]) -> None:
    if name == NONE:
        raise PolicyError("the name 'none' is reserved")
    if name in defined:
        raise PolicyError(f"name {name!r} is already defined")


def parse_policy(text: str) -> WitnessPolicy:
    """Parse a whole tlog-policy file (a str decoded from UTF-8)."""
    return parse_policy_lines(enumerate(text.split("\n"), 1))


class CosignatureError(LedgerFormatError, ValueError):
    """A cosignature line by a known witness key does not verify."""


def verified_cosigners(
    note: Note,
    log_signature: tuple[str, bytes],
    witnesses: Mapping[str, Ed25519PublicKey] | Mapping[str, Sequence[Ed25519PublicKey]],
) -> tuple[dict[str, int], list[str]]:
    """The witnesses (by key name) with a valid cosignature/v1 line on ``note``, each with
    its newest timestamp; and the names on the other lines (neither the log's own
    signature, given as (origin, key ID), nor by a key in ``witnesses``), merely listed.

    A witness may have several keys (a gateway that rotated its key cosigns with the newer
    ones): a line counts when it verifies with the key its key ID names. A line whose name and
    key ID match a known witness key but whose signature does not verify raises
    CosignatureError: signed-note says a failing signature from a known key SHOULD reject the
    note. The log's origin never counts as its own witness.
    """
    origin = log_signature[0]
    cosigned: dict[str, int] = {}
    unverified: list[str] = []
    for sig in note.signatures:
        if (sig.name, sig.key_id) == log_signature:
            continue
        known = witnesses.get(sig.name)
        keys = [known] if isinstance(known, Ed25519PublicKey) else list(known or ())
        key = next((k for k in keys if sig.key_id == key_id(sig.name, k, SIG_COSIGNATURE_V1)), None)
        if sig.name == origin or key is None:
            if sig.name not in unverified:
                unverified.append(sig.name)
            continue
        ts = verify_cosignature(note.text, sig, sig.name, key)
        if ts is None:
            raise CosignatureError(f"cosignature by {sig.name} does not verify")
        cosigned[sig.name] = max(ts, cosigned.get(sig.name, ts))
    return cosigned, unverified
