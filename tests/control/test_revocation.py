"""A revoked session: the functions' JWT gate refuses its tokens (even remembered ones) and realtime ends the
channels joined with them (`system` error, then `phx_close`) and refuses new joins."""

from __future__ import annotations

import time

import pytest
import trio

from mbworker.lib.jwt import JwtVerifier
from mbworker.lib.redis import open_pubsub_bus, open_redis
from mbworker.lib.revocation import MemoryRevocationList, open_redis_revocations
from mbworker.worker.jwt_gate import JwtGate, JwtRejected
from tests.realtime.helpers import SECRET, make_jwt, phx_client, running_realtime
from tests.redis_server import RedisServer

REVOKED = "InvalidJWTToken: Session has been revoked"  # Supabase Realtime's wording (lib/jwt.py)


async def test_the_jwt_gate_refuses_a_revoked_session_even_when_it_remembers_the_token() -> None:
    revocations = MemoryRevocationList()
    gate = JwtGate(JwtVerifier(SECRET, revocations=revocations))
    token = make_jwt("authenticated", session_id="s-1").encode()
    other = make_jwt("authenticated", session_id="s-2").encode()
    no_session = make_jwt("anon").encode()
    for t in (token, other, no_session):
        gate.check(b"Bearer " + t)  # verified and remembered
    await revocations.revoke("s-1", time.time() + 60)
    with pytest.raises(JwtRejected) as refused:
        gate.check(b"Bearer " + token)
    assert refused.value.code == "UNAUTHORIZED_SESSION_REVOKED"
    gate.check(b"Bearer " + other)
    gate.check(b"Bearer " + no_session)


async def test_a_revocation_ends_once_the_tokens_cannot_be_valid_any_more() -> None:
    now = [1000.0]
    revocations = MemoryRevocationList(clock=lambda: now[0])
    await revocations.revoke("s-1", 1010.0)
    await revocations.revoke("s-old", 999.0)  # already past: nothing to deny
    assert revocations.is_revoked("s-1")
    assert not revocations.is_revoked("s-old")
    assert not revocations.is_revoked(None)
    now[0] = 1010.0
    assert not revocations.is_revoked("s-1")
    assert await revocations.listed() == {}


async def test_realtime_ends_the_channels_of_a_revoked_session_and_refuses_new_joins() -> None:
    revocations = MemoryRevocationList()
    user = make_jwt("authenticated", session_id="s-1")
    async with (
        running_realtime(verifier=JwtVerifier(SECRET, revocations=revocations)) as (service, port),
        phx_client(port) as phx,
        phx_client(port) as bystander,
    ):
        revocations.add_listener(service.end_session)  # as the daemon wires it
        _, reply = await phx.join("realtime:room", access_token=user)
        assert reply[4]["status"] == "ok"
        _, reply = await bystander.join("realtime:room")
        assert reply[4]["status"] == "ok"
        await revocations.revoke("s-1", time.time() + 60)
        system = await phx.expect("system", "realtime:room", timeout=1)
        assert system[4]["status"] == "error"
        assert system[4]["message"] == REVOKED
        await phx.expect("phx_close", "realtime:room", timeout=1)
        _, reply = await phx.join("realtime:other", access_token=user)
        assert reply[4] == {"status": "error", "response": {"reason": REVOKED}}
        # The bystander's channel goes on: its next reply comes with no `system` before it (the revocation's
        # frames were all queued when revoke() returned).
        ref = bystander.next_ref()
        await bystander.send(None, ref, "phoenix", "heartbeat", {})
        await bystander.reply_to(ref)
        assert not [m for m in bystander.seen if isinstance(m, tuple) and m[3] == "system"]


async def test_a_node_on_the_cluster_bus_catches_up_after_a_pubsub_gap(redis_server: RedisServer) -> None:
    async with (
        open_redis(redis_server.url) as redis,
        open_pubsub_bus(redis.settings) as bus,
        open_redis_revocations(redis, bus=bus) as node,
    ):
        heard: dict[str, trio.Event] = {"s-live": trio.Event(), "s-gap": trio.Event()}

        async def listener(session_id: str) -> None:
            heard[session_id].set()

        node.add_listener(listener)
        await bus.pubsub.wait_connected(5)
        async with open_redis_revocations(redis) as control:  # the control plane's own connection
            await control.revoke("s-live", time.time() + 60)
        with trio.fail_after(5):
            await heard["s-live"].wait()
        # Revoked while the node's pub/sub was away (stored, the announcement lost): the reload after the bus
        # resubscribes brings it.
        await redis.zadd(node.key, {"s-gap": time.time() + 60})
        await redis.execute("CLIENT", "KILL", "TYPE", "pubsub")
        with trio.fail_after(10):
            await heard["s-gap"].wait()
        assert node.is_revoked("s-gap")
