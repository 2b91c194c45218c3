"""Project secrets: env every function sees, set apart from any deploy (`mbworker secrets set K=V`).

Pure helpers shared by both deployment stores (each keeps the values its own way: a 0600 file, a Redis hash):
validation by the same rules as a function's own env, and the digests `secrets list` shows instead of values.
A function's own env (its deploy's `--env-file`) wins over a project secret of the same name; the platform's
variables win over both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from mbworker.worker.deployments.manifest import MAX_SECRETS, secrets_problems
from mbworker.worker.deployments.model import StoreError

REVISION_FIELD = "\x00rev"
"""Where a store keeps the secrets' revision next to them (no secret name can hold a NUL): a store that has
none lost its data, one at a revision with no names was emptied on purpose."""


def digest(value: str) -> str:
    """What `secrets list` shows for a value: its sha256, as Supabase's CLI does."""
    return hashlib.sha256(value.encode()).hexdigest()


def validated(current: Mapping[str, str], values: Mapping[str, str]) -> dict[str, str]:
    """`current` with `values` set, or `StoreError` (400) listing every problem."""
    merged = {**current, **values}
    problems = secrets_problems(dict(values))
    if len(merged) > MAX_SECRETS:
        problems.append(f"{len(merged)} secrets, at most {MAX_SECRETS} are allowed")
    if problems:
        raise StoreError("; ".join(problems))
    return merged


def without(current: Mapping[str, str], names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """`current` without `names`, and which of them were there."""
    names = list(names)
    return {k: v for k, v in current.items() if k not in names}, [n for n in names if n in current]
