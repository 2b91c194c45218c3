"""The one JWT policy (lib/jwt.py): HS256 with the secret, ES256/RS256 from a JWKS (file or URL), `exp` and `role`
required, revoked sessions refused; and the functions' gate mapping its failures to Supabase's codes."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio

from mbworker.lib.jwt import (
    ExpiredJwt,
    JwksError,
    JwtVerifier,
    MalformedJwt,
    MissingClaims,
    SessionRevoked,
    SignatureInvalid,
    UnsupportedAlgorithm,
    open_jwt_verifier,
    parse_jwks,
)
from mbworker.worker.jwt_gate import JwtGate, JwtRejected
from tests.lib_jwt.keys import SigningKey, serve_jwks

SECRET = "test-secret-that-is-long-enough-for-hs256"


def claims(role: str = "authenticated", exp_in: float | None = 3600, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"role": role, **extra}
    if exp_in is not None:
        body["exp"] = int(time.time() + exp_in)
    return body


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [k.jwk for k in keys]}


@pytest.fixture(scope="module")
def es() -> SigningKey:
    return SigningKey("ES256", "es-1")


@pytest.fixture(scope="module")
def rs() -> SigningKey:
    return SigningKey("RS256", "rs-1")


def test_hs256_and_the_claims_supabase_requires() -> None:
    v = JwtVerifier(SECRET)
    assert v.verify(jwt.encode(claims(sub="u"), SECRET, algorithm="HS256"))["sub"] == "u"
    with pytest.raises(MissingClaims) as info:
        v.verify(jwt.encode(claims(exp_in=None), SECRET, algorithm="HS256"))
    assert str(info.value) == "InvalidJWTToken: Fields `role` and `exp` are required in JWT"
    with pytest.raises(MissingClaims):
        v.verify(jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256"))
    with pytest.raises(ExpiredJwt, match=r"^InvalidJWTToken: Token has expired \d+ seconds ago$"):
        v.verify(jwt.encode(claims(exp_in=-30), SECRET, algorithm="HS256"))
    with pytest.raises(MalformedJwt) as bad:
        v.verify("not-a-jwt")
    assert str(bad.value) == "MalformedJWT: The token provided is not a valid JWT"
    with pytest.raises(SignatureInvalid) as forged:
        v.verify(jwt.encode(claims(), "another-secret-another-secret-another!", algorithm="HS256"))
    assert str(forged.value) == "JwtSignatureError: Failed to validate JWT signature"


def test_one_algorithm_policy(es: SigningKey) -> None:
    v = JwtVerifier(SECRET, jwks=parse_jwks(jwks(es)))
    for alg in ("HS384", "HS512"):  # the old realtime verifier took these; Supabase's keys never use them
        with pytest.raises(UnsupportedAlgorithm):
            v.verify(jwt.encode(claims(), SECRET * 2, algorithm=alg))
    unsigned = jwt.encode(claims(), "", algorithm="none")
    with pytest.raises(UnsupportedAlgorithm):
        v.verify(unsigned)
    # Algorithm confusion: an HMAC token naming the ES256 key's kid is never checked against that key.
    confused = jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": es.kid})
    with pytest.raises(SignatureInvalid):
        v.verify(confused)


def test_asymmetric_keys_from_a_jwks(es: SigningKey, rs: SigningKey) -> None:
    unknown: list[int] = []
    v = JwtVerifier(SECRET, jwks=parse_jwks(jwks(es, rs)))
    v.on_unknown_kid = lambda: unknown.append(1)
    assert v.verify(es.sign(claims(sub="e")))["sub"] == "e"
    assert v.verify(rs.sign(claims(sub="r")))["sub"] == "r"
    assert v.verify(jwt.encode(claims(sub="h"), SECRET, algorithm="HS256"))["sub"] == "h"  # legacy still works
    with pytest.raises(MissingClaims):
        v.verify(es.sign(claims(exp_in=None)))
    other = SigningKey("ES256", "es-1")  # same kid, different key: a forgery
    with pytest.raises(SignatureInvalid):
        v.verify(other.sign(claims()))
    with pytest.raises(SignatureInvalid, match="kid 'rotated'"):
        v.verify(SigningKey("ES256", "rotated").sign(claims()))
    assert unknown == [1]  # the refresher is asked to look for the new key
    only_es = JwtVerifier(None, jwks=parse_jwks(jwks(es)))
    assert only_es.verify(es.sign(claims(), kid=None))["role"] == "authenticated"  # one key of that alg: no kid needed
    with pytest.raises(SignatureInvalid):
        only_es.verify(jwt.encode(claims(), SECRET, algorithm="HS256"))  # no secret configured


def test_revocation_seam_applies_to_remembered_tokens() -> None:
    class DenyList:
        def __init__(self) -> None:
            self.revoked: set[str] = set()

        def is_revoked(self, session_id: object) -> bool:
            return session_id in self.revoked

    deny = DenyList()
    v = JwtVerifier(SECRET, revocations=deny)
    token = jwt.encode(claims(session_id="s1"), SECRET, algorithm="HS256")
    assert v.verify(token)["session_id"] == "s1"
    deny.revoked.add("s1")
    with pytest.raises(SessionRevoked):
        v.verify(token)  # remembered as valid, refused all the same
    gate = JwtGate(v)
    with pytest.raises(JwtRejected) as info:
        gate.check(b"Bearer " + token.encode())
    assert info.value.code == "UNAUTHORIZED_SESSION_REVOKED"


def test_functions_gate_codes(es: SigningKey) -> None:
    gate = JwtGate(JwtVerifier(SECRET, jwks=parse_jwks(jwks(es))))
    gate.check(b"Bearer " + es.sign(claims("anon")).encode())
    cases = {
        b"Bearer x.y": "UNAUTHORIZED_INVALID_JWT_FORMAT",
        b"Bearer "
        + jwt.encode(claims(), SECRET * 2, algorithm="HS512").encode(): "UNAUTHORIZED_UNSUPPORTED_TOKEN_ALGORITHM",
        b"Bearer " + jwt.encode(claims(exp_in=None), SECRET, algorithm="HS256").encode(): "UNAUTHORIZED_LEGACY_JWT",
        b"Bearer " + jwt.encode({"exp": int(time.time()) + 60}, SECRET).encode(): "UNAUTHORIZED_LEGACY_JWT",
        b"Bearer " + es.sign(claims(exp_in=-5)).encode(): "UNAUTHORIZED_ASYMMETRIC_JWT",
    }
    for header, code in cases.items():
        with pytest.raises(JwtRejected) as info:
            gate.check(header)
        assert info.value.code == code, header


def test_jwks_documents() -> None:
    for doc in (b"{", b"[]", b'{"keys": 1}', b'{"keys": []}', b'{"keys": [{"kty": "EC"}]}'):
        with pytest.raises(JwksError):
            parse_jwks(doc)


async def test_jwks_file_is_loaded_and_a_bad_one_is_refused(tmp_path: Path, es: SigningKey) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(es)))
    async with open_jwt_verifier(SECRET, jwks=str(path)) as v:
        assert v.verify(es.sign(claims()))["role"] == "authenticated"
    path.write_text("not json")
    with pytest.raises(JwksError, match=str(path)):
        async with open_jwt_verifier(SECRET, jwks=str(path)):
            pass


async def test_jwks_url_refreshes_off_the_loop_on_an_unknown_kid(es: SigningKey) -> None:
    rotated = SigningKey("ES256", "es-2")
    docs, served = [jwks(es)], list[int]()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, partial(serve_jwks, docs, served), 0,
                                                host="127.0.0.1"))  # fmt: skip
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/auth/v1/.well-known/jwks.json"
        async with open_jwt_verifier(SECRET, jwks=url, min_refetch=0.05) as v:
            assert v.verify(es.sign(claims()))["role"] == "authenticated"
            docs.append(jwks(es, rotated))  # the project rotates a new key in
            loaded = trio.Event()
            v.on_jwks = loaded.set
            with pytest.raises(SignatureInvalid):
                v.verify(rotated.sign(claims()))  # unknown kid: refused now, fetched soon
            with trio.fail_after(10):
                await loaded.wait()
            assert v.verify(rotated.sign(claims()))["role"] == "authenticated"
            assert v.verify(es.sign(claims()))["role"] == "authenticated"
        nursery.cancel_scope.cancel()
    assert len(served) == 2
