"""Pure pieces: limits, auth policy, the websockets internals the transport relies on, public names."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from mbworker import realtime
from mbworker.lib.jwt import JwtVerifier
from mbworker.lib.websocket import OutFrame
from mbworker.realtime.auth import Authenticator
from mbworker.realtime.errors import AuthError
from mbworker.realtime.limits import RateLimit, WindowLimit
from mbworker.realtime.settings import PrivateChannelRule
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
    auth = Authenticator(JwtVerifier(SECRET), [])
    assert auth.verify_apikey(make_jwt("anon"))["role"] == "anon"
    assert auth.verify_apikey(make_jwt("service_role"))["role"] == "service_role"
    for bad in ("", "garbage", make_jwt("authenticated"), make_jwt("anon", secret="other" * 10),
                make_jwt("anon", exp_in=-10), make_jwt("service_role", exp_in=None)):  # fmt: skip
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
    auth = Authenticator(JwtVerifier(SECRET), rules)
    user = {"role": "authenticated", "sub": "u1"}
    assert auth.may_access("anything", False, {"role": "anon"})  # public: any valid key
    assert auth.may_access("user:u1:inbox", True, user)
    assert not auth.may_access("user:u2:inbox", True, user)
    assert not auth.may_access("user:u1:inbox", True, {"role": "anon", "sub": "u1"})  # role not allowed
    assert not auth.may_access("user:{sub}:x", True, {"role": "authenticated"})  # missing claim never matches
    assert auth.may_access("team-1", True, {"role": "anon", "team": "red"})
    assert not auth.may_access("team-1", True, {"role": "anon", "team": "blue"})
    assert auth.may_access("x", True, {"role": "service_role"})
    assert not Authenticator(JwtVerifier(SECRET), [], service_role_bypass=False).may_access(
        "x", True, {"role": "service_role"}
    )
    assert not Authenticator(JwtVerifier(SECRET), []).may_access("x", True, user)


def test_websockets_internals() -> None:
    """What lib/websocket.py relies on. If this fails after a websockets upgrade, revisit the transport."""
    import inspect

    from websockets.http11 import Request
    from websockets.protocol import Protocol

    # Sending a data frame only appends to the protocol's output: writing pre-built frames beside it is sound.
    assert "self.send_frame(" in inspect.getsource(Protocol.send_text)
    assert "self.writes.append(" in inspect.getsource(Protocol.send_frame)
    proto = ServerProtocol()
    assert proto.state is State.CONNECTING
    # The handshake through the public Sans-I/O API: request event, accept → 101, state OPEN.
    proto.receive_data(
        b"GET /realtime/v1/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    (request,) = proto.events_received()
    assert isinstance(request, Request)
    response = proto.accept(request)
    assert response.status_code == 101
    assert "Sec-WebSocket-Extensions" not in response.headers  # we offer none: frames are plain
    proto.send_response(response)
    assert proto.data_to_send()[0].startswith(b"HTTP/1.1 101")
    # accept_stream clears the request's headers after the handshake: the parser must not read them again.
    parse_src = inspect.getsource(ServerProtocol.parse)
    assert "request" not in parse_src[parse_src.index("self.events.append(request)") + 27 :]
    request.headers.clear()
    assert state_of(proto) is State.OPEN
    # our pre-built frame equals what the protocol itself would write for the message (no extensions)
    proto.send_text(b'["x"]')
    assert proto.data_to_send() == [OutFrame('["x"]').wire]
    proto.send_binary(b"\x04ab")
    assert proto.data_to_send() == [OutFrame(b"\x04ab").wire]
    assert Frame(Opcode.TEXT, b"a").serialize(mask=False) == b"\x81\x01a"
    # Incoming: fragments arrive as TEXT(fin=False) + CONT frames; a ping is answered by the protocol itself.
    mask = b"\x00\x00\x00\x00"
    proto.receive_data(b"\x01\x82" + mask + b"ab" + b"\x80\x81" + mask + b"c" + b"\x89\x80" + mask)
    frames = proto.events_received()
    assert [(f.opcode, f.fin, bytes(f.data)) for f in frames if isinstance(f, Frame)] == [
        (Opcode.TEXT, False, b"ab"),
        (Opcode.CONT, True, b"c"),
        (Opcode.PING, True, b""),
    ]
    assert proto.data_to_send() == [b"\x8a\x00"]  # the pong
    # The client's close: websockets answers it and asks us to close the TCP connection (b"").
    proto.receive_data(b"\x88\x82" + mask + b"\x03\xe8")
    assert proto.data_to_send() == [b"\x88\x02\x03\xe8", b""]
    assert state_of(proto) is not State.OPEN


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


def state_of(proto: ServerProtocol) -> State:
    """The protocol's state, read afresh (mypy keeps an attribute narrowed by an earlier assert across calls)."""
    return proto.state
