"""Write small function folders for tests."""

from __future__ import annotations

from pathlib import Path


def write_function(root: Path, slug: str, source: str, *, toml: str = "", files: dict[str, str] | None = None) -> Path:
    d = root / slug
    d.mkdir(parents=True, exist_ok=True)
    (d / "index.ts").write_text(source)
    if toml:
        (d / "function.toml").write_text(toml)
    for name, text in (files or {}).items():
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return d
