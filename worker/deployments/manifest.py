"""Function settings: `function.toml`, `[functions.<slug>]` in `supabase/config.toml`, `--env-file`, and the
`mbworker.json` manifest that travels inside every bundle.

Pure: parsing and validation only, no I/O beyond reading the one file a loader is given. Every problem surfaces
as a `ManifestError` whose `problems` are short, user-facing lines ("function.toml: limits.memory_mb: ...").
"""

from __future__ import annotations

import io
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from dotenv.parser import parse_stream
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

from mbworker.runtimes.limits import Limits
from mbworker.runtimes.startup_env import forbidden_env_reason

SLUG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
"""Supabase's `FuncSlugPattern`: the CLI skips folders that don't match (that is why `_shared/` is never deployed)."""

MAX_SECRETS = 100
MAX_SECRET_NAME = 256
MAX_SECRET_VALUE = 48 * 1024
RESERVED_PREFIX = "SUPABASE_"
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

WASM_SUFFIXES = (".wasm", ".wat")
DENO_ENTRY_NAMES = ("index.ts", "index.js", "index.mjs", "index.jsx", "index.tsx")

MANIFEST_NAME = "mbworker.json"
MANIFEST_FORMAT = 1

Runtime = Literal["deno", "wasm"]


def default_limits() -> Limits:
    """`Limits()` with every default (spelled so that mypy, which can't see pydantic's defaults, accepts it)."""
    return Limits.model_validate({})


_BUILTIN_LIMITS = dict(default_limits())


class ManifestError(ValueError):
    """Invalid function settings. `problems` holds one user-facing line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def validate_slug(slug: str) -> str:
    """`slug` unchanged if it is a valid function name, else `ManifestError`."""
    if not SLUG_RE.match(slug):
        raise ManifestError(
            [f"invalid function name {slug!r}: must match {SLUG_RE.pattern} (letters, digits, _ and -)"]
        )
    return slug


def parse_duration(value: str | float | int) -> float:
    """Seconds from `"30s"`, `"500ms"`, `"5m"`, `"1h"`, `"1d"`, or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s', '5m' or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(f"invalid duration {value!r}: use a number with a unit: ms, s, m, h or d (e.g. '30s')")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds < 0:
        raise ValueError("a duration can't be negative")
    return seconds


def secrets_problems(env: dict[str, str]) -> list[str]:
    """Every way `env` breaks the Supabase secrets rules (empty when it is valid)."""
    problems: list[str] = []
    if len(env) > MAX_SECRETS:
        problems.append(f"env: {len(env)} secrets, at most {MAX_SECRETS} are allowed")
    for name, value in env.items():
        shown = name if len(name) <= 40 else name[:40] + "…"
        if not name:
            problems.append("env: a secret name can't be empty")
        elif len(name) > MAX_SECRET_NAME:
            problems.append(f"env: {shown}: name is {len(name)} characters, at most {MAX_SECRET_NAME}")
        elif name.upper().startswith(RESERVED_PREFIX):
            problems.append(f"env: {shown}: names starting with {RESERVED_PREFIX} are reserved for the platform")
        elif not _ENV_NAME_RE.match(name):
            problems.append(f"env: {shown}: names may contain only letters, digits and _, and not start with a digit")
        elif (reason := forbidden_env_reason(name)) is not None:
            problems.append(f"env: {reason}")
        if not isinstance(value, str):
            problems.append(f"env: {shown}: value must be a string")
            continue
        size = len(value.encode())
        if size > MAX_SECRET_VALUE:
            problems.append(f"env: {shown}: value is {size} bytes, at most {MAX_SECRET_VALUE} (48 KiB)")
        if "\x00" in value:
            problems.append(f"env: {shown}: value contains a NUL byte")
    return problems


def validate_secrets(env: dict[str, str]) -> dict[str, str]:
    """`env` unchanged if it obeys the secrets rules, else `ManifestError` listing every problem."""
    problems = secrets_problems(env)
    if problems:
        raise ManifestError(problems)
    return env


class CacheSettings(BaseModel):
    """`[cache]` in function.toml: read by the result cache. `ttl` None means "don't cache"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ttl: float | None = None
    """Seconds a cached response stays fresh (from a duration string like "30s")."""
    vary: list[str] = Field(default_factory=list)
    """Request header names (lower-cased) that are part of the cache key."""
    include_authorization: bool = True
    """Key on the Authorization header too, so one user's response never reaches another."""
    l2: bool = False
    """Also share cached results through the cluster's Redis (the L2), in cluster mode."""

    @field_validator("ttl", mode="before")
    @classmethod
    def _ttl(cls, v: object) -> float | None:
        if v is None:
            return None
        if not isinstance(v, str | int | float):
            raise ValueError("expected a duration such as '30s'")
        return parse_duration(v)

    @field_validator("vary")
    @classmethod
    def _vary(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for name in v:
            if not _HEADER_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() not in out:
                out.append(name.lower())
        return out


_NET_HOST_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::(\d{1,5}))?$")


class NetSettings(BaseModel):
    """`[net]` in function.toml. `allow` None means the public internet; a list narrows it to those hosts
    (`host` or `host:port`, IPv6 in brackets). Private and cluster addresses stay denied either way."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allow: list[str] | None = None

    @field_validator("allow")
    @classmethod
    def _allow(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        out: list[str] = []
        for entry in v:
            m = _NET_HOST_RE.match(entry.strip())
            if not m or (m.group(1) is not None and not 0 < int(m.group(1)) < 65536):
                raise ValueError(f"{entry!r} is not host or host:port (no scheme, path or wildcard)")
            if entry.strip().lower() not in out:
                out.append(entry.strip().lower())
        return out


class FunctionSettings(BaseModel):
    """The keys Supabase's `[functions.<slug>]` table and our function.toml share. None means "not set here"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool | None = None
    verify_jwt: bool | None = None
    import_map: str | None = None
    entrypoint: str | None = None
    static_files: list[str] | None = None


class ConfigTomlFunction(FunctionSettings):
    """`[functions.<slug>]` in supabase/config.toml. Paths are relative to the `supabase/` folder. Unknown keys
    are ignored: that file belongs to the Supabase CLI, which adds keys over time."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class FunctionToml(FunctionSettings):
    """`function.toml` in a function folder (ours, so unknown keys are errors). Paths are relative to the folder."""

    runtime: Runtime | None = None
    limits: Limits = Field(default_factory=default_limits)
    env: dict[str, str] = Field(default_factory=dict)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    net: NetSettings = Field(default_factory=NetSettings)

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        problems = secrets_problems(v)
        if problems:
            raise ValueError("; ".join(p.removeprefix("env: ") for p in problems))
        return v


def infer_runtime(entrypoint: str) -> Runtime:
    """`wasm` for a `*.wasm`/`*.wat` entrypoint, else `deno`."""
    return "wasm" if entrypoint.lower().endswith(WASM_SUFFIXES) else "deno"


class Manifest(BaseModel):
    """`mbworker.json` at the root of every bundle: everything the worker needs besides the files.

    Paths are relative to the bundle root, POSIX style. `env` holds the function's secrets: the store keeps it out
    of listings.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = 1
    slug: str
    runtime: Runtime
    entrypoint: str
    import_map: str | None = None
    verify_jwt: bool = True
    static_patterns: list[str] = Field(default_factory=list)
    limits: Limits = Field(default_factory=default_limits)
    env: dict[str, str] = Field(default_factory=dict)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    net: NetSettings = Field(default_factory=NetSettings)
    source_entrypoint: str | None = None
    """The entry module the developer wrote when `entrypoint` is a `deno bundle` output, else None."""
    deno_config: str | None = None
    """The Deno config the function runs with when its npm packages ship as packages (a `node_modules` folder and
    a frozen `deno.lock` beside it, resolved on the deploying machine); None: `--no-config` and `import_map`."""

    @field_validator("slug")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not SLUG_RE.match(v):
            raise ValueError(f"must match {SLUG_RE.pattern}")
        return v

    @model_serializer(mode="wrap")
    def _for_older_readers(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return for_older_readers(handler(self), self.limits)

    @field_validator("entrypoint", "import_map", "source_entrypoint", "deno_config")
    @classmethod
    def _relpath(cls, v: str | None) -> str | None:
        if v is not None:
            check_relative_path(v)
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        problems = secrets_problems(v)
        if problems:
            raise ValueError("; ".join(p.removeprefix("env: ") for p in problems))
        return v


def for_older_readers(data: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """A manifest's or deployment record's dump, readable by a worker one release older (they refuse unknown keys)
    during a rolling upgrade: `deno_config` only when set, and only the limits the function changed from the
    built-in defaults (an absent limit reads as the operator's default anyway: `Deployer.limits_for`), so a limit
    added since is written only by a function that sets it."""
    data = drop_none(data, "deno_config")
    if "limits" in data:
        data["limits"] = {k: v for k, v in data["limits"].items() if getattr(limits, k) != _BUILTIN_LIMITS[k]}
    return data


def drop_none(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    """`data` without `keys` whose value is None. Fields added later are written only when set, so a manifest or
    record that doesn't use them stays readable by a worker from before them (they refuse unknown keys) during a
    rolling upgrade."""
    for key in keys:
        if data.get(key, 0) is None:
            del data[key]
    return data


def check_relative_path(path: str) -> str:
    """`path` if it is a clean relative POSIX path inside a bundle (no `..`, no absolute, no backslash, no NUL)."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise ValueError(f"{path!r} is not a relative path inside the bundle")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or (len(parts[0]) >= 2 and parts[0][1] == ":"):
        raise ValueError(f"{path!r} is not a clean relative path inside the bundle")
    # What a file system takes (NAME_MAX 255 bytes a name); the whole path is kept well under PATH_MAX.
    if (
        any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts)
        or len(path.encode("utf-8", "surrogateescape")) > 1024
    ):
        raise ValueError(f"{path[:80]!r}… has a name over 255 bytes or is over 1024 bytes long")
    return path


def format_validation_error(source: str, exc: ValidationError) -> ManifestError:
    """One line per pydantic error, prefixed with the file and the dotted location."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return ManifestError(problems)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError([f"{path}: invalid TOML: {exc}"]) from exc
    except RecursionError:  # nested past Python's recursion limit
        raise ManifestError([f"{path}: invalid TOML: nested too deeply"]) from None
    except OSError as exc:
        raise ManifestError([f"{path}: can't read: {exc.strerror}"]) from exc


def load_function_toml(path: Path) -> FunctionToml:
    """Parse and validate a `function.toml`."""
    data = _read_toml(path)
    try:
        return FunctionToml.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(str(path), exc) from exc


def load_config_toml(path: Path) -> dict[str, ConfigTomlFunction]:
    """The `[functions.<slug>]` tables of a `supabase/config.toml`, by slug (other sections are ignored)."""
    data = _read_toml(path)
    functions = data.get("functions", {})
    if not isinstance(functions, dict):
        raise ManifestError([f"{path}: [functions] must be a table"])
    out: dict[str, ConfigTomlFunction] = {}
    problems: list[str] = []
    for slug, table in functions.items():
        if not isinstance(table, dict):
            problems.append(f"{path}: functions.{slug} must be a table")
            continue
        try:
            out[slug] = ConfigTomlFunction.model_validate(table)
        except ValidationError as exc:
            problems.extend(format_validation_error(f"{path}: functions.{slug}", exc).problems)
    if problems:
        raise ManifestError(problems)
    return out


def parse_env_text(text: str, *, source: str = "env file") -> dict[str, str]:
    """Secrets from dotenv text (`KEY=value`, quotes, `export`, `#` comments); validated like any secrets.

    Variable expansion is off: `$HOME` stays literal, so a deploy never copies the deployer's environment.
    """
    problems: list[str] = []
    env: dict[str, str] = {}
    for binding in parse_stream(io.StringIO(text)):
        line = binding.original.line
        if binding.error:
            problems.append(f"{source}: line {line}: not KEY=value: {binding.original.string.strip()[:60]!r}")
        elif binding.key is None:
            continue  # blank line or comment
        elif binding.value is None:
            problems.append(
                f"{source}: line {line}: {binding.key} has no value (write {binding.key}= for an empty one)"
            )
        else:
            env[binding.key] = binding.value  # a later line wins, as in a shell
    problems.extend(f"{source}: {p.removeprefix('env: ')}" for p in secrets_problems(env))
    if problems:
        raise ManifestError(problems)
    return env


def parse_env_file(path: Path) -> dict[str, str]:
    """`parse_env_text` on a file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError([f"{path}: can't read env file: {exc}"]) from exc
    return parse_env_text(text, source=str(path))
