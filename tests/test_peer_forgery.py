"""A gateway fed over a thousand forged, mutated and replayed peer messages accepts none of
them, logs why it refused each, keeps its ledger intact and still replicates afterwards.

Gateway B (the victim, a real process) peers with gateway C. Once B holds C's first three
entries and has cosigned C's checkpoint, C stops, and the test takes over C's identity: its
TLS certificate and key and its Ed25519 signing key (C's operator gone rogue, or an attacker
with C's keys). Then:

* PUSH: requests to B's peer API as C: mutated and forged add-checkpoint bodies, replays,
  oversized bodies, bad query parameters;
* PULL: a fake C peer API on C's port answers B's gossip with forged checkpoints, entries,
  proofs and evidence;
* UNKNOWN PEERS: TLS clients whose certificates B does not pin, and plain HTTP.

The forgeries never give B evidence of a real equivocation by C: every checkpoint signed
with C's real key for a size above 3 commits to a tree whose first three leaves are C's real
entries (so no fork proof can exist) and whose further leaves cannot all be served valid, and
no two such checkpoints share a size. Finally the real C comes back, logs five more images,
and B must replicate them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sqlite3
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dicomledger.ledger import merkle
from dicomledger.ledger.checkpoint import Checkpoint, format_checkpoint, parse_checkpoint
from dicomledger.ledger.entries import canonical_json, decode_entry, sign_entry
from dicomledger.ledger.identity import load_key_file
from dicomledger.ledger.note import (
    Note,
    Signature,
    format_note,
    key_id,
    parse_note,
    verify_cosignature,
)
from dicomledger.ledger.peer_tls import client_context, create_tls_identity, server_context
from dicomledger.ledger.witness import EVIDENCE_MAGIC, Equivocation, format_evidence
from tests import dicomdata
from tests.conftest import GatewayProcess, consortium, dcmtk
from tests.test_consortium import log_size, wait_until

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

LIMIT = 1 << 20  # B's [peering] max_message_bytes for this test (the default is 8 MiB)
PULL_TARGET = 450  # forged answers to B's gossip before the fake peer stops
MIN_TOTAL = 1000
REFUSED = (400, 403, 404, 409, 413, 422)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def query(gw: GatewayProcess, sql: str, params: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'ledger.db'}?mode=ro", uri=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def log_of(gw: GatewayProcess, origin: str) -> tuple[list[bytes], dict[int, bytes]]:
    """(entries, {size: checkpoint note}) of ``origin`` as stored in ``gw``'s ledger."""
    entries = query(
        gw,
        "SELECT e.data FROM entries e JOIN origins o ON o.id = e.origin_id WHERE o.name = ? ORDER BY e.idx",
        (origin,),
    )
    notes = query(
        gw,
        "SELECT c.size, c.note FROM checkpoints c JOIN origins o ON o.id = c.origin_id WHERE o.name = ?",
        (origin,),
    )
    return [bytes(r[0]) for r in entries], {size: bytes(note) for size, note in notes}


def signed_by(note: bytes, name: str) -> bool:
    return any(s.name == name for s in parse_note(note).signatures)


class Forger:
    """Makes C's messages: real ones, and forged ones signed with C's key or another."""

    def __init__(
        self, origin: str, key: Ed25519PrivateKey, entries: list[bytes], notes: dict[int, bytes]
    ) -> None:
        self.origin = origin
        self.key = key
        self.other = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
        self.entries = entries
        self.leaves = [merkle.leaf_hash(e) for e in entries]
        self.size = len(entries)
        self.notes = notes  # C's real checkpoints, as C stored them (with cosignatures)
        self.time_ms = decode_entry(entries[-1]).time_ms + 1
        self.rng = random.Random(20240611)

    def own(self, size: int) -> bytes:
        """C's real checkpoint note at ``size`` carrying only C's own signature."""
        note = parse_note(self.notes[size])
        return format_note(
            Note(note.text, tuple(s for s in note.signatures if s.name == self.origin))
        )

    def text(self, size: int) -> str:
        return parse_note(self.notes[size]).text

    def sign(
        self,
        text: str,
        key: Ed25519PrivateKey | None = None,
        name: str | None = None,
        kid: bytes | None = None,
    ) -> bytes:
        """A signed note, built by hand so that any text (even a malformed one) can be signed."""
        key = key or self.key
        name = name or self.origin
        kid = key_id(name, key.public_key()) if kid is None else kid
        return f"{text}\n\u2014 {name} {b64(kid + key.sign(text.encode()))}\n".encode()

    def checkpoint(
        self,
        size: int,
        root: bytes,
        key: Ed25519PrivateKey | None = None,
        origin: str | None = None,
    ) -> bytes:
        return self.sign(format_checkpoint(Checkpoint(origin or self.origin, size, root)), key)

    def entry(
        self,
        index: int,
        prev: bytes,
        *,
        key: Ed25519PrivateKey | None = None,
        origin: str | None = None,
        payload: dict | None = None,
    ) -> bytes:
        _, data = sign_entry(
            origin=origin or self.origin,
            index=index,
            prev=prev,
            time_ms=self.time_ms + index,
            kind="image-anchored",
            payload=payload or {"sha256": f"{index:064x}", "forged": True},
            private_key=key or self.key,
        )
        return data

    def entry_object(self, index: int, prev: bytes, **changes) -> dict:
        """A well-signed entry's JSON object with ``changes`` applied after signing."""
        obj = json.loads(self.entry(index, prev))
        obj.update(changes)
        return obj

    def chain(self, n: int) -> list[bytes]:
        """n valid entries continuing C's real log (never served all together with a
        checkpoint they match)."""
        out: list[bytes] = []
        prev = self.leaves[-1]
        for i in range(n):
            out.append(
                self.entry(self.size + i, prev, payload={"sha256": f"{i:064x}", "chain": True})
            )
            prev = merkle.leaf_hash(out[-1])
        return out

    def extension(self, tail: list[bytes]) -> tuple[bytes, int, list[bytes]]:
        """C-signed checkpoint of C's real entries followed by ``tail``; (note, size, leaves)."""
        leaves = self.leaves + [merkle.leaf_hash(e) for e in tail]
        root = merkle.root_of_leaf_hashes(leaves)
        return self.checkpoint(len(leaves), root), len(leaves), leaves

    def random_hash(self) -> bytes:
        return self.rng.randbytes(32)


# -- PUSH: requests to B's peer API, as C ---------------------------------------------------


@dataclass
class Attack:
    category: str
    name: str
    method: str
    path: str
    expect: tuple[int, ...]
    body: bytes | None = None
    params: list[tuple[str, str]] | None = None
    handled: bool = True  # refused by B's own handler (so it must log a reason)


def push_attacks(f: Forger, b_origin: str) -> list[Attack]:
    attacks: list[Attack] = []
    n = f.size
    note = f.own(n)
    full = f.notes[n]

    def post(category: str, name: str, body: bytes, expect: tuple[int, ...]) -> None:
        attacks.append(Attack(category, name, "POST", "/v1/add-checkpoint", expect, body=body))

    def add(
        category: str,
        name: str,
        note_bytes: bytes,
        expect: tuple[int, ...],
        old: int = n,
        proof: list[bytes] | tuple = (),
    ) -> None:
        body = {"note": b64(note_bytes), "old_size": old, "proof": [b64(h) for h in proof]}
        post(category, name, json.dumps(body).encode(), expect)

    # every byte of C's real checkpoint note flipped, two ways
    for i in range(len(note)):
        for x in (0x01, f.rng.randrange(2, 256)):
            mutated = note[:i] + bytes([note[i] ^ x]) + note[i + 1 :]
            add("flipped note byte", f"byte {i} ^ {x:#x}", mutated, (400, 403, 404))

    # signatures that are not C's
    text = f.text(n)
    forged_cp, forged_size, forged_leaves = f.extension([f.rng.randbytes(40) for _ in range(997)])
    big_text = parse_note(forged_cp).text
    for name, forged in [
        ("other key under C's name", f.sign(text, f.other)),
        (
            "other key under C's name and key ID",
            f.sign(text, f.other, kid=key_id(f.origin, f.key.public_key())),
        ),
        ("C's key with a wrong key ID", f.sign(text, kid=b"\0\0\0\0")),
        (
            "random signature bytes",
            text.encode()
            + f"\n\u2014 {f.origin} ".encode()
            + b64(key_id(f.origin, f.key.public_key()) + f.rng.randbytes(64)).encode()
            + b"\n",
        ),
        (
            "short signature",
            text.encode()
            + f"\n\u2014 {f.origin} ".encode()
            + b64(key_id(f.origin, f.key.public_key()) + f.rng.randbytes(32)).encode()
            + b"\n",
        ),
        ("only a stranger's signature", f.sign(text, f.other, name="evil.example/log")),
        (
            "a bad second signature by C's key ID",
            note
            + f.sign(text, f.other, kid=key_id(f.origin, f.key.public_key())).split(b"\n\n", 1)[1],
        ),
        ("other key, larger size", f.sign(big_text, f.other)),
        (
            "C's signature moved to another text",
            big_text.encode() + b"\n" + note.split(b"\n\n", 1)[1],
        ),
        (
            "cosignature line only",
            text.encode() + b"\n" + full.split(b"\n\n", 1)[1].split(b"\n", 1)[1]
            if full.count("\n\u2014".encode()) > 1
            else f.sign(text, f.other, name="evil.example/log"),
        ),
    ]:
        for old in (n, 0):
            add("foreign signature", f"{name} (old {old})", forged, (403,))

    # checkpoints of other origins
    root = parse_checkpoint(text).root_hash
    for name, forged in [
        (
            "stranger origin",
            f.sign(
                format_checkpoint(Checkpoint("evil.example/log", n, root)),
                f.other,
                "evil.example/log",
            ),
        ),
        (
            "B's origin signed by C as B",
            f.sign(format_checkpoint(Checkpoint(b_origin, n, root)), name=b_origin),
        ),
        ("B's origin signed by C", f.sign(format_checkpoint(Checkpoint(b_origin, n, root)))),
        (
            "origin with a trailing space",
            f.sign(format_checkpoint(Checkpoint(f.origin + " ", n, root)), name=f.origin),
        ),
        ("origin in upper case", f.sign(format_checkpoint(Checkpoint(f.origin.upper(), n, root)))),
    ]:
        for old in (n, 0):
            add("wrong origin", f"{name} (old {old})", forged, (404, 403))

    # malformed checkpoint texts, validly signed by C's key (they are not checkpoints)
    r64 = b64(root)
    noncanonical_root = _noncanonical(r64)  # the same 32 bytes: anything else would be a real fork
    assert noncanonical_root != r64 and base64.b64decode(noncanonical_root) == root
    for name, bad in [
        ("size with a leading zero", f"{f.origin}\n0{n}\n{r64}\n"),
        ("negative size", f"{f.origin}\n-{n}\n{r64}\n"),
        ("size with a decimal point", f"{f.origin}\n{n}.0\n{r64}\n"),
        ("size with a plus sign", f"{f.origin}\n+{n}\n{r64}\n"),
        ("size with a space", f"{f.origin}\n {n}\n{r64}\n"),
        ("empty size", f"{f.origin}\n\n{r64}\n"),
        ("size above 2**63-1", f"{f.origin}\n{2**63}\n{r64}\n"),
        ("size of 25 digits", f"{f.origin}\n{'9' * 25}\n{r64}\n"),
        ("non-canonical root base64", f"{f.origin}\n{n}\n{noncanonical_root}\n"),
        ("root without padding", f"{f.origin}\n{n}\n{r64.rstrip('=')}\n"),
        ("root of 31 bytes", f"{f.origin}\n{n}\n{b64(root[:31])}\n"),
        ("root of 33 bytes", f"{f.origin}\n{n}\n{b64(root + b'x')}\n"),
        ("root not base64", f"{f.origin}\n{n}\n{'!' * 44}\n"),
        ("no root line", f"{f.origin}\n{n}\n"),
        ("empty origin", f"\n{n}\n{r64}\n"),
        ("control character in origin", f"{f.origin}\x01\n{n}\n{r64}\n"),
        ("empty extension line", f"{f.origin}\n{n}\n{r64}\n\n"),
        ("tab in an extension", f"{f.origin}\n{n}\n{r64}\nx\ty\n"),
    ]:
        add("malformed checkpoint", name, f.sign(bad), (400, 403))
    add(
        "malformed checkpoint",
        "not UTF-8",
        text.encode().replace(b"\n", b"\xff\n", 1) + b"\n" + note.split(b"\n\n", 1)[1],
        (400,),
    )
    add("malformed checkpoint", "no blank line", note.replace(b"\n\n", b"\n"), (400,))
    add("malformed checkpoint", "no signature lines", text.encode() + b"\n", (400,))
    add("malformed checkpoint", "above the note size limit", note + b"x" * (1 << 20), (400, 413))

    # bodies that are not JSON
    for name, body in [
        ("empty", b""),
        ("text", b"not json"),
        ("binary", bytes(range(256))),
        ("open brace", b"{"),
        ("unterminated array", b"[1,"),
        ("missing value", b'{"note": }'),
        ("NUL bytes", b"\0" * 100),
        (
            "trailing garbage",
            json.dumps({"note": b64(note), "old_size": n, "proof": []}).encode() + b"x",
        ),
        ("invalid UTF-8", b'{"note": "\xe9"}'),
        ("UTF-8 BOM", b"\xef\xbb\xbf{}"),
        ("single quotes", b"{'note': 1}"),
        ("form encoded", b"note=abc&old_size=3"),
        ("deeply nested arrays", b"[" * 50_000 + b"]" * 50_000),
        ("deeply nested objects", b'{"a":' * 20_000 + b"1" + b"}" * 20_000),
    ]:
        post("not JSON", name, body, (400,))

    # JSON of the wrong shape or types
    good = {"note": b64(note), "old_size": n, "proof": []}
    for name, body in [
        ("array", []),
        ("number", 1),
        ("string", "note"),
        ("null", None),
        ("true", True),
        ("float", 1.5),
        ("empty object", {}),
    ]:
        post("wrong JSON types", name, json.dumps(body).encode(), (400,))
    post("wrong JSON types", "NaN", b"NaN", (400,))
    wrong: list[tuple[str, str, object]] = [
        ("note", "missing", ...),
        ("note", "null", None),
        ("note", "number", 1),
        ("note", "array", [b64(note)]),
        ("note", "object", {"note": b64(note)}),
        ("note", "true", True),
        ("old_size", "missing", ...),
        ("old_size", "string", str(n)),
        ("old_size", "float", float(n)),
        ("old_size", "negative", -1),
        ("old_size", "true", True),
        ("old_size", "false", False),
        ("old_size", "null", None),
        ("old_size", "array", [n]),
        ("old_size", "2**63", 2**63),
        ("old_size", "2**64", 2**64),
        ("old_size", "10**400", 10**400),
        ("old_size", "-10**400", -(10**400)),
        ("proof", "missing", ...),
        ("proof", "string", "x"),
        ("proof", "object", {}),
        ("proof", "null", None),
        ("proof", "numbers", [1]),
        ("proof", "nulls", [None]),
        ("proof", "nested", [[]]),
        ("proof", "64 hashes", [b64(bytes(32))] * 64),
        ("proof", "1000 hashes", [b64(bytes(32))] * 1000),
    ]
    for key, name, value in wrong:
        body = dict(good)
        if value is ...:
            del body[key]
        else:
            body[key] = value
        post("wrong JSON types", f"{key} {name}", json.dumps(body).encode(), (400,))

    # base64 that is not base64
    for name, value in [
        ("punctuation", "!!!!"),
        ("missing padding", b64(note).rstrip("=") + "Q"),
        ("lone character", "Q"),
        ("URL-safe alphabet", b64(note).replace("+", "-").replace("/", "_") + "-_-_"),
        ("embedded newline", b64(note)[:40] + "\n" + b64(note)[40:]),
        ("embedded space", b64(note)[:40] + " " + b64(note)[40:]),
        ("leading space", " " + b64(note)),
        ("non-ASCII", b64(note)[:40] + "\u00e9" + b64(note)[41:]),
        ("empty", ""),
        ("non-canonical base64 of a forged note", _noncanonical(b64(f.sign(text, f.other)))),
    ]:
        post("bad base64", f"note {name}", json.dumps({**good, "note": value}).encode(), (400, 403))
    for name, value in [
        ("punctuation", "%%%%"),
        ("missing padding", "QQ"),
        ("non-ASCII", "\u00e9\u00e9\u00e9\u00e9"),
    ]:
        post(
            "bad base64",
            f"proof hash {name}",
            json.dumps({**good, "proof": [value]}).encode(),
            (400,),
        )

    # consistency proofs that do not prove: B holds size n, so C must show size N extends it
    genuine = merkle.consistency_proof(n, forged_size, forged_leaves)

    def bogus(
        name: str,
        proof: list[bytes],
        cp: bytes = forged_cp,
        expect: tuple[int, ...] = (422,),
        old: int = n,
    ) -> None:
        size = parse_checkpoint(parse_note(cp).text).size
        if size > n and old == n:  # never send a proof that verifies: B would cosign it
            with pytest.raises(merkle.ProofError):
                merkle.verify_consistency(
                    n, size, root, parse_checkpoint(parse_note(cp).text).root_hash, proof
                )
        add("bogus consistency proof", name, cp, expect, old=old, proof=proof)

    bogus("empty proof", [])
    bogus("random proof", [f.random_hash() for _ in genuine])
    for i in range(len(genuine)):
        for bit in (0x01, 0x80):
            h = bytearray(genuine[i])
            h[f.rng.randrange(32)] ^= bit
            bogus(
                f"hash {i} of the proof flipped ({bit:#x})",
                [*genuine[:i], bytes(h), *genuine[i + 1 :]],
            )
        bogus(f"hash {i} of the proof dropped", genuine[:i] + genuine[i + 1 :])
        bogus(f"hash {i} of the proof duplicated", genuine[: i + 1] + genuine[i:])
    bogus("proof reversed", genuine[::-1])
    bogus("proof with an extra hash", [*genuine, f.random_hash()])
    for length in (0, 1, 31, 33, 64):
        bogus(f"a {length}-byte hash", [*genuine[:-1], bytes(length)])
    bogus("63 random hashes", [f.random_hash() for _ in range(63)])
    bogus("64 random hashes", [f.random_hash() for _ in range(64)], expect=(400,))
    bogus(
        "proof of the real tree to another size",
        merkle.consistency_proof(
            n, forged_size, f.leaves + [f.random_hash() for _ in range(forged_size - n)]
        ),
    )
    for size in (1001, 1023, 1024):  # other sizes (beyond C's real log), each with its own root
        cp, _, leaves = f.extension([f.rng.randbytes(40) for _ in range(size - n)])
        bogus(f"proof for the wrong size ({size})", genuine, cp)
        bogus(f"random proof for size {size}", [f.random_hash() for _ in range(4)], cp)
    bogus("a proof between equal sizes", [f.random_hash()], note)
    bogus("genuine proof, stale old size 0", genuine, expect=(409,), old=0)
    bogus("genuine proof, old size n - 1", genuine, expect=(409,), old=n - 1)
    bogus(
        "genuine proof, old size above the checkpoint", genuine, expect=(400,), old=forged_size + 1
    )

    # replays of C's real checkpoints; the one B already cosigned is re-cosigned (tlog-witness)
    for size in sorted(f.notes):
        for variant, replay in (("own signature", f.own(size)), ("as stored", f.notes[size])):
            if size == n:
                for _ in range(3):
                    add("replay", f"size {size} {variant}, old {n}: idempotent", replay, (200,))
                add("replay", f"size {size} {variant}, old 0", replay, (409,), old=0)
                if n > 1:
                    add("replay", f"size {size} {variant}, old 1", replay, (409,), old=1)
            else:
                add("replay", f"old size-{size} {variant}, old {n}", replay, (400,))
                add(
                    "replay",
                    f"old size-{size} {variant}, old 0",
                    replay,
                    (409,) if size else (409, 400),
                    old=0,
                )
                add("replay", f"old size-{size} {variant}, old {size}", replay, (409,), old=size)

    # bodies above max_message_bytes
    for i in range(3):
        post(
            "oversized",
            f"note string of {LIMIT} characters #{i}",
            json.dumps({"note": "A" * LIMIT, "old_size": n, "proof": []}).encode(),
            (413,),
        )
    post("oversized", "raw bytes", b"x" * (LIMIT + 1), (413,))
    post(
        "oversized",
        "proof of many hashes",
        json.dumps(
            {"note": b64(note), "old_size": n, "proof": [b64(bytes(32))] * (LIMIT // 40)}
        ).encode(),
        (413,),
    )

    # bad query parameters
    o = f.origin
    for name, params, expect in [
        ("no parameters", [], 400),
        ("origin only", [("origin", o)], 400),
        ("start not a number", [("origin", o), ("start", "abc"), ("end", "3")], 400),
        ("start a float", [("origin", o), ("start", "1.5"), ("end", "3")], 400),
        ("start in hex", [("origin", o), ("start", "0x1"), ("end", "3")], 400),
        ("start in exponent form", [("origin", o), ("start", "1e3"), ("end", "3")], 400),
        ("empty start", [("origin", o), ("start", ""), ("end", "3")], 400),
        ("negative start", [("origin", o), ("start", "-1"), ("end", "3")], 400),
        ("negative end", [("origin", o), ("start", "0"), ("end", "-1")], 400),
        ("5000-digit start", [("origin", o), ("start", "9" * 5000), ("end", "3")], 400),
        ("unknown origin", [("origin", "evil.example/log"), ("start", "0"), ("end", "3")], 404),
        ("empty origin", [("origin", ""), ("start", "0"), ("end", "3")], 404),
        ("origin with SQL", [("origin", "x' OR '1'='1"), ("start", "0"), ("end", "3")], 404),
        ("origin with NUL", [("origin", o + "\0"), ("start", "0"), ("end", "3")], 404),
    ]:
        attacks.append(
            Attack("bad query", f"entries: {name}", "GET", "/v1/entries", (expect,), params=params)
        )
    for name, params, expect in [
        ("no parameters", [], 400),
        ("old not a number", [("origin", o), ("old", "x"), ("new", "3")], 400),
        ("negative old", [("origin", o), ("old", "-1"), ("new", "3")], 400),
        ("float new", [("origin", o), ("old", "1"), ("new", "3.0")], 400),
        ("old 0", [("origin", o), ("old", "0"), ("new", str(n))], 404),
        ("old above new", [("origin", o), ("old", str(n)), ("new", "1")], 404),
        ("new above the log", [("origin", o), ("old", "1"), ("new", str(n + 1))], 404),
        ("huge new", [("origin", o), ("old", "1"), ("new", str(10**30))], 404),
        ("5000-digit new", [("origin", o), ("old", "1"), ("new", "9" * 5000)], 400),
        ("unknown origin", [("origin", "evil.example/log"), ("old", "1"), ("new", "2")], 404),
    ]:
        attacks.append(
            Attack(
                "bad query",
                f"consistency: {name}",
                "GET",
                "/v1/consistency",
                (expect,),
                params=params,
            )
        )
    for method, path, expect in [
        ("GET", "/v1/add-checkpoint", 405),
        ("POST", "/v1/checkpoints", 405),
        ("DELETE", "/v1/entries", 405),
        ("PUT", "/v1/add-checkpoint", 405),
        ("GET", "/v1/nothing", 404),
        ("GET", "/", 404),
        ("GET", "/v1/../../etc/passwd", 404),
        ("GET", "/v2/checkpoints", 404),
    ]:
        attacks.append(
            Attack("bad query", f"{method} {path}", method, path, (expect,), handled=False)
        )
    return attacks


def _noncanonical(s: str) -> str:
    """The same bytes in non-canonical base64 (non-zero padding bits), if it has padding."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    pad = len(s) - len(s.rstrip("="))
    if not pad:
        return s + "=="  # no padding to abuse: make it invalid instead
    i = len(s) - pad - 1
    return s[:i] + alphabet[alphabet.index(s[i]) | 1] + s[i + 1 :]


@dataclass
class Outcome:
    attack: Attack
    status: int | None
    body: bytes


async def send_all(attacks: list[Attack], base: str, ctx: ssl.SSLContext) -> list[Outcome]:
    outcomes = []
    connector = aiohttp.TCPConnector(ssl=ctx, limit=4)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        for attack in attacks:
            try:
                async with session.request(
                    attack.method,
                    base + attack.path,
                    data=attack.body,
                    params=attack.params,
                    headers={"Content-Type": "application/json"}
                    if attack.body is not None
                    else None,
                ) as resp:
                    outcomes.append(Outcome(attack, resp.status, await resp.read()))
            except (aiohttp.ClientError, OSError) as exc:
                outcomes.append(Outcome(attack, None, repr(exc).encode()))
    return outcomes


# -- PULL: a fake C that answers B's gossip with forgeries -----------------------------------


def response(body: object = None, status: int = 200, raw: bytes | None = None) -> web.Response:
    data = raw if raw is not None else json.dumps(body).encode()
    return web.Response(body=data, status=status, content_type="application/json")


@dataclass
class Round:
    """One gossip round B has with the fake C: what /v1/checkpoints says, and how the entries
    and consistency requests that follow are answered. ``reason`` must show up in B's log."""

    name: str
    reason: str | None
    checkpoints: Callable[[], web.Response]
    entries: Callable[[int, int], web.Response] | None = None
    consistency: Callable[[], web.Response] | None = None
    forged: bool = True  # False: a replay of C's real checkpoints, which B may simply ignore


def pull_rounds(f: Forger, b_origin: str) -> list[Round]:
    n = f.size
    rounds: list[Round] = []
    real = f.notes[n]
    sizes = iter(range(10, 1000))  # a size of their own for every C-signed forged checkpoint

    def cps(note: bytes, **extra) -> Callable[[], web.Response]:
        return lambda: response({"checkpoints": {f.origin: b64(note)}, **extra})

    def fixed(resp: Callable[[], web.Response]) -> Callable[[int, int], web.Response]:
        return lambda start, end: resp()

    # /v1/checkpoints itself forged
    for name, reason, make in [
        ("not JSON", "response is not JSON", lambda: response(raw=b"<html>C is down</html>")),
        ("binary", "response is not JSON", lambda: response(raw=bytes(range(256)) * 4)),
        ("oversized", f"response above {LIMIT} bytes", lambda: response(raw=b" " * (LIMIT + 1))),
        (
            "oversized JSON",
            f"response above {LIMIT} bytes",
            lambda: response({"checkpoints": {}, "pad": "x" * LIMIT}),
        ),
        ("deeply nested JSON", "not JSON", lambda: response(raw=b"[" * 50_000 + b"]" * 50_000)),
        ("status 500", "checkpoints: status 500", lambda: response({"checkpoints": {}}, 500)),
        ("status 404", "checkpoints: status 404", lambda: response({"error": "no"}, 404)),
        ("top-level array", "checkpoints: status 200", lambda: response([real.decode()])),
        (
            "checkpoints an array",
            "checkpoints must be an object",
            lambda: response({"checkpoints": [b64(real)]}),
        ),
        ("checkpoints missing", "checkpoints must be an object", lambda: response({})),
        (
            "checkpoint a number",
            "checkpoint must be a base64 string",
            lambda: response({"checkpoints": {f.origin: 3}}),
        ),
        (
            "checkpoint null",
            "checkpoint must be a base64 string",
            lambda: response({"checkpoints": {f.origin: None}}),
        ),
        (
            "checkpoint not base64",
            "checkpoint is not valid base64",
            lambda: response({"checkpoints": {f.origin: "%%%"}}),
        ),
        (
            "checkpoint not a note",
            "note",
            lambda: response({"checkpoints": {f.origin: b64(b"garbage")}}),
        ),
        ("checkpoint empty", "note", lambda: response({"checkpoints": {f.origin: ""}})),
        (
            "checkpoint not a checkpoint",
            "checkpoint has 1 lines",
            cps(f.sign("just some text\n", f.other)),
        ),
    ]:
        rounds.append(Round(f"checkpoints {name}", reason, make))

    # checkpoints not signed by C
    text = f.text(n)
    flipped = bytearray(f.own(n))
    flipped[-10] ^= 0x01  # inside C's signature
    tail = f.chain(4)
    for name, note in [
        ("C's text signed by another key", f.sign(text, f.other)),
        (
            "C's text, another key under C's key ID",
            f.sign(text, f.other, kid=key_id(f.origin, f.key.public_key())),
        ),
        ("C's note with a flipped signature", bytes(flipped)),
        (
            "a larger checkpoint signed by another key",
            f.checkpoint(next(sizes), f.random_hash(), f.other),
        ),
        (
            "a valid extension signed by another key",
            f.checkpoint(
                n + len(tail),
                merkle.root_of_leaf_hashes(f.leaves + [merkle.leaf_hash(e) for e in tail]),
                f.other,
            ),
        ),
        ("B's origin signed by C", f.checkpoint(next(sizes), f.random_hash(), origin=b_origin)),
        ("only a stranger's signature", f.sign(text, f.other, name="evil.example/log")),
    ]:
        rounds.append(
            Round(
                f"unsigned: {name}",
                "not signed by its key",
                cps(note),
                entries=fixed(lambda tail=tail: response({"entries": [b64(e) for e in tail]})),
            )
        )

    # forged evidence of equivocation
    two_roots = [
        f.sign(format_checkpoint(Checkpoint(f.origin, n, f.random_hash())), f.other)
        for _ in range(2)
    ]
    b_roots = [
        f.sign(format_checkpoint(Checkpoint(b_origin, 1, f.random_hash())), f.other, b_origin)
        for _ in range(2)
    ]
    evidence_against_b = (
        f"{EVIDENCE_MAGIC}\norigin {b_origin}\na {b64(b_roots[0])}\nb {b64(b_roots[1])}\n"
        "reason forged\n"
    ).encode()
    evidence_against_c = (
        f"{EVIDENCE_MAGIC}\norigin {f.origin}\na {b64(two_roots[0])}\nb {b64(two_roots[1])}\n"
        "reason forged\n"
    ).encode()
    consistent = format_evidence(Equivocation(f.origin, f.own(n), real, "C signed this twice"))
    for name, reason, evidence in [
        ("not base64", "evidence is not valid base64", ["%%%"]),
        ("not a string", "evidence must be a base64 string", [7]),
        ("junk", "evidence refused", [b64(b"this is not evidence")]),
        ("against C, signed by another key", "evidence refused", [b64(evidence_against_c)]),
        ("against B, signed by another key", "evidence refused", [b64(evidence_against_b)]),
        (
            "two consistent checkpoints of C",
            "evidence refused: the two checkpoints are consistent",
            [b64(consistent)],
        ),
    ]:
        rounds.append(Round(f"evidence {name}", reason, cps(real, evidence=evidence)))

    # checkpoints signed by C for larger sizes, each over C's real entries and a forged tail
    # that cannot be served valid; the entries B is then given are forged
    def extended(
        name: str,
        reason: str,
        tail: list[bytes],
        served: str = "tail",
        entries: Callable[[int, int], web.Response] | None = None,
        consistency: str = "rotate",
    ) -> None:
        """A C-signed checkpoint over C's real entries and ``tail`` (padded to a size of its
        own with leaves nobody can serve valid); B is served ``tail``, or a valid chain of
        entries of that size ("valid"), or C's real entries over and over ("real")."""
        pad = next(sizes) - n - len(tail)
        assert pad >= 0
        tail = tail + [f.rng.randbytes(50) for _ in range(pad)]
        note, size, leaves = f.extension(tail)
        served_entries = {"tail": tail, "valid": f.chain(size - n), "real": f.entries * size}[
            served
        ]
        if served != "tail":  # never a valid extension together with the checkpoint it matches
            assert served_entries[: size - n] != tail

        def serve(start: int, end: int) -> web.Response:
            return response(
                {
                    "entries": [
                        b64(e) for e in served_entries[start - n : min(end, start + 1000) - n]
                    ]
                }
            )

        proofs = {
            "genuine": lambda: response(
                {"proof": [b64(h) for h in merkle.consistency_proof(n, size, leaves)]}
            ),
            "random": lambda: response({"proof": [b64(f.random_hash()) for _ in range(3)]}),
            "404": lambda: response({"error": "no"}, 404),
            "not base64": lambda: response({"proof": ["%%%"]}),
            "not JSON": lambda: response(raw=b"proof? no"),
        }
        if consistency == "rotate":
            turn = iter(range(10**9))
            choice = ("genuine", "random", "404")

            def proof() -> web.Response:
                return proofs[choice[next(turn) % 3]]()
        else:
            proof = proofs[consistency]
        rounds.append(Round(f"extension: {name}", reason, cps(note), entries or serve, proof))

    last = f.leaves[-1]
    e3 = f.entry(n, last)
    e3_leaf = merkle.leaf_hash(e3)
    extended(
        "entry signed by another key",
        "does not verify with the origin's key",
        [f.entry(n, last, key=f.other)],
    )
    extended(
        "entry with a wrong previous hash", "wrong previous hash", [f.entry(n, f.random_hash())]
    )
    extended("entry chained to entry 0", "wrong previous hash", [f.entry(n, f.leaves[0])])
    extended("entry out of sequence", "out of sequence", [f.entry(n + 1, last)])
    extended("entry with index 0", "out of sequence", [f.entry(0, last)])
    extended("entry duplicated", "out of sequence", [e3, e3])
    extended("entry skipped", "out of sequence", [e3, f.entry(n + 2, e3_leaf)])
    extended("entry of another origin", "names origin", [f.entry(n, last, origin=b_origin)])
    extended(
        "entry not canonical (spaces)",
        "not in canonical form",
        [json.dumps(json.loads(e3), sort_keys=True).encode()],
    )
    extended(
        "entry not canonical (key order)",
        "not in canonical form",
        [json.dumps(dict(reversed(json.loads(e3).items())), separators=(",", ":")).encode()],
    )
    extended(
        "entry not canonical (escaped)",
        "not in canonical form",
        [e3.replace(b'"image-anchored"', b'"image\\u002danchored"')],
    )
    extended(
        "entry with an unknown kind",
        "is unknown",
        [canonical_json(f.entry_object(n, last, kind="evil"))],
    )
    extended(
        "entry with an extra field",
        "entry fields wrong",
        [canonical_json(f.entry_object(n, last, extra=1))],
    )
    extended(
        "entry with a float time",
        "non-negative integer",
        [
            json.dumps(
                f.entry_object(n, last, time=1.5), sort_keys=True, separators=(",", ":")
            ).encode()
        ],
    )
    extended(
        "entry with a short signature",
        "not 64 bytes",
        [canonical_json(f.entry_object(n, last, sig=b64(bytes(32))))],
    )
    extended("entry not JSON", "not UTF-8 JSON", [b"\xff\xfe garbage"])
    extended("entry above 64 KiB", "above the limit", [b'{"pad":"' + b"x" * 70_000 + b'"}'])
    extended("entry a JSON array", "not a JSON object", [b"[]"])
    extended(
        "valid entries, other checkpoint root",
        "do not match its signed checkpoint's root",
        [f.entry(n, last, key=f.other)],
        served="valid",
    )
    extended("C's real entries replayed from 0", "out of sequence", [e3], served="real")
    extended(
        "entries not base64",
        "entry is not valid base64",
        [e3],
        entries=fixed(lambda: response({"entries": ["%%%"]})),
    )
    extended(
        "entries not strings",
        "entry must be a base64 string",
        [e3],
        entries=fixed(lambda: response({"entries": [1, None]})),
    )
    for name, make in [
        ("empty", lambda: response({"entries": []})),
        ("a string", lambda: response({"entries": "x"})),
        ("missing", lambda: response({})),
        ("a top-level array", lambda: response([b64(e3)])),
        ("status 404", lambda: response({"entries": [b64(e3)]}, 404)),
    ]:
        extended(f"entries {name}", "did not serve", [e3], entries=fixed(make))
    truncated = [e3, *f.chain(4)[1:]]
    extended(
        "entries truncated",
        "did not serve",
        truncated,
        entries=lambda start, end: response(
            {"entries": [b64(e) for e in truncated[:2]] if start == n else []}
        ),
    )
    extended(
        "entries not JSON",
        "response is not JSON",
        [e3],
        entries=fixed(lambda: response(raw=b"\x00\x01")),
    )
    extended(
        "entries oversized",
        f"response above {LIMIT} bytes",
        [e3],
        entries=fixed(lambda: response({"entries": ["A" * LIMIT]})),
    )
    extended(
        "entries deeply nested",
        "not JSON",
        [e3],
        entries=fixed(lambda: response(raw=b'{"entries":' + b"[" * 50_000 + b"]" * 50_000 + b"}")),
    )
    extended(
        "forged entry, proof not base64",
        "proof hash is not valid base64",
        [f.entry(n, f.random_hash())],
        consistency="not base64",
    )
    extended(
        "forged entry, proof not JSON",
        "response is not JSON",
        [f.entry(n, f.random_hash())],
        consistency="not JSON",
    )

    # replays of C's real checkpoints: consistent with what B holds, so B just ignores them
    for size in sorted(f.notes):
        for variant, note in (("own", f.own(size)), ("stored", f.notes[size])):
            rounds.append(Round(f"replay size {size} {variant}", None, cps(note), forged=False))
    return rounds


class FakePeer:
    """An HTTPS peer API with C's TLS identity, on its own event loop in a thread."""

    def __init__(self, port: int, ctx: ssl.SSLContext, rounds: list[Round], b_origin: str) -> None:
        self.port, self.ctx, self.rounds, self.b_origin = port, ctx, rounds, b_origin
        self.served: Counter[str] = Counter()  # forged answers per round name
        self.replayed = 0
        self.forged_rounds = 0
        self.unexpected: list[str] = []
        self._turn = 0
        self._current: Round | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fake-peer", daemon=True
        )
        self._runner: web.AppRunner | None = None

    @property
    def forged(self) -> int:
        return sum(self.served.values())

    def _count(self, rnd: Round) -> None:
        if rnd.forged:
            self.served[rnd.name] += 1
        else:
            self.replayed += 1

    async def _checkpoints(self, request: web.Request) -> web.Response:
        rnd = self._current = self.rounds[self._turn % len(self.rounds)]
        self._turn += 1
        self.forged_rounds += rnd.forged
        self._count(rnd)
        return rnd.checkpoints()

    async def _entries(self, request: web.Request) -> web.Response:
        rnd = self._current
        if rnd is None or rnd.entries is None:
            self.unexpected.append(
                f"entries asked after round {rnd and rnd.name}: {request.query_string}"
            )
            return response({"error": "no"}, 404)
        self._count(rnd)
        return rnd.entries(int(request.query["start"]), int(request.query["end"]))

    async def _consistency(self, request: web.Request) -> web.Response:
        rnd = self._current
        if rnd is None or rnd.consistency is None:
            self.unexpected.append(
                f"consistency asked after round {rnd and rnd.name}: {request.query_string}"
            )
            return response({"error": "no"}, 404)
        self._count(rnd)
        return rnd.consistency()

    async def _add_checkpoint(self, request: web.Request) -> web.Response:
        # B asks C to cosign B's checkpoint: a forged cosignature
        self.served["forged cosignature"] += 1
        return response({"name": self.b_origin, "cosignature": b64(bytes(76))})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/checkpoints", self._checkpoints)
        app.router.add_get("/v1/entries", self._entries)
        app.router.add_get("/v1/consistency", self._consistency)
        app.router.add_post("/v1/add-checkpoint", self._add_checkpoint)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ctx).start()

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


# -- UNKNOWN PEERS ----------------------------------------------------------------------------


async def stranger_attempts(
    base: str, contexts: list[tuple[str, ssl.SSLContext | None]], rounds: int
) -> Counter[str]:
    """Connect as each stranger ``rounds`` times, a fresh connection each; counts how each
    attempt ended: an HTTP status, or the exception that ended the connection."""
    outcomes: Counter[str] = Counter()
    for _ in range(rounds):
        for name, ctx in contexts:
            url = base if ctx is not None else base.replace("https://", "http://")
            connector = aiohttp.TCPConnector(
                ssl=ctx if ctx is not None else False, force_close=True
            )
            try:
                async with aiohttp.ClientSession(
                    connector=connector, timeout=aiohttp.ClientTimeout(total=10)
                ) as s:
                    async with s.get(url + "/v1/checkpoints") as resp:
                        await resp.read()
                        outcomes[f"{name}: status {resp.status}"] += 1
            except (
                aiohttp.ClientError,
                OSError,
                TimeoutError,
            ) as exc:  # refused by TLS, or dropped
                outcomes[f"{name}: {type(exc).__name__}"] += 1
    return outcomes


def stranger_contexts(
    tmp_path: Path, b: GatewayProcess, c: GatewayProcess
) -> list[tuple[str, ssl.SSLContext | None]]:
    b_cert = (b.dir / "keys" / "peer-tls.crt").read_bytes()
    contexts: list[tuple[str, ssl.SSLContext | None]] = []
    for i in range(3):
        cert, key = tmp_path / f"stranger{i}.crt", tmp_path / f"stranger{i}.key"
        name = c.origin if i == 0 else f"stranger{i}.example"  # even one naming C
        create_tls_identity(cert, key, name)
        contexts.append((f"self-signed certificate {name}", client_context(cert, key, [b_cert])))
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.verify_mode = ssl.CERT_NONE
    contexts.append(("no client certificate", no_cert))
    contexts.append(
        (
            "B's own certificate",
            client_context(
                b.dir / "keys" / "peer-tls.crt", b.dir / "keys" / "peer-tls.key", [b_cert]
            ),
        )
    )
    contexts.append(("plain HTTP", None))
    return contexts


# -- the test ---------------------------------------------------------------------------------


def log_events(gw: GatewayProcess, offset: int = 0) -> tuple[list[dict], list[str]]:
    events, other = [], []
    for line in gw.log_path.read_bytes()[offset:].decode(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            other.append(line)
            continue
        (events if isinstance(event, dict) else other).append(
            event if isinstance(event, dict) else line
        )
    return events, other


def test_forged_and_mutated_peer_messages_are_all_refused(tmp_path):
    started = time.monotonic()
    b, c = consortium(tmp_path, 2, gossip_interval=0.05)
    for gw in (b, c):
        # back-off after entries that do not verify (item 14) kept to one gossip interval here,
        # so that B keeps taking the fake C's forged answers round after round
        gw.set("fanout = 3", f"fanout = 3\nmax_message_bytes = {LIMIT}")
        gw.set("backoff_max = 300.0", "backoff_max = 0.05")
    fake: FakePeer | None = None
    problems: list[str] = []
    try:
        b.start()
        c.start()
        # 1. C logs 3 images; B replicates them and cosigns C's checkpoint; C cosigns B's
        assert (
            c.storescu(*dicomdata.make_mr_series(tmp_path / "first", 3, seed="first")).returncode
            == 0
        )
        wait_until(lambda: log_size(b, c.origin) == 3, what="B to hold C's 3 entries")
        wait_until(
            lambda: 3 in log_of(c, c.origin)[1] and signed_by(log_of(c, c.origin)[1][3], b.origin),
            what="B's cosignature on C's size-3 checkpoint",
        )
        wait_until(
            lambda: (
                bool(cps := log_of(b, b.origin)[1]) and signed_by(max(cps.items())[1], c.origin)
            ),
            what="C's cosignature on B's checkpoint",
        )
        assert c.stop() == 0
        c_entries, c_notes = log_of(c, c.origin)
        assert len(c_entries) == 3 and max(c_notes) == 3
        before = state_of(b, c.origin)
        assert before["entries"] == c_entries and before["witness"][0][0] == 3
        forger = Forger(c.origin, load_key_file(c.dir / "keys" / "gateway.key"), c_entries, c_notes)
        b_cert = (b.dir / "keys" / "peer-tls.crt").read_bytes()
        c_cert, c_key = c.dir / "keys" / "peer-tls.crt", c.dir / "keys" / "peer-tls.key"
        log_offset = b.log_path.stat().st_size

        # 2b. PULL: the fake C answers B's gossip (every 0.05 s) while the pushes run
        rounds = pull_rounds(forger, b.origin)
        fake = FakePeer(c.peer_port, server_context(c_cert, c_key, [b_cert]), rounds, b.origin)
        fake.start()

        # 2a. PUSH: forged requests to B's peer API with C's TLS identity
        base = f"https://127.0.0.1:{b.peer_port}"
        attacks = push_attacks(forger, b.origin)
        outcomes = asyncio.run(send_all(attacks, base, client_context(c_cert, c_key, [b_cert])))
        b_public = load_key_file(b.dir / "keys" / "gateway.key").public_key()
        for out in outcomes:
            a = out.attack
            if out.status not in a.expect:
                problems.append(
                    f"push {a.category} / {a.name}: status {out.status}, expected {a.expect}: {out.body[:200]!r}"
                )
            elif out.status == 200:  # an idempotent replay: B cosigns the checkpoint it holds again
                answer = json.loads(out.body)
                raw = base64.b64decode(answer["cosignature"])
                sig = Signature(b.origin, raw[:4], raw[4:])
                assert answer["name"] == b.origin and a.category == "replay"
                assert verify_cosignature(forger.text(3), sig, b.origin, b_public) is not None

        # 2c. UNKNOWN PEERS: certificates B does not pin, no certificate, plain HTTP
        contexts = stranger_contexts(tmp_path, b, c)
        stranger_rounds = 6
        stranger_outcomes = asyncio.run(stranger_attempts(base, contexts, stranger_rounds))
        problems += [
            f"unknown peer not refused: {x}"
            for x in stranger_outcomes
            if "status" in x and not x.endswith("status 403")
        ]
        strangers = sum(stranger_outcomes.values())
        assert strangers == stranger_rounds * len(contexts)

        wait_until(
            lambda: (
                fake.forged >= PULL_TARGET and all(fake.served[r.name] for r in rounds if r.forged)
            ),
            timeout=60,
            what=f"B to take {PULL_TARGET} forged gossip answers, every kind at least once",
        )
        fake.stop()
        problems += [f"fake peer: {x}" for x in fake.unexpected]
        pushed, pulled = len(outcomes), fake.forged
        print(
            f"\npush {pushed} ({dict(Counter(o.attack.category for o in outcomes))}), "
            f"pull {pulled} forged + {fake.replayed} replayed in {fake._turn} rounds, "
            f"unknown peers {strangers} ({dict(stranger_outcomes)}), after {time.monotonic() - started:.1f} s"
        )
        assert pushed + pulled + strangers >= MIN_TOTAL

        # 3. nothing stored, nothing flagged, every refusal logged with its reason, still serving
        assert b.proc is not None and b.proc.poll() is None, "B died"
        after = state_of(b, c.origin)
        assert after == before, "B's ledger changed"
        assert log_size(b, c.origin) == 3
        assert query(b, "SELECT COUNT(*) FROM evidence") == [(0,)]
        peers = b.cli("peers").stdout
        assert "not flagged" in peers and "FLAGGED" not in peers, peers
        events, other = log_events(b, log_offset)
        text = b.log_path.read_bytes()[log_offset:].decode(errors="replace")
        for bad in ("gossip round failed", "Traceback", "Error handling request", "EQUIVOCATION"):
            if bad in text:
                problems.append(
                    f"B's log has {bad!r}: "
                    + next(line for line in text.splitlines() if bad in line)[:600]
                )
        problems += [f"B's log has a non-JSON line: {line[:200]}" for line in other]
        refused = [
            e
            for e in events
            if e.get("event") == "peer request refused" and e.get("peer") == c.origin
        ]
        rejected = [
            e
            for e in events
            if e.get("event") == "peer message rejected" and e.get("peer") == c.origin
        ]
        handled = [o for o in outcomes if o.attack.handled and o.status != 200]
        if len(refused) < len(handled):
            logged = Counter(e.get("status") for e in refused)
            sent = Counter(o.status for o in handled)
            problems.append(
                f"{len(handled)} refused pushes but {len(refused)} 'peer request refused' lines: "
                f"statuses sent {dict(sent)}, logged {dict(logged)}"
            )
        if not all(e.get("reason") for e in refused + rejected):
            problems.append("a refusal was logged without a reason")
        push_reasons = " | ".join(str(e.get("reason")) for e in refused)
        for reason in (
            "no valid signature",
            "is not a log this witness follows",
            "is malformed",
            "body is not JSON",
            "body must be a JSON object",
            "old_size must be",
            "proof must be a list",
            "is not valid base64",
            "the size last cosigned",
            "is not shown consistent",
            "between equal sizes must be empty",
            "larger than the checkpoint's size",
            "query needs integer",
            "negative sizes",
            "no log for origin",
            "no such sizes held",
        ):
            if reason not in push_reasons:
                problems.append(f"no push refusal logged with reason {reason!r}")
        pull_reasons = " | ".join(str(e.get("reason")) for e in rejected)
        for rnd in rounds:
            if rnd.reason is not None and rnd.reason not in pull_reasons:
                problems.append(
                    f"pull round {rnd.name!r}: no rejection logged with reason {rnd.reason!r}"
                )
        failed = [e for e in events if e.get("event") == "gossip round failed"]  # reported above
        if len(rejected) + len(failed) < fake.forged_rounds - 2:  # the last round may be cut short
            problems.append(
                f"{fake.forged_rounds} forged gossip rounds "
                f"but only {len(rejected)} 'peer message rejected' lines"
            )
        echo = dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", b.ae_title, "127.0.0.1", str(b.port))
        assert echo.returncode == 0, echo.stdout + echo.stderr

        # 4. the real C comes back and B replicates its new entries
        c.start()
        assert (
            c.storescu(*dicomdata.make_mr_series(tmp_path / "second", 5, seed="second")).returncode
            == 0
        )
        wait_until(lambda: log_size(b, c.origin) == 8, what="B to replicate C's 5 new entries")
        assert log_of(b, c.origin)[0] == log_of(c, c.origin)[0]
        peers = b.cli("peers").stdout
        assert "not flagged" in peers and "FLAGGED" not in peers, peers
    finally:
        if fake is not None:
            fake.stop()
        for gw in (b, c):
            if gw.proc is not None and gw.proc.poll() is None:
                gw.stop()
    for gw in (b, c):
        result = gw.cli("verify")
        assert result.returncode == 0, result.stdout + result.stderr
    assert query(b, "SELECT COUNT(*) FROM evidence") == [(0,)]
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)
    assert time.monotonic() - started < 120


def state_of(gw: GatewayProcess, origin: str) -> dict:
    """What ``gw`` holds of ``origin``'s log and of its own."""
    entries, notes = log_of(gw, origin)
    return {
        "entries": entries,
        "checkpoints": notes,
        "witness": query(gw, "SELECT size, root FROM witness_state WHERE origin = ?", (origin,)),
        "nodes": query(
            gw,
            "SELECT COUNT(*) FROM nodes n JOIN origins o ON o.id = n.origin_id WHERE o.name = ?",
            (origin,),
        ),
        "origins": query(gw, "SELECT name FROM origins ORDER BY id"),
        "keys": query(gw, "SELECT COUNT(*) FROM entry_keys"),
    }
