"""A stand-in for `mbworker serve` used by the local provider's tests (the real daemon's cluster mode is built
elsewhere). It takes the same arguments, records the environment it was given in <data-dir>/env.json, answers
any HTTP request on --port with its own name, and serves POST /admin/v1/drain on --admin-port (bearer token
from MBWORKER_ADMIN_TOKEN; the marker file <data-dir>/undrainable makes it answer {"drained": false} forever).
As `control serve` it only listens on --port.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def control() -> None:
    """`control serve`: answers any request on --port (the provider only waits for the port)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--node-token-file", type=Path, required=True)
    args = parser.parse_args(sys.argv[3:])
    assert args.token_file.exists(), "the provider creates the control token before starting the control plane"

    class Any(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ThreadingHTTPServer((args.host, args.port), Any).serve_forever()


def main() -> None:
    if sys.argv[1:3] == ["control", "serve"]:
        control()
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--admin-port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    keys = ("MBWORKER_REDIS_URL", "MBWORKER_JWT_SECRET", "MBWORKER_ADMIN_TOKEN", "MBWORKER_NODE_ID")
    (args.data_dir / "env.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
    token = os.environ["MBWORKER_ADMIN_TOKEN"]
    name = os.environ["MBWORKER_NODE_ID"]

    class Public(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            body = json.dumps({"worker": name, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Admin(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            body: dict[str, object]
            if self.headers.get("Authorization") != f"Bearer {token}":
                status, body = 401, {"code": "unauthorized"}
            elif self.path != "/admin/v1/drain":
                status, body = 404, {"code": "not_found"}
            else:
                drained = not (args.data_dir / "undrainable").exists()
                if drained:
                    (args.data_dir / "drained").write_text("yes")
                status, body = 200, {"drained": drained}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    public = ThreadingHTTPServer((args.host, args.port), Public)
    admin = ThreadingHTTPServer((args.host, args.admin_port), Admin)
    threading.Thread(target=admin.serve_forever, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    public.serve_forever()


if __name__ == "__main__":
    main()
