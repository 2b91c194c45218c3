"""`mbworker cluster upgrade --version X` and `mbworker cluster wheels push|list`, through the control plane.

`wheels push` sends a wheelhouse (every `*.whl` of a directory: the mbworker wheel and its dependencies; by default
the running mbworker's, built into the cluster's state dir as `provision` does) for the control plane to hold under
the mbworker wheel's version. `upgrade` rolls a held version out to the workers, one at a time (control/upgrade.py).
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import time
from pathlib import Path

from mbworker.worker.errors import ConfigError

FOLLOW_TIMEOUT_S = 3600.0
FOLLOW_POLL_S = 1.0


def add_upgrade_commands(ksub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from mbworker.cli.cluster_cmds import _spec

    upgrade = ksub.add_parser("upgrade", help="rolling upgrade of mbworker on the workers, one at a time")
    upgrade.add_argument("--version", required=True, help="an mbworker version the control plane holds wheels for")
    _spec(upgrade)
    upgrade.set_defaults(func=cmd_upgrade)

    wheels = ksub.add_parser("wheels", help="the mbworker wheels the control plane holds (what upgrades install)")
    wsub = wheels.add_subparsers(dest="wheels_command", required=True)
    push = wsub.add_parser("push", help="send a wheelhouse: mbworker's wheel and its dependencies' (*.whl)")
    push.add_argument(
        "directory", nargs="?", type=Path, help="default: the running mbworker's, built as provision does"
    )
    _spec(push)
    push.set_defaults(func=cmd_push)
    list_ = wsub.add_parser("list", help="versions held")
    _spec(list_)
    list_.set_defaults(func=cmd_list)


def wheel_tar(directory: Path) -> tuple[str, bytes]:
    """(mbworker's version, a tar of every wheel in `directory`)."""
    from mbworker.provision.errors import ProvisionError
    from mbworker.provision.wheels import read_wheelhouse

    try:
        house = read_wheelhouse(directory)
    except ProvisionError as exc:
        raise ConfigError(str(exc)) from None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for w in house.wheels:
            tar.add(directory / w.filename, arcname=w.filename)
    return house.version, buf.getvalue()


def cmd_push(args: argparse.Namespace) -> int:
    from mbworker.cli.cluster_cmds import _client

    directory = args.directory
    if directory is None:
        from mbworker.provision.secrets import default_state_dir
        from mbworker.provision.spec import load_spec
        from mbworker.provision.wheels import build_wheelhouse

        state_dir = args.state_dir or default_state_dir(args.cluster, load_spec(args.cluster).name)
        directory = build_wheelhouse(state_dir).directory
    version, tar = wheel_tar(directory)
    with _client(args) as client:
        result = client.call(
            "PUT", f"/wheels/{version}", content=tar, headers={"content-type": "application/x-tar"}, timeout=600.0
        )
    print(f"mbworker {result['version']}: {result['wheels']} wheels ({result['bytes'] // 1024} KiB) held")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from mbworker.cli.cluster_cmds import _client

    with _client(args) as client:
        rows = client.call("GET", "/wheels")
    print(f"{'VERSION':<16} {'WHEELS':>6} {'KIB':>8}")
    for r in rows:
        print(f"{r['version']:<16} {r['wheels']:>6} {r['bytes'] // 1024:>8}")
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Start the rollout (a refusal is an error here), then follow it until it ends, printing each step."""
    from mbworker.cli.cluster_cmds import _client

    with _client(args) as client:
        result = client.call("POST", "/upgrade", json={"version": args.version})
        for name in result["skipped"]:
            print(f"  {name}: already on {result['version']}", flush=True)
        shown = 0
        deadline = time.monotonic() + FOLLOW_TIMEOUT_S
        while True:
            for step in result["steps"][shown:]:
                print(f"  {step}", flush=True)
            shown = len(result["steps"])
            if result["state"] != "running":
                break
            if time.monotonic() > deadline:
                raise ConfigError(f"still running after {FOLLOW_TIMEOUT_S:.0f}s: follow it with `cluster audit`")
            time.sleep(FOLLOW_POLL_S)  # a CLI waiting on a remote job: polled
            result = client.call("GET", "/upgrade")
    for name in result["upgraded"]:
        print(f"✓ {name}: {result['version']}")
    if result.get("failed"):
        print(f"✗ stopped: {result['message']}", file=sys.stderr)
        return 1
    print(f"{len(result['upgraded'])} workers upgraded to {result['version']} in {result['seconds']}s")
    return 0
