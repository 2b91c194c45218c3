"""The seam between the front door and the sandboxes.

Ownership: a `Runtime` owns every process/Store it creates and is itself owned by the daemon, which opens it with
its `open_*` async context manager (closing it stops and reaps everything). `FunctionVersion.bundle_dir` belongs
to the DeploymentStore; runtimes only read it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from mbworker.runtimes.limits import Limits

Headers = list[tuple[bytes, bytes]]
"""Header pairs as raw bytes. Request names are lower-case; order and repeats are kept."""

BodyStream = AsyncIterator[bytes]
"""A body as chunks. Consumed once; an empty body yields nothing."""
RequestBodyStream = AsyncIterable[bytes]
"""A request body as chunks, read with `async for` (e.g. the HTTP server's body itself). Consumed once."""


async def empty_body() -> AsyncIterator[bytes]:
    """A body with no chunks."""
    return
    yield b""  # pragma: no cover - makes this an async generator


@dataclass(frozen=True, slots=True)
class FunctionVersion:
    """One immutable deployed version, as a runtime needs it."""

    slug: str
    version: int
    runtime: Literal["deno", "wasm"]
    bundle_dir: Path
    """Unpacked bundle (read-only, owned by the DeploymentStore)."""
    entrypoint: str
    """Path of the entry module relative to `bundle_dir` (index.ts, fn.wasm, ...)."""
    import_map: str | None = None
    """Path of deno.json / import_map.json relative to `bundle_dir`, if any."""
    env: Mapping[str, str] = field(default_factory=dict)
    """The complete environment the function sees (platform variables + its own secrets). Nothing else."""
    limits: Limits = field(default_factory=Limits)
    net_allow: tuple[str, ...] | None = None
    """Hosts (`host` or `host:port`) the function may connect to; None means the public internet. Private and
    cluster addresses stay denied either way (runtimes/deno/permissions.py, docs/security.md)."""
    deno_config: str | None = None
    """Path (relative to `bundle_dir`) of the Deno config to run with: set when the bundle ships its npm packages
    in a `node_modules` folder beside it, with a frozen lockfile; it holds the imports too (`import_map` unused)."""

    @property
    def key(self) -> str:
        return f"{self.slug}@{self.version}"


@dataclass(slots=True)
class Invocation:
    """One request as the function sees it."""

    method: str
    target: str
    """Path and query as the function sees them: `/<slug>/<rest>?<query>`."""
    headers: Headers
    body: RequestBodyStream
    request_id: str
    url: str = ""
    """The full URL the client used (for `Request.url` in Deno and `X_FULL_URL` in WAGI)."""
    upgrade: bool = False
    """A WebSocket upgrade the front door can complete: the function may answer it with a socket (`FunctionSocket`)."""


@dataclass(frozen=True, slots=True)
class SocketClosed:
    """A function's WebSocket ended: the function closed it (its code and reason), or its process is gone."""

    code: int
    reason: str = ""

    @classmethod
    def from_function(cls, code: object, reason: object) -> SocketClosed:
        """The close a function asked for, as it can go on the wire (RFC 6455 §5.5.1, §7.4): a code it may send
        (else 1000) and a reason that is UTF-8 — a lone surrogate becomes U+FFFD, as Deno's own socket sends it —
        of at most 123 bytes."""
        number = code if isinstance(code, int) and not isinstance(code, bool) else 1000
        if not (1000 <= number <= 1003 or 1007 <= number <= 1014 or 3000 <= number <= 4999):
            number = 1000  # 1004-1006 and 1015 never go on the wire; the rest are not close codes
        text = (reason if isinstance(reason, str) else "").encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return cls(number, text.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore"))  # never a cut character


MAX_CLOSE_REASON_BYTES = 123
"""A close frame's reason, in UTF-8 bytes (125 bytes of payload less the 2-byte code)."""


class FunctionSocket(Protocol):
    """The function's end of a WebSocket it accepted (`Deno.upgradeWebSocket`); the front door owns the client's end
    and relays between them. Valid only inside the `invoke` context (leaving it ends the socket in the function).
    Messages are `str` (text) or `bytes` (binary); both directions are windowed, so every wait is bounded by the
    other side making progress or going away."""

    @property
    def protocol(self) -> str | None:
        """The subprotocol the function chose (`Deno.upgradeWebSocket(req, { protocol })`), if any."""
        ...

    async def opened(self, max_message: int) -> None:
        """The client's handshake completed: the function's socket opens (`open` fires)."""
        ...

    async def receive(self) -> str | bytes | SocketClosed:
        """The function's next message to the client, or `SocketClosed` (then nothing more comes)."""
        ...

    async def send(self, message: str | bytes) -> None:
        """Pass one client message to the function; waits while the function has a window's worth unread."""
        ...

    async def close(self, code: int, reason: str = "") -> None:
        """The connection ended with `code` (the client's, or 1006 when it just went): the function's socket closes.
        Last call; idempotent."""
        ...


@dataclass(slots=True)
class InvocationResult:
    """A response head and its streamed body. Valid only inside the `invoke` context."""

    status: int
    headers: Headers
    body: BodyStream
    complete_body: bytes | None = None
    """The whole body when the runtime already holds it (then `body` yields exactly this). Lets the front door
    answer with Content-Length instead of chunked encoding."""
    socket: FunctionSocket | None = None
    """Set when the function accepted a WebSocket upgrade (status 101): the front door completes the handshake."""


@dataclass(frozen=True, slots=True)
class RuntimeStatistics:
    """A snapshot for metrics and /ready."""

    versions: int
    """Function versions with at least one live instance."""
    processes: int
    """Live processes (Deno) or in-flight Stores (Wasm)."""
    busy: int
    """Instances serving at least one request right now."""
    in_flight: int
    """Requests being served."""
    cold_starts: int
    """Instances booted since start."""
    boot_failures: int
    """Boots that failed since start."""
    limit_kills: Mapping[str, int] = field(default_factory=dict)
    """Kills by kind: cpu, memory, wall_clock, fuel, idle."""


class Runtime(Protocol):
    """A sandbox family (Deno subprocesses, Wasmtime Stores)."""

    name: str

    async def warm(self, fn: FunctionVersion) -> None:
        """Boot one instance of `fn` so that it is ready to serve. Raises `BootError` with the function's output."""
        ...

    def invoke(self, fn: FunctionVersion, invocation: Invocation) -> AbstractAsyncContextManager[InvocationResult]:
        """Run one request. Entering yields the response head; the body streams while the context is open.

        Raises a `FunctionRuntimeError` subclass on enter (boot, limit, idle timeout, crash before the head). A
        failure while the body streams ends the body iterator with the same errors. Leaving the context early
        cancels the request inside the sandbox.
        """
        ...

    async def retire(self, fn: FunctionVersion) -> None:
        """Stop taking new requests for `fn`; in-flight ones finish, then its instances stop."""
        ...

    def statistics(self) -> RuntimeStatistics: ...
