"""The project's secrets: JWT secret and admin token, plus the anon / service_role keys signed with the secret.

Owner: the data dir. Unset secrets are generated on first start and kept in `<data_dir>/secrets/` (mode 0600),
the way `supabase start` hands out local keys.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from mbworker.worker.config import WorkerSettings

KEY_LIFETIME_S = 10 * 365 * 24 * 3600
ISSUER = "mbworker"


@dataclass(frozen=True)
class ProjectKeys:
    jwt_secret: str
    admin_token: str
    anon_key: str
    service_role_key: str


def secrets_dir(data_dir: Path) -> Path:
    return data_dir / "secrets"


def admin_token_file(data_dir: Path) -> Path:
    """Where the admin token lives; the CLI reads it as its last fallback."""
    return secrets_dir(data_dir) / "admin_token"


def _read_or_create(path: Path, nbytes: int) -> str:
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_urlsafe(nbytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def mint_key(secret: str, role: str, *, lifetime_s: int = KEY_LIFETIME_S) -> str:
    """An HS256 API key for `role` (anon, service_role), like Supabase's legacy keys."""
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "role": role, "iat": now, "exp": now + lifetime_s}, secret, algorithm="HS256")


def load_project_keys(settings: WorkerSettings) -> ProjectKeys:
    """Secrets from settings, else from the data dir, else generated there. Blocking: call from a thread."""
    d = secrets_dir(settings.data_dir)
    jwt_secret = (
        settings.jwt_secret.get_secret_value() if settings.jwt_secret else _read_or_create(d / "jwt_secret", 32)
    )
    admin_token = (
        settings.admin_token.get_secret_value()
        if settings.admin_token
        else _read_or_create(admin_token_file(settings.data_dir), 32)
    )
    keys_file = d / "keys.env"
    # Keys are re-minted only when the secret changes, so clients keep working across restarts.
    anon = service = ""
    if keys_file.exists():
        values = dict(line.split("=", 1) for line in keys_file.read_text().splitlines() if "=" in line)
        anon, service = values.get("ANON_KEY", ""), values.get("SERVICE_ROLE_KEY", "")
        try:
            for k in (anon, service):
                jwt.decode(k, jwt_secret, algorithms=["HS256"])
        except jwt.PyJWTError:
            anon = service = ""
    if not anon:
        anon, service = mint_key(jwt_secret, "anon"), mint_key(jwt_secret, "service_role")
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"ANON_KEY={anon}\nSERVICE_ROLE_KEY={service}\n")
    return ProjectKeys(jwt_secret=jwt_secret, admin_token=admin_token, anon_key=anon, service_role_key=service)
