"""The foundation issue through its real interfaces: `mbworker serve` as a subprocess, `mbworker deploy`, HTTP."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import trio

from mbworker.lib.http.types import EmptyBody, HttpRequest
from mbworker.worker.functions import TrustedProxies, forwarded_headers
from tests.daemon.fixtures import write_function
from tests.processes import deno_processes
from tests.worker_process import RunningWorker, run_worker, stop_worker

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "functions"


async def test_hello_example_deploys_and_answers(worker: RunningWorker, http: httpx.AsyncClient) -> None:
    result = await worker.deploy(EXAMPLES / "hello")
    assert b"hello v1" in result.stdout
    r = await http.get(f"{worker.public_url}/functions/v1/hello?name=Ada", headers=worker.auth())
    assert r.status_code == 200, r.text
    assert "Ada" in r.text
    assert r.headers["x-mbworker-version"] == "1"
    r = await http.post(f"{worker.public_url}/functions/v1/hello", headers=worker.auth(), json={"name": "Grace"})
    assert r.status_code == 200
    assert "Grace" in r.text


async def test_jwt_gate_and_error_shapes(worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path) -> None:
    fn = write_function(tmp_path, "gate", "Deno.serve(() => new Response('inside'))")
    await worker.deploy(fn)
    url = f"{worker.public_url}/functions/v1/gate"

    r = await http.get(url)
    assert r.status_code == 401
    assert r.headers["sb-error-code"] == "UNAUTHORIZED_NO_AUTH_HEADER"
    assert r.json()["code"] == "UNAUTHORIZED_NO_AUTH_HEADER"

    r = await http.get(url, headers={"authorization": "Bearer not.a.jwt"})
    assert r.status_code == 401
    forged = worker.anon_key[:-4] + ("AAAA" if not worker.anon_key.endswith("AAAA") else "BBBB")
    r = await http.get(url, headers={"authorization": f"Bearer {forged}"})
    assert r.status_code == 401
    assert r.json()["code"] == "UNAUTHORIZED_LEGACY_JWT"

    secret = (worker.data_dir / "secrets" / "jwt_secret").read_text().strip()
    no_exp = jwt.encode({"role": "anon"}, secret, algorithm="HS256")  # Supabase requires exp and role
    r = await http.get(url, headers={"authorization": f"Bearer {no_exp}"})
    assert (r.status_code, r.json()["code"]) == (401, "UNAUTHORIZED_LEGACY_JWT")

    r = await http.options(url)  # CORS preflight passes the gate untouched
    assert r.status_code == 200
    assert r.text == "inside"
    r = await http.get(url, headers=worker.auth(worker.service_role_key))
    assert r.text == "inside"

    r = await http.get(f"{worker.public_url}/functions/v1/missing", headers=worker.auth())
    assert r.status_code == 404
    assert r.json()["code"] == "NOT_FOUND"
    for method in ("TRACE", "HEAD"):  # Supabase's list has no HEAD either
        r = await http.request(method, url, headers=worker.auth())
        assert (r.status_code, r.headers["sb-error-code"]) == (405, "METHOD_NOT_ALLOWED"), method
        assert r.headers["allow"] == "GET, POST, PUT, PATCH, DELETE, OPTIONS"

    open_fn = write_function(tmp_path, "open", "export default { fetch: () => new Response('open') }")
    await worker.deploy(open_fn, "--no-verify-jwt")
    r = await http.get(f"{worker.public_url}/functions/v1/open")
    assert r.status_code == 200
    assert r.text == "open"


async def test_function_sees_its_path_and_env_only(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    source = """
    Deno.serve((req) => Response.json({
      url: req.url, method: req.method, env: Deno.env.toObject(), headers: Object.fromEntries(req.headers),
    }));
    """
    fn = write_function(tmp_path, "envy", source, toml='[env]\nMY_SECRET = "s3cret"\n')
    other = write_function(tmp_path, "other", source, toml='[env]\nOTHER_SECRET = "nope"\n')
    env_file = tmp_path / "extra.env"
    env_file.write_text("FROM_FILE=yes\n")
    await worker.deploy(fn, "--env-file", str(env_file))
    await worker.deploy(other)
    r = await http.get(
        f"{worker.public_url}/functions/v1/envy/a/b?x=1&y=2",
        headers={**worker.auth(), "x-request-id": "req-42", "connection": "keep-alive", "x-custom": "kept"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    host = worker.public_url.removeprefix("http://")
    assert body["url"] == f"http://{host}/envy/a/b?x=1&y=2"
    seen = body["headers"]
    assert (seen["x-custom"], seen["x-request-id"], seen["host"]) == ("kept", "req-42", host)
    assert (seen["x-forwarded-for"], seen["x-forwarded-proto"], seen["x-forwarded-host"]) == ("127.0.0.1", "http", host)
    assert "connection" not in seen  # hop-by-hop: the connection's business, not the function's
    env = body["env"]
    assert env["MY_SECRET"] == "s3cret"
    assert env["FROM_FILE"] == "yes"
    assert env["SUPABASE_URL"].startswith("http")
    assert env["SUPABASE_ANON_KEY"] == worker.anon_key
    assert json.loads(env["SUPABASE_PUBLISHABLE_KEYS"]) == {"default": worker.anon_key}
    assert json.loads(env["SUPABASE_JWKS"]) == {"keys": []}
    assert env["SUPABASE_SERVICE_ROLE_KEY"] == worker.service_role_key
    assert env["DENO_DEPLOYMENT_ID"].endswith("_envy_1")
    assert env.get("SB_EXECUTION_ID")
    assert "OTHER_SECRET" not in env
    for leaked in ("HOME", "PATH", "PWD"):
        assert leaked not in env
    assert not [k for k in env if k.startswith("MBWORKER_")]


async def test_error_codes_and_recovery(worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path) -> None:
    source = """
    Deno.serve(async (req) => {
      const what = new URL(req.url).searchParams.get("do");
      if (what === "throw") throw new Error("handler blew up");
      if (what === "exit") Deno.exit(3);
      if (what === "spin") { while (true) {} }
      if (what === "bomb") { const keep = []; while (true) keep.push(new Array(1e6).fill(Math.random())); }
      if (what === "slow") { await new Promise((r) => setTimeout(r, 60000)); }
      if (what === "status") return new Response("odd", { status: 99 < 100 ? 600 : 200 });
      return new Response("fine");
    });
    """
    # the idle timeout leaves a starved spinner (a loaded CI machine) time to reach its 500 ms of CPU
    limits = "[limits]\ncpu_time_ms = 500\nmemory_mb = 64\nrequest_idle_timeout_s = 6\n"
    await worker.deploy(write_function(tmp_path, "faulty", source, toml=limits))
    url = f"{worker.public_url}/functions/v1/faulty"

    async def call(what: str) -> httpx.Response:
        return await http.get(url, params={"do": what}, headers=worker.auth())

    r = await call("throw")
    assert (r.status_code, r.json()["code"], r.headers["sb-error-code"]) == (500, "WORKER_ERROR", "WORKER_ERROR")
    assert (await call("ok")).text == "fine"

    r = await call("exit")
    assert r.status_code == 500
    assert (await call("ok")).text == "fine"

    r = await call("spin")
    assert r.status_code == 546
    assert r.json()["code"] == "WORKER_LIMIT"
    assert (await call("ok")).text == "fine"

    r = await call("bomb")
    assert r.status_code == 546
    assert (await call("ok")).text == "fine"

    r = await call("slow")
    assert r.status_code == 504
    assert r.json()["code"] == "IDLE_TIMEOUT"

    r = await call("status")
    assert r.status_code == 500
    assert (await call("ok")).text == "fine"


async def test_boot_failure_keeps_previous_version(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fn = write_function(tmp_path, "stable", "Deno.serve(() => new Response('v1 works'))")
    await worker.deploy(fn)
    (fn / "index.ts").write_text("throw new Error('broken at top level');\n")
    result = await worker.cli("deploy", str(fn))
    assert result.returncode != 0
    assert b"BOOT_ERROR" in result.stderr
    assert b"broken at top level" in result.stderr
    r = await http.get(f"{worker.public_url}/functions/v1/stable", headers=worker.auth())
    assert r.status_code == 200
    assert r.text == "v1 works"
    assert r.headers["x-mbworker-version"] == "1"

    # A static remote import is caught on the deploying machine (deno bundle has no network to it either).
    (fn / "index.ts").write_text(
        "import 'https://deno.land/std@0.200.0/http/server.ts';\nDeno.serve(() => new Response('x'))\n"
    )
    result = await worker.cli("deploy", str(fn))
    assert result.returncode != 0
    assert b"deno.land" in result.stderr

    # One only the worker sees (a computed specifier) fails to boot there: the worker has no network to fetch it.
    (fn / "index.ts").write_text(
        "const host = ['deno', 'land'].join('.');\n"
        "await import(`https://${host}/std@0.200.0/http/server.ts`);\n"
        "Deno.serve(() => new Response('x'))\n"
    )
    result = await worker.cli("deploy", str(fn))
    assert result.returncode != 0
    assert b"BOOT_ERROR" in result.stderr
    r = await http.get(f"{worker.public_url}/functions/v1/stable", headers=worker.auth())
    assert r.text == "v1 works"
    assert r.headers["x-mbworker-version"] == "1"


async def test_bad_archives_are_refused_with_a_reason(worker: RunningWorker, http: httpx.AsyncClient) -> None:
    def tar_with(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        return buf.getvalue()

    admin = {"authorization": f"Bearer {worker.admin_token}"}
    url = f"{worker.admin_url}/admin/v1/functions/evil/deploy"
    for archive in (tar_with("../escape.ts"), tar_with("/abs.ts"), tar_with("link", kind=tarfile.SYMTYPE), b"junk"):
        r = await http.post(url, content=archive, headers=admin)
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["message"]
    assert not (worker.data_dir.parent / "escape.ts").exists()
    r = await http.post(url, content=b"x", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = await http.get(f"{worker.admin_url}/admin/v1/functions")
    assert r.status_code == 401


async def test_concurrent_deploys_get_distinct_versions_and_rollback(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fns = []
    for i in range(4):
        fns.append(write_function(tmp_path / f"copy{i}", "multi", f"Deno.serve(() => new Response('copy {i}'))"))
    results: list[bytes] = []

    async def deploy(path: Path) -> None:
        results.append((await worker.deploy(path)).stdout)

    async with trio.open_nursery() as nursery:
        for fn in fns:
            nursery.start_soon(deploy, fn)
    versions = sorted(int(out.split(b" v", 1)[1].split(b" ", 1)[0]) for out in results)
    assert versions == [1, 2, 3, 4]
    r = await http.get(f"{worker.public_url}/functions/v1/multi", headers=worker.auth())
    assert r.headers["x-mbworker-version"] == "4"

    await worker.cli("functions", "rollback", "multi", "--to", "2", check=True)
    r = await http.get(f"{worker.public_url}/functions/v1/multi", headers=worker.auth())
    assert r.headers["x-mbworker-version"] == "2"
    listing = (await worker.cli("functions", "list", check=True)).stdout.decode()
    assert "multi" in listing
    await worker.cli("functions", "delete", "multi", check=True)
    r = await http.get(f"{worker.public_url}/functions/v1/multi", headers=worker.auth())
    assert r.status_code == 404


async def test_streaming_both_ways(worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path) -> None:
    await worker.deploy(EXAMPLES / "sse")
    # A raw socket, so the test can stop reading after the first event: it must arrive while the function is
    # still producing the next ones (the stream is not buffered to its end anywhere on the way).
    port = int(worker.public_url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET /functions/v1/sse HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {worker.anon_key}\r\n\r\n".encode()
        )
        received = b""
        with trio.fail_after(20):
            while b"data:" not in received:
                chunk = await stream.receive_some()
                assert chunk, received
                received += chunk
        head = received.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 200")
        assert b"content-type: text/event-stream" in head
        assert b"transfer-encoding: chunked" in head

    echo = write_function(
        tmp_path,
        "echo",
        """Deno.serve(async (req) => {
          let n = 0; const parts = [];
          for await (const c of req.body) { n += c.length; parts.push(c.length); }
          return Response.json({ n, chunks: parts.length });
        });""",
    )
    await worker.deploy(echo)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield b"x" * 10_000

    r = await http.post(f"{worker.public_url}/functions/v1/echo", content=body(), headers=worker.auth())
    assert r.status_code == 200, r.text
    assert r.json()["n"] == 500_000


async def test_supabase_tree_deploy(worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path) -> None:
    root = tmp_path / "proj" / "supabase"
    functions = root / "functions"
    (functions / "_shared").mkdir(parents=True)
    (functions / "_shared" / "cors.ts").write_text(
        "export const corsHeaders = { 'Access-Control-Allow-Origin': '*' };\n"
    )
    write_function(
        functions,
        "greet",
        "import { corsHeaders } from '../_shared/cors.ts';\n"
        "Deno.serve(() => new Response('hi from greet', { headers: corsHeaders }));\n",
    )
    write_function(functions, "off", "Deno.serve(() => new Response('off'))")
    (root / "config.toml").write_text("[functions.greet]\nverify_jwt = false\n\n[functions.off]\nenabled = false\n")
    await worker.deploy(tmp_path / "proj")
    r = await http.get(f"{worker.public_url}/functions/v1/greet")
    assert r.status_code == 200
    assert r.text == "hi from greet"
    assert r.headers["access-control-allow-origin"] == "*"
    r = await http.get(f"{worker.public_url}/functions/v1/off", headers=worker.auth())
    assert r.status_code == 404


async def test_sigterm_finishes_in_flight_and_leaves_no_deno(tmp_path: Path, http: httpx.AsyncClient) -> None:
    async with run_worker(tmp_path / "data") as worker:
        fn = write_function(
            tmp_path,
            "slowpoke",
            """Deno.serve(async () => {
              console.log('slowpoke started');
              await new Promise((r) => setTimeout(r, 1500));
              return new Response('done');
            });""",
        )
        await worker.deploy(fn)
        results: list[httpx.Response] = []
        started = trio.Event()

        async def request() -> None:
            started.set()
            results.append(await http.get(f"{worker.public_url}/functions/v1/slowpoke", headers=worker.auth()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            await started.wait()
            # Wait until the function really holds the request (it logs on entry), then ask the worker to stop.
            await worker.wait_for_output("slowpoke started")
            code = await stop_worker(worker.process)
        assert code == 0
        assert [r.status_code for r in results] == [200]
        assert results[0].text == "done"
    assert not deno_processes(tmp_path / "data")


async def test_json_logs_carry_function_labels(worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path) -> None:
    fn = write_function(
        tmp_path, "chatty", "Deno.serve(() => { console.log('hello from chatty'); return new Response('ok'); })"
    )
    await worker.deploy(fn)
    r = await http.get(f"{worker.public_url}/functions/v1/chatty", headers=worker.auth())
    assert r.status_code == 200
    line = await worker.wait_for_output("hello from chatty")
    entry = json.loads(line)
    assert entry["function"] == "chatty"
    assert entry["version"] == 1
    assert entry["execution_id"]


def test_forwarded_headers_keep_what_a_proxy_set() -> None:
    """Behind a proxy the x-forwarded-* it set reach the function unchanged (and are not added twice); without a
    Host header the URL's host is `localhost`."""
    headers = [
        (b"x-forwarded-for", b"203.0.113.7"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"api.example.com"),
        (b"transfer-encoding", b"chunked"),
        (b"accept", b"*/*"),
    ]
    body = EmptyBody()
    request = HttpRequest("POST", "/functions/v1/f", "/functions/v1/f", "", headers, body, ("10.0.0.2", 5000))
    seen, host, request_id = forwarded_headers(request, trusted=True)
    assert seen == [h for h in headers if h[0] != b"transfer-encoding"]
    assert (host, request_id) == ("localhost", None)
    # From a peer that is not a trusted proxy they are the connection's instead.
    seen, _, _ = forwarded_headers(request, trusted=False)
    assert seen == [
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"10.0.0.2"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"localhost"),
    ]


def test_trusted_proxies_match_their_networks() -> None:
    proxies = TrustedProxies(["10.0.0.0/24", "::1/128"])
    assert proxies.trusts(("10.0.0.2", 1))
    assert proxies.trusts(("::1", 1))
    assert proxies.trusts(("::ffff:10.0.0.9", 1))
    assert not proxies.trusts(("10.0.1.2", 1))
    assert not proxies.trusts(None)
    assert not TrustedProxies().trusts(("::1", 1))
