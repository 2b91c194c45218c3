"""A Node script that drives realtime-js clients and reports JSON lines as events happen, for tests to react to."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from tests.conftest import require_binary
from tests.e2e.harness import E2E_DIR, ensure_node_modules

Predicate = Callable[[dict[str, Any]], bool]


class Events:
    """The driver's JSON lines, with waits for the first line (from an index on) matching a predicate."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self._changed = trio.Event()

    def add(self, event: dict[str, Any]) -> None:
        self.lines.append(event)
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, predicate: Predicate, timeout: float, since: int = 0) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                for line in self.lines[since:]:
                    if predicate(line):
                        return line
                await self._changed.wait()

    async def wait_presence(self, names: list[str], expected: list[str], timeout: float, since: int = 0) -> None:
        """Until each of `names` was last told (after line `since`) that the room holds exactly `expected`."""

        def last_presence(name: str) -> list[str] | None:
            seen = [e["presence"] for e in self.lines[since:] if e.get("on") == name and "presence" in e]
            return seen[-1] if seen else None

        with trio.fail_after(timeout):
            while any(last_presence(n) != expected for n in names):
                await self._changed.wait()

    def got(self, name: str, message_id: str) -> Predicate:
        return lambda e: e.get("on") == name and e.get("broadcast", {}).get("id") == message_id

    def subscribed(self, name: str) -> Predicate:
        return lambda e: e.get("on") == name and e.get("subscribed") is True

    def deliveries(self) -> Counter[tuple[str, str]]:
        return Counter((e["on"], e["broadcast"]["id"]) for e in self.lines if "broadcast" in e)


class NodeDriver:
    """A running driver: `events` fill as it prints; `send(...)` writes one JSON command line to its stdin."""

    def __init__(self, process: trio.Process, events: Events) -> None:
        self.process = process
        self.events = events

    async def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")


@asynccontextmanager
async def run_node_driver(script: str, env: Mapping[str, str]) -> AsyncIterator[NodeDriver]:
    """Start `tests/e2e/<script>` under node with `env` added; killed and reaped when the block ends."""
    node = require_binary("node")
    ensure_node_modules(node)
    process = await trio.lowlevel.open_process(
        [node, str(E2E_DIR / script)],
        cwd=E2E_DIR,
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    events = Events()

    async def pump() -> None:
        assert process.stdout is not None
        buffer = b""
        async for chunk in process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                events.add(json.loads(line))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            yield NodeDriver(process, events)
            nursery.cancel_scope.cancel()
    finally:
        process.kill()
        with trio.move_on_after(10):
            await process.wait()
