"""Limits and timeouts of the HTTP front door. Defaults work on one machine."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class HttpSettings(BaseModel):
    """How much the front door accepts and how long it waits. Every wait on a client is bounded here.

    Timeouts are enforced by one reaper task per server that wakes every `timeout_tick_s`: a timeout fires
    between `t` and `t + timeout_tick_s` (no per-request timer objects on the hot path).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_header_bytes: int = Field(default=64 * 1024, ge=1024, description="Request line + headers; past this → 431")
    keep_alive_timeout_s: float = Field(default=5.0, gt=0, description="Idle wait for the next request on a connection")
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="First request on a connection, or first byte of a head → complete head (slowloris)",
    )
    body_timeout_s: float = Field(default=30.0, gt=0, description="Longest wait for the next piece of a request body")
    body_min_rate: int = Field(
        default=1024,
        ge=0,
        description="Bytes/s a request body must average once `body_grace_s` has passed, else 408 (0: no minimum)",
    )
    body_grace_s: float = Field(
        default=10.0, gt=0, description="Time a request body gets before the minimum rate applies"
    )
    body_deadline_s: float = Field(
        default=300.0, gt=0, description="Longest a whole request body may take; past it → 408"
    )
    write_timeout_s: float = Field(default=30.0, gt=0, description="Longest wait for the client to take one write")
    max_connections: int = Field(
        default=10_000, ge=1, description="Open connections (incl. WebSockets); past this the server stops accepting"
    )
    max_drain_bytes: int = Field(
        default=256 * 1024, ge=0, description="Unread request body the server discards to keep a connection alive"
    )
    linger_timeout_s: float = Field(
        default=2.0,
        ge=0,
        description="After closing with unread input, read and discard this long so the client sees the response",
    )
    coalesce_writes: bool = Field(
        default=True,
        description="Hold complete keep-alive responses until trio is about to wait for I/O, then write them all",
    )
    read_size: int = Field(default=64 * 1024, ge=4096, description="Bytes asked of the socket per read")
    server_header: str = Field(default="mbworker", description="Value of the Server response header ('' omits it)")
    backlog: int | None = Field(default=None, ge=1, description="listen() backlog; None lets trio choose")
    timeout_tick_s: float | None = Field(
        default=None, gt=0, description="Reaper period; None means a quarter of the smallest timeout, at most 1 s"
    )

    def tick(self) -> float:
        if self.timeout_tick_s is not None:
            return self.timeout_tick_s
        smallest = min(self.keep_alive_timeout_s, self.header_timeout_s, self.body_timeout_s, self.write_timeout_s)
        return max(0.005, min(1.0, smallest / 4))
