"""rediss:// against a TLS-only redis-server with a self-signed certificate."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbworker.lib.redis import RedisConnectionError, open_pubsub, open_redis
from tests.redis_server import make_self_signed_certificate, start_redis_server


async def test_tls_verified_unverified_and_untrusted(tmp_path: Path) -> None:
    server = await start_redis_server(tmp_path, tls=True)
    try:
        async with open_redis(server.url) as r, open_pubsub(server.url) as ps:
            await ps.subscribe("secure")
            assert await r.publish("secure", "m") == 1
            assert await r.execute("CLIENT", "INFO")  # any command round-trips over TLS
        async with open_redis(f"rediss://127.0.0.1:{server.port}?ssl_cert_reqs=none") as r:
            assert await r.ping() == b"PONG"
        other_ca = await make_self_signed_certificate(tmp_path)
        with pytest.raises(RedisConnectionError, match="TLS") as info:
            async with open_redis(f"rediss://127.0.0.1:{server.port}?ssl_ca_certs={other_ca}"):
                pass
        assert isinstance(info.value.__cause__, OSError)  # ssl.SSLCertVerificationError
    finally:
        await server.stop()
