"""The cluster provisioner: spec → facts → plan → apply, for Hetzner Cloud (hcloud) and for one machine.

Must not import the daemon's runtime code (worker/, runtimes/, realtime/): it only starts `mbworker serve`
processes (local) or writes cloud-init that installs them (Hetzner).
"""

from __future__ import annotations

from .cli import add_local_commands, add_provision_commands
from .errors import DrainError, ProviderError, ProvisionError, SpecError, StepFailed
from .facts import Facts
from .hetzner import HetznerProvider
from .local import LocalProvider
from .nodeops import NodeOps, NodeRef, RemoteNodeOps
from .plan import Plan, Step
from .planner import plan_cluster, plan_destroy
from .provider import ApplyOptions, ApplyReport, Provider
from .secrets import ClusterSecrets, load_or_create_secrets
from .spec import ClusterSpec, load_spec, parse_spec

__all__ = [
    "ApplyOptions",
    "ApplyReport",
    "ClusterSecrets",
    "ClusterSpec",
    "DrainError",
    "Facts",
    "HetznerProvider",
    "LocalProvider",
    "NodeOps",
    "NodeRef",
    "Plan",
    "Provider",
    "ProviderError",
    "ProvisionError",
    "RemoteNodeOps",
    "SpecError",
    "Step",
    "StepFailed",
    "add_local_commands",
    "add_provision_commands",
    "load_or_create_secrets",
    "load_spec",
    "parse_spec",
    "plan_cluster",
    "plan_destroy",
]
