"""`mbworker functions list` and `functions versions NAME`: tables with human times, or JSON with `-o json`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mbworker.cli.output import human_time, print_table


def add_listing_commands(fsub: argparse._SubParsersAction, admin_options: Any) -> None:  # type: ignore[type-arg]
    p = fsub.add_parser("list", help="deployed functions")
    _output_option(p)
    admin_options(p)
    p.set_defaults(func=cmd_list)
    p = fsub.add_parser("versions", help="every stored version of a function, newest first")
    p.add_argument("slug")
    _output_option(p)
    admin_options(p)
    p.set_defaults(func=cmd_versions)


def _output_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="table (default) or json")


def _client(args: argparse.Namespace) -> Any:
    from mbworker.cli.control_client import function_client  # --cluster: the control plane

    return function_client(args)


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows: list[dict[str, Any]] = client.list_functions()
    if args.output == "json":
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no functions deployed (mbworker deploy PATH)")
        return 0
    print_table(
        ["NAME", "VERSION", "STATUS", "RUNTIME", "VERIFY_JWT", "UPDATED"],
        [
            [
                r["slug"],
                r["version"],
                r["status"],
                r.get("runtime", ""),
                r.get("verify_jwt"),
                human_time(r.get("updated_at")),
            ]
            for r in rows
        ],
    )
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows: list[dict[str, Any]] = client.versions(args.slug)
    if args.output == "json":
        print(json.dumps(rows, indent=2))
        return 0
    rows = sorted(rows, key=lambda r: -int(r["version"]))
    print_table(
        ["VERSION", "STATUS", "SIZE", "SHA256", "CREATED", "NOTE"],
        [
            [
                r["version"],
                r["status"],
                _size(int(r.get("size_bytes", 0))),
                str(r.get("sha256", ""))[:12],
                human_time(r.get("created_at")),
                _first_line(r.get("boot_error")),
            ]
            for r in rows
        ],
    )
    return 0


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


def _first_line(text: str | None) -> str:
    if not text:
        return ""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= 60 else line[:59] + "…"
