"""runtimes/deno/spare.py: a version dir made ahead of the next cold start, a full copy of the template when
taken, made again in the background; a second taker in the meantime makes its own."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from mbworker.runtimes.deno import spare
from mbworker.runtimes.deno.spare import DENO_DIR, TMPS, SpareDirs, make_version_dir
from tests.runtimes.test_deno_support import call, deno_runtime, version, write_fn


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@asynccontextmanager
async def first_spare(template: Path, parent: Path) -> AsyncIterator[tuple[SpareDirs, Path]]:
    """`SpareDirs` making its copies of `template` in `parent`, its first spare made and taken; all within 30 s."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            spares = SpareDirs(template, parent, nursery)
            await spares.fill()
            first = spares.take()
            assert first is not None
            yield spares, first


async def test_a_taken_spare_is_a_whole_copy_and_the_next_is_made_behind_it(tmp_path: Path) -> None:
    template = tmp_path / "template"
    (template / "gen").mkdir(parents=True)
    (template / "gen" / "bootstrap.ts.js").write_text("compiled")
    (template / "v8_code_cache_v2").write_bytes(b"\0" * 4096)
    parent = tmp_path / "run"
    parent.mkdir()
    async with first_spare(template, parent) as (spares, first):
        assert tree(first / DENO_DIR) == tree(template)
        assert (first / TMPS).stat().st_mode & 0o777 == 0o700
        assert spares.take() is None  # the next one is still being made: the caller copies for itself
        await spares.fill()  # waits for the one under way
        second = spares.take()
        assert second is not None
        assert second != first
        assert tree(second / DENO_DIR) == tree(template)
        await spares.fill()
    # the one made after the last take is there too, a copy like the others
    left = [p for p in parent.iterdir() if p not in (first, second)]
    assert len(left) == 1
    assert tree(left[0] / DENO_DIR) == tree(template)


def test_a_version_dir_made_on_the_spot_has_the_same_layout(tmp_path: Path) -> None:
    template = tmp_path / "template"
    template.mkdir()
    (template / "x").write_text("x")
    make_version_dir(template, tmp_path / "v")
    assert tree(tmp_path / "v" / DENO_DIR) == tree(template)
    assert (tmp_path / "v" / TMPS).stat().st_mode & 0o777 == 0o700


async def test_a_dir_put_back_is_offered_again_and_a_copy_made_meanwhile_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = tmp_path / "template"
    template.mkdir()
    (template / "x").write_text("x")
    parent = tmp_path / "run"
    parent.mkdir()
    async with first_spare(template, parent) as (spares, first):
        spares.put_back(first)  # its taker never used it
        assert spares.take() == first
        # put back while the refill (scheduled by that take) is copying: the refill's copy is not needed
        real = spare.make_version_dir

        def put_back_first(template: Path, base: Path) -> None:
            trio.from_thread.run_sync(spares.put_back, first)
            real(template, base)

        monkeypatch.setattr(spare, "make_version_dir", put_back_first)
        await spares.fill()
        monkeypatch.setattr(spare, "make_version_dir", real)
        assert spares.take() == first
    # the refill after the last take made one more; the copy made while `first` was put back is gone
    left = [p for p in parent.iterdir() if p != first]
    assert len(left) == 1
    assert tree(left[0] / DENO_DIR) == tree(template)


async def test_the_runtime_serves_before_its_spare_is_made_and_closes_while_one_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first spare is copied in the background: the runtime is open (and a cold start copies for itself)
    while that copy is held, and closing waits for it and leaves nothing behind."""
    real = spare.make_version_dir
    release = threading.Event()

    def held(template: Path, base: Path) -> None:
        if base.name.startswith(".spare-"):
            release.wait(30)  # bounded: a runtime that waits for it at start fails the fail_after below
        real(template, base)

    monkeypatch.setattr(spare, "make_version_dir", held)
    fn = version(write_fn(tmp_path, 'Deno.serve(() => new Response("ok"));'))
    scratch = tmp_path / "scratch"
    try:
        with trio.fail_after(20):
            async with deno_runtime(tmp_path) as rt:
                assert (await call(rt, fn, "GET", "/fn"))[2] == b"ok"
                assert rt.statistics().cold_starts == 1
                (run,) = [p for p in scratch.iterdir() if p.is_dir()]
                assert [p.name for p in run.iterdir() if p.name.startswith("fn-")]  # its own copy
                release.set()  # the close below waits for the copy under way (a thread is not cancelled)
    finally:
        release.set()
    assert [p for p in scratch.iterdir()] == []


async def test_a_cold_start_cancelled_as_it_takes_the_spare_leaves_it_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled between taking the spare and the thread that renames it: the spare is offered again (not left in
    the run dir unowned), and the next cold start takes it."""
    fn = version(write_fn(tmp_path, 'Deno.serve(() => new Response("ok"));'))
    real_take = SpareDirs.take
    scope = trio.CancelScope()
    taken: list[Path | None] = []

    def take_then_cancel(self: SpareDirs) -> Path | None:
        taken.append(real_take(self))
        scope.cancel()  # the caller's next checkpoint: the thread hand-off
        return taken[-1]

    with trio.fail_after(30):
        async with deno_runtime(tmp_path) as rt:
            spares = rt._shared.spares
            await spares.fill()
            monkeypatch.setattr(SpareDirs, "take", take_then_cancel)
            with scope:
                await call(rt, fn, "GET", "/fn")
            assert scope.cancelled_caught
            monkeypatch.setattr(SpareDirs, "take", real_take)
            (first,) = taken
            assert first is not None
            assert first.is_dir()
            await spares.fill()
            run = first.parent
            assert [p for p in run.iterdir() if p.name.startswith(".spare-")] == [first]  # no second copy
            assert (await call(rt, fn, "GET", "/fn"))[2] == b"ok"
            assert not first.exists()  # it became the version's dir
