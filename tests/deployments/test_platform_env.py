"""What every function's env holds besides its secrets: Supabase's defaults, newer key dictionaries included."""

from __future__ import annotations

import json

from mbworker.lib.jwt import EMPTY_JWKS, public_jwks
from mbworker.worker.deployer import PlatformEnv

EC_PRIVATE = {"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "x": "xx", "y": "yy", "d": "secret-d"}
OCT = {"kty": "oct", "kid": "hs", "k": "the-jwt-secret"}


def test_newer_supabase_variables() -> None:
    env = PlatformEnv("http://x", "anon-jwt", "service-jwt", db_url="postgresql://u:p@db:6432/postgres",
                      jwks=public_jwks([EC_PRIVATE])).for_version("hello", 3)  # fmt: skip
    assert json.loads(env["SUPABASE_PUBLISHABLE_KEYS"]) == {"default": "anon-jwt"}
    assert json.loads(env["SUPABASE_SECRET_KEYS"]) == {"default": "service-jwt"}
    assert env["SUPABASE_DB_URL"] == "postgresql://u:p@db:6432/postgres"
    assert json.loads(env["SUPABASE_JWKS"])["keys"][0]["kid"] == "k1"
    assert env["DENO_DEPLOYMENT_ID"] == "mbworker_hello_3"


def test_no_db_url_no_variable_and_an_empty_key_set() -> None:
    env = PlatformEnv("http://x", "a", "s").for_version("hello", 1)
    assert "SUPABASE_DB_URL" not in env
    assert env["SUPABASE_JWKS"] == EMPTY_JWKS


def test_public_jwks_keeps_no_secret() -> None:
    doc = json.loads(public_jwks([EC_PRIVATE, OCT]))
    assert doc == {"keys": [{k: v for k, v in EC_PRIVATE.items() if k != "d"}]}
