"""Key rotation: a key-rotation entry signed by the old and the new key; later entries and
checkpoints signed by the new key; every verifier follows the chain from the first key.

Pure checks of the entry and the chain, the log writers on a real database, and a rotation in
the middle of a 3-gateway consortium (real processes on loopback) with replication, cosigning,
the auditor's verify, check-proof and a C-GET continuing."""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dicomledger.ledger.entries import KEY_ROTATION, decode_entry, encode_entry, sign_entry
from dicomledger.ledger.identity import Identity
from dicomledger.ledger.keychain import (
    KeyChain,
    KeyChange,
    KeyChangeError,
    check_rotation,
    rotation_payload,
)
from dicomledger.ledger.log import (
    LedgerStore,
    LogWriter,
    ReplicaError,
    ReplicaWriter,
    sign_checkpoint,
)
from dicomledger.ledger.note import SIG_COSIGNATURE_V1, parse_note, verifier_key
from dicomledger.ledger.trust import key_change_line
from dicomledger.ledger.verify import verify_database
from tests import dicomdata
from tests.conftest import GatewayProcess, consortium, dcmtk, dicomledger
from tests.test_audit_verify import ledger_path, newest_checkpoint, wait_until, witness_vkey

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

A = "a.example/dicomledger"
K0 = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
K1 = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
K2 = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))


def rotation(
    index: int = 3, old: Ed25519PrivateKey = K0, new: Ed25519PrivateKey = K1, **changes: object
):
    payload = rotation_payload(origin=A, index=index, prev=bytes(32), time_ms=1000, new_key=new)
    payload.update(changes)
    entry, _ = sign_entry(
        origin=A,
        index=index,
        prev=bytes(32),
        time_ms=1000,
        kind=KEY_ROTATION,
        payload=payload,
        private_key=old,
    )
    return entry


def resign(entry, key=K0):
    """The same entry signed again by ``key`` (after a change to it)."""
    return sign_entry(
        origin=entry.origin,
        index=entry.index,
        prev=entry.prev,
        time_ms=entry.time_ms,
        kind=entry.kind,
        payload=entry.payload,
        private_key=key,
    )[0]


def test_a_rotation_entry_carries_both_signatures():
    entry = rotation()
    assert json.loads(encode_entry(entry))["payload"]["new_key"] == verifier_key(A, K1.public_key())
    change = check_rotation(entry, K0.public_key())
    assert (
        change == KeyChange(3, change.key)
        and change.key.public_bytes_raw() == K1.public_key().public_bytes_raw()
    )
    chain = KeyChain(A, K0.public_key()).with_change(change)
    raw = [chain.key_for_size(n).public_bytes_raw() for n in (0, 3, 4, 10)]
    assert (
        raw == [K0.public_key().public_bytes_raw()] * 2 + [K1.public_key().public_bytes_raw()] * 2
    )
    assert (
        chain.entry_key(3).public_bytes_raw() == K0.public_key().public_bytes_raw()
    )  # the old key signs it


@pytest.mark.parametrize(
    "mutated, reason",
    [
        (lambda: rotation(old=K1), "not signed by the key in force before it"),  # the new key alone
        (lambda: rotation(new=K0), "the new key is the old key"),
        (
            lambda: resign(replace(rotation(), index=4)),
            "new key's signature (new_key_sig) does not verify",
        ),
        (
            lambda: resign(replace(rotation(), time_ms=1001)),
            "new key's signature (new_key_sig) does not verify",
        ),
        (
            lambda: rotation(new_key_sig=base64.b64encode(bytes(64)).decode()),
            "new_key_sig) does not verify",
        ),
        (
            lambda: rotation(new_key=verifier_key("b.example/dicomledger", K1.public_key())),
            "is named 'b.example/dicomledger', not the log's origin",
        ),
        (
            lambda: rotation(new_key=verifier_key(A, K1.public_key(), SIG_COSIGNATURE_V1)),
            "must be a type 0x01 (note signature) verifier key",
        ),
        (lambda: rotation(reason="why"), "payload fields must be new_key and new_key_sig"),
    ],
)
def test_mutated_rotation_entries_are_refused_with_the_reason(mutated, reason):
    with pytest.raises(KeyChangeError, match=None) as caught:
        check_rotation(mutated(), K0.public_key())
    assert reason in str(caught.value)


def test_a_chain_never_goes_back_to_an_earlier_key():
    chain = KeyChain(A, K0.public_key(), (KeyChange(3, K1.public_key()),))
    with pytest.raises(KeyChangeError, match="was used by this log before"):
        chain.with_change(KeyChange(5, K0.public_key()))
    with pytest.raises(KeyChangeError, match="comes after the one at entry 3"):
        chain.with_change(KeyChange(2, K2.public_key()))


async def _log_with_two_rotations(path: Path) -> tuple[LedgerStore, LogWriter]:
    store = await LedgerStore.open(path)
    writer = LogWriter(store, Identity(A, K0))
    await writer.start()
    for i in range(3):
        await writer.append("image-anchored", {"sha256": f"{i:064x}"})
    await sign_checkpoint(store, Identity(A, K0), 3)
    assert (await writer.rotate(K1)).index == 3
    await writer.append("image-anchored", {"sha256": "4" * 64})
    assert (await writer.rotate(K2)).index == 5
    await writer.append("image-anchored", {"sha256": "6" * 64})
    await writer.sign_checkpoint()
    return store, writer


async def test_the_writer_signs_after_a_rotation_with_the_new_key_and_verifiers_follow(tmp_path):
    store, writer = await _log_with_two_rotations(tmp_path / "a.db")
    size, identity = writer.tip
    assert (
        size == 7 and identity.public_key.public_bytes_raw() == K2.public_key().public_bytes_raw()
    )
    entries = [decode_entry(d) for d in await store.entries(A, 0, 7)]
    chain = await store.key_chain(A)
    assert [c.index for c in chain.changes] == [3, 5]
    for e in entries:  # each entry verifies with the key in force at its index, and no other
        keys = [k for k in (K0, K1, K2) if _verifies(e, k)]
        assert keys == [{0: K0, 1: K0, 2: K0, 3: K0, 4: K1, 5: K1, 6: K2}[e.index]], e.index
    checkpoint = parse_note((await store.latest_checkpoint(A))[1])
    assert checkpoint.signatures[0].key_id == bytes.fromhex(
        verifier_key(A, K2.public_key()).split("+")[1]
    )
    await writer.stop()
    await store.close()
    assert verify_database(tmp_path / "a.db", {A: K0.public_key()}).ok  # pinned at the first key
    report = verify_database(
        tmp_path / "a.db", current_keys={A: K2.public_key()}, every_signature=True
    )
    assert report.ok, report.problem
    stale = verify_database(tmp_path / "a.db", current_keys={A: K1.public_key()})
    assert stale.problem is not None and "not the key this log has in force" in stale.problem.what


def _verifies(entry, key) -> bool:
    from dicomledger.ledger.entries import EntryError, verify_entry_signature

    try:
        verify_entry_signature(entry, key.public_key())
        return True
    except EntryError:
        return False


async def test_a_replica_follows_rotations_and_refuses_the_old_key_after_them(tmp_path):
    a_store, a_writer = await _log_with_two_rotations(tmp_path / "a.db")
    b_store = await LedgerStore.open(tmp_path / "b.db")
    await b_store.ensure_origin(A, K0.public_key())  # [[peers]] keeps the first key
    replica = ReplicaWriter(b_store)
    await replica.start()
    note = (await a_store.latest_checkpoint(A))[1]
    # an entry 4 that the old key signed (a thief with K0, say) is refused, nothing stored
    forged = sign_entry(
        origin=A,
        index=4,
        prev=_leaf(await a_store.entry(A, 3)),
        time_ms=2000,
        kind="image-anchored",
        payload={"sha256": "4" * 64},
        private_key=K0,
    )[1]
    with pytest.raises(
        ReplicaError, match=f"{A} entry 4: signature of {A} entry 4 does not verify"
    ):
        await replica.append_verified(
            A, [*await a_store.entries(A, 0, 4), forged, *await a_store.entries(A, 5, 7)], note
        )
    assert await b_store.size(A) == 0
    assert await replica.append_verified(A, await a_store.entries(A, 0, 7), note) == 7
    assert [c.index for c in (await b_store.key_chain(A)).changes] == [3, 5]
    # a checkpoint of size 7 signed by the first key is no checkpoint of this log any more
    old_signed = await sign_checkpoint(b_store, Identity(A, K0), 7)
    with pytest.raises(ReplicaError, match="not signed by its key"):
        await replica.append_verified(A, [], old_signed)
    for closing in (replica, a_writer):
        await closing.stop()
    await b_store.close()
    await a_store.close()


def _leaf(data: bytes) -> bytes:
    from dicomledger.ledger.merkle import leaf_hash

    return leaf_hash(data)


async def test_verify_names_a_key_change_the_database_does_not_list(tmp_path):
    store, writer = await _log_with_two_rotations(tmp_path / "a.db")
    await writer.stop()
    await store.close()
    con = sqlite3.connect(tmp_path / "a.db")
    con.execute("DELETE FROM key_changes WHERE idx = 5")
    con.commit()
    con.close()
    report = verify_database(tmp_path / "a.db", {A: K0.public_key()})
    assert report.problem is not None and (report.problem.where, report.problem.origin) == (
        "entry 5",
        A,
    )
    assert "key change that the database's key_changes table does not list" in report.problem.what


def test_a_trust_file_follows_the_chain_from_the_first_key(tmp_path):
    from dicomledger.ledger.note import NoteError
    from dicomledger.ledger.trust import load_trust

    first = rotation(index=3)
    second_payload = rotation_payload(origin=A, index=5, prev=bytes(32), time_ms=1000, new_key=K2)
    second = sign_entry(
        origin=A,
        index=5,
        prev=bytes(32),
        time_ms=1000,
        kind=KEY_ROTATION,
        payload=second_payload,
        private_key=K1,
    )[1]
    lines = [
        verifier_key(A, K0.public_key()),
        key_change_line(encode_entry(first)),
        key_change_line(second),
    ]
    chain = load_trust("\n".join(lines) + "\n").log_chain(A)
    assert (
        chain is not None and chain.current.public_bytes_raw() == K2.public_key().public_bytes_raw()
    )
    # a rotation line that skips the one before it does not verify from the first key
    with pytest.raises(
        NoteError, match="trust line 2: key-rotation entry 5 is not signed by the key in force"
    ):
        _ = load_trust("\n".join([lines[0], lines[2]]) + "\n").chains


def test_a_rotation_in_the_middle_of_a_consortium(tmp_path):
    """A stores, rotates, stores, rotates again, stores; B rotates once too. Replication and
    cosigning go on without a config edit; every copy verifies (the gateways' own verify and
    an auditor's with a 2-of-3 policy); a proof made before the rotations still checks VALID;
    an image anchored before them still passes the tamper check of a C-GET; A restarts with
    its rotated key and its peers confirm its log."""
    a, b, c = consortium(tmp_path, 3)
    a.set('"STORESCU", "ECHOSCU"', '"STORESCU", "ECHOSCU", "WS1"')
    for gw in (a, b, c):
        gw.start()
    patient = dicomdata.fake_patient("rotation")
    try:
        first = dicomdata.make_mr_series(tmp_path / "m1", 3, patient=patient, seed="r1")
        assert a.storescu(*first).returncode == 0
        wait_until(
            lambda: _cosigners(a, a, 3) == {b.origin, c.origin},
            what="B's and C's cosignatures at size 3",
        )
        old_proof = tmp_path / "old.proof"
        assert a.cli("prove", "--entry", "1", "-o", str(old_proof)).returncode == 0
        old_trust = tmp_path / "old-trust.txt"
        shutil.copy(a.dir / "trust.txt", old_trust)

        rotated = a.cli("rotate-key")
        assert rotated.returncode == 0, rotated.stderr
        assert "entry 3 is the key-rotation entry" in rotated.stdout
        assert b.cli("rotate-key").returncode == 0
        assert a.storescu(*dicomdata.make_mr_series(tmp_path / "m2", 2, seed="r2")).returncode == 0
        assert a.cli("rotate-key").returncode == 0  # entry 6
        assert a.storescu(*dicomdata.make_mr_series(tmp_path / "m3", 2, seed="r3")).returncode == 0
        assert b.storescu(*dicomdata.make_mr_series(tmp_path / "m4", 1, seed="r4")).returncode == 0
        for gw in (b, c):
            wait_until(
                lambda gw=gw: _cosigners(gw, a, 9) == {b.origin, c.origin},
                what=f"A's 9 entries cosigned at {gw.origin}",
            )
        wait_until(
            lambda: _cosigners(a, b, 2) == {a.origin, c.origin},
            what="B's rotated log cosigned, at A",
        )
        new_proof = tmp_path / "new.proof"
        assert a.cli("prove", "--entry", "7", "-o", str(new_proof)).returncode == 0
        assert a.cli("grant", "--patient-id", patient.patient_id, "--to", "WS1").returncode == 0
        got = dcmtk(
            "getscu",
            "-aet",
            "WS1",
            "-aec",
            a.ae_title,
            "-P",
            "-od",
            str(_mkdir(tmp_path / "got")),
            "-k",
            "QueryRetrieveLevel=PATIENT",
            "-k",
            f"PatientID={patient.patient_id}",
            "127.0.0.1",
            str(a.port),
        )
        assert len(list((tmp_path / "got").iterdir())) == 3, (
            got.stdout + got.stderr
        )  # anchored under the first key
        a.stop()
        a.start()  # its key file holds the third key; its peers confirm its rotated log
        assert a.storescu(*dicomdata.make_mr_series(tmp_path / "m5", 1, seed="r5")).returncode == 0
        wait_until(
            lambda: _cosigners(b, a, 10) == {b.origin, c.origin},
            what="A's entry after the restart, cosigned",
        )
    finally:
        for gw in (a, b, c):
            gw.stop()
    assert "TAMPER ALARM" not in a.log()
    for gw in (a, b, c):
        done = gw.cli("verify")
        assert done.returncode == 0, done.stdout + done.stderr
    # the auditor: first keys and a 2-of-3 policy; the chains come from the logs themselves
    trust = tmp_path / "auditor.txt"
    trust.write_text(
        "".join(gw.vkey + "\n" for gw in (a, b, c))
        + "".join(f"witness {gw.ae_title} {witness_vkey(gw)}\n" for gw in (a, b, c))
        + "group g 2 GWA GWB GWC\nquorum g\n"
    )
    for gw in (b, c):
        done = dicomledger(
            "verify", "--ledger", str(ledger_path(gw)), "--trust", str(trust), "--origin", a.origin
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "witness quorum met" in done.stdout
    done = dicomledger(
        "verify", "--ledger", str(ledger_path(a)), "--trust", str(trust), "--origin", b.origin
    )
    assert done.returncode == 0 and "witness quorum met" in done.stdout, done.stdout + done.stderr
    # check-proof: the old proof after two rotations, with the old trust file and with the new one
    for trust_file in (old_trust, a.dir / "trust.txt"):
        checked = dicomledger("check-proof", str(old_proof), "--trust", str(trust_file))
        assert checked.returncode == 0 and checked.stdout.startswith(
            "VALID: image-anchored entry 1"
        ), checked.stdout
    assert (a.dir / "trust.txt").read_text().count("\nkey-change ") == 2
    checked = dicomledger("check-proof", str(new_proof), "--trust", str(a.dir / "trust.txt"))
    assert checked.returncode == 0 and checked.stdout.startswith("VALID: image-anchored entry 7"), (
        checked.stdout
    )
    checked = dicomledger("check-proof", str(new_proof), "--trust", str(old_trust))
    assert (
        checked.returncode == 1
        and checked.stdout == f"INVALID: checkpoint has no signature by {a.origin}\n"
    )
    assert "key-change lines" in checked.stderr
    # the auditor's trust file with B's key-change line counts B's cosignatures by its new key
    policy = tmp_path / "policy.txt"
    policy.write_text(
        f"witness B {witness_vkey(b)}\nwitness C {witness_vkey(c)}\ngroup g 2 B C\nquorum g\n"
    )
    with_b = tmp_path / "with-b.txt"
    with_b.write_text(
        (a.dir / "trust.txt").read_text() + (b.dir / "trust.txt").read_text() + c.vkey + "\n"
    )
    checked = dicomledger(
        "check-proof", str(new_proof), "--trust", str(with_b), "--policy", str(policy)
    )
    assert checked.returncode == 0 and "witness quorum met" in checked.stdout, (
        checked.stdout + checked.stderr
    )
    # audit lists the entries of the patient's images, anchored under the first key
    audited = a.cli("audit", "--patient-id", patient.patient_id, "--json")
    assert audited.returncode == 0 and len(json.loads(audited.stdout)["events"]) >= 3


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cosigners(holder: GatewayProcess, of: GatewayProcess, size: int) -> set[str]:
    held = newest_checkpoint(ledger_path(holder), of.origin)
    if held is None or held[0] < size:
        return set()
    return {s.name for s in parse_note(held[1]).signatures} - {of.origin}


async def test_audit_checks_each_entry_with_the_key_in_force_at_its_index(tmp_path):
    from dicomledger.ledger.audit import AuditError, audit_events

    store = await LedgerStore.open(tmp_path / "a.db")
    writer = LogWriter(store, Identity(A, K0))
    await writer.start()
    anchor = {"patient": "p1", "study": "s1", "sha256": "1" * 64}
    await writer.append("image-anchored", anchor)
    await writer.rotate(K1)
    after = await writer.append("image-anchored", {**anchor, "sha256": "2" * 64})
    await writer.stop()
    assert [(e.index, e.kind) for e in await audit_events(store, patient="p1")] == [
        (2, "image-anchored"),
        (0, "image-anchored"),
    ]
    # entry 2 as the first key would have signed it: canonical, chained, but not by the key in force
    entry = decode_entry(after.data)
    forged = sign_entry(
        origin=A,
        index=2,
        prev=entry.prev,
        time_ms=entry.time_ms,
        kind=entry.kind,
        payload=entry.payload,
        private_key=K0,
    )[1]
    await store.db.execute("UPDATE entries SET data = ? WHERE idx = 2", (forged,))
    with pytest.raises(AuditError, match=f"signature of {A} entry 2 does not verify"):
        await audit_events(store, patient="p1")
    await store.close()
