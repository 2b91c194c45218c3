"""The data dir's permissions: only the daemon's user may read what it holds (keys, function secrets).

Owner: `serve_worker` calls `secure_data_dir` once at start, before anything else is written. It creates the dir
0700, or tightens an existing one, and makes every file that holds secrets owner-only: the project's keys
(`secrets/*`, 0600), each version's uploaded archive (0600) and its bundle manifest (`mbworker.json`, which
carries the function's env: 0400). What it had to tighten is returned, so the daemon can log it. Then
`remove_legacy_scratch` removes the temp files of earlier releases that nothing else would remove.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from mbworker.worker.deployments.manifest import MANIFEST_NAME

DIR_MODE = 0o700
SECRET_FILE_MODE = 0o600
SECRET_READONLY_MODE = 0o400


def secure_data_dir(data_dir: Path) -> list[str]:
    """Create or tighten `data_dir` and its secret-holding files. Blocking (a walk): run it in a thread."""
    fixed: list[str] = []
    data_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    _at_most(data_dir, DIR_MODE, fixed)
    secrets = data_dir / "secrets"
    if secrets.is_dir():
        _at_most(secrets, DIR_MODE, fixed)
        for entry in os.scandir(secrets):
            if entry.is_file(follow_symlinks=False):
                _at_most(Path(entry.path), SECRET_FILE_MODE, fixed)
    for version_dir in _version_dirs(data_dir / "deployments"):
        archive = version_dir / "bundle.tar.gz"
        if archive.is_file():
            _at_most(archive, SECRET_FILE_MODE, fixed)
        manifest = version_dir / "bundle" / MANIFEST_NAME
        if manifest.is_file():
            _at_most(manifest, SECRET_READONLY_MODE, fixed)
    return fixed


def _version_dirs(root: Path) -> list[Path]:
    out: list[Path] = []
    try:
        slugs = list(os.scandir(root))
    except FileNotFoundError:
        return out
    for slug in slugs:
        if slug.is_dir(follow_symlinks=False) and not slug.name.startswith("."):
            out += [Path(v.path) for v in os.scandir(slug.path) if v.name.startswith("v") and v.is_dir()]
    return out


def _at_most(path: Path, mode: int, fixed: list[str]) -> None:
    """Drop every permission bit of `path` beyond `mode` (never adds one: a read-only file stays read-only)."""
    current = stat.S_IMODE(path.stat().st_mode)
    if current & ~mode:
        os.chmod(path, current & mode)
        fixed.append(f"{path} {oct(current)} → {oct(current & mode)}")


def remove_legacy_scratch(data_dir: Path) -> list[str]:
    """Remove the temp files earlier releases kept where nothing removes them any more: `scratch/functions/`
    (one temp dir per function, shared by its processes and kept across restarts) and, in `scratch/deno/`,
    anything but the Deno runtime's run dirs (`run-*`, which it sweeps itself). Returns what was removed.
    Blocking: run it in a thread, at start, before the runtimes open."""
    removed: list[str] = []
    scratch = data_dir / "scratch"
    legacy = [scratch / "functions"]
    try:
        legacy += [Path(e.path) for e in os.scandir(scratch / "deno") if not e.name.startswith(("run-", ".run-"))]
    except FileNotFoundError:
        pass
    for path in legacy:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed
