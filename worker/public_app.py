"""The public listener's router: functions, realtime (WebSocket + REST), health and readiness."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from mbworker.lib.http.types import HttpRequest, Responder, WebSocketHandler
from mbworker.worker.functions import PREFIX, FunctionsFrontDoor
from mbworker.worker.responses import send_error, send_json


class RealtimeEndpoint(Protocol):
    """What the router needs of the realtime service."""

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None: ...

    async def handle_http(self, request: HttpRequest, responder: Responder) -> bool: ...


class PublicApp:
    """HttpApp for the public port. `ready(local)` says whether this node takes new work (listeners up, not
    draining; `local`: leaving out what the whole cluster shares, worker/readiness.py)."""

    def __init__(
        self,
        functions: FunctionsFrontDoor,
        realtime: RealtimeEndpoint | None,
        ready: Callable[[bool], Awaitable[tuple[bool, dict[str, object]]]],
    ) -> None:
        self.functions = functions
        self.realtime = realtime
        self.ready = ready

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None:
        if request.path.startswith(PREFIX):
            return self.functions.websocket_handler(request)  # Deno.upgradeWebSocket (worker/function_sockets.py)
        if self.realtime is None:
            return None
        return self.realtime.websocket_handler(request)

    def handle_http(self, request: HttpRequest, responder: Responder) -> Coroutine[Any, Any, None]:
        # Function requests get the front door's coroutine itself: no coroutine of our own in between (a frame
        # per request on the hottest path). Everything else goes through `_other`.
        if request.path.startswith(PREFIX):
            return self.functions.handle(request, responder)
        return self._other(request, responder)

    async def _other(self, request: HttpRequest, responder: Responder) -> None:
        path = request.path
        if path == "/health":
            await send_json(responder, 200, {"status": "ok"})
        elif path == "/ready" or path == "/ready/local":
            ok, detail = await self.ready(path == "/ready/local")
            await send_json(responder, 200 if ok else 503, {"ready": ok, **detail})
        elif self.realtime is not None and await self.realtime.handle_http(request, responder):
            return
        else:
            await send_error(responder, 404, "NOT_FOUND", f"No route for {path}")
