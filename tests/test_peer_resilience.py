"""Peers that are hostile, slow or strangers: a gateway (a real process) stays bounded, keeps
witnessing with the others, and says in its log whom it refused.

* A keyed peer announcing a validly signed checkpoint of size 2**40 whose first 1,024 leaves
  are real entries (and the rest hashes nobody can serve) is pulled in bounded chunks: the
  verified prefix is stored, chunk by chunk; the first chunk that cannot be shown a prefix
  of the checkpoint is refused; the peer is backed off, exponentially, one log line each.
* A peer that never answers does not delay another peer's cosignature.
* A TLS handshake the peer API refuses (unknown certificate, none, plain TCP, a probe that
  hangs up) is logged once, with the client's address.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from dicomledger.ledger import merkle
from dicomledger.ledger.checkpoint import Checkpoint, format_checkpoint
from dicomledger.ledger.entries import sign_entry
from dicomledger.ledger.identity import load_key_file
from dicomledger.ledger.note import Note, format_note, parse_note, sign_note_text
from dicomledger.ledger.peer_tls import client_context, create_tls_identity, server_context
from tests import dicomdata
from tests.conftest import GatewayProcess, consortium
from tests.test_consortium import newest_checkpoint, wait_until
from tests.test_peer_forgery import log_events, log_of, query

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

HUGE = 2**40  # the size the hostile peer's checkpoint claims
REAL_LEVEL = 10
REAL = 1 << REAL_LEVEL  # leaves under the hostile checkpoint's root that are real entries
SERVED = REAL + 176  # valid, chained entries it serves; those past REAL are in no checkpoint
PER_RESPONSE = 50  # entries per /v1/entries answer (an honest gateway sends up to 1,000)
LIMIT = 64 * 1024  # B's max_message_bytes: the size of one pull chunk
BACKOFF_MAX = 1.6  # B's backoff_max; its gossip_interval is 0.2 (tests.conftest.consortium)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class PeerServer:
    """An HTTPS peer API (aiohttp, pinned mutual TLS) on its own event loop in a thread."""

    def __init__(self, port: int, ctx: ssl.SSLContext, routes: list[web.RouteDef]) -> None:
        self.port, self.ctx, self.routes = port, ctx, routes
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="peer-server", daemon=True
        )
        self._runner: web.AppRunner | None = None

    async def _start(self) -> None:
        app = web.Application()
        app.add_routes(self.routes)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ctx).start()

    def start(self) -> None:
        self._thread.start()
        self.run(self._start())

    def run(self, coro: Awaitable) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def stop(self) -> None:
        if self._runner is not None:
            self.run(self._runner.cleanup())
            self._runner = None
        if self._thread.is_alive():
            for task in asyncio.all_tasks(self.loop):
                self.loop.call_soon_threadsafe(task.cancel)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


def peer_identity(
    gw: GatewayProcess, pinned: GatewayProcess
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts with ``gw``'s peer identity, pinning ``pinned``'s."""
    cert, key = gw.dir / "keys" / "peer-tls.crt", gw.dir / "keys" / "peer-tls.key"
    other = (pinned.dir / "keys" / "peer-tls.crt").read_bytes()
    return server_context(cert, key, [other]), client_context(cert, key, [other])


# -- 14: a keyed peer announcing a checkpoint of size 2**40 -----------------------------------


class HugeLog:
    """C's log as the hostile C presents it: a checkpoint of size 2**40 signed with C's real
    key whose first REAL leaves are real entries; every other complete subtree on the left
    spine is a hash of nothing. Consistency proofs from sizes up to REAL verify; beyond REAL
    no one could make one (it would need leaves under those hashes)."""

    def __init__(self, origin: str, key) -> None:
        self.origin, self.key = origin, key
        self.entries: list[bytes] = []
        prev = bytes(32)
        for i in range(SERVED):
            pseudonym = hashlib.sha256(b"hostile %d" % i).hexdigest()
            payload = {
                "patient": pseudonym,
                "study": pseudonym,
                "series": pseudonym,
                "instance": pseudonym,
                "hash_method": "pixel",
                "sha256": hashlib.sha256(b"pixels %d" % i).hexdigest(),
                "decoded_sha256": None,
                "frames": 1,
                "frame_root": None,
                "sop_class": "1.2.840.10008.5.1.4.1.1.4",
                "transfer_syntax": "1.2.840.10008.1.2.1",
                "calling_ae": "STORESCU",
            }
            _, data = sign_entry(
                origin=origin,
                index=i,
                prev=prev,
                time_ms=1_763_890_000_000 + i,
                kind="image-anchored",
                payload=payload,
                private_key=key,
            )
            self.entries.append(data)
            prev = merkle.leaf_hash(data)
        self.leaves = [merkle.leaf_hash(e) for e in self.entries[:REAL]]
        root = merkle.root_of_leaf_hashes(self.leaves)
        for level in range(REAL_LEVEL, 40):
            root = merkle.node_hash(root, self._nothing(level))
        self.root = root
        self.note = self.checkpoint(HUGE, root)

    @staticmethod
    def _nothing(level: int) -> bytes:
        return hashlib.sha256(b"no leaves under this node %d" % level).digest()

    def checkpoint(self, size: int, root: bytes | None = None) -> bytes:
        """Another checkpoint signed with C's key: of the real leaves, or with ``root``."""
        root = merkle.root_of_leaf_hashes(self.leaves[:size]) if root is None else root
        text = format_checkpoint(Checkpoint(self.origin, size, root))
        return format_note(Note(text, (sign_note_text(text, self.origin, self.key),)))

    def _node(self, level: int, index: int) -> bytes:
        if (index + 1) << level <= REAL:
            return merkle.root_of_leaf_hashes(self.leaves[index << level : (index + 1) << level])
        assert index == 1 and level >= REAL_LEVEL, (level, index)
        return self._nothing(level)

    def consistency(self, old: int) -> list[bytes]:
        plan = merkle.consistency_proof_plan(old, HUGE)
        if old > REAL:  # the best a liar can do: hashes of the right count
            return [hashlib.sha256(b"made up %d %d" % (old, i)).digest() for i in range(len(plan))]
        return [merkle.fold_range([self._node(*n) for n in nodes]) for nodes in plan]


@dataclass
class PullLog:
    """What the hostile peer saw of B's pulls: (time, path, start or old)."""

    requests: list[tuple[float, str, int]] = field(default_factory=list)
    unverified: int = 0  # entry bytes served since B last asked for a consistency proof
    peak_unverified: int = 0
    announced: int = 0


def hostile_routes(
    log: HugeLog, seen: PullLog, gossiped: Callable[[], bytes] | None = None
) -> list[web.RouteDef]:
    """The hostile C's peer API; its gossip offers ``gossiped()`` (else the huge note)."""

    async def checkpoints(request: web.Request) -> web.Response:
        note = gossiped() if gossiped else log.note
        return web.json_response({"checkpoints": {log.origin: b64(note)}, "evidence": []})

    async def entries(request: web.Request) -> web.Response:
        start, end = int(request.query["start"]), int(request.query["end"])
        served = log.entries[start : min(end, start + PER_RESPONSE)]
        seen.requests.append((time.monotonic(), "entries", start))
        seen.unverified += sum(len(e) for e in served)
        seen.peak_unverified = max(seen.peak_unverified, seen.unverified)
        return web.json_response({"entries": [b64(e) for e in served]})

    async def consistency(request: web.Request) -> web.Response:
        old, new = int(request.query["old"]), int(request.query["new"])
        seen.requests.append((time.monotonic(), "consistency", old))
        seen.unverified = 0
        if new <= REAL:
            proof = merkle.consistency_proof(old, new, log.leaves[:new])
        elif new == HUGE:
            proof = log.consistency(old)
        else:
            return web.json_response({"error": "no such sizes held"}, status=404)
        return web.json_response({"proof": [b64(h) for h in proof]})

    async def add_checkpoint(request: web.Request) -> web.Response:
        return web.json_response({"error": "not cosigning"}, status=503)

    return [
        web.get("/v1/checkpoints", checkpoints),
        web.get("/v1/entries", entries),
        web.get("/v1/consistency", consistency),
        web.post("/v1/add-checkpoint", add_checkpoint),
    ]


async def announce_forever(url: str, ctx: ssl.SSLContext, note: bytes, seen: PullLog) -> None:
    """Ask B to cosign the huge checkpoint every 0.1 s: each cosignature is an announcement
    that makes B pull from us, unless B has backed us off."""
    old = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        while True:
            try:
                body = {"note": b64(note), "old_size": old, "proof": []}
                async with session.post(url + "/v1/add-checkpoint", json=body) as resp:
                    answer = await resp.json()
                    if resp.status == 409 and "size" in answer:
                        old = answer["size"]
                    elif resp.status == 200:
                        old = HUGE
                        seen.announced += 1
            except (aiohttp.ClientError, OSError, ValueError):
                pass
            await asyncio.sleep(0.1)


def c_rows(gw: GatewayProcess, origin: str) -> list[dict]:
    return [e for e in log_events(gw)[0] if e.get("peer") == origin or e.get("origin") == origin]


def test_a_huge_checkpoint_is_pulled_in_bounded_chunks_and_a_lying_peer_is_backed_off(tmp_path):
    b, c = consortium(tmp_path, 2)
    b.set("fanout = 3", f"fanout = 3\nmax_message_bytes = {LIMIT}")
    b.set("backoff_max = 300.0", f"backoff_max = {BACKOFF_MAX}")
    huge = HugeLog(c.origin, load_key_file(c.dir / "keys" / "gateway.key"))
    # the hostile peer's tree really is what its signature commits to, for sizes up to REAL
    merkle.verify_consistency(
        100, HUGE, merkle.root_of_leaf_hashes(huge.leaves[:100]), huge.root, huge.consistency(100)
    )
    server_ctx, client_ctx = peer_identity(c, b)
    seen = PullLog()
    hostile = PeerServer(c.peer_port, server_ctx, hostile_routes(huge, seen))
    hostile.start()
    announcer = None
    try:
        b.start()
        announcer = asyncio.run_coroutine_threadsafe(
            announce_forever(f"https://127.0.0.1:{b.peer_port}", client_ctx, huge.note, seen),
            hostile.loop,
        )

        def backoffs() -> list[dict]:
            return [e for e in c_rows(b, c.origin) if "backoff_seconds" in e]

        # five back-offs (four complete waits to measure), unless B holds more than a chunk
        wait_until(
            lambda: len(backoffs()) >= 5 or seen.peak_unverified > 2 * LIMIT,
            timeout=90,
            what="B to back off the hostile peer five times",
        )
        assert seen.peak_unverified <= 2 * LIMIT, (
            f"B took {seen.peak_unverified} bytes of entries before verifying any (one chunk is "
            f"at most {2 * LIMIT})"
        )
        assert b.stop() == 0
    finally:
        if announcer is not None:
            announcer.cancel()
        hostile.stop()
        if b.proc is not None and b.proc.poll() is None:
            b.stop()

    # B stored the verified prefix, chunk by chunk: whole chunks up to the real leaves
    stored, checkpoints = log_of(b, c.origin)
    replicated = [e for e in c_rows(b, c.origin) if e.get("event") == "replicated"]
    assert len(replicated) >= 5, replicated
    assert all(e["held_bytes"] <= 2 * LIMIT for e in replicated), replicated
    assert [e["size"] for e in replicated] == sorted({e["size"] for e in replicated})
    assert REAL - 2 * PER_RESPONSE < len(stored) <= REAL
    assert stored == huge.entries[: len(stored)]
    assert checkpoints == {}  # no checkpoint of that size was ever signed
    assert b.cli("verify").returncode == 0

    # every pull after that failed; each failure started one back-off, logged once, doubling
    rows = c_rows(b, c.origin)
    backed_off = [e for e in rows if "backoff_seconds" in e]
    assert [e["backoff_seconds"] for e in backed_off[:5]] == [0.2, 0.4, 0.8, 1.6, 1.6]
    assert all(
        e["event"] == "peer message rejected" and "not shown to be a prefix" in e["reason"]
        for e in backed_off
    ), backed_off
    assert {e["event"] for e in rows} == {"replicated", "peer message rejected"}, rows
    attempts = [
        i
        for i, (_, kind, start) in enumerate(seen.requests)
        if kind == "entries" and start == len(stored)
    ]
    assert len(backed_off) <= len(attempts) <= len(backed_off) + 1
    # ... and B asked nothing of it until each back-off had passed, announcements or not
    for n, delay in enumerate(e["backoff_seconds"] for e in backed_off[:4]):
        failed_at = seen.requests[attempts[n + 1] - 1][0]  # the last request of attempt n
        assert seen.requests[attempts[n + 1]][0] - failed_at >= delay, (n, delay)
    assert seen.announced > 20  # it announced all along
    text = b.log()
    assert "Traceback" not in text and "gossip round failed" not in text


def test_a_checkpoint_inside_a_pulled_prefix_is_checked_against_it(tmp_path):
    """B holds a prefix of C's log verified against the huge checkpoint; C then gossips two
    smaller checkpoints: one over its real entries (B keeps it: its entries now have a
    checkpoint of their own), one with another root (refused: it contradicts what B holds)."""
    b, c = consortium(tmp_path, 2)
    b.set("fanout = 3", f"fanout = 3\nmax_message_bytes = {LIMIT}")
    b.set("backoff_max = 300.0", f"backoff_max = {BACKOFF_MAX}")
    huge = HugeLog(c.origin, load_key_file(c.dir / "keys" / "gateway.key"))
    real, forged = (
        huge.checkpoint(512),
        huge.checkpoint(700, hashlib.sha256(b"another history").digest()),
    )
    server_ctx, client_ctx = peer_identity(c, b)
    seen = PullLog()
    turn = iter(range(10**9))

    def gossiped() -> bytes:  # the huge one until B holds 700 entries, then the two in turn
        pulled = max((start for _, kind, start in seen.requests if kind == "entries"), default=0)
        return huge.note if pulled < 700 else (real, forged)[next(turn) % 2]

    hostile = PeerServer(c.peer_port, server_ctx, hostile_routes(huge, seen, gossiped))
    hostile.start()
    announcer = None
    try:
        b.start()
        announcer = asyncio.run_coroutine_threadsafe(
            announce_forever(f"https://127.0.0.1:{b.peer_port}", client_ctx, huge.note, seen),
            hostile.loop,
        )

        def refused_forged() -> bool:
            return any(
                "size 700 does not match the" in str(e.get("reason")) for e in c_rows(b, c.origin)
            )

        wait_until(
            lambda: (
                512 in log_of(b, c.origin)[1]
                and len(log_of(b, c.origin)[0]) > 700
                and refused_forged()
            ),
            timeout=60,
            what="B to keep C's size-512 checkpoint and refuse size 700",
        )
        assert b.stop() == 0
    finally:
        if announcer is not None:
            announcer.cancel()
        hostile.stop()
        if b.proc is not None and b.proc.poll() is None:
            b.stop()
    stored, checkpoints = log_of(b, c.origin)
    assert set(checkpoints) == {512} and parse_note(checkpoints[512]).text == parse_note(real).text
    chunk_ends = [e["size"] for e in c_rows(b, c.origin) if e.get("event") == "replicated"]
    assert 512 not in chunk_ends and max(chunk_ends) > 700  # 512 was checked within the prefix
    assert stored == huge.entries[: len(stored)]
    assert query(b, "SELECT COUNT(*) FROM evidence") == [(0,)]
    assert b.cli("verify").returncode == 0


# -- 15: a peer that never answers --------------------------------------------------------------


def cosigned_by(gw: GatewayProcess, witness: str, size: int) -> bool:
    held = newest_checkpoint(gw, gw.origin)
    return (
        held is not None
        and held[0] >= size
        and any(s.name == witness for s in parse_note(bytes(held[1])).signatures)
    )


def test_a_silent_peer_does_not_delay_another_peers_cosignature(tmp_path):
    a, b, s = consortium(tmp_path, 3)
    release = threading.Event()
    asked: list[str] = []

    async def never(request: web.Request) -> web.Response:
        asked.append(request.path)
        while not release.is_set():  # A gives up first (its request timeout is 30 s)
            await asyncio.sleep(0.1)
        return web.json_response({"error": "too late"}, status=503)

    routes = [
        web.get("/v1/checkpoints", never),
        web.get("/v1/entries", never),
        web.get("/v1/consistency", never),
        web.post("/v1/add-checkpoint", never),
    ]
    silent = PeerServer(s.peer_port, peer_identity(s, a)[0], routes)
    silent.start()
    try:
        a.start()
        b.start()
        for size in (1, 2):  # each new checkpoint of A: B cosigns it promptly, S sits on it
            started = time.monotonic()
            files = dicomdata.make_mr_series(tmp_path / f"mr{size}", 1, seed=f"mr{size}")
            assert a.storescu(*files).returncode == 0
            wait_until(
                lambda size=size: cosigned_by(a, b.origin, size),
                timeout=45,
                what=f"B's cosignature on A's checkpoint of size {size}",
            )
            took = time.monotonic() - started
            assert took < 8, (
                f"B's cosignature took {took:.1f} s while S sat on A's requests (30 s timeout)"
            )
        assert "/v1/add-checkpoint" in asked  # S was asked too
    finally:
        release.set()
        for gw in (a, b):
            if gw.proc is not None and gw.proc.poll() is None:
                gw.stop()
        silent.stop()
    assert "Traceback" not in a.log() and "gossip round failed" not in a.log()


# -- 22: refused TLS handshakes are logged ------------------------------------------------------


def attempt(port: int, ctx: ssl.SSLContext | None, send: bytes | None) -> str:
    """One connection to the peer API from a port we know; returns our address."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    host, port_ = sock.getsockname()[:2]
    address = f"{host}:{port_}"
    try:
        if ctx is not None:
            try:
                tls = ctx.wrap_socket(sock)
                tls.sendall(b"GET /v1/checkpoints HTTP/1.1\r\nHost: peer\r\n\r\n")
                tls.recv(1024)  # the server's alert, or EOF
            except (ssl.SSLError, OSError):
                pass
        elif send is not None:
            sock.sendall(send)
            try:
                sock.recv(1024)
            except OSError:
                pass
    finally:
        sock.close()
    return address


def test_refused_peer_tls_handshakes_are_logged_with_the_address(tmp_path):
    b, c = consortium(tmp_path, 2)
    b_cert = (b.dir / "keys" / "peer-tls.crt").read_bytes()
    stranger_cert, stranger_key = tmp_path / "stranger.crt", tmp_path / "stranger.key"
    create_tls_identity(stranger_cert, stranger_key, c.origin)  # even one naming a real peer
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
    cases: list[tuple[str, Callable[[], str], str]] = [
        (
            "unknown certificate",
            lambda: attempt(
                b.peer_port, client_context(stranger_cert, stranger_key, [b_cert]), None
            ),
            "client certificate not accepted",
        ),
        ("no certificate", lambda: attempt(b.peer_port, no_cert, None), "no client certificate"),
        (
            "plain HTTP",
            lambda: attempt(
                b.peer_port, None, b"GET /v1/checkpoints HTTP/1.1\r\nHost: peer\r\n\r\n"
            ),
            "plain HTTP, not TLS",
        ),
        (
            "connect and hang up",
            lambda: attempt(b.peer_port, None, None),
            "connection closed during the TLS handshake",
        ),
    ]
    b.start(accept_local_tip=True)  # C never runs to confirm B's log
    try:
        addresses = {name: (run(), reason) for name, run, reason in cases}

        def refused() -> list[dict]:
            return [e for e in log_events(b)[0] if e.get("event") == "peer TLS handshake refused"]

        wanted = {address for address, _ in addresses.values()}
        wait_until(
            lambda: wanted <= {e.get("address") for e in refused()},
            timeout=20,
            what="a refusal line for every attempt",
        )
        # the real peer C still gets in, and is not reported
        _, c_client = peer_identity(c, b)

        async def as_c() -> int:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=c_client)
            ) as session:
                async with session.get(f"https://127.0.0.1:{b.peer_port}/v1/checkpoints") as resp:
                    await resp.read()
                    return resp.status

        assert asyncio.run(as_c()) == 200
        time.sleep(0.5)
    finally:
        b.stop()
    lines = refused()
    for name, (address, reason) in addresses.items():
        mine = [e for e in lines if e.get("address") == address]
        assert len(mine) == 1, (name, address, mine)
        assert mine[0]["level"] == "warning" and reason in mine[0]["reason"], (name, mine[0])
    assert len(lines) == len(addresses), lines  # C's connection was not reported
    events, other = log_events(b)
    assert not other and "Traceback" not in b.log()


@pytest.fixture(autouse=True)
def _no_stray_threads():
    yield
    assert not [t for t in threading.enumerate() if t.name == "peer-server" and t.is_alive()]
