"""``execution-worker trail KEY [--json]``: what happened to one order, from the audit store.

``trail --since T [--until T] [--status S] [--symbol X] [--account NAME|LOGIN]`` lists instead
the executions received in that range (one line each; ``--json``: the rows whole).

KEY is the RPM order id, the idempotency key or the execution id (also accepted: the MT5
comment token and the broker order ticket, as an operator reads them in the terminal).
Prints each matching execution row, its timeline (every event: transitions, broker calls
with retcode and latency, notes) and its outbox state, as text or as one JSON document::

    find_trails(conn: psycopg.Connection[Any], key: str) -> list[Trail]
    render_text(trails: Sequence[Trail], now: datetime | None = None) -> str
    render_json(key: str, trails: Sequence[Trail]) -> str
    main(args: argparse.Namespace) -> int      # 0 found, 1 not found, 2 database error

Everything printed goes through ``worker.observability.logs.redact`` with the settings'
secrets registered.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from worker.config import load_settings
from worker.observability.logs import redact, register_settings_secrets
from worker.store.reports import RangeFilter, executions_in_range

DETAIL_WIDTH = 100  # the table truncates event details; --json has them whole

_FIND = """
SELECT * FROM execution.executions
WHERE execution_id = %(uuid)s OR idempotency_key = %(key)s OR rpm_order_id = %(key)s
   OR comment_token = %(key)s OR broker_order = %(ticket)s
ORDER BY received_at, execution_id
LIMIT 20
"""
_EVENTS = """
SELECT event_id, at, stage, kind, state, function, retcode, latency_ms, detail
FROM execution.execution_events WHERE execution_id = %s ORDER BY at, event_id
"""
_OUTBOX = """
SELECT routing_key, correlation_id, reply_to, created_at, published_at, payload
FROM execution.outbox WHERE execution_id = %s
"""


@dataclass(frozen=True)
class Trail:
    execution: dict[str, Any]
    events: list[dict[str, Any]]
    outbox: dict[str, Any] | None


def _as_uuid(key: str) -> UUID | None:
    try:
        return UUID(key)
    except ValueError:
        return None


def _as_ticket(key: str) -> int | None:
    return int(key) if key.isdigit() and len(key) < 19 else None


def find_trails(conn: psycopg.Connection[Any], key: str) -> list[Trail]:
    """Every execution KEY names (usually one), with its events and outbox row."""
    params = {"uuid": _as_uuid(key), "key": key, "ticket": _as_ticket(key)}
    trails: list[Trail] = []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_FIND, params)
        rows = [dict(row) for row in cur.fetchall()]
        for row in rows:
            cur.execute(_EVENTS, (row["execution_id"],))
            events = [dict(event) for event in cur.fetchall()]
            cur.execute(_OUTBOX, (row["execution_id"],))
            outbox = cur.fetchone()
            trails.append(Trail(row, events, dict(outbox) if outbox else None))
    return trails


# --- JSON --------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    return str(value)


def _outbox_json(outbox: dict[str, Any] | None) -> dict[str, Any] | None:
    if outbox is None:
        return None
    shown = {name: value for name, value in outbox.items() if name != "payload"}
    shown["state"] = "published" if outbox["published_at"] else "pending"
    try:
        shown["payload"] = json.loads(outbox["payload"])
    except (TypeError, ValueError):
        shown["payload"] = outbox["payload"]
    return shown


def render_json(key: str, trails: Sequence[Trail]) -> str:
    document = {
        "key": key,
        "executions": [
            {
                "execution": trail.execution,
                "events": trail.events,
                "outbox": _outbox_json(trail.outbox),
            }
            for trail in trails
        ],
    }
    return redact(json.dumps(document, default=_json_default, indent=2, ensure_ascii=False))


# --- text --------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, float):
        return f"{value:.10g}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=_json_default, separators=(",", ":"))
    return str(value)


def _at_and_since(start: datetime | None, end: datetime | None) -> str:
    """``end``, and how long after ``start`` it was (when both are known)."""
    if start is None or end is None:
        return _fmt(end)
    return f"{_fmt(end)}  (+{(end - start).total_seconds() * 1000:.1f} ms)"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [len(header) for header in headers]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    return [line(headers).rstrip(), line(["-" * width for width in widths])] + [
        line(row).rstrip() for row in rows
    ]


def _summary(row: dict[str, Any]) -> list[str]:
    direction = {1: "BUY", -1: "SELL"}.get(row.get("direction") or 0, "-")
    broker_symbol = row.get("broker_symbol")
    symbol = _fmt(row.get("symbol"))
    if broker_symbol and broker_symbol != row.get("symbol"):
        symbol = f"{symbol} (broker {broker_symbol})"
    pairs = [
        ("execution id", _fmt(row["execution_id"])),
        ("state", _fmt(row["state"])),
        ("idempotency key", _fmt(row["idempotency_key"])),
        ("rpm order id", _fmt(row.get("rpm_order_id"))),
        ("symbol / side", f"{symbol} {direction}"),
        (
            "intended",
            f"{_fmt(row.get('intended_units'))} units = {_fmt(row.get('intended_lots'))} lots",
        ),
        (
            "executed",
            f"{_fmt(row.get('executed_units'))} units = {_fmt(row.get('executed_lots'))} lots",
        ),
        (
            "price",
            f"requested {_fmt(row.get('requested_price'))}  fill {_fmt(row.get('fill_price'))}"
            f"  slippage {_fmt(row.get('slippage_pips'))} pips"
            f"  spread {_fmt(row.get('spread_pips'))} pips",
        ),
        (
            "order",
            f"deviation {_fmt(row.get('deviation_points'))} points"
            f"  filling {_fmt(row.get('filling_mode'))}  attempts {_fmt(row.get('attempts'))}",
        ),
        (
            "broker",
            f"order {_fmt(row.get('broker_order'))}  deals {_fmt(row.get('broker_deals'))}"
            f"  position {_fmt(row.get('broker_position'))}  retcode {_fmt(row.get('retcode'))}"
            f"  comment {_fmt(row.get('broker_comment'))}",
        ),
        (
            "identity",
            f"comment token {_fmt(row.get('comment_token'))}  magic {_fmt(row.get('magic'))}"
            f"  session {_fmt(row.get('session_id'))}"
            f"  account {_fmt(row.get('account'))}  login {_fmt(row.get('account_login'))}",
        ),
    ]
    if row.get("rejection_reason"):
        reason = f"{row['rejection_reason']}: {_fmt(row.get('rejection_details'))}"
        pairs.append(("rejection", reason))
    pairs += [
        ("decided at", _fmt(row.get("decided_at"))),
        ("received at", _fmt(row.get("received_at"))),
        ("submitted at", _at_and_since(row.get("received_at"), row.get("submitted_at"))),
        ("completed at", _at_and_since(row.get("received_at"), row.get("completed_at"))),
    ]
    width = max(len(name) for name, _ in pairs)
    return [f"  {name.ljust(width)}  {value}" for name, value in pairs]


def _timeline(trail: Trail) -> list[str]:
    if not trail.events:
        return ["  (no events)"]
    start = trail.execution.get("received_at") or trail.events[0]["at"]
    rows = []
    for event in trail.events:
        detail = _fmt(event.get("detail"))
        if len(detail) > DETAIL_WIDTH:
            detail = detail[: DETAIL_WIDTH - 1] + "…"
        rows.append(
            [
                f"+{(event['at'] - start).total_seconds() * 1000:.1f}",
                _fmt(event["at"]),
                event["stage"],
                event["kind"],
                _fmt(event.get("state")),
                _fmt(event.get("function")),
                _fmt(event.get("retcode")),
                "-" if event.get("latency_ms") is None else f"{event['latency_ms']:.2f}",
                detail,
            ]
        )
    headers = ["+ms", "at", "stage", "kind", "state", "call", "retcode", "latency_ms", "detail"]
    return ["  " + line for line in _table(headers, rows)]


def _outbox_lines(outbox: dict[str, Any] | None, now: datetime) -> list[str]:
    if outbox is None:
        return ["  (no confirmation committed)"]
    if outbox["published_at"] is not None:
        state = f"published at {_fmt(outbox['published_at'])}"
    else:
        age = (now - outbox["created_at"]).total_seconds()
        state = f"PENDING, not confirmed by RabbitMQ for {age:.1f} s"
    return [
        f"  routing key     {outbox['routing_key']}",
        f"  correlation id  {_fmt(outbox.get('correlation_id'))}",
        f"  reply to        {_fmt(outbox.get('reply_to'))}",
        f"  created at      {_fmt(outbox['created_at'])}",
        f"  state           {state}",
    ]


def render_text(trails: Sequence[Trail], now: datetime | None = None) -> str:
    moment = now or datetime.now(UTC)
    out: list[str] = []
    for index, trail in enumerate(trails):
        if index:
            out.append("")
        out.append(f"Execution {trail.execution['execution_id']}  {trail.execution['state']}")
        out.extend(_summary(trail.execution))
        out.append("")
        out.append(f"Timeline ({len(trail.events)} events)")
        out.extend(_timeline(trail))
        out.append("")
        out.append("Outbox")
        out.extend(_outbox_lines(trail.outbox, moment))
    return redact("\n".join(out))


# --- a time range ------------------------------------------------------------------------

RANGE_COLUMNS = (
    "received at",
    "state",
    "symbol",
    "side",
    "lots",
    "executed",
    "fill price",
    "slip",
    "account",
    "session",
    "reason",
    "rpm order id",
)


def range_row(row: dict[str, Any]) -> list[str]:
    return [
        _fmt(row.get("received_at")),
        _fmt(row.get("state")),
        _fmt(row.get("symbol")),
        {1: "BUY", -1: "SELL"}.get(row.get("direction") or 0, "-"),
        _fmt(row.get("intended_lots")),
        _fmt(row.get("executed_lots")),
        _fmt(row.get("fill_price")),
        _fmt(row.get("slippage_pips")),
        _fmt(row.get("account") or row.get("account_login")),
        _fmt(row.get("session_id")),
        _fmt(row.get("rejection_reason")),
        _fmt(row.get("rpm_order_id")),
    ]


def render_range_text(where: RangeFilter, rows: Sequence[dict[str, Any]]) -> str:
    title = f"Executions received {_fmt(where.since)} .. {_fmt(where.until)}"
    filters = [
        f"{name} {value}"
        for name, value in (
            ("status", where.status),
            ("symbol", where.symbol),
            ("account", where.account),
        )
        if value is not None
    ]
    if filters:
        title += " (" + ", ".join(filters) + ")"
    lines = [title, *_table(RANGE_COLUMNS, [range_row(row) for row in rows])]
    more = " (the limit: narrow the range or raise --limit)" if len(rows) >= where.limit else ""
    lines.append(f"{len(rows)} execution(s){more}; `trail KEY` shows one in full")
    return redact("\n".join(lines))


def render_range_json(where: RangeFilter, rows: Sequence[dict[str, Any]]) -> str:
    document = {
        "since": where.since,
        "until": where.until,
        "filters": {"status": where.status, "symbol": where.symbol, "account": where.account},
        "executions": list(rows),
    }
    return redact(json.dumps(document, default=_json_default, indent=2, ensure_ascii=False))


def range_filter(args: argparse.Namespace) -> RangeFilter:
    return RangeFilter(
        since=args.since,
        until=args.until or datetime.now(UTC),
        status=args.status.upper() if args.status else None,
        symbol=args.symbol,
        account=args.account,
        limit=args.limit,
    )


def _range_main(args: argparse.Namespace, url: str) -> int:
    where = range_filter(args)
    with psycopg.connect(url, connect_timeout=10) as conn:  # errors: worker/explain.py
        rows = executions_in_range(conn, where)
    print(render_range_json(where, rows) if args.json else render_range_text(where, rows))
    return 0 if rows else 1


# --- command -----------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    register_settings_secrets(settings)
    url = settings.database_url.get_secret_value()
    if getattr(args, "since", None) is not None:
        if args.key:
            print("trail: give KEY or --since, not both", file=sys.stderr)
            return 2
        return _range_main(args, url)
    if not args.key:
        print("trail: give KEY (one execution) or --since T (a time range)", file=sys.stderr)
        return 2
    key: str = args.key.strip()
    with psycopg.connect(url, connect_timeout=10) as conn:  # errors: worker/explain.py
        trails = find_trails(conn, key)
    if not trails:
        shown = redact(key)
        print(
            f"trail: no execution found for {shown!r} (tried execution id, idempotency key, "
            "RPM order id, comment token, broker order ticket)",
            file=sys.stderr,
        )
        return 1
    print(render_json(key, trails) if args.json else render_text(trails))
    return 0
