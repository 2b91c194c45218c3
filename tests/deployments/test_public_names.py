"""The package's public names: what the CLI and admin API import."""

from __future__ import annotations

import mbworker.worker.deployments as deployments


def test_all_names_exist_and_are_sorted() -> None:
    assert deployments.__all__ == sorted(deployments.__all__)
    for name in deployments.__all__:
        assert getattr(deployments, name) is not None


def test_key_entry_points_are_exported() -> None:
    expected = {
        "discover_functions", "gather_function", "gather_tree", "pack_bundle", "unpack_bundle",
        "LocalDeploymentStore", "DeploymentStore", "BundleRejected", "BundleTooLarge", "GatherError",
        "ManifestError", "StoreError", "function_version",
    }  # fmt: skip
    assert expected <= set(deployments.__all__)
