"""Times on the command line of ``report`` and ``trail``: ``--since 7d``, ``--until now``.

A time is ISO 8601 (a naive one is UTC, as the RPM writes them) or an age before now: a
number followed by ``s``, ``m``, ``h``, ``d`` or ``w`` (``90m``, ``7d``), or ``now``.
"""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An aware UTC datetime; ValueError with a one-line explanation otherwise."""
    value = text.strip()
    moment = now or datetime.now(UTC)
    if value.lower() == "now":
        return moment
    age = _AGE.match(value.lower())
    if age:
        return moment - timedelta(**{_UNITS[age.group(2)]: float(age.group(1))})
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: give ISO 8601 (UTC when no offset) or an age such as"
            " 90m, 24h, 7d"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def time_argument(text: str) -> datetime:
    """``type=`` for argparse."""
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
