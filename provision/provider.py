"""The Provider seam: plan against what exists, apply a plan. HetznerProvider and LocalProvider implement it.

A provider is built for one spec (the desired state); `scale` builds a new spec and a new provider. Apply is
synchronous on purpose: it is a CLI doing one blocking API call after another, and nothing else shares the
thread (the daemon's "never block the loop" rule is about an event loop this process does not run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .plan import Plan

Progress = Callable[[str], None]


def no_progress(_line: str) -> None:
    pass


@dataclass
class ApplyReport:
    """What apply did. `left_in_place` lists nodes that could not be drained and were kept (name, reason)."""

    done: list[str] = field(default_factory=list)
    left_in_place: list[tuple[str, str]] = field(default_factory=list)
    forced: list[tuple[str, str]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.left_in_place


@dataclass(frozen=True)
class ApplyOptions:
    #: Delete nodes even when their drain failed.
    force: bool = False
    drain_timeout: float = 120.0
    #: How long a node changed in place (type change) may take to be back and healthy before the apply stops.
    health_timeout: float = 600.0


class Provider(Protocol):
    name: str

    def plan(self, *, drain: bool = True) -> Plan:
        """Read facts and diff them against the provider's spec."""
        ...

    def destroy_plan(self) -> Plan:
        """A plan deleting everything this cluster owns."""
        ...

    def apply(self, plan: Plan, options: ApplyOptions, progress: Progress = no_progress) -> ApplyReport:
        """Execute `plan` step by step; a failure raises StepFailed and a re-plan resumes from what exists."""
        ...
