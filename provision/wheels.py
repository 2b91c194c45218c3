"""The worker wheelhouse: the running mbworker as a wheel plus the wheels of its dependencies, pinned to the
versions installed here, built into the operator's state directory.

Nothing is fetched by name from a public index at a node's boot: the system node serves this directory on the
private network and workers install from it with `pip --no-index --require-hashes` against `requirements()`,
which pins every wheel by version and sha256. `build_wheelhouse` owns `<state_dir>/wheelhouse/`; it rebuilds
the mbworker wheel only when the source changed (a digest of the source tree is kept next to it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ProvisionError

WHEELHOUSE = "wheelhouse"
PROJECT = "mbworker"
#: The port the system node serves the wheelhouse on (private network only; not in any Cloud Firewall rule).
WHEEL_PORT = 8404


@dataclass(frozen=True)
class Wheel:
    filename: str
    sha256: str

    @property
    def name(self) -> str:
        return self.filename.split("-")[0].lower().replace("_", "-")

    @property
    def version(self) -> str:
        return self.filename.split("-")[1]


@dataclass(frozen=True)
class Wheelhouse:
    directory: Path
    wheels: tuple[Wheel, ...]

    @property
    def version(self) -> str:
        return next(w.version for w in self.wheels if w.name == PROJECT)

    def requirements(self) -> str:
        """A pip requirements file pinning every wheel by version and hash (what `--require-hashes` wants)."""
        return "\n".join(f"{w.name}=={w.version} --hash=sha256:{w.sha256}" for w in sorted(self.wheels, key=_key))


def _key(w: Wheel) -> str:
    return w.name


def read_wheelhouse(directory: Path) -> Wheelhouse:
    wheels = tuple(Wheel(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(directory.glob("*.whl")))
    if not any(w.name == PROJECT for w in wheels):
        raise ProvisionError(f"{directory} holds no {PROJECT} wheel")
    return Wheelhouse(directory, wheels)


def source_root() -> Path:
    """The source tree of the running mbworker (the wheel is built from what runs, not from an index)."""
    here = Path(__file__).resolve().parent.parent
    pyproject = here / "pyproject.toml"
    if not pyproject.is_file() or f'name = "{PROJECT}"' not in pyproject.read_text():
        raise ProvisionError(f"the running {PROJECT} is not a source checkout ({here}): cannot build its wheel")
    return here


def _source_digest(root: Path) -> str:
    h = hashlib.sha256()
    for top in ["pyproject.toml", *(p.name for p in (root / PROJECT).iterdir() if p.is_symlink())]:
        base = root / top
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for f in files:
            if "__pycache__" in f.parts:
                continue
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _pip(*args: str, timeout: float) -> None:
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
            check=True, capture_output=True, timeout=timeout,
            # the same source gives the same wheel bytes (so the same hash) from one apply to the next
            env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"},
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        tail = exc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise ProvisionError(f"pip {args[0]} failed: {' / '.join(tail)}") from None
    except subprocess.TimeoutExpired:
        raise ProvisionError(f"pip {args[0]} did not finish within {timeout:.0f}s") from None


def build_wheelhouse(state_dir: Path, *, timeout: float = 600.0) -> Wheelhouse:
    """Build (or reuse) `<state_dir>/wheelhouse`: mbworker from source plus its dependencies at the versions
    installed here."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise ProvisionError(
            f"worker wheels are built for this machine's architecture ({platform.machine()}): x86_64 only"
        )
    root = source_root()
    out = state_dir / WHEELHOUSE
    digest = _source_digest(root)
    stamp = out / ".source-digest"
    if stamp.is_file() and stamp.read_text() == digest:
        return read_wheelhouse(out)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-", dir=state_dir) as tmp:
        build = Path(tmp) / "whl"
        _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(build), str(root), timeout=timeout)
        own = next(build.glob(f"{PROJECT}-*.whl"))
        pins = Path(tmp) / "pins.txt"
        pins.write_text(
            "\n".join(
                f"{d.metadata['Name']}=={d.version}"
                for d in importlib.metadata.distributions()
                if d.metadata["Name"] and d.metadata["Name"].lower() != PROJECT
            )
        )
        _pip("wheel", "--quiet", "--wheel-dir", str(build), "-c", str(pins), str(own), timeout=timeout)
        if out.exists():
            shutil.rmtree(out)
        build.rename(out)
    stamp.write_text(digest)
    return read_wheelhouse(out)
