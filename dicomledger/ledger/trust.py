"""Trust files: the verifier keys (signed-note vkeys) of logs and witnesses one trusts.

One vkey per line; blank lines and lines starting with ``#`` (after optional spaces) are
ignored. The result maps key name (a log origin or a witness name) to its public key.
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dicomledger.ledger.note import NoteError, parse_verifier_key


def load_trust_text(text: str) -> dict[str, Ed25519PublicKey]:
    """Parse a trust file; NoteError naming the line on a malformed vkey or a duplicate name."""
    trusted: dict[str, Ed25519PublicKey] = {}
    first_line: dict[str, int] = {}
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            name, key = parse_verifier_key(line)
        except NoteError as exc:
            raise NoteError(f"trust line {n}: {exc}") from None
        if name in trusted:
            raise NoteError(
                f"trust line {n}: key name {name!r} already given on line {first_line[name]}"
            )
        trusted[name], first_line[name] = key, n
    return trusted


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
