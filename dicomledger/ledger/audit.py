"""The auditor's view of the ledger: which entries concern a patient or a study.

A patient's or a study's history is found in every gateway's log by lookup keys
(``keys.py``): ``patient:<P>`` (receipts), ``perm:<P>`` (permission records), ``activity:<P>``
(forwards, retrievals, refusals, alarms, erasures) and ``study:<S>``.

``audit_events`` reads those entries from a ledger database (this gateway's log and every
replica it holds); ``summary``, ``event_json`` and ``report_lines`` are pure functions that
turn them into what `dicomledger audit` prints. Like the ledger, all of it deals in
pseudonyms only: a Patient ID or Study UID never reaches this module.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dicomledger.common.errors import StorageError
from dicomledger.ledger import merkle
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
    EntryError,
    decode_entry,
    verify_entry_signature,
)
from dicomledger.ledger.permissions import Grant, PermissionFormatError, parse_record

if TYPE_CHECKING:
    from dicomledger.ledger.log import LedgerStore

# -- the auditor's view: events, one-line summaries, JSON ----------------------------------------

SHORT = 12  # hex digits of a pseudonym, hash or ref shown in a summary
MAX_TEXT = 256  # characters of free text (reasons, problems) shown in a summary


class AuditError(StorageError, RuntimeError):
    """An entry the lookup keys point to cannot be read; the message names it."""


@dataclass(frozen=True)
class AuditEvent:
    """One ledger entry as the auditor sees it."""

    time_ms: int  # the author's clock, milliseconds since the Unix epoch (UTC)
    origin: str  # the gateway whose log holds the entry
    index: int
    kind: str
    payload: Mapping[str, Any]
    leaf_hash: str  # hex RFC 6962 leaf hash of the entry bytes (a permission record's ref)


def _clean(text: str, limit: int = MAX_TEXT) -> str:
    """Text from a ledger entry, safe on one terminal line: control, format (bidi) and
    surrogate characters escaped, cut at ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + "…"
    return "".join(
        f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf", "Cs") else c for c in text
    )


def _text(payload: Mapping[str, Any], key: str) -> str:
    """A string field, cleaned; "?" when missing or not a string (a malformed entry must
    still be shown, not crash the audit)."""
    value = payload.get(key)
    return _clean(value) if isinstance(value, str) else "?"


def _short(value: Any) -> str:
    """A pseudonym, hash or ref shortened to SHORT characters."""
    if not isinstance(value, str):
        return "?"
    return _clean(value[:SHORT]) + ("…" if len(value) > SHORT else "")


def _count(payload: Mapping[str, Any], key: str) -> str:
    value = payload.get(key)
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "?"


def _at(where: Any) -> str:
    """``origin #index`` of an entry reference {origin, index}."""
    if not isinstance(where, Mapping):
        return "?"
    return f"{_text(where, 'origin')} #{_count(where, 'index')}"


def _destination(payload: Mapping[str, Any]) -> str:
    site = payload.get("site")
    dest = _text(payload, "destination")
    return f"{dest}@{_clean(site)}" if isinstance(site, str) and site else dest


def _summary_anchored(p: Mapping[str, Any]) -> str:
    what = (
        "content sha256" if p.get("hash_method") in ("content", "content-canonical") else "sha256"
    )
    text = f"received from {_text(p, 'calling_ae')} (instance {_short(p.get('instance'))}, {what} {_short(p.get('sha256'))}"
    frames = p.get("frames")
    if isinstance(frames, int) and not isinstance(frames, bool) and frames > 1:
        text += f", {frames} frames"
    text += ")"
    pixels = p.get("pixels_changed_from")
    if pixels is not None:
        old = pixels.get("sha256") if isinstance(pixels, Mapping) else None
        text += f"; PIXELS CHANGED since {_at(pixels)} (sha256 was {_short(old)})"
    if p.get("header_changed_from") is not None:
        text += f"; header changed since {_at(p['header_changed_from'])}"
    if p.get("recovered") is True:
        text += "; recovered at restart (no Success had been sent)"
    return text


def _summary_forwarded(p: Mapping[str, Any]) -> str:
    grant = p.get("grant")
    why = f"grant {_short(grant)}" if grant is not None else "no grant"
    status = p.get("status")
    done = "" if status in (None, "0x0000") else f", status {_text(p, 'status')}"
    return f"forwarded to {_destination(p)} (instance {_short(p.get('instance'))}, {why}{done})"


def _summary_forward_refused(p: Mapping[str, Any]) -> str:
    return (
        f"forward refused to {_destination(p)} (instance {_short(p.get('instance'))}): "
        f"{_text(p, 'reason')}"
    )


def _summary_forwards_queued(p: Mapping[str, Any]) -> str:
    def count(key: str) -> str:
        value = p.get(key)
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else "?"

    scope = f"study {_short(p.get('study'))}" if p.get("study") is not None else "all studies"
    return (
        f"forwards queued to {_destination(p)} by grant {_short(p.get('grant'))} ({scope}): "
        f"{count('queued')} stored instances ({count('already_delivered')} already delivered, "
        f"{count('already_queued')} already queued)"
    )


def _retrieve_route(p: Mapping[str, Any]) -> str:
    """``C-MOVE by WS1 to WS2`` (``to`` omitted for a C-GET to its own caller)."""
    caller, dest = _text(p, "calling_ae"), _text(p, "destination")
    route = f"{_text(p, 'service')} by {caller}"
    if p.get("service") != "C-GET" or dest != caller:
        route += f" to {_destination(p)}"
    return route


def _summary_retrieved(p: Mapping[str, Any]) -> str:
    counts = (
        f"{_count(p, 'completed')} sent, {_count(p, 'failed')} failed, "
        f"{_count(p, 'refused')} refused, {_count(p, 'tampered')} tampered"
    )
    if p.get("warning") not in (0, None):
        counts += f", {_count(p, 'warning')} with warnings"
    if p.get("not_sent") not in (0, None):
        counts += f", {_count(p, 'not_sent')} not sent"
    if p.get("cancelled") is True:
        counts += ", CANCELLED"
    grant = p.get("grant")
    why = f"grant {_short(grant)}" if grant is not None else "no grant"
    return (
        f"retrieved by {_text(p, 'calling_ae')} via {_text(p, 'service')} to {_destination(p)}: "
        f"{counts} (status {_text(p, 'status')}, {why})"
    )


def _summary_retrieve_refused(p: Mapping[str, Any]) -> str:
    return (
        f"retrieve refused: {_retrieve_route(p)} for {_count(p, 'instances')} instances: "
        f"{_text(p, 'reason')}"
    )


def _summary_tamper_alarm(p: Mapping[str, Any]) -> str:
    expected, found = p.get("expected_sha256"), p.get("found_sha256")
    expected_text = _short(expected) if expected is not None else "unknown (anchor not held)"
    found_text = _short(found) if found is not None else "no pixel data"
    context = f"anchor {_at(p.get('anchor'))}"
    if "service" in p:  # the retrieval that found it, when the alarm names one
        context = f"{_retrieve_route(p)}; {context}"
    return (
        f"TAMPER ALARM: instance {_short(p.get('instance'))}, expected sha256 {expected_text}, "
        f"found {found_text} ({context}): {_text(p, 'problem')}"
    )


def _summary_erased(p: Mapping[str, Any]) -> str:
    study = p.get("study")
    scope = f"study {_short(study)}" if study is not None else "every study"
    studies = p.get("studies")
    held = len(studies) if isinstance(studies, list) else "?"
    text = (
        f"ERASED {scope} of the patient: {_count(p, 'instances')} instances, {_count(p, 'files')} files "
        f"from {held} studies, {_count(p, 'forward_jobs')} pending forwards cancelled; reason {_text(p, 'reason')}"
    )
    if p.get("request") is not None:
        text += f" (applying the erasure {_at(p['request'])})"
    return text


def _summary_permission(event: AuditEvent) -> str:
    try:
        record = parse_record(
            event.kind,
            event.payload,
            ref=event.leaf_hash,
            origin=event.origin,
            index=event.index,
            time_ms=event.time_ms,
        )
    except PermissionFormatError as exc:
        return f"MALFORMED {event.kind} (ref {_short(event.leaf_hash)}): {_clean(str(exc))}"
    ref = f"ref {_short(event.leaf_hash)}"
    if isinstance(record, Grant):
        scope = f"study {_short(record.study)}" if record.study is not None else "all studies"
        until = f" until {record.until}" if record.until is not None else ""
        return (
            f"grant to {_clean(str(record.grantee))}, {scope}{until}, purpose {record.purpose!r}, "
            f"consent {record.consent!r}; issued by {_clean(record.issuer)} ({ref})"
        )
    targets = []
    if record.grants:
        targets.append("grants " + ", ".join(_short(g) for g in record.grants))
    if record.grantee is not None:
        targets.append(f"every grant to {_clean(str(record.grantee))}")
    return (
        f"revoke {' and '.join(targets)}, reason {record.reason!r}; "
        f"issued by {_clean(record.issuer)} ({ref})"
    )


def summary(event: AuditEvent) -> str:
    """One line, for humans, saying what the entry records. Pseudonyms, hashes and refs are
    shortened to their first 12 hex digits; free text from the entry is cleaned of control
    characters, so a line from any peer's log is safe to print."""
    p = event.payload
    if event.kind == IMAGE_ANCHORED:
        return _summary_anchored(p)
    if event.kind in (GRANT, REVOKE):
        return _summary_permission(event)
    if event.kind == FORWARDED:
        return _summary_forwarded(p)
    if event.kind == FORWARD_REFUSED:
        return _summary_forward_refused(p)
    if event.kind == FORWARDS_QUEUED:
        return _summary_forwards_queued(p)
    if event.kind == RETRIEVED:
        return _summary_retrieved(p)
    if event.kind == RETRIEVE_REFUSED:
        return _summary_retrieve_refused(p)
    if event.kind == TAMPER_ALARM:
        return _summary_tamper_alarm(p)
    if event.kind == ERASED:
        return _summary_erased(p)
    return f"{_clean(event.kind)} entry"


def iso_time(time_ms: int) -> str:
    """``2026-11-23T18:00:01.123Z``: ISO 8601 UTC with milliseconds."""
    try:
        when = datetime.fromtimestamp(time_ms // 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return f"(time {time_ms} ms out of range)"
    return f"{when:%Y-%m-%dT%H:%M:%S}.{time_ms % 1000:03d}Z"


def event_json(e: AuditEvent) -> dict[str, Any]:
    """An event for `dicomledger audit --json` (pseudonyms only, like the ledger)."""
    return {
        "time": iso_time(e.time_ms),
        "time_ms": e.time_ms,
        "gateway": e.origin,
        "index": e.index,
        "kind": e.kind,
        "entry_hash": e.leaf_hash,
        "summary": summary(e),
        "payload": dict(e.payload),
    }


def subject_text(*, patient: str | None, study: str | None) -> str:
    """What an audit was about, by pseudonym: ``study S of patient P``."""
    if patient is not None and study is not None:
        return f"study {study} of patient {patient}"
    return f"patient {patient}" if patient is not None else f"study {study}"


def report_lines(
    events: Sequence[AuditEvent], *, patient: str | None, study: str | None, logs_held: int
) -> list[str]:
    """The text `dicomledger audit` prints: a header line, then one aligned line per event
    (time, gateway, #index, kind, summary). ``logs_held``: how many gateways' logs the
    database holds, said when nothing was found (a log not replicated here is not searched)."""
    subject = subject_text(patient=patient, study=study)
    if not events:
        return [
            f"audit of {subject}: no events; none of the {logs_held} gateway log(s) held in "
            "this ledger database has an entry about it"
        ]
    gateways = {e.origin for e in events}
    lines = [
        f"audit of {subject}: {len(events)} event(s) from {len(gateways)} gateway(s), newest first"
    ]
    origin_w = max(len(e.origin) for e in events)
    index_w = max(len(str(e.index)) for e in events) + 1
    kind_w = max(len(e.kind) for e in events)
    for e in events:
        lines.append(
            f"{iso_time(e.time_ms)}  {_clean(e.origin):<{origin_w}}  {'#' + str(e.index):<{index_w}}  "
            f"{e.kind:<{kind_w}}  {summary(e)}"
        )
    return lines


# -- reading the ledger database --------------------------------------------------------------


def _keys_for(patient: str | None, study: str | None) -> list[str]:
    if study is not None:
        return [f"study:{study}"]
    return [f"patient:{patient}", f"perm:{patient}", f"activity:{patient}"]


async def audit_events(
    store: LedgerStore, *, patient: str | None = None, study: str | None = None
) -> list[AuditEvent]:
    """Every entry, in every log the database holds, about a patient and/or a study (by
    pseudonym), newest first (time desc, then origin, then index desc).

    ``patient``: its receipts (``patient:``), permission records (``perm:``) and activity
    (``activity:``). ``study``: entries naming the study (``study:``), plus the permission
    records of its patient that cover it (those for all studies). Both: the entries of that
    study of that patient. An entry found by key is kept only if its payload names the
    pseudonym(s) asked for, so a stray lookup key cannot pull in another patient's entry.
    Each entry shown is checked against its own signature, by the key its log had in force at
    that index (the log's key chain, which rotations and replacements extend); an entry that
    does not decode or verify raises AuditError naming it (`dicomledger verify` finds the rest).
    """
    if patient is None and study is None:
        raise ValueError("audit_events needs a patient or a study pseudonym")
    events: dict[tuple[str, int], AuditEvent] = {}
    for key in _keys_for(patient, study):
        for origin, index in await store.find(key):
            event = await _event(store, origin, index)
            p = event.payload
            if study is not None and p.get("study") != study and not _erased_from(event, study):
                continue
            if (
                patient is not None
                and p.get("patient") != patient
                and (study is None or "patient" in p)
            ):
                continue
            events[origin, index] = event
    if study is not None:  # grants and revokes for all of the patient's studies cover this one too
        patients = {e.payload.get("patient") for e in events.values()}  # of the study's own entries
        for who in sorted(p for p in patients if isinstance(p, str)):
            for origin, index in await store.find(f"perm:{who}"):
                event = await _event(store, origin, index)
                if event.payload.get("patient") == who and event.payload.get("study") in (
                    None,
                    study,
                ):
                    events[origin, index] = event
    return sorted(events.values(), key=lambda e: (-e.time_ms, e.origin, -e.index))


def _erased_from(event: AuditEvent, study: str) -> bool:
    """An erasure of a whole patient names the studies it erased images from."""
    studies = event.payload.get("studies")
    return event.kind == ERASED and isinstance(studies, list) and study in studies


async def _event(store: LedgerStore, origin: str, index: int) -> AuditEvent:
    data = await store.entry(origin, index)
    try:
        entry = decode_entry(data)
    except EntryError as exc:
        raise AuditError(
            f"{origin} entry {index} cannot be read ({exc}); run `dicomledger verify`"
        ) from None
    if (entry.origin, entry.index) != (origin, index):
        raise AuditError(
            f"{origin} entry {index} says it is {entry.origin} entry {entry.index}; run `dicomledger verify`"
        )
    try:
        verify_entry_signature(
            entry, (await store.key_chain(origin)).entry_key(index), canonical=data
        )
    except EntryError as exc:
        raise AuditError(f"{exc}; run `dicomledger verify`") from None
    return AuditEvent(
        entry.time_ms, origin, index, entry.kind, entry.payload, merkle.leaf_hash(data).hex()
    )
