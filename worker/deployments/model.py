"""A function version's metadata and the store's errors: what every deployment store and the lifecycle share."""

from __future__ import annotations

import enum
import errno
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from mbworker.runtimes.limits import Limits
from mbworker.worker.deployments.manifest import (
    CacheSettings,
    NetSettings,
    Runtime,
    default_limits,
    for_older_readers,
)


class DeploymentStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    """Served now."""
    STAGED = "STAGED"
    """Stored, never activated."""
    INACTIVE = "INACTIVE"
    """Was active, superseded (a rollback target)."""
    REMOVED = "REMOVED"
    """Deleted: not served, files gone."""
    FAILED = "FAILED"
    """Failed to boot (see `boot_error`); never activated by rollback."""


class Deployment(BaseModel):
    """One version's metadata. Secrets are not here: only their names (`env_names`); see `secrets()`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slug: str
    version: int
    status: DeploymentStatus
    sha256: str
    size_bytes: int
    runtime: Runtime
    entrypoint: str
    import_map: str | None = None
    verify_jwt: bool = True
    static_patterns: list[str] = Field(default_factory=list)
    limits: Limits = Field(default_factory=default_limits)
    env_names: list[str] = Field(default_factory=list)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    net: NetSettings = Field(default_factory=NetSettings)
    source_entrypoint: str | None = None
    deno_config: str | None = None
    """Set when the npm packages ship as packages (manifest.py: `Manifest.deno_config`)."""
    created_at: int
    """Epoch milliseconds."""
    updated_at: int
    activated_at: int | None = None
    boot_error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.slug}@{self.version}"

    @model_serializer(mode="wrap")
    def _for_older_readers(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return for_older_readers(handler(self), self.limits)


DeploymentList = list[Deployment]
"""(An alias: inside the store classes `list` is a method name.)"""


class StoreError(Exception):
    """A store operation can't be done. `status` is the admin API's answer."""

    status: int = 400


class DeploymentNotFound(StoreError):
    status = 404


class VersionConflict(StoreError):
    """The version exists but can't be used that way (removed, failed, files pruned)."""

    status = 409


class StorageFull(StoreError):
    """The node's disk (or the data dir's quota) is full: nothing was stored. Free space, then deploy again."""

    status = 507


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class Attempt(BaseModel):
    """A deploy that stored a version which then failed to boot: recorded apart from the versions, whose number
    it gave back (the next deploy takes it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slug: str
    number: int
    """The version number it had while it was tried."""
    sha256: str
    at: int
    """Epoch milliseconds."""
    error: str


ATTEMPTS_KEPT = 20
"""Failed attempts remembered per function (the newest)."""
