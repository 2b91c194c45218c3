"""Headless Debian chromium talks WebSocket to a function (`Deno.upgradeWebSocket`) through `mbworker serve`.

The function serves the page itself (a plain GET), accepts the page's `new WebSocket(...)` (text and binary echoed,
the subprotocol chosen, a close with a code from the browser) and takes the page's results as a POST, which it
logs: the test reads them from the daemon's output.
"""

from __future__ import annotations

import json
import subprocess
from functools import partial
from pathlib import Path

import trio

from tests.conftest import require_binary
from tests.daemon.conftest import BUNDLED_DENO
from tests.daemon.fixtures import write_function
from tests.e2e.harness import headless_chromium
from tests.worker_process import run_worker

PAGE = """<!doctype html><meta charset="utf-8"><title>ws</title><script>
const out = { errors: [], got: [] };
const ws = new WebSocket(location.href.replace(/^http/, "ws"), ["chat.v1", "chat.v2"]);
ws.binaryType = "arraybuffer";
ws.onerror = () => out.errors.push("error event");
ws.onopen = () => {
  out.protocol = ws.protocol;
  ws.send("hello from chromium");
  ws.send(new Uint8Array([1, 2, 3]));
};
ws.onmessage = (e) => {
  out.got.push(typeof e.data === "string" ? e.data : Array.from(new Uint8Array(e.data)));
  if (out.got.length === 3) ws.close(4002, "page done");
};
ws.onclose = (e) => {
  out.close = [e.code, e.reason, e.wasClean];
  fetch(location.href, { method: "POST", body: JSON.stringify(out) });
};
</script>"""

FUNCTION = """
const PAGE = __PAGE__;
Deno.serve(async (req) => {
  if (req.method === "POST") {
    console.log("RESULT " + await req.text());
    return new Response(null, { status: 204 });
  }
  if ((req.headers.get("upgrade") || "").toLowerCase() !== "websocket") {
    return new Response(PAGE, { headers: { "content-type": "text/html; charset=utf-8" } });
  }
  const { socket, response } = Deno.upgradeWebSocket(req, { protocol: "chat.v2" });
  socket.onopen = () => socket.send("welcome");
  socket.onmessage = (e) => {
    if (typeof e.data === "string") socket.send("echo: " + e.data);
    else socket.send(new Uint8Array(e.data).reverse());
  };
  socket.onclose = (e) => console.log(`browser socket closed ${e.code} ${e.reason}`);
  return response;
});
""".replace("__PAGE__", json.dumps(PAGE))


async def test_chromium_websocket_to_a_function(tmp_path: Path) -> None:
    require_binary("deno", BUNDLED_DENO)
    chromium = require_binary("chromium", "/usr/bin/chromium")
    async with run_worker(tmp_path / "data") as worker:
        await worker.deploy(write_function(tmp_path, "browserws", FUNCTION), "--no-verify-jwt")
        url = f"{worker.public_url}/functions/v1/browserws"
        args = headless_chromium(chromium, tmp_path / "profile", url)
        async with trio.open_nursery() as browser:
            run = partial(trio.run_process, args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            proc = await browser.start(run)
            line = await worker.wait_for_output("RESULT ", timeout=60)
            proc.terminate()
        await worker.wait_for_output("browser socket closed 4002 page done")
    result = json.loads(json.loads(line)["msg"].removeprefix("RESULT "))
    assert result["errors"] == []
    assert result["protocol"] == "chat.v2"
    assert result["got"] == ["welcome", "echo: hello from chromium", [3, 2, 1]]
    assert result["close"] == [4002, "page done", True]
