"""Recent function output per function: a bounded ring buffer, live followers, the admin handler and the CLI reader.

- `FunctionLogs` keeps the last `lines` lines (and at most `max_chars` characters) of each function's stdout and
  stderr, each line cut at 10,000 characters. `record(...)` never blocks and never waits: it is called from the
  runtimes' `on_log` hook on the trio thread. `FunctionLogs.on_log` has the runtimes' `OnLog` signature and also
  writes the line to the JSON log (`worker.logs.function_log`), so one hook feeds Loki and the ring.
- `follow(slug)` registers a follower with its own bounded memory channel. A follower that does not keep up
  loses lines (counted, then announced by a `Dropped` marker before the next line it gets); the producer never
  waits for it.
- `serve_logs(...)` answers `GET /admin/v1/functions/{slug}/logs?since=10m&limit=100&follow=1` with JSON lines
  (one object per line, the same fields as the JSON log); with `follow=1` the response streams until the client
  goes away or `until` is set (pass the daemon's draining event so drain is not held up by a follower).
- `print_logs(...)` is the CLI side of `mbworker functions logs SLUG [--follow] [--since 10m]`.

Owner: the daemon owns one `FunctionLogs`; followers are owned by the `follow` block that opened them.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import parse_qs

import trio

from mbworker.lib.http.types import ClientDisconnected, HttpRequest, Responder
from mbworker.runtimes.api import FunctionVersion
from mbworker.worker.logs import MAX_LINE, function_log

__all__ = [
    "Dropped",
    "Follower",
    "FunctionLogs",
    "FunctionLogsStatistics",
    "LogLine",
    "TooManyFollowers",
    "parse_duration",
    "print_logs",
    "serve_logs",
]

TRUNCATED = "…[truncated]"
NDJSON = b"application/x-ndjson"


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line of function output as the ring keeps it."""

    seq: int
    """Position in this node's log (increasing across functions); followers use it to skip the backlog."""
    time: float
    """Unix time the line was recorded."""
    function: str
    version: int
    execution_id: str
    stream: str
    """stdout or stderr."""
    line: str

    def to_json(self) -> dict[str, Any]:
        return {
            "time": _iso(self.time),
            "function": self.function,
            "version": self.version,
            "execution_id": self.execution_id,
            "stream": self.stream,
            "msg": self.line,
        }


@dataclass(frozen=True, slots=True)
class Dropped:
    """`count` lines were not delivered to this follower because it fell behind."""

    count: int
    time: float

    def to_json(self, function: str) -> dict[str, Any]:
        return {
            "time": _iso(self.time),
            "function": function,
            "dropped": self.count,
            "msg": f"… {self.count} lines dropped (reader too slow)",
        }


@dataclass(frozen=True, slots=True)
class FunctionLogsStatistics:
    functions: int
    """Functions with at least one buffered line."""
    lines: int
    """Lines buffered over all functions."""
    chars: int
    """Characters buffered over all functions (the memory bound is per function: `max_chars`)."""
    followers: int
    """Followers attached now."""
    recorded: int
    """Lines recorded since start."""
    truncated: int
    """Lines cut at the line limit since start."""
    dropped: int
    """Lines followers missed because they were too slow, since start."""


class TooManyFollowers(Exception):
    """The function already has `max_followers` followers (the admin handler answers 429)."""


class _Ring:
    __slots__ = ("chars", "followers", "lines")

    def __init__(self) -> None:
        self.lines: deque[LogLine] = deque()
        self.chars = 0
        self.followers: set[Follower] = set()


class Follower:
    """A live view of one function's new lines. Created by `FunctionLogs.follow`; iterate or `receive()`."""

    def __init__(self, function: str, buffer: int, backlog: list[LogLine]) -> None:
        self.function = function
        self.backlog = backlog
        """Lines already in the ring when the follower attached (honouring `since_s`/`limit`), oldest first."""
        self._send, self._receive = trio.open_memory_channel[LogLine | Dropped](buffer)
        self._dropped = 0
        self.dropped_total = 0

    def _offer(self, item: LogLine) -> int:
        """Queue `item` without waiting; returns how many lines were dropped by this call (0 or 1)."""
        try:
            if self._dropped:
                self._send.send_nowait(Dropped(self._dropped, item.time))
                self._dropped = 0
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self._dropped += 1
            self.dropped_total += 1
            return 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return 0
        return 0

    async def receive(self) -> LogLine | Dropped:
        return await self._receive.receive()

    def receive_nowait(self) -> LogLine | Dropped:
        return self._receive.receive_nowait()

    def __aiter__(self) -> AsyncIterator[LogLine | Dropped]:
        return self._receive.__aiter__()

    def _close(self) -> None:
        self._send.close()
        self._receive.close()


class FunctionLogs:
    """Per-function rings of recent output. Synchronous and cheap; call on the trio thread."""

    def __init__(
        self,
        *,
        lines: int = 1000,
        max_chars: int = 1_000_000,
        max_line: int = MAX_LINE,
        follower_buffer: int = 512,
        max_followers: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lines < 1 or max_chars < 1 or max_line < 1 or follower_buffer < 1 or max_followers < 0:
            raise ValueError("FunctionLogs bounds must be positive")
        self.lines = lines
        self.max_chars = max_chars
        self.max_line = max_line
        self.follower_buffer = follower_buffer
        self.max_followers = max_followers
        self._clock = clock
        self._rings: dict[str, _Ring] = {}
        self._seq = 0
        self._recorded = 0
        self._truncated = 0
        self._dropped = 0

    def record(self, slug: str, version: int, execution_id: str, stream: str, line: str) -> None:
        """Keep one line of `slug`'s output and hand it to its followers. Never blocks."""
        if len(line) > self.max_line:
            line = line[: self.max_line] + TRUNCATED
            self._truncated += 1
        self._seq += 1
        self._recorded += 1
        item = LogLine(self._seq, self._clock(), slug, version, execution_id, stream, line)
        ring = self._rings.get(slug)
        if ring is None:
            ring = self._rings[slug] = _Ring()
        ring.lines.append(item)
        ring.chars += len(line)
        while len(ring.lines) > self.lines or (ring.chars > self.max_chars and len(ring.lines) > 1):
            ring.chars -= len(ring.lines.popleft().line)
        for follower in ring.followers:
            self._dropped += follower._offer(item)

    def on_log(self, fn: FunctionVersion, execution_id: str, stream: str, line: str) -> None:
        """The runtimes' `on_log` hook: the JSON log line (Loki) plus the ring (the admin API)."""
        function_log(fn.slug, fn.version, execution_id, stream, line)
        self.record(fn.slug, fn.version, execution_id, stream, line)

    def recent(self, slug: str, since_s: float | None = None, limit: int | None = None) -> list[LogLine]:
        """Buffered lines of `slug`, oldest first: those of the last `since_s` seconds, at most the last `limit`."""
        ring = self._rings.get(slug)
        if ring is None:
            return []
        lines: list[LogLine]
        if since_s is None:
            lines = list(ring.lines)
        else:
            cutoff = self._clock() - since_s
            lines = []
            for item in reversed(ring.lines):  # newest first: stop at the first line that is too old
                if item.time < cutoff:
                    break
                lines.append(item)
            lines.reverse()
        if limit is not None:
            lines = lines[-limit:] if limit > 0 else []
        return lines

    @asynccontextmanager
    async def follow(
        self, slug: str, *, since_s: float | None = None, limit: int | None = None
    ) -> AsyncIterator[Follower]:
        """Attach a follower to `slug` for the block. Its `backlog` holds the matching buffered lines, and it
        receives every later line exactly once (or a `Dropped` marker in place of lines it was too slow for).

        Raises `TooManyFollowers` past `max_followers` for this function."""
        ring = self._rings.get(slug)
        if ring is None:
            ring = self._rings[slug] = _Ring()
        if len(ring.followers) >= self.max_followers:
            raise TooManyFollowers(f"{slug} already has {self.max_followers} log followers")
        # Backlog and registration happen without a checkpoint in between: no line is missed or seen twice.
        follower = Follower(slug, self.follower_buffer, self.recent(slug, since_s, limit))
        ring.followers.add(follower)
        try:
            yield follower
        finally:
            ring.followers.discard(follower)
            follower._close()
            if not ring.followers and not ring.lines and self._rings.get(slug) is ring:
                del self._rings[slug]

    def forget(self, slug: str) -> None:
        """Drop `slug`'s buffered lines (after delete). Followers stay attached and see new lines, if any."""
        ring = self._rings.get(slug)
        if ring is None:
            return
        if ring.followers:
            ring.lines.clear()
            ring.chars = 0
        else:
            del self._rings[slug]

    def statistics(self) -> FunctionLogsStatistics:
        rings = self._rings.values()
        return FunctionLogsStatistics(
            functions=sum(1 for r in rings if r.lines),
            lines=sum(len(r.lines) for r in rings),
            chars=sum(r.chars for r in rings),
            followers=sum(len(r.followers) for r in rings),
            recorded=self._recorded,
            truncated=self._truncated,
            dropped=self._dropped,
        )


# -- admin handler ------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
HEARTBEAT_S = 15.0
"""A follow stream writes an empty line this often when idle, so a vanished client is noticed."""
MAX_BATCH = 256


def parse_duration(text: str) -> float:
    """`10m`, `30s`, `1.5h`, `2d`, `500ms` or plain seconds → seconds. Raises ValueError otherwise."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"invalid duration {text!r}: use e.g. 30s, 10m, 2h, 1d")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _encode(items: list[LogLine | Dropped], function: str) -> bytes:
    out = []
    for item in items:
        obj = item.to_json(function) if isinstance(item, Dropped) else item.to_json()
        out.append(json.dumps(obj, ensure_ascii=False))
    return ("\n".join(out) + "\n").encode() if out else b""


async def _send_error(responder: Responder, status: int, code: str, message: str) -> None:
    body = json.dumps({"code": code, "message": message}).encode()
    await responder.send(status, [(b"content-type", b"application/json"), (b"sb-error-code", code.encode())], body)


async def serve_logs(
    request: HttpRequest,
    responder: Responder,
    slug: str,
    buffer: FunctionLogs,
    *,
    exists: Callable[[str], bool] | None = None,
    until: trio.Event | None = None,
    heartbeat_s: float = HEARTBEAT_S,
) -> None:
    """`GET /admin/v1/functions/{slug}/logs[?since=10m][&limit=N][&follow=1]`: JSON lines, oldest first.

    `exists(slug)` False → 404. Without `follow`, one response with the buffered lines. With it, a streaming
    response: the buffered lines, then new ones as they come, until the client disconnects or `until` is set.
    The caller (the admin app) has already checked the token.
    """
    if exists is not None and not exists(slug):
        await _send_error(responder, 404, "NOT_FOUND", f"No function {slug!r}")
        return
    query = parse_qs(request.query, keep_blank_values=True)
    try:
        since_s = parse_duration(query["since"][-1]) if query.get("since", [""])[-1] else None
        limit = int(query["limit"][-1]) if query.get("limit", [""])[-1] else None
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
    except ValueError as exc:
        await _send_error(responder, 400, "BAD_REQUEST", str(exc))
        return
    follow = query.get("follow", ["0"])[-1].lower() in ("1", "true", "yes")
    headers = [(b"content-type", NDJSON), (b"cache-control", b"no-store")]
    if not follow:
        items: list[LogLine | Dropped] = list(buffer.recent(slug, since_s, limit))
        await responder.send(200, headers, _encode(items, slug))
        return
    try:
        async with buffer.follow(slug, since_s=since_s, limit=limit) as follower:
            await responder.start(200, [*headers, (b"x-accel-buffering", b"no")])
            disconnected = False
            writing = [False]
            try:
                await responder.write(_encode(list(follower.backlog), slug))
                async with trio.open_nursery() as nursery:
                    if until is not None:
                        nursery.start_soon(_cancel_when_set, until, nursery.cancel_scope)
                    await _pump(follower, responder, slug, heartbeat_s, writing)
            except* ClientDisconnected:
                disconnected = True  # the client went away: nothing left to tell it
            if not disconnected and not writing[0]:
                try:
                    await responder.write(_encode(_drain_queued(follower), slug))  # `until`: flush, then end
                    await responder.end()
                except ClientDisconnected:
                    pass
    except TooManyFollowers as exc:
        await _send_error(responder, 429, "TOO_MANY_FOLLOWERS", str(exc))


def _drain_queued(follower: Follower) -> list[LogLine | Dropped]:
    items: list[LogLine | Dropped] = []
    while True:
        try:
            items.append(follower.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return items


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _pump(follower: Follower, responder: Responder, slug: str, heartbeat_s: float, state: list[bool]) -> None:
    """Write the follower's lines (batched) until cancelled; raises ClientDisconnected when the client is gone.

    `state[0]` is True while a write is on the wire: cancelled there, the chunk framing is broken and the
    caller must not `end()` the response."""
    while True:
        with trio.move_on_after(heartbeat_s) as idle:
            first = await follower.receive()
        if idle.cancelled_caught:
            chunk = b"\n"  # heartbeat: a write to a gone client raises ClientDisconnected
        else:
            batch: list[LogLine | Dropped] = [first]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(follower.receive_nowait())
                except trio.WouldBlock:
                    break
            chunk = _encode(batch, slug)
        state[0] = True
        await responder.write(chunk)
        state[0] = False


# -- CLI side -----------------------------------------------------------------------------------------------


def _format(obj: dict[str, Any]) -> str:
    if "dropped" in obj:
        return f"{obj.get('time', '')} {obj.get('msg', '')}"
    eid = str(obj.get("execution_id", ""))[:8]
    return f"{obj.get('time', '')} {obj.get('stream', ''):<6} v{obj.get('version', '?')} {eid} {obj.get('msg', '')}"


def print_logs(
    client_url: str,
    token: str,
    slug: str,
    follow: bool,
    since: str | None,
    *,
    limit: int | None = None,
    json_output: bool = False,
    out: TextIO | None = None,
) -> int:
    """`mbworker functions logs SLUG [--follow] [--since 10m]`: print recent (and with `follow`, new) lines.

    Returns the exit code: 0, or 1 when the admin API refuses or cannot be reached (the reason goes to stderr).
    Ctrl-C while following ends it with 0.
    """
    import httpx

    out = out or sys.stdout
    params: dict[str, str] = {}
    if since:
        try:
            parse_duration(since)
        except ValueError as exc:
            print(f"mbworker: {exc}", file=sys.stderr)
            return 2
        params["since"] = since
    if limit is not None:
        params["limit"] = str(limit)
    if follow:
        params["follow"] = "1"
    # Following: the server sends a heartbeat every 15 s, so 4× that without a byte means it is gone.
    timeout = httpx.Timeout(10.0, read=HEARTBEAT_S * 4 if follow else 60.0)
    url = f"{client_url.rstrip('/')}/admin/v1/functions/{slug}/logs"
    try:
        with (
            httpx.Client(headers={"authorization": f"Bearer {token}"}, timeout=timeout, trust_env=False) as client,
            client.stream("GET", url, params=params) as response,
        ):
            if response.status_code != 200:
                response.read()
                try:
                    body = response.json()
                    reason = f"{body.get('code', 'ERROR')}: {body.get('message', '')}"
                except ValueError:
                    reason = response.text[:500]
                print(f"mbworker: {response.status_code} {reason}", file=sys.stderr)
                return 1
            for raw in response.iter_lines():
                if not raw.strip():
                    continue  # heartbeat
                if json_output:
                    print(raw, file=out, flush=follow)
                    continue
                try:
                    obj = json.loads(raw)
                except ValueError:
                    print(raw, file=out, flush=follow)
                    continue
                print(_format(obj), file=out, flush=follow)
    except KeyboardInterrupt:
        return 0
    except httpx.HTTPError as exc:
        print(f"mbworker: admin API at {client_url} unreachable or stream broken: {exc}", file=sys.stderr)
        return 1
    return 0


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
