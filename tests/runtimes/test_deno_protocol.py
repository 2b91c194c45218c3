"""The daemon ↔ Deno frame format, without I/O."""

from __future__ import annotations

import json
import struct

import pytest

from mbworker.runtimes.deno import protocol


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


@pytest.mark.parametrize("head", [b'{"t":"r"}x', b'{"t":"r"} {}', b'["t","r"]', b'{"t":"r"'])
def test_frame_head_must_be_one_json_object(head: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.FrameDecoder().feed(struct.pack(">II", len(head), 0) + head)


def test_public_names() -> None:
    from mbworker import runtimes

    assert sorted(runtimes.deno.__all__) == ["DenoRuntime", "DenoSettings", "OnLog", "open_deno_runtime"]
    for name in runtimes.deno.__all__:
        assert getattr(runtimes.deno, name) is not None


def test_request_head_is_exactly_what_the_json_encoder_would_write() -> None:
    """The hand-built `q` frame must stay byte-for-byte the JSON the bootstrap parses (checked over odd inputs)."""
    import json
    import random
    import struct

    from mbworker.runtimes.deno.protocol import encode_request_head

    rng = random.Random(7)
    alphabet = [chr(c) for c in range(0, 256)] + ['"', "\\", "\u2028", "é"]
    for _ in range(300):
        headers = [
            (
                "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12))).encode("latin-1", "replace"),
                "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))).encode("latin-1", "replace"),
            )
            for _ in range(rng.randrange(0, 6))
        ]
        url = "http://h/" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        no_body = rng.random() < 0.5
        frame = encode_request_head(12, "GET", url, headers, no_body=no_body)
        value: dict[str, object] = {
            "t": "q",
            "i": 12,
            "m": "GET",
            "u": url,
            "h": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers],
        }
        if no_body:
            value["e"] = 1
        expected = json.dumps(value, separators=(",", ":")).encode()
        assert frame == struct.pack(">II", len(expected), 0) + expected


def test_header_fragments_give_the_same_text_and_stay_bounded() -> None:
    """The memo of header pairs writes what the quoting would, keeps short values only, and starts over when
    full (a stream of unique values never grows it past `max_entries`)."""
    frags = protocol.HeaderFragments(max_entries=4, max_value=8)
    headers = [(b"host", b"h:1"), (b"x-a", b'caf\xe9"\\'), (b"cookie", b"a" * 9)]
    as_json = [json.dumps([k.decode("latin-1"), v.decode("latin-1")], separators=(",", ":")) for k, v in headers]
    expected = ",".join(as_json)
    assert frags.join(headers) == expected
    assert frags.join(headers) == expected  # from the memo this time
    assert len(frags) == 2  # the long cookie value was not kept
    for i in range(10):
        assert frags.join([(b"x-id", str(i).encode())]) == f'["x-id","{i}"]'
        assert len(frags) <= 4
