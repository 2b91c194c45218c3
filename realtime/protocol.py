"""The Phoenix / Supabase Realtime channel protocol as realtime-js 2.x speaks it: pure, no I/O, no trio.

Frames in (`str` text frames, `bytes` binary frames) become `Message`s; messages and broadcasts out become
ready-to-send frames. vsn 1.0.0 frames are JSON objects, vsn 2.0.0 frames are JSON arrays
`[join_ref, ref, topic, event, payload]` plus binary kind 3 (client → server user broadcast) and kind 4
(server → client user broadcast). Kinds 0/1/2 are never produced and binary is never encoded for vsn 1.
Reference: /work/shared/reference/realtime-protocol.md §2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "KIND_USER_BROADCAST",
    "KIND_USER_BROADCAST_PUSH",
    "BroadcastPayload",
    "Message",
    "ProtocolError",
    "Vsn",
    "decode_binary",
    "decode_text",
    "encode",
    "encode_broadcast",
    "parse_vsn",
    "reply",
]

KIND_USER_BROADCAST_PUSH = 3
"""Binary kind the client sends for `channel.send({type: 'broadcast', ...})` (vsn 2)."""
KIND_USER_BROADCAST = 4
"""The only binary kind realtime-js decodes (server → client)."""

_ENC_BINARY = 0
_ENC_JSON = 1


class ProtocolError(Exception):
    """A frame that cannot be decoded. The connection that sent it is closed with `close_code`."""

    def __init__(self, message: str, close_code: int = 1007) -> None:
        super().__init__(message)
        self.close_code = close_code


class Vsn(Enum):
    V1 = "1.0.0"
    V2 = "2.0.0"


def parse_vsn(value: str | None) -> Vsn:
    """The serializer version from the `vsn` query parameter; missing means 1.0.0 (Phoenix default)."""
    if value is None or value == "":
        return Vsn.V1
    try:
        return Vsn(value)
    except ValueError:
        raise ProtocolError(f"unsupported vsn {value!r}", 1002) from None


@dataclass(slots=True)
class BroadcastPayload:
    """A user broadcast's inner parts, kept as bytes so the server relays without re-encoding.

    `data` is UTF-8 JSON text when `is_json`, raw bytes otherwise.
    """

    event: str
    data: bytes
    is_json: bool
    meta: dict[str, Any] | None = None


@dataclass(slots=True)
class Message:
    """One logical Phoenix message. `payload` is the decoded JSON value, or a `BroadcastPayload` for kind 3."""

    join_ref: str | None
    ref: str | None
    topic: str
    event: str
    payload: Any = field(default_factory=dict)


def _opt_str(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # some SDKs send numeric refs
    raise ProtocolError(f"{name} must be a string or null")


def decode_text(data: str, vsn: Vsn) -> Message:
    """Decode a text frame. Raises `ProtocolError` on malformed JSON or shape."""
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise ProtocolError("malformed JSON") from exc
    except RecursionError:  # deeper than the parser goes: refused like any malformed frame, no traceback
        raise ProtocolError("JSON nested too deeply") from None
    if vsn is Vsn.V2:
        if not isinstance(raw, list) or len(raw) < 5:
            raise ProtocolError("vsn 2.0.0 frames are [join_ref, ref, topic, event, payload]")
        join_ref, ref, topic, event, payload = raw[:5]  # extra elements are tolerated (upstream does)
    else:
        if not isinstance(raw, dict):
            raise ProtocolError("vsn 1.0.0 frames are JSON objects")
        join_ref, ref = raw.get("join_ref"), raw.get("ref")
        topic, event, payload = raw.get("topic"), raw.get("event"), raw.get("payload", {})
    if not isinstance(topic, str) or not isinstance(event, str):
        raise ProtocolError("topic and event must be strings")
    return Message(_opt_str(join_ref, "join_ref"), _opt_str(ref, "ref"), topic, event, payload)


def decode_binary(data: bytes, vsn: Vsn) -> Message:
    """Decode a binary frame: only kind 3 on vsn 2 sockets is valid.

    Header strings are bytes (realtime-js writes UTF-16 units truncated to 8 bits), decoded as Latin-1.
    """
    if vsn is not Vsn.V2:
        raise ProtocolError("binary frames need vsn 2.0.0", 1003)
    if len(data) < 7 or data[0] != KIND_USER_BROADCAST_PUSH:
        raise ProtocolError(f"unsupported binary frame kind {data[0] if data else None}", 1003)
    jl, rl, tl, el, ml, enc = data[1], data[2], data[3], data[4], data[5], data[6]
    pos = 7
    end = pos + jl + rl + tl + el + ml
    if end > len(data):
        raise ProtocolError("truncated binary frame")
    if enc not in (_ENC_BINARY, _ENC_JSON):
        raise ProtocolError(f"unknown payload encoding {enc}")

    def take(n: int) -> bytes:
        nonlocal pos
        chunk = data[pos : pos + n]
        pos += n
        return chunk

    join_ref = take(jl).decode("latin-1")
    ref = take(rl).decode("latin-1")
    topic = take(tl).decode("latin-1")
    event = take(el).decode("latin-1")
    meta_raw = take(ml)
    body = data[pos:]
    meta: dict[str, Any] | None = None
    if meta_raw:
        try:
            parsed = json.loads(meta_raw)
        except (ValueError, RecursionError):
            raise ProtocolError("malformed metadata JSON") from None
        if not isinstance(parsed, dict):
            raise ProtocolError("metadata must be a JSON object")
        meta = parsed
    if enc == _ENC_JSON:
        try:
            json.loads(body)  # validated once here: other clients JSON.parse what we relay
        except (ValueError, RecursionError):
            raise ProtocolError("malformed JSON payload") from None
    return Message(
        join_ref or None,
        ref or None,
        topic,
        "broadcast",
        BroadcastPayload(event, bytes(body), enc == _ENC_JSON, meta),
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def encode(msg: Message, vsn: Vsn) -> str:
    """Encode a server → client message as a text frame. vsn 1 omits `join_ref` (Phoenix V1 serializer)."""
    if vsn is Vsn.V2:
        return _dumps([msg.join_ref, msg.ref, msg.topic, msg.event, msg.payload])
    return _dumps({"topic": msg.topic, "event": msg.event, "payload": msg.payload, "ref": msg.ref})


def reply(request: Message, status: str = "ok", response: Any = None, vsn: Vsn = Vsn.V2, *, join_ref: Any = ...) -> str:
    """A `phx_reply` to `request` (same topic and ref; its join_ref unless overridden)."""
    jr = request.join_ref if join_ref is ... else join_ref
    payload = {"status": status, "response": {} if response is None else response}
    return encode(Message(jr, request.ref, request.topic, "phx_reply", payload), vsn)


def _json_fragment(bp: BroadcastPayload) -> str:
    return bp.data.decode("utf-8")


def encode_broadcast(topic: str, bp: BroadcastPayload, vsn: Vsn, *, binary: bool) -> str | bytes | None:
    """The fan-out frame for a user broadcast, or None when it cannot reach a `vsn` socket.

    `binary` says the message arrived as kind 3 (or raw bytes over REST): vsn 2 gets a kind-4 frame then,
    as Supabase relays it. Raw-bytes payloads never go to vsn 1. JSON payloads are spliced, not re-parsed.
    """
    if vsn is Vsn.V2 and (binary or not bp.is_json):
        t, e = topic.encode("latin-1", "replace"), bp.event.encode("latin-1", "replace")
        m = _dumps(bp.meta).encode() if bp.meta else b""
        if len(t) > 255 or len(e) > 255 or len(m) > 255:
            raise ProtocolError("topic, event or meta longer than 255 bytes")
        head = bytes((KIND_USER_BROADCAST, len(t), len(e), len(m), _ENC_JSON if bp.is_json else _ENC_BINARY))
        return b"".join((head, t, e, m, bp.data))
    if not bp.is_json:
        return None
    inner = '{"type":"broadcast","event":' + _dumps(bp.event)
    if bp.meta:
        inner += ',"meta":' + _dumps(bp.meta)
    inner += ',"payload":' + _json_fragment(bp) + "}"
    if vsn is Vsn.V2:
        return "[null,null," + _dumps(topic) + ',"broadcast",' + inner + "]"
    return '{"topic":' + _dumps(topic) + ',"event":"broadcast","payload":' + inner + ',"ref":null}'
