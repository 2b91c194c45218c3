"""Real redis-server / redis-sentinel processes for tests: start on a free port in a temp dir, stop, restart.

Plain functions (not fixtures) so any test package can use them:

    server = await start_redis_server(tmp_path)          # waits until it answers PING
    try: ... server.url ... await server.restart() ...
    finally: await server.stop()

or `async with redis_server_running(tmp_path) as server: ...`. The caller owns the process; `stop()` always
reaps it (terminate, then kill after a grace period).
"""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tests.conftest import free_port, require_binary

START_TIMEOUT = 10.0
STOP_GRACE = 5.0


@dataclass
class RedisServer:
    """A running redis-server (or sentinel) owned by the test that started it."""

    port: int
    directory: Path
    argv: list[str]
    log: Path
    password: str | None = None
    tls_ca: Path | None = None
    """With TLS: the CA (self-signed certificate) clients must trust; the port then speaks only TLS."""
    process: trio.Process | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls_ca is not None:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls_ca}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Launch and wait until it accepts connections and answers (PONG, or NOAUTH with a password)."""
        log = self.log.open("ab")
        try:
            self.process = await trio.lowlevel.open_process(
                self.argv, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        finally:
            log.close()
        try:
            with trio.fail_after(START_TIMEOUT):
                while not await _answers(self.port, self.tls_ca):
                    if self.process.returncode is not None:
                        raise RuntimeError(f"{self.argv[0]} exited: {self.log.read_text()[-2000:]}")
                    await trio.sleep(0.01)  # poll for the listening socket (bounded by START_TIMEOUT)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Terminate (kill after a grace period) and reap. Safe to call twice."""
        process, self.process = self.process, None
        if process is None:
            return
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with trio.move_on_after(STOP_GRACE):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
            await process.wait()

    async def kill(self) -> None:
        """SIGKILL (no shutdown work) and reap."""
        process, self.process = self.process, None
        if process is not None:
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()

    async def restart(self) -> None:
        """Stop and start again on the same port (data is not persisted: `--save ''`)."""
        await self.stop()
        await self.start()


async def _answers(port: int, tls_ca: Path | None = None) -> bool:
    stream: trio.abc.Stream
    try:
        if tls_ca is None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        else:
            context = ssl.create_default_context(cafile=str(tls_ca))
            stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    except OSError:
        return False
    try:
        with trio.move_on_after(1):
            await stream.send_all(b"PING\r\n")
            data = await stream.receive_some(100)
            return data.startswith((b"+PONG", b"-NOAUTH"))
        return False
    except (OSError, trio.BrokenResourceError):  # ssl.SSLError is an OSError
        return False
    finally:
        await trio.aclose_forcefully(stream)


def redis_server_binary() -> str:
    return require_binary("redis-server")


async def start_redis_server(
    tmp_path: Path,
    *,
    port: int | None = None,
    args: Sequence[str] = (),
    password: str | None = None,
    name: str = "redis",
    tls: bool = False,
) -> RedisServer:
    """A fresh redis-server on 127.0.0.1 (free port unless given), no persistence, files under tmp_path/name.

    With `tls`, a self-signed certificate for 127.0.0.1 is made with `openssl` and the port speaks only TLS;
    `server.url` is then a rediss:// URL trusting that certificate."""
    binary = redis_server_binary()
    port = port or free_port()
    directory = tmp_path / name
    directory.mkdir(parents=True, exist_ok=True)
    tls_ca: Path | None = None
    if tls:
        tls_ca = await make_self_signed_certificate(directory)
        key = directory / "key.pem"
        argv = [binary, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls_ca)]
        argv += ["--tls-key-file", str(key), "--tls-auth-clients", "no"]
    else:
        argv = [binary, "--port", str(port)]
    argv += ["--bind", "127.0.0.1", "--dir", str(directory)]
    argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    if password is not None:
        argv += ["--requirepass", password]
    argv += list(args)
    server = RedisServer(port, directory, argv, directory / "server.log", password, tls_ca)
    await server.start()
    return server


async def make_self_signed_certificate(directory: Path) -> Path:
    """cert.pem + key.pem for 127.0.0.1/localhost in `directory` (openssl); returns the certificate path."""
    openssl = require_binary("openssl")
    cert = directory / "cert.pem"
    await trio.run_process(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(directory / "key.pem"),
            "-out",
            str(cert),
        ],
        capture_stdout=True,
        capture_stderr=True,
    )
    return cert


async def start_redis_sentinel(
    tmp_path: Path,
    master_port: int,
    *,
    service: str = "mymaster",
    port: int | None = None,
    name: str = "sentinel",
) -> RedisServer:
    """A sentinel (`redis-server <conf> --sentinel`) monitoring 127.0.0.1:master_port as `service`."""
    binary = redis_server_binary()
    port = port or free_port()
    directory = tmp_path / name
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "sentinel.conf"  # sentinel rewrites its config file, so it must be writable
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
        f"sentinel monitor {service} 127.0.0.1 {master_port} 1\n"
        f"sentinel down-after-milliseconds {service} 1000\n"
        f"sentinel failover-timeout {service} 5000\n"
    )
    argv = [binary, str(conf), "--sentinel"]
    server = RedisServer(port, directory, argv, directory / "sentinel.log")
    await server.start()
    return server


@asynccontextmanager
async def redis_server_running(
    tmp_path: Path, *, port: int | None = None, args: Sequence[str] = (), password: str | None = None
) -> AsyncIterator[RedisServer]:
    server = await start_redis_server(tmp_path, port=port, args=args, password=password)
    try:
        yield server
    finally:
        await server.stop()
