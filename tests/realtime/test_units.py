"""Pure pieces: limits, auth policy, the websockets internals the transport relies on, public names."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.trio.connection import Connection

import realtime
from realtime.auth import Authenticator
from realtime.errors import AuthError
from realtime.limits import RateLimit, WindowLimit
from realtime.settings import PrivateChannelRule
from realtime.transport import OutFrame
from tests.realtime.helpers import SECRET, make_jwt


def test_rate_limit_bucket() -> None:
    rl = RateLimit(3)
    assert [rl.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert rl.allow(0.34) is True  # one token back after 1/3 s
    assert rl.allow(0.34) is False


def test_window_limit() -> None:
    wl = WindowLimit(2, 30.0)
    assert [wl.allow(0.0), wl.allow(1.0), wl.allow(29.0)] == [True, True, False]
    assert wl.allow(30.0) is True  # the first call left the window


def test_apikey_and_token_verification() -> None:
    auth = Authenticator(SECRET, [])
    assert auth.verify_apikey(make_jwt("anon"))["role"] == "anon"
    assert auth.verify_apikey(make_jwt("service_role", exp_in=None))["role"] == "service_role"
    for bad in ("", "garbage", make_jwt("authenticated"), make_jwt("anon", secret="other" * 10),
                make_jwt("anon", exp_in=-10)):  # fmt: skip
        with pytest.raises(AuthError):
            auth.verify_apikey(bad)
    assert auth.verify_access_token(make_jwt("authenticated", sub="u"))["sub"] == "u"
    with pytest.raises(AuthError, match="expired"):
        auth.verify_access_token(make_jwt("authenticated", exp_in=-5))
    with pytest.raises(AuthError):
        auth.verify_access_token(make_jwt("authenticated", exp_in=None))  # exp is required


def test_private_channel_policy_denies_by_default() -> None:
    rules = [
        PrivateChannelRule(topic="user:{sub}:*"),
        PrivateChannelRule(topic="team-*", roles=[], claims={"team": "red"}),
    ]
    auth = Authenticator(SECRET, rules)
    user = {"role": "authenticated", "sub": "u1"}
    assert auth.may_access("anything", False, {"role": "anon"})  # public: any valid key
    assert auth.may_access("user:u1:inbox", True, user)
    assert not auth.may_access("user:u2:inbox", True, user)
    assert not auth.may_access("user:u1:inbox", True, {"role": "anon", "sub": "u1"})  # role not allowed
    assert not auth.may_access("user:{sub}:x", True, {"role": "authenticated"})  # missing claim never matches
    assert auth.may_access("team-1", True, {"role": "anon", "team": "red"})
    assert not auth.may_access("team-1", True, {"role": "anon", "team": "blue"})
    assert auth.may_access("x", True, {"role": "service_role"})
    assert not Authenticator(SECRET, [], service_role_bypass=False).may_access("x", True, {"role": "service_role"})
    assert not Authenticator(SECRET, []).may_access("x", True, user)


def test_websockets_internals() -> None:
    """What realtime/transport.py relies on. If this fails after a websockets upgrade, revisit the transport."""
    import inspect

    src = inspect.getsource(Connection.send_data)
    assert "async with self.send_lock" in src
    assert "self.stream.send_all" in src
    assert "def process_event" in inspect.getsource(Connection)
    # accept_stream replaces the finished handshake's request/response: only `request is None` may be read later
    from websockets.trio.server import ServerConnection

    event_src = inspect.getsource(ServerConnection.process_event)
    assert "if self.request is None" in event_src
    assert inspect.getsource(Connection).count("self.response") == 1  # only its initialisation
    proto = ServerProtocol()
    assert proto.state is State.CONNECTING
    # our pre-built frame equals what the protocol itself would write for the message (no extensions)
    proto.state = State.OPEN
    proto.send_text(b'["x"]')
    assert proto.data_to_send() == [OutFrame('["x"]').wire]
    proto.send_binary(b"\x04ab")
    assert proto.data_to_send() == [OutFrame(b"\x04ab").wire]
    assert Frame(Opcode.TEXT, b"a").serialize(mask=False) == b"\x81\x01a"


def test_public_names() -> None:
    assert set(realtime.__all__) == {
        "PrivateChannelRule",
        "RealtimeError",
        "RealtimeService",
        "RealtimeSettings",
        "RealtimeStatistics",
        "open_realtime",
    }
    for name in realtime.__all__:
        assert getattr(realtime, name)
