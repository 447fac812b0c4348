"""The `erased` entry (pure functions of ledger/erasure.py): its payload, and which anchors it
covers, also through a ledger database holding two gateways' logs."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dicomledger.ledger import entries as E
from dicomledger.ledger.erasure import (
    EntryRef,
    ErasureFormatError,
    ErasureLookup,
    covers,
    make_erased_payload,
    parse_erasure,
)
from dicomledger.ledger.identity import Identity
from dicomledger.ledger.log import LedgerStore, LogWriter

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
A, B = "a.example/dicomledger", "b.example/dicomledger"


def entry(kind: str, payload: dict, index: int, origin: str = A) -> E.Entry:
    made, _ = E.sign_entry(
        origin=origin,
        index=index,
        prev=E.ZERO_HASH,
        time_ms=1,
        kind=kind,
        payload=payload,
        private_key=KEY,
    )
    return made


def anchor(
    index: int, patient: str = "p1", study: str = "s1", instance: str = "i1", origin: str = A
) -> E.Entry:
    return entry(
        E.IMAGE_ANCHORED, {"patient": patient, "study": study, "instance": instance}, index, origin
    )


def erased(
    index: int, study: str | None = None, request: EntryRef | None = None, origin: str = A
) -> E.Entry:
    payload = make_erased_payload(
        patient="p1",
        study=study,
        studies=["s1"],
        instances=1,
        files=1,
        forward_jobs=0,
        reason="custodian-erasure" if request else "patient-request",
        request=request,
    )
    return entry(E.ERASED, payload, index, origin)


def test_payload_round_trip_and_rules():
    e = parse_erasure(erased(7, study="s1", request=EntryRef(B, 3)))
    assert (e.patient, e.study, e.studies, e.request, e.index) == (
        "p1",
        "s1",
        ("s1",),
        EntryRef(B, 3),
        7,
    )
    good = make_erased_payload(
        patient="p1",
        study=None,
        studies=["s2", "s1", "s1"],
        instances=2,
        files=3,
        forward_jobs=1,
        reason="retention",
    )
    assert good["studies"] == ["s1", "s2"] and good["request"] is None
    for bad, message in [
        ({**good, "reason": "because"}, "reason must be one of"),
        ({**good, "patient": "Doe^Jane"}, "patient must be a pseudonym"),
        ({**good, "instances": -1}, "instances must be a non-negative integer"),
        ({**good, "files": True}, "files must be a non-negative integer"),
        ({**good, "note": "free text"}, "fields must be exactly"),
        ({**good, "request": {"origin": B}}, "request must be null or"),
    ]:
        with pytest.raises(ErasureFormatError, match=message):
            parse_erasure(entry(E.ERASED, bad, 5))
    with pytest.raises(ErasureFormatError, match="not erased"):
        parse_erasure(anchor(0))


def test_an_erasure_covers_older_anchors_of_its_gateway_patient_and_study():
    whole, one_study = parse_erasure(erased(5)), parse_erasure(erased(5, study="s1"))
    assert covers(whole, anchor(4), None) and covers(one_study, anchor(4), None)
    assert not covers(whole, anchor(6), None)  # received after the erasure
    assert not covers(whole, anchor(4, patient="p2"), None)
    assert not covers(one_study, anchor(4, study="s2"), None) and covers(
        whole, anchor(4, study="s2"), None
    )
    assert not covers(
        whole, anchor(4, origin=B), None
    )  # another gateway's anchor: its own erasure covers it


def test_applying_another_gateways_erasure_covers_only_copies_of_its_instances():
    applied = parse_erasure(erased(9, request=EntryRef(B, 2)))
    assert covers(applied, anchor(4, instance="i1"), frozenset({"i1"}))
    assert not covers(applied, anchor(4, instance="mine"), frozenset({"i1"}))


async def test_lookup_through_a_ledger_with_two_logs(tmp_path):
    store = await LedgerStore.open(tmp_path / "ledger.db")
    writers = {o: LogWriter(store, Identity(o, Ed25519PrivateKey.generate())) for o in (A, B)}
    for w in writers.values():
        await w.start()
    try:
        a, b = writers[A], writers[B]
        await a.append(E.IMAGE_ANCHORED, {"patient": "p1", "study": "s1", "instance": "i1"})  # A #0
        await b.append(
            E.IMAGE_ANCHORED, {"patient": "p1", "study": "s1", "instance": "i1"}
        )  # B #0: copy of i1
        await b.append(
            E.IMAGE_ANCHORED, {"patient": "p1", "study": "s9", "instance": "own"}
        )  # B #1: its own
        request = await a.append(
            E.ERASED,
            make_erased_payload(
                patient="p1",
                study=None,
                studies=["s1"],
                instances=1,
                files=1,
                forward_jobs=0,
                reason="patient-request",
            ),
        )
        await b.append(
            E.ERASED,
            make_erased_payload(
                patient="p1",
                study=None,
                studies=["s1"],
                instances=1,
                files=1,
                forward_jobs=0,
                reason="custodian-erasure",
                request=EntryRef(A, request.index),
            ),
        )
        after = await a.append(
            E.IMAGE_ANCHORED, {"patient": "p1", "study": "s1", "instance": "i2"}
        )  # A #2
        lookup = ErasureLookup(store)

        async def covered(origin: str, index: int) -> int | None:
            found = await lookup.covering(E.decode_entry(await store.entry(origin, index)))
            return None if found is None else found.index

        assert await covered(A, 0) == request.index
        assert await covered(B, 0) == 2  # B's erasure, applying A's, covers B's copy
        assert await covered(B, 1) is None  # not an instance A anchored
        assert await covered(A, after.index) is None  # received after the erasure
    finally:
        for w in writers.values():
            await w.stop()
        await store.close()
