"""The import map every Deno process runs with: the function's own (deno.json / import_map.json) plus our stubs.

Supabase templates start with the type-only `import "jsr:@supabase/functions-js/edge-runtime.d.ts"`; jsr.io is
unreachable from a worker, so it is mapped to an empty module. Relative addresses in the function's map are
resolved against the map's own directory (our generated map lives elsewhere). Blocking file I/O: call from a
worker thread.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mbworker.runtimes.api import FunctionVersion
from mbworker.runtimes.errors import BootError

EMPTY_MODULE = "data:application/javascript,export%20%7B%7D%3B"
STUBS = (
    "jsr:@supabase/functions-js/edge-runtime.d.ts",
    "jsr:@supabase/functions-js@2/edge-runtime.d.ts",
    "npm:@supabase/functions-js/edge-runtime.d.ts",
    "npm:@supabase/functions-js@2/edge-runtime.d.ts",
    "https://esm.sh/@supabase/functions-js/src/edge-runtime.d.ts",
)


def _strip_jsonc(text: str) -> str:
    """deno.json may be JSONC: drop // and /* */ comments outside strings, and trailing commas."""
    out = re.sub(r'("(?:\\.|[^"\\])*")|//[^\n]*|/\*.*?\*/', lambda m: m.group(1) or "", text, flags=re.S)
    return re.sub(r",(\s*[}\]])", r"\1", out)


def _resolve(value: str, base: Path) -> str:
    if value.startswith(("./", "../", "/")):
        resolved = (base / value).resolve().as_uri()
        return resolved + "/" if value.endswith("/") and not resolved.endswith("/") else resolved
    return value


def build_import_map(fn: FunctionVersion) -> dict[str, Any]:
    imports: dict[str, str] = {}
    scopes: dict[str, dict[str, str]] = {}
    if fn.import_map:
        path = (fn.bundle_dir / fn.import_map).resolve()
        try:
            data = json.loads(_strip_jsonc(path.read_text()))
        except (OSError, ValueError) as exc:
            raise BootError(f"Worker failed to boot: cannot read import map {fn.import_map}: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("importMap"), str) and "imports" not in data:
            return build_import_map(
                FunctionVersion(
                    **{**_fields(fn), "import_map": str((path.parent / data["importMap"]).relative_to(fn.bundle_dir))}
                )
            )
        base = path.parent
        for k, v in (data.get("imports") or {}).items():
            imports[_resolve(k, base)] = _resolve(str(v), base)
        for scope, mapping in (data.get("scopes") or {}).items():
            scopes[_resolve(scope, base)] = {_resolve(k, base): _resolve(str(v), base) for k, v in mapping.items()}
    for stub in STUBS:
        imports.setdefault(stub, EMPTY_MODULE)
    result: dict[str, Any] = {"imports": imports}
    if scopes:
        result["scopes"] = scopes
    return result


def _fields(fn: FunctionVersion) -> dict[str, Any]:
    return {name: getattr(fn, name) for name in fn.__dataclass_fields__}


def write_import_map(fn: FunctionVersion, target: Path) -> None:
    target.write_text(json.dumps(build_import_map(fn)))
