"""The control token: one file, created once with mode 0600, refused when others can read it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from mbworker.control.errors import ControlError

TOKEN_NAME = "control"
"""The name the audit ring records for calls made with this token."""


def load_or_create_token(path: Path) -> str:
    """Read the token at `path`, creating it (atomically, 0600; its folder 0700) on first use."""
    try:
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise ControlError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
            token = path.read_text().strip()
            if len(token) < 32:
                raise ControlError(f"{path} holds no usable token (at least 32 characters)")
            return token
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_hex(32)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.replace(tmp, path)
        return token
    except OSError as exc:
        raise ControlError(f"cannot use control token file {path}: {exc.strerror}") from None
