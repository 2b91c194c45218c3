"""`mbworker provision …` (and `mbworker up` / `down`): argparse wiring around providers. No logic of its own.

The lead wires `add_provision_commands` (and `add_local_commands` for top-level up/down) into cli/main.py;
until then `python -m provision …` runs the same commands. Each subcommand sets `args.func(args) -> int`.

Exit codes: 0 done (or nothing to do), 1 error, 2 usage, 3 applied but some node was left in place (drain failed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ProvisionError
from .hetzner import HetznerProvider
from .local import LocalProvider
from .machines import MachinesProvider
from .nodeops import ControlDrainOps, NodeOps, RemoteNodeOps
from .plan import Plan
from .provider import ApplyOptions, Provider
from .secrets import SECRETS_FILE, ClusterSecrets, default_state_dir, load_or_create_secrets
from .shipment import Shipment
from .spec import ClusterSpec, load_spec, parse_spec
from .status import render_status, status_from_facts, status_local
from .wheels import Wheelhouse

EXIT_INCOMPLETE = 3

#: The local cluster used by `up` without -c: the spec's required fields with their smallest values.
DEFAULT_LOCAL_SPEC: dict[str, Any] = {
    "name": "local",
    "location": "fsn1",
    "network": "10.0.0.0/16",
    "system": {"type": "cx23"},
    "proxy": {"type": "cx23", "count": 1},
    "worker": {"type": "cx23", "count": 2},
    "state": {"type": "cx23", "count": 1},
}


def _common(p: argparse.ArgumentParser, *, spec_required: bool = True) -> None:
    p.add_argument("-c", "--config", type=Path, required=spec_required, help="cluster spec (TOML)")
    p.add_argument("--provider", choices=("hetzner", "local", "machines"), default="hetzner")
    p.add_argument("--endpoint", default=None, help="Hetzner API URL (default: $HCLOUD_ENDPOINT or the public API)")
    p.add_argument("--state-dir", type=Path, default=None, help="where secrets live (default: next to the spec)")
    p.add_argument("--poll-interval", type=float, default=1.0, help=argparse.SUPPRESS)


def _apply_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--no-drain", action="store_true", help="delete workers without draining them first")
    p.add_argument("--force", action="store_true", help="delete workers even if their drain fails")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to wait for a drain (default 120)")


def add_provision_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `provision {plan,apply,scale,destroy,up,down}` to an argparse subparsers object."""
    prov = subparsers.add_parser("provision", help="stand up, scale and destroy a cluster (Hetzner or local)")
    sub = prov.add_subparsers(dest="provision_command", required=True)

    p = sub.add_parser("plan", help="show what apply would change")
    _common(p)
    p.add_argument("--no-drain", action="store_true", help="plan deletes without drains")
    p.add_argument("--verbose", "-v", action="store_true", help="list unchanged resources too")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="make the cluster match the spec")
    _common(p)
    _apply_opts(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("scale", help="change a pillar's count (worker=N, proxy=N, state=N) and apply")
    p.add_argument("counts", nargs="+", metavar="ROLE=N")
    _common(p)
    _apply_opts(p)
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("destroy", help="delete everything labelled for the cluster")
    _common(p)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_destroy)

    p = sub.add_parser("status", help="the cluster's URLs and nodes, as the provider sees them")
    _common(p)
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_status)

    _add_up_down(sub)


def add_local_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add top-level `up` / `down` (the local provider) to an argparse subparsers object."""
    _add_up_down(subparsers)


def _add_up_down(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("up", help="run the cluster on this machine: redis, N workers, a gateway")
    _common(p, spec_required=False)
    p.add_argument("--workers", type=int, default=None, help="number of workers (default: the spec's)")
    p.add_argument("--no-drain", action="store_true", help="stop surplus workers without draining")
    p.set_defaults(func=cmd_up, provider="local")

    p = sub.add_parser("down", help="stop everything `up` started")
    _common(p, spec_required=False)
    p.set_defaults(func=cmd_down, provider="local")


# --- plumbing ---------------------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> tuple[ClusterSpec, Path]:
    if args.config is None:
        spec = parse_spec(DEFAULT_LOCAL_SPEC)
        state_dir = args.state_dir or Path.home() / ".config" / "mbworker" / f"cluster-{spec.name}"
    else:
        # A local-only spec needs no Hetzner location or server types: the built-in local spec fills them in.
        local = args.provider == "local"
        spec = load_spec(
            args.config, defaults={k: v for k, v in DEFAULT_LOCAL_SPEC.items() if k != "name"} if local else None
        )
        state_dir = args.state_dir or default_state_dir(args.config, spec.name)
    return spec, state_dir


def _provider(args: argparse.Namespace, spec: ClusterSpec, state_dir: Path) -> tuple[Provider, Callable[[], None]]:
    """Build the chosen provider; the returned callable closes what it owns."""
    secrets: ClusterSecrets = load_or_create_secrets(state_dir)
    injected: NodeOps | None = getattr(args, "node_ops", None)
    if args.provider == "local":
        ops = injected or RemoteNodeOps(
            secrets.admin_token.get_secret_value(), spec.daemon.admin_port, daemon_port=spec.daemon.port
        )
        closer = getattr(ops, "close", lambda: None)
        return LocalProvider(spec, secrets, state_dir, node_ops=ops), closer
    if args.provider == "machines":
        machines = MachinesProvider(
            spec, secrets, state_dir, node_ops=injected, wheelhouse=getattr(args, "wheelhouse", None)
        )
        return machines, machines.close
    token = os.environ.get("HCLOUD_TOKEN", "")
    endpoint = args.endpoint or os.environ.get("HCLOUD_ENDPOINT") or None
    ops = injected or ControlDrainOps(
        RemoteNodeOps(secrets.admin_token.get_secret_value(), spec.daemon.admin_port, daemon_port=spec.daemon.port),
        state_dir,
    )
    shipment = Shipment(spec, state_dir, wheelhouse_override=getattr(args, "wheelhouse", None))
    provider = HetznerProvider(
        spec, secrets, shipment, token=token, endpoint=endpoint, node_ops=ops, poll_interval=args.poll_interval
    )
    return provider, getattr(ops, "close", lambda: None)


def _confirm(plan: Plan, args: argparse.Namespace, verb: str) -> bool:
    if plan.empty or getattr(args, "yes", False):
        return True
    if not sys.stdin.isatty():
        print(f"refusing to {verb} without --yes (stdin is not a terminal)", file=sys.stderr)
        return False
    answer = input(f"{verb.capitalize()} {len(plan.changes)} change(s)? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _print(line: str) -> None:
    print(line, flush=True)


def _run_apply(provider: Provider, plan: Plan, args: argparse.Namespace, verb: str = "apply") -> int:
    print(plan.render())
    if plan.empty:
        return 0
    if not _confirm(plan, args, verb):
        return 1
    return _execute(provider, plan, args)


def _execute(provider: Provider, plan: Plan, args: argparse.Namespace) -> int:
    options = ApplyOptions(force=getattr(args, "force", False), drain_timeout=getattr(args, "drain_timeout", 120.0))
    report = provider.apply(plan, options, _print)
    for name, reason in report.forced:
        print(f"warning: {name} was deleted without a completed drain: {reason}")
    if report.left_in_place:
        for name, reason in report.left_in_place:
            print(f"not deleted: {name}: {reason} (re-run, or pass --force / --no-drain)")
        return EXIT_INCOMPLETE
    print(f"done: {len(report.done)} step(s)")
    return 0


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ProvisionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    wrapper.__name__ = fn.__name__
    return wrapper


# --- commands ---------------------------------------------------------------------------------------------


@_guard
def cmd_plan(args: argparse.Namespace) -> int:
    spec, state_dir = _load(args)
    provider, close = _provider(args, spec, state_dir)
    try:
        print(provider.plan(drain=not args.no_drain).render(verbose=args.verbose))
    finally:
        close()
    return 0


@_guard
def cmd_apply(args: argparse.Namespace) -> int:
    spec, state_dir = _load(args)
    provider, close = _provider(args, spec, state_dir)
    try:
        return _run_apply(provider, provider.plan(drain=not args.no_drain), args)
    finally:
        close()


def parse_counts(items: list[str]) -> dict[str, int]:
    counts = {}
    for item in items:
        m = re.fullmatch(r"(proxy|worker|state)=(\d+)", item)
        if not m:
            raise ProvisionError(f"expected ROLE=N with ROLE one of proxy, worker, state; got {item!r}")
        counts[m.group(1)] = int(m.group(2))
    return counts


def set_count_in_file(path: Path, role: str, count: int) -> None:
    """Rewrite `count` in the spec file's [role] table, keeping everything else (comments included) as it is."""
    text = path.read_text()
    table = re.search(rf"(?m)^\[{role}\][^\n]*\n", text)
    if table is None:
        raise ProvisionError(f"{path} has no [{role}] table")
    end_match = re.search(r"(?m)^\[", text[table.end() :])
    end = table.end() + (end_match.start() if end_match else len(text) - table.end())
    body = text[table.end() : end]
    if re.search(r"(?m)^count\s*=", body):
        body = re.sub(r"(?m)^count\s*=\s*\d+", f"count = {count}", body, count=1)
    else:
        body = f"count = {count}\n" + body
    path.write_text(text[: table.end()] + body + text[end:])


@_guard
def cmd_scale(args: argparse.Namespace) -> int:
    spec, state_dir = _load(args)
    for role, count in parse_counts(args.counts).items():
        spec = spec.with_count(role, count)
    provider, close = _provider(args, spec, state_dir)
    try:
        plan = provider.plan(drain=not args.no_drain)
        print(plan.render())
        if not _confirm(plan, args, "scale"):
            return 1
        # the spec file stays the source of truth: a later `apply` must not undo the scale
        for role, count in parse_counts(args.counts).items():
            set_count_in_file(args.config, role, count)
        return 0 if plan.empty else _execute(provider, plan, args)
    finally:
        close()


@_guard
def cmd_destroy(args: argparse.Namespace) -> int:
    spec, state_dir = _load(args)
    provider, close = _provider(args, spec, state_dir)
    try:
        return _run_apply(provider, provider.destroy_plan(), args, "destroy")
    finally:
        close()


@_guard
def cmd_status(args: argparse.Namespace) -> int:
    spec, state_dir = _load(args)
    provider, close = _provider(args, spec, state_dir)
    try:
        if isinstance(provider, LocalProvider):
            status = status_local(provider)
        elif isinstance(provider, MachinesProvider | HetznerProvider):
            status = status_from_facts(spec, provider.read_facts())
        else:
            raise ProvisionError(f"provider {provider.name} has no status")
    finally:
        close()
    print(json.dumps(status, indent=2) if args.output == "json" else render_status(status))
    return 0


@_guard
def cmd_up(args: argparse.Namespace) -> int:
    spec, state_dir = _load(args)
    if args.workers is not None:
        spec = spec.with_count("worker", args.workers)
    provider, close = _provider(args, spec, state_dir)
    try:
        args.yes = True
        code = _run_apply(provider, provider.plan(drain=not args.no_drain), args, "start")
        if isinstance(provider, LocalProvider):
            for name, url in provider.urls().items():
                print(f"{name:>10}: {url}")
            _print_local_access(provider, state_dir)
        return code
    finally:
        close()


def _print_local_access(provider: LocalProvider, state_dir: Path) -> None:
    """Keys and the admin token, as `mbworker serve` shows them: values on a terminal only, else where they are."""
    keys_file = provider.worker_keys_file(1)
    keys = (
        dict(line.split("=", 1) for line in keys_file.read_text().splitlines() if "=" in line)
        if keys_file.is_file()
        else {}
    )
    if keys and sys.stdout.isatty():
        print(f"{'anon key':>10}: {keys.get('ANON_KEY', '')}")
        print(f"service_role key: {keys.get('SERVICE_ROLE_KEY', '')}")
    elif keys:
        print(f"{'keys':>10}: in {keys_file} (ANON_KEY, SERVICE_ROLE_KEY; every worker accepts them)")
    print(f"admin token: in {state_dir.resolve() / SECRETS_FILE} (admin_token; the same on every worker)")


@_guard
def cmd_down(args: argparse.Namespace) -> int:
    spec, state_dir = _load(args)
    provider, close = _provider(args, spec, state_dir)
    try:
        args.yes = True
        return _run_apply(provider, provider.destroy_plan(), args, "stop")
    finally:
        close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m provision", description="MadBase cluster provisioner")
    sub = parser.add_subparsers(dest="command", required=True)
    add_provision_commands(sub)
    add_local_commands(sub)
    return parser


def main(
    argv: list[str] | None = None, *, node_ops: NodeOps | None = None, wheelhouse: Wheelhouse | None = None
) -> int:
    """Entry point for `python -m provision`; tests inject the node transport (`node_ops`) and a prebuilt
    `wheelhouse` (instead of building the running mbworker's)."""
    args = build_parser().parse_args(argv)
    if node_ops is not None:
        args.node_ops = node_ops
    if wheelhouse is not None:
        args.wheelhouse = wheelhouse
    code: int = args.func(args)
    return code
