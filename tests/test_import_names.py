"""Nothing of ours installs under a generic import name: beside Supabase's realtime-py (import name `realtime`),
`import realtime` gives theirs and `mbworker.realtime` ours, both working, in one interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_supabase_realtime_and_mbworker_side_by_side(tmp_path: Path) -> None:
    site = tmp_path / "site"
    # --no-deps: realtime-py pins websockets<16 and we need >=16; the import names are what this test is about.
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), "realtime"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import realtime, mbworker.realtime; "
        "assert realtime.__file__.startswith(sys.argv[1]), realtime.__file__; "
        "assert hasattr(realtime, 'AsyncRealtimeClient'); "
        "assert mbworker.realtime.RealtimeSettings().path_prefix == '/realtime/v1'; "
        "print('ok')"
    )
    # Run away from the checkout: there, the test root on sys.path would make the folder realtime/ importable.
    result = subprocess.run(
        [sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_the_wheel_installs_only_mbworker() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'include = ["mbworker*"]' in pyproject
    for name in ("worker", "runtimes", "realtime", "provision", "lib", "cli", "control"):
        link = ROOT / "mbworker" / name
        assert link.is_symlink(), name
        assert link.resolve() == (ROOT / name).resolve(), name
