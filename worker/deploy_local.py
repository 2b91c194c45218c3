"""From a path on this machine to packed bundles: what `mbworker deploy` uploads and `serve --deploy` stores.

PATH is one function folder (or entry file), or a functions tree (`supabase/functions`, a project holding one,
or any folder of function folders such as examples/functions).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import trio

from mbworker.worker.deployer import Deployer, DeployFailed
from mbworker.worker.deployments import (
    BundleRejected,
    BundleSpec,
    GatherError,
    ManifestError,
    gather_function,
    gather_tree,
    pack_bundle,
)
from mbworker.worker.deployments.manifest import DENO_ENTRY_NAMES, WASM_SUFFIXES
from mbworker.worker.errors import ConfigError

log = logging.getLogger("mbworker.deploy")


@dataclass(frozen=True)
class PackedFunction:
    slug: str
    data: bytes
    sha256: str


def is_function_folder(path: Path) -> bool:
    """A folder is one function when it has an entrypoint or a function.toml; otherwise it is a tree."""
    if path.is_file():
        return True
    if (path / "function.toml").is_file() or any((path / n).is_file() for n in DENO_ENTRY_NAMES):
        return True
    return any(p.suffix.lower() in WASM_SUFFIXES for p in path.iterdir() if p.is_file())


def build_bundles(
    path: Path,
    *,
    name: str | None = None,
    no_verify_jwt: bool = False,
    env_file: Path | None = None,
    max_bytes: int = 20 * 1024 * 1024,
    bundling: Callable[[str], AbstractContextManager[object]] | None = None,
) -> list[PackedFunction]:
    """Gather and pack every function under `path`. Blocking (may run `deno bundle`, inside `bundling(slug)`
    when given). Raises `ConfigError`."""
    override = False if no_verify_jwt else None
    try:
        if is_function_folder(path):
            specs: list[BundleSpec] = [
                gather_function(path, slug=name, verify_jwt_override=override, env_file=env_file, bundling=bundling)
            ]
        else:
            if name:
                raise ConfigError("--name applies to one function folder, not to a tree")
            specs = gather_tree(path, verify_jwt_override=override, env_file=env_file, bundling=bundling)
        packed = []
        for spec in specs:
            for warning in spec.warnings:
                print(f"! {spec.slug}: {warning}", file=sys.stderr)
            bundle = pack_bundle(spec, max_bytes=max_bytes)
            packed.append(PackedFunction(spec.slug, bundle.data, bundle.sha256))
        return packed
    except (GatherError, ManifestError, BundleRejected) as exc:
        raise ConfigError(str(exc)) from exc
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc


async def deploy_path(deployer: Deployer, path: Path) -> list[str]:
    """Deploy everything under `path` into this worker (for `serve --deploy`). Returns the live slugs.

    A function that fails to build or boot is logged and skipped: the others still deploy. One whose bundle is
    the live version's (every start of `make run`) stays as it is: no new version.
    """
    bundles = await trio.to_thread.run_sync(build_bundles, path)
    live = []
    for bundle in bundles:
        try:
            dep = await deployer.deploy(bundle.slug, bundle.data, bundle.sha256, skip_unchanged=True)
        except (DeployFailed, BundleRejected) as exc:
            log.error("deploy of %s failed: %s", bundle.slug, exc)
            continue
        live.append(dep.slug)
    return live
