"""The docs name only commands and options that exist (issue 28: docs checked against code).

Every ``execution-worker COMMAND [SUBCOMMAND] --option`` written in README.md, SECURITY.md
and docs/*.md must be a command of worker/cli.py, and its options options of that command.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from worker import cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
# a command line in prose or a code block: up to the end of the line or a closing backtick
MENTION = re.compile(r"execution-worker((?:\s+--debug)*)\s+([a-z][a-z-]+)([^`\n|]*)")


def _command(name: str) -> click.Command | None:
    found = cli.group.commands.get(name)
    return found


def _options(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update((*param.opts, *param.secondary_opts))
    return names


def mentions() -> list[tuple[str, int, str, str]]:
    found = []
    for path in DOCS:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in MENTION.finditer(line):
                found.append((path.name, number, match.group(2), match.group(3)))
    return found


@pytest.mark.parametrize(("doc", "line", "name", "rest"), mentions())
def test_a_documented_command_and_its_options_exist(
    doc: str, line: int, name: str, rest: str
) -> None:
    command = _command(name)
    if command is None:
        pytest.fail(f"{doc}:{line}: execution-worker {name}: no such command")
    words = rest.split()
    if isinstance(command, click.Group) and words and words[0] in command.commands:
        command = command.commands[words[0]]
    options = _options(command)
    for word in words:
        option = word.strip("[]()`,.;:'\"").split("=", 1)[0]
        if re.fullmatch(r"--[a-z][a-z-]*", option):
            assert option in options, f"{doc}:{line}: {name} has no {option}"
