"""The version lifecycle as data: state in, transition out (no store, no files, no Redis)."""

from __future__ import annotations

import pytest

from mbworker.worker.deployments import lifecycle
from mbworker.worker.deployments.lifecycle import Pointer, SlugState
from mbworker.worker.deployments.model import Deployment, DeploymentNotFound, DeploymentStatus, VersionConflict

S = DeploymentStatus


def dep(version: int, status: DeploymentStatus = S.INACTIVE) -> Deployment:
    return Deployment(
        slug="f", version=version, status=status, sha256="0" * 64, size_bytes=1, runtime="deno",
        entrypoint="f/index.ts", created_at=0, updated_at=0,
    )  # fmt: skip


def state(
    *deps: Deployment, live: int | None = None, history: tuple[int, ...] = (), files: set[int] | None = None
) -> SlugState:
    metas = {d.version: d for d in deps}
    return SlugState(metas, Pointer(live, history), frozenset(metas if files is None else files))


def apply(s: SlugState, step: lifecycle.Transition) -> SlugState:
    metas = dict(s.metas)
    for d in step.changed:
        metas[d.version] = lifecycle.stored(d)
    return SlugState(metas, step.pointer if step.pointer is not None else s.pointer, s.files)


def test_activate_pushes_the_previous_version_and_derives_active() -> None:
    s = state(dep(1, S.STAGED), dep(2, S.STAGED))
    s = apply(s, step := lifecycle.activate(s, "f", 1, now=5))
    assert step.result is not None
    assert step.result.status is S.ACTIVE
    assert step.result.activated_at == 5
    s = apply(s, lifecycle.activate(s, "f", 2, now=6))
    assert s.pointer == Pointer(2, (1,))
    assert [d.status for d in lifecycle.versions(s)] == [S.INACTIVE, S.ACTIVE]
    assert all(d.status is not S.ACTIVE for d in s.metas.values())  # never stored


def test_only_if_newer_keeps_a_later_live_version() -> None:
    s = state(dep(1), dep(2), live=2)
    step = lifecycle.activate(s, "f", 1, now=1, only_if_newer=True)
    assert step.result is not None
    assert step.result.version == 2
    assert step.changed == ()
    assert step.pointer is None


@pytest.mark.parametrize(
    ("version", "s"),
    [(1, state(dep(1, S.FAILED))), (1, state(dep(1, S.REMOVED))), (1, state(dep(1), files=set()))],
    ids=["failed", "removed", "files gone"],
)
def test_unusable_versions_are_refused(version: int, s: SlugState) -> None:
    with pytest.raises(VersionConflict):
        lifecycle.activate(s, "f", version, now=1)


def test_rollback_walks_back_skipping_unusable_versions() -> None:
    s = state(dep(1), dep(2, S.FAILED), dep(3), dep(4), live=4, history=(1, 2, 3))
    s = apply(s, lifecycle.rollback(s, "f", now=1))
    assert s.pointer == Pointer(3, (1, 2))
    s = apply(s, lifecycle.rollback(s, "f", now=2))
    assert s.pointer == Pointer(1, ())  # 2 failed: skipped and dropped from the history
    with pytest.raises(VersionConflict):
        lifecycle.rollback(s, "f", now=3)


def test_delete_leaves_a_tombstone() -> None:
    s = state(dep(1), dep(2), live=2)
    assert not lifecycle.deleted(s)
    step = lifecycle.delete(s, "f", now=9)
    assert [d.version for d in step.removed] == [1, 2]
    assert step.pointer == Pointer()
    s = apply(s, step)
    assert lifecycle.deleted(s)
    assert lifecycle.active(s) is None
    assert lifecycle.listed(s) is None
    assert lifecycle.listed(s, include_removed=True) is not None
    with pytest.raises(DeploymentNotFound):
        lifecycle.delete(s, "f", now=10)


def test_mark_failed_keeps_the_error_bounded() -> None:
    step = lifecycle.mark_failed(state(dep(1)), "f", 1, "x" * 20_000, now=3)
    assert step.result is not None
    assert step.result.status is S.FAILED
    assert step.result.boot_error is not None
    assert len(step.result.boot_error) == lifecycle.BOOT_ERROR_MAX
    with pytest.raises(DeploymentNotFound):
        lifecycle.mark_failed(state(), "f", 1, "x", now=3)


def test_prune_keeps_the_active_the_highest_and_the_newest() -> None:
    s = state(*(dep(n) for n in range(1, 8)), live=2)
    assert lifecycle.prune(s, keep=2) == [4, 3, 1]
