"""The node registry: what every node last said about itself, read from the cluster's Redis, and every node of
the cluster's layout, whether it reports or not.

Nodes write their heartbeat (worker/cluster/heartbeat.py documents the keys; this module reads them); a node
whose last beat is older than `down_after_s` is down. With a `LayoutSource` (control/probes.py: the layout the
provisioner wrote, and probes of the nodes that send no heartbeat) every node of the layout is listed: a state or
NAT node as its probes last saw it, a worker, proxy or system node that never reported (or whose record expired)
as down with the reason. The registry adds the control plane's own knowledge: a drain
it asked for takes the node out of the upstreams at once, before the node starts draining; a hold (a rolling
upgrade's, `<p>node:<name>:hold`, read only here) keeps a node out of them without asking it to drain.

Owner: `NodeRegistry` owns nothing but reads; the Redis client belongs to `serve_control`. Redis failures become
`StateUnavailable` (503).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mbworker.control.errors import ControlError, NotFound, StateUnavailable
from mbworker.control.layout import NODE_EXPORTER_PORT, LayoutNode
from mbworker.lib.redis import Redis, RedisError

log = logging.getLogger("mbworker.control.registry")

HOLD_TTL_S = 900
"""A hold outlives any one upgrade step; a control plane that died mid-upgrade does not keep a node out forever."""
RECORD_TTL_S = 3600
"""As the workers' heartbeat (worker/cluster/heartbeat.py): a node silent for an hour disappears."""
MAX_REPORTED = 1024
"""Nodes that may report at once without a layout (a local cluster): bounds what a junk name costs."""
HEARTBEAT_ROLES = frozenset({"system", "proxy", "worker"})
"""Roles that report by themselves (a heartbeat, a proxy's pull, the control plane's own beat); the others are
probed."""


class NodeLoad(BaseModel):
    model_config = ConfigDict(extra="ignore")

    requests_per_s: float = 0.0
    websockets: int = 0
    deno_processes: int = 0


class NodeRecord(BaseModel):
    """One heartbeat, as the node sent it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    role: str
    name: str
    private_ip: str
    port: int
    admin_port: int
    version: str
    ready: bool
    why_not: str | None = None
    draining: bool = False
    cordoned: bool = False
    """Drained by the control plane, started again, waiting for `cluster undrain` (worker/cluster/heartbeat.py)."""
    load: NodeLoad = Field(default_factory=NodeLoad)
    functions: dict[str, int] = Field(default_factory=dict)
    started_at: float = 0.0
    sent_at: float


class NodeView(BaseModel):
    """A node as the control plane shows it: the record plus whether it is up and whether it may take traffic."""

    model_config = ConfigDict(frozen=True)

    record: NodeRecord
    up: bool
    last_seen_s: float
    drain_asked: bool
    held: bool = False
    """Out of the upstreams for a rolling upgrade (control/upgrade.py), whatever the node reports."""
    reports: Literal["heartbeat", "probe"] = "heartbeat"
    """How the control plane knows the node: its own reports, or probes of it (state, NAT)."""

    @property
    def serving(self) -> bool:
        """Up, ready, and not leaving: what proxies may send to and a deploy must reach."""
        return self.up and self.record.ready and not self.record.draining and not self.drain_asked and not self.held

    @property
    def state(self) -> str:
        if not self.up:
            return "down"
        if self.record.cordoned:  # its drain is done: idle until undrained (scale-in may delete it)
            return "cordoned"
        if self.record.draining or self.drain_asked:
            return "draining"
        if self.held:
            return "held"
        return "ready" if self.record.ready else "not ready"

    @property
    def address(self) -> str:
        return f"{self.record.private_ip}:{self.record.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.record.private_ip}:{self.record.admin_port}"

    @property
    def why_not(self) -> str | None:
        """Why the node is not ready, in words (None when it is)."""
        if self.serving:
            return None
        r = self.record
        if self.up:
            return r.why_not or ("drain asked" if self.drain_asked else self.state)
        if self.reports == "probe":
            silent = f"no answer for {self.last_seen_s:.0f}s" if r.sent_at else "never answered"
            return f"{silent}: {r.why_not}" if r.why_not else silent
        if not r.sent_at:
            return "no heartbeat on record (never reported, or silent for over an hour)"
        return f"no heartbeat for {self.last_seen_s:.0f}s"

    def to_json(self) -> dict[str, Any]:
        r = self.record
        seen = r.sent_at > 0
        return {
            "role": r.role,
            "name": r.name,
            "private_ip": r.private_ip,
            "port": r.port,
            "version": r.version,
            "state": self.state,
            "ready": self.serving,
            "why_not": self.why_not,
            "reports": self.reports,
            "load": r.load.model_dump(),
            "functions": r.functions,
            "last_seen": r.sent_at if seen else None,
            "last_seen_s": round(self.last_seen_s, 1) if seen else None,
        }


class LayoutSource(Protocol):
    """The cluster's layout and what probes learned of the nodes that send no heartbeat (control/probes.py)."""

    def layout(self) -> tuple[LayoutNode, ...]: ...

    def record(self, node: LayoutNode) -> NodeRecord | None:
        """`node` as its probes last saw it; None for a node that reports by itself."""
        ...


class NodeRegistry:
    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "mbw:",
        down_after_s: float = 15.0,
        clock: Callable[[], float] = time.time,
        layout: LayoutSource | None = None,
    ) -> None:
        self._redis = redis
        self._p = prefix
        self.down_after_s = down_after_s
        self._clock = clock
        self._layout = layout

    def layout(self) -> tuple[LayoutNode, ...]:
        return self._layout.layout() if self._layout is not None else ()

    async def nodes(self) -> list[NodeView]:
        """Every node of the layout and every node that reported within the record's lifetime, sorted by role
        and name."""
        views = {v.record.name: v for v in await self._reported()}
        now = self._clock()
        for node in self.layout():
            if node.name in views:
                continue
            probed = self._layout.record(node) if self._layout is not None else None
            if probed is None:  # a node that reports by itself and has no record: never did, or long ago
                record = NodeRecord(
                    role=node.role, name=node.name, private_ip=node.private_ip, port=0, admin_port=node.admin_port,
                    version="-", ready=False, sent_at=0.0,
                )  # fmt: skip
                views[node.name] = NodeView(record=record, up=False, last_seen_s=0.0, drain_asked=False)
                continue
            age = max(0.0, now - probed.sent_at)
            up = probed.sent_at > 0 and age <= self.down_after_s
            views[node.name] = NodeView(record=probed, up=up, last_seen_s=age, drain_asked=False, reports="probe")
        return sorted(views.values(), key=lambda v: (v.record.role, v.record.name))

    async def _reported(self) -> list[NodeView]:
        """Every node that reported within the record's lifetime."""
        try:
            names = [n.decode() for n in await self._redis.zrangebyscore(f"{self._p}nodes", "-inf", "+inf")]
            if not names:
                return []
            replies = await self._redis.execute_many(
                [
                    ("MGET", *(f"{self._p}node:{n}" for n in names)),
                    ("MGET", *(f"{self._p}node:{n}:drain" for n in names)),
                    ("MGET", *(f"{self._p}node:{n}:hold" for n in names)),
                ]
            )
        except RedisError as exc:
            raise StateUnavailable(f"the cluster's Redis is unreachable: {exc}") from exc
        now = self._clock()
        views: list[NodeView] = []
        gone: list[str] = []
        for name, raw, drain, hold in zip(names, replies[0], replies[1], replies[2], strict=True):
            if raw is None:
                gone.append(name)  # the record expired: silent for longer than the heartbeat's lifetime
                continue
            try:
                record = NodeRecord.model_validate(json.loads(raw))
            except (ValueError, ValidationError):
                log.warning("ignored a malformed heartbeat from %s", name)
                continue
            age = max(0.0, now - record.sent_at)
            up = age <= self.down_after_s
            views.append(NodeView(record=record, up=up, last_seen_s=age, drain_asked=bool(drain), held=bool(hold)))
        if gone:
            # a node silent for an hour that the layout does not list (scaled in, or a local cluster's) takes its
            # drain and hold with it; a layout node keeps its cordon however long it is off
            listed = {n.name for n in self.layout()}
            stale = [f"{self._p}node:{n}:{k}" for n in gone if n not in listed for k in ("drain", "hold")]
            try:
                await self._redis.zrem(f"{self._p}nodes", *gone)
                if stale:
                    await self._redis.delete(*stale)
            except RedisError:
                pass  # tidied at the next read
        return views

    async def get(self, name: str) -> NodeView:
        for view in await self.nodes():
            if view.record.name == name:
                return view
        raise NotFound(f"no node {name!r}")

    async def drainable(self, name: str) -> NodeView:
        """The node `name`, if it is one that can drain: a state or NAT node has no mbworker to ask (409)."""
        view = await self.get(name)
        if view.record.role not in HEARTBEAT_ROLES:
            raise ControlError(f"{name} is a {view.record.role} node, with no mbworker to drain", status=409)
        return view

    async def serving_workers(self) -> list[NodeView]:
        """Workers that report, are ready and are not held or draining (by name). Only reports count here, not the
        layout: every proxy asks this each second."""
        workers = [v for v in await self._reported() if v.record.role == "worker" and v.serving]
        return sorted(workers, key=lambda v: v.record.name)

    async def ask_drain(self, name: str) -> NodeView:
        """Take `name` out of the upstreams now; it drains at its next heartbeat (within a second)."""
        view = await self.drainable(name)
        try:
            # no expiry: the node stays cordoned until `cancel_drain` (tidied with the node's record, `_reported`)
            await self._redis.set(f"{self._p}node:{name}:drain", str(self._clock()))
        except RedisError as exc:
            raise StateUnavailable(f"the cluster's Redis is unreachable: {exc}") from exc
        return view.model_copy(update={"drain_asked": True})

    async def hold(self, name: str, ttl_s: int = HOLD_TTL_S) -> None:
        """Keep `name` out of the upstreams (the node is not told: it keeps serving what reaches it)."""
        try:
            await self._redis.set(f"{self._p}node:{name}:hold", str(self._clock()), ex=ttl_s)
        except RedisError as exc:
            raise StateUnavailable(f"the cluster's Redis is unreachable: {exc}") from exc

    async def wait_proxies_caught_up(self, timeout_s: float, poll_s: float = 0.1) -> bool:
        """Until every proxy that is up has pulled the upstreams as they are now and applied them: a proxy pulls
        again only once it has applied the previous pull (a reload), so two pulls since now mean the first is in
        force. False when one did not pull within `timeout_s` (it stopped pulling: down, so its list no longer
        matters)."""
        for _ in range(2):
            since = self._clock()
            with trio.move_on_after(timeout_s):
                while True:
                    proxies = [v for v in await self.nodes() if v.record.role == "proxy" and v.up]
                    if all(v.record.sent_at > since for v in proxies):
                        break
                    await trio.sleep(poll_s)
                continue
            log.warning("a proxy did not pull its upstreams within %.0fs", timeout_s)
            return False
        return True

    async def release(self, name: str) -> None:
        """Undo `hold`: the node is in the upstreams again whenever it reports ready."""
        try:
            await self._redis.delete(f"{self._p}node:{name}:hold")
        except RedisError as exc:
            raise StateUnavailable(f"the cluster's Redis is unreachable: {exc}") from exc

    async def cancel_drain(self, name: str) -> NodeView:
        """Undo `ask_drain` (and its hold). Until this a drained node stays out of the upstreams: it exited 75,
        was started again by systemd, and reports itself cordoned (not ready); then it serves again at its next
        beat (worker/cluster/heartbeat.py)."""
        view = await self.get(name)
        try:
            await self._redis.delete(f"{self._p}node:{name}:drain", f"{self._p}node:{name}:hold")
        except RedisError as exc:
            raise StateUnavailable(f"the cluster's Redis is unreachable: {exc}") from exc
        return view.model_copy(update={"drain_asked": False, "held": False})

    async def record_pull(self, role: str, name: str, private_ip: str, version: str) -> None:
        """A proxy pulling its upstreams is its heartbeat: record it as a node (the same record workers write).

        Every node holds the node token, so a pull's name is a claim, checked before it is written: with a layout,
        `name` must be a node of that role in it (403); a name another role reports under is never taken over
        (409: a worker named by someone else's pull would leave the upstreams); without a layout (a local
        cluster), new names stop at `MAX_REPORTED` nodes (409), so junk names cannot swell every registry read."""
        layout = self.layout()
        if layout and not any(n.name == name and n.role == role for n in layout):
            raise ControlError(f"{name} is not a {role} node of this cluster", status=403, code="NOT_IN_LAYOUT")
        try:
            raw, count = await self._redis.execute_many(
                [("GET", f"{self._p}node:{name}"), ("ZCARD", f"{self._p}nodes")]
            )
        except RedisError as exc:
            raise StateUnavailable(f"the cluster's Redis is unreachable: {exc}") from exc
        if raw is not None:
            try:
                claimed = NodeRecord.model_validate(json.loads(raw)).role
            except (ValueError, ValidationError):
                claimed = role  # a malformed record: this pull's own replaces it
            if claimed != role:
                raise ControlError(f"{name} reports as a {claimed} node", status=409, code="NAME_TAKEN")
        elif not layout and count >= MAX_REPORTED:
            raise ControlError(f"{count} nodes report already (at most {MAX_REPORTED})", status=409, code="TOO_MANY")
        record = NodeRecord(
            role=role, name=name, private_ip=private_ip, port=0, admin_port=0, version=version, ready=True,
            sent_at=self._clock(),
        )  # fmt: skip
        try:
            await self._redis.execute_many(
                [
                    ("SET", f"{self._p}node:{name}", record.model_dump_json(), "EX", RECORD_TTL_S),
                    ("ZADD", f"{self._p}nodes", record.sent_at, name),
                ]
            )
        except RedisError as exc:
            raise StateUnavailable(f"the cluster's Redis is unreachable: {exc}") from exc

    async def upstreams(self) -> list[dict[str, Any]]:
        """Ready, non-draining workers with their current address: what proxies forward to."""
        return [{"name": v.record.name, "address": v.address} for v in await self.serving_workers()]

    async def scrape_targets(self) -> list[dict[str, Any]]:
        """Prometheus/VictoriaMetrics `http_sd` groups, in the layout file's form (control/layout.py): the
        node-exporter of every node of the layout, reporting or not (a down one is scraped as down), and every
        worker's mbworker `/metrics` (its admin listener: scrape it with the workers' admin token); a node that
        reports but is not in the layout (a local cluster) while it is up. Without Redis the layout alone."""
        layout = self.layout()
        try:
            views = await self.nodes()
        except StateUnavailable:
            if not layout:
                raise
            views = []
        reported = {v.record.name: v for v in views if v.reports == "heartbeat" and v.record.sent_at}
        groups: list[dict[str, Any]] = []
        for node in layout:
            seen = reported.get(node.name)
            admin_port = (seen.record.admin_port if seen else 0) or node.admin_port
            groups += _targets(node.name, node.role, node.private_ip, node.exporter_port, admin_port)
        in_layout = {n.name for n in layout}
        for v in views:
            if v.up and v.record.name not in in_layout:
                r = v.record
                groups += _targets(r.name, r.role, r.private_ip, NODE_EXPORTER_PORT, r.admin_port)
        return groups


def _targets(name: str, role: str, ip: str, exporter_port: int, admin_port: int) -> list[dict[str, Any]]:
    labels = {"node": name, "role": role}
    groups: list[dict[str, Any]] = [{"targets": [f"{ip}:{exporter_port}"], "labels": {**labels, "kind": "node"}}]
    if role == "worker" and admin_port:  # proxies and the system node have no mbworker listener of their own
        groups.append({"targets": [f"{ip}:{admin_port}"], "labels": {**labels, "kind": "mbworker"}})
    return groups
