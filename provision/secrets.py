"""Cluster secrets: generated once, kept in a local state directory (mode 0700, file mode 0600), never printed.

The control plane's two tokens (the operators' control token and the read-only node token proxies use) are made
at the same moment, in their own files of the state dir (`mbworker.control.endpoint`), where the CLI reads them;
they are not part of `secrets.json`, so adding them changed no existing cluster's secrets digest.

`load_or_create_secrets` owns the file. Values are `SecretStr`, so printing the model, an exception or a
plan shows `**********`; code that needs a value calls `.get_secret_value()` at the last moment (rendering
cloud-init, building an environment).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from mbworker.control.endpoint import control_token, node_token
from mbworker.control.errors import ControlError

from .errors import ProvisionError

SECRETS_FILE = "secrets.json"


class ClusterSecrets(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    postgres_password: SecretStr
    replication_password: SecretStr
    redis_password: SecretStr
    jwt_secret: SecretStr
    admin_token: SecretStr
    grafana_password: SecretStr
    #: State pillar internals: Sentinel's own password, Patroni's REST API (basic auth), etcd's root user.
    sentinel_password: SecretStr
    patroni_rest_password: SecretStr
    etcd_root_password: SecretStr

    @classmethod
    def generate(cls) -> ClusterSecrets:
        return cls.model_validate({name: _new(name) for name in cls.model_fields})

    def digest(self) -> str:
        """A label-safe fingerprint of these secrets (a hash: it reveals nothing of them). The cluster's network
        carries it, so a plan made with another state dir's secrets is refused instead of splitting the cluster."""
        h = hashlib.sha256(b"mbworker-cluster-secrets\0")
        for name in sorted(type(self).model_fields):
            h.update(name.encode() + b"=" + getattr(self, name).get_secret_value().encode() + b"\0")
        return h.hexdigest()[:32]


def _new(name: str) -> str:
    return secrets.token_hex(32 if name in ("jwt_secret", "admin_token") else 24)


def default_state_dir(spec_path: Path, cluster: str) -> Path:
    """`.mbcluster-<name>/` next to the spec file: secrets travel with the spec, outside version control."""
    return spec_path.resolve().parent / f".mbcluster-{cluster}"


def load_or_create_secrets(state_dir: Path) -> ClusterSecrets:
    """Read the cluster's secrets, creating them (atomically, mode 0600) on first use, and the control tokens."""
    loaded = _load_or_create(state_dir)
    try:
        control_token(state_dir)
        node_token(state_dir)
    except ControlError as exc:
        raise ProvisionError(exc.message) from None
    return loaded


def control_tokens(state_dir: Path) -> tuple[str, str]:
    """(control token, node token) of the cluster, created on first use."""
    try:
        return control_token(state_dir), node_token(state_dir)
    except ControlError as exc:
        raise ProvisionError(exc.message) from None


def _load_or_create(state_dir: Path) -> ClusterSecrets:
    path = state_dir / SECRETS_FILE
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise ProvisionError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
            raw = json.loads(path.read_text())
            missing = [n for n in ClusterSecrets.model_fields if n not in raw]
            if not missing:
                return ClusterSecrets.model_validate(raw)
            # a file from before a secret was added: add it once, keep everything that was there
            loaded = ClusterSecrets.model_validate(raw | {n: _new(n) for n in missing})
        else:
            loaded = ClusterSecrets.generate()
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({k: v.get_secret_value() for k, v in loaded}, f, indent=2)
        os.replace(tmp, path)
        return loaded
    except OSError as exc:
        raise ProvisionError(f"cannot use secrets file {path}: {exc.strerror}") from None
    except (ValueError, ValidationError) as exc:
        raise ProvisionError(f"secrets file {path} is corrupt: {type(exc).__name__}") from None
