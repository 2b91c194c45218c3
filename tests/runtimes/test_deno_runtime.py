"""The Deno runtime with real deno subprocesses: handler forms, streaming both ways, env, logs, examples."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from mbworker.runtimes.api import SocketClosed
from mbworker.runtimes.deno import DenoSettings
from mbworker.runtimes.errors import BootError, WorkerError
from tests.conftest import IN_CI
from tests.runtimes.test_deno_support import (
    EXAMPLES,
    LogSink,
    call,
    call_json,
    deno_bin,
    deno_runtime,
    fed_by,
    inv,
    version,
    write_fn,
)

ECHO = "(req: Request) => new Response(`${req.method} ${req.url}`)"

FORMS = {
    "serve_handler": f"Deno.serve({ECHO});",
    "serve_opts_handler": f"Deno.serve({{ port: 1234, hostname: '0.0.0.0' }}, {ECHO});",
    "serve_handler_in_opts": f"const s = Deno.serve({{ port: 1, handler: {ECHO} }}); s.finished.then(() => {{}});",
    "export_default_fetch": f"export default {{ fetch: {ECHO} }};",
    "node_http_listen": """
        import http from "node:http";
        http.createServer((req, res) => {
          res.setHeader("content-type", "text/plain");
          res.end(`${req.method} http://localhost${req.url}`);
        }).listen(3000);
    """,
}


@pytest.mark.parametrize("form", sorted(FORMS))
async def test_handler_forms(tmp_path: Path, form: str) -> None:
    fn = version(write_fn(tmp_path, FORMS[form]))
    async with deno_runtime(tmp_path) as rt:
        status, _, body = await call(rt, fn, "GET", "/fn/a/b?x=1&y=2")
        assert status == 200
        assert body == b"GET http://localhost/fn/a/b?x=1&y=2"
        status, _, body = await call(rt, fn, "POST", "/fn/p", b"data")
        assert (status, body) == (200, b"POST http://localhost/fn/p")


async def test_a_bundle_path_with_a_comma_is_a_clear_boot_error(tmp_path: Path) -> None:
    # Deno splits --allow-read at commas (and its ",," escape fails for directories): refuse, do not half-grant
    root = tmp_path / "data,dir"
    fn = version(write_fn(root, "Deno.serve(() => new Response('x'));"))
    async with deno_runtime(tmp_path) as rt:
        with pytest.raises(BootError, match="comma"):
            await call(rt, fn, "GET", "/fn")


async def test_request_url_falls_back_to_target(tmp_path: Path) -> None:
    fn = version(
        write_fn(tmp_path, "Deno.serve((req) => new Response(new URL(req.url).pathname + new URL(req.url).search));")
    )
    async with deno_runtime(tmp_path) as rt:
        i = inv("GET", "/fn/z?q=1")
        i.url = ""
        async with rt.invoke(fn, i) as res:
            assert b"".join([c async for c in res.body]) == b"/fn/z?q=1"


async def test_hello_example_query_and_json_body(tmp_path: Path) -> None:
    fn = version(EXAMPLES / "hello", slug="hello")
    async with deno_runtime(tmp_path) as rt:
        assert await call_json(rt, fn, "GET", "/hello?name=Ada") == {"message": "Hello Ada!"}
        assert await call_json(rt, fn, "POST", "/hello", b'{"name": "Grace"}') == {"message": "Hello Grace!"}
        status, headers, _ = await call(rt, fn, "POST", "/hello", b"not json")
        assert status == 400
        assert headers[b"content-type"] == b"application/json"


async def test_headers_round_trip_with_repeats(tmp_path: Path) -> None:
    src = """
        Deno.serve((req) => {
          const h = new Headers({ "x-got": req.headers.get("x-in") ?? "" });
          h.append("set-cookie", "a=1");
          h.append("set-cookie", "b=2");
          return new Response(null, { status: 204, headers: h });
        });
    """
    fn = version(write_fn(tmp_path, src))
    async with deno_runtime(tmp_path) as rt, rt.invoke(fn, inv("GET", "/fn", headers=[(b"x-in", b"v\xe9")])) as res:
        assert res.status == 204
        assert (b"x-got", b"v\xe9") in res.headers
        assert [v for k, v in res.headers if k == b"set-cookie"] == [b"a=1", b"b=2"]


async def test_bodies_stream_both_ways(tmp_path: Path) -> None:
    # The function echoes each request chunk as soon as it arrives: we only send chunk n+1 after reading echo n,
    # so this passes only if neither direction is buffered.
    src = """
        Deno.serve((req) => {
          const reader = req.body!.getReader();
          const body = new ReadableStream({
            async pull(c) {
              const { value, done } = await reader.read();
              if (done) { c.enqueue(new TextEncoder().encode("[end]")); c.close(); }
              else c.enqueue(new TextEncoder().encode(`<${new TextDecoder().decode(value)}>`));
            },
          });
          return new Response(body);
        });
    """
    fn = version(write_fn(tmp_path, src))
    send, recv = trio.open_memory_channel[bytes](0)

    async with deno_runtime(tmp_path) as rt, rt.invoke(fn, inv("POST", "/fn", fed_by(recv))) as res:
        it = aiter(res.body)
        for n in range(5):
            await send.send(f"chunk{n}".encode())
            with trio.fail_after(10):
                assert await anext(it) == f"<chunk{n}>".encode()
        await send.aclose()
        assert b"".join([c async for c in it]) == b"[end]"


async def test_large_response_flows_through_the_window(tmp_path: Path) -> None:
    src = """
        Deno.serve(() => {
          let n = 0;
          return new Response(new ReadableStream({
            pull(c) { if (n++ < 200) c.enqueue(new Uint8Array(8192).fill(n % 256)); else c.close(); },
          }));
        });
    """
    fn = version(write_fn(tmp_path, src))
    async with deno_runtime(tmp_path) as rt:
        status, _, body = await call(rt, fn, "GET", "/fn")
        assert status == 200
        assert len(body) == 200 * 8192


async def test_sse_event_arrives_before_the_response_ends(tmp_path: Path) -> None:
    # The stream sends one event, then waits until a second request releases it: reading the first event
    # while the function is still waiting proves it was not buffered until the end.
    src = """
        let release: () => void = () => {};
        const released = new Promise<void>((r) => (release = r));
        Deno.serve((req) => {
          if (new URL(req.url).pathname.endsWith("/release")) { release(); return new Response("ok"); }
          const enc = new TextEncoder();
          return new Response(new ReadableStream({
            async start(c) {
              c.enqueue(enc.encode("data: first\\n\\n"));
              await released;
              c.enqueue(enc.encode("data: second\\n\\n"));
              c.close();
            },
          }), { headers: { "content-type": "text/event-stream" } });
        });
    """
    fn = version(write_fn(tmp_path, src), max_processes=1)
    async with deno_runtime(tmp_path) as rt, rt.invoke(fn, inv("GET", "/fn/events")) as res:
        assert dict(res.headers)[b"content-type"] == b"text/event-stream"
        it = aiter(res.body)
        with trio.fail_after(10):
            assert await anext(it) == b"data: first\n\n"
        assert await call(rt, fn, "GET", "/fn/release") == (200, {b"content-type": b"text/plain;charset=UTF-8"}, b"ok")
        assert b"".join([c async for c in it]) == b"data: second\n\n"


async def test_sse_example_streams_events(tmp_path: Path) -> None:
    fn = version(EXAMPLES / "sse", slug="sse")
    async with deno_runtime(tmp_path) as rt:
        status, headers, body = await call(rt, fn, "GET", "/sse?count=3&interval_ms=10")
        assert status == 200
        assert headers[b"content-type"] == b"text/event-stream"
        events = [e for e in body.decode().split("\n\n") if e]
        assert [json.loads(e.split("data: ")[1])["n"] for e in events] == [1, 2, 3]


async def test_timers_are_numbers_and_a_leaked_interval_hurts_no_other_request(tmp_path: Path) -> None:
    """Written as edge-runtime functions are: `typeof id === "number"` before clearing, and a stream whose interval
    is never cleared (it throws on the closed stream once the client leaves). node:timers stays Node's."""
    src = """
        import { setTimeout as nodeSetTimeout } from "node:timers";
        Deno.serve((req) => {
          const path = new URL(req.url).pathname;
          if (path.endsWith("/types")) {
            const t = setTimeout(() => {}, 1000);
            const i = setInterval(() => {}, 1000);
            const n = nodeSetTimeout(() => {}, 1000);
            const out = { timeout: typeof t, interval: typeof i, node: typeof n };
            if (typeof t === "number") clearTimeout(t);
            if (typeof i === "number") clearInterval(i);
            clearTimeout(n);
            return Response.json(out);
          }
          if (path.endsWith("/cleared")) {
            return new Promise((resolve) => {
              const t = setTimeout(() => resolve(new Response("fired")), 50);
              clearTimeout(t);
              setTimeout(() => resolve(new Response("not fired")), 100);
            });
          }
          const enc = new TextEncoder();
          const slow = path.endsWith("/leak");
          let n = 0;
          const body = new ReadableStream({
            start(c) {
              // never cleared: after the client leaves, enqueue throws in the timer callback
              setInterval(() => { c.enqueue(enc.encode(`data: ${n++}\\n\\n`)); if (!slow && n === 20) c.close(); }, 5);
            },
          });
          return new Response(body, { headers: { "content-type": "text/event-stream" } });
        });
    """
    logs = LogSink()
    fn = version(write_fn(tmp_path, src), max_processes=1)
    async with deno_runtime(tmp_path, logs) as rt:
        types = await call_json(rt, fn, "GET", "/fn/types")
        assert types == {"timeout": "number", "interval": "number", "node": "object"}
        assert (await call(rt, fn, "GET", "/fn/cleared"))[2] == b"not fired"
        async with rt.invoke(fn, inv("GET", "/fn/leak")) as leak:
            async for _ in leak.body:
                break  # the client leaves after one event; the interval goes on and throws
        # other requests on the same process, while the leaked interval throws every 5 ms
        for _ in range(3):
            status, _, body = await call(rt, fn, "GET", "/fn/stream")
            assert status == 200
            assert body.count(b"data: ") == 20
        assert rt.statistics().cold_starts == 1
    assert any("Uncaught" in line or "TypeError" in line for _, _, stream, line in logs.lines if stream == "stderr")


async def test_env_is_exactly_the_functions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MBWORKER_SECRET", "host-only")
    src = "Deno.serve(() => Response.json(Deno.env.toObject()));"
    fn = version(write_fn(tmp_path, src), env={"SUPABASE_URL": "http://kong:8000", "MY_SECRET": "s3"})
    async with deno_runtime(tmp_path) as rt:
        env = await call_json(rt, fn, "GET", "/fn")
    assert env["SUPABASE_URL"] == "http://kong:8000"
    assert env["MY_SECRET"] == "s3"
    uuid.UUID(env.pop("SB_EXECUTION_ID"))
    for name in ("HOME", "PATH", "MBWORKER_SECRET", "DENO_DIR", "NO_COLOR", "USER", "PWD"):
        assert name not in env
    # what remains beyond the function's own env is deliberate and documented
    assert set(env) - {"SUPABASE_URL", "MY_SECRET"} <= {"TMPDIR", "TMP", "TEMP", "DENO_SERVE_ADDRESS"}


async def test_a_functions_env_never_overrides_the_runtimes_own(tmp_path: Path) -> None:
    """Deploys refuse these names; the spawn side drops them whatever reached it (a loader preload, Deno's and
    Node's knobs, a proxy around the deny list, the runtime's own TMPDIR and execution id, Deno's OpenTelemetry
    exporter, which sends from outside `--allow-net`, and its TLS key log, written outside `--allow-write`)."""
    src = """
        console.log("a log line the exporter would send");
        Deno.serve(() => Response.json({ env: Deno.env.toObject(), tmp: Deno.env.get('TMPDIR') }));
    """
    collector = socket.create_server(("127.0.0.1", 0))  # where the exporter would POST the function's logs
    keylog = tmp_path / "keys.log"
    hostile = {
        "OTEL_DENO": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.getsockname()[1]}",
        "SSLKEYLOGFILE": str(keylog),
        "LD_PRELOAD": "/nonexistent/evil.so",
        "DENO_V8_FLAGS": "--max-old-space-size=100000",
        "DENO_DIR": "/",
        "NODE_OPTIONS": "--require /nonexistent/evil.js",
        "PATH": "/evil",
        "TMPDIR": "/",
        "https_proxy": "http://10.0.0.1:3128",
        "SB_EXECUTION_ID": "forged",
    }
    fn = version(write_fn(tmp_path, src), env={**hostile, "MY_VAR": "kept"})
    async with deno_runtime(tmp_path) as rt:
        got = await call_json(rt, fn, "GET", "/fn")
    env = got["env"]
    assert env["MY_VAR"] == "kept"
    for name in ("LD_PRELOAD", "DENO_V8_FLAGS", "DENO_DIR", "NODE_OPTIONS", "PATH", "https_proxy", *hostile):
        if name not in ("TMPDIR", "SB_EXECUTION_ID"):  # the runtime's own values, checked below
            assert name not in env
    assert env["SB_EXECUTION_ID"] != "forged"
    assert got["tmp"] != "/"
    # the process has exited (the runtime closed): an exporter's connection would be waiting in the backlog
    with collector:
        collector.setblocking(False)
        with pytest.raises(BlockingIOError):
            collector.accept()
    assert not keylog.exists()


async def test_logs_are_captured_per_stream_with_execution_id(tmp_path: Path) -> None:
    src = """
        console.log("booting", { a: 1 });
        Deno.serve(() => {
          console.log("hello from log");
          console.error("oops on stderr");
          console.info("x".repeat(12000));
          return new Response(Deno.env.get("SB_EXECUTION_ID"));
        });
    """
    logs = LogSink()
    fn = version(write_fn(tmp_path, src))
    async with deno_runtime(tmp_path, logs) as rt:
        _, _, body = await call(rt, fn, "GET", "/fn")
    exec_id = body.decode()
    assert ("fn", exec_id, "stdout", "booting { a: 1 }") in logs.lines
    assert ("fn", exec_id, "stdout", "hello from log") in logs.lines
    assert ("fn", exec_id, "stderr", "oops on stderr") in logs.lines
    long = [line for *_, line in logs.lines if line.startswith("xxx")]
    assert len(long) == 1
    assert len(long[0]) < 10_100


async def test_a_log_flood_is_cut_to_the_functions_budget_and_counted(tmp_path: Path) -> None:
    flood = """
        Deno.serve((req) => {
          if (new URL(req.url).pathname.endsWith("/after")) {
            console.log("after the flood");
            return new Response("ok");
          }
          for (let i = 0; i < 100000; i++) console.log(`flood ${i}`);
          return new Response("done");
        });
    """
    logs = LogSink()
    noisy = version(write_fn(tmp_path, flood, name="noisy"), slug="noisy", max_processes=1)
    quiet = version(write_fn(tmp_path, "Deno.serve(() => new Response('quiet'));", name="quiet"), slug="quiet")
    async with deno_runtime(tmp_path, logs) as rt:
        await rt.warm(quiet)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, rt, noisy, "GET", "/noisy")
            for _ in range(5):  # another function answers while the flood is read
                assert (await call(rt, quiet, "GET", "/quiet"))[2] == b"quiet"
        assert (await call(rt, noisy, "GET", "/noisy/after"))[2] == b"ok"
        dropped = rt.statistics().log_lines_dropped
    flood_lines = [line for slug, _, _, line in logs.lines if slug == "noisy" and line.startswith("flood ")]
    assert dropped > 0
    assert len(flood_lines) + dropped == 100000  # every line either logged or counted
    assert len(flood_lines) < 100000
    notes = [line for slug, _, _, line in logs.lines if slug == "noisy" and "log lines dropped" in line]
    assert notes  # said once lines flowed again
    assert any(slug == "noisy" and line == "after the flood" for slug, _, _, line in logs.lines)


async def test_anything_written_to_stdout_is_a_log_line_and_frames_are_untouched(tmp_path: Path) -> None:
    """Every path Deno 2.9 has to fd 1 (console.time/count/table write to it directly): the function's stdout is
    its log stream, the frames travel elsewhere, and the process keeps serving."""
    src = """
        import process from "node:process";
        Deno.serve(async () => {
          console.time("t"); console.timeLog("t"); console.timeEnd("t");
          console.count("hits");
          console.table([{ a: 1 }]);
          await Deno.stdout.write(new TextEncoder().encode("raw bytes\\n"));
          Deno.stdout.writeSync(new TextEncoder().encode("sync bytes\\n"));
          process.stdout.write("node stdout\\n");
          console.warn("a warning");
          return new Response("still fine");
        });
    """
    logs = LogSink()
    fn = version(write_fn(tmp_path, src))
    async with deno_runtime(tmp_path, logs) as rt:
        assert (await call(rt, fn, "GET", "/fn"))[2] == b"still fine"
        assert (await call(rt, fn, "GET", "/fn"))[2] == b"still fine"
        assert rt.statistics().cold_starts == 1
    stdout = [line for _, _, stream, line in logs.lines if stream == "stdout"]
    stderr = [line for _, _, stream, line in logs.lines if stream == "stderr"]
    for text in ("raw bytes", "sync bytes", "node stdout"):
        assert stdout.count(text) == 2
    assert "hits: 1" in stdout
    assert "hits: 2" in stdout
    assert sum(line.startswith("t: ") for line in stdout) == 4  # timeLog and timeEnd, twice
    assert any("│" in line for line in stdout)  # the table's rows
    assert stderr.count("a warning") == 2


async def test_the_function_cannot_reach_the_frame_channel(tmp_path: Path) -> None:
    """The channel's path is in Deno.args; the bootstrap revoked what connecting needs and the daemon closed the
    listener, so a function (with `--allow-net`) that tries gets an error and the process serves on."""
    src = """
        Deno.serve(async () => {
          const path = Deno.args[3];
          try {
            const c = await Deno.connect({ transport: "unix", path });
            await c.write(new TextEncoder().encode("\\x00\\x00\\x00\\x02{}"));
            return new Response("connected");
          } catch (e) {
            return new Response(`refused: ${(e as Error).name}`);
          }
        });
    """
    fn = version(write_fn(tmp_path, src))
    async with deno_runtime(tmp_path) as rt:
        for _ in range(2):
            status, _, body = await call(rt, fn, "GET", "/fn")
            assert status == 200
            assert body.startswith(b"refused: "), body
        assert rt.statistics().cold_starts == 1


async def test_type_only_jsr_import_and_function_import_map(tmp_path: Path) -> None:
    src = """
        import "jsr:@supabase/functions-js/edge-runtime.d.ts";
        import { greet } from "shared/greet.ts";
        Deno.serve(() => new Response(greet("map")));
    """
    files = {
        "deno.json": '{\n  // JSONC is fine\n  "imports": { "shared/": "./lib/" },\n}\n',
        "lib/greet.ts": "export const greet = (s: string) => `hi ${s}`;\n",
    }
    fn = version(write_fn(tmp_path, src, files=files), import_map="deno.json")
    async with deno_runtime(tmp_path) as rt:
        assert (await call(rt, fn, "GET", "/fn"))[2] == b"hi map"


async def test_node_builtin_example(tmp_path: Path) -> None:
    fn = version(EXAMPLES / "node-builtin", slug="node-builtin")
    async with deno_runtime(tmp_path) as rt:
        got = await call_json(rt, fn, "POST", "/node-builtin", b"abc")
    assert got["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert got["base64"] == "YWJj"
    uuid.UUID(got["request_id"])


async def bundle(entry: Path, out: Path) -> None:
    """`deno bundle` as the deploy CLI runs it on the deployer's machine (fetches npm packages; skip offline)."""
    cache = Path.home() / ".cache" / "mbworker-test-deno"
    try:
        await trio.run_process(
            [deno_bin(), "bundle", "--quiet", str(entry), "-o", str(out)],
            env={**os.environ, "DENO_DIR": str(cache), "NO_COLOR": "1"},  # the host's proxy/CA settings too
            capture_stdout=True,
            capture_stderr=True,
        )
    except subprocess.CalledProcessError as exc:
        if IN_CI:
            raise
        pytest.skip(f"deno bundle needs the npm registry: {exc.stderr.decode()[-300:]}")


async def test_npm_example_runs_bundled_without_network(tmp_path: Path) -> None:
    out = tmp_path / "bundle" / "index.js"
    await bundle(EXAMPLES / "npm-dep" / "index.ts", out)
    fn = version(out.parent, slug="npm-dep", entry="index.js")
    async with deno_runtime(tmp_path) as rt:
        assert await call_json(rt, fn, "GET", "/npm-dep?d=2%20days") == {"ms": 172800000, "pretty": "2d"}
        # the unbundled source needs npm: at boot, which the worker cannot fetch
        with pytest.raises(BootError) as info:
            await rt.warm(version(EXAMPLES / "npm-dep", slug="npm-src"))
        assert "deploy with `mbworker deploy`" in info.value.message


async def test_express_app_listen_bundled(tmp_path: Path) -> None:
    src = write_fn(
        tmp_path,
        """
        import express from "npm:express@4.21.2";
        const app = express();
        app.use(express.json());
        app.get("/ex/hi", (req, res) => res.json({ hi: req.query.name }));
        app.post("/ex/echo", (req, res) => res.status(201).json(req.body));
        app.listen(3000, () => console.log("express listening"));
        """,
        name="ex-src",
    )
    out = tmp_path / "ex" / "index.js"
    await bundle(src / "index.ts", out)
    fn = version(out.parent, slug="ex", entry="index.js")
    async with deno_runtime(tmp_path) as rt:
        assert await call_json(rt, fn, "GET", "/ex/hi?name=bob") == {"hi": "bob"}
        status, _, body = await call(
            rt, fn, "POST", "/ex/echo", b'{"a": [1, 2]}', headers=[(b"content-type", b"application/json")]
        )
        assert (status, json.loads(body)) == (201, {"a": [1, 2]})


async def test_wait_until_and_beforeunload_on_retire(tmp_path: Path) -> None:
    src = """
        addEventListener("beforeunload", (ev) => console.log(`unload: ${(ev as CustomEvent).detail.reason}`));
        Deno.serve(() => {
          EdgeRuntime.waitUntil(new Promise((r) => setTimeout(r, 200)).then(() => console.log("background: done")));
          return new Response("accepted", { status: 202 });
        });
    """
    fn = version(write_fn(tmp_path, src))
    logs = LogSink()
    async with deno_runtime(tmp_path, logs) as rt:
        assert (await call(rt, fn, "GET", "/fn"))[0] == 202
        await rt.retire(fn)
        with trio.fail_after(10):
            await rt.wait_stopped(fn)
    lines = [line for *_, line in logs.lines]
    assert "background: done" in lines  # waitUntil work finished before the process stopped
    assert "unload: retired" in lines


def test_settings_deno_bin_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MBWORKER_DENO", "/opt/deno")
    assert DenoSettings().deno_bin == "/opt/deno"


async def test_leaving_early_cancels_the_request_in_the_function(tmp_path: Path) -> None:
    src = """
        let aborted = 0;
        Deno.serve((req) => {
          if (new URL(req.url).pathname === "/fn/count") return new Response(String(aborted));
          req.signal.addEventListener("abort", () => aborted++);
          return new Response(new ReadableStream({ pull(c) { c.enqueue(new Uint8Array(1024)); } }));
        });
    """
    fn = version(write_fn(tmp_path, src), max_processes=1)
    async with deno_runtime(tmp_path) as rt:
        async with rt.invoke(fn, inv("GET", "/fn/endless")) as res:
            async for _ in res.body:
                break  # the client goes away after one chunk
        with trio.fail_after(10):
            while (await call(rt, fn, "GET", "/fn/count"))[2] != b"1":  # noqa: ASYNC110 - asks the function
                await trio.sleep(0.01)


async def test_response_over_the_cap_is_a_worker_error(tmp_path: Path) -> None:
    src = "Deno.serve(() => new Response(new Uint8Array(300_000)));"
    fn = version(write_fn(tmp_path, src), max_response_bytes=100_000)
    async with deno_runtime(tmp_path) as rt:
        with pytest.raises(WorkerError, match="exceeded"):
            await call(rt, fn, "GET", "/fn")
        assert rt.statistics().processes == 1


async def test_a_body_the_function_never_read_is_closed_when_its_response_is_done(tmp_path: Path) -> None:
    """A function that answers before reading its request body: the daemon stops sending it and closes the body
    stream itself (not the garbage collector, where an async generator left suspended warns out of its task)."""
    import trio.testing

    fn = version(write_fn(tmp_path, "Deno.serve(() => new Response('early'));"))
    released = trio.Event()
    closed = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal closed
        try:
            await released.wait()
            yield b"data"
            yield b"more"
        finally:
            closed = True

    async with deno_runtime(tmp_path) as rt, rt.invoke(fn, inv("POST", "/fn", body())) as res:
        assert b"".join([c async for c in res.body]) == b"early"
        released.set()  # the body's first chunk comes after the response ended
        await trio.testing.wait_all_tasks_blocked()
        assert closed


WS_ECHO = """
Deno.serve((req) => {
  const { socket, response } = Deno.upgradeWebSocket(req, { protocol: "p1" });
  socket.onmessage = (e) => socket.send(typeof e.data === "string" ? `echo ${e.data}` : e.data);
  socket.onclose = (e) => console.log(`closed ${e.code} ${e.reason}`);
  addEventListener("beforeunload", () => console.log(`unload with socket ${socket.readyState}`));
  return response;
});
"""
UPGRADE = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket"), (b"sec-websocket-key", b"k")]


async def test_a_function_socket_through_the_runtime_and_a_planned_stop(tmp_path: Path) -> None:
    """`FunctionSocket` without the front door: messages both ways past the window, then a planned stop
    (shutdown, deploy) closes the socket from the function's side with 1001 and the request ends."""
    fn = version(write_fn(tmp_path, WS_ECHO))
    logs = LogSink()
    async with deno_runtime(tmp_path, logs) as rt:
        # Not sent as an upgrade (the front door could not complete it): Deno.upgradeWebSocket throws.
        with pytest.raises(WorkerError):
            await call(rt, fn, "GET", "/fn", headers=UPGRADE)
        i = inv("GET", "/fn", headers=UPGRADE)
        i.upgrade = True
        async with rt.invoke(fn, i) as res:
            socket = res.socket
            assert socket is not None
            assert (res.status, socket.protocol) == (101, "p1")
            await socket.opened(1000)
            with trio.fail_after(20):
                for n in range(40):  # more than a window each way
                    await socket.send(f"m{n}")
                    await socket.send(b"\x00" * n)
                    assert await socket.receive() == f"echo m{n}"
                    assert await socket.receive() == b"\x00" * n
            proc = next(p for pool in rt._pools.values() for p in pool.processes)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(proc.stop, "test", 10)
                with trio.fail_after(20):
                    closed = await socket.receive()
                assert closed == SocketClosed(1001, "the function is shutting down")
                await socket.close(1001, "the function is shutting down")
    said = [line for _, _, _, line in logs.lines]  # the runtime is closed: every line is in
    assert any("the request did not come from Deno.serve" in line for line in said)
    assert "unload with socket 1" in said
    assert "closed 1001 the function is shutting down" in said
