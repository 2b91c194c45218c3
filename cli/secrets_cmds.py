"""`mbworker secrets set K=V … | list | unset K …`: project secrets, seen by every function as env from its next
process on, kept across deploys. Through a node's admin API (`--url/--token`), or the cluster's control plane
(`--cluster cluster.toml`); in a cluster they live in the shared store, so every node's functions see them.
`list` shows names and sha256 digests, never values."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mbworker.worker.errors import ConfigError


def _admin_options(p: argparse.ArgumentParser) -> None:
    """A node's admin API (in a cluster any node will do: the secrets live in the shared store)."""
    p.add_argument("--url", help="admin API URL (env MBWORKER_ADMIN_URL; default http://127.0.0.1:8001)")
    p.add_argument("--token", help="admin token (env MBWORKER_ADMIN_TOKEN; default the local data dir's)")
    p.add_argument("--cluster", type=Path, metavar="SPEC", help="the whole cluster, through its control plane")


def add_secrets_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    secrets = sub.add_parser("secrets", help="project secrets: env every function sees, kept across deploys")
    ssub = secrets.add_subparsers(dest="secrets_command", required=True)
    set_ = ssub.add_parser("set", help="set secrets: NAME=VALUE … and/or --env-file")
    set_.add_argument("pairs", nargs="*", metavar="NAME=VALUE")
    set_.add_argument("--env-file", type=Path, help="dotenv file whose variables to set")
    _admin_options(set_)
    set_.set_defaults(func=cmd_set)
    list_ = ssub.add_parser("list", help="names and sha256 digests (never values)")
    list_.add_argument("-o", "--output", choices=("table", "json"), default="table")
    _admin_options(list_)
    list_.set_defaults(func=cmd_list)
    unset = ssub.add_parser("unset", help="remove secrets by name")
    unset.add_argument("names", nargs="+", metavar="NAME")
    _admin_options(unset)
    unset.set_defaults(func=cmd_unset)


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"{pair!r}: expected NAME=VALUE")
        values[name] = value
    return values


def cmd_set(args: argparse.Namespace) -> int:
    from mbworker.cli.control_client import function_client
    from mbworker.worker.deployments.manifest import ManifestError, parse_env_file

    values: dict[str, str] = {}
    if args.env_file is not None:
        try:
            values.update(parse_env_file(args.env_file))
        except (ManifestError, OSError) as exc:
            raise ConfigError(f"{args.env_file}: {exc}") from exc
    values.update(parse_pairs(args.pairs))
    if not values:
        raise ConfigError("nothing to set: give NAME=VALUE pairs or --env-file")
    with function_client(args) as client:
        result = client.call("POST", "/secrets", json={"secrets": values})
    print(f"set {', '.join(result['set'])}: functions see them from their next process on")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from mbworker.cli.control_client import function_client

    with function_client(args) as client:
        rows = client.call("GET", "/secrets")
    if args.output == "json":
        print(json.dumps(rows, indent=2))
        return 0
    width = max([len("NAME"), *(len(r["name"]) for r in rows)])
    print(f"{'NAME':<{width}}  DIGEST")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['digest']}")
    return 0


def cmd_unset(args: argparse.Namespace) -> int:
    from mbworker.cli.control_client import function_client

    with function_client(args) as client:
        result = client.call("POST", "/secrets/unset", json={"names": args.names})
    missing = [n for n in args.names if n not in result["unset"]]
    print(f"unset {', '.join(result['unset']) or 'nothing'}" + (f" (not set: {', '.join(missing)})" if missing else ""))
    return 0
