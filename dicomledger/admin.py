"""The local admin interface: `dicomledger grant`, `revoke` and `permissions` act through the
running gateway, so one process appends to the log (its single writer) and decisions use what
it holds. HTTP over a Unix socket (``[gateway] admin_socket``, mode 0600): only the local
administrator account reaches it; nothing listens on the network.

Patient IDs and Study Instance UIDs never reach the gateway through this interface: the CLI
pseudonymises them first with the consortium secret.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from dicomledger.ledger.permissions import Grantee, PermissionFormatError

log = structlog.get_logger("dicomledger.admin")


class GatewayNotRunning(RuntimeError):
    """No gateway answers on the admin socket."""


class AdminError(RuntimeError):
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


async def call(socket: Path, action: str, body: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """One admin request to the running gateway."""
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(socket)), timeout=aiohttp.ClientTimeout(total=60)
        ) as session, session.post(f"http://gateway/v1/{action}", json=body) as resp:
            answer = await resp.json(content_type=None)
    except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError) as exc:
        raise GatewayNotRunning(
            f"the gateway is not running (nothing answers on its admin socket {socket}: {exc.__class__.__name__}); "
            f"start it with `dicomledger serve --config {config_path}` and try again"
        ) from None
    if resp.status != 200:
        raise AdminError(answer.get("error", f"status {resp.status}") if isinstance(answer, dict) else str(answer))
    return answer
