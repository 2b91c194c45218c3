"""Version numbers as a user sees them through the CLI: a deploy that fails to boot does not use one up, and
`serve --deploy` (what `make run` does at every start) does not redeploy an unchanged function."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import require_binary
from tests.daemon.conftest import BUNDLED_DENO
from tests.daemon.fixtures import write_function
from tests.worker_process import run_worker


async def test_failed_deploys_keep_their_number_and_unchanged_functions_are_not_redeployed(tmp_path: Path) -> None:
    require_binary("deno", BUNDLED_DENO)
    fn = write_function(tmp_path / "src", "numbered", "Deno.serve(() => new Response('one'))")
    data = tmp_path / "data"
    async with run_worker(data, args=("--deploy", str(fn))) as w:
        (fn / "index.ts").write_text("throw new Error('broken at top level');\n")
        failed = await w.cli("deploy", str(fn))
        assert failed.returncode != 0
        assert b"BOOT_ERROR" in failed.stderr
        (fn / "index.ts").write_text("Deno.serve(() => new Response('two'))")
        assert b"numbered v2" in (await w.deploy(fn)).stdout  # not v3: the failed attempt gave 2 back
        versions = json.loads((await w.cli("functions", "list", "-o", "json", check=True)).stdout)
        assert [(v["slug"], v["version"], v["status"]) for v in versions] == [("numbered", 2, "ACTIVE")]

    # The next start deploys the same folder again: unchanged, so v2 stays and no v3 appears.
    async with run_worker(data, args=("--deploy", str(fn))) as w:
        await w.wait_for_output("numbered unchanged: v2 stays live")
        shown = (await w.cli("functions", "versions", "numbered", check=True)).stdout.decode().splitlines()
        assert [line.split()[:2] for line in shown[1:]] == [["2", "ACTIVE"], ["1", "INACTIVE"]]
