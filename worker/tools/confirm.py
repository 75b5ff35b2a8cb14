"""Ask before a destructive command changes anything, unless ``--yes``."""

from __future__ import annotations

import sys
from typing import TextIO

from worker.config import ConfigError


def confirmed(
    question: str,
    *,
    assume_yes: bool,
    stdin: TextIO | None = None,
    stderr: TextIO | None = None,
) -> bool:
    """True with ``--yes``, or when the operator answers y/yes at a terminal.

    Without a terminal to ask (a script, CI) and without ``--yes``: a ConfigError that says
    to add ``--yes``; a destructive step is never taken on an unanswered question."""
    if assume_yes:
        return True
    given = stdin if stdin is not None else sys.stdin
    out = stderr if stderr is not None else sys.stderr
    if not given.isatty():
        raise ConfigError(f"{question}: confirm with --yes (no terminal to ask); nothing changed")
    out.write(f"{question} [y/N] ")
    out.flush()
    answer = given.readline().strip().lower()
    return answer in ("y", "yes")
