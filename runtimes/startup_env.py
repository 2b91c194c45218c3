"""Environment variables a function may not set: those that change how a process or a runtime starts.

Owner: nobody (constants and one pure check). The deploy side refuses them (a 400 naming the variable:
`worker.deployments.manifest`), and a runtime's spawn side can import the same list to make sure a function's
env never overrides what the runtime sets for itself. One list, so the two never disagree.

Why each group: the dynamic loader reads `LD_*` before any sandbox exists (`LD_PRELOAD` runs native code with the
daemon's rights); `DENO_*`, `NODE_*`, `V8_*` and `RUST_*` change the runtime's own flags, module resolution and
certificates; `PATH`, `HOME`, `TMPDIR`, `SHELL` and the locale/resolver files decide what the process finds on
disk; the proxy variables reroute its network traffic around the node's network policy; `OTEL_*` turns on Deno's
OpenTelemetry exporter, which sends from Deno's Rust side where `--allow-net` is not checked (a function could POST
headers of its choosing to any address); `SSLKEYLOGFILE` makes Deno write a file outside `--allow-write`.
"""

from __future__ import annotations

FORBIDDEN_ENV_PREFIXES: tuple[str, ...] = (
    "LD_",
    "DYLD_",
    "DENO_",
    "NODE_",
    "NPM_CONFIG_",
    "V8_",
    "RUST_",
    "MALLOC_",
    "GLIBC_",
    "PYTHON",
    "OTEL_",
)
"""Name prefixes (compared in upper case)."""

FORBIDDEN_ENV_NAMES: frozenset[str] = frozenset(
    {
        "PATH",
        "HOME",
        "TMPDIR",
        "TMP",
        "TEMP",
        "SHELL",
        "IFS",
        "ENV",
        "BASH_ENV",
        "CDPATH",
        "GCONV_PATH",
        "LOCPATH",
        "NLSPATH",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "RES_OPTIONS",
        "TZDIR",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "NO_COLOR",
        "SSLKEYLOGFILE",
        "SB_EXECUTION_ID",
    }
)
"""Exact names (compared in upper case: `http_proxy` is read as well as `HTTP_PROXY`)."""


def forbidden_env_reason(name: str) -> str | None:
    """Why a function may not set `name`, or None if it may."""
    upper = name.upper()
    if upper in FORBIDDEN_ENV_NAMES:
        return f"{name} changes how the function's process starts or what it reaches; the runtime sets it"
    for prefix in FORBIDDEN_ENV_PREFIXES:
        if upper.startswith(prefix):
            return f"{name}: variables starting with {prefix} change how the function's process or runtime starts"
    return None
