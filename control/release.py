"""The cluster's release: the mbworker version its workers are meant to run, and the one a rollout moves them to.

    <p>release   {"version", "since"}   JSON, in the cluster's Redis (replicated, watched by the Sentinels): it
                                         outlives a control-plane restart

`version` is the version of the last rolling upgrade that reached every worker (control/upgrade.py), or, before
any, the shipped one: the version the control plane itself runs (the system node installs from the same wheelhouse
as the workers). `rolling_to` is not kept here: a rollout runs only inside the control-plane process, so it is that
process's `Rollout` that says it (`Rollout.current`), and it cannot outlive the rollout (a control plane that
restarts mid-rollout forgets it). A version becomes the release only once every worker runs it; a rollout that
stops at a failure leaves the release where it was (the version of every worker it did not reach, and of the
failed one, which its helper rolls back); the workers it did upgrade are shown off the release in `cluster status`
until the upgrade is run again.

Workers converge to it whenever their daemon starts (provision/upgrade_helper.py `converge`, mbworker.service's
ExecStartPre): one that runs neither `version` nor `rolling_to` installs `rolling_to` or else `version` first, so a
worker added by a scale-out, or reinstalled, comes up on the cluster's version, never another.

Owner: `RedisReleaseStore` owns only its key; the Redis client belongs to `serve_control`. `MemoryReleaseStore` is
the twin for tests and a control plane without state.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mbworker.control.errors import StateUnavailable
from mbworker.lib.redis import Redis, RedisError

log = logging.getLogger("mbworker.control.release")


@dataclass(frozen=True)
class Release:
    version: str
    since: float | None = None
    """When it became the release (None: the shipped version, never upgraded)."""
    rolling_to: str | None = None
    """The version a rollout running now moves workers to: set by `Rollout.current`, never stored."""

    @property
    def source(self) -> str:
        return "shipped" if self.since is None else "upgrade"

    def accepts(self, version: str) -> bool:
        """A worker on `version` needs no install: the release, or what a running rollout moves workers to."""
        return version in (self.version, self.rolling_to)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "source": self.source, "since": self.since, "rolling_to": self.rolling_to}


class ReleaseStore(Protocol):
    async def get(self) -> Release:
        """The stored release (`rolling_to` None)."""
        ...

    async def settle(self, version: str) -> None:
        """Every worker runs `version`: it is the release now."""
        ...


class MemoryReleaseStore:
    def __init__(self, shipped: str, *, clock: Callable[[], float] = time.time) -> None:
        self.release = Release(shipped)
        self._clock = clock

    async def get(self) -> Release:
        return self.release

    async def settle(self, version: str) -> None:
        self.release = Release(version, self._clock())


class RedisReleaseStore:
    def __init__(
        self, redis: Redis, shipped: str, *, prefix: str = "mbw:", clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = redis
        self._key = f"{prefix}release"
        self._shipped = shipped
        self._clock = clock

    async def get(self) -> Release:
        try:
            raw = await self._redis.get(self._key)
        except RedisError as exc:
            raise StateUnavailable(f"the cluster's Redis is unreachable: {exc}") from exc
        if raw is None:
            return Release(self._shipped)
        try:
            value = json.loads(raw)
            # a "rolling_to" an earlier control plane wrote is ignored: no rollout outlives the process it ran in
            return Release(str(value["version"]), value.get("since"))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed release record %r: the shipped version %s stands", raw, self._shipped)
            return Release(self._shipped)

    async def _put(self, release: Release) -> None:
        raw = json.dumps({"version": release.version, "since": release.since})
        try:
            await self._redis.set(self._key, raw)
        except RedisError as exc:
            raise StateUnavailable(f"the cluster's Redis is unreachable: {exc}") from exc

    async def settle(self, version: str) -> None:
        await self._put(Release(version, self._clock()))
