"""This gateway's own log across restarts: what the start-up check found, and the entries that
record an operator's decisions about the consortium. Pure: no I/O, no clock.

A gateway restored from a backup holds fewer of its own entries than it once signed. Appending
after that stale tip would sign a second history, which its peers rightly flag as
equivocation. So before its first append a gateway asks its peers for the newest checkpoint of
its own log they hold or cosigned, fetches back the entries it lost and checks them against
those checkpoints (signed with its own key); ``OwnTip`` is the outcome
(``gossip.PeerService.confirm_own_tip``).

Entries (payloads; no PHI, text fields as ``check_text``):

    local-tip-accepted: {"by":TEXT,"problem":TEXT,"unconfirmed":[ORIGIN,...]}
        appended first after a start with ``serve --accept-local-tip`` on a tip the peers did
        not confirm: who started it (the operating-system account), why the tip could not be
        confirmed, and the peers that did not answer (sorted).
    flag-cleared: {"by":TEXT,"evidence":[HEX64,...],"origin":ORIGIN,"reason":TEXT}
        ``peers --clear-flag``: who cleared the flag on ``origin`` and why; ``evidence`` are
        the SHA-256 digests (lowercase hex, sorted) of the evidence files whose flag it clears.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dicomledger.common.errors import LedgerFormatError

MAX_TEXT_CHARS = 256


class TipRecordError(LedgerFormatError, ValueError):
    """A field of a local-tip-accepted or flag-cleared record is not acceptable."""


@dataclass(frozen=True)
class OwnTip:
    """What the start-up check of this gateway's own log found.

    ``problem`` is None when the tip is confirmed: at least one peer answered and every
    checkpoint of this log that any answering peer holds or cosigned is one of the log held
    now (after ``fetched`` entries were fetched back). Otherwise it says why not; the gateway
    then starts only with ``--accept-local-tip``.
    """

    size: int  # entries of this gateway's own log held now
    fetched: int = 0  # of them fetched back from peers by this check
    answered: tuple[str, ...] = ()  # peers that answered
    unreachable: Mapping[str, str] = field(default_factory=dict)  # peer -> why it did not answer
    problem: str | None = None
    stopped: bool = False  # the gateway was told to stop while it waited

    @property
    def confirmed(self) -> bool:
        return self.problem is None and not self.stopped


def check_text(value: Any, what: str, *, required: bool = True) -> str:
    """A free-text field: a string of at most 256 characters without control characters or
    lone surrogates (as the permission records' TEXT); non-empty if ``required``."""
    if not isinstance(value, str):
        raise TipRecordError(f"{what} must be a string")
    if required and not value.strip():
        raise TipRecordError(f"{what} must not be empty")
    if len(value) > MAX_TEXT_CHARS:
        raise TipRecordError(f"{what} has {len(value)} characters, more than {MAX_TEXT_CHARS}")
    for c in value:
        if unicodedata.category(c) in ("Cc", "Cs"):
            raise TipRecordError(f"{what} contains the control character U+{ord(c):04X}")
    return value


def local_tip_accepted_payload(by: str, problem: str, unconfirmed: Iterable[str]) -> dict[str, Any]:
    """The payload of the ``local-tip-accepted`` entry (module docstring)."""
    return {
        "by": check_text(by, "by"),
        "problem": check_text(problem[:MAX_TEXT_CHARS], "problem"),
        "unconfirmed": sorted(set(unconfirmed)),
    }


def flag_cleared_payload(
    origin: str, evidence_digests: Iterable[bytes], by: str, reason: str
) -> dict[str, Any]:
    """The payload of the ``flag-cleared`` entry (module docstring)."""
    digests = sorted({d.hex() for d in evidence_digests})
    if not digests:
        raise TipRecordError(f"no evidence against {origin} to clear")
    return {
        "by": check_text(by, "by"),
        "evidence": digests,
        "origin": check_text(origin, "origin"),
        "reason": check_text(reason, "reason"),
    }
