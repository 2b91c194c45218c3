"""The functions' JWT gate: `Authorization: Bearer <jwt>` checked by the node's `JwtVerifier` (lib/jwt.py).

The verifier holds the one policy (HS256 secret, ES256/RS256 from the JWKS, `exp` and `role` required, revoked
sessions refused) and remembers verified tokens; this module only reads the header and maps the verifier's
errors to Supabase's gateway codes (`sb-error-code` UNAUTHORIZED_*): a legacy (HS256) token's failures are
UNAUTHORIZED_LEGACY_JWT, an asymmetric one's UNAUTHORIZED_ASYMMETRIC_JWT.
"""

from __future__ import annotations

from dataclasses import dataclass

import jwt

from mbworker.lib.jwt import JwtError, JwtVerifier, MalformedJwt, SessionRevoked, UnsupportedAlgorithm


@dataclass(frozen=True)
class JwtRejected(Exception):
    code: str
    message: str


class JwtGate:
    """Checks bearer tokens. The verifier (and its memo) belongs to the daemon, shared with realtime."""

    def __init__(self, verifier: JwtVerifier) -> None:
        self.verifier = verifier

    def check(self, authorization: bytes | None) -> None:
        """Raise `JwtRejected` unless `authorization` carries a valid token."""
        if not authorization:
            raise JwtRejected("UNAUTHORIZED_NO_AUTH_HEADER", "Missing authorization header")
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            raise JwtRejected("UNAUTHORIZED_NO_AUTH_HEADER", "Auth header is not 'Bearer {token}'")
        try:
            self.verifier.verify(token)
        except MalformedJwt:
            raise JwtRejected("UNAUTHORIZED_INVALID_JWT_FORMAT", "Invalid JWT") from None
        except UnsupportedAlgorithm as exc:
            raise JwtRejected("UNAUTHORIZED_UNSUPPORTED_TOKEN_ALGORITHM", exc.message) from None
        except SessionRevoked as exc:
            raise JwtRejected("UNAUTHORIZED_SESSION_REVOKED", exc.message) from None
        except JwtError as exc:
            legacy = jwt.get_unverified_header(token).get("alg") == "HS256"  # it parsed: not MalformedJwt
            code = "UNAUTHORIZED_LEGACY_JWT" if legacy else "UNAUTHORIZED_ASYMMETRIC_JWT"
            raise JwtRejected(code, exc.message) from None
