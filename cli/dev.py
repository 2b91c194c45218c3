"""`mbworker functions serve [PATH] [--watch]` and `mbworker dev`: a worker on the embedded default, serving the
functions under PATH, redeploying the ones whose files change.

One process, one Trio loop: the worker (`serve_worker`) and the `DevLoop` beside it. The loop owns what it
deployed: the sha256 of each function's last attempt, and the files each function was gathered from (so a save in
`_shared/` redeploys every function importing it, and nothing else). A version that fails to boot is reported with
its output, its paths mapped back to the user's files, and the previous version keeps serving (the deployer
switches only after a successful boot).

Watching polls file metadata (mtime, size, inode) in a worker thread every `POLL_INTERVAL_S`. Why not an inotify
library: a functions tree is tens of files (a scan takes well under a millisecond), polling needs no compiled
dependency, and a thread that returns within the interval is cancelled at once on Ctrl-C, where watchfiles' awatch
waits in an uncancellable thread until its Rust timeout. The loop itself only sleeps between scans.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from mbworker.worker.deploy_local import is_function_folder
from mbworker.worker.deployer import Deployer, DeployFailed
from mbworker.worker.deployments import (
    BundleRejected,
    GatherError,
    ManifestError,
    StoreError,
    discover_functions,
    gather_function,
    pack_bundle,
)
from mbworker.worker.deployments.gather import find_functions_root
from mbworker.worker.errors import ConfigError

log = logging.getLogger("mbworker.dev")

POLL_INTERVAL_S = 0.25
SKIP_DIRS = frozenset({".git", "node_modules", ".mbworker", "__pycache__", ".venv"})

Snapshot = dict[str, tuple[int, int, int]]


def snapshot(roots: list[Path]) -> Snapshot:
    """(mtime_ns, size, inode) of every file under `roots` (a root may be a file). Blocking: run in a thread."""
    out: Snapshot = {}
    for root in roots:
        if root.is_file():
            st = root.stat()
            out[str(root)] = (st.st_mtime_ns, st.st_size, st.st_ino)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue  # removed between listing and stat: the next scan sees it gone
                out[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return out


def changed_paths(before: Snapshot, after: Snapshot) -> set[Path]:
    return {Path(p) for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


@dataclass
class Gathered:
    """One function's gather result: a packed bundle, or the reason it can't be deployed as it is."""

    slug: str
    folder: Path
    files: frozenset[Path] = frozenset()
    data: bytes = b""
    sha256: str = ""
    root: Path | None = None
    error: str | None = None


@dataclass
class DevLoop:
    """Deploys the functions under `path` into `deployer` and keeps them in step with the files."""

    deployer: Deployer
    path: Path
    env_file: Path | None = None
    verify_jwt_override: bool | None = None
    say: Callable[[str], None] = print
    bundling: Callable[[str], AbstractContextManager[object]] | None = None
    """Entered around `deno bundle` (npm/jsr/https imports): progress for the person waiting."""
    attempted: dict[str, str] = field(default_factory=dict)
    """slug → sha256 of the last bundle tried (live or not): an unchanged bundle is not deployed again."""
    sources: dict[str, Gathered] = field(default_factory=dict)

    @property
    def single(self) -> bool:
        return is_function_folder(self.path)

    def watch_roots(self) -> list[Path]:
        """The folder (or tree) itself, its settings files, and any gathered file outside it (`../_shared/x.ts`)."""
        if self.single:
            base = self.path.resolve()
            roots = [base]
        else:
            base = find_functions_root(self.path)
            roots = [base, *[p for p in [base.parent / "config.toml"] if p.is_file()]]
        if self.env_file is not None:
            roots.append(self.env_file.resolve())
        outside = {f for g in self.sources.values() for f in g.files if not f.is_relative_to(base)}
        return roots + sorted(outside - set(roots))

    # -- gathering (blocking: runs in a thread) -----------------------------------------------------------------

    def _gather_one(self, slug: str | None, folder: Path, **kwargs: Any) -> Gathered:
        name = slug or folder.stem
        try:
            spec = gather_function(
                folder,
                slug=slug,
                verify_jwt_override=self.verify_jwt_override,
                env_file=self.env_file,
                bundling=self.bundling,
                **kwargs,
            )
            packed = pack_bundle(spec)
        except (GatherError, ManifestError, BundleRejected) as exc:
            return Gathered(name, folder, error=str(exc))
        except OSError as exc:  # a file removed or unreadable mid-save: the next scan tries again
            return Gathered(name, folder, error=f"{exc.filename}: {exc.strerror}")
        files = frozenset(p.resolve() for p in spec.files.values() if isinstance(p, Path))
        return Gathered(spec.slug, spec.function_dir, files, packed.data, packed.sha256, spec.root)

    def gather(self, only: set[str] | None) -> list[Gathered]:
        """Every function under the path (those in `only`, when given); one broken function spoils no other."""
        if self.single:
            return [self._gather_one(None, self.path)]
        out = []
        for fn in discover_functions(self.path):
            if fn.deployable and (only is None or fn.slug not in self.sources or fn.slug in only):
                out.append(
                    self._gather_one(fn.slug, fn.path, functions_root=fn.functions_root, config_toml=fn.config_toml)
                )
        return out

    def affected(self, changed: set[Path]) -> set[str] | None:
        """The slugs a change touches; None (all) when a change belongs to no function (.env, config, a new one)."""
        slugs: set[str] = set()
        for path in changed:
            owners = {
                slug for slug, g in self.sources.items() if path in g.files or path.is_relative_to(g.folder.resolve())
            }
            if not owners:
                return None
            slugs |= owners
        return slugs

    # -- deploying (on the loop) ----------------------------------------------------------------------------------

    async def sync(self, changed: set[Path] | None = None) -> None:
        """Gather (all, or what `changed` touches) and deploy every function whose bundle changed."""
        only = None if changed is None else self.affected(changed)
        try:
            gathered = await trio.to_thread.run_sync(self.gather, only)
        except (GatherError, ManifestError, OSError) as exc:
            self.say(f"✗ {self.path}: {exc}")
            return
        if changed is None and not gathered:
            self.say(f"no functions under {self.path} yet: `mbworker functions new NAME` makes one")
        if only is None and not self.single:
            await self._forget_removed({g.slug for g in gathered})
        for g in gathered:
            await self._deploy(g)

    async def adopt_live(self) -> None:
        """Versions restored from the data dir count as attempted: a restart redeploys only what changed since."""
        for slug in self.deployer.table.slugs():
            dep = await self.deployer.store.get_active(slug)
            if dep is not None:
                self.attempted[slug] = dep.sha256

    async def _forget_removed(self, present: set[str]) -> None:
        for slug in sorted(set(self.sources) - present):
            del self.sources[slug]
            self.attempted.pop(slug, None)
            if self.deployer.table.get(slug) is not None:
                try:
                    await self.deployer.delete(slug)
                except StoreError as exc:
                    self.say(f"✗ {slug}: its folder is gone but it could not be removed: {exc}")
                    continue
                self.say(f"- {slug}: removed (its folder is gone or disabled)")

    async def _deploy(self, g: Gathered) -> None:
        if g.error is not None:
            if self.attempted.get(g.slug) != f"error:{g.error}":
                self.attempted[g.slug] = f"error:{g.error}"
                self.say(f"✗ {g.slug}: {g.error}{self._still_serving(g.slug)}")
            return
        self.sources[g.slug] = g
        if self.attempted.get(g.slug) == g.sha256:
            return
        self.attempted[g.slug] = g.sha256
        started = time.monotonic()
        try:
            dep = await self.deployer.deploy(g.slug, g.data, g.sha256)
        except DeployFailed as exc:
            output = self._user_paths(exc.error.output or "", exc.deployment, g)
            message = self._user_paths(exc.error.message, exc.deployment, g)
            self.say(f"✗ {g.slug} v{exc.deployment.version} failed to boot: {message}{self._still_serving(g.slug)}")
            if output.strip():
                self.say("\n".join(f"    {line}" for line in output.rstrip().splitlines()))
            return
        except (BundleRejected, StoreError) as exc:  # refused, or the data dir can't take it (disk full)
            self.attempted.pop(g.slug, None)  # not this bundle's fault: the next save tries it again
            self.say(f"✗ {g.slug}: {exc}{self._still_serving(g.slug)}")
            return
        self.say(f"✓ {g.slug} v{dep.version} live ({time.monotonic() - started:.2f} s)")

    def _still_serving(self, slug: str) -> str:
        active = self.deployer.table.get(slug)
        return f"\n  (v{active.fn.version} keeps serving)" if active is not None else ""

    def _user_paths(self, text: str, dep: Any, g: Gathered) -> str:
        """Deno names the unpacked bundle's files; say the user's files instead (same layout under `g.root`)."""
        if g.root is None:
            return text
        bundle = str(self.deployer.store.bundle_dir(dep.slug, dep.version))
        return text.replace(f"file://{bundle}", f"file://{g.root}").replace(bundle, str(g.root))

    async def watch(self, interval: float = POLL_INTERVAL_S) -> None:
        """Poll the files forever; redeploy what changed. Cancel to stop."""
        roots = self.watch_roots()
        before = await trio.to_thread.run_sync(snapshot, roots)
        while True:
            await trio.sleep(interval)  # the polling period, not a wait for an event
            after = await trio.to_thread.run_sync(snapshot, roots)
            changed = changed_paths(before, after)
            if changed:
                await self.sync(changed)
                # A save may add an import from outside the tree: follow it from now on.
                if (new_roots := self.watch_roots()) != roots:
                    roots = new_roots
                    after = await trio.to_thread.run_sync(snapshot, roots)
            before = after


# -- the commands -----------------------------------------------------------------------------------------------


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path", nargs="?", type=Path, help="a function folder or a functions tree (default supabase/functions)"
    )
    p.add_argument("--env-file", type=Path, help="dotenv file of secrets (default supabase/functions/.env if present)")
    p.add_argument("--no-verify-jwt", action="store_true", help="serve without the JWT gate")
    p.add_argument("--host", help="public listener address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="public listener port (default 8000)")
    p.add_argument("--admin-port", type=int, help="admin listener port (default 8001)")
    p.add_argument("--data-dir", type=Path, help="data dir: keys and versions (default ./.mbworker)")
    p.add_argument("--config", type=Path, help="TOML config file of the worker")


def add_dev_commands(sub: argparse._SubParsersAction, fsub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`functions serve` under `functions`, and `dev` (the same with --watch) at the top level."""
    serve = fsub.add_parser("serve", help="run a worker serving the functions under PATH (--watch: redeploy on save)")
    _options(serve)
    serve.add_argument("--watch", action="store_true", help="redeploy a function when one of its files changes")
    serve.set_defaults(func=cmd_serve)
    dev = sub.add_parser("dev", help="functions serve --watch: a worker that redeploys what you save")
    _options(dev)
    dev.set_defaults(func=cmd_serve, watch=True)


def default_path() -> Path:
    candidate = Path("supabase") / "functions"
    return candidate if candidate.is_dir() else Path(".")


def default_env_file(path: Path) -> Path | None:
    """Supabase's local secrets file: `.env` in the functions folder (for one function, beside its folder)."""
    try:
        root = path.resolve().parent if is_function_folder(path) else find_functions_root(path)
    except GatherError:
        return None
    candidate = root / ".env"
    return candidate if candidate.is_file() else None


def cmd_serve(args: argparse.Namespace) -> int:
    from mbworker.cli.banner import print_banner
    from mbworker.cli.output import config_error_in
    from mbworker.cli.progress import bundling_progress
    from mbworker.worker.config import load_settings
    from mbworker.worker.daemon import Node, serve_worker
    from mbworker.worker.logs import configure_logging

    path: Path = args.path or default_path()
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")
    if args.env_file is not None and not args.env_file.is_file():
        raise ConfigError(f"--env-file {args.env_file}: no such file")
    settings = load_settings(
        args.config, host=args.host, port=args.port, admin_port=args.admin_port, data_dir=args.data_dir
    )
    configure_logging(settings.log_level)
    _readable_logs(settings.log_level)
    env_file = args.env_file or default_env_file(path)
    verify_jwt_override = False if args.no_verify_jwt else None

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            handle: Node = await nursery.start(serve_worker, settings)
            loop = DevLoop(
                handle.deployer,
                path,
                env_file,
                verify_jwt_override,
                say=partial(print, flush=True),
                bundling=bundling_progress,
            )
            await loop.adopt_live()
            if env_file is not None:
                loop.say(f"secrets from {env_file}")
            await loop.sync()
            print_banner(handle)
            if args.watch:
                loop.say(f"watching {', '.join(str(r) for r in loop.watch_roots())} (Ctrl-C to stop)")
                nursery.start_soon(_watch_until_drained, loop, handle.drain.started)

    try:
        trio.run(run)
    except BaseExceptionGroup as group:  # a port in use: its one line, not a traceback per nursery
        raise config_error_in(group) or group from None
    return 0


class _DevLogFormatter(logging.Formatter):
    """Function output as `slug| line`; the daemon's own lines as `level component: message`."""

    def format(self, record: logging.LogRecord) -> str:
        function = getattr(record, "function", None)
        if record.name == "mbworker.function" and function:
            return f"  {function}| {record.getMessage()}"
        return f"{record.levelname.lower()} {record.name.removeprefix('mbworker.')}: {record.getMessage()}"


def _readable_logs(level: str) -> None:
    """A person reads this terminal: plain lines, function output always, the daemon's chatter only from warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_DevLogFormatter())
    handler.addFilter(lambda r: r.name == "mbworker.function" or r.levelno >= logging.WARNING)
    root = logging.getLogger("mbworker")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


async def _watch_until_drained(loop: DevLoop, draining: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.watch)
        await draining.wait()
        nursery.cancel_scope.cancel()


__all__ = ["DevLoop", "add_dev_commands", "changed_paths", "cmd_serve", "snapshot"]
