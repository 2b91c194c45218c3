"""docs_gen covers every setting and metric, docs/operations.md is current, docs/architecture.md gives the
daemon's start order as the code has it, the systemd unit is valid."""

from __future__ import annotations

import configparser
import inspect
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel

from mbworker.cli import docs_gen
from mbworker.runtimes.limits import Limits
from mbworker.worker.config import WorkerSettings
from mbworker.worker.daemon import Node
from mbworker.worker.metrics import Metrics, RequestInstruments
from mbworker.worker.systemd import UNIT_NAME, unit_text
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_lists_every_field() -> None:
    text = docs_gen.config_reference()
    for name, field in WorkerSettings.model_fields.items():
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            for sub in nested.model_fields:
                assert f"| `{name}.{sub}` | `MBWORKER_{name.upper()}__{sub.upper()}` |" in text
            continue
        assert f"| `{name}` | `MBWORKER_{name.upper()}` |" in text
    for name, info in Limits.model_fields.items():
        assert f"| `limits.{name}` | `MBWORKER_LIMITS__{name.upper()}` |" in text
        assert f"| `{name}` |" in text
        assert (info.description or "") in text
    assert "`debug` \\| `info`" in text  # a Literal shows its choices


def test_metrics_reference_lists_every_family() -> None:
    text = docs_gen.metrics_reference()
    for _spec, _source in docs_gen.SPECS:
        for stat in _spec.stats:
            assert f"`mbworker_{stat.name}`" in text
    assert "`mbworker_invocations_total` | counter | function, status |" in text
    assert "`mbworker_request_duration_seconds` | histogram | function |" in text
    instruments = [x for x in vars(Metrics(process=False)).values() if hasattr(x, "_name")]
    assert instruments
    for instrument in instruments:
        assert f"`{instrument._name}" in text, instrument._name
    for name, *_ in RequestInstruments.DOCS:
        assert f"`mbworker_{name}" in text, name
    for x in instruments:
        assert f"`{x._name}" in text


def test_operations_doc_is_current() -> None:
    doc = ROOT / "docs" / "operations.md"
    text = doc.read_text(encoding="utf-8")
    assert docs_gen.replace_sections(text) == text, "run: python -m mbworker.cli.docs_gen --write docs/operations.md"
    assert docs_gen.main(["--check", str(doc)]) == 0


def test_architecture_start_order_is_the_codes() -> None:
    """The numbered steps of docs/architecture.md's "Start order" name `Node`'s step methods in the order
    `Node.serve` calls them."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc.split("## Start order", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\d+\. `(_\w+)`", section, flags=re.MULTILINE)
    called = re.findall(r"await self\.(_\w+)\(", inspect.getsource(Node.serve))
    assert called == [*documented, "_drain_when_asked"]  # then it serves until drained
    assert len(documented) >= 6


def test_replace_sections_needs_markers() -> None:
    with pytest.raises(ValueError, match="markers"):
        docs_gen.replace_sections("no markers here")
    stale = "<!-- BEGIN GENERATED: config -->\nSTALE-CONTENT\n<!-- END GENERATED: config -->\n"
    stale += "<!-- BEGIN GENERATED: metrics -->\n<!-- END GENERATED: metrics -->\n"
    fresh = docs_gen.replace_sections(stale)
    assert "STALE-CONTENT" not in fresh
    assert "MBWORKER_DRAIN_GRACE_S" in fresh
    assert docs_gen.replace_sections(fresh) == fresh


def parse_unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(text)
    return parser


def test_unit_has_the_required_settings() -> None:
    unit = parse_unit(unit_text())
    service = unit["Service"]
    expected = {
        "User": "mbworker",
        "EnvironmentFile": "/etc/mbworker/env",
        "ExecStart": "/opt/mbworker/.venv/bin/mbworker serve --config /etc/mbworker/worker.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillMode": "mixed",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/mbworker",
        "PrivateTmp": "yes",
    }
    for key, value in expected.items():
        assert service.get(key) == value, key
    assert int(service["LimitNOFILE"]) >= 65536
    grace = WorkerSettings.model_fields["drain_grace_s"].default
    assert int(service["TimeoutStopSec"]) > grace + 5  # the daemon's own drain deadline is grace + 5 s
    assert "MemoryDenyWriteExecute" not in service  # V8 and wasmtime JIT need W+X pages
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_ships_as_package_data() -> None:
    assert (ROOT / "worker" / "systemd" / UNIT_NAME).read_text(encoding="utf-8") == unit_text()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"*.service"' in pyproject


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")  # Debian's systemd package: a failure under CI when missing
    # verify insists the ExecStart binary exists: point it at one that does; every other line stays.
    text = unit_text().replace("/opt/mbworker/.venv/bin/mbworker", shutil.which("true") or "/bin/true")
    path = tmp_path / UNIT_NAME
    path.write_text(text, encoding="utf-8")
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if UNIT_NAME in line]
    assert done.returncode == 0, done.stderr
    assert not problems, problems  # e.g. "Unknown key ... ignoring"
