"""Replication, witnessing and equivocation detection between the gateways of a consortium:
the peer API's client side and the service that runs both sides (the server side, which
answers the requests below, is ``peer_api.py``).

Peer API (HTTPS, mutual TLS, each side pinning the other's certificate; JSON bodies but one):

  GET  /v1/checkpoints                   newest checkpoint note we hold per origin (with
                                         cosignatures), the equivocation evidence in force,
                                         and the checkpoint we last cosigned per origin
  GET  /v1/entries?origin=O&start=S&end=E   entries [S, E) of O's log we hold (at most 1000)
  GET  /v1/consistency?origin=O&old=M&new=N consistency proof of O's log from M to N
  GET  /v1/key-changes?origin=O&start=S  O's key-rotation and key-replacement entries we hold
                                         from index S (to follow its key chain ahead of a pull)
  POST /add-checkpoint                   C2SP tlog-witness add-checkpoint, byte for byte (text
                                         body and answers, ``witness.parse_add_checkpoint``)
  POST /v1/add-checkpoint                the same in JSON, {"note", "old_size", "proof"}: 200
                                         {"cosignature"} or an error status; kept for gateways
                                         from before the text one

A gateway asks its peers to cosign with the text request, as any tlog-witness client would,
and falls back to JSON, for good, for a peer that answers 404 to it (a gateway from before).
Standard witnesses outside the consortium (``[[witnesses]]``) get the same text requests, at
most one per their ``interval``, over ordinary HTTPS; they hold no log, so nothing else.

Announcements: when this gateway signs a new checkpoint it asks every peer at once to cosign
it; a peer that cosigns a checkpoint larger than its copy of our log pulls the new entries
from us straight away. So entries spread within about one checkpoint interval, and the
gossip rounds below repair whatever an announcement missed (a peer down, a lost request).
Every peer has its own announcer task, and gossip rounds run side by side, each request with
its own timeout: a slow or silent peer delays only its own exchanges, never another peer's
cosignature.

Heartbeat: a peer's cosignature on our newest checkpoint is renewed once it is older than
``heartbeat_interval``, even when the log has not grown: a fresh cosignature timestamp
shows that the log was alive and unchanged at that time.

Anti-entropy: every ``gossip_interval`` seconds a gateway asks ``fanout`` random peers (not
already in a round with us) for their checkpoints, pulls whatever entries it lacks (from that
peer, which may relay any origin's log), stores them only if they verify (``ReplicaWriter``),
asks each peer to cosign its own newest checkpoint, and checks every signed checkpoint it sees
against the ones it holds: two that cannot both be true become evidence, which is kept,
served to every peer and flags the origin (its new entries are no longer replicated).

Pulls are bounded: entries are fetched in chunks of about ``max_message_bytes``; each chunk is
verified against the signed checkpoint (a consistency proof from the chunk's end when it stops
short of it) and stored before the next is fetched, so a peer announcing a huge checkpoint
makes us hold one chunk at a time, never its whole log. A peer whose entries do not verify is
backed off: no pull from it (nor gossip round with it) for ``gossip_interval`` seconds,
doubling with each consecutive failure up to ``backoff_max``; one log line per back-off.

Start-up (``confirm_own_tip``): before a gateway appends anything after a start, its peers
confirm its own log's tip: each is asked for the newest checkpoint of our origin it holds and
the one it last cosigned (signed by our key, so no peer can invent one); entries we lack (a
restore from a backup loses them) are fetched back and verified like any replica; every
checkpoint seen must then be of the log we hold. Gossip, announcements and witnesses start
only after it (``start_gossip``), so no checkpoint of a stale tip is ever offered.

Nothing a peer sends is stored before it verifies; bad input is logged with its reason.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dicomledger.ledger.checkpoint import Checkpoint, CheckpointError, parse_checkpoint
from dicomledger.ledger.consortium import (
    ConsortiumState,
    PeerStatus,
    evidence_digest,
)
from dicomledger.ledger.entries import (
    FLAG_CLEARED,
    KEY_ROTATION,
    EntryError,
    decode_entry,
    verify_entry_signature,
)
from dicomledger.ledger.identity import Identity
from dicomledger.ledger.keychain import (
    KeyChange,
    KeyChangeError,
    Statement,
    changes_key_of,
    check_rotation,
    check_statement,
    parse_statement,
    statement_of,
)
from dicomledger.ledger.log import (
    LedgerStore,
    LedgerStoreError,
    LogWriter,
    ReplicaError,
    ReplicaWriter,
)
from dicomledger.ledger.note import (
    Note,
    NoteError,
    Signature,
    cosignature_timestamp,
    parse_note,
    parse_signature_lines,
    verifier_key,
    verify_cosignature,
    verify_note_signature,
)
from dicomledger.ledger.peer_api import (
    ADD_CHECKPOINT_PATH,
    CONSORTIUM_HEADER,
    ConsortiumMismatch,
    ConsortiumSettings,
    PeerApi,
    PeerProtocolError,
    Traffic,
    Witnessed,
    b64,
    consortium_value,
    now_iso,
    unb64,
)
from dicomledger.ledger.peer_settings import PeeringSettings, PeerSettings, WitnessSettings
from dicomledger.ledger.peer_tls import (
    client_context,
)
from dicomledger.ledger.tip import OwnTip, flag_cleared_payload
from dicomledger.ledger.witness import (
    SIZE_CONTENT_TYPE,
    WitnessError,
    check_equivocation,
    format_add_checkpoint,
    format_evidence,
    parse_evidence,
    parse_size,
)

log = structlog.get_logger("dicomledger.gossip")

# Seconds one peer gets to answer while a start confirms our own log's tip: a silent peer
# must not hold the start for the 30 s of an ordinary request.
STARTUP_REQUEST_TIMEOUT = 5.0


class EntriesRefused(PeerProtocolError):
    """Entries a peer served did not verify against the signed checkpoint (or could not be
    verified: no usable consistency proof). The peer is backed off."""


async def _first_of(events: Sequence[asyncio.Event], timeout: float) -> None:
    """Return when any of ``events`` is set, or after ``timeout`` seconds."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _witness_tls(witness: WitnessSettings) -> ssl.SSLContext | bool:
    """TLS for a standard witness: its pinned certificate, or the system's CAs (and its host
    name); no client certificate, the spec authenticates nothing but the checkpoint."""
    if witness.tls_cert is None:
        return True  # aiohttp's default: system CAs, host name checked
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # identity is the pinned certificate, as for peers
    ctx.load_verify_locations(cadata=witness.tls_cert.decode())
    return ctx


def _read_text_answer(status: int, content_type: str, raw: bytes) -> Witnessed:
    """A tlog-witness add-checkpoint answer: signature lines (200), the witness's size in
    ``text/x.tlog.size`` (409), or an error status with whatever text came with it."""
    try:
        if status == 200:
            return Witnessed(200, cosignatures=parse_signature_lines(raw))
        if status == 409 and content_type == SIZE_CONTENT_TYPE:
            return Witnessed(409, size=parse_size(raw))
    except (NoteError, WitnessError) as exc:
        raise PeerProtocolError(f"add-checkpoint answer {status}: {exc}") from None
    return Witnessed(status, raw[:300].decode("utf-8", errors="replace").strip())


def _read_json_answer(status: int, body: Any) -> Witnessed:
    """Our earlier JSON add-checkpoint answer (kept for gateways from before the text one)."""
    if not isinstance(body, dict):
        return Witnessed(status, f"{body!r}"[:300])
    if status == 200:
        raw = unb64(body.get("cosignature"), "cosignature")
        return Witnessed(200, cosignatures=(Signature(str(body.get("name")), raw[:4], raw[4:]),))
    size = body.get("size")
    if status == 409 and isinstance(size, int) and not isinstance(size, bool):
        return Witnessed(409, size=size)
    return Witnessed(status, str(body.get("error"))[:300])


@dataclass
class _Peer:
    config: PeerSettings
    cosigned_size: int = 0  # the size this peer last cosigned for our log
    cosign_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # announce vs gossip round
    announce: asyncio.Event = field(default_factory=asyncio.Event)  # a new checkpoint to announce
    announcer: asyncio.Task[None] | None = None
    gossip_round: asyncio.Task[None] | None = None  # the round in progress with this peer
    failures: int = 0  # consecutive pulls whose entries did not verify
    backoff_until: float = 0.0  # time.monotonic() before which we do not pull from this peer
    json_witness: bool = (
        False  # it answered 404 to the text add-checkpoint: a gateway from before it
    )
    session: None = None  # peers share the service's pinned mutual-TLS session

    @property
    def name(self) -> str:
        return self.config.origin

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.config.public_key

    @property
    def url(self) -> str:
        return f"https://{self.config.host}:{self.config.port}"


@dataclass
class _Witness:
    """A standard tlog-witness outside the consortium ([[witnesses]]): asked to cosign each
    new checkpoint of ours, and again once its cosignature is older than heartbeat_interval.
    It holds no log: no gossip, no pulls."""

    config: WitnessSettings
    session: aiohttp.ClientSession | None = None  # its own: system CAs or its pinned certificate
    cosigned_size: int = 0
    cosign_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    announce: asyncio.Event = field(default_factory=asyncio.Event)
    announcer: asyncio.Task[None] | None = None
    failures: int = 0  # consecutive requests that got no cosignature
    json_witness: bool = False  # standard witnesses speak the text protocol only

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.config.public_key

    @property
    def url(self) -> str:
        return self.config.url


class PeerService:
    def __init__(
        self,
        config: PeeringSettings,
        identity: Identity,
        store: LedgerStore,
        own_log: LogWriter,
        *,
        on_equivocation: Callable[[str, str], None] | None = None,  # (origin, reported by)
        on_tls_refused: Callable[[str, str], None] | None = None,  # (address, reason)
        secret_check: str
        | None = None,  # pseudonym.secret_check of our secret; None: not exchanged
    ) -> None:
        self.config = config
        self._on_equivocation = on_equivocation
        self.identity = identity
        self.store = store
        self.own_log = own_log
        self.state = ConsortiumState(store)
        self.replicas = ReplicaWriter(store, policy=config.witness_policy)
        self.peers = {p.origin: _Peer(p) for p in config.peers}
        self.witnesses = [_Witness(w) for w in config.witnesses]
        # the logs of the consortium, ours included; each verified with its key chain, which
        # starts at the key [[peers]] lists (its first key) and follows its log's key changes
        self._origins = {identity.origin, *(p.origin for p in config.peers)}
        self._origin_locks: dict[str, asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._pull_wanted: dict[str, tuple[_Peer, bytes]] = {}
        self._statements_seen: list[
            tuple[bytes, str]
        ] = []  # key replacements recorded in pulled entries
        self._pulls: dict[str, asyncio.Task[None]] = {}
        self.traffic = Traffic()
        self.consortium = ConsortiumSettings(
            None if secret_check is None else consortium_value(secret_check, config.witness_policy),
            self.state,
        )
        self.api = PeerApi(
            config,
            store,
            self.state,
            self.consortium,
            self.traffic,
            lambda: self.own_log.identity,
            schedule_pull=self._schedule_pull,
            evidence_found=self._evidence_found,
            on_tls_refused=on_tls_refused,
        )
        self.port = config.port

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the peer API (peers may ask us while we start) and the client session. Nothing
        is asked of peers until ``start_gossip``, once our own log's tip is confirmed."""
        for peer in self.config.peers:
            await self.store.ensure_origin(peer.origin, peer.public_key)
        await self.replicas.start()
        await self.api.start()
        certs = [p.tls_cert for p in self.config.peers]
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                ssl=client_context(self.config.tls_cert, self.config.tls_key, certs), limit=32
            ),
            timeout=aiohttp.ClientTimeout(total=30, connect=3),
        )
        log.info(
            "peer API started",
            address=f"{self.config.host}:{self.config.port}",
            peers=len(self.peers),
            witnesses=len(self.witnesses),
        )

    def start_gossip(self) -> None:
        """Start gossip rounds, announcements and standard witnesses' requests. Only after
        ``confirm_own_tip``: asking anyone to cosign a checkpoint of a stale tip would serve
        no one (peers refuse it, an auditor would read a restored log's old size as current)."""
        self._task = asyncio.create_task(self._gossip_loop(), name="gossip")
        for peer in self.peers.values():
            peer.announcer = asyncio.create_task(
                self._announce_loop(peer), name=f"announce {peer.config.origin}"
            )
        for witness in self.witnesses:
            witness.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=_witness_tls(witness.config), limit=4),
                timeout=aiohttp.ClientTimeout(total=30, connect=3),
            )
            witness.announce.set()  # our newest checkpoint may lack its (fresh) cosignature
            witness.announcer = asyncio.create_task(
                self._witness_loop(witness), name=f"witness {witness.name}"
            )

    async def stop(self) -> None:
        peer_tasks = [t for p in self.peers.values() for t in (p.announcer, p.gossip_round)]
        peer_tasks += [w.announcer for w in self.witnesses]
        for task in (self._task, *peer_tasks, *self._pulls.values()):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        log.info("peer API traffic", **vars(self.traffic))
        if self._session is not None:
            await self._session.close()
        for witness in self.witnesses:
            if witness.session is not None:
                await witness.session.close()
        await self.api.stop()
        await self.replicas.stop()

    def checkpoint_signed(self) -> None:
        """The gateway signed a new checkpoint of its own log: announce it to every peer."""
        for peer in self.peers.values():
            peer.announce.set()
        for witness in self.witnesses:
            witness.announce.set()

    # -- start-up: our own log's tip ---------------------------------------------------------

    async def confirm_own_tip(
        self, *, wait: float, accept_local_tip: bool = False, stop: asyncio.Event | None = None
    ) -> OwnTip:
        """Before this gateway appends anything after a start: ask every peer for the newest
        checkpoint of our own log it holds or cosigned, fetch back the entries we lack (a
        restore from a backup loses them) and check every such checkpoint against the log we
        then hold. Waits up to ``wait`` seconds for a first answer; once one peer answered,
        waits only for each other peer's first try. With ``accept_local_tip`` it waits for
        nothing beyond each peer's first try. ``OwnTip.problem`` says why the tip is not
        confirmed; nothing is appended here (what was fetched is stored: it is ours)."""
        answers: dict[str, list[tuple[Checkpoint, bytes, str]]] = {}
        failures: dict[str, str] = {}
        changed = asyncio.Event()

        async def ask(peer: _Peer) -> None:
            while True:
                try:
                    answers[peer.name] = await self._own_checkpoints_at(peer)
                    failures.pop(peer.name, None)
                    changed.set()
                    return
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    failures[peer.name] = f"unreachable: {str(exc) or type(exc).__name__}"[:300]
                except (PeerProtocolError, NoteError, CheckpointError) as exc:
                    failures[peer.name] = str(exc)[:300]
                    log.warning(
                        "peer answer refused while confirming this gateway's log",
                        source=peer.name,
                        reason=str(exc)[:300],
                    )
                changed.set()
                await asyncio.sleep(self.config.gossip_interval)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        tasks = [
            asyncio.create_task(ask(p), name=f"own tip at {p.name}") for p in self.peers.values()
        ]
        said_waiting = False
        try:
            while True:
                tried = len(set(answers) | set(failures)) == len(self.peers)
                if len(answers) == len(self.peers) or (tried and (answers or accept_local_tip)):
                    break
                if stop is not None and stop.is_set():
                    return OwnTip(await self.store.size(self.identity.origin), stopped=True)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if tried and not said_waiting:
                    said_waiting = True
                    log.warning(
                        "waiting for a peer to confirm this gateway's log before it appends anything",
                        wait_seconds=wait,
                        unreachable=dict(failures),
                    )
                changed.clear()
                await _first_of([changed, *([stop] if stop is not None else [])], remaining)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        unreachable = {name: why for name, why in failures.items() if name not in answers}
        if not answers:
            size = await self.store.size(self.identity.origin)
            return OwnTip(
                size,
                unreachable=unreachable,
                problem=f"no peer answered within {wait:g} s, so none could confirm that this "
                f"gateway's {size} entries are all it has signed",
            )
        fetched, size, problem = await self._catch_up_own(answers)
        return OwnTip(size, fetched, tuple(sorted(answers)), unreachable, problem)

    async def _own_checkpoints_at(self, peer: _Peer) -> list[tuple[Checkpoint, bytes, str]]:
        """The checkpoints of our own log ``peer`` holds (``holds``: with its entries) and
        last cosigned (``cosigned``), each checked to be signed by our key."""
        own = self.identity.origin
        status, body = await self._fetch(peer, "/v1/checkpoints", timeout=STARTUP_REQUEST_TIMEOUT)
        if status != 200 or not isinstance(body, dict):
            raise PeerProtocolError(f"checkpoints: status {status}")
        chain = await self.store.key_chain(own)
        have = await self.store.size(own)
        # beyond the entries we hold, a key change we lost (a restore) may have happened: any
        # key of ours signs there, the key file's included; the catch-up checks each entry
        ours = [*chain.keys(), self.identity.public_key]
        found = []
        for section, kind in (("checkpoints", "holds"), ("witnessed", "cosigned")):
            notes = body.get(section)
            if not isinstance(notes, dict) or own not in notes:
                continue  # a gateway from before "witnessed" simply has none
            data = unb64(notes[own], "checkpoint")
            note = parse_note(data)
            cp = parse_checkpoint(note.text)
            signed = chain.signs_checkpoint(note, cp.size) or (
                cp.size > have and any(verify_note_signature(note, own, key) for key in ours)
            )
            if cp.origin != own or not signed:
                raise PeerProtocolError(
                    "a checkpoint it offers as this gateway's is not signed by this gateway's key"
                )
            found.append((cp, data, kind))
        return found

    async def _catch_up_own(
        self, answers: dict[str, list[tuple[Checkpoint, bytes, str]]]
    ) -> tuple[int, int, str | None]:
        """Fetch back our own entries from the peers holding the most, checked against
        their checkpoints (signed by us), then check every checkpoint seen against the log
        now held. Returns (entries fetched, size now, problem or None)."""
        own = self.identity.origin
        start = have = await self.store.size(own)
        failed: list[str] = []
        holders = sorted(
            (
                (cp.size, name, note)
                for name, found in answers.items()
                for cp, note, kind in found
                if kind == "holds"
            ),
            reverse=True,
        )
        for target, name, note in holders:
            if target <= have:
                break
            try:
                have = await self._pull_own(self.peers[name], note, target, have)
            except (
                TimeoutError,
                aiohttp.ClientError,
                OSError,
                PeerProtocolError,
                ReplicaError,
            ) as exc:
                failed.append(f"{name}: {exc!s}"[:300])
                log.warning(
                    "could not fetch this gateway's own entries back from a peer",
                    source=name,
                    error=str(exc)[:300],
                )
                have = await self.store.size(own)  # chunks verified before the failure stay
        if have > start:
            log.warning(
                "fetched this gateway's own entries back from its peers",
                local_size=start,
                size=have,
                fetched=have - start,
                why="its local log was behind what it had signed (restored from a backup?)",
            )
        for name, found in sorted(answers.items()):
            for cp, _, kind in found:
                if cp.size > have:
                    why = f" ({'; '.join(failed)})" if failed else ""
                    return (
                        have - start,
                        have,
                        (
                            f"{name} {kind} a checkpoint of this gateway's log at size {cp.size}, signed by "
                            f"this gateway, but only {have} of its entries could be had{why}"
                        ),
                    )
                if await self.store.root(own, cp.size) != cp.root_hash:
                    return (
                        have - start,
                        have,
                        (
                            f"{name} {kind} a checkpoint of this gateway's log at size {cp.size}, signed by "
                            "this gateway, of another history than the local log's: this gateway has "
                            "already signed two histories"
                        ),
                    )
        return have - start, have, None

    async def _pull_own(self, source: _Peer, note: bytes, target: int, have: int) -> int:
        """Our own entries ``have``..``target`` from ``source``, chunk by chunk, each verified
        against ``note`` (our signed checkpoint of size ``target``) before it is stored."""
        own = self.identity.origin
        while have < target:
            chunk = await self._fetch_entries(source, own, have, target)
            end = have + len(chunk)
            proof = (
                await self._fetch_prefix_proof(source, own, end, target) if end < target else None
            )
            have = await self.replicas.append_verified(own, chunk, note, proof)
        return have

    # -- operator decisions --------------------------------------------------------------

    async def clear_flag(self, origin: str, reason: str, by: str) -> dict[str, Any]:
        """Clear the equivocation flag on ``origin`` (``peers --clear-flag``): a flag-cleared
        entry in our log says who and why and names the evidence; the evidence is kept but no
        longer flags the origin nor goes to peers. New evidence flags it again."""
        if origin not in self.peers:
            raise ValueError(f"{origin!r} is not one of this gateway's [[peers]]")
        held = [e for e in await self.state.evidence_held(origin) if e.cleared_at is None]
        digests = [evidence_digest(e.data) for e in held]
        if not digests:
            raise ValueError(
                f"{origin} is not flagged here: no equivocation evidence against it is in force"
            )
        appended = await self.own_log.append(
            FLAG_CLEARED, flag_cleared_payload(origin, digests, by, reason)
        )
        await self.state.mark_cleared(origin, digests, appended.index, now_iso())
        log.warning(
            "equivocation flag cleared",
            flagged_origin=origin,
            by=by,
            reason=reason,
            evidence=len(digests),
            entry=appended.index,
        )
        return {"origin": origin, "evidence": len(digests), "index": appended.index}

    # -- client side -------------------------------------------------------------------

    async def _request(
        self,
        peer: _Peer | _Witness,
        path: str,
        data: bytes | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> tuple[int, str, bytes]:
        """GET ``path`` (or POST ``data``) on ``peer``: (status, Content-Type, body), the body
        refused above ``max_message_bytes``; ``timeout`` seconds instead of the session's."""
        session = peer.session or self._session
        assert session is not None
        self.traffic.requests_made += 1
        self.traffic.bytes_sent += len(data or b"")
        headers = {} if content_type is None else {"Content-Type": content_type}
        ours = self.consortium.ours if isinstance(peer, _Peer) else None  # standard witnesses: none
        if ours is not None:
            headers[CONSORTIUM_HEADER] = ours
        method = session.get if data is None else session.post
        options: dict[str, Any] = (
            {}
            if timeout is None
            else {"timeout": aiohttp.ClientTimeout(total=timeout, connect=min(3.0, timeout))}
        )
        async with method(peer.url + path, data=data, headers=headers or None, **options) as resp:
            theirs = resp.headers.get(CONSORTIUM_HEADER)
            if ours is not None and theirs is not None:
                problem = await self.consortium.note(peer.name, theirs)
                if problem is not None:
                    raise ConsortiumMismatch(f"consortium mismatch: {problem}")
            raw = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                raw += chunk
                if len(raw) > self.config.max_message_bytes:
                    raise PeerProtocolError(f"response above {self.config.max_message_bytes} bytes")
            self.traffic.bytes_received += len(raw)
            return resp.status, resp.content_type, bytes(raw)

    async def _fetch(
        self, peer: _Peer, path: str, *, post: Any = None, timeout: float | None = None
    ) -> tuple[int, Any]:
        data = None if post is None else json.dumps(post).encode()
        status, _, raw = await self._request(
            peer, path, data, None if data is None else "application/json", timeout
        )
        try:
            return status, json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise PeerProtocolError(f"{path}: response is not JSON (status {status})") from None

    async def _gossip_loop(self) -> None:
        """Start a round with up to ``fanout`` random peers every interval, side by side; a
        peer still in its previous round, or backed off, is left out of this one."""
        while True:
            idle = [
                p
                for p in self.peers.values()
                if (p.gossip_round is None or p.gossip_round.done()) and not self._backing_off(p)
            ]
            for peer in random.sample(idle, min(self.config.fanout, len(idle))):
                peer.gossip_round = asyncio.create_task(
                    self._guarded(peer, self._gossip_round(peer)),
                    name=f"gossip {peer.config.origin}",
                )
            await asyncio.sleep(self.config.gossip_interval)

    async def _announce_loop(self, peer: _Peer) -> None:
        """Ask ``peer`` to cosign each new checkpoint; announcements made while it is busy
        coalesce into one (the newest checkpoint)."""
        while True:
            await peer.announce.wait()
            peer.announce.clear()
            await self._guarded(peer, self._ask_cosignature(peer))

    async def _witness_loop(self, witness: _Witness) -> None:
        """Ask a standard witness to cosign our newest checkpoint when there is a new one, at
        most once per its ``interval``, and to renew its cosignature every heartbeat_interval;
        after a failure (one log line) try again after gossip_interval, doubling with each
        consecutive failure up to backoff_max."""
        while True:
            try:
                await asyncio.wait_for(
                    witness.announce.wait(), timeout=self.config.heartbeat_interval
                )
            except TimeoutError:
                pass
            witness.announce.clear()
            try:
                await self._ask_cosignature(witness)
                witness.failures = 0
                await asyncio.sleep(
                    witness.config.interval
                )  # its budget; newer checkpoints coalesce
                continue
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                problem = f"unreachable: {exc!s}"
            except (PeerProtocolError, NoteError, LedgerStoreError) as exc:
                problem = str(exc)
            except Exception as exc:  # a bug must not end witnessing: log it loudly and go on
                log.exception(
                    "witness request failed",
                    witness=witness.name,
                    error=f"{type(exc).__name__}: {exc}",
                )
                problem = "internal error"
            delay = min(
                self.config.backoff_max,
                self.config.gossip_interval * 2.0 ** min(witness.failures, 40),
            )
            witness.failures += 1
            log.warning(
                "witness did not cosign",
                witness=witness.name,
                reason=problem[:300],
                retry_seconds=round(delay, 3),
            )
            await asyncio.sleep(delay)
            witness.announce.set()  # try again, whether or not we signed another checkpoint

    def _backing_off(self, peer: _Peer) -> bool:
        return time.monotonic() < peer.backoff_until

    def _back_off(self, peer: _Peer) -> float:
        """Start the next back-off for ``peer``: gossip_interval seconds, doubled for each
        consecutive failure, at most backoff_max. Returns its length."""
        delay = min(
            self.config.backoff_max, self.config.gossip_interval * 2.0 ** min(peer.failures, 40)
        )
        peer.failures += 1
        peer.backoff_until = time.monotonic() + delay
        return delay

    def _schedule_pull(self, origin: str, note: bytes) -> None:
        """Pull ``origin``'s entries up to its checkpoint ``note`` from ``origin`` itself, in
        the background; announcements arriving meanwhile coalesce into one more pull. None
        while ``origin`` is backed off."""
        if self._backing_off(self.peers[origin]):
            return
        self._pull_wanted[origin] = (self.peers[origin], note)
        task = self._pulls.get(origin)
        if task is None or task.done():
            self._pulls[origin] = asyncio.create_task(
                self._pull_loop(origin), name=f"pull {origin}"
            )

    async def _pull_loop(self, origin: str) -> None:
        while (wanted := self._pull_wanted.pop(origin, None)) is not None:
            peer, note = wanted
            await self._guarded(peer, self._consider_checkpoint(origin, note, peer))

    async def _guarded(self, peer: _Peer, work: Awaitable[None]) -> None:
        """Run one exchange with ``peer``; failures are logged and kept in its status."""
        origin = peer.config.origin
        try:
            await work
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            before = await self.state.peer_status(origin)
            last_contact = before.last_contact if before else None  # keep when we last reached it
            await self.state.set_peer_status(
                PeerStatus(origin, False, last_contact, None, f"unreachable: {exc!s}"[:300])
            )
            log.info("peer unreachable", peer=origin, error=str(exc)[:200])
        except ConsortiumMismatch as exc:  # logged once when found
            await self.state.set_peer_status(
                PeerStatus(origin, True, now_iso(), None, str(exc)[:300])
            )
        except EntriesRefused as exc:
            delay = self._back_off(peer)
            await self.state.set_peer_status(
                PeerStatus(origin, True, now_iso(), None, str(exc)[:300])
            )
            log.warning(
                "peer message rejected",
                peer=origin,
                reason=str(exc),
                backoff_seconds=round(delay, 3),
            )
        except (PeerProtocolError, NoteError, CheckpointError, LedgerStoreError) as exc:
            await self.state.set_peer_status(
                PeerStatus(origin, True, now_iso(), None, str(exc)[:300])
            )
            log.warning("peer message rejected", peer=origin, reason=str(exc))
        except Exception as exc:  # a bug must not end gossip: log it loudly and go on
            log.exception("gossip round failed", peer=origin, error=f"{type(exc).__name__}: {exc}")

    async def _gossip_round(self, peer: _Peer) -> None:
        origin = peer.config.origin
        status, body = await self._fetch(peer, "/v1/checkpoints")
        if status != 200 or not isinstance(body, dict):
            raise PeerProtocolError(f"checkpoints: status {status}")
        for data in body.get("evidence", []) if isinstance(body.get("evidence"), list) else []:
            await self._consider_evidence(unb64(data, "evidence"), origin)
        checkpoints = body.get("checkpoints")
        if not isinstance(checkpoints, dict):
            raise PeerProtocolError("checkpoints must be an object")
        for cp_origin, note in checkpoints.items():
            if cp_origin in self._origins and cp_origin != self.identity.origin:
                await self._consider_checkpoint(cp_origin, unb64(note, "checkpoint"), peer)
        their = checkpoints.get(origin)
        await self._ask_cosignature(peer)
        size = parse_checkpoint(parse_note(unb64(their, "checkpoint")).text).size if their else None
        await self.state.set_peer_status(PeerStatus(origin, True, now_iso(), size, None))

    def _lock(self, origin: str) -> asyncio.Lock:
        return self._origin_locks.setdefault(origin, asyncio.Lock())

    async def _consider_checkpoint(self, origin: str, note_bytes: bytes, source: _Peer) -> None:
        """A signed checkpoint of ``origin`` seen at ``source``: check it, catch up to it."""
        note = parse_note(note_bytes)
        cp = parse_checkpoint(note.text)
        if cp.origin != origin:
            raise PeerProtocolError(f"checkpoint offered as {origin}'s names {cp.origin}")
        later: tuple[KeyChange, ...] = ()
        if not (await self.store.key_chain(origin)).signs_checkpoint(note, cp.size):
            later = await self._changes_ahead(origin, note, cp.size, source)
        try:
            await self._consider_locked(origin, note_bytes, note, cp, source, later)
        finally:  # replacement statements the pull met, each under its own origin's lock
            while self._statements_seen:
                await self.accept_statement(*self._statements_seen.pop(0))

    async def _consider_locked(
        self,
        origin: str,
        note_bytes: bytes,
        note: Note,
        cp: Checkpoint,
        source: _Peer,
        later: tuple[KeyChange, ...],
    ) -> None:
        async with self._lock(origin):
            held = await self.store.latest_checkpoint(origin)
            if held is not None:
                held_size = held[0]
                if held_size == cp.size:
                    await self._check_pair(origin, held[1], note_bytes, None, source)
                    await self._merge_cosignatures(origin, cp.size, note)
                    return
                if held_size > cp.size and cp.size > 0:
                    proof = await self.store.consistency_proof(origin, cp.size, held_size)
                    await self._check_pair(origin, note_bytes, held[1], proof, source)
                    return
            if origin in await self.state.flagged():
                return  # a proven liar's new entries are not replicated
            have = await self.store.size(origin)
            if cp.size <= have:  # a prefix pulled in chunks reaches it: check it, keep it
                await self._checkpoint_within(origin, cp.size, cp.root_hash, note_bytes, held, have)
                return
            if self._backing_off(source):
                return  # a pull that waited for the lock while another backed this peer off
            await self._pull(origin, note_bytes, cp.size, have, held, source, later)

    async def _changes_ahead(
        self, origin: str, note: Note, size: int, source: _Peer
    ) -> tuple[KeyChange, ...]:
        """A checkpoint of ``origin`` that the key chain we hold does not sign: the origin may
        have changed its key in entries we have not pulled yet. ``source`` serves the
        key-change entries it holds beyond ours (``/v1/key-changes``); each is checked in
        turn from our chain (a rotation by the key before it and the new key; a replacement
        by the quorum of our witness policy), and the checkpoint must then be signed by the
        key in force at its size. Returns those changes (the pull checks the entries
        themselves again); PeerProtocolError if the checkpoint is still not signed."""
        chain = await self.store.key_chain(origin)
        have = await self.store.size(origin)
        ahead = chain
        signer_keys = await self.signer_keys()
        if size > have:
            status, body = await self._fetch(
                source, f"/v1/key-changes?origin={origin}&start={have}"
            )
            items = body.get("entries") if status == 200 and isinstance(body, dict) else None
            for item in items if isinstance(items, list) else []:
                try:
                    entry = decode_entry(unb64(item, "key-change entry"))
                    if entry.origin != origin or entry.index < have or entry.index >= size:
                        continue
                    if entry.kind == KEY_ROTATION:
                        change = check_rotation(entry, ahead.key_for_size(entry.index))
                    else:  # its pinned root is checked when the pull reaches it
                        statement = check_statement(
                            statement_of(entry), self.config.witness_policy, signer_keys
                        )
                        if (statement.origin, statement.size) != (origin, entry.index):
                            continue
                        verify_entry_signature(entry, statement.new_key)
                        change = KeyChange(entry.index, statement.new_key, replaced=True)
                    if ahead.change_at(change.index) is None:
                        ahead = ahead.with_change(change)
                except (EntryError, KeyChangeError, PeerProtocolError) as exc:
                    raise PeerProtocolError(
                        f"key change of {origin} from {source.name} refused: {exc}"
                    ) from None
        if not ahead.signs_checkpoint(note, size):
            raise PeerProtocolError(
                f"checkpoint offered as {origin}'s is not signed by its key (in force at size {size})"
            )
        return tuple(c for c in ahead.changes if c.index >= have)

    async def signer_keys(self) -> Callable[[str], Sequence[Ed25519PublicKey]]:
        """The keys each consortium gateway may sign a replacement statement with (its key
        chain's trusted keys), for ``keychain.check_statement``."""
        keys = {
            name: (await self.store.key_chain(name)).trusted_keys()
            for name in self._origins
            if await self.store.origin(name) is not None
        }
        return lambda name: keys.get(name, [])

    async def accept_statement(self, data: bytes, source: str) -> Statement | None:
        """A replacement statement for a consortium gateway's key, seen on another gateway's
        log: ``apply_statement``, with one log line if it does not apply here. (Our own
        replacement, recorded by the gateways that submitted it, is ours already.)"""
        try:
            if parse_statement(data).origin == self.identity.origin:
                return None
            return await self.apply_statement(data, source)
        except KeyChangeError as exc:
            log.error("key replacement statement not accepted", source=source, reason=str(exc))
            return None

    async def apply_statement(self, data: bytes, source: str) -> Statement:
        """A replacement statement for a peer's key (from another gateway's log, or submitted
        here): if it meets our witness policy's quorum and pins the history we hold, the
        origin's key from the statement's size on is the new key; the entries we hold from
        that index on were signed by the replaced key and are dropped, and a witness state
        beyond it is forgotten. KeyChangeError says why it does not apply."""
        statement = check_statement(data, self.config.witness_policy, await self.signer_keys())
        origin = statement.origin
        if origin == self.identity.origin:
            raise KeyChangeError(
                "a statement replacing this gateway's own key is installed with `replace-key install`"
            )
        if origin not in self.peers:
            raise KeyChangeError(f"{origin} is not one of this gateway's [[peers]]")
        async with self._lock(origin):
            chain = await self.store.key_chain(origin)
            known = chain.change_at(statement.size)
            if (
                known is not None
                and known.replaced
                and known.key.public_bytes_raw() == statement.new_key.public_bytes_raw()
            ):
                return statement  # already in force
            held = await self.store.size(origin)
            if known is not None or statement.size <= chain.last_index:
                raise KeyChangeError(
                    f"{origin}'s log already changed its key at or after entry {statement.size}"
                )
            if (
                held >= statement.size
                and await self.store.root(origin, statement.size) != statement.root
            ):
                raise KeyChangeError(
                    f"it pins another history of {origin} than the first {statement.size} entries held here"
                )
            if held >= statement.size and (
                chain.key_for_size(statement.size).public_bytes_raw()
                != statement.old_key.public_bytes_raw()
            ):
                raise KeyChangeError(
                    f"its old key is not the key {origin}'s log has in force at size {statement.size}"
                )
            await self.store.accept_replacement(statement)
            dropped = (
                await self.replicas.drop_from(origin, statement.size)
                if held > statement.size
                else 0
            )
            witnessed = await self.state.witness_state(origin)
            if witnessed is not None and witnessed[0] > statement.size:
                await self.state.forget_witness_state(origin)
        log.warning(
            "key replacement accepted: entries and checkpoints of this origin signed by its replaced key are "
            "refused from here on",
            origin=origin,
            size=statement.size,
            new_key=verifier_key(origin, statement.new_key),
            signers=statement.signers,
            source=source,
            dropped_entries=dropped,
        )
        return statement

    async def _merge_cosignatures(self, origin: str, size: int, note: Note) -> None:
        """Cosignatures on a checkpoint we hold (same size, same root: checked by the caller)
        that a peer's copy carries and ours lacks, or carries with a newer timestamp: each is
        verified with the witness's key first; lines by unknown keys are not taken. So a
        replica's copy collects the cosignatures its origin gathered after we pulled it."""
        for sig in note.signatures:
            if sig.name == origin:
                continue
            keys = await self._witness_keys(sig.name)
            if any(verify_cosignature(note.text, sig, sig.name, key) is not None for key in keys):
                await self.store.add_cosignature(origin, size, sig)

    async def _witness_keys(self, name: str) -> list[Ed25519PublicKey]:
        """The cosigner keys of a gateway of the consortium (ourselves included: its key
        chain's keys but those a replacement took over from) or of a configured standard
        witness, by its key name."""
        if name in self._origins:
            return (await self.store.key_chain(name)).trusted_keys()
        return [w.public_key for w in self.witnesses if w.name == name]

    async def _checkpoint_within(
        self,
        origin: str,
        size: int,
        root: bytes,
        note_bytes: bytes,
        held: tuple[int, bytes] | None,
        have: int,
    ) -> None:
        """A signed checkpoint of a size we hold entries for but no checkpoint: store it if it
        is the root of those entries (they were stored as a prefix of a larger checkpoint)."""
        if size == 0 or (held is not None and size <= held[0]):
            return
        if await self.store.root(origin, size) != root:
            raise PeerProtocolError(
                f"checkpoint of {origin} at size {size} does not match the {have} entries we hold, "
                "which a larger checkpoint signed by the same origin commits to"
            )
        await self.store.store_checkpoint(origin, size, note_bytes)

    async def _pull(
        self,
        origin: str,
        note_bytes: bytes,
        target: int,
        have: int,
        held: tuple[int, bytes] | None,
        source: _Peer,
        later: Sequence[KeyChange] = (),
    ) -> None:
        """Replicate ``origin``'s entries ``have``..``target`` from ``source`` in chunks: each
        chunk (about ``max_message_bytes`` of entries) is verified against the checkpoint and
        stored before the next is fetched, so one pull never holds more than one chunk."""
        while have < target:
            chunk = await self._fetch_entries(source, origin, have, target)
            end = have + len(chunk)
            proof = (
                await self._fetch_prefix_proof(source, origin, end, target)
                if end < target
                else None
            )
            try:
                have = await self.replicas.append_verified(origin, chunk, note_bytes, proof, later)
            except ReplicaError as exc:
                reason = f"entries of {origin} from {source.config.origin} refused: {exc}"
                if held is not None and have == held[0]:
                    try:
                        await self._check_fork(origin, held, note_bytes, target, source)
                    except PeerProtocolError as proof_exc:
                        reason += f"; its consistency proof: {proof_exc}"
                raise EntriesRefused(reason) from None
            source.failures = 0
            log.info(
                "replicated",
                origin=origin,
                size=have,
                source=source.config.origin,
                new=len(chunk),
                held_bytes=sum(map(len, chunk)),
            )
            for data in chunk:  # another gateway's record of a replacement: follow it now
                if b'"kind":"key-replacement"' in data:
                    entry = decode_entry(data)
                    if not changes_key_of(entry.origin, entry.kind, entry.payload):
                        self._statements_seen.append(
                            (statement_of(entry), f"{origin} entry {entry.index}")
                        )

    async def _fetch_entries(
        self, source: _Peer, origin: str, start: int, target: int
    ) -> list[bytes]:
        """The next chunk of ``origin``'s entries from ``start``: responses are added until
        the checkpoint's size or about ``max_message_bytes`` of entries is reached."""
        entries: list[bytes] = []
        held_bytes = 0
        while start + len(entries) < target and held_bytes < self.config.max_message_bytes:
            at = start + len(entries)
            status, body = await self._fetch(
                source, f"/v1/entries?origin={origin}&start={at}&end={target}"
            )
            chunk = body.get("entries") if status == 200 and isinstance(body, dict) else None
            if not isinstance(chunk, list) or not chunk:
                raise PeerProtocolError(
                    f"{source.config.origin} did not serve {origin} entries from {at}"
                )
            for item in chunk:
                entries.append(unb64(item, "entry"))
                held_bytes += len(entries[-1])
        return entries[: target - start]

    async def _fetch_prefix_proof(
        self, source: _Peer, origin: str, old: int, new: int
    ) -> list[bytes]:
        """The consistency proof that a chunk ending at ``old`` is a prefix of the size-``new``
        checkpoint; without one the chunk cannot be verified (EntriesRefused)."""
        status, body = await self._fetch(
            source, f"/v1/consistency?origin={origin}&old={old}&new={new}"
        )
        proof = body.get("proof") if status == 200 and isinstance(body, dict) else None
        if not isinstance(proof, list):
            raise EntriesRefused(
                f"{source.config.origin} did not serve a consistency proof of {origin} from {old} "
                f"to {new} (status {status}): its entries cannot be verified"
            )
        try:
            return [unb64(h, "proof hash") for h in proof]
        except PeerProtocolError as exc:
            raise EntriesRefused(
                f"consistency proof of {origin} from {source.config.origin}: {exc}"
            ) from None

    async def _check_fork(
        self, origin: str, held: tuple[int, bytes], note_bytes: bytes, target: int, source: _Peer
    ) -> None:
        """Entries toward ``note_bytes`` did not verify from our checkpoint ``held``: a fork
        proof between the two checkpoints, if ``source`` serves one, is evidence."""
        status, body = await self._fetch(
            source, f"/v1/consistency?origin={origin}&old={held[0]}&new={target}"
        )
        if status == 200 and isinstance(body, dict) and isinstance(body.get("proof"), list):
            proof = [unb64(h, "proof hash") for h in body["proof"]]
            await self._check_pair(origin, held[1], note_bytes, proof, source)

    async def _check_pair(
        self,
        origin: str,
        note_a: bytes,
        note_b: bytes,
        proof: Sequence[bytes] | None,
        source: _Peer,
    ) -> None:
        try:
            found = check_equivocation(note_a, note_b, proof, await self.store.key_chain(origin))
        except WitnessError as exc:
            raise PeerProtocolError(str(exc)) from None
        if found is not None:
            await self._evidence_found(format_evidence(found), origin, source.config.origin)

    async def _consider_evidence(self, data: bytes, source: str) -> None:
        try:
            claimed = parse_evidence(data)
            if claimed.origin not in self._origins:
                return
            real = check_equivocation(
                claimed.note_a,
                claimed.note_b,
                claimed.consistency_proof or None,
                await self.store.key_chain(claimed.origin),
            )
        except WitnessError as exc:
            raise PeerProtocolError(f"evidence refused: {exc}") from None
        if real is None:
            raise PeerProtocolError("evidence refused: the two checkpoints are consistent")
        await self._evidence_found(data, claimed.origin, source)

    async def _evidence_found(self, data: bytes, origin: str, source: str) -> None:
        if await self.state.add_evidence(origin, data, now_iso()):
            log.error(
                "EQUIVOCATION: a peer signed two checkpoints that cannot both be true; origin flagged",
                origin=origin,
                reported_by=source,
            )
            if self._on_equivocation is not None:
                self._on_equivocation(origin, source)

    async def _ask_cosignature(self, peer: _Peer | _Witness) -> None:
        """Ask ``peer`` (or a standard witness) to witness our newest checkpoint (tlog-witness
        add-checkpoint)."""
        async with peer.cosign_lock:  # one request at a time, so old_size is never stale
            await self._ask_cosignature_locked(peer)

    async def _ask_cosignature_locked(self, peer: _Peer | _Witness) -> None:
        own = self.identity.origin
        latest = await self.store.latest_checkpoint(own)
        if latest is None:
            return
        size, note_bytes = latest
        note = parse_note(note_bytes)
        fresh_after = time.time() - self.config.heartbeat_interval
        if any(
            s.name == peer.name and (cosignature_timestamp(s) or 0) > fresh_after
            for s in note.signatures
        ):
            return  # cosigned by this peer, recently enough
        for _ in range(2):  # one retry after a 409 tells us the size the witness holds
            old = min(peer.cosigned_size, size)
            proof = await self.store.consistency_proof(own, old, size) if 0 < old < size else []
            answer = await self._add_checkpoint(peer, note_bytes, old, proof)
            if answer.status == 409 and answer.size is not None:
                peer.cosigned_size = answer.size
                continue
            if answer.status != 200:
                raise PeerProtocolError(
                    f"{peer.name} did not cosign size {size}: status {answer.status}: {answer.reason}"
                )
            keys = await self._witness_keys(peer.name)
            sig = next(
                (
                    c
                    for c in answer.cosignatures
                    if any(
                        verify_cosignature(note.text, c, peer.name, key) is not None for key in keys
                    )
                ),
                None,
            )
            if sig is None:
                raise PeerProtocolError(f"cosignature from {peer.name} does not verify")
            await self.store.add_cosignature(own, size, sig)
            peer.cosigned_size = size
            return

    async def _add_checkpoint(
        self, peer: _Peer | _Witness, note: bytes, old: int, proof: Sequence[bytes]
    ) -> Witnessed:
        """One tlog-witness add-checkpoint request to ``peer``, in the standard text encoding;
        a gateway from before it (404 for the path) is asked in JSON from then on."""
        if not peer.json_witness:
            body = format_add_checkpoint(old, proof, note)
            status, content_type, raw = await self._request(
                peer, ADD_CHECKPOINT_PATH, body, "text/plain; charset=utf-8"
            )
            if status != 404 or isinstance(
                peer, _Witness
            ):  # a standard witness: 404 is "unknown log"
                return _read_text_answer(status, content_type, raw)
        assert isinstance(peer, _Peer)  # a standard witness answered above
        json_body = {"note": b64(note), "old_size": old, "proof": [b64(h) for h in proof]}
        status, body = await self._fetch(peer, "/v1/add-checkpoint", post=json_body)
        peer.json_witness = peer.json_witness or status != 404
        return _read_json_answer(status, body)
