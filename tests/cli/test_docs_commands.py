"""Every `mbworker …` command shown in README.md and docs/ exists, with the flags shown (the argparse tree).

Where commands are looked for: code spans that start with the program (`mbworker deploy PATH`, also as
`.venv/bin/mbworker`), and lines of code blocks that start with it. In ```sh blocks and code spans a word that
is no command is an error; in other blocks (a banner, a benchmark table's `mbworker hello` row) such a line is
not a command and is left alone.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from mbworker.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAM = re.compile(r"(?:^|(?<=\s)|(?<=`))(?:[\w./-]*/)?mbworker\s+(?P<rest>[^`\n]*)")
ENDS = {"#", "|", "||", "&&", ";", ">", "2>&1", "(or"}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def shown_commands() -> Iterator[tuple[str, int, str, bool]]:
    """(file, line, text after `mbworker`, strict) for every command shown in the docs."""
    for doc in DOCS:
        fence: str | None = None
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("```"):
                fence = None if fence is not None else line.strip().removeprefix("```")
                continue
            if fence is not None:
                match = PROGRAM.match(line.strip())
                if match and not re.search(r"-u\s+mbworker\b", line):
                    yield doc.name, number, match["rest"], fence in ("sh", "bash", "console", "shell")
                elif "bin/mbworker " in line:
                    yield doc.name, number, line.split("bin/mbworker ", 1)[1], True
                continue
            for span in re.findall(r"`([^`]+)`", line):
                match = PROGRAM.match(span)
                if match:
                    yield doc.name, number, match["rest"], True


def check(rest: str, strict: bool) -> str | None:
    """None when `mbworker REST` parses as far as the docs show it; else what is wrong."""
    parser = build_parser()
    words = rest.split()
    path: list[str] = []
    while words and (subs := _subcommands(parser)):
        word = words[0].strip("[]")
        names = word.split("|")  # `provision plan|apply|scale|destroy`
        if not all(n in subs for n in names):
            if not strict:
                return None  # not a command: a table row or a banner
            return f"no command {' '.join(['mbworker', *path, word])!r} (have: {', '.join(sorted(subs))})"
        path.append(word)
        parser = subs[names[0]]
        words = words[1:]
    known = _options(parser)
    for word in words:
        if word in ENDS or word.startswith("#"):
            break
        for flag in re.findall(r"(?:^|[\[/])(--?[A-Za-z][\w-]*)", word):
            if flag not in known:
                return f"{' '.join(['mbworker', *path])} has no option {flag} (has: {', '.join(sorted(known))})"
    return None


def test_docs_show_commands() -> None:
    found = list(shown_commands())
    assert len(found) > 20  # the extraction itself works
    assert any("functions serve" in rest for _, _, rest, _ in found)


@pytest.mark.parametrize(("doc", "line", "rest", "strict"), list(shown_commands()))
def test_command_exists(doc: str, line: int, rest: str, strict: bool) -> None:
    problem = check(rest, strict)
    assert problem is None, f"{doc}:{line}: `mbworker {rest}`: {problem}"


def test_the_checker_catches_mistakes() -> None:
    assert check("functions list -o json", True) is None
    assert check("provision plan|apply -c cluster.toml [--no-drain]", True) is None
    assert check("functions lst", True) is not None
    assert "--nope" in (check("deploy PATH --nope", True) or "")
    assert check("hello 13671 1.08", False) is None
