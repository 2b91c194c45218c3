"""Errors raised by realtime/. Token errors (`mbworker.lib.jwt.JwtError`) and websockets' exceptions are mapped
to these at the boundary."""

from __future__ import annotations


class RealtimeError(Exception):
    """Base class of realtime errors."""


class AuthError(RealtimeError):
    """A key or token failed verification, or a channel is not allowed. `reason` is safe to show clients."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BrokerError(RealtimeError):
    """The broker could not publish or subscribe."""


class PresenceError(RealtimeError):
    """The presence store failed."""
