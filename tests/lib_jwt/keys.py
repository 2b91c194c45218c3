"""Asymmetric signing keys for tests, as Supabase's auth server holds them (ES256 / RS256 with a kid)."""

from __future__ import annotations

from types import EllipsisType
from typing import Any

import jwt
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
