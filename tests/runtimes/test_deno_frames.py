"""runtimes/deno/frames.ts: the bootstrap's frame writer gives the bytes of the plain encoding for every kind of
text and body, in one batch or frame by frame (tests/runtimes/frames_check.ts compares them)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.runtimes.test_deno_support import deno_bin

HERE = Path(__file__).resolve().parent


def test_frames_are_the_plain_encoding(tmp_path: Path) -> None:
    done = subprocess.run(
        [deno_bin(), "run", "--no-remote", "--no-config", "--no-lock", "--no-prompt", str(HERE / "frames_check.ts")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"DENO_DIR": str(tmp_path / "deno"), "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"failures": []}
