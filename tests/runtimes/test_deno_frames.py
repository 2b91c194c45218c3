"""runtimes/deno/frames.ts: the bootstrap's frame writer gives the bytes of the plain encoding for every kind of
text and body, in one batch or frame by frame (tests/runtimes/frames_check.ts compares them)."""

from __future__ import annotations

from pathlib import Path

from tests.runtimes.test_deno_support import run_deno_check

HERE = Path(__file__).resolve().parent


def test_frames_are_the_plain_encoding(tmp_path: Path) -> None:
    assert run_deno_check(HERE / "frames_check.ts", tmp_path / "deno") == {"failures": []}
