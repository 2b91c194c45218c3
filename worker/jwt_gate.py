"""The functions' JWT gate: `Authorization: Bearer <jwt>` verified with the project's HS256 secret.

Codes and messages follow Supabase's gateway (`sb-error-code` UNAUTHORIZED_*). Verified tokens are remembered
until they expire (bounded), because an HMAC check per request is a visible share of the hot path.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt


@dataclass(frozen=True)
class JwtRejected(Exception):
    code: str
    message: str


class JwtGate:
    """Verifies bearer tokens. Owns a bounded memo of recently verified tokens (token → exp)."""

    def __init__(self, secret: str, *, memo_size: int = 4096) -> None:
        self._secret = secret
        self._memo: OrderedDict[bytes, float] = OrderedDict()
        self._memo_size = memo_size

    def check(self, authorization: bytes | None) -> None:
        """Raise `JwtRejected` unless `authorization` carries a valid token."""
        if not authorization:
            raise JwtRejected("UNAUTHORIZED_NO_AUTH_HEADER", "Missing authorization header")
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            raise JwtRejected("UNAUTHORIZED_NO_AUTH_HEADER", "Auth header is not 'Bearer {token}'")
        exp = self._memo.get(token)
        now = time.time()
        if exp is not None and exp > now:
            return
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise JwtRejected("UNAUTHORIZED_INVALID_JWT_FORMAT", "Invalid JWT") from None
        if header.get("alg") != "HS256":
            raise JwtRejected(
                "UNAUTHORIZED_UNSUPPORTED_TOKEN_ALGORITHM", f"Unsupported JWT algorithm {header.get('alg')!r}"
            )
        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"], options={"verify_aud": False})
        except jwt.ExpiredSignatureError:
            raise JwtRejected("UNAUTHORIZED_LEGACY_JWT", "JWT has expired") from None
        except jwt.PyJWTError:
            raise JwtRejected("UNAUTHORIZED_LEGACY_JWT", "Invalid JWT") from None
        self._memo[token] = float(claims.get("exp", now + 60))
        if len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
