"""AUTH with a password and with an ACL user, SELECT of a database, and a clear error on bad credentials."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbworker.lib.redis import RedisAuthError, RedisConnectionError, RedisResponseError, open_pubsub, open_redis
from tests.redis_server import start_redis_server


async def test_password_and_acl_user(tmp_path: Path) -> None:
    server = await start_redis_server(tmp_path, password="s3cret")
    try:
        port = server.port
        async with open_redis(f"redis://:s3cret@127.0.0.1:{port}/2") as admin:
            assert await admin.set("in-db-2", "x") is True
            assert b" db=2 " in await admin.execute("CLIENT", "INFO")
            await admin.execute("ACL", "SETUSER", "app", "on", ">app%pw", "~app:*", "&*", "+@all")
        async with open_redis(f"redis://app:app%25pw@127.0.0.1:{port}") as app:
            assert await app.set("app:k", 1) is True
            with pytest.raises(RedisResponseError, match="NOPERM"):
                await app.set("other", 1)
            assert await app.execute("ACL", "WHOAMI") == b"app"
        async with open_pubsub(f"redis://app:app%25pw@127.0.0.1:{port}") as ps:
            await ps.subscribe("app:events")  # confirmed, so the pub/sub connection authenticated too
    finally:
        await server.stop()


@pytest.mark.parametrize("url_auth", ["wrong@", ":wrong@", "app:wrong@", ""])
async def test_bad_credentials_are_a_clear_auth_error(tmp_path: Path, url_auth: str) -> None:
    server = await start_redis_server(tmp_path, password="s3cret")
    try:
        url = f"redis://{url_auth}127.0.0.1:{server.port}"
        if not url_auth:
            # No password at all: the handshake succeeds, the first command says NOAUTH.
            async with open_redis(url) as r:
                with pytest.raises(RedisResponseError, match="NOAUTH"):
                    await r.ping()
            return
        with pytest.raises(RedisAuthError) as info:
            async with open_redis(url):
                pass
        assert isinstance(info.value, RedisConnectionError)
        assert "WRONGPASS" in str(info.value)
        assert f"127.0.0.1:{server.port}" in str(info.value)
    finally:
        await server.stop()
