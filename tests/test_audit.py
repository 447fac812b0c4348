"""`dicomledger audit`: which entries concern a patient or a study, and how they read."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dicomledger.config import load_config
from dicomledger.ledger import log as ledger_log
from dicomledger.ledger.audit import (
    AuditError,
    AuditEvent,
    audit_events,
    event_json,
    iso_time,
    report_lines,
    summary,
)
from dicomledger.ledger.entries import (
    FORWARD_REFUSED,
    FORWARDED,
    GRANT,
    IMAGE_ANCHORED,
    RETRIEVE_REFUSED,
    RETRIEVED,
    REVOKE,
    TAMPER_ALARM,
)
from dicomledger.ledger.identity import Identity, load_key_file
from dicomledger.ledger.keys import audit_keys
from dicomledger.ledger.log import LedgerStore, LogWriter
from dicomledger.ledger.permissions import Grantee, make_grant_payload, make_revoke_payload
from dicomledger.ledger.pseudonym import pseudonym
from tests.conftest import dicomledger

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


def key(seed: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed.encode()).digest())


def h(seed: str) -> str:
    """A 64-hex stand-in for a pseudonym or hash."""
    return hashlib.sha256(seed.encode()).hexdigest()


ORIGIN_A = "hospital-a.example/dicomledger"
ORIGIN_B = "hospital-b.example/dicomledger"
AUTHORITY = "consent-office.hospital-a.example"
AUTHORITY_KEY = key("authority")
P1, P2 = h("patient-1"), h("patient-2")
S1, S2, S3 = h("study-1"), h("study-2"), h("study-3")  # S1, S2 of P1; S3 of P2


# -- payloads of every kind --------------------------------------------------------------------


def anchored(patient: str, study: str, n: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "patient": patient,
        "study": study,
        "series": h(f"series-{study}"),
        "instance": h(f"inst-{study}-{n}"),
        "hash_method": "pixel",
        "sha256": h(f"pixels-{study}-{n}"),
        "decoded_sha256": None,
        "frames": 1,
        "frame_root": None,
        "sop_class": "1.2.840.10008.5.1.4.1.1.4",
        "transfer_syntax": "1.2.840.10008.1.2.1",
        "calling_ae": "MODALITY",
        **extra,
    }


def forwarded(patient: str, study: str, grant: str | None = None) -> dict[str, Any]:
    return {
        "destination": "PACS",
        "site": "hospital-b.example/dicomledger",
        "patient": patient,
        "study": study,
        "instance": h(f"inst-{study}-0"),
        "sha256": h(f"pixels-{study}-0"),
        "grant": grant,
        "status": "0x0000",
    }


def forward_refused(patient: str, study: str) -> dict[str, Any]:
    return {
        "destination": "PACS",
        "site": None,
        "patient": patient,
        "study": study,
        "instance": h(f"inst-{study}-0"),
        "sha256": h(f"pixels-{study}-0"),
        "reason": "no effective grant for PACS",
    }


def retrieved(patient: str, study: str, grant: str | None = None) -> dict[str, Any]:
    return {
        "service": "C-MOVE",
        "calling_ae": "WS1",
        "destination": "WS1",
        "site": None,
        "patient": patient,
        "study": study,
        "completed": 12,
        "failed": 0,
        "warning": 0,
        "refused": 2,
        "tampered": 1,
        "cancelled": False,
        "status": "0xB000",
        "grant": grant,
    }


def retrieve_refused(patient: str, study: str) -> dict[str, Any]:
    return {
        "service": "C-GET",
        "calling_ae": "WS2",
        "destination": "WS2",
        "site": None,
        "patient": patient,
        "study": study,
        "instances": 12,
        "reason": "WS2 holds no grant",
    }


def tamper_alarm(patient: str, study: str) -> dict[str, Any]:
    return {
        "service": "C-MOVE",
        "calling_ae": "WS1",
        "destination": "WS1",
        "patient": patient,
        "study": study,
        "instance": h(f"inst-{study}-0"),
        "expected_sha256": h(f"pixels-{study}-0"),
        "found_sha256": h("something else"),
        "anchor": {"origin": ORIGIN_A, "index": 0},
        "problem": "stored pixel data does not match its anchor",
    }


def grant(
    patient: str, study: str | None, to: str = "WS1", heads: tuple[str, ...] = ()
) -> dict[str, Any]:
    return make_grant_payload(
        patient=patient,
        grantee=Grantee.parse(to),
        study=study,
        until="2027-01-31",
        purpose="second opinion",
        consent="form 7",
        heads=heads,
        issuer_name=AUTHORITY,
        issuer_key=AUTHORITY_KEY,
    )


def revoke(patient: str, grants: list[str], heads: list[str]) -> dict[str, Any]:
    return make_revoke_payload(
        patient=patient,
        grants=grants,
        grantee=None,
        reason="consent withdrawn",
        heads=heads,
        issuer_name=AUTHORITY,
        issuer_key=AUTHORITY_KEY,
    )


def keys_of(kind: str, payload: dict[str, Any]) -> list[str]:
    """The lookup keys the gateway attaches (anchor_keys, permission records, forwarder...)."""
    own = []
    if kind == IMAGE_ANCHORED:
        own = [f"sha256:{payload['sha256']}", f"patient:{payload['patient']}"]
    elif kind in (GRANT, REVOKE):
        own = [f"perm:{payload['patient']}"]
    return own + audit_keys(kind, payload)


def event(
    kind: str,
    payload: dict[str, Any],
    *,
    time_ms: int = 1_795_456_801_123,
    origin: str = ORIGIN_A,
    index: int = 42,
    leaf: str | None = None,
) -> AuditEvent:
    return AuditEvent(time_ms, origin, index, kind, payload, leaf or h(f"leaf-{kind}-{index}"))


# -- summary() and event_json(): pure ------------------------------------------------------------


def test_summary_of_a_receipt():
    p = anchored(P1, S1)
    assert summary(event(IMAGE_ANCHORED, p)) == (
        f"received from MODALITY (instance {p['instance'][:12]}…, sha256 {p['sha256'][:12]}…)"
    )


def test_summary_of_a_receipt_with_changes_and_recovery():
    p = anchored(
        P1,
        S1,
        frames=24,
        hash_method="pixel",
        pixels_changed_from={"origin": ORIGIN_B, "index": 7, "sha256": h("old pixels")},
        header_changed_from={"origin": ORIGIN_A, "index": 3},
        recovered=True,
    )
    text = summary(event(IMAGE_ANCHORED, p))
    assert ", 24 frames)" in text
    assert f"PIXELS CHANGED since {ORIGIN_B} #7 (sha256 was {h('old pixels')[:12]}…)" in text
    assert f"header changed since {ORIGIN_A} #3" in text
    assert "recovered at restart" in text
    assert "content sha256" in summary(
        event(IMAGE_ANCHORED, anchored(P1, S1, hash_method="content"))
    )


def test_summary_of_forwards():
    ref = h("grant-ref")
    p = forwarded(P1, S1, grant=ref)
    assert summary(event(FORWARDED, p)) == (
        f"forwarded to PACS@hospital-b.example/dicomledger (instance {p['instance'][:12]}…, "
        f"grant {ref[:12]}…)"
    )
    assert "no grant" in summary(event(FORWARDED, forwarded(P1, S1)))
    assert ", status 0xB000)" in summary(event(FORWARDED, {**p, "status": "0xB000"}))
    r = forward_refused(P1, S1)
    assert summary(event(FORWARD_REFUSED, r)) == (
        f"forward refused to PACS (instance {r['instance'][:12]}…): no effective grant for PACS"
    )


def test_summary_of_retrievals():
    ref = h("grant-ref")
    assert summary(event(RETRIEVED, retrieved(P1, S1, grant=ref))) == (
        f"retrieved by WS1 via C-MOVE to WS1: 12 sent, 0 failed, 2 refused, 1 tampered "
        f"(status 0xB000, grant {ref[:12]}…)"
    )
    cancelled = {
        **retrieved(P1, S1),
        "cancelled": True,
        "warning": 3,
        "not_sent": 4,
        "site": "gw.b",
    }
    assert summary(event(RETRIEVED, cancelled)).endswith(
        "to WS1@gw.b: 12 sent, 0 failed, 2 refused, 1 tampered, 3 with warnings, 4 not sent, CANCELLED "
        "(status 0xB000, no grant)"
    )
    assert summary(event(RETRIEVE_REFUSED, retrieve_refused(P1, S1))) == (
        "retrieve refused: C-GET by WS2 for 12 instances: WS2 holds no grant"
    )
    moved = {**retrieve_refused(P1, S1), "service": "C-MOVE", "destination": "WS9"}
    assert summary(event(RETRIEVE_REFUSED, moved)).startswith(
        "retrieve refused: C-MOVE by WS2 to WS9 for 12"
    )


def test_summary_of_a_tamper_alarm():
    p = tamper_alarm(P1, S1)
    assert summary(event(TAMPER_ALARM, p)) == (
        f"TAMPER ALARM: instance {p['instance'][:12]}…, expected sha256 {p['expected_sha256'][:12]}…, "
        f"found {p['found_sha256'][:12]}… (C-MOVE by WS1 to WS1; anchor {ORIGIN_A} #0): "
        "stored pixel data does not match its anchor"
    )
    gone = {**p, "found_sha256": None}
    assert "found no pixel data" in summary(event(TAMPER_ALARM, gone))
    # as the retrieval code writes it today: no service fields, anchor hash maybe unknown
    bare = {k: v for k, v in p.items() if k not in ("service", "calling_ae", "destination")}
    assert summary(event(TAMPER_ALARM, {**bare, "expected_sha256": None})) == (
        f"TAMPER ALARM: instance {p['instance'][:12]}…, expected sha256 unknown (anchor not held), "
        f"found {p['found_sha256'][:12]}… (anchor {ORIGIN_A} #0): stored pixel data does not match its anchor"
    )


def test_summary_of_permission_records():
    g = grant(P1, S1, to="WS1@hospital-b.example/dicomledger")
    ref = h("the grant's entry")
    assert summary(event(GRANT, g, leaf=ref)) == (
        f"grant to WS1@hospital-b.example/dicomledger, study {S1[:12]}… until 2027-01-31, "
        f"purpose 'second opinion', consent 'form 7'; issued by {AUTHORITY} (ref {ref[:12]}…)"
    )
    assert "all studies" in summary(event(GRANT, grant(P1, None)))
    r = revoke(P1, [ref], [ref])
    assert summary(event(REVOKE, r, leaf=h("revoke"))) == (
        f"revoke grants {ref[:12]}…, reason 'consent withdrawn'; issued by {AUTHORITY} "
        f"(ref {h('revoke')[:12]}…)"
    )
    by_grantee = make_revoke_payload(
        patient=P1,
        grants=[],
        grantee=Grantee.parse("WS1"),
        reason="",
        heads=[],
        issuer_name=AUTHORITY,
        issuer_key=AUTHORITY_KEY,
    )
    assert summary(event(REVOKE, by_grantee)).startswith("revoke every grant to WS1,")


def test_summary_of_a_malformed_entry_says_so_and_does_not_crash():
    assert summary(event(GRANT, {"patient": P1})).startswith("MALFORMED grant (ref ")
    text = summary(event(RETRIEVED, {"service": 5, "completed": "many", "patient": P1}))
    assert text.startswith("retrieved by ? via ? to ?: ? sent")
    assert summary(event(TAMPER_ALARM, {"anchor": "nowhere"})).startswith(
        "TAMPER ALARM: instance ?"
    )


def test_summary_escapes_control_characters_from_a_peer():
    p = {**forward_refused(P1, S1), "reason": "bad\x1b[2J\nfake line\u202e"}
    text = summary(event(FORWARD_REFUSED, p))
    assert "\x1b" not in text and "\n" not in text and "\u202e" not in text
    assert text.endswith("bad\\u001b[2J\\u000afake line\\u202e")
    long = {**forward_refused(P1, S1), "reason": "x" * 10_000}
    assert len(summary(event(FORWARD_REFUSED, long))) < 400


def test_event_json():
    p = retrieved(P1, S1)
    e = event(RETRIEVED, p, time_ms=1_795_456_801_007, origin=ORIGIN_B, index=9, leaf=h("leaf"))
    assert event_json(e) == {
        "time": "2026-11-23T18:00:01.007Z",
        "time_ms": 1_795_456_801_007,
        "gateway": ORIGIN_B,
        "index": 9,
        "kind": RETRIEVED,
        "entry_hash": h("leaf"),
        "summary": summary(e),
        "payload": p,
    }
    json.dumps(event_json(e))  # serialisable as is
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"
    assert "out of range" in iso_time(2**53 - 1)


def test_report_lines_align_columns():
    events = [
        event(RETRIEVED, retrieved(P1, S1), time_ms=1_795_456_801_123, origin=ORIGIN_B, index=7),
        event(
            IMAGE_ANCHORED, anchored(P1, S1), time_ms=1_795_456_800_000, origin="a/x", index=1234
        ),
    ]
    lines = report_lines(events, patient=P1, study=None, logs_held=2)
    assert lines[0] == f"audit of patient {P1}: 2 event(s) from 2 gateway(s), newest first"
    assert lines[1] == (
        f"2026-11-23T18:00:01.123Z  {ORIGIN_B}  #7     retrieved       {summary(events[0])}"
    )
    assert lines[2].startswith(
        f"2026-11-23T18:00:00.000Z  {'a/x':<{len(ORIGIN_B)}}  #1234  image-anchored  "
    )
    empty = report_lines([], patient=P1, study=S1, logs_held=3)
    assert empty == [
        f"audit of study {S1} of patient {P1}: no events; none of the 3 gateway log(s) "
        "held in this ledger database has an entry about it"
    ]


# -- audit_events(): reading a ledger database with two gateways' logs ---------------------------


class Clock:
    """Stands in for the `time` module the log writer reads its clock from."""

    def __init__(self) -> None:
        self.now_ms = 0

    def time(self) -> float:
        return self.now_ms / 1000


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(ledger_log, "time", c)
    return c


async def populate(path: Path, clock: Clock) -> dict[str, tuple[str, int]]:
    """Two gateways' logs in one database, entries of every kind for two patients and three
    studies; returns name -> (origin, index)."""
    store = await LedgerStore.open(path)
    writers = {o: LogWriter(store, Identity(o, key(o))) for o in (ORIGIN_A, ORIGIN_B)}
    for w in writers.values():
        await w.start()
    placed: dict[str, tuple[str, int]] = {}

    async def add(
        name: str,
        origin: str,
        t: int,
        kind: str,
        payload: dict[str, Any],
        keys: list[str] | None = None,
    ) -> str:
        clock.now_ms = t
        done = await writers[origin].append(
            kind, payload, keys_of(kind, payload) if keys is None else keys
        )
        assert done.time_ms == t
        placed[name] = (origin, done.index)
        return done.leaf_hash.hex()

    g1 = await add("grant P1 S1", ORIGIN_A, 1000, GRANT, grant(P1, S1))
    await add("anchor P1 S1", ORIGIN_A, 2000, IMAGE_ANCHORED, anchored(P1, S1))
    await add("anchor P1 S2", ORIGIN_B, 2500, IMAGE_ANCHORED, anchored(P1, S2))
    await add("forward P1 S1", ORIGIN_A, 3000, FORWARDED, forwarded(P1, S1, grant=g1))
    await add(
        "retrieve P1 S2", ORIGIN_B, 3000, RETRIEVED, retrieved(P1, S2)
    )  # same ms as A's: origin order
    await add("anchor P2 S3", ORIGIN_A, 3500, IMAGE_ANCHORED, anchored(P2, S3))
    await add("refused fwd P2 S3", ORIGIN_B, 4000, FORWARD_REFUSED, forward_refused(P2, S3))
    await add("refused get P1 S1", ORIGIN_A, 4500, RETRIEVE_REFUSED, retrieve_refused(P1, S1))
    await add("tamper P1 S2", ORIGIN_B, 5000, TAMPER_ALARM, tamper_alarm(P1, S2))
    await add(
        "tamper P1 S2 again", ORIGIN_B, 5000, TAMPER_ALARM, tamper_alarm(P1, S2)
    )  # same ms: index desc
    await add("revoke P1", ORIGIN_A, 6000, REVOKE, revoke(P1, [g1], [g1]))
    await add("grant P2 all", ORIGIN_B, 6500, GRANT, grant(P2, None, to="@" + ORIGIN_A))
    await add("grant P1 all", ORIGIN_A, 7000, GRANT, grant(P1, None))
    await add("anchor P1 S1 #2", ORIGIN_B, 7500, IMAGE_ANCHORED, anchored(P1, S1, 2))
    await add("config", ORIGIN_A, 8000, "config", {"note": "no patient here"})
    # A lookup key that does not match the entry (a stray index row) must not pull it in.
    await add(
        "stray",
        ORIGIN_B,
        9000,
        RETRIEVED,
        retrieved(P2, S3),
        keys=[f"activity:{P1}", f"study:{S1}", f"perm:{P1}", f"patient:{P1}"],
    )
    for w in writers.values():
        await w.stop()
    await store.close()
    return placed


def where(events: list[AuditEvent]) -> list[tuple[str, int]]:
    return [(e.origin, e.index) for e in events]


async def test_audit_events_by_patient_study_and_both(tmp_path, clock):
    db = tmp_path / "ledger.db"
    placed = await populate(db, clock)

    def expect(*names: str) -> list[tuple[str, int]]:
        return [placed[n] for n in names]

    store = await LedgerStore.open(db)
    try:
        p1 = await audit_events(store, patient=P1)
        assert where(p1) == expect(
            "anchor P1 S1 #2",
            "grant P1 all",
            "revoke P1",
            "tamper P1 S2 again",
            "tamper P1 S2",
            "refused get P1 S1",
            "forward P1 S1",
            "retrieve P1 S2",
            "anchor P1 S2",
            "anchor P1 S1",
            "grant P1 S1",
        )
        assert [e.time_ms for e in p1] == sorted((e.time_ms for e in p1), reverse=True)
        assert where(await audit_events(store, patient=P2)) == expect(
            "grant P2 all", "refused fwd P2 S3", "anchor P2 S3"
        )
        # a study's audit includes its patient's permission records that cover it (all studies)
        assert where(await audit_events(store, study=S1)) == expect(
            "anchor P1 S1 #2",
            "grant P1 all",
            "revoke P1",
            "refused get P1 S1",
            "forward P1 S1",
            "anchor P1 S1",
            "grant P1 S1",
        )
        assert where(await audit_events(store, study=S3)) == expect(
            "grant P2 all", "refused fwd P2 S3", "anchor P2 S3"
        )
        assert where(await audit_events(store, patient=P1, study=S2)) == expect(
            "grant P1 all",
            "revoke P1",
            "tamper P1 S2 again",
            "tamper P1 S2",
            "retrieve P1 S2",
            "anchor P1 S2",
        )
        assert await audit_events(store, patient=P2, study=S1) == []
        assert await audit_events(store, patient=h("nobody")) == []
        assert await audit_events(store, study=h("no study")) == []
        with pytest.raises(ValueError):
            await audit_events(store)

        # Each event is the stored entry: kind, time, payload, and its leaf hash.
        origin, index = placed["forward P1 S1"]
        data = await store.entry(origin, index)
        fwd = next(e for e in p1 if (e.origin, e.index) == (origin, index))
        assert fwd.kind == FORWARDED and fwd.time_ms == 3000
        assert fwd.payload == json.loads(data)["payload"]
        assert fwd.leaf_hash == hashlib.sha256(b"\x00" + data).hexdigest()
        assert (
            fwd.payload["grant"]
            == next(e for e in p1 if e.kind == GRANT and e.time_ms == 1000).leaf_hash
        )
    finally:
        await store.close()


async def test_an_unreadable_entry_is_named_not_skipped(tmp_path, clock):
    db = tmp_path / "ledger.db"
    placed = await populate(db, clock)
    origin, index = placed["tamper P1 S2"]
    con = sqlite3.connect(db)
    (data,) = con.execute(
        "SELECT e.data FROM entries e JOIN origins o ON o.id = e.origin_id WHERE o.name = ? AND e.idx = ?",
        (origin, index),
    ).fetchone()
    con.execute(
        "UPDATE entries SET data = ? WHERE idx = ? AND origin_id = (SELECT id FROM origins WHERE name = ?)",
        (bytes(data).replace(b'"problem":', b'"problem" :'), index, origin),
    )
    con.commit()
    con.close()
    store = await LedgerStore.open(db)
    try:
        with pytest.raises(AuditError, match=f"{re.escape(origin)} entry {index} cannot be read"):
            await audit_events(store, patient=P1)
        assert len(await audit_events(store, patient=P2)) == 3  # other patients unaffected
    finally:
        await store.close()


# -- the command line ----------------------------------------------------------------------------

RAW_PATIENT_ID = "DOE^JOHN-0424242"
RAW_STUDY_UID = "1.2.826.0.1.3680043.8.498.4242"
LINE_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)  (\S+) +#(\d+) +(\S+) +(.+)$")


async def test_cli_audit(tmp_path):
    directory = tmp_path / "gw"
    made = await asyncio.to_thread(
        dicomledger, "init", "--dir", str(directory), "--origin", ORIGIN_A
    )
    assert made.returncode == 0, made.stderr
    config_path = directory / "config.toml"
    config = load_config(config_path)

    def audit(*args: str):
        return dicomledger("audit", "--config", str(config_path), *args)

    before = await asyncio.to_thread(audit, "--patient-id", RAW_PATIENT_ID)
    assert before.returncode == 1 and "has not run yet" in before.stderr
    assert not config.ledger.database.exists()  # a read-only command creates no database

    secret = config.pseudonym_secret()
    patient = pseudonym(secret, "patient", RAW_PATIENT_ID)
    study = pseudonym(secret, "study", RAW_STUDY_UID)
    other_study = pseudonym(secret, "study", "1.2.3.4")
    store = await LedgerStore.open(config.ledger.database)
    writer = LogWriter(store, Identity(ORIGIN_A, load_key_file(config.ledger.key_file)))
    await writer.start()
    try:
        for kind, payload in [
            (IMAGE_ANCHORED, anchored(patient, study)),
            (GRANT, grant(patient, None)),
            (FORWARDED, forwarded(patient, study)),
            (IMAGE_ANCHORED, anchored(patient, other_study)),
            (RETRIEVED, retrieved(patient, study)),
            (TAMPER_ALARM, tamper_alarm(patient, study)),
            (IMAGE_ANCHORED, anchored(h("another patient"), h("another study"))),
        ]:
            await writer.append(kind, payload, keys_of(kind, payload))

        # The gateway's writer is still open: the audit reads beside it (WAL).
        text = await asyncio.to_thread(audit, "--patient-id", RAW_PATIENT_ID)
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0] == f"audit of patient {patient}: 6 event(s) from 1 gateway(s), newest first"
        parsed = [m for line in lines[1:] if (m := LINE_RE.match(line))]
        assert len(parsed) == len(lines) - 1 == 6, lines
        assert [m.group(4) for m in parsed] == [
            TAMPER_ALARM,
            RETRIEVED,
            IMAGE_ANCHORED,
            FORWARDED,
            GRANT,
            IMAGE_ANCHORED,
        ]
        assert [int(m.group(3)) for m in parsed] == [5, 4, 3, 2, 1, 0]
        assert {m.group(2) for m in parsed} == {ORIGIN_A}
        assert parsed[1].group(5).startswith("retrieved by WS1 via C-MOVE to WS1: 12 sent")

        both = await asyncio.to_thread(
            audit, "--patient-id", RAW_PATIENT_ID, "--study", RAW_STUDY_UID, "--json"
        )
        assert both.returncode == 0, both.stderr
        answer = json.loads(both.stdout)
        assert answer["patient"] == patient and answer["study"] == study
        assert [e["index"] for e in answer["events"]] == [5, 4, 2, 1, 0]  # 1: the all-studies grant
        first = answer["events"][0]
        assert set(first) == {
            "time",
            "time_ms",
            "gateway",
            "index",
            "kind",
            "entry_hash",
            "summary",
            "payload",
        }
        assert first["kind"] == TAMPER_ALARM and first["gateway"] == ORIGIN_A
        assert first["payload"]["patient"] == patient
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])

        by_study = await asyncio.to_thread(audit, "--study", RAW_STUDY_UID)
        assert by_study.returncode == 0
        assert (
            by_study.stdout.splitlines()[0]
            == f"audit of study {study}: 5 event(s) from 1 gateway(s), newest first"
        )

        nobody = await asyncio.to_thread(audit, "--patient-id", "SOMEONE-ELSE")
        assert nobody.returncode == 0, nobody.stderr
        assert "no events" in nobody.stdout
        assert len(nobody.stdout.splitlines()) == 1
        empty_json = await asyncio.to_thread(audit, "--study", "9.9.9", "--json")
        assert json.loads(empty_json.stdout)["events"] == []

        neither = await asyncio.to_thread(audit)
        assert neither.returncode == 2 and "--patient-id" in neither.stderr

        for result in (text, both, by_study, nobody, empty_json):
            shown = result.stdout + result.stderr
            assert RAW_PATIENT_ID not in shown and "DOE" not in shown
            assert (
                RAW_STUDY_UID not in shown and "SOMEONE-ELSE" not in shown and "9.9.9" not in shown
            )
    finally:
        await writer.stop()
        await store.close()


async def test_entries_stored_before_the_audit_keys_get_them_once(tmp_path):
    """A ledger written before `study:`/`activity:` keys existed: the gateway attaches them
    at start (LOOKUP_KEYS_VERSION), once, so the auditor still sees old forwards."""
    db = tmp_path / "ledger.db"
    store = await LedgerStore.open(db)
    writer = LogWriter(store, Identity(ORIGIN_A, key(ORIGIN_A)))
    await writer.start()
    await writer.append(
        FORWARDED, forwarded(P1, S1), keys=()
    )  # as an older gateway wrote it: no keys
    await writer.append(IMAGE_ANCHORED, anchored(P1, S1), [f"patient:{P1}"])
    await writer.stop()
    assert await audit_events(store, study=S1) == []
    assert [e.kind for e in await audit_events(store, patient=P1)] == [IMAGE_ANCHORED]

    assert await store.add_lookup_keys() == 2
    assert [e.kind for e in await audit_events(store, study=S1)] == [IMAGE_ANCHORED, FORWARDED]
    assert [e.kind for e in await audit_events(store, patient=P1)] == [IMAGE_ANCHORED, FORWARDED]
    assert await store.add_lookup_keys() == 0  # done once
    await store.close()
