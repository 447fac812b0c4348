"""The local admin interface: `dicomledger grant`, `revoke` and `permissions` act through the
running gateway, so one process appends to the log (its single writer) and decisions use what
it holds. HTTP over a Unix socket (``[gateway] admin_socket``, mode 0600): only the local
administrator account reaches it; nothing listens on the network.

Patient IDs and Study Instance UIDs never reach the gateway through this interface: the CLI
pseudonymises them first with the consortium secret.

A signed grant or revocation is replicated to every peer and can never be taken back, so
before signing, ``PermissionAdmin`` checks it against what this gateway knows: the grantee must
name a configured destination, an allowed calling AE (a workstation) or a consortium gateway
(this one, a peer, a destination's site), unless the request says ``force``; a revocation by
grantee may also name one that an earlier grant of the patient named. A patient (or study)
with no anchored image on the ledger only draws a warning: consent may precede the images.
``dry_run`` runs every check and returns the record that would be signed, signing nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiohttp import web

from dicomledger.common.errors import DicomLedgerError
from dicomledger.config import Config
from dicomledger.ledger.log import LogWriter
from dicomledger.ledger.permission_book import PermissionBook
from dicomledger.ledger.permissions import Grant, Grantee, PermissionFormatError

if TYPE_CHECKING:  # (the CLI imports this module for `call`: keep pydicom out of its start-up)
    from dicomledger.atna import AuditSink

log = structlog.get_logger("dicomledger.admin")


class GatewayNotRunning(DicomLedgerError, RuntimeError):
    """No gateway answers on the admin socket."""


class AdminError(DicomLedgerError, RuntimeError):
    """The gateway refused an admin request; the message says why."""


def record_json(record: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": type(record).__name__.lower()}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if isinstance(value, Grantee):
            value = str(value)
        elif isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, tuple | frozenset):
            value = sorted(value) if isinstance(value, frozenset) else list(value)
        out[f.name] = value
    return out


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def unknown_grantee(grantee: Grantee, config: Config) -> str | None:
    """Why ``grantee`` names nothing this gateway's config knows, or None if it names something.

    Known gateways: our own origin, the [[peers]] and the sites of [[destinations]]. Known AE
    titles: the [[destinations]] and ``allowed_calling_aes`` (any AE if that lists "*"); the AE
    titles of a peer gateway are that gateway's business, so ``AE@peer`` is not checked further.
    """
    own = config.ledger.origin
    peers = {p.origin for p in config.peering.peers} if config.peering is not None else set()
    destinations = config.forwarding.destinations if config.forwarding is not None else ()
    sites = {own} | peers | {d.site for d in destinations if d.site is not None}
    if grantee.gateway is not None and grantee.gateway not in sites:
        return (
            f"grantee {grantee}: {grantee.gateway!r} is not a gateway of this consortium "
            f"(known: {', '.join(sorted(sites))})"
        )
    if grantee.ae is None or grantee.gateway in peers:
        return None
    if grantee.gateway in (None, own):
        if "*" in config.gateway.allowed_calling_aes:
            return None
        known = {d.ae_title for d in destinations} | set(config.gateway.allowed_calling_aes)
        what = "neither a [[destinations]] AE title nor an allowed calling AE here"
    else:  # a site known only from [[destinations]]
        known = {d.ae_title for d in destinations if d.site == grantee.gateway}
        what = f"not a [[destinations]] AE title of site {grantee.gateway}"
    if grantee.ae in known:
        return None
    return (
        f"grantee {grantee}: {grantee.ae!r} is {what} (known: {', '.join(sorted(known)) or 'none'})"
    )


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false")
    return value


class PermissionAdmin:
    """The `grant`, `revoke` and `permissions` actions, checked against this gateway's config."""

    def __init__(
        self,
        config: Config,
        book: PermissionBook,
        writer: LogWriter,
        audit: AuditSink | None = None,
    ) -> None:
        self.audit = (
            audit  # the ATNA trail: a Patient Record message per signed grant or revocation
        )
        self.config = config
        self.book = book
        self.writer = writer

    def handlers(self) -> dict[str, Handler]:
        return {"grant": self.grant, "revoke": self.revoke, "permissions": self.permissions}

    async def _warnings(self, patient: str, study: str | None) -> list[str]:
        if not await self.book.anchored_images(patient):
            return [
                "no image of this patient is anchored on the ledger this gateway holds; "
                "check the Patient ID (a record by this gateway as custodian counts only "
                "once it has anchored the patient's images)"
            ]
        if study is not None and not await self.book.anchored_images(patient, study):
            return [
                "no image of this patient in this study is anchored on the ledger this "
                "gateway holds; check the Study Instance UID"
            ]
        return []

    async def grant(self, body: dict[str, Any]) -> dict[str, Any]:
        grantee = Grantee.parse(body["to"])
        if not _flag(body, "force") and (problem := unknown_grantee(grantee, self.config)):
            raise PermissionFormatError(
                f"{problem}; check the spelling, or add --force to sign it anyway"
            )
        patient, study = body["patient"], body.get("study")
        answer = await self.book.grant(
            self.writer,
            patient=patient,
            grantee=grantee,
            study=study,
            until=body.get("until"),
            purpose=body.get("purpose", ""),
            consent=body.get("consent", ""),
            issuer=body.get("issuer"),
            dry_run=_flag(body, "dry_run"),
        )
        if self.audit is not None and "index" in answer:  # signed, not a dry run
            self.audit.permissions_changed(
                "grant", patient=patient, study=study, grantee=str(grantee), entry=answer["index"]
            )
        return {**answer, "warnings": await self._warnings(patient, study)}

    async def revoke(self, body: dict[str, Any]) -> dict[str, Any]:
        patient, to = body["patient"], body.get("to")
        grantee = Grantee.parse(to) if to else None
        if (
            grantee is not None
            and not _flag(body, "force")
            and (problem := unknown_grantee(grantee, self.config))
        ):
            granted = [
                r.grantee
                for r in (await self.book.history(patient)).records
                if isinstance(r, Grant)
            ]
            if not any(grantee.covers(g) for g in granted):
                raise PermissionFormatError(
                    f"{problem}, and no grant of this patient names it; check the spelling, "
                    "or add --force to sign it anyway"
                )
        answer = await self.book.revoke(
            self.writer,
            patient=patient,
            grants=body.get("grants", []),
            grantee=grantee,
            reason=body.get("reason", ""),
            issuer=body.get("issuer"),
            dry_run=_flag(body, "dry_run"),
        )
        if self.audit is not None and "index" in answer:
            self.audit.permissions_changed(
                "revocation", patient=patient, study=None, grantee=to, entry=answer["index"]
            )
        return {**answer, "warnings": await self._warnings(patient, None)}

    async def permissions(self, body: dict[str, Any]) -> dict[str, Any]:
        history = await self.book.history(body["patient"])
        return {
            "effective": [record_json(g) for g in history.state.effective],
            "ended": history.state.ended,
            "ignored": history.state.ignored,
            "malformed": history.malformed,
            "history": [record_json(r) for r in history.records],
        }


class AdminServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/v1/{action}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # left by a process that died; start() runs once per gateway
        old_umask = os.umask(0o077)  # the socket is created 0600: local administrator only
        try:
            await web.UnixSite(self._runner, str(self.path)).start()
        finally:
            os.umask(old_umask)
        log.info("admin interface listening", socket=str(self.path))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self.path.unlink(missing_ok=True)

    async def _handle(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        handler = self.handlers.get(action)
        if handler is None:
            return web.json_response({"error": f"unknown action {action!r}"}, status=404)
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            return web.json_response(await handler(body))
        except (PermissionFormatError, ValueError, KeyError, TypeError) as exc:
            log.warning("admin request refused", action=action, reason=str(exc))
            return web.json_response({"error": str(exc)}, status=400)


async def call(
    socket: Path, action: str, body: dict[str, Any], config_path: Path
) -> dict[str, Any]:
    """One admin request to the running gateway."""
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(socket)),
                timeout=aiohttp.ClientTimeout(total=60),
            ) as session,
            session.post(f"http://gateway/v1/{action}", json=body) as resp,
        ):
            answer: dict[str, Any] = await resp.json(content_type=None)
    except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError) as exc:
        raise GatewayNotRunning(
            f"the gateway is not running (nothing answers on its admin socket {socket}: {exc.__class__.__name__}); "
            f"start it with `dicomledger serve --config {config_path}` and try again"
        ) from None
    if resp.status != 200:
        raise AdminError(
            answer.get("error", f"status {resp.status}")
            if isinstance(answer, dict)
            else str(answer)
        )
    return answer
