"""The WAGI ABI's pure core: request → env/argv, stdout → response, outcome → error contract. No wasmtime."""

from __future__ import annotations

import pytest

from mbworker import runtimes
from mbworker.runtimes.errors import BootError, IdleTimeout, InvalidResponse, ResourceLimit, WorkerError
from mbworker.runtimes.limits import Limits
from mbworker.runtimes.wasm import cgi
from mbworker.runtimes.wasm.runtime import outcome_to_response
from mbworker.runtimes.wasm.sandbox import CallOutcome


def test_public_names() -> None:
    assert sorted(runtimes.wasm.__all__) == [
        "LogHook",
        "ModuleRejected",
        "WasmRuntime",
        "WasmSettings",
        "WasmStatistics",
        "compile_module",
        "open_wasm_runtime",
    ]
    for name in runtimes.wasm.__all__:
        assert hasattr(runtimes.wasm, name)


def build(target: str, headers: list[tuple[bytes, bytes]] | None = None, **kw: object) -> dict[str, str]:
    request = cgi.build_request(
        method=str(kw.pop("method", "get")),
        target=target,
        headers=headers or [],
        body_length=0,
        url=str(kw.pop("url", "")),
        function_env={"SECRET": "s", "PATH_INFO": "from-config"},
    )
    env = dict(request.env)
    assert len(env) == len(request.env)  # no duplicate names
    return env


@pytest.mark.parametrize(
    ("target", "path_info", "query", "argv"),
    [
        ("/hello", "", "", ["/functions/v1/hello"]),
        ("/hello/", "/", "", ["/functions/v1/hello/"]),
        ("/hello/a/b?x=1&y", "/a/b", "x=1&y", ["/functions/v1/hello/a/b", "x=1", "y="]),
        ("/hello?q=a%26b+c", "", "q=a%26b+c", ["/functions/v1/hello", "q=a&b c"]),
    ],
)
def test_paths_and_argv(target: str, path_info: str, query: str, argv: list[str]) -> None:
    request = cgi.build_request(method="GET", target=target, headers=[], body_length=0, url="", function_env={})
    env = dict(request.env)
    assert env["SCRIPT_NAME"] == "/functions/v1/hello"
    assert env["PATH_INFO"] == path_info
    assert env["QUERY_STRING"] == query
    assert env["X_MATCHED_ROUTE"] == "/functions/v1/hello/..."
    assert request.argv == argv


def test_env_precedence_and_headers() -> None:
    env = build(
        "/fn/x", [(b"user-agent", b"t/1"), (b"x-a", b"1"), (b"x-a", b"2"), (b"x-nul", b"a\x00b")], method="post"
    )
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SECRET"] == "s"
    assert env["PATH_INFO"] == "/x"  # CGI variables win over configured env
    assert env["HTTP_USER_AGENT"] == "t/1"
    assert env["HTTP_X_A"] == "1, 2"
    assert env["HTTP_X_NUL"] == "ab"


def test_a_header_with_an_underscore_never_poses_as_a_dashed_one() -> None:
    # The front door vouches for X-Forwarded-For; `X_Forwarded_For` comes from the client as it pleases.
    env = build(
        "/fn",
        [(b"x_forwarded_for", b"6.6.6.6"), (b"x-forwarded-for", b"127.0.0.1"), (b"content_type", b"text/evil")],
    )
    assert (env["HTTP_X_FORWARDED_FOR"], env["REMOTE_ADDR"], env["CONTENT_TYPE"]) == ("127.0.0.1", "127.0.0.1", "")
    alone = build("/fn", [(b"x_forwarded_for", b"6.6.6.6"), (b"x_real_ip", b"6.6.6.6")])
    assert "HTTP_X_FORWARDED_FOR" not in alone
    assert "HTTP_X_REAL_IP" not in alone
    assert "6.6.6.6" not in alone.values()


@pytest.mark.parametrize(
    ("host", "name", "port"),
    [("", "localhost", "80"), ("a.test", "a.test", "80"), ("a.test:81", "a.test", "81"), ("[::1]:82", "[::1]", "82")],
)
def test_server_name_and_port(host: str, name: str, port: str) -> None:
    env = build("/fn", [(b"host", host.encode())] if host else [])
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == (name, port)


def test_full_url_default_and_given() -> None:
    assert build("/fn/p?q=1", [(b"host", b"h.test")])["X_FULL_URL"] == "http://h.test/functions/v1/fn/p?q=1"
    assert build("/fn", url="https://x.test/functions/v1/fn#frag")["X_FULL_URL"] == "https://x.test/functions/v1/fn"


@pytest.mark.parametrize(
    ("output", "status", "headers", "body"),
    [
        (b"Content-Type: text/plain\n\nhi", 200, [(b"content-type", b"text/plain")], b"hi"),
        (
            b"Content-Type: a/b\r\nX-Y:  z \r\n\r\nbody\n\nmore",
            200,
            [(b"content-type", b"a/b"), (b"x-y", b"z")],
            b"body\n\nmore",
        ),
        (b"Location: /x\n\n", 302, [(b"location", b"/x")], b""),
        (b"Status: 204 No Content\n\n", 204, [], b""),
        (b"status: 418\ncontent-type: text/plain\n\n", 418, [(b"content-type", b"text/plain")], b""),
    ],
)
def test_parse_response(output: bytes, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    assert cgi.parse_response(output) == cgi.CgiResponse(status=status, headers=headers, body=body)


@pytest.mark.parametrize(
    ("output", "error"),
    [
        (b"", cgi.MalformedOutput),
        (b"Content-Type: text/plain\nno blank line", cgi.MalformedOutput),
        (b"Content-Type text/plain\n\n", cgi.MalformedOutput),
        (b"X-Only: 1\n\n", cgi.MalformedOutput),
        (b"Status: abc\n\n", cgi.BadStatus),
        (b"Status: 99\n\n", cgi.BadStatus),
        (b"Status: 600\nContent-Type: a/b\n\n", cgi.BadStatus),
    ],
)
def test_parse_response_rejects(output: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        cgi.parse_response(output)


def outcome(failure: str | None = None, stdout: bytes = b"Content-Type: a/b\n\nok", **kw: object) -> CallOutcome:
    return CallOutcome(stdout=stdout, stderr=b"boom\n", stdout_overflowed=bool(kw.get("overflow")), failure=failure)


@pytest.mark.parametrize(
    ("failure", "error", "kind"),
    [
        ("instantiate", BootError, None),
        ("interrupt", ResourceLimit, "cpu"),
        ("fuel", ResourceLimit, "fuel"),
        ("memory", ResourceLimit, "memory"),
        ("trap", WorkerError, None),
        ("exit", WorkerError, None),
        ("setup", WorkerError, None),
        ("cancelled", WorkerError, None),
    ],
)
def test_outcome_errors(failure: str, error: type[Exception], kind: str | None) -> None:
    with pytest.raises(error) as info:
        outcome_to_response(outcome(failure), Limits(), cpu_deadline=True)
    assert getattr(info.value, "kind", None) == kind
    assert getattr(info.value, "output", None) == "boom\n"


def test_outcome_interrupt_at_idle_deadline_is_idle_timeout() -> None:
    with pytest.raises(IdleTimeout):
        outcome_to_response(outcome("interrupt"), Limits(), cpu_deadline=False)


def test_outcome_overflow_wins_over_failure() -> None:
    with pytest.raises(WorkerError, match="exceeds the limit"):
        outcome_to_response(outcome("interrupt", overflow=True), Limits(), cpu_deadline=True)


def test_outcome_bad_status_is_invalid_response() -> None:
    with pytest.raises(InvalidResponse):
        outcome_to_response(outcome(stdout=b"Status: 700\n\n"), Limits(), cpu_deadline=True)


def test_outcome_ok() -> None:
    response = outcome_to_response(outcome(), Limits(), cpu_deadline=True)
    assert (response.status, response.body) == (200, b"ok")
