"""Cluster secrets: generated once, kept in a local state directory (mode 0700, file mode 0600), never printed.

`load_or_create_secrets` owns the file. Values are `SecretStr`, so printing the model, an exception or a
plan shows `**********`; code that needs a value calls `.get_secret_value()` at the last moment (rendering
cloud-init, building an environment).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

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

    @classmethod
    def generate(cls) -> ClusterSecrets:
        return cls(
            postgres_password=SecretStr(secrets.token_hex(24)),
            replication_password=SecretStr(secrets.token_hex(24)),
            redis_password=SecretStr(secrets.token_hex(24)),
            jwt_secret=SecretStr(secrets.token_hex(32)),
            admin_token=SecretStr(secrets.token_hex(32)),
            grafana_password=SecretStr(secrets.token_hex(16)),
        )


def default_state_dir(spec_path: Path, cluster: str) -> Path:
    """`.mbcluster-<name>/` next to the spec file: secrets travel with the spec, outside version control."""
    return spec_path.resolve().parent / f".mbcluster-{cluster}"


def load_or_create_secrets(state_dir: Path) -> ClusterSecrets:
    """Read the cluster's secrets, creating them (atomically, mode 0600) on first use."""
    path = state_dir / SECRETS_FILE
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise ProvisionError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
            raw = json.loads(path.read_text())
            return ClusterSecrets.model_validate(raw)
        created = ClusterSecrets.generate()
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({k: v.get_secret_value() for k, v in created}, f, indent=2)
        os.replace(tmp, path)
        return created
    except OSError as exc:
        raise ProvisionError(f"cannot use secrets file {path}: {exc.strerror}") from None
    except (ValueError, ValidationError) as exc:
        raise ProvisionError(f"secrets file {path} is corrupt: {type(exc).__name__}") from None
