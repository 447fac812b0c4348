"""Patient permissions: grant/revoke payloads, issuer signatures, revoke-wins decisions."""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import random
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomledger.ledger.entries import (
    GRANT,
    IMAGE_ANCHORED,
    REVOKE,
    ZERO_HASH,
    canonical_json,
    decode_entry,
    entry_hash,
    sign_entry,
)
from dicomledger.ledger.merkle import leaf_hash
from dicomledger.ledger.permissions import (
    PERMISSION_PREFIX,
    Grant,
    Grantee,
    PermissionFormatError,
    Revoke,
    ancestors,
    decide,
    evaluate,
    heads_of,
    issuer_signature_ok,
    make_grant_payload,
    make_revoke_payload,
    order_history,
    parse_permission,
    signed_message,
)

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


def key(seed: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed.encode()).digest())


ORIGIN_A = "hospital-a.example/dicomledger"
ORIGIN_B = "hospital-b.example/dicomledger"
ORIGIN_C = "hospital-c.example/dicomledger"
AUTHORITY = "consent-office.hospital-a.example"
ROGUE = "rogue.example"
GATEWAY_KEYS = {ORIGIN_A: key("gateway-a"), ORIGIN_B: key("gateway-b"), ORIGIN_C: key("gateway-c")}
AUTHORITY_KEY = key("authority")
ROGUE_KEY = key("rogue")
ISSUER_KEYS = {AUTHORITY: AUTHORITY_KEY, ROGUE: ROGUE_KEY}
PATIENT = "p" + "1" * 63
OTHER_PATIENT = "p" + "2" * 63
STUDY_S = "s" + "a" * 63
STUDY_T = "s" + "b" * 63
TODAY = "2025-06-01"


def is_authorised(record: Grant | Revoke) -> str | None:
    """The authority may sign for every patient; ROGUE holds a key but no authority."""
    if record.issuer != AUTHORITY:
        return f"issuer {record.issuer} is not a consent authority"
    if not issuer_signature_ok(record, AUTHORITY_KEY.public_key()):
        return "issuer signature does not verify"
    return None


class Ledger:
    """Appends entries to per-origin chains, as gateways do."""

    def __init__(self) -> None:
        self.next: dict[str, tuple[int, bytes]] = {}

    def append(self, kind: str, payload: Any, origin: str = ORIGIN_A) -> tuple[Any, bytes]:
        index, prev = self.next.get(origin, (0, ZERO_HASH))
        _, data = sign_entry(
            origin=origin,
            index=index,
            prev=prev,
            time_ms=1_763_890_000_000 + index,
            kind=kind,
            payload=payload,
            private_key=GATEWAY_KEYS[origin],
        )
        self.next[origin] = (index + 1, entry_hash(data))
        return decode_entry(data), data

    def record(self, kind: str, payload: Any, origin: str = ORIGIN_A) -> Grant | Revoke:
        return parse_permission(*self.append(kind, payload, origin))

    def grant(
        self,
        grantee: str,
        *,
        heads: list[str] | tuple[str, ...] = (),
        study: str | None = None,
        until: str | None = None,
        issuer: str = AUTHORITY,
        patient: str = PATIENT,
        origin: str = ORIGIN_A,
    ) -> Grant:
        payload = make_grant_payload(
            patient=patient,
            grantee=Grantee.parse(grantee),
            study=study,
            until=until,
            purpose="treatment",
            consent="form-42",
            heads=heads,
            issuer_name=issuer,
            issuer_key=ISSUER_KEYS[issuer],
        )
        record = self.record(GRANT, payload, origin)
        assert isinstance(record, Grant)
        return record

    def revoke(
        self,
        *,
        grants: list[str] | tuple[str, ...] = (),
        grantee: str | None = None,
        heads: list[str] | tuple[str, ...] = (),
        issuer: str = AUTHORITY,
        patient: str = PATIENT,
        origin: str = ORIGIN_A,
    ) -> Revoke:
        payload = make_revoke_payload(
            patient=patient,
            grants=grants,
            grantee=None if grantee is None else Grantee.parse(grantee),
            reason="consent withdrawn",
            heads=heads,
            issuer_name=issuer,
            issuer_key=ISSUER_KEYS[issuer],
        )
        record = self.record(REVOKE, payload, origin)
        assert isinstance(record, Revoke)
        return record


def state_of(records: list[Grant | Revoke], today: str = TODAY, **kw: Any):
    return evaluate(records, is_authorised=is_authorised, today=today, **kw)


def allowed(records, *, ae="PACS", site=ORIGIN_B, study=STUDY_S, today=TODAY) -> bool:
    return decide(state_of(records, today), ae=ae, site=site, study=study).allowed


# -- grantee ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ae", "gateway"),
    [
        ("PACS", "PACS", None),
        ("PACS@hospital-b.example/dicomledger", "PACS", ORIGIN_B),
        ("@hospital-b.example/dicomledger", None, ORIGIN_B),
        ("  PACS  ", "PACS", None),
        ("MY PACS@x", "MY PACS", "x"),
        ("A@b@c", "A", "b@c"),  # split at the first "@": AE titles never contain one
    ],
)
def test_grantee_parse_and_str(text: str, ae: str | None, gateway: str | None) -> None:
    grantee = Grantee.parse(text)
    assert (grantee.ae, grantee.gateway) == (ae, gateway)
    assert Grantee.parse(str(grantee)) == grantee


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("", "grantee"),
        ("@", "grantee"),
        ("PACS@", "grantee"),
        ("A\\B", "grantee.ae"),
        ("ABCDEFGHIJKLMNOPQ", "grantee.ae"),
        ("PA\x01CS", "grantee.ae"),
        ("PACS@bad name", "grantee.gateway"),
        ("PACS@a+b", "grantee.gateway"),
    ],
)
def test_grantee_parse_rejects(text: str, field: str) -> None:
    with pytest.raises(PermissionFormatError, match=field.replace(".", r"\.")):
        Grantee.parse(text)


def test_grantee_constructor_checks() -> None:
    with pytest.raises(PermissionFormatError, match="neither"):
        Grantee(None, None)
    with pytest.raises(PermissionFormatError, match="leading or trailing spaces"):
        Grantee("PACS ", None)


# -- round trip and issuer signatures ----------------------------------------------------------


def test_grant_round_trip() -> None:
    ledger = Ledger()
    heads = ["ff" * 32, "00" * 32, "ff" * 32]
    payload = make_grant_payload(
        patient=PATIENT,
        grantee=Grantee("PACS", ORIGIN_B),
        study=STUDY_S,
        until="2025-12-31",
        purpose="second opinion",
        consent="form-42 signed 2025-05-01",
        heads=heads,
        issuer_name=AUTHORITY,
        issuer_key=AUTHORITY_KEY,
    )
    entry, data = ledger.append(GRANT, payload, ORIGIN_C)
    record = parse_permission(entry, data)
    assert record == Grant(
        ref=leaf_hash(data).hex(),
        origin=ORIGIN_C,
        index=0,
        time_ms=entry.time_ms,
        patient=PATIENT,
        grantee=Grantee("PACS", ORIGIN_B),
        study=STUDY_S,
        until="2025-12-31",
        purpose="second opinion",
        consent="form-42 signed 2025-05-01",
        heads=("00" * 32, "ff" * 32),
        issuer=AUTHORITY,
        issuer_sig=record.issuer_sig,
    )
    assert issuer_signature_ok(record, AUTHORITY_KEY.public_key())
    assert not issuer_signature_ok(record, ROGUE_KEY.public_key())
    # the issuer signed exactly the prefix and the canonical payload without its signature
    unsigned = {k: v for k, v in payload.items() if k != "issuer_sig"}
    assert signed_message(record) == PERMISSION_PREFIX + canonical_json(unsigned)


def test_revoke_round_trip() -> None:
    ledger = Ledger()
    refs = ["ab" * 32, "12" * 32]
    payload = make_revoke_payload(
        patient=PATIENT,
        grants=refs,
        grantee=Grantee(None, ORIGIN_B),
        reason="withdrawn",
        heads=["cd" * 32],
        issuer_name=AUTHORITY,
        issuer_key=AUTHORITY_KEY,
    )
    entry, data = ledger.append(REVOKE, payload)
    record = parse_permission(entry, data)
    assert isinstance(record, Revoke)
    assert (record.ref, record.origin, record.index) == (leaf_hash(data).hex(), ORIGIN_A, 0)
    assert (record.patient, record.grants, record.grantee, record.reason, record.heads) == (
        PATIENT,
        ("12" * 32, "ab" * 32),
        Grantee(None, ORIGIN_B),
        "withdrawn",
        ("cd" * 32,),
    )
    assert record.issuer == AUTHORITY
    assert issuer_signature_ok(record, AUTHORITY_KEY.public_key())
    assert not issuer_signature_ok(record, ROGUE_KEY.public_key())


def _grant_payload(**kw: Any) -> dict[str, Any]:
    args = dict(
        patient=PATIENT,
        grantee=Grantee("PACS", ORIGIN_B),
        study=STUDY_S,
        until="2025-12-31",
        purpose="treatment",
        consent="form-42",
        heads=["aa" * 32],
        issuer_name=AUTHORITY,
        issuer_key=AUTHORITY_KEY,
    )
    args.update(kw)
    return make_grant_payload(**args)


def _revoke_payload(**kw: Any) -> dict[str, Any]:
    args = dict(
        patient=PATIENT,
        grants=["bb" * 32],
        grantee=Grantee("PACS", None),
        reason="withdrawn",
        heads=["aa" * 32],
        issuer_name=AUTHORITY,
        issuer_key=AUTHORITY_KEY,
    )
    args.update(kw)
    return make_revoke_payload(**args)


# Valid but different values: the entry still parses, the issuer signature must not verify.
SIG_MUTATIONS = [
    (GRANT, "patient", OTHER_PATIENT),
    (GRANT, "grantee", {"ae": "PACS", "gateway": ORIGIN_C}),
    (GRANT, "grantee", {"ae": None, "gateway": ORIGIN_B}),
    (GRANT, "study", None),
    (GRANT, "study", STUDY_T),
    (GRANT, "until", None),
    (GRANT, "until", "2026-12-31"),
    (GRANT, "purpose", "research"),
    (GRANT, "consent", ""),
    (GRANT, "heads", []),
    (GRANT, "heads", ["aa" * 32, "bb" * 32]),
    (GRANT, "issuer", ROGUE),
    (REVOKE, "patient", OTHER_PATIENT),
    (REVOKE, "grants", ["cc" * 32]),
    (REVOKE, "grants", []),
    (REVOKE, "grantee", None),
    (REVOKE, "grantee", {"ae": "PACS", "gateway": ORIGIN_B}),
    (REVOKE, "reason", "mistake"),
    (REVOKE, "heads", []),
    (REVOKE, "issuer", ROGUE),
]


@pytest.mark.parametrize(("kind", "field", "value"), SIG_MUTATIONS)
def test_issuer_signature_covers_every_field(kind: str, field: str, value: Any) -> None:
    payload = _grant_payload() if kind == GRANT else _revoke_payload()
    ledger = Ledger()
    assert issuer_signature_ok(ledger.record(kind, payload), AUTHORITY_KEY.public_key())
    payload[field] = value
    record = ledger.record(kind, payload)  # still well-formed
    assert not issuer_signature_ok(record, AUTHORITY_KEY.public_key())
    assert is_authorised(record) is not None


def test_issuer_signature_of_another_record_does_not_verify() -> None:
    a, b = _grant_payload(), _grant_payload(purpose="research")
    a["issuer_sig"] = b["issuer_sig"]
    assert not issuer_signature_ok(Ledger().record(GRANT, a), AUTHORITY_KEY.public_key())


# -- rejections --------------------------------------------------------------------------------


def _set(field: str, value: Any):
    def mutate(p: dict[str, Any]) -> None:
        p[field] = value

    return mutate


def _set_in(field: str, sub: str, value: Any):
    def mutate(p: dict[str, Any]) -> None:
        p[field][sub] = value

    return mutate


def _drop(field: str):
    def mutate(p: dict[str, Any]) -> None:
        del p[field]

    return mutate


def _resign(p: dict[str, Any]) -> None:
    # a well-signed payload, so only the format check can reject it
    unsigned = {k: v for k, v in p.items() if k != "issuer_sig"}
    p["issuer_sig"] = base64.b64encode(
        AUTHORITY_KEY.sign(PERMISSION_PREFIX + canonical_json(unsigned))
    ).decode()


def _no_target(p: dict[str, Any]) -> None:
    p["grants"], p["grantee"] = [], None


REF = "aa" * 32
REJECTIONS = [
    (GRANT, _drop("patient"), "missing field 'patient'"),
    (GRANT, _drop("until"), "missing field 'until'"),
    (GRANT, _drop("issuer_sig"), "missing field 'issuer_sig'"),
    (GRANT, _set("note", "x"), "unknown field 'note'"),
    (GRANT, _set("grants", []), "unknown field 'grants'"),
    (GRANT, _set("patient", "p@1"), "grant patient"),
    (GRANT, _set("patient", "p" * 129), "grant patient"),
    (GRANT, _set("patient", ""), "grant patient"),
    (GRANT, _set("patient", 12), "grant patient"),
    (GRANT, _set("grantee", None), "grant grantee"),
    (GRANT, _set("grantee", "PACS"), "grant grantee"),
    (GRANT, _set("grantee", {"ae": None, "gateway": None}), "grant grantee"),
    (GRANT, _set("grantee", {"ae": "PACS"}), "grant grantee: missing field 'gateway'"),
    (GRANT, _set_in("grantee", "site", "x"), "grant grantee: unknown field 'site'"),
    (GRANT, _set_in("grantee", "ae", "A\\B"), "grant grantee.ae"),
    (GRANT, _set_in("grantee", "ae", "A@B"), "grant grantee.ae"),
    (GRANT, _set_in("grantee", "ae", "X" * 17), "grant grantee.ae"),
    (GRANT, _set_in("grantee", "ae", "    "), "grant grantee.ae"),
    (GRANT, _set_in("grantee", "ae", ""), "grant grantee.ae"),
    (GRANT, _set_in("grantee", "ae", "PACS "), "grant grantee.ae"),
    (GRANT, _set_in("grantee", "ae", "PÄCS"), "grant grantee.ae"),
    (GRANT, _set_in("grantee", "ae", 7), "grant grantee.ae"),
    (GRANT, _set_in("grantee", "gateway", "a b"), "grant grantee.gateway"),
    (GRANT, _set_in("grantee", "gateway", "a+b"), "grant grantee.gateway"),
    (GRANT, _set_in("grantee", "gateway", ""), "grant grantee.gateway"),
    (GRANT, _set_in("grantee", "gateway", "g" * 256), "grant grantee.gateway"),
    (GRANT, _set("study", ""), "grant study"),
    (GRANT, _set("study", "1.2.840.1"), "grant study"),
    (GRANT, _set("until", "2025-02-30"), "grant until"),
    (GRANT, _set("until", "20250101"), "grant until"),
    (GRANT, _set("until", "2025-1-01"), "grant until"),
    (GRANT, _set("until", "2025-01-01T00:00"), "grant until"),
    (GRANT, _set("until", 20250101), "grant until"),
    (GRANT, _set("purpose", "line\nbreak"), "grant purpose"),
    (GRANT, _set("purpose", "x" * 257), "grant purpose"),
    (GRANT, _set("purpose", None), "grant purpose"),
    (GRANT, _set("consent", "a\x9bb"), "grant consent"),
    (GRANT, _set("consent", ["x"]), "grant consent"),
    (GRANT, _set("heads", ["bb" * 32, "aa" * 32]), "grant heads"),
    (GRANT, _set("heads", [REF, REF]), "grant heads"),
    (GRANT, _set("heads", ["AA" * 32]), "grant heads"),
    (GRANT, _set("heads", ["aa" * 31]), "grant heads"),
    (GRANT, _set("heads", [f"{i:064x}" for i in range(65)]), "grant heads"),
    (GRANT, _set("heads", REF), "grant heads"),
    (GRANT, _set("heads", [1]), "grant heads"),
    (GRANT, _set("issuer", ""), "grant issuer"),
    (GRANT, _set("issuer", "consent office"), "grant issuer"),
    (GRANT, _set("issuer", "a+b"), "grant issuer"),
    (GRANT, _set("issuer", None), "grant issuer"),
    (GRANT, _set("issuer_sig", "not base64!"), "grant issuer_sig"),
    (GRANT, _set("issuer_sig", "AAAA" * 21 + "AA"), "grant issuer_sig"),  # no padding
    (GRANT, _set("issuer_sig", "AAAA" * 21), "grant issuer_sig"),  # 63 bytes
    (GRANT, _set("issuer_sig", None), "grant issuer_sig"),
    (REVOKE, _no_target, "revoke grants"),
    (REVOKE, _set("grants", ["bb" * 32, "aa" * 32]), "revoke grants"),
    (REVOKE, _set("grants", [f"{i:064x}" for i in range(257)]), "revoke grants"),
    (REVOKE, _set("grants", "bb" * 32), "revoke grants"),
    (REVOKE, _set_in("grantee", "ae", "A\\B"), "revoke grantee.ae"),
    (REVOKE, _set("grantee", {"ae": None, "gateway": None}), "revoke grantee"),
    (REVOKE, _set("grantee", []), "revoke grantee"),
    (REVOKE, _set("reason", "del\x7f"), "revoke reason"),
    (REVOKE, _set("reason", 0), "revoke reason"),
    (REVOKE, _drop("grantee"), "missing field 'grantee'"),
    (REVOKE, _set("until", None), "unknown field 'until'"),
    (REVOKE, _set("heads", ["zz" * 32]), "revoke heads"),
    (REVOKE, _set("patient", "p 1"), "revoke patient"),
    (REVOKE, _set("issuer", "\u2028"), "revoke issuer"),
]


@pytest.mark.parametrize(("kind", "mutate", "message"), REJECTIONS)
def test_malformed_payloads_are_rejected(kind: str, mutate, message: str) -> None:
    payload = copy.deepcopy(_grant_payload() if kind == GRANT else _revoke_payload())
    mutate(payload)
    if "issuer_sig" not in message and "issuer_sig" in payload:
        _resign(payload)
    entry, data = Ledger().append(kind, payload)
    with pytest.raises(PermissionFormatError, match=message.replace(".", r"\.")):
        parse_permission(entry, data)


def test_parse_rejects_other_kinds_and_foreign_bytes() -> None:
    ledger = Ledger()
    entry, data = ledger.append(IMAGE_ANCHORED, {"patient": PATIENT})
    with pytest.raises(PermissionFormatError, match="not a permission record"):
        parse_permission(entry, data)
    grant_entry, _ = ledger.append(GRANT, _grant_payload())
    with pytest.raises(PermissionFormatError, match="not the encoding"):
        parse_permission(grant_entry, data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"patient": "p/1"}, "grant patient"),
        ({"until": "2025-13-01"}, "grant until"),
        ({"purpose": "a\tb"}, "grant purpose"),
        ({"heads": ["xyz"]}, r"grant heads\[0\]"),
        ({"heads": "aa" * 32}, "grant heads"),
        ({"issuer_name": "two words"}, "grant issuer"),
        ({"grantee": "PACS"}, "grant grantee"),
    ],
)
def test_make_grant_payload_checks_its_arguments(change: dict[str, Any], message: str) -> None:
    with pytest.raises(PermissionFormatError, match=message):
        _grant_payload(**change)


def test_make_revoke_payload_needs_a_target() -> None:
    with pytest.raises(PermissionFormatError, match="revoke grants"):
        _revoke_payload(grants=[], grantee=None)
    # sorted and deduplicated for the caller
    payload = _revoke_payload(grants=["bb" * 32, "aa" * 32, "bb" * 32], heads=[])
    assert payload["grants"] == ["aa" * 32, "bb" * 32]


# -- the fixed vector --------------------------------------------------------------------------

VECTOR_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
VECTOR_JSON = (
    b'{"consent":"form-2025-0042","grantee":{"ae":"PACS","gateway":"hospital-b.example/dicomledger"},'
    b'"heads":["1111111111111111111111111111111111111111111111111111111111111111",'
    b'"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"],'
    b'"issuer":"consent-office.hospital-a.example",'
    b'"issuer_sig":"1GhROYRa7GpcWVouNIEdadWQgG9UOfdf4LxHqi88QGIL6vdzSuNtVBtVsrL3ujNofTByReXMkHxkENqmPWa4AQ==",'
    b'"patient":"p000000000000000000000000000000000000000000000000000000000000000",'
    b'"purpose":"treatment","study":null,"until":"2026-12-31"}'
)


def test_grant_vector() -> None:
    payload = make_grant_payload(
        patient="p" + "0" * 63,
        grantee=Grantee.parse("PACS@hospital-b.example/dicomledger"),
        study=None,
        until="2026-12-31",
        purpose="treatment",
        consent="form-2025-0042",
        heads=["aa" * 32, "11" * 32],
        issuer_name="consent-office.hospital-a.example",
        issuer_key=VECTOR_KEY,
    )
    assert canonical_json(payload) == VECTOR_JSON
    assert payload["issuer_sig"] == (
        "1GhROYRa7GpcWVouNIEdadWQgG9UOfdf4LxHqi88QGIL6vdzSuNtVBtVsrL3ujNofTByReXMkHxkENqmPWa4AQ=="
    )
    record = Ledger().record(GRANT, payload)
    assert issuer_signature_ok(record, VECTOR_KEY.public_key())


# -- history -----------------------------------------------------------------------------------


def test_heads_ancestors_and_order() -> None:
    ledger = Ledger()
    g1 = ledger.grant("PACS@" + ORIGIN_B)
    g2 = ledger.grant("VIEW", origin=ORIGIN_B)
    r = ledger.revoke(grants=[g1.ref], heads=heads_of([g1, g2]))
    g3 = ledger.grant("@" + ORIGIN_C, heads=[g2.ref], origin=ORIGIN_C)
    g4 = ledger.grant("PACS", heads=sorted([r.ref, g3.ref, "ee" * 32]))  # cites one we lack
    records = [g4, g3, r, g2, g1]
    assert heads_of([g1, g2]) == sorted([g1.ref, g2.ref])
    assert heads_of(records) == [g4.ref]
    assert heads_of([r, g3]) == sorted([r.ref, g3.ref])  # what they cite is not held here
    by_ref = {x.ref: x for x in records}
    assert ancestors(g4.ref, by_ref) == {r.ref, g3.ref, g1.ref, g2.ref}
    assert ancestors(g3.ref, by_ref) == {g2.ref}
    assert ancestors(g1.ref, by_ref) == set()
    assert ancestors("ee" * 32, by_ref) == set()
    order = order_history(records)
    position = {x.ref: i for i, x in enumerate(order)}
    for x in records:
        assert all(position[h] < position[x.ref] for h in x.heads if h in position)
    assert order[-1] == g4
    assert order[:2] == sorted([g1, g2], key=lambda x: x.ref)  # ties broken by ref
    assert order_history(list(reversed(records)) + records) == order  # duplicates collapse


def test_heads_of_can_skip_unauthorised_records() -> None:
    ledger = Ledger()
    g = ledger.grant("PACS")
    junk = [ledger.grant("PACS", issuer=ROGUE, heads=[g.ref]) for _ in range(2)]
    assert heads_of([g, *junk]) == sorted(j.ref for j in junk)
    assert heads_of([g, *junk], is_authorised=is_authorised) == [g.ref]


# -- decisions ---------------------------------------------------------------------------------


def test_default_deny_and_simple_grant() -> None:
    ledger = Ledger()
    assert not allowed([])
    assert decide(state_of([]), ae="PACS", site=ORIGIN_B, study=None).reason == (
        f"no grant for PACS@{ORIGIN_B}"
    )
    g = ledger.grant("PACS@" + ORIGIN_B)
    decision = decide(state_of([g]), ae="PACS", site=ORIGIN_B, study=STUDY_S)
    assert decision.allowed and decision.grant == g
    assert g.ref[:8] in decision.reason
    assert not allowed([g], ae="VIEW")
    assert not allowed([g], site=ORIGIN_C)
    assert not allowed([g], site=None)  # a destination not assigned to that gateway
    assert allowed([g], ae="PACS  ")  # trailing spaces are not significant in an AE title


def test_grant_then_revoke_by_ref_denies() -> None:
    ledger = Ledger()
    g = ledger.grant("PACS@" + ORIGIN_B)
    r = ledger.revoke(grants=[g.ref], heads=[g.ref], origin=ORIGIN_B)
    state = state_of([g, r])
    assert state.effective == [] and state.ended == {g.ref: f"revoked by {r.ref}"}
    decision = decide(state, ae="PACS", site=ORIGIN_B, study=STUDY_S)
    assert not decision.allowed and decision.grant is None
    assert decision.reason == f"grant {g.ref[:8]} to PACS@{ORIGIN_B} revoked by {r.ref[:8]}"


def test_grant_then_revoke_by_grantee_denies() -> None:
    ledger = Ledger()
    g = ledger.grant("PACS@" + ORIGIN_B)
    other = ledger.grant("VIEW@" + ORIGIN_B)
    r = ledger.revoke(grantee="PACS@" + ORIGIN_B, heads=heads_of([g, other]))
    assert not allowed([g, other, r])
    assert allowed([g, other, r], ae="VIEW")  # another grantee is untouched
    assert state_of([g, other, r]).revoked_by == {g.ref: r.ref}


def test_revoke_whole_gateway_ends_its_aes_but_not_unscoped_grants() -> None:
    ledger = Ledger()
    at_b = ledger.grant("PACS@" + ORIGIN_B)
    whole_b = ledger.grant("@" + ORIGIN_B)
    any_site = ledger.grant("VIEW")
    r = ledger.revoke(grantee="@" + ORIGIN_B, heads=heads_of([at_b, whole_b, any_site]))
    state = state_of([at_b, whole_b, any_site, r])
    assert set(state.revoked_by) == {at_b.ref, whole_b.ref}
    assert state.effective == [any_site]


def test_revoke_then_later_grant_citing_it_allows() -> None:
    ledger = Ledger()
    g1 = ledger.grant("PACS@" + ORIGIN_B)
    r = ledger.revoke(grantee="PACS@" + ORIGIN_B, heads=[g1.ref])
    g2 = ledger.grant("PACS@" + ORIGIN_B, heads=[r.ref], origin=ORIGIN_C)
    state = state_of([g2, r, g1])
    assert [g.ref for g in state.effective] == [g2.ref]
    assert state.ended == {g1.ref: f"revoked by {r.ref}"}
    decision = decide(state, ae="PACS", site=ORIGIN_B, study=STUDY_S)
    assert decision.allowed and decision.grant == g2
    # ancestry counts transitively: a grant citing g2 has seen r too
    g3 = ledger.grant("PACS@" + ORIGIN_B, heads=[g2.ref])
    assert g3 in state_of([g3, g2, r, g1]).effective


def test_concurrent_grant_and_revoke_revoke_wins() -> None:
    ledger = Ledger()
    g0 = ledger.grant("VIEW")
    g = ledger.grant("PACS@" + ORIGIN_B, heads=[g0.ref], origin=ORIGIN_C)
    r = ledger.revoke(grantee="PACS", heads=[g0.ref], origin=ORIGIN_B)  # neither cites the other
    assert not allowed([g0, g, r])
    assert allowed([g0, g], ae="PACS")


def test_missing_ancestry_counts_as_concurrent() -> None:
    ledger = Ledger()
    g1 = ledger.grant("PACS")
    r = ledger.revoke(grantee="PACS", heads=[g1.ref])
    g2 = ledger.grant("PACS", heads=[r.ref])
    middle = ledger.grant("OTHER", heads=[r.ref])
    g3 = ledger.grant("PACS", heads=[middle.ref])
    assert allowed([g1, r, g2])
    assert g3 in state_of([g1, r, middle, g3]).effective
    # without `middle` we cannot see that g3's issuer knew r: the revoke wins (fail safe)
    assert g3.ref in state_of([g1, r, g3]).revoked_by


def test_expiry_is_inclusive() -> None:
    ledger = Ledger()
    g = ledger.grant("PACS@" + ORIGIN_B, until="2025-06-01")
    assert allowed([g], today="2025-06-01")
    assert allowed([g], today="2025-05-31")
    assert not allowed([g], today="2025-06-02")
    state = state_of([g], today="2025-06-02")
    assert state.ended == {g.ref: "expired after 2025-06-01"}
    decision = decide(state, ae="PACS", site=ORIGIN_B, study=STUDY_S)
    assert decision.reason == f"grant {g.ref[:8]} to PACS@{ORIGIN_B} expired after 2025-06-01"


@pytest.mark.parametrize("today", ["2025-6-1", "20250601", "2025-02-30", "", "2025-06-01T00:00"])
def test_evaluate_rejects_a_bad_today(today: str) -> None:
    with pytest.raises(PermissionFormatError, match="today"):
        state_of([], today=today)


def test_study_scope() -> None:
    ledger = Ledger()
    g = ledger.grant("PACS@" + ORIGIN_B, study=STUDY_S)
    assert allowed([g], study=STUDY_S)
    assert not allowed([g], study=STUDY_T)
    assert not allowed([g], study=None)
    reason = decide(state_of([g]), ae="PACS", site=ORIGIN_B, study=STUDY_T).reason
    assert "covers this study" in reason


def test_whole_gateway_grant() -> None:
    ledger = Ledger()
    g = ledger.grant("@" + ORIGIN_B)
    assert allowed([g], ae="PACS", site=ORIGIN_B)
    assert allowed([g], ae="VIEWER", site=ORIGIN_B)
    assert not allowed([g], ae="PACS", site=ORIGIN_C)
    assert not allowed([g], ae="PACS", site=None)


def test_ae_grant_at_any_site() -> None:
    g = Ledger().grant("PACS")
    assert allowed([g], site=ORIGIN_B) and allowed([g], site=ORIGIN_C) and allowed([g], site=None)


def test_unauthorised_grant_is_ignored_and_reported() -> None:
    ledger = Ledger()
    g = ledger.grant("PACS@" + ORIGIN_B, issuer=ROGUE)
    state = state_of([g])
    assert state.effective == [] and state.ignored == {
        g.ref: f"issuer {ROGUE} is not a consent authority"
    }
    decision = decide(state, ae="PACS", site=ORIGIN_B, study=STUDY_S)
    assert not decision.allowed and "not a consent authority" in decision.reason


def test_grant_with_a_forged_issuer_signature_is_ignored() -> None:
    payload = _grant_payload()
    payload["issuer_sig"] = _grant_payload(purpose="other")["issuer_sig"]
    g = Ledger().record(GRANT, payload)
    assert state_of([g]).ignored == {g.ref: "issuer signature does not verify"}
    assert not allowed([g])


def test_unauthorised_revoke_does_not_end_a_grant() -> None:
    ledger = Ledger()
    g = ledger.grant("PACS@" + ORIGIN_B)
    r = ledger.revoke(grants=[g.ref], grantee="PACS", heads=[g.ref], issuer=ROGUE)
    state = state_of([g, r])
    assert state.effective == [g] and set(state.ignored) == {r.ref}
    assert allowed([g, r])


def test_unauthorised_record_cannot_make_a_grant_look_fresh() -> None:
    # A junk record citing the revoke, cited by a concurrent grant, must not hide the revoke.
    ledger = Ledger()
    g0 = ledger.grant("VIEW")
    r = ledger.revoke(grantee="PACS", heads=[g0.ref], origin=ORIGIN_B)
    junk = ledger.grant("OTHER", heads=[r.ref], issuer=ROGUE, origin=ORIGIN_C)
    g = ledger.grant("PACS", heads=[junk.ref])
    assert g.ref in state_of([g0, r, junk, g]).revoked_by


def test_revoked_grant_copied_into_another_entry_stays_revoked() -> None:
    # Anyone can append a grant's signed payload again (another entry, so another ref).
    ledger = Ledger()
    payload = _grant_payload(heads=[])
    g = ledger.record(GRANT, payload)
    r = ledger.revoke(grants=[g.ref], heads=[g.ref])
    copy_ = ledger.record(GRANT, payload, ORIGIN_C)
    assert copy_.ref != g.ref and is_authorised(copy_) is None
    state = state_of([g, r, copy_])
    assert state.effective == [] and state.revoked_by == {g.ref: r.ref, copy_.ref: r.ref}


def test_records_of_another_patient_are_ignored() -> None:
    ledger = Ledger()
    mine = ledger.grant("VIEW")
    theirs = ledger.grant("PACS@" + ORIGIN_B, patient=OTHER_PATIENT)
    state = state_of([mine, theirs], patient=PATIENT)
    assert state.patient == PATIENT
    assert list(state.ignored) == [theirs.ref]
    assert state.ignored[theirs.ref].startswith("record is for patient p2222")
    assert not decide(state, ae="PACS", site=ORIGIN_B, study=STUDY_S).allowed
    # a revoke of another patient ends nothing here, even when it names the grant
    r = ledger.revoke(grants=[mine.ref], grantee="VIEW", patient=OTHER_PATIENT)
    assert state_of([mine, r], patient=PATIENT).effective == [mine]
    # several patients and none named: nobody guesses, everything is ignored
    state = state_of([mine, theirs])
    assert state.patient is None and state.effective == [] and len(state.ignored) == 2
    assert not decide(state, ae="VIEW", site=None, study=None).allowed


def test_several_matching_grants_pick_the_smallest_ref() -> None:
    ledger = Ledger()
    grants = [ledger.grant("PACS"), ledger.grant("@" + ORIGIN_B), ledger.grant("PACS@" + ORIGIN_B)]
    for order in (grants, grants[::-1]):
        decision = decide(state_of(order), ae="PACS", site=ORIGIN_B, study=STUDY_S)
        assert decision.grant == min(grants, key=lambda g: g.ref)


def test_several_revokes_name_the_smallest_ref() -> None:
    ledger = Ledger()
    g = ledger.grant("PACS@" + ORIGIN_B)
    revokes = [
        ledger.revoke(grants=[g.ref], heads=[g.ref]),
        ledger.revoke(grantee="PACS", origin=ORIGIN_B),
        ledger.revoke(grantee="@" + ORIGIN_B, origin=ORIGIN_C),
    ]
    first = min(r.ref for r in revokes)
    for order in ([g, *revokes], [*revokes[::-1], g]):
        assert state_of(order).revoked_by == {g.ref: first}


def test_conflicting_records_with_one_ref_are_a_caller_bug() -> None:
    g = Ledger().grant("PACS")
    with pytest.raises(ValueError, match="share ref"):
        state_of([g, dataclasses.replace(g, purpose="other")])


# -- order independence ------------------------------------------------------------------------

GRANTEES = ["PACS@" + ORIGIN_B, "PACS", "@" + ORIGIN_B, "VIEW@" + ORIGIN_C, "VIEW"]
UNTILS = [None, "2025-05-31", "2025-06-01", "2026-01-01"]
STUDIES = [None, STUDY_S, STUDY_T]
ORIGINS = [ORIGIN_A, ORIGIN_B, ORIGIN_C]
QUERIES = [
    (ae, site, study)
    for ae in ("PACS", "VIEW", "OTHER")
    for site in (ORIGIN_B, ORIGIN_C, None)
    for study in (STUDY_S, STUDY_T)
]


@st.composite
def histories(draw: st.DrawFn) -> list[Grant | Revoke]:
    ledger = Ledger()
    records: list[Grant | Revoke] = []
    for _ in range(draw(st.integers(1, 9))):
        refs = [r.ref for r in records]
        heads = draw(st.lists(st.sampled_from(refs), max_size=3)) if refs else []
        common = dict(
            heads=sorted(set(heads)),
            issuer=draw(st.sampled_from([AUTHORITY, AUTHORITY, AUTHORITY, ROGUE])),
            patient=draw(st.sampled_from([PATIENT] * 5 + [OTHER_PATIENT])),
            origin=draw(st.sampled_from(ORIGINS)),
        )
        grant_refs = [r.ref for r in records if isinstance(r, Grant)]
        if not grant_refs or draw(st.booleans()):
            records.append(
                ledger.grant(
                    draw(st.sampled_from(GRANTEES)),
                    study=draw(st.sampled_from(STUDIES)),
                    until=draw(st.sampled_from(UNTILS)),
                    **common,
                )
            )
        else:
            targets = draw(st.lists(st.sampled_from(grant_refs), max_size=2))
            grantee = (
                draw(st.sampled_from([None, *GRANTEES]))
                if targets
                else draw(st.sampled_from(GRANTEES))
            )
            records.append(ledger.revoke(grants=sorted(set(targets)), grantee=grantee, **common))
    return records


def outcome(records: list[Grant | Revoke]) -> tuple:
    state = state_of(records, patient=PATIENT)
    return (
        [g.ref for g in state.effective],
        list(state.ended.items()),
        list(state.ignored.items()),
        list(state.revoked_by.items()),
        list(state.records),
        [decide(state, ae=ae, site=site, study=study) for ae, site, study in QUERIES],
        [r.ref for r in order_history(records)],
        heads_of(records),
        heads_of(records, is_authorised=is_authorised),
    )


@settings(max_examples=150, deadline=None)
@given(histories(), st.randoms(use_true_random=False))
def test_order_independence(records: list[Grant | Revoke], rnd: random.Random) -> None:
    expected = outcome(records)
    for _ in range(4):
        shuffled = list(records)
        rnd.shuffle(shuffled)
        assert outcome(shuffled) == expected
    assert outcome(list(reversed(records))) == expected

    # and the outcome obeys the rules
    state = state_of(records, patient=PATIENT)
    grants = [r for r in records if isinstance(r, Grant)]
    for g in grants:  # each grant lands in exactly one bucket
        buckets = [g in state.effective, g.ref in state.ended, g.ref in state.ignored]
        assert buckets.count(True) == 1
    for r in records:
        if isinstance(r, Revoke) and r.ref not in state.ignored:
            assert not any(g.ref in r.grants for g in state.effective)  # revoke by ref wins
    for (ae, site, study), decision in zip(QUERIES, expected[5], strict=True):
        fits = [
            g
            for g in state.effective
            if g.grantee.ae in (None, ae)
            and g.grantee.gateway in (None, site)
            and g.study in (None, study)
        ]
        assert decision.allowed == bool(fits)
        assert decision.grant == (min(fits, key=lambda g: g.ref) if fits else None)
