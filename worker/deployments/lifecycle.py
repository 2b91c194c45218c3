"""The version lifecycle of one function, pure: activate, rollback, delete, mark failed, prune.

Owner: nobody; both deployment stores (`LocalDeploymentStore` on files, `RedisDeploymentStore` in Redis) read a
slug's `SlugState`, call one function here under their own lock, and write back the `Transition`'s `changed`
metadata and `pointer`. The rules live once, here, and are tested as data (tests/deployments/test_lifecycle.py):

- ACTIVE is never stored: it is derived from the pointer (`derive`).
- Activating pushes the previous live version on the history (rollback walks it back); a version that failed to
  boot, was removed, or whose files are gone is never activated.
- `only_if_newer`: a live version newer than the one asked for stays live (a slow deploy must not take back a
  later one made elsewhere).
- Delete unpoints first and leaves every version as REMOVED: that record (a tombstone) is how a store tells
  "deleted by someone" from "the store lost its data".
- A version that failed to boot is discarded (`discard`) and kept only as an `Attempt`: failed deploys don't
  use up version numbers.
- Prune keeps the active version, the highest number and the newest `keep` others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mbworker.worker.deployments.model import (
    Attempt,
    Deployment,
    DeploymentNotFound,
    DeploymentStatus,
    VersionConflict,
)

HISTORY_MAX = 100
BOOT_ERROR_MAX = 10_000


@dataclass(frozen=True)
class Pointer:
    """Which version is live (None: none) and the previously live ones, oldest first."""

    version: int | None = None
    history: tuple[int, ...] = ()


@dataclass(frozen=True)
class SlugState:
    """Everything the lifecycle needs about one slug. `files`: versions whose files (archive) are present."""

    metas: Mapping[int, Deployment] = field(default_factory=dict)
    pointer: Pointer = Pointer()
    files: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Transition:
    """What an operation decided. The store writes `changed` (metadata) and, when not None, `pointer`."""

    result: Deployment | None
    """The deployment the caller gets back (ACTIVE when it is live)."""
    changed: tuple[Deployment, ...] = ()
    pointer: Pointer | None = None
    removed: tuple[Deployment, ...] = ()
    """Delete: the versions it removed (their files go)."""


def stored(dep: Deployment) -> Deployment:
    """Metadata as stored: ACTIVE is derived from the pointer, never stored."""
    if dep.status is DeploymentStatus.ACTIVE:
        return dep.model_copy(update={"status": DeploymentStatus.INACTIVE})
    return dep


def derive(dep: Deployment, active: int | None) -> Deployment:
    """`dep` with ACTIVE when it is the live one."""
    if dep.version == active and dep.status is not DeploymentStatus.FAILED:
        return dep.model_copy(update={"status": DeploymentStatus.ACTIVE})
    return dep


def check_usable(state: SlugState, dep: Deployment) -> None:
    """`VersionConflict` unless `dep` may go live."""
    if dep.status is DeploymentStatus.REMOVED:
        raise VersionConflict(f"{dep.key} was removed")
    if dep.status is DeploymentStatus.FAILED:
        raise VersionConflict(f"{dep.key} failed to boot: {dep.boot_error}")
    if dep.version not in state.files:
        raise VersionConflict(f"{dep.key} has no files any more")


def activate(
    state: SlugState, slug: str, version: int, now: int, *, push: bool = True, only_if_newer: bool = False
) -> Transition:
    dep = state.metas.get(version)
    if dep is None:
        raise DeploymentNotFound(f"{slug} has no version {version}")
    check_usable(state, dep)
    ptr = state.pointer
    if only_if_newer and ptr.version is not None and ptr.version > version and ptr.version in state.metas:
        return Transition(derive(state.metas[ptr.version], ptr.version))
    changed: list[Deployment] = []
    history = ptr.history
    if ptr.version is not None and ptr.version != version:
        old = state.metas.get(ptr.version)
        if old is not None and old.status not in (DeploymentStatus.FAILED, DeploymentStatus.REMOVED):
            changed.append(old.model_copy(update={"status": DeploymentStatus.INACTIVE, "updated_at": now}))
        if push:
            history = (*history, ptr.version)[-HISTORY_MAX:]
    dep = dep.model_copy(update={"status": DeploymentStatus.INACTIVE, "updated_at": now, "activated_at": now})
    changed.append(dep)
    pointer = Pointer(version, tuple(v for v in history if v != version))
    return Transition(derive(dep, version), tuple(changed), pointer)


def rollback(state: SlugState, slug: str, now: int, to: int | None = None) -> Transition:
    """Back to version `to`, or to the newest usable version of the history (skipped ones leave it)."""
    if to is not None:
        return activate(state, slug, to, now)
    history = list(state.pointer.history)
    while history:
        candidate = history.pop()
        dep = state.metas.get(candidate)
        if dep is None or candidate == state.pointer.version:
            continue
        try:
            check_usable(state, dep)
        except VersionConflict:
            continue
        # The shortened history goes with the switch: this activation must not push the current one back.
        shortened = SlugState(state.metas, Pointer(state.pointer.version, tuple(history)), state.files)
        return activate(shortened, slug, candidate, now, push=False)
    raise VersionConflict(f"{slug} has no previous version to roll back to")


def delete(state: SlugState, slug: str, now: int) -> Transition:
    """Every version REMOVED (the tombstone), nothing live. `DeploymentNotFound` if nothing was left to remove."""
    removed = tuple(
        dep.model_copy(update={"status": DeploymentStatus.REMOVED, "updated_at": now})
        for _, dep in sorted(state.metas.items())
        if dep.status is not DeploymentStatus.REMOVED
    )
    if not removed:
        raise DeploymentNotFound(f"no function {slug!r}")
    return Transition(None, removed, Pointer(), removed)


def mark_failed(state: SlugState, slug: str, version: int, error: str, now: int) -> Transition:
    dep = state.metas.get(version)
    if dep is None:
        raise DeploymentNotFound(f"{slug} has no version {version}")
    dep = dep.model_copy(
        update={"status": DeploymentStatus.FAILED, "boot_error": error[:BOOT_ERROR_MAX], "updated_at": now}
    )
    return Transition(dep, (dep,))


def discard(state: SlugState, slug: str, version: int, error: str, now: int) -> Attempt:
    """A version that failed to boot goes, recorded as an `Attempt` (its number is the store's to give back).
    Never the live one: `VersionConflict`."""
    dep = state.metas.get(version)
    if dep is None:
        raise DeploymentNotFound(f"{slug} has no version {version}")
    if state.pointer.version == version:
        raise VersionConflict(f"{dep.key} is live: it can't be discarded")
    return Attempt(slug=slug, number=version, sha256=dep.sha256, at=now, error=error[:BOOT_ERROR_MAX])


def prune(state: SlugState, keep: int) -> list[int]:
    """The versions to drop: all but the active one, the highest, and the newest `keep` others."""
    numbers = sorted(state.metas, reverse=True)
    pruned: list[int] = []
    kept = 0
    for n in numbers[1:]:
        if n == state.pointer.version:
            continue
        kept += 1
        if kept > keep:
            pruned.append(n)
    return pruned


def active(state: SlugState) -> Deployment | None:
    """The live version, or None."""
    version = state.pointer.version
    dep = None if version is None else state.metas.get(version)
    return None if dep is None else derive(dep, version)


def listed(state: SlugState, *, include_removed: bool = False) -> Deployment | None:
    """The entry `list()` shows for the slug: its live version, else its newest (not a removed one unless asked)."""
    live = active(state)
    if live is not None:
        return live
    if not state.metas:
        return None
    latest = state.metas[max(state.metas)]
    if include_removed or latest.status is not DeploymentStatus.REMOVED:
        return latest
    return None


def versions(state: SlugState) -> list[Deployment]:
    """Every stored version, oldest first, ACTIVE derived."""
    return [derive(state.metas[n], state.pointer.version) for n in sorted(state.metas)]


def deleted(state: SlugState) -> bool:
    """True when the slug was deleted (a tombstone: versions are known and every one is REMOVED)."""
    return bool(state.metas) and all(d.status is DeploymentStatus.REMOVED for d in state.metas.values())
