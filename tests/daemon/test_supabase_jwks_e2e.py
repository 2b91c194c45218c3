"""SUPABASE_JWKS carries the JWKS the node's verifier uses, also when it is configured as a URL, and follows its
refreshes (the function's processes restart with it): a real `mbworker serve` fetching from a JWKS endpoint on
loopback, a real Deno function reading it."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import httpx
import jwt
import trio

from tests.conftest import require_binary
from tests.daemon.conftest import BUNDLED_DENO
from tests.daemon.fixtures import write_function
from tests.lib_jwt.keys import SigningKey, serve_jwks
from tests.worker_process import RunningWorker, run_worker

SHOW = 'Deno.serve(() => new Response(Deno.env.get("SUPABASE_JWKS")));\n'


async def _kids(http: httpx.AsyncClient, w: RunningWorker) -> list[str]:
    r = await http.get(f"{w.public_url}/functions/v1/show", headers=w.auth())
    assert r.status_code == 200, r.text
    doc = r.json()
    assert all(set(k) & {"d", "p", "q", "k"} == set() for k in doc["keys"])  # public parts only
    return [k["kid"] for k in doc["keys"]]


async def test_supabase_jwks_from_a_url_and_its_refreshes(tmp_path: Path) -> None:
    require_binary("deno", BUNDLED_DENO)
    first, rotated = SigningKey("ES256", "es-1"), SigningKey("RS256", "rs-2")
    # The endpoint also lists a symmetric key, and the first key with its private half: no secret reaches functions.
    private_d = {**jwt.algorithms.ECAlgorithm.to_jwk(first.private, as_dict=True), **first.jwk}
    assert "d" in private_d
    docs = [{"keys": [private_d, {"kty": "oct", "kid": "hs", "k": "c2VjcmV0", "alg": "HS256"}]}]
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, partial(serve_jwks, docs, []), 0, host="127.0.0.1"))
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/auth/v1/.well-known/jwks.json"
        env = {"MBWORKER_JWKS": url, "MBWORKER_JWKS_REFRESH_S": "1"}
        async with run_worker(tmp_path / "data", env=env) as w, httpx.AsyncClient(timeout=60, trust_env=False) as http:
            await w.deploy(write_function(tmp_path, "show", SHOW))
            assert await _kids(http, w) == ["es-1"]
            token = first.sign({"role": "authenticated", "exp": int(time.time()) + 600})
            assert (await http.get(f"{w.public_url}/functions/v1/show", headers=w.auth(token))).status_code == 200

            docs.append({"keys": [first.jwk, rotated.jwk]})  # the project publishes a new key
            await w.wait_for_output("SUPABASE_JWKS changed")
            assert await _kids(http, w) == ["es-1", "rs-2"]  # the old process was retired: a new one has it
        nursery.cancel_scope.cancel()
