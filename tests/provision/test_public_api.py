"""The provisioner's public names, and its independence from the daemon's runtime code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mbworker import provision

EXPECTED = {
    "ApplyOptions", "ApplyReport", "ClusterSecrets", "ClusterSpec", "DrainError", "Facts", "HetznerProvider",
    "LocalProvider", "NodeOps", "NodeRef", "Plan", "Provider", "ProviderError", "ProvisionError", "RemoteNodeOps",
    "SpecError", "Step", "StepFailed", "add_local_commands", "add_provision_commands", "load_or_create_secrets",
    "load_spec", "parse_spec", "plan_cluster", "plan_destroy",
}  # fmt: skip


def test_public_names() -> None:
    assert set(provision.__all__) == EXPECTED
    for name in provision.__all__:
        assert getattr(provision, name) is not None


def test_does_not_import_the_daemon() -> None:
    code = (
        "import sys, mbworker.provision, mbworker.provision.cli, mbworker.provision.local_gateway; "
        "bad = [m for m in sys.modules if m.split('.')[:2] in (['mbworker', 'worker'], ['mbworker', 'runtimes'], "
        "['mbworker', 'realtime'])]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
