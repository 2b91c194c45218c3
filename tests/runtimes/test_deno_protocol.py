"""The daemon ↔ Deno frame format, without I/O."""

from __future__ import annotations

import json
import struct

import pytest

from runtimes.deno import protocol


def test_round_trip_in_arbitrary_pieces() -> None:
    frames = [
        ({"t": "h", "i": 1, "s": 200, "h": [["a", "b"]]}, b""),
        ({"t": "b", "i": 1}, b"\x00\xffbody"),
        ({"t": "e", "i": 1}, b""),
    ]
    wire = b"".join(protocol.encode(h, b) for h, b in frames)
    for step in (1, 3, 7, len(wire)):
        dec = protocol.FrameDecoder()
        out = []
        for i in range(0, len(wire), step):
            out += dec.feed(wire[i : i + step])
        assert out == frames


def test_request_head_carries_bytes_headers_as_latin1() -> None:
    wire = protocol.encode_request_head(7, "GET", "http://h/x?y", [(b"x-a", b"caf\xe9")], no_body=True)
    jlen, blen = struct.unpack(">II", wire[:8])
    head = json.loads(wire[8 : 8 + jlen])
    assert blen == 0
    assert head == {"t": "q", "i": 7, "m": "GET", "u": "http://h/x?y", "h": [["x-a", "café"]], "e": 1}


@pytest.mark.parametrize("garbage", [b"hello world from console.log\n", b"\xff\xff\xff\xff\x00\x00\x00\x00"])
def test_corrupt_stream_is_detected(garbage: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.FrameDecoder().feed(garbage + b"\x00" * 64)


def test_public_names() -> None:
    import runtimes.deno

    assert sorted(runtimes.deno.__all__) == ["DenoRuntime", "DenoSettings", "OnLog", "open_deno_runtime"]
    for name in runtimes.deno.__all__:
        assert getattr(runtimes.deno, name) is not None
