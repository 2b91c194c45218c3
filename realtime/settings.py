"""`RealtimeSettings`: every knob of realtime/, with Supabase's self-host defaults where one exists."""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = ["PrivateChannelRule", "RealtimeSettings"]


class PrivateChannelRule(BaseModel):
    """Allows joining (and REST-broadcasting to) private channels whose name matches `topic`.

    `topic` is a glob (fnmatch) over the channel name without `realtime:`; `{claim}` placeholders are filled
    from the token's claims first, e.g. `user:{sub}:*`. The rule applies when the token's `role` is in
    `roles` (empty = any role) and every `claims` entry equals the token's claim (compared as strings).
    """

    topic: str
    roles: list[str] = Field(default_factory=lambda: ["authenticated"])
    claims: dict[str, str] = Field(default_factory=dict)


class RealtimeSettings(BaseModel):
    path_prefix: str = "/realtime/v1"
    """REST broadcast lives under `<path_prefix>/api/broadcast` (and `/api/broadcast`)."""
    idle_timeout: float = 60.0
    """Close a socket that sent no frame for this long (Phoenix default; clients heartbeat every 25 s)."""
    handshake_timeout: float = 10.0
    max_frame_bytes: int = 5_000_000
    """Largest incoming WebSocket message; bigger closes the socket with 1009."""
    max_payload_bytes: int = 3_000_000
    """Largest broadcast payload / track meta accepted."""
    max_channels_per_socket: int = 100
    max_events_per_second: int = 100
    """Client messages per second per socket (heartbeats excluded); excess: `system` error, channel closed."""
    max_events_per_second_per_key: int | None = None
    """Client messages per second from all sockets sharing one API key (a project's cap, like Supabase's tenant
    limit), counted across the cluster when the node has a shared limiter (Redis). None: off."""
    presence_max_calls: int = 5
    presence_window: float = 30.0
    """At most `presence_max_calls` track/untrack per channel per `presence_window` seconds."""
    max_queued_bytes: int = 4_000_000
    """Per-connection outbound buffer; a client that lets it overflow is disconnected (slow consumer)."""
    write_timeout: float = 30.0
    """A socket that takes no queued bytes for this long is disconnected too (slow consumer)."""
    presence_max_meta_bytes: int = 32_768
    """Largest presence meta one track may carry (JSON bytes); a bigger track gets an error reply."""
    presence_max_entries: int = 10_000
    """Presence entries one channel may hold (all nodes); the track that would exceed it gets an error reply."""
    presence_max_state_bytes: int = 1_000_000
    """Bytes of presence state one channel may hold (all nodes): what a joiner receives in `presence_state`.
    Never more than half of `max_queued_bytes` applies, so no joiner's own state push can overflow its queue."""
    presence_ttl: float = 60.0
    presence_refresh_interval: float = 25.0
    private_channel_rules: list[PrivateChannelRule] = Field(default_factory=list)
    """Private channels are denied unless a rule allows them (or the token is service_role)."""
    service_role_bypass: bool = True
    """A `service_role` token may join any private channel (as Supabase's RLS bypass)."""
    max_rest_body_bytes: int = 4_000_000
    """Largest REST broadcast body read (413 beyond); a payload over `max_payload_bytes` inside it gets 422."""
