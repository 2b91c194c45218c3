"""A nursery for `open_*` context managers whose callers expect our errors, not one-member ExceptionGroups.

In lib/, which everything builds on: the Redis client, the HTTP server, runtimes.wasm and the daemon use it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def open_owned_nursery() -> AsyncIterator[trio.Nursery]:
    """`trio.open_nursery()`, but a group holding exactly one exception re-raises that exception, so an error
    raised in the `async with` body (or by the one failing task) reaches the caller as itself."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if leaf is group:
            raise
        raise leaf from leaf.__cause__
