"""The public names of the operations modules exist (a rename must update `__all__` and the lead's wiring)."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    "module", ["worker.metrics", "worker.function_logs", "worker.doctor", "worker.docs_gen", "worker.systemd"]
)
def test_all_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__all__
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name}"
