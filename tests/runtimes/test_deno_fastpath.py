"""runtimes/deno/fastpath.ts: the bootstrap's shortcuts through Deno's fetch classes are on with the Deno we ship
and give exactly what the public path gives (tests/runtimes/fastpath_check.ts compares them case by case)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.runtimes.test_deno_support import deno_bin

HERE = Path(__file__).resolve().parent


def test_fast_paths_are_on_and_match_the_public_path(tmp_path: Path) -> None:
    done = subprocess.run(
        [deno_bin(), "run", "--no-remote", "--no-config", "--no-lock", "--no-prompt", str(HERE / "fastpath_check.ts")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"DENO_DIR": str(tmp_path / "deno"), "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Off means a Deno whose internals differ: the bootstrap still works (the public path), but slower.
    assert result["fastPaths"] == {"staticResponse": True, "request": True}
    assert result["failures"] == []
