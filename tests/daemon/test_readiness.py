"""worker.readiness: every check for /ready; the node's own ones only for /ready/local (the cluster's left out)."""

from __future__ import annotations

from mbworker.worker.readiness import Check, Readiness


async def test_local_readiness_leaves_out_the_checks_of_what_the_cluster_shares() -> None:
    asked: list[str] = []

    def failing(name: str, reason: str) -> Check:
        async def check() -> str | None:
            asked.append(name)
            return reason

        return check

    readiness = Readiness()
    readiness.add("redis", failing("redis", "unreachable"), cluster=True)
    readiness.add("runtime deno", failing("runtime deno", "missing"))
    assert await readiness.check() == {"redis": "unreachable", "runtime deno": "missing"}
    asked.clear()
    assert await readiness.check(local=True) == {"runtime deno": "missing"}
    assert asked == ["runtime deno"]  # not even asked: a Redis that hangs does not slow the local answer
