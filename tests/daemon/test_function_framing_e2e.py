"""Through `mbworker serve`: a small function response goes out with Content-Length (one write), a stream chunked."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.daemon.fixtures import write_function
from tests.worker_process import RunningWorker

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "functions"

TICKS = """
Deno.serve(() => {
  let n = 0;
  return new Response(new ReadableStream({
    async pull(c) {
      await new Promise((r) => setTimeout(r, 10));
      if (n++ < 3) c.enqueue(new TextEncoder().encode(`tick${n}\\n`)); else c.close();
    },
  }));
});
"""


async def test_hello_has_content_length_and_a_stream_is_chunked(
    worker: RunningWorker, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    await worker.deploy(EXAMPLES / "hello")
    await worker.deploy(write_function(tmp_path, "ticks", TICKS), "--no-verify-jwt")

    r = await http.get(f"{worker.public_url}/functions/v1/hello?name=Ada", headers=worker.auth())
    assert r.status_code == 200, r.text
    assert r.json() == {"message": "Hello Ada!"}
    assert r.headers["content-length"] == str(len(r.content))
    assert "transfer-encoding" not in r.headers

    # HEAD is not one of Supabase's methods: 405 there, 405 here (the head of the error, no body).
    r = await http.head(f"{worker.public_url}/functions/v1/hello?name=Ada", headers=worker.auth())
    assert (r.status_code, r.headers["sb-error-code"], r.content) == (405, "METHOD_NOT_ALLOWED", b"")
    assert r.headers["allow"] == "GET, POST, PUT, PATCH, DELETE, OPTIONS"

    r = await http.get(f"{worker.public_url}/functions/v1/ticks")
    assert r.status_code == 200
    assert r.text == "tick1\ntick2\ntick3\n"
    assert r.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in r.headers
