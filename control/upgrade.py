"""A rolling upgrade of mbworker on the workers, one at a time, with the cluster serving throughout.

For each worker not already on the version (sorted by name):
1. **leave**: a hold in the registry takes it out of the upstreams (the node is not told), then wait until every
   proxy has pulled its upstreams since and applied them (two pulls), so none sends it new requests. (Not the
   registry's drain ask: the node acts on that at its next beat, whether or not the proxies have pulled.)
2. **request**: `POST /admin/v1/upgrade {"version"}` on the worker: the daemon leaves the request for its node's
   root-owned upgrade helper and drains (in-flight requests finish, WebSockets are closed with 1012), then exits;
3. **drain**: its own record says it is draining (or it went silent: an idle node may exit before its next beat);
4. **install + restart**: the helper (provision/upgrade_helper.py) downloads the version's wheels from this
   control plane, installs them with `pip --no-index --require-hashes`, and starts the daemon again;
5. **ready**: a record from the new process (started after the request), ready: the hold is released, which puts
   it back in the upstreams; it must run the version asked for; then wait until every proxy has applied that.

The cluster's release as served (`Rollout.current`, control/release.py) says `rolling_to` the version while the
rollout runs in this process (it is not stored: a control-plane restart forgets a rollout), so a worker that starts
meanwhile (restarted, or added by a scale-out) is not turned back; workers that come up on another version
during the rollout are upgraded after the planned ones. Once every up worker runs the version it is the release,
which workers added or reinstalled later converge to. A rollout that fails leaves the release where it was.

The first failure stops the rollout; the workers not yet reached are untouched and keep serving. A worker that
failed does not serve a half-upgraded state: its helper restores the previous install when the new one does not
install or import (it comes back on its previous version, serving: the cluster keeps its capacity), and a worker
that does not come back ready is simply not in the upstreams (only ready workers are). A version whose wheels the
control plane does not hold is refused before any worker is touched, as is a cluster that would be left with no
serving worker.

Every step is an audit entry (`upgrade <node> <step>`). Through the API a rollout runs in the background
(`POST /upgrade` answers once it is planned; `GET /upgrade` follows it): it outlasts any proxy's request timeout.
Owner: `Rollout.serve` owns the nursery rollouts run in; one rollout at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import trio

from mbworker import __version__
from mbworker.control.audit import AuditLog
from mbworker.control.errors import ControlError, NotFound, StateUnavailable, WorkerCallFailed
from mbworker.control.registry import NodeView
from mbworker.control.release import MemoryReleaseStore, Release, ReleaseStore
from mbworker.control.wheel_store import HeldWheel, check_version

T = TypeVar("T")

log = logging.getLogger("mbworker.control.upgrade")

POLL_S = 0.1
STATE_GRACE_S = 30.0
"""How long one registry read or write is retried while the cluster's Redis is away (a Sentinel failover takes
seconds): a blip does not end a rollout, nor leave a worker held."""
SILENT_S = 3.0
"""Three missed beats (one a second): the process has exited."""


class Registry(Protocol):
    async def nodes(self) -> list[NodeView]: ...

    async def hold(self, name: str) -> None: ...

    async def release(self, name: str) -> None: ...


class Admin(Protocol):
    async def call(self, node: NodeView, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> Any: ...


class Wheels(Protocol):
    async def manifest(self, version: str) -> list[HeldWheel]: ...


@dataclass(frozen=True)
class Timeouts:
    proxies_s: float = 10.0
    """Proxies pull every second; one that has not pulled within this is not waited for (it is down)."""
    drain_s: float = 60.0
    """Until the worker's record says it is draining (a beat a second)."""
    restart_s: float = 300.0
    """From the drain to the new process ready: drain grace (30 s) + download + install + boot."""


class UpgradeFailed(ControlError):
    status = 502
    code = "UPGRADE_FAILED"


@dataclass
class Report:
    """One rollout, as `GET /upgrade` shows it while it runs and after."""

    version: str
    upgraded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Already on the version."""
    pending: list[str] = field(default_factory=list)
    failed: dict[str, str] | None = None
    """{"node", "step", "reason"} of the first failure."""
    steps: list[str] = field(default_factory=list)
    """"<node> <step>: <result>", as the audit ring has them."""
    state: str = "running"
    """running, done or failed."""
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "state": self.state,
            "upgraded": self.upgraded,
            "skipped": self.skipped,
            "pending": self.pending,
            "steps": self.steps,
            "seconds": round((self.ended or time.monotonic()) - self.started, 1),
        }
        if self.failed:
            out |= {"code": UpgradeFailed.code, "failed": self.failed}
            out["message"] = f"{self.failed['node']}: {self.failed['step']}: {self.failed['reason']}"
        return out


class _StepFailed(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(reason)
        self.step = step
        self.reason = reason


class Rollout:
    def __init__(
        self,
        registry: Registry,
        admin: Admin,
        wheels: Wheels,
        audit: AuditLog,
        *,
        token_name: str,
        timeouts: Timeouts = Timeouts(),
        clock: Callable[[], float] = time.time,
        release: ReleaseStore | None = None,
    ) -> None:
        self._registry = registry
        self.release: ReleaseStore = release or MemoryReleaseStore(__version__)
        self._admin = admin
        self._wheels = wheels
        self._audit = audit
        self._token = token_name
        self._t = timeouts
        self._clock = clock
        self._busy = False
        self._rolling_to: str | None = None
        """The version of the rollout running now (past its plan: it has workers to upgrade)."""
        self._last: Report | None = None
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery rollouts started through the API run in (they outlive the request that started them)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def current(self) -> Release:
        """The cluster's release, with `rolling_to` the version of the rollout running now in this process (none
        after a restart: a rollout does not outlive the process it ran in). `StateUnavailable` without Redis."""
        return replace(await self.release.get(), rolling_to=self._rolling_to)

    def _record(self, report: Report, node: str, step: str, ok: bool, result: str) -> None:
        report.steps.append(f"{node} {step}: {result}")
        self._audit.record(self._token, f"upgrade {node} {step}", 200 if ok else 502, result)

    def last(self) -> dict[str, Any]:
        if self._last is None:
            raise NotFound("no upgrade has run since the control plane started")
        return self._last.to_json()

    async def start(self, version: str) -> dict[str, Any]:
        """Check and plan `version` (refusals raise `ControlError` before any worker is touched), then roll it out
        in the background: `last()` follows it."""
        assert self._nursery is not None, "Rollout.serve is not running"
        plan, report = await self._prepare(version)
        self._nursery.start_soon(self._roll, plan, report)
        return report.to_json()

    async def upgrade(self, version: str) -> tuple[int, dict[str, Any]]:
        """Check, plan and roll `version` out to the end; (200 or 502, report)."""
        plan, report = await self._prepare(version)
        await self._roll(plan, report)
        return (502 if report.failed else 200), report.to_json()

    async def _prepare(self, version: str) -> tuple[list[NodeView], Report]:
        check_version(version)
        if self._busy:
            raise ControlError("an upgrade is already running", status=409, code="UPGRADE_RUNNING")
        self._busy = True
        try:
            await self._wheels.manifest(version)  # NotFound (404) when not held: nothing touched yet
            # a worker silent for longer than `down_after_s` (stopped, or scaled in) is not part of the rollout, nor
            # is a cordoned one: it is idle, and converges to the release when `cluster undrain` restarts it
            workers = [
                v for v in await self._registry.nodes() if v.record.role == "worker" and v.up and not v.record.cordoned
            ]
            plan = plan_rollout(workers, version)
        except BaseException:
            self._busy = False
            raise
        report = Report(
            version,
            skipped=[v.record.name for v in workers if v.record.version == version],
            pending=[v.record.name for v in plan],
        )
        self._last = report
        log.info("upgrade to %s: %s", version, ", ".join(report.pending) or "nothing to do")
        return plan, report

    async def _roll(self, plan: list[NodeView], report: Report) -> None:
        version = report.version
        try:
            self._rolling_to = version if plan else None
            while plan:
                for node in plan:
                    name = node.record.name
                    try:
                        await self._one(node, report)
                    except _StepFailed as exc:
                        report.failed = {"node": name, "step": exc.step, "reason": exc.reason}
                        self._record(report, name, exc.step, False, exc.reason)
                        log.warning("upgrade to %s stopped at %s (%s): %s", version, name, exc.step, exc.reason)
                        return
                    report.pending.remove(name)
                    report.upgraded.append(name)
                # workers that came up on another version meanwhile (back from down, or added): upgraded too, so
                # the version becomes the release only once every worker runs it
                plan = sorted(
                    (
                        v for v in await self._nodes()
                        if v.record.role == "worker" and v.serving and v.record.version != version
                        and v.record.name not in report.upgraded
                    ),
                    key=lambda v: v.record.name,
                )  # fmt: skip
                report.pending.extend(v.record.name for v in plan)
            await self._retrying(lambda: self.release.settle(version))
            self._audit.record(self._token, "release", 200, f"the cluster's release is {version}")
        except StateUnavailable as exc:
            report.failed = {"node": "-", "step": "redis", "reason": exc.message}
        finally:
            self._rolling_to = None  # a failed rollout leaves the release the version the others run
            report.state = "failed" if report.failed or report.pending else "done"
            report.ended = time.monotonic()
            self._busy = False

    async def _one(self, node: NodeView, report: Report) -> None:
        name, version = node.record.name, report.version
        # 1. leave the upstreams
        await self._retrying(lambda: self._registry.hold(name))
        try:
            await self._proxies_caught_up()
        except StateUnavailable as exc:  # nobody can say the proxies dropped it: it must not drain
            await self._release(name)
            raise _StepFailed("leave", f"{exc.message}; no proxy was seen to drop it (left serving)") from None
        self._record(report, name, "leave", True, "out of the upstreams; every proxy pulled")
        # 2. hand the request to the worker; it drains and its helper installs
        asked_at = self._clock()
        try:
            await self._admin.call(node, "POST", "/admin/v1/upgrade", json={"version": version}, timeout=30.0)
        except WorkerCallFailed as exc:
            await self._release(name)  # it never drained: back in the upstreams as it was
            raise _StepFailed("request", f"{exc.message} (left serving {node.record.version})") from None
        self._record(report, name, "request", True, f"{node.record.version} -> {version}; draining")
        try:
            # 3. draining
            await self._wait(name, "drain", self._t.drain_s, lambda v: self._left(v, asked_at))
            self._record(report, name, "drain", True, "draining")
            # 4-5. the helper installs and restarts; the new process reports ready
            back = await self._wait(
                name,
                "restart",
                self._t.restart_s,
                lambda v: (
                    v is not None
                    and v.record.started_at > asked_at
                    and v.up
                    and v.record.ready
                    and not v.record.draining
                ),
            )
        finally:
            # back in the upstreams: the new process, or whatever comes back late (only a ready one is served)
            await self._release(name)
        assert back is not None
        if back.record.version != version:
            raise _StepFailed(
                "install",
                f"came back on {back.record.version}, not {version}: the install failed and was rolled back "
                "(journalctl -u mbworker-upgrade on the node)",
            )
        try:
            await self._proxies_caught_up()
        except StateUnavailable as exc:  # it serves; the proxies take it back at their next pull
            log.warning("%s is back, but the proxies' pulls could not be seen: %s", name, exc.message)
        self._record(report, name, "ready", True, f"serving {version}; back in the upstreams")

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        """`op()`, retried while the cluster's Redis is away, for up to STATE_GRACE_S (then its error)."""
        with trio.move_on_after(STATE_GRACE_S):
            while True:
                try:
                    return await op()
                except StateUnavailable:
                    await trio.sleep(POLL_S)
        return await op()

    async def _nodes(self) -> list[NodeView]:
        return await self._retrying(self._registry.nodes)

    async def _release(self, name: str) -> None:
        """Back in the upstreams, even when the rollout is being cancelled (shielded, bounded); if Redis stays
        away, the hold expires by itself (HOLD_TTL_S)."""
        with trio.CancelScope(shield=True):
            try:
                await self._retrying(lambda: self._registry.release(name))
            except StateUnavailable as exc:
                log.warning("%s stays out of the upstreams until its hold expires: %s", name, exc.message)

    def _left(self, view: NodeView | None, asked_at: float) -> bool:
        """The old process is draining, or gone: silent for a few beats (an idle one may exit before its next
        beat says it drains), or already replaced."""
        if view is None or view.record.draining or view.record.started_at > asked_at:
            return True
        return view.record.sent_at < self._clock() - SILENT_S

    async def _wait(
        self, name: str, step: str, timeout: float, done: Callable[[NodeView | None], bool]
    ) -> NodeView | None:
        with trio.move_on_after(timeout):
            while True:
                view = next((v for v in await self._nodes() if v.record.name == name), None)
                if done(view):
                    return view
                await trio.sleep(POLL_S)
        raise _StepFailed(step, f"not done within {timeout:.0f}s (a worker that is not ready is not in the upstreams)")

    async def _proxies_caught_up(self) -> None:
        """Every proxy has pulled the upstreams as they are now, and applied them: a proxy pulls again only once
        it has applied the previous pull (a reload), so two pulls since now mean the first one is in force."""
        await self._proxies_pulled(self._clock())
        await self._proxies_pulled(self._clock())

    async def _proxies_pulled(self, since: float) -> None:
        """Until every proxy that is up has pulled its upstreams after `since` (bounded: a proxy that stopped
        pulling is down, and its upstreams no longer matter). `StateUnavailable` if Redis is still away at the
        end: then nothing is known of the proxies."""
        away: StateUnavailable | None = None
        with trio.move_on_after(self._t.proxies_s):
            while True:
                try:
                    nodes = await self._registry.nodes()
                except StateUnavailable as exc:
                    away = exc
                else:
                    away = None
                    if all(v.record.sent_at > since for v in nodes if v.record.role == "proxy" and v.up):
                        return
                await trio.sleep(POLL_S)
        if away is not None:
            raise away  # Redis is away: what the proxies have pulled cannot be known
        log.warning("a proxy did not pull its upstreams within %.0fs", self._t.proxies_s)


def plan_rollout(workers: Sequence[NodeView], version: str) -> list[NodeView]:
    """The workers to upgrade, in order; `ControlError` (409) when taking one out at a time would leave none
    serving, or when a worker is not serving now (an upgrade starts from a healthy cluster)."""
    todo = sorted((v for v in workers if v.record.version != version), key=lambda v: v.record.name)
    if not todo:
        return []
    unwell = [v.record.name for v in workers if not v.serving]
    if unwell:
        raise ControlError(
            f"not every worker is serving ({', '.join(unwell)}): an upgrade starts from a healthy cluster",
            status=409,
            code="CLUSTER_NOT_READY",
        )
    if len(workers) < 2:
        raise ControlError(
            "a rolling upgrade needs a second serving worker while one is upgraded", status=409, code="TOO_FEW_WORKERS"
        )
    return todo
