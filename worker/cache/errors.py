"""Errors of the result cache. Code outside worker/cache/ catches these, never trio's."""

from __future__ import annotations


class CacheError(Exception):
    """Base of every error the result cache raises."""


class FlightFailed(CacheError):
    """The request this one waited for (the flight's leader) failed; nothing was cached.

    `cause` is the leader's own exception (often a `runtimes.errors.FunctionRuntimeError`): answer this request
    as if it had failed the same way. The next request for the key starts a new flight.
    """

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(f"the shared invocation failed: {cause!r}")


class FlightTimeout(CacheError):
    """This request's own timeout passed while it waited for the flight's leader."""
