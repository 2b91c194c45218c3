"""The WAGI ABI as pure functions: request → (env, argv), stdout → response. No I/O, no wasmtime.

WAGI is CGI 1.1 (RFC 3875) over WASI preview 1, plus the `X_*` variables of deislabs/wagi and Spin's wagi
executor. See docs/wasm.md for the contract as we implement it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from mbworker.runtimes.api import Headers

SERVER_SOFTWARE = "WAGI/1"
GATEWAY_INTERFACE = "CGI/1.1"


@dataclass(frozen=True, slots=True)
class CgiRequest:
    """What the guest sees of one request: its environment (ordered) and argv."""

    env: list[tuple[str, str]]
    argv: list[str]


@dataclass(frozen=True, slots=True)
class CgiResponse:
    status: int
    headers: Headers
    body: bytes


class MalformedOutput(ValueError):
    """stdout is not a CGI response (no header block, a bad header line, or a bad Status)."""


class BadStatus(MalformedOutput):
    """`Status:` is not a number in 200–599."""


def _text(value: bytes) -> str:
    # Environment strings are C strings in the guest: NUL would truncate them silently.
    return value.decode("latin-1").replace("\x00", "")


def split_target(target: str) -> tuple[str, str, str]:
    """`/<slug>/<rest>?q` → (slug, "/<rest>" or "", query)."""
    path, _, query = target.partition("?")
    trimmed = path.lstrip("/")
    slug, sep, rest = trimmed.partition("/")
    return slug, (sep + rest) if sep else "", query


def build_request(
    *,
    method: str,
    target: str,
    headers: Headers,
    body_length: int,
    url: str,
    function_env: Mapping[str, str],
    route_prefix: str = "/functions/v1",
    server_name: str = "localhost",
    server_port: int = 80,
) -> CgiRequest:
    """The WAGI environment and argv for one request.

    `target` is `/<slug>/<rest>?query` (the front door stripped `route_prefix`). SCRIPT_NAME is the function's
    public route `<prefix>/<slug>`, PATH_INFO the part after it (Spin's wagi executor does the same for a
    `<route>/...` wildcard). `function_env` comes first; the CGI variables override it.
    """
    slug, path_info, query = split_target(target)
    script_name = f"{route_prefix}/{slug}"
    full_path = script_name + path_info

    merged: dict[str, list[str]] = {}
    for raw_name, raw_value in headers:
        if b"_" in raw_name:
            # `X_Forwarded_For` would become HTTP_X_FORWARDED_FOR, posing as the X-Forwarded-For the front door
            # vouches for (and so REMOTE_ADDR): nginx and Apache drop such headers from CGI for the same reason.
            continue
        name = "HTTP_" + raw_name.decode("latin-1").upper().replace("-", "_")
        merged.setdefault(name, []).append(_text(raw_value))
    header_env = {name: ", ".join(values) for name, values in merged.items()}

    host = header_env.get("HTTP_HOST", "")
    name, port = server_name, str(server_port)
    if host.startswith("["):  # [v6]:port
        bracket = host.find("]")
        name, rest = host[: bracket + 1], host[bracket + 1 :]
        if rest.startswith(":") and rest[1:].isdigit():
            port = rest[1:]
    elif host:
        h, sep, p = host.partition(":")
        name = h
        if sep and p.isdigit():
            port = p
    forwarded_for = header_env.get("HTTP_X_FORWARDED_FOR", "")
    remote_addr = forwarded_for.split(",")[0].strip() if forwarded_for else ""
    if not url:
        scheme = header_env.get("HTTP_X_FORWARDED_PROTO", "http").split(",")[0].strip() or "http"
        url = f"{scheme}://{host or name}{full_path}" + (f"?{query}" if query else "")
    elif "#" in url:
        # Keep X_FULL_URL consistent with what the guest parses even if `url` carries a fragment.
        url = urlsplit(url)._replace(fragment="").geturl()

    env: dict[str, str] = {k: v.replace("\x00", "") for k, v in function_env.items()}
    env.update(header_env)
    env.update(
        {
            "REQUEST_METHOD": method.upper(),
            "SCRIPT_NAME": script_name,
            "PATH_INFO": path_info,
            "PATH_TRANSLATED": path_info,
            "QUERY_STRING": query,
            "CONTENT_TYPE": header_env.get("HTTP_CONTENT_TYPE", ""),
            "CONTENT_LENGTH": str(body_length),
            "SERVER_NAME": name,
            "SERVER_PORT": port,
            "SERVER_PROTOCOL": "HTTP/1.1",
            "SERVER_SOFTWARE": SERVER_SOFTWARE,
            "GATEWAY_INTERFACE": GATEWAY_INTERFACE,
            "AUTH_TYPE": "",
            "REMOTE_ADDR": remote_addr,
            "REMOTE_HOST": remote_addr,
            "REMOTE_USER": "",
            "X_MATCHED_ROUTE": f"{script_name}/...",
            "X_RAW_COMPONENT_ROUTE": f"{script_name}/...",
            "X_COMPONENT_ROUTE": script_name,
            "X_FULL_URL": url,
        }
    )
    argv = [full_path]
    if query:
        argv += [f"{k}={v}" for k, v in parse_qsl(query, keep_blank_values=True)]
    return CgiRequest(env=list(env.items()), argv=argv)


def parse_response(output: bytes) -> CgiResponse:
    """Parse stdout as a CGI response: header lines, a blank line (LF or CRLF), the body.

    At least one of Content-Type, Location or Status must be present. `Location` without `Status` is a 302.
    Other headers pass through. Raises `MalformedOutput` (or `BadStatus`).
    """
    if not output:
        raise MalformedOutput("the module wrote nothing to stdout")
    lf = output.find(b"\n\n")
    crlf = output.find(b"\r\n\r\n")
    candidates = [(pos, n) for pos, n in ((lf, 2), (crlf, 4)) if pos >= 0]
    if not candidates:
        raise MalformedOutput("no blank line after the CGI headers")
    end, sep_len = min(candidates)
    head, body = output[:end], output[end + sep_len :]

    status: int | None = None
    location = False
    content_type = False
    headers: Headers = []
    for raw_line in head.split(b"\n"):
        line = raw_line.rstrip(b"\r")
        if not line:
            continue
        name, colon, value = line.partition(b":")
        name = name.strip()
        if not colon or not name or b" " in name:
            raise MalformedOutput(f"bad CGI header line: {line[:80]!r}")
        value = value.strip()
        lname = name.lower()
        if lname == b"status":
            code = value.split(b" ", 1)[0]
            if not code.isdigit():
                raise BadStatus(f"bad CGI Status: {value[:40]!r}")
            status = int(code)
            if not 200 <= status <= 599:
                raise BadStatus(f"CGI Status {status} is outside 200-599")
            continue
        if lname == b"location":
            location = True
        elif lname == b"content-type":
            content_type = True
        headers.append((lname, value))
    if status is None:
        if location:
            status = 302
        elif content_type:
            status = 200
        else:
            raise MalformedOutput("CGI output has none of Content-Type, Location or Status")
    return CgiResponse(status=status, headers=headers, body=body)
