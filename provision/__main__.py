"""`python -m provision …`: the provisioner's commands without the mbworker CLI (see provision/cli.py)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
