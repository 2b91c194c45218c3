"""A second mbworker wheel for upgrade tests: the same code under a new version number (a copy of a built wheel with
its metadata, dist-info folder, RECORD and file name renamed), so no second build is needed."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_wheel(out: Path, *, timeout: float = 600) -> Path:
    """mbworker's own wheel (no dependencies) from this checkout, as `provision` builds it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--wheel-dir", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=timeout, env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"},
    )  # fmt: skip
    return next(out.glob("mbworker-*.whl"))


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _write_wheel(target: Path, files: dict[str, bytes], record: str) -> Path:
    """Zip `files` into `target` with a fresh RECORD at `record` (hashes and sizes of every other file), timestamps
    fixed so equal inputs give equal wheels."""
    files = {p: d for p, d in files.items() if p != record}
    files[record] = (
        "".join(f"{p},{_record_hash(d)},{len(d)}\n" for p, d in files.items()).encode() + f"{record},,\n".encode()
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for path, data in files.items():
            dst.writestr(zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    return target


def retag_wheel(wheel: Path, version: str, out: Path) -> Path:
    """A copy of `wheel` (mbworker-OLD-...) that says it is mbworker `version`, in `out`."""
    name, old, rest = wheel.name.split("-", 2)
    old_info, new_info = f"{name}-{old}.dist-info/", f"{name}-{version}.dist-info/"
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(wheel) as src:
        for item in src.infolist():
            data = src.read(item)
            path = item.filename.replace(old_info, new_info, 1)
            if path == new_info + "METADATA":
                data = data.replace(f"\nVersion: {old}\n".encode(), f"\nVersion: {version}\n".encode(), 1)
            files[path] = data
    return _write_wheel(out / f"{name}-{version}-{rest}", files, new_info + "RECORD")


def tiny_wheel(version: str, out: Path) -> Path:
    """A stand-in mbworker wheel, just enough for the upgrade helper's check (it imports `mbworker.cli.main` and
    reports `mbworker.__version__`): installs in a second, with no dependencies."""
    info = f"mbworker-{version}.dist-info/"
    files = {
        "mbworker/__init__.py": f"__version__ = {version!r}\n".encode(),
        "mbworker/cli/__init__.py": b"",
        "mbworker/cli/main.py": b"",
        info + "METADATA": f"Metadata-Version: 2.1\nName: mbworker\nVersion: {version}\n".encode(),
        info + "WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    return _write_wheel(out / f"mbworker-{version}-py3-none-any.whl", files, info + "RECORD")
