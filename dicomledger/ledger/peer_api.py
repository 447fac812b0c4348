"""The peer API, server side: what other gateways of the consortium (and standard C2SP
witness clients) ask this gateway over HTTPS with pinned mutual TLS: checkpoints, entries,
consistency proofs, key changes, and cosignatures (tlog-witness add-checkpoint). Also the
protocol pieces its client (``gossip.py``) shares: errors, the consortium-settings header, the
encodings. Every request is checked before anything is served or stored; a refusal is one log
line."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from dicomledger.common.errors import PeerError
from dicomledger.ledger.consortium import ConsortiumCheck, ConsortiumState
from dicomledger.ledger.identity import Identity
from dicomledger.ledger.log import LedgerStore
from dicomledger.ledger.note import Signature, canonical_b64decode, format_signature_lines
from dicomledger.ledger.peer_settings import PeeringSettings
from dicomledger.ledger.peer_tls import (
    HandshakeFirstSite,
    fingerprint,
    pem_fingerprint,
    server_context,
)
from dicomledger.ledger.policy import WitnessPolicy, canonical_text
from dicomledger.ledger.witness import (
    SIZE_CONTENT_TYPE,
    BadSignatureError,
    InconsistentError,
    StaleError,
    WitnessError,
    WitnessState,
    checkpoint_origin,
    format_evidence,
    format_size,
    parse_add_checkpoint,
    witness_checkpoint,
)

log = structlog.get_logger("dicomledger.gossip")  # one logger for both sides of the peer API

MAX_ENTRIES_PER_REQUEST = 1000
# tlog-witness "POST <submission prefix>/add-checkpoint": the submission prefix is the peer
# API's base URL, https://<host>:<peer port>
ADD_CHECKPOINT_PATH = "/add-checkpoint"


class PeerProtocolError(PeerError, ValueError):
    """A peer's message was malformed, oversized or did not verify."""


class ConsortiumMismatch(PeerProtocolError):
    """A peer holds another pseudonym secret or witness policy: nothing is exchanged with it."""


# Every request between gateways and every answer carries the sender's consortium settings:
# "secret-check=<hex>; policy=<hex>|none", the keyed check value of its pseudonym secret
# (pseudonym.secret_check) and the SHA-256 of its witness policy's canonical text.
CONSORTIUM_HEADER = "Dicomledger-Consortium"


def consortium_value(secret_check: str, policy: WitnessPolicy | None) -> str:
    digest = (
        "none" if policy is None else hashlib.sha256(canonical_text(policy).encode()).hexdigest()
    )
    return f"secret-check={secret_check}; policy={digest}"


def parse_consortium_value(value: str) -> dict[str, str]:
    fields = {}
    for part in value.split(";"):
        name, sep, field_value = part.strip().partition("=")
        if sep:
            fields[name] = field_value
    return fields


def consortium_mismatch(ours: str, theirs: str) -> str | None:
    """How a peer's consortium settings differ from ours, in words; None if they match."""
    mine, other = parse_consortium_value(ours), parse_consortium_value(theirs)
    problems = []
    if mine.get("secret-check") != other.get("secret-check"):
        problems.append(
            f"its pseudonym secret differs from ours (check value {str(other.get('secret-check'))[:16]}…, ours "
            f"{str(mine.get('secret-check'))[:16]}…): one patient would have two pseudonyms"
        )
    if mine.get("policy") != other.get("policy"):

        def what(d: str | None) -> str:
            return "none" if d in (None, "none") else f"{d[:16]}…"

        problems.append(
            f"its witness policy differs from ours (digest {what(other.get('policy'))}, ours "
            f"{what(mine.get('policy'))})"
        )
    return "; ".join(problems) or None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise PeerProtocolError(f"{what} must be a base64 string")
    return canonical_b64decode(value, what, PeerProtocolError)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Witnessed:
    """One add-checkpoint answer, whichever encoding carried it: a status, the reason of a
    refusal, the cosignature lines of a 200, the witness's size in a 409."""

    status: int
    reason: str = ""
    cosignatures: tuple[Signature, ...] = ()
    size: int | None = None


@dataclass
class Traffic:
    """Peer API payload bytes (JSON bodies; HTTP headers and TLS framing not counted)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    requests_served: int = 0
    requests_made: int = 0


class ConsortiumSettings:
    """Our consortium settings as the header carries them (None: not exchanged), and what
    each peer last said of its own (kept in the database: ``dicomledger peers`` shows it)."""

    def __init__(self, ours: str | None, state: ConsortiumState) -> None:
        self.ours = ours
        self.state = state
        self._seen: dict[str, tuple[str, str | None]] = {}  # peer -> (its settings, mismatch)

    async def note(self, peer: str, theirs: str) -> str | None:
        """Compare a peer's consortium settings with ours; when what it says changes (and at
        its first word since we started) keep it (`peers` shows it) and say so in one log
        line. Returns the mismatch, if any."""
        assert self.ours is not None
        problem = consortium_mismatch(self.ours, theirs)
        before = self._seen.get(peer)
        if before == (theirs, problem):
            return problem
        # noted before the first await: a request and an answer of the same peer checked at
        # the same time (server and client side) make one log line, not two
        self._seen[peer] = (theirs, problem)
        if before is None:
            held = await self.state.consortium_check(peer)
            before = None if held is None else ("", held.mismatch)
        fields = parse_consortium_value(theirs)
        await self.state.set_consortium_check(
            ConsortiumCheck(
                peer, fields.get("secret-check"), fields.get("policy"), problem, now_iso()
            )
        )
        if problem is not None:
            log.error(
                "peer refused: consortium settings differ; nothing is exchanged with it until they match",
                peer=peer,
                mismatch=problem,
            )
        elif before is not None and before[1] is not None:
            log.info("consortium settings of a peer match ours again", peer=peer)
        return problem


class PeerApi:
    """The HTTP handlers of the peer API, on ``config.host:config.port``. Cosigning a peer's
    checkpoint may show that we lack its newest entries (``schedule_pull``) or that it
    equivocated (``evidence_found``): the gossip side acts on both."""

    def __init__(
        self,
        config: PeeringSettings,
        store: LedgerStore,
        state: ConsortiumState,
        consortium: ConsortiumSettings,
        traffic: Traffic,
        identity: Callable[[], Identity],
        *,
        schedule_pull: Callable[[str, bytes], None],
        evidence_found: Callable[[bytes, str, str], Awaitable[None]],
        on_tls_refused: Callable[[str, str], None] | None = None,  # (address, reason)
    ) -> None:
        self.config = config
        self.store = store
        self.state = state
        self.consortium = consortium
        self.traffic = traffic
        self._identity = identity
        self._schedule_pull = schedule_pull
        self._evidence_found = evidence_found
        self._on_tls_refused = on_tls_refused
        self._by_fingerprint = {pem_fingerprint(p.tls_cert): p.origin for p in config.peers}
        self._witnessed = frozenset(p.origin for p in config.peers)  # the logs we witness
        self._witness_lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(
            client_max_size=self.config.max_message_bytes,
            middlewares=[self._count_traffic, self._consortium_guard],
        )
        app.router.add_get("/v1/checkpoints", self._get_checkpoints)
        app.router.add_get("/v1/entries", self._get_entries)
        app.router.add_get("/v1/consistency", self._get_consistency)
        app.router.add_get("/v1/key-changes", self._get_key_changes)
        app.router.add_post("/v1/add-checkpoint", self._post_add_checkpoint)
        app.router.add_post(ADD_CHECKPOINT_PATH, self._post_add_checkpoint_text)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = HandshakeFirstSite(
            self._runner,
            self.config.host,
            self.config.port,
            tls=server_context(
                self.config.tls_cert, self.config.tls_key, [p.tls_cert for p in self.config.peers]
            ),
            on_refused=self._handshake_refused,
        )
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _count_traffic(
        self, request: web.Request, handler: Callable[..., Any]
    ) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        self.traffic.requests_served += 1
        self.traffic.bytes_received += request.content_length or 0
        body = getattr(response, "body", None)
        if isinstance(body, bytes | bytearray):
            self.traffic.bytes_sent += len(body)
        return response

    @web.middleware
    async def _consortium_guard(
        self, request: web.Request, handler: Callable[..., Any]
    ) -> web.StreamResponse:
        """A peer whose request says it holds another pseudonym secret or witness policy is
        refused (403, nothing served or stored); every answer says what we hold. A request
        without the header (a standard witness client, a gateway from before the check) is
        served as before."""
        theirs = request.headers.get(CONSORTIUM_HEADER)
        problem = None
        if theirs is not None and self.consortium.ours is not None:
            problem = await self.consortium.note(self._caller(request), theirs)
        response: web.StreamResponse
        if problem is not None:
            response = web.Response(status=403, text=f"consortium mismatch: {problem}\n")
        else:
            response = await handler(request)
        if self.consortium.ours is not None:
            response.headers[CONSORTIUM_HEADER] = self.consortium.ours
        return response

    def _caller(self, request: web.Request) -> str:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        origin = self._by_fingerprint.get(fingerprint(der)) if der else None
        if origin is None:  # TLS already refuses unknown certificates; belt and braces
            raise web.HTTPForbidden(text="unknown peer certificate")
        return origin

    def _handshake_refused(self, address: str, reason: str) -> None:
        log.warning("peer TLS handshake refused", address=address, reason=reason)
        if self._on_tls_refused is not None:
            self._on_tls_refused(address, reason)

    def _refuse(self, caller: str, status: int, reason: str) -> web.Response:
        log.warning("peer request refused", peer=caller, status=status, reason=reason)
        return web.json_response({"error": reason}, status=status)

    async def _get_checkpoints(self, request: web.Request) -> web.Response:
        self._caller(request)
        checkpoints = {}
        for info in await self.store.origins():
            latest = await self.store.latest_checkpoint(info.name)
            if latest is not None:
                checkpoints[info.name] = b64(latest[1])
        evidence = [b64(data) for _, data in await self.state.evidence()]
        # the checkpoint we last cosigned per origin: a restarted origin learns from it its
        # true size even when we had not pulled its entries yet
        witnessed = {origin: b64(note) for origin, note in await self.state.witnessed_notes()}
        return web.json_response(
            {"checkpoints": checkpoints, "evidence": evidence, "witnessed": witnessed}
        )

    def _query_ints(self, request: web.Request, *names: str) -> list[int]:
        try:
            values = [int(request.query[n]) for n in names]
        except (KeyError, ValueError):
            raise PeerProtocolError(f"query needs integer {', '.join(names)}") from None
        if any(v < 0 for v in values):
            raise PeerProtocolError("negative sizes")
        return values

    async def _get_entries(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        try:
            origin = request.query.get("origin", "")
            start, end = self._query_ints(request, "start", "end")
            if await self.store.origin(origin) is None:
                return self._refuse(caller, 404, f"no log for origin {origin!r}")
            end = min(end, start + MAX_ENTRIES_PER_REQUEST, await self.store.size(origin))
            entries = await self.store.entries(origin, start, end) if end > start else []
        except PeerProtocolError as exc:
            return self._refuse(caller, 400, str(exc))
        return web.json_response({"entries": [b64(e) for e in entries]})

    async def _get_consistency(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        try:
            origin = request.query.get("origin", "")
            old, new = self._query_ints(request, "old", "new")
            if await self.store.origin(
                origin
            ) is None or not 0 < old <= new <= await self.store.size(origin):
                return self._refuse(caller, 404, "no such sizes held")
            proof = await self.store.consistency_proof(origin, old, new)
        except PeerProtocolError as exc:
            return self._refuse(caller, 400, str(exc))
        return web.json_response({"proof": [b64(h) for h in proof]})

    async def _get_key_changes(self, request: web.Request) -> web.Response:
        """The key-rotation and key-replacement entries of a log we hold, from ``start``: a
        peer that sees a checkpoint signed by a key it does not know yet learns the chain."""
        caller = self._caller(request)
        try:
            origin = request.query.get("origin", "")
            (start,) = self._query_ints(request, "start")
            if await self.store.origin(origin) is None:
                return self._refuse(caller, 404, f"no log for origin {origin!r}")
            entries = await self.store.key_changes(origin, start)
        except PeerProtocolError as exc:
            return self._refuse(caller, 400, str(exc))
        return web.json_response({"entries": [b64(e) for e in entries]})

    async def _post_add_checkpoint(self, request: web.Request) -> web.Response:
        """C2SP tlog-witness add-checkpoint: a peer asks us to cosign its checkpoint."""
        caller = self._caller(request)
        try:
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._refuse(
                    caller, 413, f"body above {self.config.max_message_bytes} bytes"
                )
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise PeerProtocolError("body must be a JSON object")
            note = unb64(body.get("note"), "note")
            old_size = body.get("old_size")
            if not isinstance(old_size, int) or isinstance(old_size, bool) or old_size < 0:
                raise PeerProtocolError("old_size must be a non-negative integer")
            proof_raw = body.get("proof")
            if not isinstance(proof_raw, list) or len(proof_raw) > 63:
                raise PeerProtocolError("proof must be a list of at most 63 hashes")
            proof = [unb64(h, "proof hash") for h in proof_raw]
        except (
            json.JSONDecodeError,
            UnicodeDecodeError,
            RecursionError,
        ):  # deep nesting: RecursionError
            return self._refuse(caller, 400, "body is not JSON")
        except PeerProtocolError as exc:
            return self._refuse(caller, 400, str(exc))
        if caller in await self.state.flagged():
            return self._refuse(
                caller,
                403,
                "you are flagged for equivocation: this gateway no longer cosigns your checkpoints",
            )
        outcome = await self._witness(
            caller, note, old_size, proof, frozenset({caller})
        )  # its own checkpoints
        self._log_refusal(caller, outcome)
        if outcome.status == 200:
            (cosignature,) = outcome.cosignatures
            return web.json_response(
                {
                    "name": cosignature.name,
                    "cosignature": b64(cosignature.key_id + cosignature.data),
                }
            )
        answer: dict[str, Any] = {"error": outcome.reason}
        if outcome.size is not None:
            answer["size"] = outcome.size  # a stale old size: here is the size we hold, retry
        return web.json_response(answer, status=outcome.status)

    async def _post_add_checkpoint_text(self, request: web.Request) -> web.Response:
        """C2SP tlog-witness add-checkpoint, byte for byte (text body and answers). As the
        spec has it, the checkpoint's signature is what counts, not who sends it: any peer
        may submit any peer's checkpoint. Our own log is not one we witness (404)."""
        caller = self._caller(request)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            outcome = Witnessed(413, f"body above {self.config.max_message_bytes} bytes")
        else:
            try:
                req = parse_add_checkpoint(raw)
            except WitnessError as exc:
                outcome = Witnessed(400, str(exc))
            else:
                outcome = await self._witness(
                    caller, req.note, req.old_size, req.consistency_proof, self._witnessed
                )
        self._log_refusal(caller, outcome)
        if outcome.status == 200:
            return web.Response(
                body=format_signature_lines(outcome.cosignatures),
                content_type="text/plain",
                charset="utf-8",
            )
        if outcome.size is not None:
            return web.Response(
                status=409,
                body=format_size(outcome.size),
                headers={"Content-Type": SIZE_CONTENT_TYPE},
            )
        return web.Response(status=outcome.status, text=outcome.reason + "\n")

    async def _witness(
        self, caller: str, note: bytes, old_size: int, proof: Sequence[bytes], logs: frozenset[str]
    ) -> Witnessed:
        """Check ``note`` as a witness of the ``logs`` (origins) given and cosign it
        (tlog-witness add-checkpoint); the state is read, checked and saved under one lock.
        A checkpoint signed by a key we do not know for its size is refused (403) and makes
        us pull that log: it may have changed its key in entries we have not pulled yet."""
        try:
            origin = checkpoint_origin(note)
        except WitnessError as exc:
            return Witnessed(exc.status, str(exc))
        if origin in logs and origin in await self.state.flagged():
            who = "you are" if origin == caller else f"{origin} is"
            return Witnessed(
                403,
                f"{who} flagged for equivocation: this gateway no longer cosigns its checkpoints",
            )
        async with self._witness_lock:  # read, check and update the state atomically
            stored = await self.state.witness_state(origin) if origin in logs else None
            state = WitnessState(origin, *stored) if stored else None
            chains = {origin: await self.store.key_chain(origin)} if origin in logs else {}
            identity = self._identity()  # the key in force now: a rotation changes it
            try:
                cosignature, new_state = witness_checkpoint(
                    note=note,
                    old_size=old_size,
                    consistency_proof=proof,
                    state=state,
                    logs=chains,
                    witness_name=identity.origin,
                    witness_key=identity.private_key,
                    now=int(time.time()),
                )
            except InconsistentError as exc:
                if exc.evidence is not None:
                    await self._evidence_found(
                        format_evidence(exc.evidence), exc.evidence.origin, caller
                    )
                return Witnessed(exc.status, str(exc))
            except StaleError as exc:
                return Witnessed(exc.status, str(exc), size=exc.size)
            except BadSignatureError as exc:
                if origin in logs:  # a peer's log
                    self._schedule_pull(
                        origin, note
                    )  # it may have changed its key: learn it from its log
                return Witnessed(exc.status, str(exc))
            except WitnessError as exc:
                return Witnessed(exc.status, str(exc))
            await self.state.save_witness_state(
                origin, new_state.size, new_state.root_hash, new_state.note
            )
        if new_state.size > await self.store.size(origin):
            self._schedule_pull(origin, note)  # an announcement: fetch the new entries now
        return Witnessed(200, cosignatures=(cosignature,))

    @staticmethod
    def _log_refusal(caller: str, outcome: Witnessed) -> None:
        if outcome.status == 200:
            return
        # a stale old size is the protocol's normal "here is my size, retry"
        level = log.info if outcome.size is not None else log.warning
        level("peer request refused", peer=caller, status=outcome.status, reason=outcome.reason)
