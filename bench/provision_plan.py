"""Provisioner bench: plan/apply a 1 system + 20 proxy + 50 worker + 5 state cluster against the fake Hetzner API.

The reference is the issue's budget: planning takes <= 3 s, and apply sends no more mutating requests than the
plan has steps (every create/attach/route step is exactly one mutating call; waits are GETs on actions).
One run, loopback only. Run: `.venv/bin/python bench/provision_plan.py`
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mbworker.provision.hetzner import HetznerProvider
from mbworker.provision.provider import ApplyOptions
from mbworker.provision.secrets import ClusterSecrets
from tests.provision.conftest import FakeNodeOps, make_spec
from tests.provision.fake_hcloud import FakeHcloud

PLAN_BUDGET_S = 3.0


def main() -> None:
    spec = make_spec(
        proxy={"type": "cx23", "count": 20}, worker={"type": "cx33", "count": 50}, state={"type": "ccx13", "count": 5}
    )
    secrets = ClusterSecrets.generate()
    rows: list[tuple[str, float, float, str]] = []
    with FakeHcloud() as fake:

        def provider() -> HetznerProvider:
            return HetznerProvider(
                spec, secrets, token="test-token", endpoint=fake.endpoint, poll_interval=0, node_ops=FakeNodeOps()
            )

        p = provider()
        t0 = time.perf_counter()
        plan = p.plan()
        plan_empty_s = time.perf_counter() - t0
        fake.clear_log()
        t0 = time.perf_counter()
        p.apply(plan, ApplyOptions())
        apply_s = time.perf_counter() - t0
        mutating = len(fake.mutations())
        total = len(fake.requests)
        fake.clear_log()
        t0 = time.perf_counter()
        replan = provider().plan()
        plan_full_s = time.perf_counter() - t0
        replan_requests = len(fake.requests)
        assert replan.empty
        provider().apply(replan, ApplyOptions())
        reapply_mutating = len(fake.mutations())

    rows.append(("plan from empty (s)", plan_empty_s, PLAN_BUDGET_S, "budget"))
    rows.append(("plan, 76 nodes exist (s)", plan_full_s, PLAN_BUDGET_S, "budget"))
    rows.append(("apply: mutating requests", mutating, len(plan.changes), "plan steps"))
    rows.append(("re-apply: mutating requests", reapply_mutating, 0, "must be 0"))
    print(f"cluster: 1 system + 20 proxy + 50 worker + 5 state; apply took {apply_s:.2f}s, {total} requests in all;")
    print(f"re-plan read the API in {replan_requests} GET requests")
    print(f"{'measure':<30} {'mbworker':>10} {'reference':>10} {'ratio':>7}  reference is")
    for name, value, ref, what in rows:
        ratio = f"{value / ref:.2f}" if ref else ("ok" if value == 0 else "FAIL")
        print(f"{name:<30} {value:>10.3g} {ref:>10.3g} {ratio:>7}  {what}")


if __name__ == "__main__":
    main()
