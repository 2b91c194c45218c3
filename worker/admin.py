"""The admin API on its own listener (`/admin/v1/...`): deploy, list, rollback, delete, health, drain.

Never unauthenticated: every call needs `Authorization: Bearer <admin token>`, compared in constant time.
Request bodies are bounded (the bundle cap for uploads, 64 KiB for everything else).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from mbworker.lib.http.types import BodyTooLarge, HttpRequest, Responder, WebSocketHandler
from mbworker.worker.deployer import Deployer, DeployFailed
from mbworker.worker.deployments.archive import BundleRejected
from mbworker.worker.deployments.project_secrets import digest
from mbworker.worker.deployments.store import Deployment, Quarantined, StoreError
from mbworker.worker.function_logs import FunctionLogs, serve_logs
from mbworker.worker.metrics import Metrics, serve_metrics
from mbworker.worker.responses import send_error, send_json
from mbworker.worker.upgrade_request import UpgradeRequests, UpgradeUnavailable

log = logging.getLogger("mbworker.admin")

SLUG = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
SMALL_BODY = 64 * 1024
_STORE_ERROR_CODES = {404: "NOT_FOUND", 409: "CONFLICT", 503: "UNAVAILABLE", 507: "INSUFFICIENT_STORAGE"}

Route = Callable[[HttpRequest, Responder, list[str]], Awaitable[None]]


def deployment_json(dep: Deployment) -> dict[str, Any]:
    """Metadata only: secrets never leave the store (the model carries their names, not their values)."""
    return dep.model_dump(mode="json")


def quarantine_json(q: Quarantined) -> dict[str, Any]:
    """A `functions list` row for a file the store set aside (status QUARANTINED, `reason` says why)."""
    return {
        "slug": q.slug,
        "version": q.version or 0,
        "status": "QUARANTINED",
        "runtime": "",
        "verify_jwt": None,
        "updated_at": "",
        "path": q.path,
        "reason": q.reason,
    }


class AdminNode(Protocol):
    """What the admin API asks of the node it serves (the daemon's `Node`): the app reaches the node only
    through this seam, and owns none of it."""

    @property
    def deployer(self) -> Deployer: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def function_logs(self) -> FunctionLogs: ...

    @property
    def drain_started(self) -> trio.Event:
        """Set when the node starts draining: a log follower ends then."""
        ...

    def health(self) -> dict[str, Any]: ...

    def request_drain(self) -> bool:
        """Start draining (idempotent); True once public work has finished, which the asker polls for."""
        ...

    async def purge_cache(self, slug: str | None) -> int:
        """Drop cached results of `slug` (or all): this node's and, in a cluster, the shared ones."""
        ...

    @property
    def upgrade(self) -> UpgradeRequests | None:
        """Where a rolling upgrade's request is left (None: upgrades are not enabled on this node)."""
        ...


class AdminApp:
    """HttpApp for the admin listener. Owns nothing: the node and its parts belong to the daemon."""

    def __init__(self, node: AdminNode, token: str, *, max_bundle_bytes: int, public_url: str = "") -> None:
        self.node = node
        self.deployer = node.deployer
        self.upgrade = node.upgrade
        self.public_url = public_url
        self._token = token.encode()
        self.max_bundle_bytes = max_bundle_bytes
        self._routes: list[tuple[str, re.Pattern[str], Route]] = [
            ("GET", re.compile(r"^/admin/v1/health$"), self._health),
            ("GET", re.compile(r"^/metrics$"), self._metrics),
            ("GET", re.compile(r"^/admin/v1/functions/([^/]+)/logs$"), self._logs),
            ("GET", re.compile(r"^/admin/v1/functions$"), self._list),
            ("GET", re.compile(r"^/admin/v1/functions/([^/]+)$"), self._versions),
            ("GET", re.compile(r"^/admin/v1/functions/([^/]+)/attempts$"), self._attempts),
            ("POST", re.compile(r"^/admin/v1/functions/([^/]+)/deploy$"), self._deploy),
            ("PUT", re.compile(r"^/admin/v1/functions/([^/]+)$"), self._deploy),
            ("POST", re.compile(r"^/admin/v1/functions/([^/]+)/rollback$"), self._rollback),
            (
                "POST",
                re.compile(r"^/admin/v1/functions/([^/]+)/versions/([0-9]+)/(warm|activate|abandon)$"),
                self._version_step,
            ),
            ("DELETE", re.compile(r"^/admin/v1/functions/([^/]+)$"), self._delete),
            ("GET", re.compile(r"^/admin/v1/secrets$"), self._secrets_list),
            ("POST", re.compile(r"^/admin/v1/secrets$"), self._secrets_set),
            ("POST", re.compile(r"^/admin/v1/secrets/unset$"), self._secrets_unset),
            ("POST", re.compile(r"^/admin/v1/drain$"), self._drain),
            ("POST", re.compile(r"^/admin/v1/upgrade$"), self._upgrade),
            ("POST", re.compile(r"^/admin/v1/cache/purge$"), self._purge),
        ]

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None:
        return None

    def _authorized(self, request: HttpRequest) -> bool:
        header = request.header(b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        # compare_digest on equal-length inputs only leaks the length of the expected token, which is fixed.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token, self._token)

    async def handle_http(self, request: HttpRequest, responder: Responder) -> None:
        if not self._authorized(request):
            await send_error(responder, 401, "UNAUTHORIZED", "Missing or invalid admin token")
            return
        matched_path = False
        for method, pattern, route in self._routes:
            m = pattern.match(request.path)
            if m is None:
                continue
            matched_path = True
            if method == request.method:
                try:
                    await route(request, responder, list(m.groups()))
                except BodyTooLarge as exc:
                    await send_error(responder, 413, "PAYLOAD_TOO_LARGE", str(exc) or "Request body too large")
                except StoreError as exc:
                    code = _STORE_ERROR_CODES.get(exc.status, "BAD_REQUEST")
                    await send_error(responder, exc.status, code, str(exc))
                return
        if matched_path:
            await send_error(responder, 405, "METHOD_NOT_ALLOWED", f"{request.method} not allowed here")
        else:
            await send_error(responder, 404, "NOT_FOUND", f"No admin route {request.path}")

    async def _json_body(self, request: HttpRequest) -> dict[str, Any]:
        raw = await request.body.read_all(SMALL_BODY)
        if not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except RecursionError:  # nested past Python's recursion limit: bad input, not a server fault
            raise ValueError("JSON nested too deeply") from None
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return value

    async def _health(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        await send_json(responder, 200, self.node.health())

    async def _metrics(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        await serve_metrics(request, responder, self.node.metrics)

    async def _logs(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        await serve_logs(
            request,
            responder,
            args[0],
            self.node.function_logs,
            exists=lambda slug: self.deployer.table.get(slug) is not None,
            until=self.node.drain_started,
        )

    async def _list(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        deps = await self.deployer.store.list()
        rows = [deployment_json(d) for d in deps]
        # Files the store set aside show up too, so `functions list` says what is not served and why.
        rows += [quarantine_json(q) for q in await self.deployer.store.quarantined()]
        await send_json(responder, 200, rows)

    async def _versions(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        deps = await self.deployer.store.versions(args[0])
        if not deps:
            await send_error(responder, 404, "NOT_FOUND", f"No function {args[0]!r}")
            return
        await send_json(responder, 200, [deployment_json(d) for d in deps])

    async def _attempts(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        """Deploys that failed to boot (kept apart from the versions, whose numbers they gave back)."""
        attempts = await self.deployer.store.attempts(args[0])
        await send_json(responder, 200, [a.model_dump(mode="json") for a in attempts])

    async def _deploy(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        slug = args[0]
        if not SLUG.match(slug):
            await send_error(responder, 400, "INVALID_SLUG", f"Slug {slug!r} must match {SLUG.pattern}")
            return
        sha = (request.header(b"x-mbworker-sha256") or b"").decode("ascii", "replace") or None
        archive = await request.body.read_all(self.max_bundle_bytes)
        # ?activate=0: the control plane's first phase (store and boot here; it activates once every worker booted)
        stage_only = "activate=0" in request.query.split("&")
        try:
            dep = await (self.deployer.stage if stage_only else self.deployer.deploy)(slug, archive, sha)
        except BundleRejected as exc:
            await send_error(responder, exc.status, "BUNDLE_REJECTED", exc.reason)
            return
        except DeployFailed as exc:
            await send_error(
                responder,
                exc.error.status,
                exc.error.code,
                exc.error.message,
                output=exc.error.output[-8000:],
                version=exc.deployment.version,
            )
            return
        log.info("deployed %s v%d", dep.slug, dep.version)
        await send_json(responder, 201, {**deployment_json(dep), "url": f"{self.public_url}/functions/v1/{dep.slug}"})

    async def _version_step(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        """The control plane's two-phase deploy: `warm` a stored version here (boot, not live), `activate` it
        (cluster-wide switch), or `abandon` it (retire here; with {"error"}, discard it as a failed attempt)."""
        slug, version, step = args[0], int(args[1]), args[2]
        dep = await self.deployer.store.get(slug, version)
        if dep is None:
            await send_error(responder, 404, "NOT_FOUND", f"No version {version} of {slug!r}")
            return
        if step == "warm":
            try:
                await self.deployer.warm(dep)
            except DeployFailed as exc:
                boot = exc.error
                await send_error(responder, boot.status, boot.code, boot.message, output=boot.output[-8000:])
                return
            await send_json(responder, 200, deployment_json(dep))
        elif step == "activate":
            await send_json(responder, 200, deployment_json(await self.deployer.activate(slug, version)))
        else:
            try:
                body = await self._json_body(request)
            except ValueError as exc:
                await send_error(responder, 400, "BAD_REQUEST", f"Invalid JSON body: {exc}")
                return
            error = body.get("error")
            await self.deployer.abandon(dep, error if isinstance(error, str) else None)
            await send_json(responder, 200, {"slug": slug, "version": version, "abandoned": True})

    async def _rollback(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        try:
            body = await self._json_body(request)
        except ValueError as exc:
            await send_error(responder, 400, "BAD_REQUEST", f"Invalid JSON body: {exc}")
            return
        to = body.get("version")
        if to is not None and not isinstance(to, int):
            await send_error(responder, 400, "BAD_REQUEST", "version must be an integer")
            return
        dep = await self.deployer.rollback(args[0], to)
        await send_json(responder, 200, deployment_json(dep))

    async def _delete(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        removed = await self.deployer.delete(args[0])
        await send_json(responder, 200, {"slug": args[0], "removed": [d.version for d in removed]})

    async def _secrets_list(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        """Names and sha256 digests: values never leave the node."""
        values = await self.deployer.store.project_secrets()
        await send_json(responder, 200, [{"name": k, "digest": digest(v)} for k, v in sorted(values.items())])

    async def _secrets_set(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        """Body {"secrets": {"NAME": "value", ...}}: every function sees them from its next process on."""
        try:
            values = (await self._json_body(request)).get("secrets")
        except ValueError as exc:
            await send_error(responder, 400, "BAD_REQUEST", f"Invalid JSON body: {exc}")
            return
        if not isinstance(values, dict) or not values or not all(isinstance(v, str) for v in values.values()):
            await send_error(responder, 400, "BAD_REQUEST", 'expected {"secrets": {"NAME": "value", ...}}')
            return
        await self.deployer.store.set_secrets(values)
        await self.deployer.refresh_secrets()  # this node's functions before the answer; others follow the feed
        await send_json(responder, 200, {"set": sorted(values)})

    async def _secrets_unset(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        """Body {"names": ["NAME", ...]}."""
        try:
            names = (await self._json_body(request)).get("names")
        except ValueError as exc:
            await send_error(responder, 400, "BAD_REQUEST", f"Invalid JSON body: {exc}")
            return
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            await send_error(responder, 400, "BAD_REQUEST", 'expected {"names": ["NAME", ...]}')
            return
        removed = await self.deployer.store.unset_secrets(names)
        await self.deployer.refresh_secrets()
        await send_json(responder, 200, {"unset": removed})

    async def _drain(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        drained = self.node.request_drain()
        # Poll until "drained" is true (in-flight requests finished); then the node exits. 202 while it drains.
        await send_json(responder, 200 if drained else 202, {"draining": True, "drained": drained})

    async def _upgrade(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        """Body {"version"}: the control plane's rolling upgrade (worker/upgrade_request.py). 202: the request is
        left for the node's upgrade helper and the node drains; it comes back on the new version. Called directly
        (not by the control plane's rollout) it does not move the cluster's release: the node converges back to the
        release at its next start (control/release.py); only `cluster upgrade` sticks."""
        try:
            version = (await self._json_body(request)).get("version")
            if self.upgrade is None:
                raise UpgradeUnavailable("upgrades are not enabled on this node")
            if not isinstance(version, str):
                raise ValueError('expected {"version": "X.Y.Z"}')
            await self.upgrade.request(version)
        except ValueError as exc:
            await send_error(responder, 400, "BAD_REQUEST", str(exc))
            return
        except UpgradeUnavailable as exc:
            await send_error(responder, 501, "NOT_IMPLEMENTED", str(exc))
            return
        log.info("upgrade to %s requested: draining for the upgrade helper", version)
        await send_json(responder, 202, {"version": version, "draining": True})

    async def _purge(self, request: HttpRequest, responder: Responder, args: list[str]) -> None:
        try:
            body = await self._json_body(request)
        except ValueError as exc:
            await send_error(responder, 400, "BAD_REQUEST", f"Invalid JSON body: {exc}")
            return
        slug = body.get("slug")
        purged = await self.node.purge_cache(slug if isinstance(slug, str) else None)
        await send_json(responder, 200, {"purged": purged})
