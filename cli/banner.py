"""What `mbworker serve` (and `functions serve`) print once the worker is up: addresses, keys, next steps.

Keys go to a terminal only: under systemd stdout is the journal, which is no place for the service_role key.
Elsewhere the banner says where the keys are kept instead, and the suggested curl line reads the key from there.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any, TextIO

from mbworker.cli.output import program
from mbworker.worker.keys import admin_token_file, secrets_dir


def admin_token_source(settings: Any) -> str:
    """Where the admin token really comes from: the environment, the config file, or the data dir's file."""
    if settings.admin_token is not None:
        if os.environ.get("MBWORKER_ADMIN_TOKEN"):
            return "from MBWORKER_ADMIN_TOKEN"
        return "from the configuration (admin_token)"
    return f"in {admin_token_file(Path(settings.data_dir).resolve())} (mode 0600)"


def banner_lines(handle: Any, *, tty: bool) -> list[str]:
    """The banner for a running worker (the daemon's `Node`); `tty` decides whether keys are printed."""
    keys = handle.keys
    slugs: list[str] = handle.deployer.table.slugs()
    keys_file = secrets_dir(Path(handle.settings.data_dir).resolve()) / "keys.env"
    lines = [
        "mbworker is serving",
        f"  Functions URL : {handle.public_url}/functions/v1/<name>",
        f"  Realtime URL  : {handle.public_url.replace('http', 'ws', 1)}/realtime/v1",
        f"  Health        : {handle.public_url}/health",
        f"  Admin API     : {handle.admin_url}/admin/v1",
        f"  Data dir      : {Path(handle.settings.data_dir).resolve()}",
    ]
    if tty:
        lines += [f"  anon key      : {keys.anon_key}", f"  service_role key: {keys.service_role_key}"]
    else:
        lines.append(f"  Keys          : in {keys_file} (ANON_KEY, SERVICE_ROLE_KEY; mode 0600)")
    lines += [
        f"  Admin token   : {admin_token_source(handle.settings)}",
        f"  Deployed      : {', '.join(slugs) if slugs else '(none)'}",
    ]
    if "realtime-demo" in slugs:
        lines.append(f"  Realtime demo : {handle.public_url}/functions/v1/realtime-demo  (open it in two windows)")
    lines.append("")
    target = "hello" if "hello" in slugs else (slugs[0] if slugs else None)
    if target is not None:
        if tty:
            header = shlex.quote(f"Authorization: Bearer {keys.anon_key}")
        else:  # read from the keys file when pasted, so the key itself is never printed here
            header = f"\"Authorization: Bearer $(sed -n 's/^ANON_KEY=//p' {shlex.quote(str(keys_file))})\""
        query = "?name=Ada" if target == "hello" else ""
        url = shlex.quote(f"{handle.public_url}/functions/v1/{target}{query}")
        lines.append(f"  Try     : curl -H {header} {url}")
    else:
        lines.append(f"  Start   : {program()} functions new hello   (then {program()} dev)")
    lines += [f"  Deploy  : {program()} deploy path/to/function   (or a supabase/functions tree)", ""]
    return lines


def print_banner(handle: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    print("\n".join(banner_lines(handle, tty=out.isatty())), file=out, flush=True)
