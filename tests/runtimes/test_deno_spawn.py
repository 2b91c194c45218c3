"""The spawner's parent-death signal, with setpriv (vfork, the fast path) and with the `preexec_fn` fallback."""

from __future__ import annotations

import concurrent.futures
import signal
import sys

import pytest
import trio

from mbworker.runtimes.deno import spawn
from mbworker.runtimes.deno.spawn import Spawner
from tests.conftest import require_binary

# PR_GET_PDEATHSIG (2): what the child was given, as the child sees it after exec.
PRINT_PDEATHSIG = (
    "import ctypes; v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)"
)


async def _child_pdeathsig(spawner: Spawner) -> int:
    child = await spawner.spawn([sys.executable, "-c", PRINT_PDEATHSIG], {})
    try:
        out = b""
        with trio.fail_after(30):
            while chunk := await child.stdout.receive_some(100):
                out += chunk
            await child.wait()
        return int(out)
    finally:
        child.close_pidfd()
        await child.aclose_streams()


@pytest.mark.parametrize("how", ["setpriv", "preexec_fn"])
async def test_children_get_sigkill_as_parent_death_signal(how: str) -> None:
    prefix = await trio.to_thread.run_sync(spawn._setpriv_prefix)
    if how == "setpriv" and not prefix:
        require_binary("setpriv")  # util-linux: fails under CI when missing, skips elsewhere (preexec_fn fallback)
    spawner = Spawner()
    try:
        if how == "preexec_fn":  # what a machine without setpriv gets
            spawner._prefix = concurrent.futures.Future()
            spawner._prefix.set_result([])
        assert await _child_pdeathsig(spawner) == signal.SIGKILL
    finally:
        spawner.shutdown()
