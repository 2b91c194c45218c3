"""Probes of the nodes that send no heartbeat (state, NAT), off the request path.

`NodeProber` owns the cluster's layout as last read (control/layout.py) and what its probes learned. `serve` is a
task of `serve_control`'s nursery: every `interval_s` it re-reads the layout file (a change by `mbworker
provision` is seen within one interval; an unreadable file keeps the last good layout) and probes every node
whose role does not report by itself:

- node-exporter (the layout's `kind: node` target, :9100): answering means the machine is up;
- on state nodes, Patroni's REST `GET /health` (:8008, opened to the system node only): 200 while PostgreSQL
  runs under Patroni; its body says the server's version.

Every request has a timeout and a round's probes run side by side, so a round lasts at most one timeout
whatever the cluster's size. The registry (control/registry.py) reads `layout()` and `record()` when it
answers: no request ever waits for a probe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from mbworker.control.layout import PATRONI_PORT, LayoutError, LayoutNode, read_layout
from mbworker.control.registry import HEARTBEAT_ROLES, NodeRecord

log = logging.getLogger("mbworker.control.probes")

PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 2.0


@dataclass
class _Seen:
    """What the probes of one node learned: `answered_at` is when node-exporter last answered (0: never)."""

    answered_at: float = 0.0
    ready: bool = False
    why: str = "not probed yet"
    version: str = "-"


class NodeProber:
    """Owns the layout it read and the probe results; the HTTP client belongs to `serve` (closed with it)."""

    def __init__(
        self,
        layout_file: Path | None,
        *,
        interval_s: float = PROBE_INTERVAL_S,
        timeout_s: float = PROBE_TIMEOUT_S,
        patroni_port: int = PATRONI_PORT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._file = layout_file
        self._interval = interval_s
        self._timeout = timeout_s
        self._patroni_port = patroni_port
        self._clock = clock
        self._layout: tuple[LayoutNode, ...] = ()
        self._seen: dict[str, _Seen] = {}
        self._layout_problem: str | None = None

    def layout(self) -> tuple[LayoutNode, ...]:
        return self._layout

    def record(self, node: LayoutNode) -> NodeRecord | None:
        """`node` as its probes show it, in the heartbeat's shape; None for a node that reports by itself."""
        if node.role in HEARTBEAT_ROLES:
            return None
        seen = self._seen.get(node.name, _Seen())
        return NodeRecord(
            role=node.role, name=node.name, private_ip=node.private_ip, port=0, admin_port=0, version=seen.version,
            ready=seen.ready, why_not=None if seen.ready else seen.why, sent_at=seen.answered_at,
        )  # fmt: skip

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the layout, report started, then probe every `interval_s` until cancelled."""
        await self._read()
        async with httpx.AsyncClient(timeout=self._timeout, trust_env=False) as http:
            task_status.started()
            while True:
                await self._round(http)
                await trio.sleep(self._interval)
                await self._read()

    async def _read(self) -> None:
        if self._file is None:
            return
        try:
            self._layout = await trio.to_thread.run_sync(read_layout, self._file)
        except LayoutError as exc:
            if exc.message != self._layout_problem:  # once per problem, not once per round
                log.warning("%s; keeping the last layout (%d nodes)", exc.message, len(self._layout))
            self._layout_problem = exc.message
            return
        self._layout_problem = None

    async def _round(self, http: httpx.AsyncClient) -> None:
        probed = [n for n in self._layout if n.role not in HEARTBEAT_ROLES]
        for gone in set(self._seen) - {n.name for n in probed}:
            del self._seen[gone]
        async with trio.open_nursery() as nursery:
            for node in probed:
                nursery.start_soon(self._probe, http, node)

    async def _probe(self, http: httpx.AsyncClient, node: LayoutNode) -> None:
        seen = self._seen.setdefault(node.name, _Seen())
        with trio.move_on_after(self._timeout * 2 + 1):  # the client's timeouts are per phase: bound the whole
            exporter = await _get(http, f"http://{node.private_ip}:{node.exporter_port}/")
            if isinstance(exporter, str):
                seen.ready, seen.why = False, f"node-exporter :{node.exporter_port}: {exporter}"
                return
            seen.answered_at = self._clock()
            if exporter.status_code != 200:
                seen.ready, seen.why = False, f"node-exporter :{node.exporter_port}: HTTP {exporter.status_code}"
                return
            if node.role == "state":
                seen.ready, seen.why, version = await self._patroni(http, node)
                seen.version = version or seen.version
            else:
                seen.ready, seen.why = True, ""
            return
        seen.ready, seen.why = False, f"probe timed out after {self._timeout * 2 + 1:.0f}s"

    async def _patroni(self, http: httpx.AsyncClient, node: LayoutNode) -> tuple[bool, str, str | None]:
        """(PostgreSQL runs under Patroni, why not, its version when Patroni said it)."""
        answer = await _get(http, f"http://{node.private_ip}:{self._patroni_port}/health")
        if isinstance(answer, str):
            return False, f"patroni :{self._patroni_port}: {answer}", None
        body = _json(answer)
        version = _pg_version(body.get("server_version"))
        if answer.status_code == 200:
            return True, "", version
        state = body.get("state", "unknown")
        return False, f"patroni: PostgreSQL is not running (HTTP {answer.status_code}, state {state})", version


async def _get(http: httpx.AsyncClient, url: str) -> httpx.Response | str:
    """The answer, or what went wrong (a refused connection, a timeout) in a few words."""
    try:
        return await http.get(url)
    except httpx.TimeoutException:
        return "timed out"
    except httpx.HTTPError as exc:
        cause = exc.__cause__ or exc.__context__
        detail = getattr(cause, "strerror", None) or str(exc) or type(exc).__name__
        return f"unreachable ({detail})"


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _pg_version(raw: object) -> str | None:
    """PostgreSQL's `server_version_num` as Patroni reports it (150005) → `postgresql-15.5`."""
    if not isinstance(raw, int) or isinstance(raw, bool) or raw <= 0:
        return None
    return f"postgresql-{raw // 10000}.{raw % 10000}"
