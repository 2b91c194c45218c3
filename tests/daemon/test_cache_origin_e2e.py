"""Cache poisoning through the URL's host: a function's `req.url` carries the Host (and, behind a trusted proxy,
the X-Forwarded-Proto/-Host it is given); a response built from them must never be served to a request that
named another. Through the real daemon and real Deno, as an attacker would send it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.daemon.fixtures import write_function
from tests.faults._raw import exchange
from tests.worker_process import RunningWorker, run_worker

# What a real function does: an absolute redirect built from its own URL, publicly cacheable.
REDIRECT = """Deno.serve((req) => {
  const u = new URL(req.url);
  const host = req.headers.get('x-forwarded-host') ?? u.host;
  const proto = req.headers.get('x-forwarded-proto') ?? u.protocol.slice(0, -1);
  console.log('redirect ran for', host);
  return new Response(null, { status: 302, headers: {
    location: `${proto}://${host}/next`, 'x-url-host': u.host, 'cache-control': 'public, max-age=60' } });
});"""


def _port(worker: RunningWorker) -> int:
    return int(worker.public_url.rsplit(":", 1)[1])


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def test_a_foreign_host_is_never_served_to_another_host(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    await worker.deploy(write_function(tmp_path, "redirect", REDIRECT))
    port = _port(worker)
    anon = f"authorization: Bearer {worker.anon_key}\r\n".encode()  # shared by every anonymous user
    request = b"GET /functions/v1/redirect HTTP/1.1\r\nhost: %s\r\n" + anon + b"connection: close\r\n\r\n"

    status, head, _ = await exchange(port, request % b"evil.example")
    assert (status, _header(head, b"location")) == (302, b"http://evil.example/next"), head
    assert _header(head, b"x-mbworker-cache") == b"MISS"

    # The victim, with the daemon's own host: the function runs for it; the attacker's entry is not its answer.
    victim = await http.get(f"{worker.public_url}/functions/v1/redirect", headers=worker.auth(), follow_redirects=False)
    own = worker.public_url.removeprefix("http://")
    assert (victim.status_code, victim.headers["location"]) == (302, f"http://{own}/next")
    assert victim.headers["x-mbworker-cache"] == "MISS"
    again = await http.get(f"{worker.public_url}/functions/v1/redirect", headers=worker.auth(), follow_redirects=False)
    assert (again.headers["location"], again.headers["x-mbworker-cache"]) == (f"http://{own}/next", "HIT")

    # Two Host headers: which one names the URL? Refused (RFC 9112 §3.2), whichever comes first.
    for hosts in (b"host: evil.example\r\nhost: " + own.encode(), b"host: " + own.encode() + b"\r\nhost: evil.example"):
        status, _, body = await exchange(
            port, b"GET /functions/v1/redirect HTTP/1.1\r\n" + hosts + b"\r\n" + anon + b"connection: close\r\n\r\n"
        )
        assert (status, json.loads(body)) == (400, {"code": "BAD_REQUEST", "message": "more than one Host header"})
    assert len([line for line in worker.output if "redirect ran for" in line]) == 2


async def test_forwarded_host_and_proto_from_a_trusted_proxy_are_in_the_key(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    # The proxy passes a client's own X-Forwarded-Host on (HAProxy only sets X-Forwarded-Proto): the function
    # believes it, so a response built from it must stay with the requests that carried it.
    async with run_worker(tmp_path / "data", env={"MBWORKER_TRUSTED_PROXIES": '["127.0.0.1/32"]'}) as worker:
        await worker.deploy(write_function(tmp_path, "redirect", REDIRECT))
        url = f"{worker.public_url}/functions/v1/redirect"

        async def redirect(**headers: str) -> tuple[str, str]:
            sent = {**worker.auth(), **{k.replace("_", "-"): v for k, v in headers.items()}}
            r = await http.get(url, headers=sent, follow_redirects=False)
            return r.headers["location"], r.headers["x-mbworker-cache"]

        https = {"x_forwarded_proto": "https"}
        assert await redirect(**https, x_forwarded_host="evil.example") == ("https://evil.example/next", "MISS")
        assert await redirect(**https, x_forwarded_host="api.example") == ("https://api.example/next", "MISS")
        assert await redirect(x_forwarded_host="api.example") == ("http://api.example/next", "MISS")
        assert await redirect(**https, x_forwarded_host="api.example") == ("https://api.example/next", "HIT")
