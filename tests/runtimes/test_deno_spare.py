"""runtimes/deno/spare.py: a version dir made ahead of the next cold start, a full copy of the template when
taken, made again in the background; a second taker in the meantime makes its own."""

from __future__ import annotations

from pathlib import Path

import trio

from mbworker.runtimes.deno.spare import DENO_DIR, TMPS, SpareDirs, make_version_dir


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def test_a_taken_spare_is_a_whole_copy_and_the_next_is_made_behind_it(tmp_path: Path) -> None:
    template = tmp_path / "template"
    (template / "gen").mkdir(parents=True)
    (template / "gen" / "bootstrap.ts.js").write_text("compiled")
    (template / "v8_code_cache_v2").write_bytes(b"\0" * 4096)
    parent = tmp_path / "run"
    parent.mkdir()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            spares = SpareDirs(template, parent, nursery)
            await spares.fill()
            first = spares.take()
            assert first is not None
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
