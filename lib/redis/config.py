"""Where and how to reach Redis: `RedisSettings`, parsed from a URL by `parse_redis_url`.

URL forms (credentials and the service name are percent-decoded):

    redis://[[user]:password@]host[:port][/db][?option=value&...]         plain TCP (default port 6379)
    rediss://[[user]:password@]host[:port][/db][?...]                      TLS
    redis+sentinel://[[user]:password@]host1[:port1][,host2[:port2]...]/service[/db][?...]
    rediss+sentinel://...                                                  TLS to the master (sentinels plain)

For `+sentinel` the hosts are sentinels (default port 26379), `service` is the master's name as the sentinels
know it (`sentinel monitor <service> ...`), and `user:password` are for the master. Sentinels with their own
password take `?sentinel_password=...` (and `sentinel_username=...`).

Options: `connect_timeout`, `command_timeout` (seconds, float), `pool_size` (connections per client),
`max_inflight` (commands awaiting replies per client), `ssl_cert_reqs=none` (do not verify the server
certificate), `ssl_ca_certs=/path/ca.pem`, `sentinel_password`, `sentinel_username`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class RedisSettings:
    """Immutable connection settings shared by a client, its pipelines and its pub/sub connections."""

    addresses: tuple[tuple[str, int], ...] = (("127.0.0.1", DEFAULT_PORT),)
    """The server (one entry), or the sentinels to ask when `sentinel_service` is set."""
    sentinel_service: str | None = None
    """The master name known to the sentinels; None for a direct connection."""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_verify: bool = True
    """Verify the server certificate and host name (turn off only for self-signed test servers)."""
    tls_ca_file: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    connect_timeout: float = 5.0
    """Seconds for TCP + TLS + AUTH/SELECT (and each sentinel query)."""
    command_timeout: float = 5.0
    """Seconds a command (or a pipeline) may wait for its reply before the connection is declared dead."""
    pool_size: int = 2
    """Connections per client; concurrent commands are pipelined over them automatically."""
    max_inflight: int = 100_000
    """Commands awaiting replies per client; callers beyond that wait (bounded memory)."""
    backoff_initial: float = 0.05
    backoff_max: float = 2.0

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("RedisSettings needs at least one address")
        if self.pool_size < 1 or self.max_inflight < 1:
            raise ValueError("pool_size and max_inflight must be >= 1")
        if self.connect_timeout <= 0 or self.command_timeout <= 0:
            raise ValueError("timeouts must be positive")

    def replace(self, **changes: object) -> RedisSettings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


class RedisUrlError(ValueError):
    """The URL is not one of the documented forms."""


_SCHEMES = {
    "redis": (False, False),
    "rediss": (True, False),
    "redis+sentinel": (False, True),
    "rediss+sentinel": (True, True),
}


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [ipv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise RedisUrlError(f"missing host in {text!r}")
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise RedisUrlError(f"bad port in {text!r}") from None


def _parse_db(text: str) -> int:
    try:
        db = int(text)
    except ValueError:
        raise RedisUrlError(f"bad database number {text!r}") from None
    if db < 0:
        raise RedisUrlError(f"bad database number {text!r}")
    return db


def parse_redis_url(url: str, **overrides: object) -> RedisSettings:
    """Settings from one of the documented URL forms; keyword `overrides` win over URL options."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise RedisUrlError(f"unsupported Redis URL scheme in {url!r} (want redis, rediss, redis+sentinel)")
    tls, sentinel = _SCHEMES[scheme.lower()]
    rest, _, query = rest.partition("?")
    rest = rest.split("#", 1)[0]
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        hosts, userinfo = netloc, ""
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, colon, pw = userinfo.partition(":")
        if colon:
            username, password = (unquote(user) or None), unquote(pw)
        else:
            password = unquote(user)  # redis://secret@host: a bare password, as redis-py reads it
    default_port = DEFAULT_SENTINEL_PORT if sentinel else DEFAULT_PORT
    addresses = tuple(_host_port(h, default_port) for h in hosts.split(",") if h)
    if not addresses:
        raise RedisUrlError(f"no host in {url!r}")
    if not sentinel and len(addresses) > 1:
        raise RedisUrlError("several hosts need redis+sentinel://")
    parts = [unquote(p) for p in path.split("/") if p]
    service: str | None = None
    db = 0
    if sentinel:
        if not parts:
            raise RedisUrlError("redis+sentinel:// needs the master name: redis+sentinel://host:26379/mymaster")
        service = parts.pop(0)
    if parts:
        db = _parse_db(parts.pop(0))
    if parts:
        raise RedisUrlError(f"unexpected path in {url!r}")

    values: dict[str, object] = {
        "addresses": addresses,
        "sentinel_service": service,
        "db": db,
        "username": username,
        "password": password,
        "tls": tls,
    }
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in ("connect_timeout", "command_timeout"):
            values[key] = float(value)
        elif key in ("pool_size", "max_inflight"):
            values[key] = int(value)
        elif key == "db":
            values["db"] = _parse_db(value)
        elif key == "ssl_cert_reqs":
            values["tls_verify"] = value.lower() not in ("none", "cert_none", "false", "0")
        elif key == "ssl_ca_certs":
            values["tls_ca_file"] = value
        elif key in ("sentinel_password", "sentinel_username"):
            values[key] = value
        else:
            raise RedisUrlError(f"unknown Redis URL option {key!r}")
    values.update(overrides)
    return RedisSettings(**values)  # type: ignore[arg-type]
