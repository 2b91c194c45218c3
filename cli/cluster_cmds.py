"""`mbworker control serve` and `mbworker cluster {status,drain,undrain,sessions,audit,upstreams}`.

`control serve` runs the control plane (flags > `MBWORKER_CONTROL_*` env). The `cluster` commands talk to a
running one, found from the cluster spec (`-c cluster.toml`: URL and token in its state dir).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def add_cluster_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    control = sub.add_parser("control", help="the cluster's control plane (runs on the system node)")
    csub = control.add_subparsers(dest="control_command", required=True)
    serve = csub.add_parser("serve", help="run the control plane")
    serve.add_argument("--host", help="listener address (env MBWORKER_CONTROL_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listener port (env MBWORKER_CONTROL_PORT; default 8002)")
    serve.add_argument("--redis-url", help="the cluster's Redis (env MBWORKER_CONTROL_REDIS_URL)")
    serve.add_argument(
        "--token-file", type=Path, help="control token, created 0600 if missing (env MBWORKER_CONTROL_TOKEN_FILE)"
    )
    serve.add_argument(
        "--node-token-file",
        type=Path,
        help="read-only token for proxies and metrics, created 0600 if missing (env MBWORKER_CONTROL_NODE_TOKEN_FILE)",
    )
    serve.add_argument(
        "--admin-token-file",
        type=Path,
        help="file holding the workers' admin token (or env MBWORKER_CONTROL_ADMIN_TOKEN)",
    )
    serve.add_argument("--node-name", help="list this node (role system) among the nodes (env …_NODE_NAME)")
    serve.add_argument(
        "--layout-file",
        type=Path,
        help="the cluster's layout (provisioner's targets.json): list and probe every node (env …_LAYOUT_FILE)",
    )
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(func=cmd_control_serve)

    cluster = sub.add_parser("cluster", help="a running cluster, through its control plane")
    ksub = cluster.add_subparsers(dest="cluster_command", required=True)
    status = ksub.add_parser("status", help="every node: role, address, version, health, load, last seen")
    _spec(status)
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    status.set_defaults(func=cmd_status)

    drain = ksub.add_parser("drain", help="take a node out of the upstreams, then drain it")
    drain.add_argument("node")
    _spec(drain)
    drain.set_defaults(func=cmd_drain)
    undrain = ksub.add_parser("undrain", help="cancel a drain: the node serves again once it is ready")
    undrain.add_argument("node")
    _spec(undrain)
    undrain.set_defaults(func=cmd_undrain)

    sessions = ksub.add_parser("sessions", help="shared auth sessions")
    ssub = sessions.add_subparsers(dest="sessions_command", required=True)
    revoke = ssub.add_parser("revoke", help="refuse a session's tokens on every worker (functions and realtime)")
    revoke.add_argument("session_id")
    revoke.add_argument("--until", type=float, help="epoch seconds (default: now + the longest token lifetime)")
    _spec(revoke)
    revoke.set_defaults(func=cmd_revoke)

    audit = ksub.add_parser("audit", help="recent mutating calls to the control plane")
    audit.add_argument("--limit", type=int, default=50)
    _spec(audit)
    audit.set_defaults(func=cmd_audit)

    upstreams = ksub.add_parser("upstreams", help="the workers proxies send to now")
    _spec(upstreams)
    upstreams.set_defaults(func=cmd_upstreams)

    from mbworker.cli.upgrade_cmds import add_upgrade_commands

    add_upgrade_commands(ksub)


_FLAGS = {"redis_url": "redis-url", "admin_token": "admin-token-file", "host": "host", "port": "port"}


def _spec(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", "--cluster", dest="cluster", type=Path, required=True, help="cluster spec")
    p.add_argument("--state-dir", type=Path, help="the cluster's state dir (default: next to the spec)")


def _client(args: argparse.Namespace) -> Any:
    from mbworker.cli.control_client import ControlClient, resolve_control

    return ControlClient.connect(resolve_control(args.cluster, args.state_dir))


def cmd_control_serve(args: argparse.Namespace) -> int:
    import trio
    from pydantic import ValidationError

    from mbworker.control.errors import ControlError
    from mbworker.control.serve import ControlHandle, serve_control
    from mbworker.control.settings import ControlSettings
    from mbworker.worker.errors import ConfigError
    from mbworker.worker.logs import configure_logging

    given: dict[str, Any] = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "redis_url": args.redis_url,
            "token_file": args.token_file,
            "node_token_file": args.node_token_file,
            "node_name": args.node_name,
            "layout_file": args.layout_file,
        }.items()
        if v is not None
    }
    if args.admin_token_file is not None:
        try:
            given["admin_token"] = args.admin_token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.admin_token_file}: {exc.strerror}") from None
    try:
        settings = ControlSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{name} ({e['msg'].lower()}: MBWORKER_CONTROL_{name.upper()}"
            + (f" or --{_FLAGS[name]})" if name in _FLAGS else ")")
            for e in exc.errors()
            for name in [".".join(map(str, e["loc"]))]
        )
        raise ConfigError(f"control plane settings: {problems}") from None
    configure_logging(args.log_level)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            handle: ControlHandle = await nursery.start(serve_control, settings)
            print(f"mbworker control plane is serving on {handle.url}/control/v1", flush=True)

    try:
        trio.run(run)
    except ControlError as exc:
        raise ConfigError(exc.message) from None
    except KeyboardInterrupt:
        pass
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        nodes = client.nodes()
        if args.output == "json":
            print(json.dumps(nodes, indent=2))  # the release and who is off it: GET /release?workers=1
            return 0
        release = client.release()
    rolling = f", rolling to {release['rolling_to']}" if release.get("rolling_to") else ""
    print(f"release: mbworker {release['version']} ({release['source']}{rolling})")
    for off in release.get("workers_off_release", []):
        print(f"  ! {off['name']} runs {off['version']}, not the release: it installs it at its next start "
              "(or run `cluster upgrade` again)")  # fmt: skip
    print("\n".join(status_table(nodes)))
    return 0


def status_table(nodes: list[dict[str, Any]]) -> list[str]:
    """`cluster status`'s table: one line per node (`GET /nodes`' JSON), headed."""
    lines = [f"{'ROLE':<7} {'NAME':<28} {'ADDRESS':<21} {'VERSION':<16} {'STATE':<10} {'REQ/S':>7} {'WS':>5} "
             f"{'DENO':>5} {'SEEN':>7}  WHY NOT"]  # fmt: skip
    for n in nodes:
        load = n.get("load", {})
        address = n["private_ip"] + (f":{n['port']}" if n.get("port") else "")
        seen = "never" if n.get("last_seen_s") is None else f"{n['last_seen_s']}s"
        lines.append(
            f"{n['role']:<7} {n['name']:<28} {address:<21} {n['version']:<16} "
            f"{n['state']:<10} {load.get('requests_per_s', 0):>7} {load.get('websockets', 0):>5} "
            f"{load.get('deno_processes', 0):>5} {seen:>7}  {n.get('why_not') or ''}"
        )
    return lines


def cmd_drain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.drain_node(args.node)
    print(f"{args.node}: out of the upstreams; draining (then cordoned until `mbworker cluster undrain {args.node}`)")
    return 0


def cmd_undrain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.undrain_node(args.node)
    print(f"{args.node}: drain cancelled; it starts afresh on the cluster's release and serves (seconds)")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.revoke_session(args.session_id, args.until)
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(result["revoked_until"])))
    print(f"session {result['session_id']} revoked on every worker until {until}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        entries = client.audit(args.limit)
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["at"]))
        print(f"{when} {e['token']:<10} {e['status']} {e['action']}  {e['result']}")
    return 0


def cmd_upstreams(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for u in client.upstreams():
            print(f"{u['name']:<28} {u['address']}")
    return 0


def print_cluster_logs(lines: list[dict[str, Any]], json_output: bool) -> int:
    for line in lines:
        if json_output:
            print(json.dumps(line, ensure_ascii=False))
        else:
            print(f"{line.get('time', '')} {line.get('node', ''):<24} {line.get('stream', '')}: {line.get('msg', '')}")
    sys.stdout.flush()
    return 0
