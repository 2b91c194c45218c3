"""The CLI's client of the admin API (synchronous: the CLI is not on a Trio loop).

Where the admin URL and token come from, first match wins: flags, `MBWORKER_ADMIN_URL` / `MBWORKER_ADMIN_TOKEN`,
then the local data dir's token file (`./.mbworker/secrets/admin_token`, or `MBWORKER_DATA_DIR`).
"""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx

from mbworker.control.endpoint import tls_name_hook
from mbworker.worker.errors import AdminApiError, ConfigError
from mbworker.worker.keys import admin_token_file

DEFAULT_ADMIN_URL = "http://127.0.0.1:8001"
UPLOAD_CHUNK = 256 * 1024
PROGRESS_ABOVE = 1024 * 1024


def resolve_admin(url: str | None, token: str | None) -> tuple[str, str]:
    url = url or os.environ.get("MBWORKER_ADMIN_URL") or DEFAULT_ADMIN_URL
    token = token or os.environ.get("MBWORKER_ADMIN_TOKEN")
    if not token:
        path = admin_token_file(Path(os.environ.get("MBWORKER_DATA_DIR", ".mbworker")))
        if path.exists():
            token = path.read_text().strip()
    if not token:
        raise ConfigError(
            "no admin token: pass --token, set MBWORKER_ADMIN_TOKEN, or run from the folder holding .mbworker/"
        )
    return url.rstrip("/"), token


class AdminClient:
    """Owns one httpx.Client; use as a context manager. `prefix` is the API's root: the control plane's client
    (cli/control_client.py) speaks the same function commands under `/control/v1`."""

    prefix = "/admin/v1"

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 120.0,
        verify: ssl.SSLContext | bool = True,
        server_name: str | None = None,
    ) -> None:
        """`verify`: how to trust an https URL (the cluster CA for a control plane); `server_name`: the TLS name to
        verify instead of the URL's host (a certificate issued for a name, reached by address)."""
        self.url = url
        self._http = httpx.Client(
            base_url=url,
            headers={"authorization": f"Bearer {token}"},
            timeout=timeout,
            trust_env=False,
            verify=verify,
            event_hooks={"request": [tls_name_hook(server_name)]},
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AdminApiError(0, "UNREACHABLE", f"admin API at {self.url} unreachable: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = {"code": "BAD_RESPONSE", "message": response.text[:500]}
        if response.status_code >= 400:
            raise AdminApiError(
                response.status_code,
                str(body.get("code", "ERROR")),
                str(body.get("message", "")),
                output=str(body.get("output", "")),
            )
        return body

    def deploy(self, slug: str, archive: bytes, sha256: str, *, progress: bool = True) -> dict[str, Any]:
        def chunks() -> Iterator[bytes]:
            sent = 0
            show = progress and len(archive) > PROGRESS_ABOVE and sys.stderr.isatty()
            for i in range(0, len(archive), UPLOAD_CHUNK):
                chunk = archive[i : i + UPLOAD_CHUNK]
                sent += len(chunk)
                if show:
                    print(f"\r  uploading {slug}: {sent * 100 // len(archive)}%", end="", file=sys.stderr)
                yield chunk
            if show:
                print(file=sys.stderr)

        result: dict[str, Any] = self._call(
            "POST",
            f"{self.prefix}/functions/{slug}/deploy",
            content=chunks(),
            headers={
                "content-type": "application/octet-stream",
                "content-length": str(len(archive)),
                "x-mbworker-sha256": sha256,
            },
        )
        return result

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Any admin route below the API's root (`/secrets`, …): the JSON answer, or `AdminApiError`."""
        return self._call(method, f"{self.prefix}{path}", **kwargs)

    def list_functions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", f"{self.prefix}/functions")
        return result

    def versions(self, slug: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", f"{self.prefix}/functions/{slug}")
        return result

    def rollback(self, slug: str, to: int | None) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", f"{self.prefix}/functions/{slug}/rollback", json={} if to is None else {"version": to}
        )
        return result

    def delete(self, slug: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"{self.prefix}/functions/{slug}")
        return result

    def purge_cache(self, slug: str | None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"{self.prefix}/cache/purge", json={"slug": slug})
        return result

    def drain(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"{self.prefix}/drain")
        return result

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"{self.prefix}/health")
        return result
