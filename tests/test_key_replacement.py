"""A lost or stolen key: a replacement statement signed by a quorum of the consortium's other
gateways (counted by the witness policy) puts a new key in place; the log continues under it
and every verifier follows; what the old key signs after the replacement is refused.

Pure checks of statements and replacement entries, the replica writer on a real database, and
the whole procedure in a 3-gateway consortium of real processes on loopback, with a thief
holding the old key."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dicomledger.ledger.checkpoint import Checkpoint, format_checkpoint
from dicomledger.ledger.entries import KEY_REPLACEMENT, decode_entry, sign_entry
from dicomledger.ledger.identity import Identity, load_key_file
from dicomledger.ledger.keychain import (
    KeyChain,
    KeyChangeError,
    add_statement_signature,
    check_change,
    check_statement,
    make_statement,
    parse_request,
    replacement_payload,
)
from dicomledger.ledger.log import (
    LedgerStore,
    LogWriter,
    ReplicaError,
    ReplicaWriter,
    sign_checkpoint,
)
from dicomledger.ledger.merkle import leaf_hash
from dicomledger.ledger.note import (
    SIG_COSIGNATURE_V1,
    Note,
    format_note,
    parse_note,
    sign_note_text,
    verifier_key,
)
from dicomledger.ledger.peer_tls import client_context
from dicomledger.ledger.policy import parse_policy
from dicomledger.ledger.witness import format_add_checkpoint
from tests import dicomdata
from tests.conftest import GatewayProcess, consortium, dicomledger
from tests.test_audit_verify import ledger_path, newest_checkpoint, wait_until, witness_vkey

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

A, B, C = "a.example/dicomledger", "b.example/dicomledger", "c.example/dicomledger"
OLD = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
NEW = Ed25519PrivateKey.from_private_bytes(bytes(range(5, 37)))
KB = Ed25519PrivateKey.from_private_bytes(bytes(range(10, 42)))
KC = Ed25519PrivateKey.from_private_bytes(bytes(range(20, 52)))
POLICY = parse_policy(
    "".join(
        f"witness {n} {verifier_key(o, k.public_key(), SIG_COSIGNATURE_V1)}\n"
        for n, o, k in (("A", A, OLD), ("B", B, KB), ("C", C, KC))
    )
    + "group g 2 A B C\nquorum g\n"
)
ROOT = bytes(range(32))


def statement(
    *signers: tuple[str, Ed25519PrivateKey],
    size: int = 3,
    root: bytes = ROOT,
    reason: str = "stolen",
) -> bytes:
    data = make_statement(A, size, root, OLD.public_key(), NEW, reason)
    for name, key in signers:
        data = add_statement_signature(data, name, key)
    return data


def test_a_statement_needs_the_new_key_and_a_quorum_of_the_others():
    s = check_statement(statement((B, KB), (C, KC)), POLICY)
    assert (s.origin, s.size, s.root, s.signers) == (A, 3, ROOT, [B, C])
    assert s.new_key.public_bytes_raw() == NEW.public_key().public_bytes_raw()
    assert parse_note(statement()).text.startswith(
        "dicomledger-key-replacement/v1\norigin a.example/dicomledger\nsize 3\n"
    )


def _flip(data: bytes, name: str) -> bytes:
    note = parse_note(data)
    sigs = tuple(
        type(s)(s.name, s.key_id, s.data[:-1] + bytes([s.data[-1] ^ 1])) if s.name == name else s
        for s in note.signatures
    )
    return format_note(Note(note.text, sigs))


def _edit(data: bytes, old: str, new: str) -> bytes:
    """The statement text changed and signed again by the new key, the others' lines kept."""
    note = parse_note(data)
    text = note.text.replace(old, new, 1)
    sigs = tuple(sign_note_text(text, A, NEW) if s.name == A else s for s in note.signatures)
    return format_note(Note(text, sigs))


@pytest.mark.parametrize(
    "mutated, reason",
    [
        (
            lambda: statement((B, KB)),
            "lacks a quorum: group g needs 2 of {A, B, C} and has 1 (B); "
            f"missing signatures from A ({A}), C ({C})",
        ),
        (
            lambda: _flip(statement((B, KB), (C, KC)), C),
            "lacks a quorum",
        ),  # C's line does not verify
        (
            lambda: statement((B, KB), (A, OLD)),
            "lacks a quorum",
        ),  # the origin (its old key) never counts
        (
            lambda: _edit(statement((B, KB), (C, KC)), "size 3", "size 4"),
            "lacks a quorum",
        ),  # signed another size
        (lambda: _flip(statement((B, KB), (C, KC)), A), "is not signed by its new key"),
        (
            lambda: statement((B, KB), (C, KC), reason="a\x01b"),
            "reason contains a control character",
        ),
        (
            lambda: statement((B, KB), (C, KC)).replace(b"\nold ", b"\nOld "),
            "expected a 'old' line",
        ),
    ],
)
def test_mutated_statements_are_refused_with_the_reason(mutated, reason):
    with pytest.raises(KeyChangeError) as caught:
        check_statement(mutated(), POLICY)
    assert reason in str(caught.value)


def test_without_a_policy_no_statement_is_accepted():
    with pytest.raises(KeyChangeError, match="a key replacement needs a witness policy"):
        check_statement(statement((B, KB), (C, KC)), None)


def _replacement_entry(data: bytes, index: int = 3, key: Ed25519PrivateKey = NEW):
    return sign_entry(
        origin=A,
        index=index,
        prev=bytes(32),
        time_ms=1,
        kind=KEY_REPLACEMENT,
        payload=replacement_payload(data),
        private_key=key,
    )


@pytest.mark.parametrize(
    "case, reason",
    [
        ("another root", "pins another history (root)"),
        ("another index", "its statement is for a.example/dicomledger at size 3, not this place"),
        ("signed by the old key", "is not signed by the new key its statement names"),
        ("old key not in force", "replaces a key that is not the one in force there"),
    ],
)
def test_mutated_replacement_entries_are_refused_with_the_reason(case, reason):
    data = statement((B, KB), (C, KC))
    entry, _ = _replacement_entry(
        data,
        index=4 if case == "another index" else 3,
        key=OLD if case == "signed by the old key" else NEW,
    )
    chain = KeyChain(A, KC.public_key() if case == "old key not in force" else OLD.public_key())
    root = bytes(32) if case == "another root" else ROOT
    with pytest.raises(KeyChangeError) as caught:
        check_change(entry, chain, root=lambda: root, policy=POLICY)
    assert reason in str(caught.value)
    good = check_change(
        _replacement_entry(data)[0], KeyChain(A, OLD.public_key()), root=lambda: ROOT, policy=POLICY
    )
    assert good.entry_key(3).public_bytes_raw() == NEW.public_key().public_bytes_raw()
    assert (
        good.key_for_size(3).public_bytes_raw() == OLD.public_key().public_bytes_raw()
    )  # the history it keeps


async def test_a_replica_refuses_what_the_replaced_key_signs_after_the_replacement(tmp_path):
    a = await LedgerStore.open(tmp_path / "a.db")
    writer = LogWriter(a, Identity(A, OLD))
    await writer.start()
    for i in range(3):
        await writer.append("image-anchored", {"sha256": f"{i:064x}"})
    await writer.stop()
    root = await a.root(A, 3)
    data = statement((B, KB), (C, KC), root=root)
    # the thief's entry 3 and checkpoint 4, by the old key; the gateway's, by the new key
    prev = leaf_hash(await a.entry(A, 2))
    stolen = sign_entry(
        origin=A,
        index=3,
        prev=prev,
        time_ms=9,
        kind="image-anchored",
        payload={"sha256": "9" * 64},
        private_key=OLD,
    )[1]
    writer = LogWriter(a, Identity(A, NEW), policy=POLICY)
    await writer.start()
    assert (await writer.append(KEY_REPLACEMENT, replacement_payload(data))).index == 3
    await writer.append("image-anchored", {"sha256": "4" * 64})
    honest_note = (await writer.sign_checkpoint())[1]
    entries = await a.entries(A, 0, 5)
    await writer.stop()

    b = await LedgerStore.open(tmp_path / "b.db")
    for origin, key in ((A, OLD), (B, KB), (C, KC)):
        await b.ensure_origin(origin, key.public_key())
    replica = ReplicaWriter(b, policy=POLICY)
    await replica.start()
    assert (
        await replica.append_verified(A, entries[:3], await sign_checkpoint(a, Identity(A, OLD), 3))
        == 3
    )
    await b.accept_replacement(check_statement(data, POLICY))  # learnt from B's log, say
    thief_note = _checkpoint(A, 4, _root_after(entries[:3], stolen), OLD)
    with pytest.raises(ReplicaError, match="entry 3 must be the key-replacement entry"):
        await replica.append_verified(A, [stolen], thief_note)
    assert not (await b.key_chain(A)).signs_checkpoint(
        parse_note(thief_note), 4
    )  # the old key: not A's at 4
    assert (await b.key_chain(A)).signs_checkpoint(parse_note(honest_note), 5)
    assert await b.size(A) == 3
    assert await replica.append_verified(A, entries[3:], honest_note) == 5
    chain = await b.key_chain(A)
    assert [(c.index, c.replaced) for c in chain.changes] == [(3, True)]
    await replica.stop()
    await b.close()
    await a.close()


def _root_after(entries: list[bytes], extra: bytes) -> bytes:
    from dicomledger.ledger.merkle import root_of_leaf_hashes

    return root_of_leaf_hashes([leaf_hash(e) for e in [*entries, extra]])


def _checkpoint(origin: str, size: int, root: bytes, key: Ed25519PrivateKey) -> bytes:
    text = format_checkpoint(Checkpoint(origin, size, root))
    return format_note(Note(text, (sign_note_text(text, origin, key),)))


def _with_policy(gateways: list[GatewayProcess], tmp_path: Path) -> Path:
    policy = tmp_path / "consortium-policy.txt"
    policy.write_text(
        "".join(f"witness {gw.ae_title} {witness_vkey(gw)}\n" for gw in gateways)
        + f"group g 2 {' '.join(gw.ae_title for gw in gateways)}\nquorum g\n"
    )
    for gw in gateways:
        gw.set("startup_wait = 60.0", f'startup_wait = 60.0\nwitness_policy = "{policy}"')
    return policy


def _kinds(gw: GatewayProcess) -> list[str]:
    con = sqlite3.connect(f"file:{ledger_path(gw)}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT e.data FROM entries e JOIN origins o ON o.id = e.origin_id WHERE o.name = ? ORDER BY e.idx",
            (gw.origin,),
        ).fetchall()
    finally:
        con.close()
    return [decode_entry(bytes(r[0])).kind for r in rows]


def test_a_stolen_key_is_replaced_by_a_quorum_of_the_consortium(tmp_path):
    """A's key is stolen. A stops; its administrator makes a request (a new key and the
    statement keeping A's 3 entries); B's and C's administrators check and sign it and submit
    it to their gateways, which record it on their logs and refuse the thief's checkpoint;
    A installs it and starts: its log continues under the new key, replicated and cosigned;
    every copy verifies, and an auditor's verify and check-proof follow the replacement."""
    a, b, c = consortium(tmp_path, 3)
    policy = _with_policy([a, b, c], tmp_path)
    for gw in (a, b, c):
        gw.start()
    try:
        assert a.storescu(*dicomdata.make_mr_series(tmp_path / "m1", 3)).returncode == 0
        wait_until(
            lambda: all(_cosigned(gw, a, 3) for gw in (b, c)),
            what="A's 3 entries held and cosigned by B, C",
        )
        old_proof = tmp_path / "old.proof"
        assert a.cli("prove", "--entry", "2", "-o", str(old_proof)).returncode == 0
        a.stop()
        stolen = load_key_file(a.dir / "keys" / "gateway.key")
        request = tmp_path / "request.txt"

        made = a.cli(
            "replace-key", "request", str(request), "--reason", "gateway.key stolen on 2026-05-02"
        )
        assert made.returncode == 0, made.stderr
        assert (a.dir / "keys" / "gateway.key.new").exists() and parse_request(
            request.read_bytes()
        ).tail_start == 3
        refused = b.cli("replace-key", "submit", str(request))  # no one has signed yet
        assert (
            refused.returncode == 1
            and "lacks a quorum: group g needs 2 of {GWA, GWB, GWC} and has 0" in refused.stderr
        )
        assert b.cli("replace-key", "sign", str(request)).returncode == 0
        refused = a.cli("replace-key", "install", str(request))  # B alone is not a quorum
        assert (
            refused.returncode == 1 and "has 1 (GWB); missing signatures from GWA" in refused.stderr
        ), refused.stderr
        damaged = tmp_path / "damaged.txt"  # B's signature line with one bit flipped
        damaged.write_bytes(_damage_line(request.read_bytes(), b.origin))
        signed = c.cli("replace-key", "sign", str(damaged))
        assert signed.returncode == 0
        refused = c.cli("replace-key", "submit", str(damaged))
        assert (
            refused.returncode == 1 and "has 1 (GWC); missing signatures from GWA" in refused.stderr
        ), refused.stderr
        signed = c.cli("replace-key", "sign", str(request))
        assert (
            signed.returncode == 0 and f"signatures of {b.origin}, {c.origin}" in signed.stdout
        ), signed.stdout
        for gw in (b, c):
            submitted = gw.cli("replace-key", "submit", str(request))
            assert (
                submitted.returncode == 0
                and "key is replaced from its entry 3 on" in submitted.stdout
            ), submitted.stderr
            assert _kinds(gw)[-1] == KEY_REPLACEMENT  # recorded on its own log

        # the thief: checkpoint 4 of A, signed by the stolen key, sent to B with A's TLS identity
        thief_entry = sign_entry(
            origin=a.origin,
            index=3,
            prev=_leaf_of(a, 2),
            time_ms=1,
            kind="image-anchored",
            payload={"sha256": "7" * 64},
            private_key=stolen,
        )[1]
        note = _checkpoint(a.origin, 4, _root_after(_entries_of(a), thief_entry), stolen)
        status, body = asyncio.run(_add_checkpoint(a, b, note))
        assert (
            status == 403
            and "no valid signature by gwa.test/dicomledger's key in force at that size" in body
        ), body

        installed = a.cli("replace-key", "install", str(request))
        assert installed.returncode == 0, installed.stderr
        a.start()
        assert _kinds(a)[3] == KEY_REPLACEMENT
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "m2", 2, seed="after")).returncode == 0
        )
        wait_until(
            lambda: all(_cosigned(gw, a, 6) for gw in (b, c)),
            what="A's log after the replacement, cosigned",
        )
        new_proof = tmp_path / "new.proof"
        assert a.cli("prove", "--entry", "5", "-o", str(new_proof)).returncode == 0
    finally:
        for gw in (a, b, c):
            if gw.proc is not None and gw.proc.poll() is None:
                gw.stop()
    for gw in (a, b, c):
        done = gw.cli("verify")
        assert done.returncode == 0, done.stdout + done.stderr
    # the auditor: the gateways' first keys; the replacement counts under a witness policy only
    trust = tmp_path / "auditor.txt"
    trust.write_text("".join(gw.vkey + "\n" for gw in (a, b, c)))
    done = dicomledger(
        "verify", "--ledger", str(ledger_path(c)), "--trust", str(trust), "--origin", a.origin
    )
    assert (
        done.returncode == 1
        and "FAILED: gwa.test/dicomledger: entry 3: a key replacement needs a witness policy"
        in done.stdout
    )
    done = dicomledger(
        "verify", "--ledger", str(ledger_path(c)), "--trust", str(trust), "--policy", str(policy)
    )
    assert done.returncode == 0 and "gwa.test/dicomledger: 6 entries" in done.stdout, (
        done.stdout + done.stderr
    )
    # check-proof: the old proof as before; the new one with A's trust.txt (its key-change line)
    for proof, trust_file in ((old_proof, trust), (new_proof, a.dir / "trust.txt")):
        checked = dicomledger(
            "check-proof", str(proof), "--trust", str(trust_file), "--policy", str(policy)
        )
        assert checked.returncode == 0 and "witness quorum met" in checked.stdout, (
            checked.stdout + checked.stderr
        )
    assert "\nkey-change " in (a.dir / "trust.txt").read_text()
    checked = dicomledger(
        "check-proof", str(new_proof), "--trust", str(trust), "--policy", str(policy)
    )
    assert checked.returncode == 1 and checked.stdout.startswith(
        "INVALID: checkpoint has no signature by"
    )


def _entries_of(gw: GatewayProcess) -> list[bytes]:
    con = sqlite3.connect(f"file:{ledger_path(gw)}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT e.data FROM entries e JOIN origins o ON o.id = e.origin_id WHERE o.name = ? "
            "ORDER BY e.idx",
            (gw.origin,),
        ).fetchall()
    finally:
        con.close()
    return [bytes(r[0]) for r in rows]


def _leaf_of(gw: GatewayProcess, index: int) -> bytes:
    return leaf_hash(_entries_of(gw)[index])


def _cosigned(holder: GatewayProcess, of: GatewayProcess, size: int) -> bool:
    held = newest_checkpoint(ledger_path(holder), of.origin)
    others = {g for g in (f"gw{x}.test/dicomledger" for x in "abc")} - {of.origin}
    return (
        held is not None
        and held[0] >= size
        and others <= {s.name for s in parse_note(held[1]).signatures}
    )


def _damage_line(request: bytes, name: str) -> bytes:
    head, _, note = request.partition(b"\n\n")
    return head + b"\n\n" + _flip(note, name)


async def _add_checkpoint(
    sender: GatewayProcess, to: GatewayProcess, note: bytes
) -> tuple[int, str]:
    ctx = client_context(
        sender.dir / "keys" / "peer-tls.crt",
        sender.dir / "keys" / "peer-tls.key",
        [(to.dir / "keys" / "peer-tls.crt").read_bytes()],
    )
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.post(
            f"https://127.0.0.1:{to.peer_port}/add-checkpoint",
            data=format_add_checkpoint(3, [], note),
        ) as resp,
    ):
        return resp.status, await resp.text()


def test_a_gateway_does_not_start_with_a_key_file_that_is_not_its_logs_key(tmp_path):
    """After a rotation, the old key file (restored from a backup, a thief's copy) is not the
    key the log has in force: the gateway refuses to start, saying what to do."""
    gw = GatewayProcess(tmp_path / "gw")
    gw.start()
    gw.stop()
    key_file = gw.dir / "keys" / "gateway.key"
    old = key_file.read_bytes()
    gw.start()
    assert gw.cli("rotate-key").returncode == 0
    gw.stop()
    key_file.write_bytes(old)
    with pytest.raises(RuntimeError, match="gateway exited at start"):
        gw.start()
    assert "gateway cannot start" in gw.log() and "this log's entries are signed by" in gw.log()
    assert "replace-key" in gw.log()


def test_a_trust_file_follows_a_replacement_and_no_longer_counts_the_replaced_key():
    from dicomledger.ledger.trust import key_change_line, load_trust

    data = statement((B, KB), (C, KC))
    _, entry = _replacement_entry(data)
    policy_lines = (
        "".join(
            f"witness {n} {verifier_key(o, k.public_key(), SIG_COSIGNATURE_V1)}\n"
            for n, o, k in (("A", A, OLD), ("B", B, KB), ("C", C, KC))
        )
        + "group g 2 A B C\nquorum g\n"
    )
    trust = load_trust(
        f"{verifier_key(A, OLD.public_key())}\n{policy_lines}{key_change_line(entry)}\n"
    )
    chain = trust.log_chain(A)
    assert (
        chain is not None
        and chain.current.public_bytes_raw() == NEW.public_key().public_bytes_raw()
    )
    assert [k.public_bytes_raw() for k in trust.witness_keys()[A]] == [
        NEW.public_key().public_bytes_raw()
    ]
    from dicomledger.ledger.note import NoteError

    without_policy = load_trust(f"{verifier_key(A, OLD.public_key())}\n{key_change_line(entry)}\n")
    with pytest.raises(NoteError, match="trust line 2: a key replacement needs a witness policy"):
        _ = without_policy.chains
