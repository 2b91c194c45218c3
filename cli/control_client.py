"""The CLI's client of the control plane: the admin client's function commands under `/control/v1`, plus the
cluster's own (nodes, drains, sessions, audit). URL and token come from the cluster's state dir
(`mbworker.control.endpoint`), found from the spec file (`--cluster cluster.toml` / `-c`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mbworker.cli.admin_client import AdminClient
from mbworker.control.endpoint import ControlEndpoint, read_endpoint
from mbworker.control.errors import ControlError
from mbworker.worker.errors import ConfigError


def resolve_control(spec_path: Path, state_dir: Path | None = None) -> ControlEndpoint:
    """Where the control plane of the cluster described by `spec_path` is, its token and how to trust it."""
    from mbworker.provision.errors import ProvisionError
    from mbworker.provision.secrets import default_state_dir
    from mbworker.provision.spec import load_spec

    try:
        spec = load_spec(spec_path)
        return read_endpoint(state_dir or default_state_dir(spec_path, spec.name))
    except (ControlError, ProvisionError) as exc:
        raise ConfigError(str(exc)) from None


def function_client(args: argparse.Namespace) -> AdminClient:
    """For the function commands: the control plane's client with `--cluster SPEC`, else one worker's admin
    client (`--url/--token`, env, the local data dir)."""
    if getattr(args, "cluster", None) is not None:
        return ControlClient.connect(resolve_control(args.cluster))
    from mbworker.cli.admin_client import resolve_admin

    return AdminClient(*resolve_admin(args.url, args.token))


class ControlClient(AdminClient):
    prefix = "/control/v1"

    @classmethod
    def connect(cls, endpoint: ControlEndpoint, *, timeout: float = 120.0) -> ControlClient:
        """A client of `endpoint`, verifying its certificate with the cluster CA when it has one."""
        try:
            verify = endpoint.verify()
        except ControlError as exc:
            raise ConfigError(exc.message) from None
        return cls(endpoint.url, endpoint.token, timeout=timeout, verify=verify, server_name=endpoint.server_name)

    def nodes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", f"{self.prefix}/nodes")
        return result

    def drain_node(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"{self.prefix}/nodes/{name}/drain")
        return result

    def undrain_node(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"{self.prefix}/nodes/{name}/drain")
        return result

    def release(self) -> dict[str, Any]:
        """The cluster's release and the workers running another version (control/release.py)."""
        result: dict[str, Any] = self._call("GET", f"{self.prefix}/release?workers=1")
        return result

    def upstreams(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", f"{self.prefix}/upstreams")
        return result

    def revoke_session(self, session_id: str, until: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"session_id": session_id}
        if until is not None:
            body["until"] = until
        result: dict[str, Any] = self._call("POST", f"{self.prefix}/sessions/revoke", json=body)
        return result

    def audit(self, limit: int | None = None) -> list[dict[str, Any]]:
        params = {"limit": str(limit)} if limit else {}
        result: list[dict[str, Any]] = self._call("GET", f"{self.prefix}/audit", params=params)
        return result

    def logs(self, slug: str, since: str | None, limit: int | None) -> list[dict[str, Any]]:
        params: dict[str, str] = {}
        if since:
            params["since"] = since
        if limit is not None:
            params["limit"] = str(limit)
        result: list[dict[str, Any]] = self._call("GET", f"{self.prefix}/functions/{slug}/logs", params=params)
        return result
