"""Headless Debian chromium runs a page with the bundled (esbuild) realtime-js against the real front door.

The page and bundle are served by the same HttpApp as realtime (same origin); the page POSTs its results to
/result. No CDN, no downloaded browsers.
"""

from __future__ import annotations

import json
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import trio

from mbworker.lib.http.server import serve_http
from mbworker.lib.http.types import HttpRequest, Responder
from mbworker.realtime import RealtimeSettings, open_realtime
from tests.conftest import require_binary
from tests.e2e.harness import E2E_DIR, RealtimeApp, ensure_node_modules, headless_chromium
from tests.realtime.helpers import ANON, SECRET


class PageApp(RealtimeApp):
    def __init__(self, service, bundle: bytes, results: trio.MemorySendChannel[dict[str, Any]]) -> None:  # type: ignore[no-untyped-def]
        super().__init__(service)
        self.bundle = bundle
        self.results = results

    async def handle_http(self, request: HttpRequest, responder: Responder) -> None:
        if request.path == "/" and request.method == "GET":
            page = (E2E_DIR / "browser-page.html").read_bytes()
            await responder.send(200, [(b"content-type", b"text/html; charset=utf-8")], page)
        elif request.path == "/bundle.js":
            await responder.send(200, [(b"content-type", b"text/javascript")], self.bundle)
        elif request.path == "/result" and request.method == "POST":
            body = await request.body.read_all(1 << 20)
            await responder.send(204, [])
            self.results.send_nowait(json.loads(body))
        else:
            await super().handle_http(request, responder)


def build_bundle(node: str, out: Path) -> bytes:
    esbuild = E2E_DIR / "node_modules" / ".bin" / "esbuild"
    subprocess.run(
        [str(esbuild), str(E2E_DIR / "browser-entry.mjs"), "--bundle", "--format=iife", "--platform=browser",
         f"--outfile={out}", "--log-level=warning"],
        cwd=E2E_DIR, check=True, timeout=60,
    )  # fmt: skip
    return out.read_bytes()


async def test_browser_presence_and_broadcast(tmp_path: Path) -> None:
    node = require_binary("node")
    chromium = require_binary("chromium", "/usr/bin/chromium")
    ensure_node_modules(node)
    bundle = await trio.to_thread.run_sync(build_bundle, node, tmp_path / "bundle.js")
    send, recv = trio.open_memory_channel[dict[str, Any]](1)
    async with open_realtime(RealtimeSettings(), jwt_secret=SECRET, node_id="browser") as service:  # noqa: SIM117
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_http, PageApp(service, bundle, send), "127.0.0.1", 0)
            url = f"http://127.0.0.1:{server.port}/?apikey={ANON}"
            args = headless_chromium(chromium, tmp_path / "profile", url)
            async with trio.open_nursery() as browser:
                run = partial(trio.run_process, args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
                proc = await browser.start(run)
                with trio.fail_after(45):
                    result = await recv.receive()
                proc.terminate()
            nursery.cancel_scope.cancel()
    assert result["errors"] == []
    assert result["ua"] is True
    assert result["subscribed"] == ["SUBSCRIBED", "SUBSCRIBED"]
    assert result["track"] == ["ok", "ok"]
    assert result["presence1"] == result["presence2"] == ["one", "two"]
    assert result["send"] == ["ok", "ok"]
    assert result["http"] == {"success": True}
    froms1 = sorted(p["from"] for p in result["got"]["one"])
    froms2 = sorted(p["from"] for p in result["got"]["two"])
    assert froms1 == ["rest", "two"]  # self:false: its own broadcast is not echoed
    assert froms2 == ["one", "rest"]
