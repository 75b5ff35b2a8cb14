"""Deterministic hostile RPM messages: malformed, adversarial, or valid but not executable.

``hostile_messages(count, seed)`` mixes every kind below. None of them may become an order:
each is malformed, names a symbol the broker does not list, asks for a volume outside the
symbol's limits (run the worker with ``volume_over_max="reject"``), is stale or future-dated,
or is a refusal (kill switch, halt, non-approved status).

``expect`` says where a message must end: ``confirm`` (a REJECTED confirmation: its key is
readable), ``dead`` (no key: dead letter), ``either`` (random bytes, where the key depends on
what the bytes happen to be).
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from tests import samples

Expect = Literal["confirm", "dead", "either"]
TEN_MB = 10 * 1024 * 1024

LOOK_ALIKE_SYMBOLS = (
    "EURUSD ",  # trailing space
    " EURUSD",
    "eurusd",
    "EurUsd",
    "EURUSD.",
    "EURUSDm",
    "EURUSD#",
    "EUR-USD",
    "EUR/USD",
    "\u0415URUSD",  # Cyrillic E
    "EURUSD\u200b",  # zero-width space
    "\uff25\uff35\uff32\uff35\uff33\uff24",  # full-width
    "EURUSD\x00",
    "",
    "A" * 40,
    "NOSUCH",
    "ZZZZZZ",
    "XAUUSD.pro",
)
WRONG_DIRECTIONS: tuple[Any, ...] = (0, 2, -2, 1.5, -0.5, "1", "-1", "buy", True, None, [1], 10**30)
BAD_UNITS: tuple[Any, ...] = (0, 0.0, -1.0, -95_000.0, -1e-300, 5e-324, "95000", True, None, [])


@dataclass
class Hostile:
    kind: str
    body: bytes
    expect: Expect
    message_id: str | None = None
    content_type: str | None = "application/json"
    content_encoding: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)


def _now_naive(offset: timedelta = timedelta(0)) -> str:
    return (datetime.now(UTC) + offset).replace(tzinfo=None).isoformat()


def _approval(rng: random.Random, **trade_changes: Any) -> dict[str, Any]:
    trade = samples.approved_trade("EURUSD", rng.choice((1, -1)), 100_000.0)
    trade.update(trade_changes)
    decision = samples.decision(trade=trade, order_id=uuid.UUID(int=rng.getrandbits(128)).hex)
    return samples.rpm_output(decision)


def _encode(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


# --- kinds: (rng) -> (body, expect_without_message_id, extra message fields) --------------

Made = tuple[bytes, Expect, dict[str, Any]]


def random_bytes(rng: random.Random) -> Made:
    return rng.randbytes(rng.randint(0, 512)), "either", {}


def truncated_json(rng: random.Random) -> Made:
    body = _encode(_approval(rng))
    return body[: rng.randint(1, len(body) - 2)], "dead", {}


def deep_nesting(rng: random.Random) -> Made:
    depth = rng.choice((33, 100, 1000, 100_000, 400_000))
    opener, closer = rng.choice(((b"[", b"]"), (b'{"a":', b"}")))
    return b'{"status": "APPROVED", "x": ' + opener * depth + closer * depth + b"}", "dead", {}


def many_elements(rng: random.Random) -> Made:
    count = rng.choice((60_000, 200_000))
    doc = _approval(rng)
    text = _encode(doc).decode()
    return (text[:-1] + ', "pad": [' + "0," * count + "0]}").encode(), "dead", {}


def huge_number(rng: random.Random) -> Made:
    doc = _approval(rng)
    literal = rng.choice(("1e400", "-1e400", "9" * 5000, "1" + "0" * 4400, "1e-400"))
    text = _encode(doc).decode().replace("100000.0", literal, 1)
    # 1e400 / -1e400 / 1e-400 are floats (field errors, key readable); 4000+ digit ints fail
    # json.loads (Python's int digit limit): no key without a message_id
    return text.encode(), "confirm" if "e" in literal else "dead", {}


def non_finite(rng: random.Random) -> Made:
    doc = _approval(rng)
    constant = rng.choice(("NaN", "Infinity", "-Infinity"))
    text = _encode(doc).decode().replace("100000.0", constant, 1)
    return text.encode(), "dead", {}


def bad_units(rng: random.Random) -> Made:
    return _encode(_approval(rng, position_units=rng.choice(BAD_UNITS))), "confirm", {}


def below_volume_min(rng: random.Random) -> Made:
    # EURUSD: contract 100 000, volume_min 0.01 lots = 1 000 units
    units = rng.choice((1.0, 10.0, 999.0, 999.999, rng.uniform(0.001, 999.0)))
    return _encode(_approval(rng, position_units=units)), "confirm", {}


def above_volume_max(rng: random.Random) -> Made:
    # EURUSD: volume_max 100 lots = 10 000 000 units
    units = rng.choice((10_000_100.0, 5e7, 1e12, 1e300, rng.uniform(1.001e7, 1e9)))
    return _encode(_approval(rng, position_units=units)), "confirm", {}


def look_alike_symbol(rng: random.Random) -> Made:
    return _encode(_approval(rng, symbol=rng.choice(LOOK_ALIKE_SYMBOLS))), "confirm", {}


def unknown_symbol(rng: random.Random) -> Made:
    name = "".join(rng.choice("ABCDEFGHJKQVWXYZ") for _ in range(rng.randint(3, 10)))
    return _encode(_approval(rng, symbol=f"Q{name}")), "confirm", {}


def wrong_direction(rng: random.Random) -> Made:
    return _encode(_approval(rng, direction=rng.choice(WRONG_DIRECTIONS))), "confirm", {}


def far_timestamp(rng: random.Random) -> Made:
    stamp = rng.choice(
        (
            _now_naive(timedelta(days=-rng.randint(1, 3650))),
            _now_naive(timedelta(seconds=-rng.randint(31, 600))),
            _now_naive(timedelta(days=rng.randint(1, 3650))),
            _now_naive(timedelta(seconds=rng.randint(30, 600))),
            "0001-01-01T00:00:00",
            "9999-12-31T23:59:59",
            "9999-12-31T23:59:59-05:00",
            "0001-01-01T00:00:00+05:00",
            "2026-02-30T10:00:00",
            "yesterday",
            "",
            "1e10",
        )
    )
    return _encode(_approval(rng, timestamp=stamp)), "confirm", {}


def duplicated_keys(rng: random.Random) -> Made:
    text = _encode(_approval(rng)).decode()
    dup = rng.choice(('"status": "APPROVED", ', '"direction": -1, ', '"symbol": "GBPUSD", '))
    if dup.startswith('"status"'):
        text = text.replace('"status":', dup + '"status":', 1)
    else:
        text = text.replace('"symbol":', dup + '"symbol":', 1)
    return text.encode(), "dead", {}


def ten_megabytes(rng: random.Random) -> Made:
    text = _encode(_approval(rng)).decode()
    return (text[:-1] + ', "pad": "' + "x" * TEN_MB + '"}').encode(), "dead", {}


def wrong_content_type(rng: random.Random) -> Made:
    ctype = rng.choice(("text/plain", "application/xml", "application/octet-stream", "json", "x"))
    return _encode(_approval(rng)), "dead", {"content_type": ctype}


def wrong_encoding(rng: random.Random) -> Made:
    doc = _approval(rng)
    choice = rng.randrange(4)
    if choice == 0:
        return _encode(doc), "dead", {"content_encoding": rng.choice(("gzip", "base64", "utf-16"))}
    if choice == 1:
        return json.dumps(doc).encode("utf-16"), "dead", {}
    if choice == 2:
        return b"\xef\xbb\xbf" + _encode(doc), "dead", {}  # a UTF-8 byte order mark
    return json.dumps(doc).encode("latin-1", errors="replace") + b"\xff", "dead", {}


WRONG_FLAGS: tuple[Any, ...] = ("false", "true", 0, 1, 0.0, "0", "no", "", None, [], {})


def wrong_flag_type(rng: random.Random) -> Made:
    """A kill switch or halt flag that is not a JSON boolean: refused, never read as False."""
    doc = _approval(rng)
    value = rng.choice(WRONG_FLAGS)
    if rng.random() < 0.5:
        doc["decision"]["kill_switch_triggered"] = value
    else:
        doc.setdefault("portfolio_state", {})["trading_halted"] = value
    return _encode(doc), "confirm", {}


def missing_key(rng: random.Random) -> Made:
    """No usable order_id. With a message_id the key is readable; the kill switch then
    refuses it (a valid approval keyed by its message_id WOULD trade, rightly)."""
    doc = _approval(rng)
    doc["decision"]["kill_switch_triggered"] = True
    doc["decision"]["order_id"] = rng.choice((None, "", "   ", "x" * 200, 42, ["a"], {"a": 1}))
    if rng.random() < 0.5:
        del doc["decision"]["order_id"]
    return _encode(doc), "dead", {}


def refused_by_rpm(rng: random.Random) -> Made:
    """Well-formed approvals the worker must refuse: kill switch, halt, status."""
    doc = _approval(rng)
    choice = rng.randrange(4)
    if choice == 0:
        doc["decision"]["kill_switch_triggered"] = True
        doc["decision"]["kill_switch_reason"] = "fuzz"
    elif choice == 1:
        doc["portfolio_state"]["trading_halted"] = True
    elif choice == 2:
        doc["decision"]["status"] = rng.choice(("REJECTED", "approved", "APPROVE", "", None, 1))
    else:
        doc["decision"]["kill_switch_triggered"] = rng.choice(("yes", 2, [], "maybe"))
    return _encode(doc), "confirm", {}


def wrong_shape(rng: random.Random) -> Made:
    body = rng.choice((b"[]", b"null", b"42", b'"s"', b"{}", b'{"decision": 5}', b"true"))
    return body, "dead", {}


KINDS: tuple[Callable[[random.Random], Made], ...] = (
    random_bytes,
    truncated_json,
    deep_nesting,
    many_elements,
    huge_number,
    non_finite,
    bad_units,
    below_volume_min,
    above_volume_max,
    look_alike_symbol,
    unknown_symbol,
    wrong_direction,
    far_timestamp,
    duplicated_keys,
    wrong_content_type,
    wrong_encoding,
    wrong_flag_type,
    missing_key,
    refused_by_rpm,
    wrong_shape,
)
FORGED_HEADERS: tuple[dict[str, Any], ...] = (
    {"x-rejection-reason": "forged", "x-rejection-details": "forged"},
    {"x-delivery-count": "many"},
    {"x-delivery-count": -1},
    {"nested": {"a": [1, 2, {"b": None}]}},
)


def hostile_messages(count: int, seed: int, *, ten_mb: int = 0) -> list[Hostile]:
    """``count`` hostile messages (``ten_mb`` of them 10 MB bodies), the same for a seed."""
    rng = random.Random(seed)
    made: list[Hostile] = []
    for index in range(count):
        kind = ten_megabytes if index < ten_mb else KINDS[index % len(KINDS)]
        body, expect_without_id, extra = kind(rng)
        roll = rng.random()
        message_id: str | None = None
        if roll < 0.4:
            message_id = f"mid-{seed}-{index}"
        elif roll < 0.45:
            message_id = rng.choice(("", "   ", "m" * 200))  # unusable as a key
        hostile = Hostile(kind.__name__, body, expect_without_id, message_id=message_id)
        if message_id and message_id.strip() and len(message_id) <= 128:
            hostile.expect = "confirm"
        hostile.content_type = extra.get("content_type", "application/json")
        hostile.content_encoding = extra.get("content_encoding")
        if rng.random() < 0.1:
            hostile.headers = dict(rng.choice(FORGED_HEADERS))
        made.append(hostile)
    return made
