"""runtimes/deno/fastpath.ts: the bootstrap's shortcuts through Deno's fetch classes are on with the Deno we ship
and give exactly what the public path gives (tests/runtimes/fastpath_check.ts compares them case by case)."""

from __future__ import annotations

from pathlib import Path

from tests.runtimes.test_deno_support import run_deno_check

HERE = Path(__file__).resolve().parent


def test_fast_paths_are_on_and_match_the_public_path(tmp_path: Path) -> None:
    result = run_deno_check(HERE / "fastpath_check.ts", tmp_path / "deno")
    # Off means a Deno whose internals differ: the bootstrap still works (the public path), but slower.
    assert result["fastPaths"] == {"staticResponse": True, "request": True}
    assert result["failures"] == []
