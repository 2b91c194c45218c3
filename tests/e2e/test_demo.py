"""The realtime demo (examples/functions/realtime-demo) as a user gets it: built with its build.sh, deployed with
the real CLI to a real `mbworker serve`, opened in two headless Debian chromium pages (Playwright, no downloaded
browsers). Each page must show the other in its presence list, its cursor and its chat message; a closed page
leaves. Everything is read from the pages' DOM by tests/e2e/demo-driver.mjs.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import httpx
import pytest
import trio

from mbworker.worker.deployments.gather import deno_cache_dir, find_deno
from tests.conftest import require_binary
from tests.e2e.harness import E2E_DIR, ensure_node_modules
from tests.worker_process import REPO, RunningWorker, run_worker

DEMO = REPO / "examples" / "functions" / "realtime-demo"
BUNDLE = Path("page") / "realtime-js.js"


async def build_demo(dest: Path) -> Path:
    """A copy of the demo with its browser bundle built by its own build.sh (as `make run` does)."""
    fn = dest / "realtime-demo"
    shutil.copytree(DEMO, fn, ignore=shutil.ignore_patterns(BUNDLE.name))  # never a stale bundle from the tree
    env = {**os.environ, "DENO": find_deno(), "DENO_DIR": str(deno_cache_dir()), "NO_COLOR": "1"}
    with trio.fail_after(120):  # a cold npm cache downloads realtime-js; warm, it takes well under a second
        await trio.run_process(["sh", str(fn / "build.sh")], env=env, check=True)
    assert (fn / BUNDLE).stat().st_size > 10_000
    return fn


async def check_unbuilt(worker: RunningWorker, dest: Path) -> tuple[int, str, bool]:
    """Deployed without build.sh: the page still loads (and says so), the bundle answers 503 with the fix."""
    fn = dest / "realtime-demo-unbuilt"
    shutil.copytree(DEMO, fn, ignore=shutil.ignore_patterns(BUNDLE.name))
    await worker.deploy(fn)
    base = f"{worker.public_url}/functions/v1/{fn.name}"
    async with httpx.AsyncClient(timeout=20) as http:
        page = await http.get(base + "/")  # no Authorization: verify_jwt = false
        bundle = await http.get(base + "/realtime-js.js")
    config = page.text.split('<script id="demo-config" type="application/json">', 1)[1].split("</script>", 1)[0]
    return bundle.status_code, bundle.text, json.loads(config)["bundleReady"]


async def test_demo_two_pages(tmp_path: Path) -> None:
    node = require_binary("node")
    chromium = require_binary("chromium", "/usr/bin/chromium")
    ensure_node_modules(node)
    fn = await build_demo(tmp_path / "functions")
    async with run_worker(tmp_path / "data") as worker:
        await worker.deploy(fn)
        room = f"test-{uuid.uuid4().hex[:8]}"
        url = f"{worker.public_url}/functions/v1/realtime-demo"
        env = {**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"}
        with trio.fail_after(60):
            result = await trio.run_process(
                [node, str(E2E_DIR / "demo-driver.mjs"), url, chromium, room],
                cwd=E2E_DIR, env=env, capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
        unbuilt = await check_unbuilt(worker, tmp_path / "unbuilt")
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, f"driver exited {result.returncode}:\n{stdout}\n{stderr}"
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["errors"] == [], out
    # Public page (verify_jwt = false) with this worker's anon key and realtime endpoint filled in.
    assert out["http"] == {"Ada": 200, "Bob": 200}
    assert out["config"]["anonKey"] == worker.anon_key
    assert out["config"]["realtimeUrl"] == worker.public_url.replace("http", "ws", 1) + "/realtime/v1"
    assert out["status"] == {"Ada": "SUBSCRIBED", "Bob": "SUBSCRIBED"}
    # Presence: each page lists both people, itself marked.
    assert sorted(out["people"]["Ada"]) == sorted(out["people"]["Bob"]) == ["Ada", "Bob"]
    assert out["you"] == "Ada"
    # Cursor broadcasts, both ways, at the position the other page's pointer went to.
    seen_by_bob, seen_by_ada = out["cursors"]["seenByBob"], out["cursors"]["seenByAda"]
    assert seen_by_bob["name"] == "Ada"
    assert (seen_by_bob["x"], seen_by_bob["y"]) == pytest.approx((0.25, 0.6), abs=0.01)
    assert seen_by_ada["name"] == "Bob"
    assert (seen_by_ada["x"], seen_by_ada["y"]) == pytest.approx((0.75, 0.3), abs=0.01)
    # Chat broadcasts, both ways; a page shows its own message once (self: false, so no echo).
    assert out["chat"]["Ada"] == [
        {"from": "Ada", "text": "Ada: hello from Ada", "self": True},
        {"from": "Bob", "text": "Bob: hi Ada, Bob here", "self": False},
    ]
    assert out["chat"]["Bob"] == [
        {"from": "Ada", "text": "Ada: hello from Ada", "self": False},
        {"from": "Bob", "text": "Bob: hi Ada, Bob here", "self": True},
    ]
    # Closing Bob's page untracks him: Ada's list and board forget him.
    assert out["afterLeave"] == {"people": ["Ada"], "cursors": 0}
    # Deployed without its bundle: the page says it is not ready, and the bundle's URL says how to fix it.
    assert unbuilt == (
        503,
        "realtime-js.js was not built: run examples/functions/realtime-demo/build.sh, redeploy",
        False,
    )
