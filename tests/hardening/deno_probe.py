"""Run a tiny script in the real deno binary with the exact network flags a function gets (no function, no worker)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import trio

from tests.conftest import require_binary

DENO = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "deno")

QUERY = """
const out = {};
for (const host of JSON.parse(Deno.args[0])) {
  try { out[host] = (await Deno.permissions.query({ name: "net", host })).state; }
  catch (e) { out[host] = "error: " + e.message; }
}
console.log(JSON.stringify(out));
"""

CONNECT = """
const out = {};
for (const url of JSON.parse(Deno.args[0])) {
  try { const r = await fetch(url); await r.body?.cancel(); out[url] = "connected"; }
  catch (e) {
    const text = `${e.name}: ${e.message} ${e.cause?.message ?? ""}`;
    out[url] = text.includes("Requires net access") ? "denied" : "failed: " + text.slice(0, 200);
  }
}
console.log(JSON.stringify(out));
"""


def deno_bin() -> str:
    return require_binary("deno", DENO)


async def run_script(tmp: Path, script: str, flags: Sequence[str], args: Sequence[str]) -> dict[str, str]:
    """Run `script` with `flags` (and --no-prompt), return the JSON object it prints."""
    path = tmp / "probe.ts"
    path.write_text(script)
    with trio.fail_after(60):
        proc = await trio.run_process(
            [deno_bin(), "run", "--no-prompt", "--no-config", *flags, str(path), json.dumps(list(args))],
            capture_stdout=True,
            capture_stderr=True,
            env={"NO_COLOR": "1", "DENO_DIR": str(tmp / "deno_dir"), "DENO_NO_UPDATE_CHECK": "1"},
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    result: dict[str, str] = json.loads(proc.stdout)
    return result
