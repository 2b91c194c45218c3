"""A full disk answers a deploy with a clear 507 and leaves nothing behind; freed space, the deploy goes through."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.conftest import require_binary
from tests.daemon.conftest import BUNDLED_DENO
from tests.daemon.fixtures import write_function
from tests.worker_process import run_worker

# The node's deployments live on a 2 MiB tmpfs of their own, mounted in a private mount namespace (a user
# namespace: no privileges needed), nearly filled before the worker starts.
MOUNT_SMALL_DISK = (
    'mkdir -p "$0" && mount -t tmpfs -o size=2m tmpfs "$0" && head -c 1900k /dev/zero > "$0/.filler" && exec "$@"'
)


async def test_a_full_disk_answers_deploys_with_507(tmp_path: Path) -> None:
    require_binary("deno", BUNDLED_DENO)
    unshare = require_binary("unshare")
    data = tmp_path / "data"
    deployments = data / "deployments"
    wrap = (unshare, "--user", "--map-root-user", "--mount", "sh", "-c", MOUNT_SMALL_DISK, str(deployments))
    padding = os.urandom(200_000).hex()  # more than the disk has left, compressed or not
    big = write_function(tmp_path / "src", "big", f"const pad = '{padding}';\nDeno.serve(() => new Response('big'));\n")

    async with run_worker(data, wrap=wrap) as w:
        result = await w.cli("deploy", str(big))
        assert result.returncode != 0
        err = result.stdout.decode() + result.stderr.decode()
        assert "507" in err or "INSUFFICIENT_STORAGE" in err, err
        assert "no space left" in err, err
        # Seen from inside the worker's mount namespace: nothing half-written was kept.
        inside = Path(f"/proc/{w.process.pid}/root") / deployments.relative_to("/")
        assert sorted(p.name for p in inside.iterdir()) in ([".filler"], [".filler", "big"])
        assert not [p for p in inside.glob("big/v*")]

        (inside / ".filler").unlink()
        await w.deploy(big)
    shutil.rmtree(data, ignore_errors=True)
