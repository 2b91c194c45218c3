"""Deployments: from a function folder on a developer's disk to an immutable unpacked version on the worker.

- `manifest`: function.toml / config.toml / env-file settings and the `mbworker.json` bundle manifest (pure).
- `gather`: CLI side: discover functions, gather one function's files, `deno bundle` npm graphs, pack.
- `archive`: the tar.gz format: reproducible packing and the defensive unpacker (server side).
- `model`: a version's metadata (`Deployment`) and the store errors.
- `lifecycle`: activate, rollback, delete, mark failed, prune: pure, shared by both stores.
- `store`: `DeploymentStore` protocol and `LocalDeploymentStore` (versions, activate, rollback, watch).
"""

from mbworker.worker.deployments.archive import BundleRejected, BundleTooLarge, PackedBundle, unpack_bundle
from mbworker.worker.deployments.changes import StoreChange
from mbworker.worker.deployments.gather import (
    BundleSpec,
    DiscoveredFunction,
    GatherError,
    discover_functions,
    gather_function,
    gather_tree,
    pack_bundle,
)
from mbworker.worker.deployments.manifest import (
    CacheSettings,
    FunctionToml,
    Manifest,
    ManifestError,
    parse_env_file,
    parse_env_text,
)
from mbworker.worker.deployments.store import (
    Deployment,
    DeploymentNotFound,
    DeploymentStatus,
    DeploymentStore,
    LocalDeploymentStore,
    StoreError,
    StoreStatistics,
    UnpackLimits,
    VersionConflict,
    function_version,
)

__all__ = [
    "BundleRejected",
    "BundleSpec",
    "BundleTooLarge",
    "CacheSettings",
    "Deployment",
    "DeploymentNotFound",
    "DeploymentStatus",
    "DeploymentStore",
    "DiscoveredFunction",
    "FunctionToml",
    "GatherError",
    "LocalDeploymentStore",
    "Manifest",
    "ManifestError",
    "PackedBundle",
    "StoreChange",
    "StoreError",
    "StoreStatistics",
    "UnpackLimits",
    "VersionConflict",
    "discover_functions",
    "function_version",
    "gather_function",
    "gather_tree",
    "pack_bundle",
    "parse_env_file",
    "parse_env_text",
    "unpack_bundle",
]
