"""Deploy input, CLI side: find functions in a `supabase/functions` tree, gather one function's files, pack them.

`gather_function` reads the settings (supabase/config.toml `[functions.<slug>]`, then the folder's function.toml,
then command-line overrides), picks the entrypoint, follows relative imports (import maps included) across
`.ts/.js/.mjs/.tsx/.jsx`, and adds the import map, static globs, `.npmrc` and `package.json`. Archive paths are
relative to the functions root (or a common ancestor if something lives above it), so `../_shared/cors.ts` keeps
resolving inside the bundle. Packages are resolved here, on the deploying machine, so that a worker never fetches
anything. When the graph uses `npm:` packages (or package.json dependencies), `deno install` puts them in a
`node_modules` folder beside the entry (Deno's own layout: each package once, linked where it is depended on), and
they ship as they are, with a frozen `deno.lock` and the `deno.json` they were resolved with: a package's `.wasm`
and data files come along, and the user's modules run unbundled, so stack traces name their files and lines. When
it uses `jsr:` or `https:` modules, `deno bundle` runs instead: its single-file output becomes the entrypoint and
the sources travel along unchanged.

Everything here is blocking (file reads, one subprocess): call it from a thread in async code.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mbworker.runtimes.deno.importmap import EMPTY_MODULE, STUBS
from mbworker.worker.deployments.archive import (
    DEFAULT_MAX_ARCHIVE_BYTES,
    DEFAULT_MAX_UNPACKED_BYTES,
    ArchiveFile,
    PackedBundle,
    Symlink,
    pack_files,
)
from mbworker.worker.deployments.manifest import (
    DENO_ENTRY_NAMES,
    SLUG_RE,
    WASM_SUFFIXES,
    ConfigTomlFunction,
    FunctionToml,
    Manifest,
    ManifestError,
    Runtime,
    format_validation_error,
    infer_runtime,
    load_config_toml,
    load_function_toml,
    parse_env_file,
    validate_secrets,
    validate_slug,
)

SOURCE_SUFFIXES = (".ts", ".js", ".mjs", ".tsx", ".jsx", ".mts", ".cts", ".cjs")
IMPORT_MAP_NAMES = ("deno.json", "deno.jsonc", "import_map.json")
EXTRA_FILES = (".npmrc", "package.json", "deno.lock")
BUNDLE_OUTPUT_NAME = "mbworker.bundle.js"
"""`deno bundle` output, written beside the entry so `import.meta.url`-relative reads still find static files."""
DEFAULT_BUNDLE_TIMEOUT_S = 300.0
PACKAGES_DIR = "node_modules"
SKIPPED_PACKAGE_DIRS = frozenset({".bin"})
"""node_modules/.bin holds the packages' command-line scripts: a function never runs them."""

# import x from "s" / import {a,\n b} from 's' / import "s" / export * from "s" / export {a} from "s"
_STATIC_RE = re.compile(
    r"""(?:^|[^\w$.])(?:import|export)(?:\s+type)?\s*(?:[\w$*{}\s,]*?\s*from\s*)?["']([^"'\n]+)["']""",
    re.MULTILINE,
)
# import("s") / import ( 's' , { with: ... })
_DYNAMIC_RE = re.compile(r"""(?:^|[^\w$.])import\s*\(\s*["']([^"'\n]+)["']\s*[,)]""", re.MULTILINE)
_EDGE_RUNTIME_TYPES_RE = re.compile(r"@supabase/functions-js(?:@[^/]*)?/(?:src/)?edge-runtime\.d\.ts$")
_REMOTE_SCHEMES = ("jsr:", "http:", "https:")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


class GatherError(Exception):
    """The function can't be deployed as it is; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class BundleSpec:
    """One function ready to pack: its manifest and its files by archive path."""

    manifest: Manifest
    files: Mapping[str, ArchiveFile]
    """Archive path (POSIX, relative to `root`) → source file, generated content (the `deno bundle` output, the
    `deno.json` packages were resolved with) or a link (inside the vendored node_modules)."""
    function_dir: Path
    root: Path
    """The folder archive paths are relative to (normally `supabase/functions`)."""
    warnings: tuple[str, ...] = ()
    """Things the deployer should see but that don't stop the deploy (an unresolved import, an empty glob)."""

    @property
    def slug(self) -> str:
        return self.manifest.slug


@dataclass(frozen=True, slots=True)
class DiscoveredFunction:
    """A folder (or config.toml entry) found by `discover_functions`; `skip_reason` None means deployable."""

    slug: str
    path: Path
    functions_root: Path
    config_toml: Path | None
    skip_reason: str | None = None

    @property
    def deployable(self) -> bool:
        return self.skip_reason is None


def find_deno() -> str:
    """The deno binary: `$MBWORKER_DENO`, the `deno` PyPI package's, or `deno` on PATH."""
    env = os.environ.get("MBWORKER_DENO")
    if env:
        return env
    try:
        import deno as deno_pkg

        found = deno_pkg.find_deno_bin()
        if found:
            return str(found)
    except (ImportError, FileNotFoundError):
        pass
    which = shutil.which("deno")
    if which:
        return which
    raise GatherError("deno is needed to bundle npm: dependencies: install the `deno` package or set MBWORKER_DENO")


def deno_cache_dir() -> Path:
    """DENO_DIR for bundling: `$MBWORKER_DENO_DIR`, else `$XDG_CACHE_HOME/mbworker/deno` (~/.cache/...)."""
    env = os.environ.get("MBWORKER_DENO_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mbworker" / "deno"


# --------------------------------------------------------------------------------------------------- discovery


def find_functions_root(path: Path) -> Path:
    """The `supabase/functions` folder for `path`: a project folder, its `supabase/` folder, or the folder itself."""
    path = path.resolve()
    for candidate in (path / "supabase" / "functions", path / "functions"):
        if candidate.is_dir():
            return candidate
    if path.is_dir():
        return path
    raise GatherError(f"{path}: no such folder")


def _config_toml_for(functions_root: Path) -> Path | None:
    candidate = functions_root.parent / "config.toml"
    return candidate if candidate.is_file() else None


def discover_functions(path: Path) -> list[DiscoveredFunction]:
    """Every function folder under a functions tree, sorted by slug, with a reason for each one skipped.

    Skipped: names that are not slugs (`_shared`, `.git`, ...), `enabled = false` in config.toml or
    function.toml, and folders without an entrypoint. config.toml entries whose `entrypoint` points outside a
    folder of their name are found too.
    """
    root = find_functions_root(path)
    config_path = _config_toml_for(root)
    config = load_config_toml(config_path) if config_path else {}
    found: dict[str, DiscoveredFunction] = {}
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        slug = child.name
        reason: str | None = None
        if not SLUG_RE.match(slug):
            reason = (
                "shared code, not a function" if slug == "_shared" else f"not a valid function name ({SLUG_RE.pattern})"
            )
        else:
            reason = _skip_reason(slug, child, config.get(slug), config_path)
        found[slug] = DiscoveredFunction(slug, child, root, config_path, reason)
    for slug, entry in config.items():
        if slug in found or not SLUG_RE.match(slug) or not entry.entrypoint or config_path is None:
            continue
        entry_path = (config_path.parent / entry.entrypoint).resolve()
        if entry_path.is_file():
            reason = "disabled (enabled = false)" if entry.enabled is False else None
            found[slug] = DiscoveredFunction(slug, entry_path.parent, root, config_path, reason)
    return [found[s] for s in sorted(found)]


def _skip_reason(slug: str, folder: Path, entry: ConfigTomlFunction | None, config_path: Path | None) -> str | None:
    local = _load_local(folder)
    enabled = local.enabled if local.enabled is not None else (entry.enabled if entry else None)
    if enabled is False:
        return "disabled (enabled = false)"
    if local.entrypoint or (entry and entry.entrypoint):
        return None
    if any((folder / n).is_file() for n in DENO_ENTRY_NAMES) or _wasm_candidates(folder):
        return None
    return "no entrypoint (index.ts/js/mjs/jsx/tsx, a .wasm/.wat, or `entrypoint` in config)"


def gather_tree(
    path: Path,
    *,
    verify_jwt_override: bool | None = None,
    env_file: Path | None = None,
    bundle_deps: bool = True,
    bundling: Callable[[str], AbstractContextManager[object]] | None = None,
) -> list[BundleSpec]:
    """`gather_function` for every deployable function `discover_functions(path)` finds."""
    return [
        gather_function(
            fn.path,
            slug=fn.slug,
            verify_jwt_override=verify_jwt_override,
            env_file=env_file,
            functions_root=fn.functions_root,
            config_toml=fn.config_toml,
            bundle_deps=bundle_deps,
            bundling=bundling,
        )
        for fn in discover_functions(path)
        if fn.deployable
    ]


# ------------------------------------------------------------------------------------------------ one function


def _load_local(folder: Path) -> FunctionToml:
    path = folder / "function.toml"
    return load_function_toml(path) if path.is_file() else FunctionToml()


def _wasm_candidates(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in WASM_SUFFIXES)


def gather_function(
    path: Path,
    *,
    slug: str | None = None,
    verify_jwt_override: bool | None = None,
    env_file: Path | None = None,
    functions_root: Path | None = None,
    config_toml: Path | None = None,
    bundle_deps: bool = True,
    bundle_npm: bool = False,
    deno_bin: str | None = None,
    bundle_timeout_s: float = DEFAULT_BUNDLE_TIMEOUT_S,
    bundling: Callable[[str], AbstractContextManager[object]] | None = None,
) -> BundleSpec:
    """Gather one function folder (or an entry file) into a `BundleSpec`.

    `slug` defaults to the folder name. Settings: config.toml `[functions.<slug>]` (found as the sibling of the
    `functions/` folder unless `config_toml` is given), overridden by the folder's function.toml, overridden by
    `verify_jwt_override` (the `--no-verify-jwt` flag); secrets from function.toml `[env]`, overridden by
    `env_file`. `bundle_deps=False` skips resolving packages (the worker would then have to fetch them itself);
    `bundle_npm=True` inlines npm packages with `deno bundle` as jsr:/https: modules are (the format before npm
    packages shipped as packages). `bundling(slug)`, when given, is entered around `deno install`/`deno bundle`
    (the CLI shows progress while it runs).
    An entry file instead of a folder deploys that file (slug: its stem unless given).
    Raises `GatherError` or `ManifestError` (both with user-facing messages).
    """
    path = path.resolve()
    if not path.exists():
        raise GatherError(f"{path}: no such file or folder")
    entry_arg = path if path.is_file() else None
    folder = path.parent if entry_arg else path
    slug = validate_slug(slug or (folder.name if entry_arg is None else entry_arg.stem))
    root = (functions_root or folder.parent).resolve()
    if config_toml is None and functions_root is None and folder.parent.name == "functions":
        config_toml = _config_toml_for(folder.parent)
    entry_cfg = load_config_toml(config_toml).get(slug) if config_toml else None
    local = _load_local(folder)
    supabase_dir = config_toml.parent if config_toml else folder
    warnings: list[str] = []

    enabled = local.enabled if local.enabled is not None else (entry_cfg.enabled if entry_cfg else None)
    if enabled is False:
        raise GatherError(f"{slug} is disabled (enabled = false); enable it to deploy")

    entrypoint = _pick_entrypoint(folder, entry_arg, local, entry_cfg, supabase_dir)
    runtime: Runtime = local.runtime or infer_runtime(entrypoint.name)
    if runtime != infer_runtime(entrypoint.name):
        raise GatherError(f"{slug}: runtime = {runtime!r} but the entrypoint is {entrypoint.name}")

    files: dict[Path, None] = {entrypoint: None}  # ordered set
    import_map: Path | None = None
    needs_bundle = remote = False
    stub_specifiers: set[str] = set()
    if runtime == "deno":
        import_map = _pick_import_map(folder, root, local, entry_cfg, supabase_dir)
        imap = _ImportMap.load(import_map) if import_map else _ImportMap.empty()
        for extra in imap.files:
            files[extra] = None
        graph = _follow_imports(entrypoint, imap, warnings)
        files.update(dict.fromkeys(graph.files))
        # npm:, jsr: and https: modules are resolved here, never on a worker (which fetches nothing).
        needs_bundle = graph.uses_npm or bool(graph.remote) or _declares_npm_deps(folder / "package.json")
        remote = bool(graph.remote)
        stub_specifiers = graph.edge_runtime_types
        for name in EXTRA_FILES:
            if (folder / name).is_file():
                files[folder / name] = None

    static_patterns: list[str] = []
    for glob_base, patterns in (
        (folder, local.static_files),
        (supabase_dir, None if local.static_files is not None else (entry_cfg.static_files if entry_cfg else None)),
    ):
        for pattern in patterns or []:
            matched = _expand_glob(glob_base, pattern)
            if not matched:
                warnings.append(f"static_files pattern {pattern!r} matched no files")
            files.update(dict.fromkeys(matched))
            static_patterns.append(os.path.normpath(os.path.join(glob_base, pattern)))

    env = dict(local.env)
    if env_file is not None:
        env.update(parse_env_file(env_file))
    validate_secrets(env)

    # A regex-found import may point anywhere on the deployer's disk: refuse files outside the project so a
    # stray `../../../.aws/credentials` import never ships. The project is the folder holding `supabase/`.
    project = (
        config_toml.parent.parent
        if config_toml
        else (root.parent.parent if root.parent.name == "supabase" else root.parent)
    )
    outside = sorted(str(p) for p in files if not p.is_relative_to(project))
    if outside:
        raise GatherError(
            f"{slug}: files outside the project folder {project} would be deployed: {', '.join(outside[:5])}"
        )
    base = Path(os.path.commonpath([root, *(p.parent for p in files)]))
    rel: dict[str, ArchiveFile] = {_rel(p, base): p for p in files}
    static_rel = [os.path.relpath(p, base).replace(os.sep, "/") for p in static_patterns]
    entry_rel = _rel(entrypoint, base)
    manifest_entry, source_entry, manifest_map = entry_rel, None, (_rel(import_map, base) if import_map else None)
    deno_config: str | None = None
    if needs_bundle and bundle_deps and not remote and not bundle_npm:
        with (bundling or _quietly)(slug):  # seconds to minutes: the CLI shows progress meanwhile
            vendored = _deno_install(
                rel, base, entry_rel, manifest_map, stub_specifiers, deno_bin or find_deno(), bundle_timeout_s
            )
        rel.update(vendored)
        # The generated deno.json holds the import map (with our stubs): the worker runs with it as the config.
        deno_config = _rel(entrypoint.parent / "deno.json", base)
        manifest_map = None
    elif needs_bundle and bundle_deps:
        out_rel = _rel(entrypoint.parent / BUNDLE_OUTPUT_NAME, base)
        for reserved in (out_rel, out_rel + ".map"):
            if reserved in rel:
                raise GatherError(f"{reserved} is reserved for the bundled output; rename that file")
        with (bundling or _quietly)(slug):  # seconds to minutes: the CLI shows progress meanwhile
            rel[out_rel], rel[out_rel + ".map"] = _deno_bundle(
                rel, base, entry_rel, manifest_map, stub_specifiers, deno_bin or find_deno(), bundle_timeout_s
            )
        # The bundle is self-contained: no import map at run time (it would make Deno resolve npm: again).
        manifest_entry, source_entry, manifest_map = out_rel, entry_rel, None

    verify_jwt = verify_jwt_override
    if verify_jwt is None:
        verify_jwt = local.verify_jwt if local.verify_jwt is not None else (entry_cfg.verify_jwt if entry_cfg else None)
    try:
        manifest = Manifest(
            slug=slug,
            runtime=runtime,
            entrypoint=manifest_entry,
            import_map=manifest_map,
            verify_jwt=True if verify_jwt is None else verify_jwt,
            static_patterns=static_rel,
            limits=local.limits,
            env=env,
            cache=local.cache,
            net=local.net,
            source_entrypoint=source_entry,
            deno_config=deno_config,
        )
    except ValidationError as exc:
        raise format_validation_error(slug, exc) from exc
    return BundleSpec(manifest=manifest, files=rel, function_dir=folder, root=base, warnings=tuple(warnings))


def _quietly(slug: str) -> AbstractContextManager[object]:
    return nullcontext()


def pack_bundle(spec: BundleSpec, *, max_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES) -> PackedBundle:
    """The archive for `spec` (reproducible tar.gz + mbworker.json) with its sha256. `BundleTooLarge` past
    `max_bytes` (default 20 MB, Supabase's limit)."""
    return pack_files(spec.files, spec.manifest, max_bytes=max_bytes)


def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def _pick_entrypoint(
    folder: Path, entry_arg: Path | None, local: FunctionToml, cfg: ConfigTomlFunction | None, supabase_dir: Path
) -> Path:
    if entry_arg is not None:
        return entry_arg
    if local.entrypoint:
        chosen, source = (folder / local.entrypoint).resolve(), "function.toml"
    elif cfg and cfg.entrypoint:
        chosen, source = (supabase_dir / cfg.entrypoint).resolve(), "config.toml"
    else:
        if local.runtime != "wasm":
            for name in DENO_ENTRY_NAMES:
                if (folder / name).is_file():
                    return folder / name
        wasm = _wasm_candidates(folder)
        binaries = [p for p in wasm if p.suffix.lower() == ".wasm"]
        if len(wasm) == 1 or len(binaries) == 1:
            return (binaries or wasm)[0]
        if wasm:
            names = ", ".join(p.name for p in wasm)
            raise GatherError(f"{folder}: several wasm modules ({names}); set `entrypoint` in function.toml")
        raise GatherError(
            f"{folder}: no entrypoint: expected one of {', '.join(DENO_ENTRY_NAMES)} or a .wasm/.wat module, "
            "or set `entrypoint` in function.toml or config.toml"
        )
    if not chosen.is_file():
        raise GatherError(f"entrypoint {chosen} (from {source}) does not exist")
    return chosen


def _pick_import_map(
    folder: Path, root: Path, local: FunctionToml, cfg: ConfigTomlFunction | None, supabase_dir: Path
) -> Path | None:
    if local.import_map:
        chosen, source = (folder / local.import_map).resolve(), "function.toml"
    elif cfg and cfg.import_map:
        chosen, source = (supabase_dir / cfg.import_map).resolve(), "config.toml"
    else:
        for name in IMPORT_MAP_NAMES:  # deno.json wins over the legacy import_map.json
            if (folder / name).is_file():
                return folder / name
        legacy = root / "import_map.json"  # a project-wide map: allowed, if discouraged
        return legacy if legacy.is_file() else None
    if not chosen.is_file():
        raise GatherError(f"import map {chosen} (from {source}) does not exist")
    return chosen


def _expand_glob(base: Path, pattern: str) -> list[Path]:
    out: list[Path] = []
    for hit in sorted(glob.glob(os.path.join(glob.escape(str(base)), pattern), recursive=True)):
        p = Path(hit).resolve()
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
    return out


def _declares_npm_deps(package_json: Path) -> bool:
    if not package_json.is_file():
        return False
    try:
        data = json.loads(package_json.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise GatherError(f"{package_json}: invalid JSON: {exc}") from exc
    return isinstance(data, dict) and bool(data.get("dependencies"))


# ------------------------------------------------------------------------------------------------- import map


def strip_jsonc(text: str) -> str:
    """JSON with `//` and `/* */` comments and trailing commas → JSON (string-aware)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            out.append(c)
            i += 1
    return re.sub(r",(\s*[}\]])", r"\1", "".join(out))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(strip_jsonc(path.read_text(encoding="utf-8")))
    except (ValueError, OSError) as exc:
        raise GatherError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise GatherError(f"{path}: expected a JSON object")
    return data


@dataclass
class _ImportMap:
    """The effective `imports`/`scopes` of a deno.json or import_map.json, targets resolved against their file."""

    config: dict[str, Any]
    """The deno.json object (compilerOptions etc.), without imports/scopes/importMap; empty for import_map.json."""
    imports: dict[str, str]
    scopes: dict[str, dict[str, str]]
    base: Path
    """Folder the targets are relative to."""
    files: list[Path]
    """The map file(s) to ship: deno.json plus the file its `importMap` names."""

    @classmethod
    def empty(cls) -> _ImportMap:
        return cls({}, {}, {}, Path("/"), [])

    @classmethod
    def load(cls, path: Path) -> _ImportMap:
        data = _read_json(path)
        files = [path]
        base = path.parent
        config: dict[str, Any] = {}
        if path.name.startswith("deno."):
            config = {k: v for k, v in data.items() if k not in ("imports", "scopes", "importMap")}
            if isinstance(data.get("importMap"), str) and "imports" not in data:
                target = (path.parent / data["importMap"]).resolve()
                if not target.is_file():
                    raise GatherError(f"{path}: importMap {data['importMap']!r} does not exist")
                files.append(target)
                base, data = target.parent, _read_json(target)
        imports = data.get("imports", {})
        scopes = data.get("scopes", {})
        if not isinstance(imports, dict) or not isinstance(scopes, dict):
            raise GatherError(f"{path}: `imports` and `scopes` must be objects")
        return cls(config, {str(k): str(v) for k, v in imports.items()}, scopes, base, files)

    def resolve(self, specifier: str) -> str | None:
        """The mapped target of a bare specifier (exact key, else the longest `prefix/` key), else None."""
        if specifier in self.imports:
            return self.imports[specifier]
        best = ""
        for key in self.imports:
            if key.endswith("/") and specifier.startswith(key) and len(key) > len(best):
                best = key
        return self.imports[best] + specifier[len(best) :] if best else None

    def absolute(self, target: str) -> str:
        """`target` with a relative path made into a file:// URL (so the map can live anywhere)."""
        if target.startswith(("./", "../", "/")):
            url = (self.base / target).resolve().as_uri()
            return url + "/" if target.endswith("/") and not url.endswith("/") else url
        return target


@dataclass
class _Graph:
    files: list[Path] = field(default_factory=list)
    uses_npm: bool = False
    remote: set[str] = field(default_factory=set)
    """jsr:, http: and https: specifiers (after import mapping)."""
    edge_runtime_types: set[str] = field(default_factory=set)


def _specifiers(source: str) -> list[str]:
    return [m.group(1) for m in _STATIC_RE.finditer(source)] + [m.group(1) for m in _DYNAMIC_RE.finditer(source)]


def _follow_imports(entry: Path, imap: _ImportMap, warnings: list[str]) -> _Graph:
    """Every local module reachable from `entry` by relative (or import-mapped relative) specifiers."""
    graph = _Graph()
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        graph.files.append(current)
        if current.suffix.lower() not in SOURCE_SUFFIXES:
            continue  # JSON, text, wasm: shipped, not scanned
        try:
            source = current.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise GatherError(f"{current}: can't read: {exc}") from exc
        for spec in _specifiers(source):
            target = _resolve(spec, current, imap, graph)
            if target is None:
                continue
            if target.is_file():
                todo.append(target.resolve())
            else:
                warnings.append(f"{current.name}: import {spec!r} not found ({target})")
    return graph


def _resolve(spec: str, importer: Path, imap: _ImportMap, graph: _Graph) -> Path | None:
    if _EDGE_RUNTIME_TYPES_RE.search(spec):
        graph.edge_runtime_types.add(spec)  # type-only; stubbed when bundling
        return None
    clean = spec.split("?", 1)[0].split("#", 1)[0]
    if clean.startswith(("./", "../")):
        return (importer.parent / clean).resolve()
    if clean.startswith("npm:"):
        graph.uses_npm = True
        return None
    if clean.startswith(_REMOTE_SCHEMES):
        graph.remote.add(clean)
        return None
    if ":" in clean.split("/", 1)[0] or clean.startswith("/"):
        return None  # node:, data:, file: — nothing to gather
    mapped = imap.resolve(clean)
    if mapped is None:
        return None  # bare specifier without a mapping: package.json or a boot error
    if _EDGE_RUNTIME_TYPES_RE.search(mapped):
        return None
    if mapped.startswith("npm:"):
        graph.uses_npm = True
        return None
    if mapped.startswith(_REMOTE_SCHEMES):
        graph.remote.add(mapped)
        return None
    if mapped.startswith(("./", "../", "/")):
        return (imap.base / mapped).resolve()
    return None


# ---------------------------------------------------------------------------------------------------- bundling


def _stage(files: Mapping[str, ArchiveFile], stage: Path) -> None:
    """Copy the gathered files into `stage` (same archive layout) for deno to work on."""
    for name, src in files.items():
        target = stage / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            target.write_bytes(src)
        elif isinstance(src, Path):
            shutil.copyfile(src, target)


def _run_deno(cmd: list[str], cwd: Path, what: str, entry_rel: str, timeout_s: float) -> None:
    env = {**os.environ, "DENO_DIR": str(deno_cache_dir()), "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"}
    deno_cache_dir().mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise GatherError(f"{what} took longer than {timeout_s:g} s") from exc
    except OSError as exc:
        raise GatherError(f"can't run deno ({cmd[0]}): {exc}") from exc
    if proc.returncode != 0:
        stderr = _ANSI_RE.sub("", proc.stderr.decode(errors="replace"))
        tail = stderr.split("Stack backtrace:", 1)[0].strip()[-4000:]
        if "jsr:" in tail:
            tail += "\n(jsr: packages are fetched from jsr.io while bundling: is it reachable from here?)"
        raise GatherError(f"{what} failed for {entry_rel} (exit {proc.returncode}):\n{tail}")


def _relative_target(target: str, imap: _ImportMap, folder: Path) -> str:
    """An import-map target rebased from the map's folder to `folder` (where the generated deno.json goes)."""
    if not target.startswith(("./", "../", "/")):
        return target
    moved = os.path.relpath(imap.base / target, folder).replace(os.sep, "/")
    moved = moved if moved.startswith("../") else f"./{moved}"
    return moved + "/" if target.endswith("/") and not moved.endswith("/") else moved


def _deno_install(
    files: Mapping[str, ArchiveFile],
    base: Path,
    entry_rel: str,
    import_map_rel: str | None,
    stub_specifiers: set[str],
    deno_bin: str,
    timeout_s: float,
) -> dict[str, ArchiveFile]:
    """Resolve the graph's npm packages into a node_modules folder beside the entry, as `deno install` lays it
    out, and return what ships besides the sources: that folder (links included), the frozen `deno.lock` and the
    `deno.json` both were made with (the function's imports, rebased beside it, our stubs, its compilerOptions).

    The generated `deno.json` replaces one the function has in that folder (it holds its imports): Deno takes a
    `package.json` beside a config only when that config is called deno.json. A `deno.lock` there is the start.
    """
    with tempfile.TemporaryDirectory(prefix="mbworker-install-") as tmp:
        stage = Path(tmp)
        _stage(files, stage)
        entry = stage / entry_rel
        folder = entry.parent
        imap = _ImportMap.load(stage / import_map_rel) if import_map_rel else _ImportMap.empty()
        imports = {k: _relative_target(v, imap, folder) for k, v in imap.imports.items()}
        # Type-only imports of the Supabase templates point at jsr.io, which nothing may fetch: no module at all.
        for spec in sorted({*STUBS, *stub_specifiers}):  # sorted: the same sources give the same archive
            imports[spec] = EMPTY_MODULE
        scopes = {
            _relative_target(scope, imap, folder): {k: _relative_target(str(v), imap, folder) for k, v in m.items()}
            for scope, m in imap.scopes.items()
            if isinstance(m, dict)
        }
        config: dict[str, Any] = {}
        if isinstance(imap.config.get("compilerOptions"), dict):
            config["compilerOptions"] = imap.config["compilerOptions"]
        config.update({"imports": imports, "nodeModulesDir": "auto", "lock": {"path": "./deno.lock"}})
        if scopes:
            config["scopes"] = scopes
        config_path = folder / "deno.json"
        config_path.write_text(json.dumps(config, indent=2))
        cmd = [deno_bin, "install", "--quiet", f"--config={config_path}", "--entrypoint", str(entry)]
        _run_deno(cmd, folder, "deno install", entry_rel, timeout_s)
        # Frozen on the worker: it resolves nothing anew (and could fetch nothing anyway).
        config["lock"] = {"path": "./deno.lock", "frozen": True}
        folder_rel = _rel(folder, stage)
        prefix = f"{folder_rel}/" if folder_rel != "." else ""
        out: dict[str, ArchiveFile] = {f"{prefix}deno.json": json.dumps(config, indent=2).encode() + b"\n"}
        lock = folder / "deno.lock"
        if lock.is_file():
            out[f"{prefix}deno.lock"] = lock.read_bytes()
        out.update(_vendored_packages(folder / PACKAGES_DIR, prefix + PACKAGES_DIR))
        return out


def _vendored_packages(packages: Path, rel: str) -> dict[str, ArchiveFile]:
    """Every file and link under the node_modules folder `packages`, by archive path under `rel`. Read into memory
    (the staging folder goes away); refused past the unpacked-size limit a worker would refuse anyway."""
    out: dict[str, ArchiveFile] = {}
    total = 0
    for dirpath, dirnames, filenames in os.walk(packages):
        here = Path(dirpath)
        sub = here.relative_to(packages).as_posix()
        at = rel if sub == "." else f"{rel}/{sub}"
        keep = []
        for name in sorted(dirnames):
            if here == packages and name in SKIPPED_PACKAGE_DIRS:
                continue
            if (here / name).is_symlink():
                out[f"{at}/{name}"] = Symlink(os.readlink(here / name))
            else:
                keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            path = here / name
            if path.is_symlink():
                out[f"{at}/{name}"] = Symlink(os.readlink(path))
                continue
            data = path.read_bytes()
            total += len(data)
            if total > DEFAULT_MAX_UNPACKED_BYTES:
                limit = DEFAULT_MAX_UNPACKED_BYTES // 2**20
                raise GatherError(f"the npm packages are over {limit} MB unpacked, more than a worker takes")
            out[f"{at}/{name}"] = data
    return out


def _deno_bundle(
    files: Mapping[str, ArchiveFile],
    base: Path,
    entry_rel: str,
    import_map_rel: str | None,
    stub_specifiers: set[str],
    deno_bin: str,
    timeout_s: float,
) -> tuple[bytes, bytes]:
    """Run `deno bundle` over a staged copy of the gathered files; return the single-file output and its source
    map. The map is linked (a file beside it, not inline: the bundle V8 parses stays its size) with paths relative
    to the output beside the entry: Deno applies it, so a stack trace names the user's module and line in the
    unpacked bundle, as for unbundled functions."""
    with tempfile.TemporaryDirectory(prefix="mbworker-bundle-") as tmp:
        stage = Path(tmp)
        _stage(files, stage)
        entry = stage / entry_rel
        imap = _ImportMap.load(stage / import_map_rel) if import_map_rel else _ImportMap.empty()
        stub = entry.parent / ".mbworker-empty.js"
        stub.write_text("export {};\n")
        imports = {k: imap.absolute(v) for k, v in imap.imports.items()}
        # The template's type-only import points at jsr.io, which a bundler would try to fetch: map it to nothing.
        for spec in {"jsr:@supabase/functions-js/edge-runtime.d.ts", *stub_specifiers}:
            imports[spec] = stub.as_uri()
        scopes = {
            imap.absolute(scope): {k: imap.absolute(str(v)) for k, v in mapping.items()}
            for scope, mapping in imap.scopes.items()
            if isinstance(mapping, dict)
        }
        config = {**imap.config, "imports": imports, "scopes": scopes}
        config_path = entry.parent / ".mbworker-deno.json"
        config_path.write_text(json.dumps(config, indent=2))
        out = entry.parent / BUNDLE_OUTPUT_NAME
        cmd = [
            deno_bin, "bundle", "--quiet", "--no-lock", "--platform=deno", "--sourcemap=linked",
            f"--config={config_path}", f"--output={out}", str(entry),
        ]  # fmt: skip
        _run_deno(cmd, entry.parent, "deno bundle", entry_rel, timeout_s)
        source_map = out.with_name(out.name + ".map")
        if not out.is_file() or not source_map.is_file():
            raise GatherError(f"deno bundle wrote no output for {entry_rel}")
        return out.read_bytes(), source_map.read_bytes()


__all__ = [
    "BUNDLE_OUTPUT_NAME",
    "BundleSpec",
    "DiscoveredFunction",
    "GatherError",
    "ManifestError",
    "deno_cache_dir",
    "discover_functions",
    "find_deno",
    "find_functions_root",
    "gather_function",
    "gather_tree",
    "pack_bundle",
    "strip_jsonc",
]
