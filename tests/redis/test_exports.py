"""Guard the package's public names."""

from __future__ import annotations

from mbworker import worker


def test_public_names() -> None:
    assert sorted(worker.redis.__all__) == worker.redis.__all__
    for name in worker.redis.__all__:
        assert hasattr(worker.redis, name), name
    assert {"open_redis", "open_pubsub", "serve_pubsub", "Redis", "RedisError", "Script"} <= set(worker.redis.__all__)


def test_client_satisfies_protocol() -> None:
    client: type[worker.redis.Redis] = worker.redis.RedisClient  # mypy checks structural conformance
    assert client is worker.redis.RedisClient
