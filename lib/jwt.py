"""One JWT policy: which algorithms, which keys, which claims. Used by every token check of a node.

`JwtVerifier.verify(token)` accepts HS256 (the project's shared secret) and ES256 / RS256 (public keys from a
JWKS, picked by the token's `kid`), requires `exp` and `role` as Supabase does, rejects expired tokens and,
through the `RevocationCheck` seam, tokens whose `session_id` was revoked. Nothing else is accepted: no `none`,
no HS384/512, no HMAC with a public key (a key's algorithm must be the token's).

Failures are `JwtError`s whose `code` and `message` are Supabase Realtime's texts ("MalformedJWT: The token
provided is not a valid JWT", "InvalidJWTToken: Token has expired 3 seconds ago", …): callers show `str(exc)`
or map the class to their own codes.

Who owns what: the verifier owns its key set and a bounded memo of verified tokens (token → claims, until their
`exp`), because a signature check per request is a visible share of a hot path; the revocation check is
consulted on every call, memo hit or not, and belongs to whoever passed it. `open_jwt_verifier` owns the task
that loads a JWKS file or URL off the event loop (a worker thread) and refreshes it: every `refresh_interval`,
and early (at most once per `min_refetch`) when a token names a `kid` the set does not hold, which is how a
rotated-in key is picked up. Imports nothing of the product.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, Protocol

import jwt
import trio

from mbworker.lib.nursery import open_owned_nursery

__all__ = [
    "ALGORITHMS",
    "EMPTY_JWKS",
    "ExpiredJwt",
    "JwksError",
    "JwksSource",
    "JwtError",
    "JwtVerifier",
    "MalformedJwt",
    "MissingClaims",
    "RevocationCheck",
    "SessionRevoked",
    "SignatureInvalid",
    "UnsupportedAlgorithm",
    "open_jwt_verifier",
    "parse_jwks",
    "public_jwks",
]

log = logging.getLogger("mbworker.jwt")

ALGORITHMS: Final = ("HS256", "ES256", "RS256")
"""The policy: HS256 with the shared secret, ES256/RS256 with JWKS keys (what Supabase's signing keys use)."""
_ASYMMETRIC: Final = frozenset(("ES256", "RS256"))
MAX_JWKS_BYTES: Final = 1 << 20
EMPTY_JWKS: Final = '{"keys":[]}'
_PRIVATE_JWK_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class JwtError(Exception):
    """A token was refused. `code` and `message` follow Supabase Realtime (`str()` is "code: message")."""

    code = "InvalidJWTToken"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class MalformedJwt(JwtError):
    """Not a JWT at all (wrong shape, bad base64 or JSON)."""

    code = "MalformedJWT"


class UnsupportedAlgorithm(JwtError):
    """The header's `alg` is outside the policy (`ALGORITHMS`)."""


class SignatureInvalid(JwtError):
    """The signature does not verify, or no key of the right algorithm is known for the token's `kid`."""

    code = "JwtSignatureError"


class MissingClaims(JwtError):
    """`exp` or `role` is missing (or not a number / string)."""


class ExpiredJwt(JwtError):
    """`exp` is in the past."""


class SessionRevoked(JwtError):
    """The token's `session_id` is on the revocation list."""


class JwksError(Exception):
    """A JWKS could not be read or holds no usable key (configuration, not a token problem)."""


class RevocationCheck(Protocol):
    """Revoked sessions (the cluster's deny-list implements it). Called on every verification: a dict lookup."""

    def is_revoked(self, session_id: object) -> bool:
        """Whether `session_id` (the claim's value: usually a str, maybe absent/None) is revoked now."""
        ...


def parse_jwks(doc: bytes | str | Mapping[str, Any]) -> dict[str, jwt.PyJWK]:
    """Usable verification keys of a JWKS document, by `kid` ("" for a key without one). Keys of algorithms
    outside the policy, private parts aside, are skipped; raises `JwksError` when none is left."""
    return _parse_jwks(doc)[0]


def public_jwks(keys: list[dict[str, Any]]) -> str:
    """The public part of JWKS entries as a compact JWKS document: private members dropped, symmetric (`oct`)
    keys left out (their only member is the secret)."""
    public = [
        {k: v for k, v in key.items() if k not in _PRIVATE_JWK_MEMBERS}
        for key in keys
        if isinstance(key, dict) and key.get("kty") != "oct"
    ]
    return json.dumps({"keys": public}, separators=(",", ":"))


def _parse_jwks(doc: bytes | str | Mapping[str, Any]) -> tuple[dict[str, jwt.PyJWK], str]:
    """`parse_jwks`, and the `public_jwks` of the entries it kept."""
    try:
        raw = json.loads(doc) if isinstance(doc, (bytes, str)) else doc
        entries = raw["keys"]
        if not isinstance(entries, list):
            raise TypeError("keys is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise JwksError(f"not a JWKS document ({exc})") from None
    keys: dict[str, jwt.PyJWK] = {}
    kept: list[dict[str, Any]] = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError as exc:
            log.warning("JWKS key %r skipped: %s", entry.get("kid"), exc)
            continue
        if key.algorithm_name not in ALGORITHMS:
            log.warning("JWKS key %r skipped: algorithm %s is not accepted", entry.get("kid"), key.algorithm_name)
            continue
        keys[str(entry.get("kid") or "")] = key
        kept.append(entry)
    if not keys:
        raise JwksError("the JWKS holds no ES256, RS256 or HS256 signing key")
    return keys, public_jwks(kept)


class JwtVerifier:
    """Verifies tokens under the one policy. Sync and cheap on a memo hit: call it from the event loop."""

    def __init__(
        self,
        secret: str | None,
        *,
        jwks: Mapping[str, jwt.PyJWK] | None = None,
        revocations: RevocationCheck | None = None,
        memo_size: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = secret.encode() if secret else None
        self._jwks: dict[str, jwt.PyJWK] = dict(jwks or {})
        self.public_jwks = EMPTY_JWKS
        """The public part of the JWKS the keys came from (compact JSON; no symmetric key), as `set_jwks` got it:
        what may be shown to others (functions' SUPABASE_JWKS)."""
        self.revocations = revocations
        """The revocation seam; may be set after construction (the deny-list may start later)."""
        self._memo: OrderedDict[str | bytes, dict[str, Any]] = OrderedDict()
        self._memo_size = memo_size
        self._clock = clock
        self.on_unknown_kid: Callable[[], None] = _nothing
        """Called when a token names a `kid` the key set lacks (the JWKS refresher fetches early)."""
        self.on_jwks: Callable[[], None] = _nothing
        """Called after the JWKS keys were replaced (observability and tests)."""

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._jwks)

    def set_jwks(self, keys: Mapping[str, jwt.PyJWK], public: str = EMPTY_JWKS) -> None:
        """Replace the JWKS keys (`public`: their public JWKS document). Remembered tokens are forgotten: a key
        removed from the set must stop working."""
        self._jwks = dict(keys)
        self.public_jwks = public
        self._memo.clear()
        self.on_jwks()

    def verify(self, token: str | bytes) -> dict[str, Any]:
        """The claims of a valid token (shared with later calls: treat as read-only); raises `JwtError`."""
        now = self._clock()
        claims = self._memo.get(token)
        if claims is None or claims["exp"] <= now:
            claims = self._decode(token, now)
            self._memo[token] = claims
            if len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
        if self.revocations is not None and self.revocations.is_revoked(claims.get("session_id")):
            raise SessionRevoked("Session has been revoked")
        return claims

    def _key_for(self, header: dict[str, Any]) -> Any:
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise UnsupportedAlgorithm(f"Unsupported JWT algorithm {alg!r}")
        kid = header.get("kid")
        key = self._jwks.get(kid) if isinstance(kid, str) else None
        if key is None and alg in _ASYMMETRIC:
            if isinstance(kid, str) and kid:
                self.on_unknown_kid()
                raise SignatureInvalid(f"No signing key with kid {kid!r}")
            candidates = [k for k in self._jwks.values() if k.algorithm_name == alg]
            if len(candidates) != 1:
                raise SignatureInvalid("Failed to validate JWT signature")
            key = candidates[0]
        if key is not None:
            if key.algorithm_name != alg:  # never verify with a key meant for another algorithm
                raise SignatureInvalid("Failed to validate JWT signature")
            return key.key
        if self._secret is None:
            raise SignatureInvalid("Failed to validate JWT signature")
        return self._secret

    def _decode(self, token: str | bytes, now: float) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise MalformedJwt("The token provided is not a valid JWT") from None
        key = self._key_for(header)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[header["alg"]],
                options={"verify_exp": False, "verify_aud": False, "verify_iss": False},
            )
        except jwt.InvalidSignatureError:
            raise SignatureInvalid("Failed to validate JWT signature") from None
        except jwt.DecodeError:
            raise MalformedJwt("The token provided is not a valid JWT") from None
        except jwt.PyJWTError as exc:  # nbf in the future, iat not a number, …
            raise JwtError(str(exc)) from None
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool) or not isinstance(claims.get("role"), str):
            raise MissingClaims("Fields `role` and `exp` are required in JWT")
        if exp <= now:
            raise ExpiredJwt(f"Token has expired {int(now - exp)} seconds ago")
        return claims


def _nothing() -> None:
    pass


class JwksSource:
    """Where the JWKS comes from: a file path or an http(s) URL. `load` blocks (run it in a thread)."""

    def __init__(self, location: str, *, timeout: float = 5.0) -> None:
        self.location = location
        self.is_url = location.startswith(("http://", "https://"))
        self.timeout = timeout
        """Per network operation; a whole fetch is abandoned after twice this (`_fetch`)."""

    def load(self) -> dict[str, jwt.PyJWK]:
        """Read and parse the JWKS; raises `JwksError`. Blocking."""
        return self.fetch()[0]

    def fetch(self) -> tuple[dict[str, jwt.PyJWK], str]:
        """The JWKS's keys and the public JWKS document of them (`public_jwks`); raises `JwksError`. Blocking."""
        try:
            if self.is_url:
                request = urllib.request.Request(self.location, headers={"accept": "application/json"})
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body: bytes = response.read(MAX_JWKS_BYTES + 1)
            else:
                with Path(self.location).open("rb") as f:
                    body = f.read(MAX_JWKS_BYTES + 1)
        except (OSError, ValueError) as exc:
            raise JwksError(f"JWKS {self.location}: {exc}") from None
        if len(body) > MAX_JWKS_BYTES:
            raise JwksError(f"JWKS {self.location}: larger than {MAX_JWKS_BYTES} bytes")
        try:
            return _parse_jwks(body)
        except JwksError as exc:
            raise JwksError(f"JWKS {self.location}: {exc}") from None


async def _fetch(source: JwksSource) -> tuple[dict[str, jwt.PyJWK], str]:
    """`source.fetch()` in a worker thread, given up (the thread abandoned) after `2 × source.timeout`: a server
    answering a byte at a time keeps each read within urllib's timeout, not the whole fetch."""
    with trio.move_on_after(2 * source.timeout):
        return await trio.to_thread.run_sync(source.fetch, abandon_on_cancel=True)
    raise JwksError(f"JWKS {source.location}: no complete answer within {2 * source.timeout:g} s")


@asynccontextmanager
async def open_jwt_verifier(
    secret: str | None,
    *,
    jwks: str | None = None,
    revocations: RevocationCheck | None = None,
    refresh_interval: float = 600.0,
    min_refetch: float = 30.0,
) -> AsyncIterator[JwtVerifier]:
    """A verifier for this node; with `jwks` (file path or URL) the block owns the task that keeps its keys.

    A JWKS file that cannot be read at start raises `JwksError` (a configuration mistake); an unreachable URL
    only logs: HS256 keeps working and the refresher retries (with backoff up to `refresh_interval`)."""
    verifier = JwtVerifier(secret, revocations=revocations)
    if jwks is None:
        yield verifier
        return
    source = JwksSource(jwks)
    try:
        verifier.set_jwks(*await _fetch(source))
        loaded = True
    except JwksError as exc:
        if not source.is_url:
            raise
        log.warning("%s; retrying in the background", exc)
        loaded = False
    refresher = _JwksRefresher(verifier, source, refresh_interval, min_refetch, loaded)
    async with open_owned_nursery() as nursery:
        nursery.start_soon(refresher.run)
        try:
            yield verifier
        finally:
            nursery.cancel_scope.cancel()


class _JwksRefresher:
    """Refetches every `interval`, sooner when poked by an unknown `kid` (never twice within `min_refetch`)."""

    def __init__(self, verifier: JwtVerifier, source: JwksSource, interval: float, min_refetch: float,
                 loaded: bool) -> None:  # fmt: skip
        self._verifier = verifier
        self._source = source
        self._interval = interval
        self._min_refetch = min_refetch
        self._loaded = loaded
        self._poked = trio.Event()
        verifier.on_unknown_kid = self._poked.set  # sync and cheap: called from `verify`

    async def run(self) -> None:
        interval, min_refetch = self._interval, self._min_refetch
        wait = interval if self._loaded else min(min_refetch, interval)
        last = trio.current_time()
        while True:
            with trio.move_on_after(max(0.0, last + wait - trio.current_time())):
                await self._poked.wait()
                await trio.sleep_until(last + min_refetch)  # bounded: a flood of unknown kids costs one fetch
            self._poked = trio.Event()
            self._verifier.on_unknown_kid = self._poked.set
            last = trio.current_time()
            try:
                keys, public = await _fetch(self._source)
            except JwksError as exc:
                log.warning("%s; keeping the keys we have", exc)
                wait = min(max(wait, min_refetch) * 2, interval)
                continue
            if sorted(keys) != self._verifier.key_ids:
                log.info("JWKS %s: keys %s", self._source.location, ", ".join(sorted(keys)))
            self._verifier.set_jwks(keys, public)  # always: a key may change under the same kid
            self._loaded = True
            wait = interval
