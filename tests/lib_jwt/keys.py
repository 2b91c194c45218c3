"""Asymmetric signing keys for tests, as Supabase's auth server holds them (ES256 / RS256 with a kid)."""

from __future__ import annotations

import json
from types import EllipsisType
from typing import Any

import jwt
import trio
from cryptography.hazmat.primitives.asymmetric import ec, rsa


class SigningKey:
    """An asymmetric signing key as Supabase's auth server holds one; `jwk` is its public half for the JWKS."""

    def __init__(self, alg: str, kid: str) -> None:
        self.alg, self.kid = alg, kid
        if alg == "ES256":
            self.private: Any = ec.generate_private_key(ec.SECP256R1())
            algorithm: Any = jwt.algorithms.ECAlgorithm
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            algorithm = jwt.algorithms.RSAAlgorithm
        self.jwk = {**algorithm.to_jwk(self.private.public_key(), as_dict=True), "kid": kid, "alg": alg,
                    "use": "sig"}  # fmt: skip

    def sign(self, claims: dict[str, Any], *, kid: str | EllipsisType | None = ...) -> str:
        headers = {"kid": self.kid if kid is ... else kid} if kid is not None else {}
        return jwt.encode(claims, self.private, algorithm=self.alg, headers=headers)


async def serve_jwks(docs: list[dict[str, Any]], served: list[int], stream: trio.SocketStream) -> None:
    """A JWKS endpoint on loopback (for `trio.serve_tcp`): answers each GET with the last document of `docs` and
    counts it in `served`."""
    with trio.move_on_after(5):
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            request += chunk
        body = json.dumps(docs[-1]).encode()
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        await stream.send_all(head.encode() + body)
        served.append(1)
    await stream.aclose()
