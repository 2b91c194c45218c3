"""The provisioner's own errors. Third-party exceptions (hcloud, OS, HTTP) are mapped to these at the boundary."""

from __future__ import annotations


class ProvisionError(Exception):
    """Base class for every error the provisioner raises on purpose."""


class SpecError(ProvisionError):
    """The cluster spec is invalid; the message lists every problem, one per line."""


class ProviderError(ProvisionError):
    """A provider (cloud API or local processes) failed; the message names the step and the cause."""


class StepFailed(ProviderError):
    """One plan step failed during apply. Steps before it are done; re-running apply resumes from facts."""

    def __init__(self, step: str, cause: str) -> None:
        super().__init__(f"{step}: {cause}")
        self.step = step
        self.cause = cause


class DrainError(ProvisionError):
    """A node could not be drained (unreachable, refused, or not idle within the timeout)."""


class HealthError(ProviderError):
    """A node changed in place did not come back healthy in time: the apply stops before the next node."""
