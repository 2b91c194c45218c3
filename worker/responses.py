"""JSON error responses in Supabase's shape: body `{"code", "message"}` plus an `sb-error-code` header."""

from __future__ import annotations

import json
from collections.abc import Sequence

from mbworker.lib.http.types import Headers, Responder
from mbworker.runtimes import InvocationResult

JSON_HEADERS: Headers = [(b"content-type", b"application/json")]


def error_body(code: str, message: str, **extra: object) -> bytes:
    return json.dumps({"code": code, "message": message, **extra}).encode()


async def send_error(
    responder: Responder,
    status: int,
    code: str,
    message: str,
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    **extra: object,
) -> None:
    """Answer with an error unless the response has started (then the connection is the only signal left)."""
    if responder.started:
        raise ConnectionAbortedError(f"{code} after the response started: {message}")
    await responder.send(
        status, [*JSON_HEADERS, (b"sb-error-code", code.encode()), *headers], error_body(code, message, **extra)
    )


async def send_json(responder: Responder, status: int, value: object, headers: Headers | None = None) -> None:
    await responder.send(status, [*JSON_HEADERS, *(headers or [])], json.dumps(value).encode())


async def send_result(responder: Responder, result: InvocationResult) -> None:
    """A function's answer to the client: in one write with its length when the runtime holds the whole body,
    else streamed (the responder frames it). The caller ends the response."""
    if result.complete_body is not None:
        await responder.send(result.status, result.headers, result.complete_body)
        return
    await responder.start(result.status, result.headers)
    async for chunk in result.body:
        await responder.write(chunk)
