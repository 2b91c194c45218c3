"""Settings of one worker node: a pydantic model read from flags, then `MBWORKER_*` env, then `--config` TOML.

Every field has a default that works on one machine; `load_settings` is the only constructor the daemon uses.
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from mbworker.lib.http.settings import HttpSettings
from mbworker.realtime.settings import RealtimeSettings
from mbworker.runtimes.deno.permissions import NetPolicy, NetPolicyError
from mbworker.runtimes.limits import Limits
from mbworker.worker.errors import ConfigError

_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("mbworker_config_file", default=None)


class WorkerSettings(BaseSettings):
    """Everything an operator can set. Env names are `MBWORKER_<FIELD>`; nested ones `MBWORKER_LIMITS__MEMORY_MB`."""

    model_config = SettingsConfigDict(
        env_prefix="MBWORKER_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    host: str = Field("127.0.0.1", description="Public listener address (functions, realtime, health)")
    port: int = Field(8000, ge=0, le=65535, description="Public listener port (0: any free port)")
    admin_host: str = Field("127.0.0.1", description="Admin listener address: loopback or a private interface")
    admin_port: int = Field(8001, ge=0, le=65535, description="Admin listener port (0: any free port)")
    data_dir: Path = Field(Path(".mbworker"), description="Deployments, secrets, caches of this node")
    jwt_secret: SecretStr | None = Field(None, description="HS256 secret of the project; generated if unset")
    jwks: str | None = Field(
        None,
        description="JWKS of the project's asymmetric signing keys (ES256/RS256), a file path or an http(s) URL: "
        "tokens they sign are accepted besides HS256 ones (refreshed every `jwks_refresh_s` and on an unknown kid); "
        "functions get its public keys as SUPABASE_JWKS",
    )
    jwks_refresh_s: float = Field(
        600,
        ge=1,
        description="How often the JWKS is read again; a token naming an unknown kid makes it sooner, at most once "
        "per this or 30 s, whichever is less",
    )
    admin_token: SecretStr | None = Field(None, description="Bearer token of the admin API; generated if unset")
    redis_url: str | None = Field(None, description="Redis of the state pillar; unset means single node")
    public_url: str | None = Field(None, description="SUPABASE_URL given to functions; default the public listener")
    db_url: SecretStr | None = Field(
        None,
        description="SUPABASE_DB_URL given to functions: the cluster's Postgres as functions should reach it "
        "(the state pillar's pooler); unset: functions get none",
    )
    node_id: str | None = Field(None, description="Name of this node in a cluster; default hostname-port")
    advertise_host: str | None = Field(
        None, description="Address proxies and the control plane reach this node at; default the listener's"
    )
    deno: Path | None = Field(None, description="Deno binary; default the one the `deno` package ships")
    cache_mb: int = Field(64, ge=0, description="L1 result cache capacity in MiB (0 disables it)")
    wasm_sync_wait_us: int = Field(
        0,
        ge=0,
        le=10_000,
        description="Opt-in for nodes serving short Wasm calls: the event loop waits, blocked, up to this long for "
        "each call (0: never). Cheaper per call, but nothing else runs meanwhile (docs/wasm.md)",
    )
    max_bundle_mb: int = Field(20, ge=1, description="Largest accepted function bundle (compressed)")
    drain_grace_s: float = Field(30, gt=0, description="How long in-flight work may finish on drain/SIGTERM")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged")
    limits: Limits = Field(default_factory=Limits, description="Default limits of every function")
    max_tmp_mb: int = Field(
        1024,
        ge=1,
        description="Largest temp dir a function may ask for (`limits.tmp_mb` in its function.toml); a larger "
        "request is lowered to this",
    )
    realtime: RealtimeSettings = Field(default_factory=RealtimeSettings, description="Realtime channels and limits")
    admin_allow_public: bool = Field(
        False, description="Allow admin_host to be a public address (0.0.0.0 and :: count as public)"
    )
    net_deny: list[str] = Field(
        default_factory=list,
        description="Extra hosts/addresses functions may never reach (PostgreSQL, HAProxy, ...); the admin "
        "listener, Redis and this node's own addresses are denied automatically",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="CIDRs of proxies (HAProxy, a load balancer) whose X-Forwarded-* headers functions see; from "
        "any other peer those headers are replaced by what the connection says",
    )
    http: HttpSettings = Field(
        default_factory=HttpSettings, description="Limits and timeouts of the public listener (slow clients → 408)"
    )
    net_allow_private: list[str] = Field(
        default_factory=list,
        description="Private IP addresses (optionally :port) functions may reach, e.g. 10.0.5.7:5432",
    )

    @model_validator(mode="after")
    def _hardening(self) -> WorkerSettings:
        if not self.admin_allow_public and not is_private_bind_address(self.admin_host):
            raise ValueError(
                f"admin_host {self.admin_host!r} is not a loopback or private address: the admin API must not be "
                "reachable from the internet. Bind it to 127.0.0.1 or a private interface, or pass --admin-public "
                "(MBWORKER_ADMIN_ALLOW_PUBLIC=true) if a firewall protects it"
            )
        if "," in str(self.data_dir.resolve()):
            raise ValueError(
                f"data_dir {str(self.data_dir.resolve())!r} contains a comma: Deno's --allow-read/--allow-write "
                "lists are comma-separated and cannot grant such a path to functions. Choose another directory"
            )
        for cidr in self.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"trusted_proxies: {exc}") from None
        try:
            NetPolicy(deny=tuple(self.net_deny), allow_private=tuple(self.net_allow_private))
        except (NetPolicyError, ValidationError) as exc:
            raise ValueError(f"net_deny/net_allow_private: {exc}") from exc
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @property
    def public_base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def is_private_bind_address(host: str) -> bool:
    """True for loopback, private (RFC 1918, fc00::/7, 100.64/10) and link-local addresses, `localhost`, and names
    that resolve only to such addresses. The wildcard addresses (0.0.0.0, ::, "") count as public: they include
    every interface."""
    host = host.strip().strip("[]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        addrs = [ipaddress.ip_address(host)]
    except ValueError:
        if not host:
            return False
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return False
        addrs = [ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos]
    return bool(addrs) and all(
        not a.is_unspecified and (a.is_loopback or a.is_private or a.is_link_local or a in _CGNAT) for a in addrs
    )


def load_settings(config_file: Path | None = None, **overrides: Any) -> WorkerSettings:
    """Settings from flags (`overrides`, None values ignored) > environment > `config_file` > defaults."""
    if config_file is None and os.environ.get("MBWORKER_CONFIG"):
        config_file = Path(os.environ["MBWORKER_CONFIG"])
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file {config_file} does not exist")
    token = _config_file.set(config_file)
    try:
        return WorkerSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid settings:\n" + "\n".join(lines)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from exc
    except RecursionError:  # arrays or tables nested past Python's recursion limit
        raise ConfigError(f"config file {config_file} is not valid TOML: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"config file {config_file} can't be read: {exc.strerror}") from exc
    finally:
        _config_file.reset(token)
