"""The cluster package's errors: callers catch these, never `worker.redis` or trio types.

Deployment-store failures are `StoreError`s (the admin API maps their `status`); see `ClusterStoreUnavailable`.
"""

from __future__ import annotations

from mbworker.worker.deployments.store import StoreError


class ClusterError(Exception):
    """Base of the errors raised by worker.cluster (except the deployment store's, which are `StoreError`s)."""


class LockError(ClusterError):
    """A distributed lock could not be taken or kept."""


class LockTimeout(LockError):
    """Another owner held the lock for the whole `timeout`."""


class LockUnavailable(LockError):
    """The lock service (Redis) can't be reached: nobody can say who holds the lock, so it is not taken."""


class LockLost(LockError):
    """The lock expired or was taken over while held (extension failed): the `async with` body was cancelled."""


class RateLimited(ClusterError):
    """Rejected by a rate limit. `retry_after_s` says when one more request would be admitted.

    The HTTP answer is 429 with `Retry-After` (`status`, `code` form the error contract)."""

    status = 429
    code = "RATE_LIMITED"

    def __init__(self, key: str, retry_after_s: float) -> None:
        self.key = key
        self.retry_after_s = retry_after_s
        super().__init__(f"rate limit for {key!r} exceeded; retry after {retry_after_s:.3f}s")


class ClusterStoreUnavailable(StoreError):
    """The Redis deployment store can't reach Redis (or its lock): the operation was not done. Retry later."""

    status = 503
