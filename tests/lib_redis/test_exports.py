"""Guard the package's public names."""

from __future__ import annotations

import mbworker.lib.redis as redis


def test_public_names() -> None:
    assert sorted(redis.__all__) == redis.__all__
    for name in redis.__all__:
        assert hasattr(redis, name), name
    assert {"open_redis", "open_pubsub", "serve_pubsub", "Redis", "RedisError", "Script"} <= set(redis.__all__)


def test_client_satisfies_protocol() -> None:
    client: type[redis.Redis] = redis.RedisClient  # mypy checks structural conformance
    assert client is redis.RedisClient
