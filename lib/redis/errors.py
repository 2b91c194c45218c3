"""The Redis client's errors: everything above lib/redis/ catches these, never trio/OSError/hiredis types.

`map_errors()` is the one boundary where third-party exceptions become ours (`raise ... from exc`).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import hiredis
import trio


class RedisError(Exception):
    """Base of every error raised by worker.redis."""


class RedisConnectionError(RedisError):
    """No usable connection: refused, reset, closed, TLS/auth handshake failed, or no master found.

    Commands that were in flight on a dropped connection may or may not have been applied by the server.
    """


class RedisTimeout(RedisError):
    """A connect or a command did not finish within its timeout. The connection it used was closed."""


class RedisResponseError(RedisError):
    """The server answered with an error reply (`-ERR ...`, `-NOSCRIPT ...`, `-WRONGPASS ...`).

    `code` is the reply's first word (`ERR`, `NOSCRIPT`, `WRONGTYPE`, ...); the connection stays usable.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        first = message.split(" ", 1)[0]
        self.code = first if first.isupper() else "ERR"


class RedisAuthError(RedisConnectionError):
    """AUTH was refused (wrong password or user): retrying with the same credentials will not help."""


class RedisProtocolError(RedisConnectionError):
    """The byte stream could not be parsed as RESP; the connection is closed."""


def response_error(reply: hiredis.ReplyError) -> RedisResponseError:
    """Our error for an error reply that hiredis parsed (hiredis returns these, it does not raise them)."""
    return RedisResponseError(str(reply))


@contextmanager
def map_errors(what: str) -> Iterator[None]:
    """Re-raise trio / OS / TLS / hiredis failures of `what` as our errors, chained with `from`."""
    try:
        yield
    except RedisError:
        raise
    except trio.TooSlowError as exc:
        raise RedisTimeout(f"{what}: timed out") from exc
    except hiredis.ProtocolError as exc:
        raise RedisProtocolError(f"{what}: protocol error: {exc}") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        if isinstance(exc.__cause__, ssl.SSLError):  # trio's SSLStream wraps handshake/record errors
            raise RedisConnectionError(f"{what}: TLS error: {exc.__cause__}") from exc.__cause__
        raise RedisConnectionError(f"{what}: connection closed") from exc
    except ssl.SSLError as exc:
        raise RedisConnectionError(f"{what}: TLS error: {exc}") from exc
    except OSError as exc:
        raise RedisConnectionError(f"{what}: {exc.strerror or exc}") from exc
