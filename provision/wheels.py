"""The worker wheelhouse: the running mbworker as a wheel plus the wheels of its dependencies, pinned to the
versions installed here, for the nodes' platform (Debian 12: CPython 3.11, glibc 2.36, x86_64 and/or aarch64 as
the spec's server types need), built into the operator's state directory. The operator's own machine may be
anything pip runs on (a Mac, an arm64 laptop, another Python): dependency wheels are downloaded for the nodes,
never taken from what is installed here.

Nothing is fetched by name from a public index at a node's boot: the system node serves this directory on the
private network and workers install from it with `pip --no-index --require-hashes` against `requirements()`,
which pins every wheel by version and sha256. `build_wheelhouse` owns `<state_dir>/wheelhouse/`; it rebuilds
the mbworker wheel only when the source changed (a digest of the source tree is kept next to it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from .errors import ProvisionError

WHEELHOUSE = "wheelhouse"
PROJECT = "mbworker"
#: The port the system node serves the wheelhouse on (private network only; not in any Cloud Firewall rule).
WHEEL_PORT = 8404
#: The nodes' interpreter and C library: Debian 12, the one image validation accepts.
NODE_PYTHON = "3.11"
NODE_GLIBC = (2, 36)
#: Hetzner's architecture names (desired.architecture) as wheel platform suffixes.
WHEEL_ARCH = {"x86_64": "x86_64", "arm64": "aarch64"}


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
        """A pip requirements file pinning every project by version and the hashes of its wheels (one per
        architecture for compiled ones: pip accepts a file matching any of them), as `--require-hashes` wants."""
        lines = []
        for name, group in groupby(sorted(self.wheels, key=_key), key=lambda w: w.name):
            wheels = list(group)
            hashes = " ".join(f"--hash=sha256:{w.sha256}" for w in wheels)
            lines.append(f"{name}=={wheels[0].version} {hashes}")
        return "\n".join(lines)


def _key(w: Wheel) -> tuple[str, str]:
    return w.name, w.filename


def node_platforms(arch: str) -> list[str]:
    """The wheel platform tags a Debian 12 node of Hetzner architecture `arch` installs (pip's `--platform` takes
    each manylinux level literally, so all of them are listed)."""
    machine = WHEEL_ARCH[arch]
    major, newest = NODE_GLIBC
    return [f"manylinux_{major}_{minor}_{machine}" for minor in range(newest, 16, -1)] + [f"manylinux2014_{machine}"]


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


def build_wheelhouse(
    state_dir: Path, architectures: Iterable[str] = ("x86_64",), *, timeout: float = 600.0
) -> Wheelhouse:
    """Build (or reuse) `<state_dir>/wheelhouse`: mbworker from source plus its dependencies at the versions
    installed here, as wheels for Debian 12 nodes on each of `architectures` (Hetzner's names)."""
    arches = sorted(set(architectures))
    unknown = [a for a in arches if a not in WHEEL_ARCH]
    if unknown:
        raise ProvisionError(f"no wheels for architecture {', '.join(unknown)} (known: {', '.join(WHEEL_ARCH)})")
    root = source_root()
    out = state_dir / WHEELHOUSE
    pins = "\n".join(
        sorted(
            f"{d.metadata['Name']}=={d.version}"
            for d in importlib.metadata.distributions()
            if d.metadata["Name"] and d.metadata["Name"].lower() != PROJECT
        )
    )
    # what the wheelhouse is made of: the source, the pinned versions and the node platforms
    digest = hashlib.sha256(f"{_source_digest(root)}\n{pins}\n{arches}\n{NODE_PYTHON}".encode()).hexdigest()
    stamp = out / ".source-digest"
    if stamp.is_file() and stamp.read_text() == digest:
        return read_wheelhouse(out)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-", dir=state_dir) as tmp:
        build = Path(tmp) / "whl"
        _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(build), str(root), timeout=timeout)
        own = next(build.glob(f"{PROJECT}-*.whl"))
        constraints = Path(tmp) / "pins.txt"
        constraints.write_text(pins)
        for arch in arches:
            platforms = [arg for tag in node_platforms(arch) for arg in ("--platform", tag)]
            try:
                _pip(
                    "download", "--quiet", "--only-binary=:all:", *platforms, "--python-version", NODE_PYTHON,
                    "--implementation", "cp", "--abi", f"cp{NODE_PYTHON.replace('.', '')}", "--abi", "abi3",
                    "--abi", "none", "--dest", str(build), "-c", str(constraints), str(own), timeout=timeout,
                )  # fmt: skip
            except ProvisionError as exc:
                raise ProvisionError(f"wheels for Debian 12 on {arch} (Python {NODE_PYTHON}): {exc}") from None
        if out.exists():
            shutil.rmtree(out)
        build.rename(out)
    stamp.write_text(digest)
    return read_wheelhouse(out)
