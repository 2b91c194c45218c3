"""realtime.protocol without I/O: frame decoding/encoding per the reference's checklist (frame-level items)."""

from __future__ import annotations

import json

import pytest

from mbworker.realtime.protocol import (
    BroadcastPayload,
    Message,
    ProtocolError,
    Vsn,
    decode_binary,
    decode_text,
    encode,
    encode_broadcast,
    parse_vsn,
    reply,
)


def kind3(join_ref: str, ref: str, topic: str, event: str, payload: bytes, enc: int, meta: bytes = b"") -> bytes:
    head = bytes([3, len(join_ref), len(ref), len(topic), len(event), len(meta), enc])
    return head + join_ref.encode() + ref.encode() + topic.encode() + event.encode() + meta + payload


def test_vsn_parsing() -> None:  # checklist 1
    assert parse_vsn("2.0.0") is Vsn.V2
    assert parse_vsn("1.0.0") is Vsn.V1
    assert parse_vsn(None) is Vsn.V1  # Phoenix default
    with pytest.raises(ProtocolError):
        parse_vsn("3.0.0")


def test_v2_text_roundtrip() -> None:
    msg = decode_text('["6","9","phoenix","heartbeat",{}]', Vsn.V2)
    assert msg == Message("6", "9", "phoenix", "heartbeat", {})
    assert decode_text('[null,"9","t","e",{},"extra"]', Vsn.V2).ref == "9"  # extra elements tolerated


def test_v1_text_decoding_and_encoding_omits_join_ref() -> None:
    msg = decode_text('{"topic":"realtime:r","event":"phx_join","payload":{},"ref":"6","join_ref":"6"}', Vsn.V1)
    assert (msg.join_ref, msg.ref, msg.topic, msg.event) == ("6", "6", "realtime:r", "phx_join")
    out = json.loads(encode(Message("6", None, "realtime:r", "presence_state", {}), Vsn.V1))
    assert out == {"topic": "realtime:r", "event": "presence_state", "payload": {}, "ref": None}


def test_heartbeat_reply_shape() -> None:  # checklist 4
    hb = decode_text('[null,"9","phoenix","heartbeat",{}]', Vsn.V2)
    assert json.loads(reply(hb, join_ref=None)) == [None, "9", "phoenix", "phx_reply", {"status": "ok", "response": {}}]
    hb1 = decode_text('{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"3"}', Vsn.V1)
    assert json.loads(reply(hb1, vsn=Vsn.V1)) == {
        "topic": "phoenix", "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": "3"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("frame", "vsn"),
    [
        ("not json", Vsn.V2),
        ('{"topic":"t"}', Vsn.V2),  # object on a v2 socket
        ('["1","2","t"]', Vsn.V2),  # too short
        ('[null,null,1,"e",{}]', Vsn.V2),  # topic not a string
        ('["1","2","t","e",{}]', Vsn.V1),  # array on a v1 socket
        ('{"topic":"t","event":"e","ref":{}}', Vsn.V1),
    ],
)
def test_malformed_text_frames_raise(frame: str, vsn: Vsn) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_text(frame, vsn)
    assert info.value.close_code == 1007


def test_kind3_json_captured_frame() -> None:  # checklist 16 (captured frame from the reference)
    payload = b'{"x":1,"y":2,"from":"alice"}'
    raw = bytes.fromhex("03010 10e060001".replace(" ", "")) + b"68realtime:room1cursor" + payload
    msg = decode_binary(raw, Vsn.V2)
    assert (msg.join_ref, msg.ref, msg.topic, msg.event) == ("6", "8", "realtime:room1", "broadcast")
    assert msg.payload == BroadcastPayload("cursor", payload, True, None)


def test_kind3_empty_ref_binary_payload_and_meta() -> None:
    raw = kind3("6", "", "realtime:r", "bin", b"\x00\xff\x01", 0, b'{"id":"x"}')
    msg = decode_binary(raw, Vsn.V2)
    assert msg.ref is None
    assert msg.payload == BroadcastPayload("bin", b"\x00\xff\x01", False, {"id": "x"})


def test_kind3_header_strings_are_bytes() -> None:
    # realtime-js truncates UTF-16 units to 8 bits: decode as Latin-1, never fail on non-UTF-8 bytes
    raw = bytes([3, 1, 0, 3, 1, 0, 1]) + b"6" + b"r\xe9a" + b"e" + b"{}"
    assert decode_binary(raw, Vsn.V2).topic == "réa"


@pytest.mark.parametrize(
    "raw",
    [
        bytes([0, 1, 1]),  # kind 0
        bytes([2, 0, 0, 0, 0, 0, 1]),  # kind 2
        bytes([3, 5, 0, 0, 0, 0, 1]) + b"ab",  # truncated header strings
        bytes([3, 0, 0, 1, 1, 0, 7]) + b"te",  # unknown encoding
        kind3("1", "2", "t", "e", b"{bad", 1),  # malformed JSON payload
        kind3("1", "2", "t", "e", b"{}", 1, b"[1]"),  # meta not an object
        b"",
    ],
)
def test_bad_binary_frames_raise(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_binary(raw, Vsn.V2)


def test_binary_on_v1_socket_is_refused() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_binary(kind3("1", "2", "t", "e", b"{}", 1), Vsn.V1)
    assert info.value.close_code == 1003


def test_kind4_encoding_matches_captured_frame() -> None:  # checklist 17, 22
    bp = BroadcastPayload("cursor", b'{"x":1,"y":2,"from":"alice"}', True)
    frame = encode_broadcast("realtime:room1", bp, Vsn.V2, binary=True)
    assert isinstance(frame, bytes)
    assert frame[:5] == bytes([4, 14, 6, 0, 1])
    assert frame[5:] == b"realtime:room1cursor" + bp.data
    assert frame[0] == 4  # never kinds 0/1/2


def test_json_broadcast_from_kind3_reaches_v1_as_object() -> None:  # checklist 21
    bp = BroadcastPayload("cursor", b'{"x":1}', True)
    v1 = encode_broadcast("realtime:room1", bp, Vsn.V1, binary=True)
    assert isinstance(v1, str)
    assert json.loads(v1) == {
        "topic": "realtime:room1", "event": "broadcast", "ref": None,
        "payload": {"type": "broadcast", "event": "cursor", "payload": {"x": 1}},
    }  # fmt: skip


def test_text_broadcast_goes_out_as_text_array_with_meta() -> None:
    bp = BroadcastPayload("e", b'{"a":[1,2]}', True, {"id": "m1"})
    v2 = encode_broadcast("realtime:t", bp, Vsn.V2, binary=False)
    assert isinstance(v2, str)
    inner = {"type": "broadcast", "event": "e", "meta": {"id": "m1"}, "payload": {"a": [1, 2]}}
    assert json.loads(v2) == [None, None, "realtime:t", "broadcast", inner]


def test_binary_payload_never_encoded_for_v1() -> None:  # checklist 20
    bp = BroadcastPayload("bin", b"\x00\x01", False)
    assert encode_broadcast("realtime:t", bp, Vsn.V1, binary=True) is None
    v2 = encode_broadcast("realtime:t", bp, Vsn.V2, binary=True)
    assert isinstance(v2, bytes)
    assert v2[4] == 0  # encoding byte: raw binary
    assert v2.endswith(b"\x00\x01")
    # raw bytes that arrived over REST (binary=False) still go as kind 4: text cannot carry them
    assert isinstance(encode_broadcast("realtime:t", bp, Vsn.V2, binary=False), bytes)


def test_reply_echoes_join_ref_and_ref() -> None:  # checklist 6
    join = decode_text('["6","6","realtime:r","phx_join",{}]', Vsn.V2)
    assert json.loads(reply(join, "ok", {"postgres_changes": []})) == [
        "6", "6", "realtime:r", "phx_reply", {"status": "ok", "response": {"postgres_changes": []}}
    ]  # fmt: skip
