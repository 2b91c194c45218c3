"""The public names of the operations modules exist (a rename must update `__all__` and the lead's wiring)."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "mbworker.worker.metrics",
        "mbworker.worker.function_logs",
        "mbworker.cli.doctor",
        "mbworker.cli.docs_gen",
        "mbworker.worker.systemd",
    ],
)
def test_all_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__all__
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name}"
