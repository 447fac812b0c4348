"""C2SP tlog-witness add-checkpoint on the wire, both ways, with a real gateway process.

* A gateway is a standard witness: a client written here from the spec alone (stdlib ``ssl``
  and ``socket``, raw HTTP/1.1 over the peer API's mutual TLS; bodies, checkpoint notes and
  RFC 6962 proofs built by hand) gets cosignatures that verify by hand with the gateway's
  published key, and the spec's status codes and bodies for every fault.
* A gateway is a standard log: a witness written here from the spec alone cosigns its
  checkpoints, and a proof checked with that witness's published (type 0x04) key lists it.

Nothing here uses dicomledger's note, checkpoint, Merkle or witness code to build or check
what crosses the wire.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dicomledger.ledger.peer_tls import create_tls_identity
from tests import dicomdata
from tests.conftest import GatewayProcess, consortium, dicomledger, free_port
from tests.test_consortium import newest_checkpoint, wait_until
from tests.test_peer_forgery import log_events, query
from tests.test_tlog_witness_format import SPEC_REQUEST

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

DASH = "\u2014"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- the spec, by hand -------------------------------------------------------------------


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 section 2.1 Merkle Tree Hash."""
    if not leaves:
        return sha256(b"")
    if len(leaves) == 1:
        return sha256(b"\x00" + leaves[0])
    k = 1 << (len(leaves) - 1).bit_length() - 1
    return sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:]))


def consistency(m: int, leaves: list[bytes], complete: bool = True) -> list[bytes]:
    """RFC 6962 section 2.1.2 PROOF(m, D[n]) = SUBPROOF(m, D[n], true)."""
    n = len(leaves)
    if m == n:
        return [] if complete else [mth(leaves)]
    k = 1 << (n - 1).bit_length() - 1
    if m <= k:
        return consistency(m, leaves[:k], complete) + [mth(leaves[k:])]
    return consistency(m - k, leaves[k:], False) + [mth(leaves[:k])]


def verify_consistency(m: int, n: int, old: bytes, new: bytes, proof: list[bytes]) -> bool:
    """RFC 9162 section 2.1.4.2, for 0 < m < n."""
    if m & (m - 1) == 0:
        proof = [old, *proof]
    if not proof:
        return False
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = sha256(b"\x01" + c + fr), sha256(b"\x01" + c + sr)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = sha256(b"\x01" + sr + c)
        fn, sn = fn >> 1, sn >> 1
    return fr == old and sr == new and sn == 0


def raw_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(name: str, sig_type: int, key: bytes) -> bytes:
    """signed-note: SHA-256(name || 0x0A || type || public key)[:4]."""
    return sha256(name.encode() + b"\n" + bytes([sig_type]) + key)[:4]


def read_vkey(vkey: str) -> tuple[str, int, bytes]:
    """signed-note verifier key: (name, signature type, raw public key), key ID checked."""
    name, hex_id, material = vkey.split("+", 2)
    raw = base64.b64decode(material, validate=True)
    assert key_id(name, raw[0], raw[1:]).hex() == hex_id
    return name, raw[0], raw[1:]


def checkpoint_text(origin: str, size: int, root: bytes) -> str:
    return f"{origin}\n{size}\n{b64(root)}\n"  # c2sp.org/tlog-checkpoint


def signed_note(text: str, name: str, key: Ed25519PrivateKey) -> bytes:
    """signed-note with one Ed25519 (type 0x01) signature line."""
    sig = key_id(name, 0x01, raw_key(key.public_key())) + key.sign(text.encode())
    return f"{text}\n{DASH} {name} {b64(sig)}\n".encode()


def add_checkpoint_body(old: int, proof: list[bytes], note: bytes) -> bytes:
    """c2sp.org/tlog-witness add-checkpoint request body."""
    return f"old {old}\n".encode() + b"".join(b64(h).encode() + b"\n" for h in proof) + b"\n" + note


def cosignature_line(name: str, key: Ed25519PrivateKey, text: str, timestamp: int) -> str:
    """c2sp.org/tlog-cosignature/v1, Ed25519."""
    message = f"cosignature/v1\ntime {timestamp}\n{text}".encode()
    data = (
        key_id(name, 0x04, raw_key(key.public_key()))
        + timestamp.to_bytes(8, "big")
        + key.sign(message)
    )
    return f"{DASH} {name} {b64(data)}\n"


def check_cosignature(line: str, text: str, name: str, key: bytes) -> int:
    """A tlog-cosignature/v1 line by (name, key) on ``text``: its timestamp, else AssertionError."""
    assert line.startswith(f"{DASH} {name} ") and line.endswith("\n"), line
    data = base64.b64decode(line[len(DASH) + len(name) + 2 : -1], validate=True)
    assert len(data) == 4 + 8 + 64 and data[:4] == key_id(name, 0x04, key)
    timestamp = int.from_bytes(data[4:12], "big")
    Ed25519PublicKey.from_public_bytes(key).verify(
        data[12:], f"cosignature/v1\ntime {timestamp}\n{text}".encode()
    )
    return timestamp


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


# -- raw HTTP over the peer API's TLS -------------------------------------------------------


def tls_client(me: Path, server_cert: bytes) -> ssl.SSLContext:
    """Mutual TLS as a configured peer: our certificate, the gateway's pinned."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(me / "keys" / "peer-tls.crt", me / "keys" / "peer-tls.key")
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=server_cert.decode())
    return ctx


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def post(port: int, ctx: ssl.SSLContext, body: bytes, path: str = "/add-checkpoint") -> Answer:
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    data = b""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(request)
        try:
            while chunk := tls.recv(65536):
                data += chunk
        except (ssl.SSLEOFError, ConnectionResetError):
            pass
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    assert len(payload) == int(headers["content-length"]), (head, payload)
    return Answer(int(status_line.split()[1]), headers, payload)


def refusals(gw: GatewayProcess, offset: int) -> list[dict]:
    return [e for e in log_events(gw, offset)[0] if e.get("event") == "peer request refused"]


# -- a gateway as a standard witness --------------------------------------------------------


def test_a_gateway_answers_add_checkpoint_as_the_spec_says(tmp_path):
    b, c, d = consortium(tmp_path, 3)  # B runs; this test plays C and D with their keys
    b_name, b_type, b_key = read_vkey(b.vkey)
    assert b_type == 0x01 and b_name == b.origin
    c_key = load_private_key(c.dir / "keys" / "gateway.key")
    d_key = load_private_key(d.dir / "keys" / "gateway.key")
    b_cert = (b.dir / "keys" / "peer-tls.crt").read_bytes()
    as_c, as_d = tls_client(c.dir, b_cert), tls_client(d.dir, b_cert)
    leaves = [b"c entry %d" % i for i in range(12)]

    def cp(
        size: int,
        leaf_list: list[bytes] = leaves,
        origin: str = c.origin,
        key: Ed25519PrivateKey = c_key,
    ) -> tuple[str, bytes]:
        text = checkpoint_text(origin, size, mth(leaf_list[:size]))
        return text, signed_note(text, origin, key)

    b.start()
    try:
        offset = b.log_path.stat().st_size
        expected: Counter[int] = Counter()

        def refused(answer: Answer, status: int, words: str = "") -> None:
            assert answer.status == status, (answer, status)
            assert answer.headers["content-type"].startswith("text/plain"), answer.headers
            assert words.encode() in answer.body, answer.body
            expected[status] += 1

        # the spec's own example request: a log B does not witness
        refused(post(b.peer_port, as_c, SPEC_REQUEST), 404, "not a log this witness follows")

        # first sight: no old checkpoint, so old size 0 and no proof
        text5, note5 = cp(5)
        before = int(time.time())
        ok = post(b.peer_port, as_c, add_checkpoint_body(0, [], note5))
        after = int(time.time())
        assert ok.status == 200, ok
        line = ok.body.decode()
        assert line.count("\n") == 1  # one cosignature line, Ed25519 cosignature/v1
        assert before <= check_cosignature(line, text5, b_name, b_key) <= after
        # the same line is a note signature: appended to the checkpoint, B's 0x04 key verifies it
        assert (note5 + ok.body).decode().endswith("\n" + line)

        # a stale old size: 409, the size B holds, text/x.tlog.size
        text7, note7 = cp(7)
        stale = post(b.peer_port, as_c, add_checkpoint_body(0, [], note7))
        assert (stale.status, stale.body, stale.headers["content-type"]) == (
            409,
            b"5\n",
            "text/x.tlog.size",
        )
        expected[409] += 1
        # ... so the client retries from 5 with the RFC 6962 proof
        ok = post(b.peer_port, as_c, add_checkpoint_body(5, consistency(5, leaves[:7]), note7))
        assert ok.status == 200 and check_cosignature(ok.body.decode(), text7, b_name, b_key)
        # the same checkpoint again is cosigned again (a fresh timestamp)
        ok = post(b.peer_port, as_c, add_checkpoint_body(7, [], note7))
        assert ok.status == 200 and check_cosignature(ok.body.decode(), text7, b_name, b_key)

        # proofs that do not show 10 extends 7: 422, nothing cosigned
        _, note10 = cp(10)
        good = consistency(7, leaves[:10])
        assert len(good) == 5 and verify_consistency(7, 10, mth(leaves[:7]), mth(leaves[:10]), good)
        flipped = [bytes([good[0][0] ^ 1]) + good[0][1:], *good[1:]]
        for proof in (
            flipped,
            [],
            good[:-1],
            [*good, good[0]],
            good[::-1],
            consistency(6, leaves[:10]),
            consistency(7, leaves[:9]),
        ):
            assert not verify_consistency(7, 10, mth(leaves[:7]), mth(leaves[:10]), proof)
            refused(
                post(b.peer_port, as_c, add_checkpoint_body(7, proof, note10)),
                422,
                "not shown consistent",
            )
        # a wrong old size is 409 with B's size, an old size above the checkpoint's 400
        for old in (0, 6, 8):
            stale = post(b.peer_port, as_c, add_checkpoint_body(old, good, note10))
            assert (stale.status, stale.body, stale.headers["content-type"]) == (
                409,
                b"7\n",
                "text/x.tlog.size",
            )
            expected[409] += 1
        refused(
            post(b.peer_port, as_c, add_checkpoint_body(11, [], note10)),
            400,
            "larger than the checkpoint",
        )

        # signatures: by another key under C's name, a corrupt one with C's key ID, none of C's
        text10 = checkpoint_text(c.origin, 10, mth(leaves[:10]))
        stranger = Ed25519PrivateKey.generate()
        refused(
            post(
                b.peer_port,
                as_c,
                add_checkpoint_body(7, good, signed_note(text10, c.origin, stranger)),
            ),
            403,
            "no valid signature",
        )
        corrupt = (
            note10[:-10]
            + (b"AAAAAAAA" if note10[-10:-2] != b"AAAAAAAA" else b"BBBBBBBB")
            + note10[-2:]
        )
        refused(
            post(b.peer_port, as_c, add_checkpoint_body(7, good, corrupt)),
            403,
            "no valid signature",
        )
        someone = signed_note(text10, "someone.example/log", stranger)
        refused(
            post(b.peer_port, as_c, add_checkpoint_body(7, good, someone)),
            403,
            "no valid signature",
        )
        # origins B does not witness: unknown ones, and its own log
        unknown = cp(3, origin="unknown.example/log", key=stranger)[1]
        refused(
            post(b.peer_port, as_c, add_checkpoint_body(0, [], unknown)),
            404,
            "not a log this witness follows",
        )
        own = cp(3, origin=b.origin, key=load_private_key(b.dir / "keys" / "gateway.key"))[1]
        refused(
            post(b.peer_port, as_c, add_checkpoint_body(0, [], own)),
            404,
            "not a log this witness follows",
        )

        # malformed bodies: 400
        hash_line = b64(good[0]) + "\n"
        for body in [
            b"",
            b"old 8",
            b"old 8\n",
            b"old 08\n\n" + note10,
            b"old -1\n\n" + note10,
            b"OLD 8\n\n" + note10,
            b"old 8\r\n\r\n" + note10,
            ("old 8\n" + hash_line).encode() + note10,
            ("old 8\n" + hash_line + "\n").encode(),
            b"old 8\n!!!!\n\n" + note10,
            ("old 8\n" + b64(bytes(31)) + "\n\n").encode() + note10,
            ("old 8\n" + hash_line * 64 + "\n").encode() + note10,
            b"old 8\n\nnot a checkpoint\n",
            b"old 8\n\n" + note10.replace(b"\n\n", b"\n"),
            b"old 8\n\n" + note10.replace(b"\n10\n", b"\n010\n"),
            b'{"note": "", "old_size": 8, "proof": []}',
        ]:
            refused(post(b.peer_port, as_c, body), 400)

        # the spec authenticates the checkpoint, not the sender: D relays C's checkpoint
        ok = post(b.peer_port, as_d, add_checkpoint_body(7, good, note10))
        assert ok.status == 200 and check_cosignature(ok.body.decode(), text10, b_name, b_key)

        # size 0: the empty tree's root, or 422
        not_empty = signed_note(checkpoint_text(d.origin, 0, mth([b"x"])), d.origin, d_key)
        refused(post(b.peer_port, as_d, add_checkpoint_body(0, [], not_empty)), 422, "empty tree")
        ok = post(b.peer_port, as_d, add_checkpoint_body(0, [], cp(0, [], d.origin, d_key)[1]))
        assert ok.status == 200
        # from size 0 the proof must be empty: 422
        refused(
            post(
                b.peer_port,
                as_d,
                add_checkpoint_body(0, [mth([b"x"])], cp(2, [b"x", b"y"], d.origin, d_key)[1]),
            ),
            422,
            "must be empty",
        )

        # B's record of C: size 10, the root of C's first ten leaves (persisted before answering)
        (row,) = query(b, "SELECT size, root FROM witness_state WHERE origin = ?", (c.origin,))
        assert (row[0], bytes(row[1])) == (10, mth(leaves[:10]))

        # C signs another root for size 10: 422, and B now holds that as equivocation evidence
        forked = [*leaves[:9], b"another entry 9"]
        refused(
            post(b.peer_port, as_c, add_checkpoint_body(10, [], cp(10, forked)[1])),
            422,
            "two roots",
        )
        assert query(b, "SELECT origin FROM evidence") == [(c.origin,)]
        refused(
            post(b.peer_port, as_c, add_checkpoint_body(10, consistency(10, leaves), cp(12)[1])),
            403,
            "flagged",
        )

        # one log line per refusal, naming the status and the reason; a stale size is info
        rows = refusals(b, offset)
        assert Counter(e["status"] for e in rows) == expected, rows
        assert all(e["reason"] and e["peer"] in (c.origin, d.origin) for e in rows)
        assert {e["level"] for e in rows if e["status"] == 409} == {"info"}
        assert {e["level"] for e in rows if e["status"] != 409} == {"warning"}
        assert "Traceback" not in b.log()
    finally:
        assert b.stop() == 0
    assert b.cli("verify").returncode == 0


# -- a gateway as a standard log ------------------------------------------------------------


@dataclass
class StandardWitness:
    """A tlog-witness written from the spec: one log, its latest cosigned size and root."""

    name: str
    key: Ed25519PrivateKey
    log_origin: str
    log_key: bytes
    size: int = 0
    root: bytes = b""
    seen: list[tuple[bytes, int]] = field(default_factory=list)  # (request body, status)

    def answer(self, body: bytes) -> tuple[int, bytes]:
        """(status, body): a cosignature line (200), the size (409), nothing otherwise."""
        status, answer = self._answer(body)
        self.seen.append((body, status))
        return status, answer

    def _answer(self, body: bytes) -> tuple[int, bytes]:
        head, sep, note = body.partition(b"\n\n")
        lines = head.decode().split("\n")
        if not sep or not lines[0].startswith("old "):
            return 400, b""
        old, proof = int(lines[0][4:]), [base64.b64decode(h, validate=True) for h in lines[1:]]
        text, sep, sigs = note.decode().rpartition("\n\n")
        text += "\n"
        origin, size, root = text.split("\n")[:3]
        size, root = int(size), base64.b64decode(root, validate=True)
        if origin != self.log_origin:
            return 404, b""
        kid = key_id(origin, 0x01, self.log_key)
        mine = [
            base64.b64decode(s.split(" ")[2])
            for s in sigs.splitlines()
            if s.split(" ")[1] == origin
        ]
        try:
            assert mine and all(s[:4] == kid for s in mine)
            for s in mine:
                Ed25519PublicKey.from_public_bytes(self.log_key).verify(s[4:], text.encode())
        except Exception:
            return 403, b""
        if old > size:
            return 400, b""
        if old != self.size:
            return 409, f"{self.size}\n".encode()
        if size == old:
            if self.root and root != self.root:
                return 422, b""
        elif old == 0:
            if proof:
                return 422, b""
        elif not verify_consistency(old, size, self.root, root, proof):
            return 422, b""
        self.size, self.root = size, root
        return 200, cosignature_line(self.name, self.key, text, int(time.time())).encode()


class WitnessServer:
    """``witness`` over HTTPS from its own thread: as a standard witness
    (``<prefix>/add-checkpoint``), or as a gateway from before the text protocol (JSON
    ``/v1/add-checkpoint`` only, and an empty answer to gossip's checkpoint request)."""

    def __init__(
        self,
        witness: StandardWitness,
        port: int,
        ctx: ssl.SSLContext,
        legacy: bool = False,
        prefix: str = "",
    ) -> None:
        self.witness, self.port, self.ctx, self.legacy, self.prefix = (
            witness,
            port,
            ctx,
            legacy,
            prefix,
        )
        self.requests: list[tuple[str, int]] = []  # (path, status) of every POST
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    @web.middleware
    async def _record(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        if request.method == "POST":
            self.requests.append((request.path, response.status))
        if isinstance(response, web.HTTPException):
            raise response
        return response

    async def _add_checkpoint(self, request: web.Request) -> web.Response:
        status, body = self.witness.answer(await request.read())
        if status == 409:
            return web.Response(status=409, body=body, headers={"Content-Type": "text/x.tlog.size"})
        return web.Response(status=status, body=body, content_type="text/plain")

    async def _add_checkpoint_json(self, request: web.Request) -> web.Response:
        """The JSON exchange of the gateways before the text one, as its docs had it."""
        req = await request.json()
        proof = [base64.b64decode(h) for h in req["proof"]]
        body = f"old {req['old_size']}\n".encode() + b"".join(
            b64(h).encode() + b"\n" for h in proof
        )
        status, answer = self.witness.answer(body + b"\n" + base64.b64decode(req["note"]))
        if status == 200:
            name, _, data = answer.decode().removeprefix(f"{DASH} ").strip().partition(" ")
            return web.json_response({"name": name, "cosignature": data})
        if status == 409:
            return web.json_response({"error": "stale", "size": int(answer)}, status=409)
        return web.json_response({"error": "refused"}, status=status)

    async def _checkpoints(self, request: web.Request) -> web.Response:
        return web.json_response({"checkpoints": {}, "evidence": []})

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._record])
        if self.legacy:
            app.router.add_post("/v1/add-checkpoint", self._add_checkpoint_json)
        else:
            app.router.add_post(self.prefix + "/add-checkpoint", self._add_checkpoint)
        app.router.add_get("/v1/checkpoints", self._checkpoints)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.ctx).start()

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def gateway_with_witness(
    tmp_path: Path,
    w_name: str,
    w_key: Ed25519PrivateKey,
    w_vkey: str,
    legacy: bool = False,
    interval: float = 0.1,
) -> tuple[GatewayProcess, StandardWitness, WitnessServer]:
    """Gateway A (not started) and a witness, configured as a hospital would: a standard
    witness under [[witnesses]] (its published vkey, its URL, here a pinned certificate; it
    asks no client certificate), a gateway from before under [[peers]] (mutual TLS)."""
    a = GatewayProcess(tmp_path / "GWA", ae_title="GWA")
    a.set("checkpoint_interval = 1.0", "checkpoint_interval = 0.3")
    a.set("gossip_interval = 1.0", "gossip_interval = 0.2")
    w_cert, w_tls_key, w_port = tmp_path / "w.crt", tmp_path / "w.key", free_port()
    create_tls_identity(w_cert, w_tls_key, w_name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(w_cert, w_tls_key)
    with open(a.config, "a") as f:
        if legacy:
            f.write(
                f'\n[[peers]]\norigin = "{w_name}"\naddress = "127.0.0.1:{w_port}"\n'
                f'vkey = "{w_vkey}"\ntls_cert = "{w_cert}"\n'
            )
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=(a.dir / "keys" / "peer-tls.crt").read_text())
        else:
            f.write(
                f'\n[[witnesses]]\nvkey = "{w_vkey}"\nurl = "https://127.0.0.1:{w_port}/w1"\n'
                f'tls_cert = "{w_cert}"\ninterval = {interval}\n'
            )
    a_name, _, a_key = read_vkey(a.vkey)
    witness = StandardWitness(w_name, w_key, a_name, a_key)
    return a, witness, WitnessServer(witness, w_port, ctx, legacy, prefix="" if legacy else "/w1")


def witness_warnings(gw: GatewayProcess) -> list[dict]:
    return [e for e in log_events(gw)[0] if e.get("event") == "witness did not cosign"]


def cosigned_by(gw: GatewayProcess, name: str, size: int) -> bool:
    held = newest_checkpoint(gw, gw.origin)
    return held is not None and held[0] == size and f"\n{DASH} {name} ".encode() in bytes(held[1])


def test_a_standard_witness_cosigns_a_gateways_log(tmp_path):
    # the witness: its name, key and vkey as a standard witness publishes them (type 0x04)
    w_name, w_key = "witness.example.org/w1", Ed25519PrivateKey.generate()
    w_raw = raw_key(w_key.public_key())
    w_vkey = f"{w_name}+{key_id(w_name, 0x04, w_raw).hex()}+{b64(bytes([0x04]) + w_raw)}"
    a, witness, server = gateway_with_witness(tmp_path, w_name, w_key, w_vkey)
    a_name = a.origin
    witness.log_origin = "another.example/log"  # its operator has not added A's log yet
    server.start()
    try:
        a.start()
        # 0. the witness does not follow A yet (404): one warning per try, retried, no harm
        wait_until(lambda: len(witness_warnings(a)) >= 2, what="two refused tries")
        assert all("status 404" in e["reason"] for e in witness_warnings(a)), witness_warnings(a)
        witness.log_origin = a_name
        # 1. first checkpoint: "old 0", no proof, TOFU; the cosignature lands on A's checkpoint
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "one", 2, seed="one")).returncode == 0
        )
        wait_until(lambda: cosigned_by(a, w_name, 2), what="the witness's cosignature on size 2")
        # (A's empty log may have been cosigned at size 0 first: the empty tree proves nothing)
        assert (b"old 0\n\n" + f"{a_name}\n2\n".encode(), 200) in [
            (body[: len(a_name) + 10], status) for body, status in witness.seen
        ]
        # 2. growth: "old 2", an RFC 6962 proof the witness checked by hand
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "two", 1, seed="two")).returncode == 0
        )
        wait_until(lambda: cosigned_by(a, w_name, 3), what="the witness's cosignature on size 3")
        assert any(
            body.startswith(b"old 2\n") and not body.startswith(b"old 2\n\n") and status == 200
            for body, status in witness.seen
        )
        # 3. after a restart A no longer knows the witness's size: 409 "3\n", then old 3
        assert a.stop() == 0
        a.start()
        seen_before = len(witness.seen)
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "three", 1, seed="three")).returncode
            == 0
        )
        wait_until(lambda: cosigned_by(a, w_name, 4), what="the witness's cosignature on size 4")
        after_restart = [
            (body.split(b"\n", 1)[0], status) for body, status in witness.seen[seen_before:]
        ]
        assert after_restart[:2] == [(b"old 0", 409), (b"old 3", 200)], after_restart
        statuses = [status for _, status in witness.seen]
        assert set(statuses[statuses.index(200) :]) == {200, 409}, statuses  # once it follows A
        assert {path for path, _ in server.requests} == {"/w1/add-checkpoint"}
        assert a.stop() == 0
    finally:
        if a.proc is not None and a.proc.poll() is None:
            a.stop()
        server.stop()
    assert "Traceback" not in a.log()
    # an auditor trusting A's key and the witness's published vkey sees it as a witness
    trust = tmp_path / "trust.txt"
    trust.write_text(f"{a.vkey}\n{w_vkey}\n")
    proof = tmp_path / "entry3.proof"
    assert a.cli("prove", "--entry", "3", "-o", str(proof)).returncode == 0
    checked = dicomledger("check-proof", str(proof), "--trust", str(trust))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"witnessed by {w_name}" in checked.stdout


def published_vkey(name: str, key: Ed25519PrivateKey) -> str:
    """A witness's vkey as standard witnesses publish it: type 0x04."""
    raw = raw_key(key.public_key())
    return f"{name}+{key_id(name, 0x04, raw).hex()}+{b64(bytes([0x04]) + raw)}"


def test_a_standard_witness_is_asked_at_most_once_per_interval(tmp_path):
    w_name, w_key = "witness.example.org/w2", Ed25519PrivateKey.generate()
    a, witness, server = gateway_with_witness(
        tmp_path, w_name, w_key, published_vkey(w_name, w_key), interval=4
    )
    server.start()
    try:
        a.start()
        assert (
            a.storescu(*dicomdata.make_mr_series(tmp_path / "first", 1, seed="first")).returncode
            == 0
        )
        wait_until(lambda: cosigned_by(a, w_name, 1), what="the witness's cosignature on size 1")
        asked, started = len(witness.seen), time.monotonic()
        for i in range(3):  # three more checkpoints (one per 0.3 s checkpoint interval)
            assert (
                a.storescu(
                    *dicomdata.make_mr_series(tmp_path / f"more{i}", 1, seed=f"more{i}")
                ).returncode
                == 0
            )
            time.sleep(0.4)
        wait_until(lambda: cosigned_by(a, w_name, 4), what="the witness's cosignature on size 4")
        elapsed = time.monotonic() - started
        assert a.stop() == 0
    finally:
        if a.proc is not None and a.proc.poll() is None:
            a.stop()
        server.stop()
    # the later checkpoints coalesced: no more requests than whole intervals allow
    later = [body.split(b"\n\n", 1)[1].split(b"\n")[1] for body, _ in witness.seen[asked:]]
    assert 1 <= len(later) <= 1 + int(elapsed / 4), (later, elapsed)
    assert later[-1] == b"4"


def test_a_gateway_from_before_the_text_protocol_still_cosigns(tmp_path):
    """L speaks only the JSON add-checkpoint of earlier gateways: A's text request gets a 404,
    A asks in JSON from then on, and L's cosignatures keep landing on A's checkpoints."""
    l_name, l_key = "gwl.test/dicomledger", Ed25519PrivateKey.generate()
    l_raw = raw_key(l_key.public_key())
    l_vkey = f"{l_name}+{key_id(l_name, 0x01, l_raw).hex()}+{b64(bytes([0x01]) + l_raw)}"  # as init writes it
    a, _, server = gateway_with_witness(tmp_path, l_name, l_key, l_vkey, legacy=True)
    server.start()
    try:
        a.start()
        for size, seed, images in ((2, "one", 2), (3, "two", 1)):
            assert (
                a.storescu(*dicomdata.make_mr_series(tmp_path / seed, images, seed=seed)).returncode
                == 0
            )
            wait_until(
                lambda size=size: cosigned_by(a, l_name, size),
                what=f"L's cosignature on size {size}",
            )
        assert a.stop() == 0
    finally:
        if a.proc is not None and a.proc.poll() is None:
            a.stop()
        server.stop()
    assert server.requests[0] == ("/add-checkpoint", 404)
    assert server.requests[1:] and {path for path, _ in server.requests[1:]} == {
        "/v1/add-checkpoint"
    }
    assert {status for _, status in server.requests[1:]} == {200}
    assert "Traceback" not in a.log()
