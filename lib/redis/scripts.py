"""Lua scripts run with EVALSHA (falling back to EVAL on NOSCRIPT): `Script` is immutable and shareable.

A script file starts with a comment header that names its keys and arguments, for example:

    -- Refresh one presence entry.
    -- KEYS[1]: the topic's hash of entries
    -- KEYS[2]: the topic's sorted set of expiries
    -- ARGV[1]: entry id
    -- ARGV[2]: now, milliseconds

The highest `KEYS[n]` in the header is the number of keys every call must pass (checked before sending).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

_KEYS = re.compile(r"\bKEYS\[(\d+)\]")
_ARGV = re.compile(r"\bARGV\[(\d+)\]")


def _header(source: str) -> list[str]:
    lines = []
    for line in source.lstrip().splitlines():
        if not line.startswith("--"):
            break
        lines.append(line)
    return lines


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA1; `keys`/`args` are the counts its header declares (None: not declared)."""

    source: str
    name: str = "<inline>"
    sha: str = field(init=False)
    keys: int | None = field(init=False)
    args: int | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())
        header = "\n".join(_header(self.source))
        key_numbers = [int(n) for n in _KEYS.findall(header)]
        arg_numbers = [int(n) for n in _ARGV.findall(header)]
        object.__setattr__(self, "keys", max(key_numbers) if key_numbers else None)
        object.__setattr__(self, "args", max(arg_numbers) if arg_numbers else None)

    @classmethod
    def from_file(cls, path: str | Path) -> Script:
        """Read a .lua file (at import/start time: this is blocking file I/O)."""
        path = Path(path)
        return cls(path.read_text(encoding="utf-8"), name=path.name)

    @classmethod
    def from_package(cls, package: str, filename: str) -> Script:
        """Read a .lua file shipped inside a Python package (see pyproject's package-data)."""
        text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
        return cls(text, name=filename)

    def check(self, keys_given: int) -> None:
        if self.keys is not None and keys_given != self.keys:
            raise ValueError(f"script {self.name} declares {self.keys} keys, got {keys_given}")
