"""C2SP tlog-checkpoint note text: origin, tree size, root hash, extension lines. Pure, no I/O.

    <origin>\\n
    <tree size, ASCII decimal, no leading zeroes>\\n
    <base64 of the 32-byte RFC 6962 root hash>\\n
    [<extension line>\\n ...]

The signatures around it are c2sp.org/signed-note (see ``note.py``).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from dicomledger.common.errors import LedgerFormatError

MAX_SIZE = 2**63 - 1  # stored as SQLite signed 64-bit integers
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")


class CheckpointError(LedgerFormatError, ValueError):
    """A checkpoint text is malformed; the message says which line and how."""


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()


def _check_line(what: str, line: str, *, allow_empty: bool = False) -> None:
    if not isinstance(line, str):
        raise CheckpointError(f"{what} is not a string")
    if not line and not allow_empty:
        raise CheckpointError(f"{what} is empty")
    for c in line:
        if ord(c) < 0x20:  # newline included: one line is one line
            raise CheckpointError(f"{what} contains control character U+{ord(c):04X}")
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{what} is not valid Unicode") from None


def format_checkpoint(cp: Checkpoint) -> str:
    """tlog-checkpoint "Note text": the note body, ending in a newline."""
    _check_line("origin", cp.origin)
    if isinstance(cp.size, bool) or not isinstance(cp.size, int) or not 0 <= cp.size <= MAX_SIZE:
        raise CheckpointError(f"tree size {cp.size!r} is not an integer in 0..2**63-1")
    if not isinstance(cp.root_hash, bytes) or len(cp.root_hash) != 32:
        raise CheckpointError("root hash must be 32 bytes")
    for i, ext in enumerate(cp.extensions):
        _check_line(f"extension line {i + 1}", ext)
    lines = [cp.origin, str(cp.size), base64.b64encode(cp.root_hash).decode("ascii")]
    return "".join(line + "\n" for line in lines + list(cp.extensions))


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint note text strictly (tlog-checkpoint "Note text").

    At least three newline-terminated lines; a non-empty origin; a size in ASCII decimal
    without leading zeroes (at most 2**63-1); a root hash in canonical standard base64 of
    exactly 32 bytes; extension lines, if any, non-empty. No control characters anywhere.
    """
    if not isinstance(text, str):
        raise CheckpointError("checkpoint text is not a string")
    if not text.endswith("\n"):
        raise CheckpointError("checkpoint text does not end in a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise CheckpointError(
            f"checkpoint has {len(lines)} lines, needs origin, size and root hash"
        )
    origin, size_line, root_line, *extensions = lines
    _check_line("origin line", origin)
    if not _DECIMAL.fullmatch(size_line) or int(size_line) > MAX_SIZE:
        raise CheckpointError(
            f"size line {size_line!r} is not a decimal in 0..2**63-1 without leading zeroes"
        )
    try:
        root = base64.b64decode(root_line.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise CheckpointError(f"root hash line {root_line!r} is not valid base64") from None
    if base64.b64encode(root).decode("ascii") != root_line:
        raise CheckpointError(f"root hash line {root_line!r} is not canonical base64")
    if len(root) != 32:
        raise CheckpointError(f"root hash is {len(root)} bytes, not 32")
    for i, ext in enumerate(extensions):
        _check_line(f"extension line {i + 1}", ext)
    return Checkpoint(origin, int(size_line), root, tuple(extensions))
