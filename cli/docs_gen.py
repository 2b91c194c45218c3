"""Generated parts of docs/operations.md: the configuration reference (from the settings models) and the metrics
list (from `worker.metrics`). The models are the source of truth; the doc is refreshed from them.

    python -m mbworker.cli.docs_gen                          # print both sections
    python -m mbworker.cli.docs_gen config|metrics           # print one
    python -m mbworker.cli.docs_gen --write docs/operations.md   # replace the marked sections in place
    python -m mbworker.cli.docs_gen --check docs/operations.md   # exit 1 if they are stale (for CI)

Sections live between `<!-- BEGIN GENERATED: name -->` and `<!-- END GENERATED: name -->`.
"""

from __future__ import annotations

import argparse
import enum
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from mbworker.runtimes.limits import Limits
from mbworker.worker.config import WorkerSettings
from mbworker.worker.metrics import (
    CACHE_STATS,
    HTTP_STATS,
    NAMESPACE,
    PUBSUB_STATS,
    REALTIME_STATS,
    REDIS_STATS,
    RUNTIME_STATS,
    Metrics,
    RequestInstruments,
    StatsSpec,
)

__all__ = ["SECTIONS", "config_reference", "metrics_reference", "replace_sections"]

ENV_PREFIX = "MBWORKER_"
NESTED = "__"

SOURCE_LABELS: dict[str, tuple[str, ...]] = {"runtime": ("runtime",), "http": ("listener",)}
"""Labels the daemon gives each statistics source when it registers it (see `Metrics.add_statistics`)."""
SPECS: tuple[tuple[StatsSpec, str], ...] = (
    (RUNTIME_STATS, "each runtime's `statistics()` (deno, wasm)"),
    (CACHE_STATS, "the result cache's `statistics()`"),
    (REALTIME_STATS, "the realtime service's `statistics()`"),
    (REDIS_STATS, "the Redis client's `statistics()` (cluster mode)"),
    (PUBSUB_STATS, "the Redis pub/sub connection's `statistics()` (cluster mode)"),
    (HTTP_STATS, "each HTTP listener's `statistics()` (public, admin)"),
)


# -- configuration -----------------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        name = " \\| ".join(_type_name(a) for a in rest)
        return f"{name} (optional)" if len(rest) < len(args) else name
    if annotation is SecretStr:
        return "secret"
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return " \\| ".join(f"`{m.value}`" for m in annotation)
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "Path": "path"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation).replace("typing.", "")


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return "(see below)"
    value = info.default
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _rows(model: type[BaseModel], env: str, toml: str) -> Iterator[tuple[str, str, str, str, str]]:
    for name, info in model.model_fields.items():
        nested = _nested_model(info.annotation)
        if nested is not None:
            yield from _rows(nested, f"{env}{name.upper()}{NESTED}", f"{toml}{name}.")
            continue
        description = (info.description or "").replace("|", "\\|").replace("\n", " ")
        yield (f"`{toml}{name}`", f"`{env}{name.upper()}`", _type_name(info.annotation), _default(info), description)


def config_reference() -> str:
    """Markdown tables of every operator setting: TOML key, environment variable, type, default, meaning."""
    out = [
        "Precedence: command-line flags > `MBWORKER_*` environment > `--config` TOML file (or `MBWORKER_CONFIG`) >",
        "defaults. Nested keys are TOML tables (`[limits]`) or env names with a double underscore",
        "(`MBWORKER_LIMITS__MEMORY_MB=512`). Unknown keys in the file are errors.",
        "",
        f"### `{WorkerSettings.__name__}`",
        "",
        (WorkerSettings.__doc__ or "").strip(),
        "",
        "| key | environment | type | default | description |",
        "|---|---|---|---|---|",
    ]
    out += [f"| {' | '.join(row)} |" for row in _rows(WorkerSettings, ENV_PREFIX, "")]
    out += [
        "",
        f"### `{Limits.__name__}` (`[limits]`, and `[limits]` in a function's function.toml)",
        "",
        (Limits.__doc__ or "").strip(),
        "",
        "| key | default | type | description |",
        "|---|---|---|---|",
    ]
    for key, _env, kind, default, description in _rows(Limits, "", ""):
        out.append(f"| {key} | {default} | {kind} | {description} |")
    return "\n".join(out) + "\n"


# -- metrics -----------------------------------------------------------------------------------------------


def _instrument_rows(metrics: Metrics) -> Iterator[tuple[str, str, str, str]]:
    for family, family_kind, label_names, meaning in RequestInstruments.DOCS:
        ending = "_total" if family_kind == "counter" else ""
        yield (f"`{NAMESPACE}_{family}{ending}`", family_kind, ", ".join(label_names), meaning)
    for attr in vars(metrics).values():
        name = getattr(attr, "_name", None)
        kind = getattr(attr, "_type", None)
        if not isinstance(name, str) or not isinstance(kind, str):
            continue
        labels = ", ".join(getattr(attr, "_labelnames", ()))
        suffix = "_total" if kind == "counter" else ""
        yield (f"`{name}{suffix}`", kind, labels, str(getattr(attr, "_documentation", "")))


def metrics_reference() -> str:
    """Markdown tables of every metric family: hot-path instruments and scrape-time statistics."""
    metrics = Metrics(process=False)
    out = [
        "Every name starts with `mbworker_`. Scraped from `GET /metrics` on the admin listener (bearer token).",
        "`function` is a deployed slug (`_unmatched` for requests that matched none, `_other` past",
        f"{metrics.max_functions} slugs); `status` is the HTTP status. The process collector adds `process_*`.",
        "",
        "#### Counted on the hot path",
        "",
        "| metric | type | labels | meaning |",
        "|---|---|---|---|",
    ]
    out += [f"| {' | '.join(row)} |" for row in _instrument_rows(metrics)]
    for spec, source in SPECS:
        out += ["", f"#### From {source}", "", "| metric | type | labels | meaning |", "|---|---|---|---|"]
        for stat in spec.stats:
            labels = [*SOURCE_LABELS.get(spec.name, ()), *([stat.key_label] if stat.key_label else [])]
            out.append(f"| `{NAMESPACE}_{stat.name}` | {stat.kind} | {', '.join(labels)} | {stat.help} |")
    return "\n".join(out) + "\n"


# -- the document ------------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[], str]] = {"config": config_reference, "metrics": metrics_reference}


def replace_sections(text: str) -> str:
    """`text` with every generated section refreshed. Raises ValueError if a section's markers are missing."""
    for name, generate in SECTIONS.items():
        pattern = re.compile(
            rf"(<!-- BEGIN GENERATED: {name} -->\n).*?(<!-- END GENERATED: {name} -->)", flags=re.DOTALL
        )
        if not pattern.search(text):
            raise ValueError(f"markers for section {name!r} not found")
        body = generate()
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)  # type: ignore[misc]
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mbworker.cli.docs_gen", description=__doc__.splitlines()[0])
    parser.add_argument("section", nargs="?", choices=sorted(SECTIONS), help="print only this section")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="DOC", help="refresh the marked sections of DOC in place")
    group.add_argument("--check", type=Path, metavar="DOC", help="exit 1 if DOC's marked sections are stale")
    args = parser.parse_args(argv)
    if args.write or args.check:
        path: Path = args.write or args.check
        current = path.read_text(encoding="utf-8")
        fresh = replace_sections(current)
        if args.check:
            if fresh != current:
                print(f"{path} is stale: run python -m mbworker.cli.docs_gen --write {path}", file=sys.stderr)
                return 1
            return 0
        path.write_text(fresh, encoding="utf-8")
        return 0
    names = [args.section] if args.section else list(SECTIONS)
    sys.stdout.write("\n".join(SECTIONS[name]() for name in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
