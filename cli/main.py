"""`mbworker`: serve a worker node, deploy and manage functions, purge the cache, provision a cluster."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mbworker.worker.errors import AdminApiError, ConfigError


def _admin_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="admin API URL (env MBWORKER_ADMIN_URL; default http://127.0.0.1:8001)")
    p.add_argument("--token", help="admin token (env MBWORKER_ADMIN_TOKEN; default the local data dir's)")
    p.add_argument(
        "--cluster", type=Path, metavar="SPEC", help="the whole cluster, through its control plane (cluster.toml)"
    )


def _function_client(args: argparse.Namespace) -> Any:
    from mbworker.cli.control_client import function_client

    return function_client(args)


def build_parser() -> argparse.ArgumentParser:
    from mbworker.cli.dev import add_dev_commands
    from mbworker.cli.listing import add_listing_commands
    from mbworker.cli.scaffold import add_new_command

    parser = argparse.ArgumentParser(prog="mbworker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a worker node")
    serve.add_argument("--host", help="public listener address (env MBWORKER_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="public listener port (env MBWORKER_PORT; default 8000)")
    serve.add_argument("--admin-host", help="admin listener address (env MBWORKER_ADMIN_HOST)")
    serve.add_argument("--admin-port", type=int, help="admin listener port (env MBWORKER_ADMIN_PORT; default 8001)")
    serve.add_argument(
        "--admin-public",
        action="store_const",
        const=True,
        help="allow the admin listener on a public address (env MBWORKER_ADMIN_ALLOW_PUBLIC; default refuse)",
    )
    serve.add_argument("--data-dir", type=Path, help="data dir (env MBWORKER_DATA_DIR; default ./.mbworker)")
    serve.add_argument("--config", type=Path, help="TOML config file (env MBWORKER_CONFIG)")
    serve.add_argument(
        "--deploy", type=Path, action="append", default=[], metavar="PATH", help="deploy PATH once started"
    )

    doctor = sub.add_parser("doctor", help="check this machine can run a worker, and say what to fix")
    for action in serve._actions:
        if action.dest not in ("help", "deploy"):
            doctor._add_action(action)

    deploy = sub.add_parser("deploy", help="deploy a function folder or a supabase/functions tree")
    deploy.add_argument("path", type=Path)
    deploy.add_argument("--name", help="slug (one function folder only; default the folder name)")
    deploy.add_argument("--no-verify-jwt", action="store_true", help="serve without the JWT gate")
    deploy.add_argument("--env-file", type=Path, help="dotenv file with the function's secrets")
    _admin_options(deploy)

    functions = sub.add_parser("functions", help="create, serve, list, roll back or delete functions")
    fsub = functions.add_subparsers(dest="action", required=True)
    add_new_command(fsub)
    add_dev_commands(sub, fsub)
    add_listing_commands(fsub, _admin_options)
    rollback = fsub.add_parser("rollback", help="switch back to the previous (or a given) version")
    rollback.add_argument("slug")
    rollback.add_argument("--to", type=int, metavar="VERSION")
    _admin_options(rollback)
    delete = fsub.add_parser("delete", help="stop serving a function")
    delete.add_argument("slug")
    _admin_options(delete)
    logs = fsub.add_parser("logs", help="recent output of a function (stdout/stderr)")
    logs.add_argument("slug")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--since", help="only lines newer than this, e.g. 10m, 1h")
    logs.add_argument("--limit", type=int, help="at most this many lines")
    logs.add_argument("--json", action="store_true", help="print the JSON lines as they come")
    _admin_options(logs)

    cache = sub.add_parser("cache", help="the L1 result cache")
    csub = cache.add_subparsers(dest="action", required=True)
    purge = csub.add_parser("purge", help="drop cached results (of one function, or all)")
    purge.add_argument("slug", nargs="?")
    _admin_options(purge)

    from mbworker.cli.cluster_cmds import add_cluster_commands
    from mbworker.cli.secrets_cmds import add_secrets_commands
    from mbworker.provision.cli import add_local_commands, add_provision_commands

    add_provision_commands(sub)
    add_local_commands(sub)
    add_cluster_commands(sub)
    add_secrets_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mbworker.cli.output import exit_quietly_on_broken_pipe

    return exit_quietly_on_broken_pipe(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        func = getattr(args, "func", None)
        if func is not None:  # commands that name their own handler (functions new/serve/list, up, provision …)
            return int(func(args) or 0)
        if args.command == "serve":
            return _serve(args)
        if args.command == "doctor":
            return _doctor(args)
        if args.command == "deploy":
            return _deploy(args)
        if args.command == "functions":
            return _functions(args)
        if args.command == "cache":
            return _cache(args)
    except ConfigError as exc:
        print(f"mbworker: {exc}", file=sys.stderr)
        return 2
    except AdminApiError as exc:
        print(f"mbworker: {exc}", file=sys.stderr)
        if exc.output:
            print(exc.output, file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


def _serve(args: argparse.Namespace) -> int:
    import gc
    from functools import partial

    import trio

    from mbworker.cli.banner import print_banner
    from mbworker.cli.output import config_error_in
    from mbworker.worker.daemon import Node, serve_worker
    from mbworker.worker.logs import configure_logging

    settings = _settings_from(args)
    configure_logging(settings.log_level)

    nodes: list[Node] = []

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            handle: Node = await nursery.start(
                partial(serve_worker, settings, args.deploy, reload_settings=lambda: _settings_from(args))
            )
            nodes.append(handle)
            print_banner(handle)

    # What the imports built (modules, classes, pydantic models: most of the ~80k objects a running daemon
    # holds) lives as long as the process. Out of the collector's sight, a full collection walks only what came
    # after: a few ms instead of ~65 ms of stalled loop (docs/benchmarks.md, "Function path"). Done before the
    # loop starts, so no request waits for this one collection.
    gc.collect()
    gc.freeze()
    try:
        trio.run(run)
    except BaseExceptionGroup as group:
        raise config_error_in(group) or group from None
    return nodes[0].exit_status if nodes else 0


def _settings_from(args: argparse.Namespace) -> Any:
    from mbworker.worker.config import load_settings

    return load_settings(
        args.config,
        host=args.host,
        port=args.port,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        admin_allow_public=args.admin_public,
        data_dir=args.data_dir,
    )


def _doctor(args: argparse.Namespace) -> int:
    from mbworker.cli.doctor import run_doctor

    return run_doctor(_settings_from(args))


def _deploy(args: argparse.Namespace) -> int:
    from mbworker.cli.progress import bundling_progress
    from mbworker.worker.deploy_local import build_bundles

    failed = 0
    with _function_client(args) as client:  # resolved first: a missing token is said before any bundling
        bundles = build_bundles(
            args.path, name=args.name, no_verify_jwt=args.no_verify_jwt, env_file=args.env_file,
            bundling=bundling_progress,
        )  # fmt: skip
        if not bundles:
            raise ConfigError(f"no deployable function found under {args.path}")
        for bundle in bundles:
            try:
                dep = client.deploy(bundle.slug, bundle.data, bundle.sha256)
            except AdminApiError as exc:
                failed += 1
                print(f"✗ {bundle.slug}: {exc.status} {exc.code}: {exc.message}", file=sys.stderr)
                if exc.output:
                    print(exc.output.rstrip(), file=sys.stderr)
                continue
            where = f"live on {dep['serving']}/{dep['workers']} workers" if "workers" in dep else dep.get("url", "")
            print(f"✓ {dep['slug']} v{dep['version']} ({len(bundle.data)} bytes) → {where}")
    return 1 if failed else 0


def _functions(args: argparse.Namespace) -> int:
    if args.action == "logs" and args.cluster is not None:
        from mbworker.cli.cluster_cmds import print_cluster_logs

        if args.follow:
            raise ConfigError("--follow works against one worker (--url); the cluster's logs are a snapshot")
        with _function_client(args) as control:
            return print_cluster_logs(control.logs(args.slug, args.since, args.limit), args.json)
    if args.action == "logs":
        from mbworker.cli.admin_client import resolve_admin

        url, token = resolve_admin(args.url, args.token)
        from mbworker.worker.function_logs import print_logs

        return print_logs(url, token, args.slug, args.follow, args.since, limit=args.limit, json_output=args.json)
    with _function_client(args) as client:
        if args.action == "rollback":
            dep = client.rollback(args.slug, args.to)
            on = f" on {dep['serving']}/{dep['workers']} workers" if "workers" in dep else ""
            print(f"{dep['slug']} is now serving v{dep['version']}{on}")
        elif args.action == "delete":
            result = client.delete(args.slug)
            print(f"{result['slug']} deleted ({len(result['removed'])} versions removed)")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from mbworker.cli.admin_client import AdminClient, resolve_admin

    if args.cluster is not None:
        raise ConfigError("cache purge works against one worker (--url): the control plane has no cache command")

    url, token = resolve_admin(args.url, args.token)
    with AdminClient(url, token) as client:
        print(json.dumps(client.purge_cache(args.slug)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
