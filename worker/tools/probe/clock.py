"""The server's UTC offset from fresh ticks, and the DST rule one measurement implies (pure).

A tick's server time minus UTC, rounded to a quarter hour, is the offset now; a stale tick
underestimates it, so the largest estimate of ticks seen to move wins. One measurement says
the offset on one date only: the rule is *implied* by the FX convention (DOMAIN.md 6: GMT+2
in winter, GMT+3 while US daylight saving time is in force) when the offset fits it, else a
fixed offset is proposed, and the profile says which basis it used.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from worker.mt5.gateway.clock import us_dst

QUARTER_HOUR_MS = 15 * 60 * 1000
_HOUR = 3600


def offset_seconds(samples: Sequence[tuple[int, int]]) -> int | None:
    """Offset in seconds from (tick time_msc, local UTC ms) pairs; None without samples."""
    if not samples:
        return None
    estimates = [round((tick - utc) / QUARTER_HOUR_MS) * QUARTER_HOUR_MS for tick, utc in samples]
    return max(estimates) // 1000


def fixed_rule(offset: int) -> str:
    """``UTC``, ``UTC+2``, ``UTC-3:30``... (SERVER_TIMEZONE syntax)."""
    if offset == 0:
        return "UTC"
    sign = "+" if offset > 0 else "-"
    hours, rest = divmod(abs(offset), _HOUR)
    minutes = rest // 60
    return f"UTC{sign}{hours}" + (f":{minutes:02d}" if minutes else "")


def implied_rule(offset: int, utc_seconds: float) -> tuple[str, str]:
    """(SERVER_TIMEZONE rule, why) for an offset measured at ``utc_seconds``."""
    summer = us_dst(datetime.fromtimestamp(utc_seconds, UTC))
    if offset == (3 if summer else 2) * _HOUR:
        season = "while US DST is in force" if summer else "outside US DST"
        return (
            "GMT+2/US-DST",
            f"GMT{offset // _HOUR:+d} {season} fits the FX convention (GMT+2, GMT+3 during "
            "US DST); a probe after the next US DST switch confirms it",
        )
    return (
        fixed_rule(offset),
        "the offset fits no DST convention on this date: a fixed offset is assumed; "
        "a probe after the next DST switch tells",
    )
