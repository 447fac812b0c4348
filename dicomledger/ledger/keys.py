"""Lookup keys: local rows in ``entry_keys`` (not signed, not replicated) that find entries by
what they are about. One pure function of an entry's kind and payload gives them, for this
gateway's own entries, for every replica it stores and for the one-off backfill, so every
gateway finds the same entries by the same keys.

* ``sha256:<hex>``, ``decoded:<hex>``, ``instance:<I>``, ``patient:<P>`` on image-anchored
  entries: `verify-file` finds an anchor by hash or instance; permissions find a patient's
  custodians;
* ``perm:<P>`` on grants and revokes: a patient's permission history;
* ``study:<S>`` on every entry whose payload names a study (and on an erasure, each study it
  erased from), and ``activity:<P>`` on forwards, forwards queued by a grant, retrievals,
  refusals, tamper alarms and erasures: `dicomledger audit`, and the forwards a grant
  queues (``consent.py``);
* ``erased:<P>`` and ``erased`` on erasures: `verify-file` tells an erased image; a gateway
  finds the erasures it has not applied yet.

``VERSION`` goes up whenever this scheme changes; the gateway then attaches the keys to the
entries stored before (``LedgerStore.add_lookup_keys``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dicomledger.ledger.entries import (
    ERASED,
    FORWARD_REFUSED,
    FORWARDED,
    FORWARDS_QUEUED,
    GRANT,
    IMAGE_ANCHORED,
    RETRIEVE_REFUSED,
    RETRIEVED,
    REVOKE,
    TAMPER_ALARM,
)

VERSION = 2  # 1: study: and activity: for `audit`; 2: erased:, erased and studies of erasures
# (forwards-queued, a kind added later, carries activity: without a new version: no older entry has it)

ACTIVITY_KINDS = frozenset(
    {FORWARDED, FORWARD_REFUSED, FORWARDS_QUEUED, RETRIEVED, RETRIEVE_REFUSED, TAMPER_ALARM, ERASED}
)


def lookup_keys(kind: str, payload: Mapping[str, Any]) -> list[str]:
    """Every lookup key an entry of ``kind`` with ``payload`` carries. Payload fields of the
    wrong type (a replica is another gateway's data) simply give no key."""
    keys: list[str] = []
    patient = payload.get("patient")
    if kind == IMAGE_ANCHORED:
        keys += [
            f"{name}:{payload[field]}"
            for name, field in (
                ("sha256", "sha256"),
                ("instance", "instance"),
                ("decoded", "decoded_sha256"),
            )
            if isinstance(payload.get(field), str)
        ]
        if isinstance(patient, str):
            keys.append(f"patient:{patient}")
    if kind in (GRANT, REVOKE) and isinstance(patient, str):
        keys.append(f"perm:{patient}")
    if kind == ERASED:
        keys.append("erased")
        if isinstance(patient, str):
            keys.append(f"erased:{patient}")
    return keys + audit_keys(kind, payload)


def audit_keys(kind: str, payload: Mapping[str, Any]) -> list[str]:
    """The keys `dicomledger audit` finds an entry by (part of lookup_keys)."""
    keys = []
    if isinstance(payload.get("study"), str):
        keys.append(f"study:{payload['study']}")
    studies = payload.get("studies")
    if kind == ERASED and isinstance(studies, list):
        keys += sorted({f"study:{s}" for s in studies if isinstance(s, str)} - set(keys))
    if kind in ACTIVITY_KINDS and isinstance(payload.get("patient"), str):
        keys.append(f"activity:{payload['patient']}")
    return keys
