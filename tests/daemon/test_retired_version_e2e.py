"""A request admitted for a version that is retired before the runtime takes it (its body still arriving, past the
window the front door reads first): it runs on the version live now, or gets 404 when the function was deleted.
The retired version is never booted again, so nothing of it is left behind."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.fixtures import write_function
from tests.worker_process import RunningWorker

BODY = 100_000
"""Over the 64 KiB the front door reads before it invokes: the function runs only once the rest has come."""
FIRST = 1000
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "functions"
SOURCE = "Deno.serve(async (req) => new Response(`{name} got ${{(await req.arrayBuffer()).byteLength}}`));"


async def _begin_post(worker: RunningWorker, slug: str, *, auth: bool = True) -> trio.SocketStream:
    """A POST to `slug` with only its head and the first bytes of its body sent."""
    port = int(worker.public_url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    authorization = f"authorization: Bearer {worker.anon_key}\r\n" if auth else ""
    head = (
        f"POST /functions/v1/{slug} HTTP/1.1\r\nhost: x\r\n{authorization}"
        f"content-length: {BODY}\r\nconnection: close\r\n\r\n"
    )
    await stream.send_all(head.encode() + b"x" * FIRST)
    return stream


async def _finish_post(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """Send the rest of the body; the response's head (lower-cased) and body."""
    async with stream:
        await stream.send_all(b"x" * (BODY - FIRST))
        received = b""
        with trio.fail_after(60):
            while chunk := await stream.receive_some():
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head.lower(), body


async def _boots(worker: RunningWorker, http: httpx.AsyncClient, runtime: str = "deno") -> tuple[float, float]:
    """The runtime's cold starts and boot failures so far."""
    text = (
        await http.get(f"{worker.admin_url}/metrics", headers={"authorization": f"Bearer {worker.admin_token}"})
    ).text
    values = {"mbworker_runtime_cold_starts_total": 0.0, "mbworker_runtime_boot_failures_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in values and sample.labels.get("runtime") == runtime:
                values[sample.name] = float(sample.value)
    return values["mbworker_runtime_cold_starts_total"], values["mbworker_runtime_boot_failures_total"]


def _version_dirs(worker: RunningWorker, slug: str) -> set[Path]:
    """The Deno runtime's scratch dirs of `slug`'s versions (`<slug>-<version>-<hex>`, one per pool)."""
    return set((worker.data_dir / "scratch" / "deno").glob(f"run-*/{slug}-*"))


async def test_a_slow_body_across_a_redeploy_runs_on_the_new_version(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fn = write_function(tmp_path, "echo", SOURCE.format(name="v1"))
    await worker.deploy(fn)
    r = await http.post(f"{worker.public_url}/functions/v1/echo", headers=worker.auth(), content=b"warm")
    assert r.text == "v1 got 4"  # v1 runs: the redeploy retires a pool with a process
    stream = await _begin_post(worker, "echo")
    (fn / "index.ts").write_text(SOURCE.format(name="v2"))
    await worker.deploy(fn)  # returns once v2 is live and v1 retired
    boots, dirs = await _boots(worker, http), _version_dirs(worker, "echo")
    head, body = await _finish_post(stream)
    assert head.startswith(b"http/1.1 200"), head
    assert b"x-mbworker-version: 2" in head
    assert body == f"v2 got {BODY}".encode()
    await worker.wait_for_output("echo@1 was retired while a request waited for it: it runs on v2")
    assert await _boots(worker, http) == boots  # v1 was not booted again
    assert _version_dirs(worker, "echo") <= dirs  # nor given a new pool (each makes its own dir)


async def test_a_slow_body_across_a_delete_gets_404(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    await worker.deploy(write_function(tmp_path, "gone", SOURCE.format(name="v1")))
    r = await http.post(f"{worker.public_url}/functions/v1/gone", headers=worker.auth(), content=b"warm")
    assert r.text == "v1 got 4"
    stream = await _begin_post(worker, "gone")
    await worker.cli("functions", "delete", "gone", check=True)
    boots, dirs = await _boots(worker, http), _version_dirs(worker, "gone")
    head, body = await _finish_post(stream)
    assert head.startswith(b"http/1.1 404"), head
    assert b"sb-error-code: not_found" in head
    assert b'"NOT_FOUND"' in body
    await worker.wait_for_output("gone@1")  # the front door's log of the 404: the request was admitted for v1
    assert await _boots(worker, http) == boots  # nothing booted: no BOOT_ERROR from a deleted bundle
    assert _version_dirs(worker, "gone") <= dirs


async def test_the_new_versions_gate_applies_to_a_request_admitted_by_the_old_one(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fn = write_function(tmp_path, "door", SOURCE.format(name="v1"), toml="verify_jwt = false\n")
    await worker.deploy(fn)
    stream = await _begin_post(worker, "door", auth=False)  # v1 lets it in without a JWT
    (fn / "function.toml").write_text("verify_jwt = true\n")
    await worker.deploy(fn)
    head, _ = await _finish_post(stream)
    assert head.startswith(b"http/1.1 401"), head  # v2 wants one: the request does not run there without it


async def test_a_wasm_function_deleted_under_a_slow_body_gets_404(
    worker: RunningWorker, http: httpx.AsyncClient
) -> None:
    await worker.deploy(EXAMPLES / "wasm-echo")
    r = await http.post(f"{worker.public_url}/functions/v1/wasm-echo", headers=worker.auth(), content=b"warm")
    assert r.json()["body"] == "warm"
    stream = await _begin_post(worker, "wasm-echo")
    await worker.cli("functions", "delete", "wasm-echo", check=True)
    boots = await _boots(worker, http, "wasm")
    head, _ = await _finish_post(stream)
    assert head.startswith(b"http/1.1 404"), head
    assert await _boots(worker, http, "wasm") == boots  # the deleted module was not compiled (nor failed to) again
