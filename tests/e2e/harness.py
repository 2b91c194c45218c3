"""The real front door (worker.http.server.serve_http) with RealtimeService as its app, for e2e tests/bench."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

from mbworker.lib.http.server import HttpServer, serve_http
from mbworker.lib.http.types import HttpRequest, Responder, WebSocketHandler
from mbworker.realtime import RealtimeService, RealtimeSettings, open_realtime

E2E_DIR = Path(__file__).parent


class RealtimeApp:
    """The smallest HttpApp: realtime's WebSocket and REST routes, 404 for the rest."""

    def __init__(self, service: RealtimeService) -> None:
        self.service = service

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None:
        return self.service.websocket_handler(request)

    async def handle_http(self, request: HttpRequest, responder: Responder) -> None:
        if not await self.service.handle_http(request, responder):
            await responder.send(404, [(b"content-type", b"application/json")], b'{"error":"not found"}')


@asynccontextmanager
async def serve_realtime_http(
    settings: RealtimeSettings, secret: str, **kw: Any
) -> AsyncIterator[tuple[RealtimeService, HttpServer]]:
    async with open_realtime(settings, jwt_secret=secret, node_id="e2e", **kw) as service:  # noqa: SIM117
        async with trio.open_nursery() as nursery:
            server: HttpServer = await nursery.start(partial(serve_http, RealtimeApp(service), "127.0.0.1", 0))
            yield service, server
            nursery.cancel_scope.cancel()


_npm_done = False


def ensure_node_modules(node: str) -> None:
    """`npm ci` once per session (the CI test command also runs it); skipped when node_modules is current."""
    global _npm_done
    if _npm_done:
        return
    lock = E2E_DIR / "package-lock.json"
    marker = E2E_DIR / "node_modules" / ".package-lock.json"
    if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        npm = str(Path(node).with_name("npm"))
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=E2E_DIR, check=True, timeout=300,
                       env={**os.environ})  # fmt: skip
    _npm_done = True


def headless_chromium(chromium: str, profile: Path, url: str) -> list[str]:
    """Debian's chromium opening `url` headless, with a profile of its own and nothing that phones home."""
    quiet = ["--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", *quiet, f"--user-data-dir={profile}", url]
