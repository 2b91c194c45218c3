"""The node's heartbeat: what the control plane's registry shows about this node, written to the cluster's Redis.

Why Redis and not HTTP to the control plane: every worker already holds a Redis client (the state pillar's, with
its password), so there is no second URL or token to hand out, nothing to retry when the control plane restarts,
and the control plane itself can be replaced or run twice and read the same records. The daemon stays unaware
of the control plane (it does not import it).

Wire format (read by `control/registry.py`, which owns the other half; keep the two in step):

    <p>node:<name>          JSON record (below), EX `RECORD_TTL_S`: a node gone for that long disappears
    <p>nodes                sorted set: name → time of the last beat (epoch seconds)
    <p>node:<name>:drain    set by the control plane: the node drains at its next beat; one already set at the
                            process's first beat is a cordon carried over a restart (the node stays up, not
                            ready, until the key is gone: `cluster undrain`)

    {"role", "name", "private_ip", "port", "admin_port", "version", "ready", "why_not", "draining", "cordoned",
     "load": {"requests_per_s", "websockets", "deno_processes"}, "functions": {slug: version},
     "started_at", "sent_at"}

Owner: the daemon starts `serve_heartbeat` in its nursery; it owns nothing but its loop. A failed beat (Redis
away) is logged once per outage and retried at the next interval: the node keeps serving.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from mbworker.lib.redis import Redis, RedisError

log = logging.getLogger("mbworker.heartbeat")

INTERVAL_S = 1.0
RECORD_TTL_S = 3600


@dataclass(frozen=True)
class NodeLoad:
    requests_served: int
    """Responses completed since start (the rate is computed between beats)."""
    websockets: int
    deno_processes: int


@dataclass(frozen=True)
class NodeState:
    """One beat's view of the node, built by the daemon."""

    ready: bool
    why_not: str | None
    draining: bool
    load: NodeLoad
    functions: dict[str, int]
    cordoned: bool = False
    """Drained by the control plane before this process started and not undrained since: up, idle, not ready."""


@dataclass(frozen=True)
class NodeIdentity:
    role: str
    name: str
    private_ip: str
    port: int
    admin_port: int
    version: str


def record(identity: NodeIdentity, state: NodeState, *, requests_per_s: float, started_at: float) -> dict[str, Any]:
    return {
        "role": identity.role,
        "name": identity.name,
        "private_ip": identity.private_ip,
        "port": identity.port,
        "admin_port": identity.admin_port,
        "version": identity.version,
        "ready": state.ready,
        "why_not": state.why_not,
        "draining": state.draining,
        "cordoned": state.cordoned,
        "load": {
            "requests_per_s": round(requests_per_s, 1),
            "websockets": state.load.websockets,
            "deno_processes": state.load.deno_processes,
        },
        "functions": state.functions,
        "started_at": started_at,
        "sent_at": time.time(),
    }


async def serve_heartbeat(
    redis: Redis,
    identity: NodeIdentity,
    state: Callable[[], NodeState],
    on_drain: Callable[[], object],
    *,
    on_cordon: Callable[[bool], object] | None = None,
    drain_started: Callable[[], Awaitable[object]] | None = None,
    prefix: str = "mbw:",
    interval: float = INTERVAL_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Beat every `interval` until cancelled; `started()` at once. A drain asked for by the control plane calls
    `on_drain` (the daemon's drain trigger, idempotent). With `on_cordon`, a drain already asked for when this
    process first beats is a cordon instead (the process was started again after that drain): `on_cordon(True)`,
    and `on_cordon(False)` once the control plane lifts it; a drain asked for after that drains. When
    `drain_started` returns (however the drain began: a SIGTERM at shutdown too) the next beat goes at once, so the
    node leaves the proxies' upstreams while it drains rather than when it falls silent."""
    key = f"{prefix}node:{identity.name}"
    drain_key = f"{key}:drain"
    started_at = time.time()
    last: tuple[float, int] | None = None
    failing = False
    cordoned: bool | None = None  # None until the drain key has been read once

    def first_read(asked: bool) -> bool:
        """A drain asked for before this process first read the key is a cordon carried over a restart."""
        if asked and on_cordon is not None:
            log.info("cordoned by the control plane (drained before this start): not ready until undrained")
            on_cordon(True)
            return True
        return False

    if on_cordon is not None:  # read before the first record goes out: a cordoned node's first beat says so
        with trio.move_on_after(max(interval, 1.0) * 2):
            try:
                cordoned = first_read(await redis.get(drain_key) is not None)
            except RedisError:
                pass  # the loop's first delivered beat decides
    task_status.started()
    while True:
        now = trio.current_time()
        snapshot = state()
        served = snapshot.load.requests_served
        rate = 0.0 if last is None or now <= last[0] else max(0, served - last[1]) / (now - last[0])
        last = (now, served)
        doc = record(identity, snapshot, requests_per_s=rate, started_at=started_at)
        try:
            with trio.fail_after(max(interval, 1.0) * 2):
                replies = await redis.execute_many(
                    [
                        ("SET", key, json.dumps(doc), "EX", RECORD_TTL_S),
                        ("ZADD", f"{prefix}nodes", doc["sent_at"], identity.name),
                        ("GET", drain_key),
                    ]
                )
        except (RedisError, trio.TooSlowError) as exc:
            if not failing:
                log.warning("heartbeat not delivered (retrying every %.0fs): %s", interval, exc)
            failing = True
        else:
            if failing:
                log.info("heartbeat delivered again")
            failing = False
            asked = replies[2] is not None
            if cordoned is None:
                cordoned = first_read(asked)
            elif cordoned and not asked:
                assert on_cordon is not None
                log.info("the control plane lifted the cordon")
                on_cordon(False)
                cordoned = False
            if asked and not cordoned and not snapshot.draining:
                log.info("drain asked for by the control plane")
                on_drain()
        with trio.move_on_after(interval):
            if drain_started is not None and not snapshot.draining:
                await drain_started()
            else:
                await trio.sleep_forever()
