"""The daemon ↔ Deno wire format: pure encoding and decoding, no I/O (bootstrap.ts is the other end).

Frames travel both ways on a unix socket of each child's own (process.py; never its stdout, which is the
function's log stream)::

    [u32 json_len][u32 body_len][json_len bytes of UTF-8 JSON][body_len raw bytes]      (big-endian)

The JSON object's ``t`` names the frame; ``i`` is the request id (an int, unique per process) that multiplexes
concurrent requests on one process. Bodies travel raw, never base64: a body chunk is a frame with a tiny JSON
head. Header names/values are ByteStrings, carried as latin-1 decoded JSON strings.

daemon → Deno
    ``q``  request head ``{t,i,m: method,u: url,h: [[name,value],...],e?: 1 if no body follows,w?: 1 if a
           WebSocket upgrade the daemon can complete (only then may the function call Deno.upgradeWebSocket)}``
    ``b``  request body chunk (raw)          ``e``  request body end
    ``c``  cancel (client left; aborts Request.signal, cancels the response stream)
    ``a``  ack ``{n}``: the daemon consumed n response chunks (flow control, below)
    ``s``  planned shutdown ``{r: reason}``: dispatch ``beforeunload``, close WebSockets (1001), finish in-flight
           and ``waitUntil``, exit 0
    ``wo`` WebSocket open ``{i,m: max message bytes,q: max bytes the function may have waiting}``: the client's
           handshake completed (101 sent); ``open`` fires
    ``wm`` a client message ``{i,b?: 1 if binary}``, its raw part the payload (text as UTF-8)
    ``wa`` ack ``{i,n}``: n of the function's messages went to the client
    ``wc`` the connection closed ``{i,c: code,r: reason}`` (the client's close, 1006 if it just left, 1009 for
           an oversize message): ``close`` fires; the last frame of that socket

Deno → daemon
    ``r``  ready: the module was imported and a handler registered
    ``x``  boot error ``{m}`` (top-level throw, failed import); the process exits 1
    ``h``  response head ``{i,s: status,h,e?: 1}``, its raw part = the body available at once (a static body,
           queued chunks; up to 64 KiB); ``e: 1`` means that was all of it (one frame per small response)
    ``b``  response body chunk (raw)     ``e``  response end
    ``f``  request failed ``{i,k: "error"|"invalid",m}`` (uncaught handler throw, bad status, not a Response)
    ``h`` with ``s: 101`` (``{i,s: 101,h: [],p?: subprotocol}``): the handler returned Deno.upgradeWebSocket's
           response; the request lasts as long as its socket, and no body frame follows
    ``wm`` a message to the client ``{i,b?: 1}``, raw payload       ``wa`` ack ``{i,n}`` of client messages
    ``wc`` the function closes ``{i,c,r}`` (``close(code, reason)``; 1009 for an oversize message, 1011 when it
           sent more than it may have waiting, 1001 on shutdown): the daemon closes the client with it

Flow control: Deno may have at most ``WINDOW`` response chunks of one request unacknowledged; the daemon acks
as its consumer reads, so a slow client never stalls other requests on the same channel. Request bodies are not
windowed: Deno queues them in the Request's stream (the front door caps their size).

WebSocket messages are windowed the same way, per socket and direction: at most ``WINDOW`` unacknowledged ``wm``
frames each way; toward the client also at most ``w`` unacknowledged bytes (``wo``'s ``w``: ``SOCKET_WINDOW_BYTES``)
beyond one message, so the daemon holds about one message plus that much per socket. The daemon acks the
function's as the client's connection takes them (a slow client stops the acks; the function's socket then holds
what it sends, up to ``q`` bytes, and past that closes with 1011); Deno
acks the client's as they are dispatched (while the daemon waits for an ack it does not read from the client, so
TCP pushes back). A message over ``max_message_bytes`` closes the socket with 1009, in either direction (the
daemon checks the function's too, and closes a socket whose function overruns its window with 1011: one
socket's fault never ends the process). Control frames (``wo``, ``wc``) are not windowed.
"""

from __future__ import annotations

import json
import struct
from json.encoder import encode_basestring_ascii
from typing import Any

WINDOW = 16
"""Response chunks per request in flight before Deno waits for an ack (bootstrap.ts has the same constant)."""
SOCKET_WINDOW_BYTES = 1 << 20
"""What the function may have sent toward a client unacknowledged beyond one message (bootstrap keeps to it)."""
ACK_EVERY = WINDOW // 2
"""The daemon acks after its consumer has read this many chunks."""
MAX_JSON = 1 << 20
"""A frame head larger than this is garbage: the stream is corrupt."""

_PREFIX = struct.Struct(">II")
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
_raw_decode = json.JSONDecoder().raw_decode  # `decode` adds two whitespace regex matches per call
_quote = encode_basestring_ascii


class ProtocolError(Exception):
    """The child's output is not a valid frame stream."""


def encode(head: dict[str, Any], body: bytes = b"") -> bytes:
    """One frame as bytes."""
    j = _dumps(head).encode()
    return _PREFIX.pack(len(j), len(body)) + j + body


class HeaderFragments:
    """Memo of header pairs → their JSON text in a ``q`` frame (``["name","value"]``): most requests repeat the
    last requests' headers (host, user agent, the x-forwarded-* the front door sets), and a dict lookup costs
    a fraction of two decodes and two quotes. Bounded: pairs with a value over `max_value` bytes (tokens,
    cookies) are never kept, and the memo starts over once it holds `max_entries`. One per daemon (module-level
    `_FRAGMENTS`), used on the trio thread only."""

    __slots__ = ("_memo", "max_entries", "max_value")

    def __init__(self, *, max_entries: int = 1024, max_value: int = 128) -> None:
        self._memo: dict[tuple[bytes, bytes], str] = {}
        self.max_entries = max_entries
        self.max_value = max_value

    def __len__(self) -> int:
        return len(self._memo)

    def join(self, headers: list[tuple[bytes, bytes]]) -> str:
        """The headers as the inside of the frame's ``h`` array."""
        memo = self._memo
        parts = []
        for pair in headers:
            text = memo.get(pair)
            if text is None:
                k, v = pair
                text = "[" + _quote(k.decode("latin-1")) + "," + _quote(v.decode("latin-1")) + "]"
                if len(v) <= self.max_value:
                    if len(memo) >= self.max_entries:
                        memo.clear()
                    memo[pair] = text
            parts.append(text)
        return ",".join(parts)


_FRAGMENTS = HeaderFragments()


def encode_request_head(
    rid: int, method: str, url: str, headers: list[tuple[bytes, bytes]], *, no_body: bool, upgrade: bool = False
) -> bytes:
    """The ``q`` frame. Built as text with the C string quoter rather than a dict through the JSON encoder (the
    same bytes: compact separators, ASCII-escaped; about half the cost, once per request), header pairs from
    `HeaderFragments`."""
    h = _FRAGMENTS.join(headers)
    tail = ',"e":1}' if no_body else "}"
    if upgrade:
        tail = ',"w":1' + tail
    j = (
        '{"t":"q","i":' + str(rid) + ',"m":' + _quote(method) + ',"u":' + _quote(url) + ',"h":[' + h + "]" + tail
    ).encode()
    return _PREFIX.pack(len(j), 0) + j


class FrameDecoder:
    """Feed bytes in, get ``(head, body)`` frames out. Keeps partial frames between feeds."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[dict[str, Any], bytes]] = []
        pos = 0
        n = len(buf)
        while n - pos >= 8:
            jlen, blen = _PREFIX.unpack_from(buf, pos)
            if jlen > MAX_JSON or jlen == 0:
                raise ProtocolError(f"bad frame prefix (json_len={jlen})")
            end = pos + 8 + jlen + blen
            if end > n:
                break
            try:
                text = buf[pos + 8 : pos + 8 + jlen].decode()
                head, used = _raw_decode(text)
            except (UnicodeDecodeError, ValueError) as exc:
                raise ProtocolError("frame head is not JSON") from exc
            if used != len(text) and text[used:].strip():
                raise ProtocolError("frame head is not JSON")
            if not isinstance(head, dict):
                raise ProtocolError("frame head is not an object")
            out.append((head, bytes(buf[pos + 8 + jlen : end])))
            pos = end
        if pos:
            del buf[:pos]
        return out
