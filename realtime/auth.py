"""Keys, tokens and channel authorization (pyjwt, HS256 with the project's JWT secret).

- `apikey` (socket query or REST header) must be a JWT signed with the project secret whose `role` is `anon`
  or `service_role`; `exp` is enforced when present.
- A user `access_token` must verify (signature), carry `role` and `exp`, and not be expired.
- Public channels: any valid key. Private channels: allowed for `service_role` (if `service_role_bypass`)
  or when a `PrivateChannelRule` matches the effective claims (access token if given, else the apikey);
  denied otherwise.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import jwt

from mbworker.realtime.errors import AuthError
from mbworker.realtime.settings import PrivateChannelRule

__all__ = ["Authenticator"]

_KEY_ROLES = ("anon", "service_role")


class _Blank(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "\x00"  # a missing claim never matches a real topic


class Authenticator:
    def __init__(self, secret: str, rules: Sequence[PrivateChannelRule], *, service_role_bypass: bool = True) -> None:
        self._secret = secret
        self._rules = list(rules)
        self._bypass = service_role_bypass

    def _decode(self, token: str, required: list[str]) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256", "HS384", "HS512"],
                options={"require": required, "verify_aud": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("Token has expired") from exc
        except jwt.PyJWTError as exc:
            raise AuthError(f"Invalid token: {exc}") from exc
        if not isinstance(claims.get("role"), str):
            raise AuthError("Invalid token: missing role")
        return claims

    def verify_apikey(self, key: str | None) -> dict[str, Any]:
        if not key:
            raise AuthError("apikey is required")
        claims = self._decode(key, ["role"])
        if claims["role"] not in _KEY_ROLES:
            raise AuthError("apikey role must be anon or service_role")
        return claims

    def verify_access_token(self, token: str) -> dict[str, Any]:
        return self._decode(token, ["exp", "role"])

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
