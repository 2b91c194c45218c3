"""Keys, tokens and channel authorization, over the node's `JwtVerifier` (lib/jwt.py: one algorithm policy).

- `apikey` (socket query or REST header) must be a token the verifier accepts (signature, `exp` and `role`
  required, not expired) whose `role` is `anon` or `service_role`.
- A user `access_token` must pass the same verifier.
- Failures carry Supabase Realtime's texts ("MalformedJWT: …", "InvalidJWTToken: …", "JwtSignatureError: …").
- Public channels: any valid key. Private channels: allowed for `service_role` (if `service_role_bypass`)
  or when a `PrivateChannelRule` matches the effective claims (access token if given, else the apikey);
  denied otherwise.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from mbworker.lib.jwt import JwtError, JwtVerifier
from mbworker.realtime.errors import AuthError
from mbworker.realtime.settings import PrivateChannelRule

__all__ = ["Authenticator"]

_KEY_ROLES = ("anon", "service_role")


class _Blank(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "\x00"  # a missing claim never matches a real topic


class Authenticator:
    def __init__(
        self, verifier: JwtVerifier, rules: Sequence[PrivateChannelRule], *, service_role_bypass: bool = True
    ) -> None:
        self.verifier = verifier
        self._rules = list(rules)
        self._bypass = service_role_bypass

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            return self.verifier.verify(token)
        except JwtError as exc:
            raise AuthError(str(exc)) from exc

    def verify_apikey(self, key: str | None) -> dict[str, Any]:
        if not key:
            raise AuthError("apikey is required")
        claims = self._decode(key)
        if claims["role"] not in _KEY_ROLES:
            raise AuthError("InvalidJWTToken: apikey role must be anon or service_role")
        return claims

    def verify_access_token(self, token: str) -> dict[str, Any]:
        return self._decode(token)

    def may_access(self, name: str, private: bool, claims: dict[str, Any]) -> bool:
        """Whether `claims` may use channel `name` (without the `realtime:` prefix)."""
        if not private:
            return True
        role = claims.get("role")
        if self._bypass and role == "service_role":
            return True
        view = _Blank({k: str(v) for k, v in claims.items()})
        for rule in self._rules:
            if rule.roles and role not in rule.roles:
                continue
            if any(str(claims.get(k)) != v for k, v in rule.claims.items()):
                continue
            try:
                pattern = rule.topic.format_map(view)
            except (ValueError, IndexError):
                continue
            if fnmatch.fnmatchcase(name, pattern):
                return True
        return False
