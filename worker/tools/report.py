"""``execution-worker report``: execution quality (transaction-cost analysis) from the audit store.

Over the executions RECEIVED in ``[--since, --until)`` (default until: now), overall and per
group (``--by symbol|session|account|hour``):

- counts by status and by rejection reason;
- fill ratio: executed lots / intended lots of the executions that reached the broker
  (``submitted_at`` set);
- implementation shortfall of each fill, from the ARRIVAL MID (the mid of the tick the
  pre-trade checks used: ``arrival_bid``/``arrival_ask``) to the fill VWAP (``fill_price``),
  signed so that positive is a cost: buy ``(fill - mid) / pip``, sell ``(mid - fill) / pip``.
  Aggregated as a lots-weighted mean and percentiles. In money: ``pips x pip x lots x
  contract size`` is an amount in the symbol's QUOTE currency (the last three letters of a
  six-letter symbol: JPY for USDJPY). It is converted to the account currency
  (``--account-currency``, default USD, the simulator's) only where that needs no other
  rate: quote = account currency -> as is; base = account currency -> divided by the fill
  price (USDJPY on a USD account). Any other fill is not converted: it is counted in
  ``unconverted_fills`` and its amount reported per quote currency, never guessed;
- spread paid: half the arrival spread, ``(ask - bid) / 2 / pip`` (the part of the shortfall
  that is crossing from mid to touch); the rest is the market's move between the checks and
  the send (the order is priced from a fresh tick when sent) plus the slippage;
- slippage as recorded (``slippage_pips``: fill against the requested price, positive =
  adverse): mean, percentiles and a histogram; and its COST in the account currency,
  ``slippage pips x pip x lots x contract size``, converted like the shortfall (the money a
  trader lost, + = cost, or gained, - , against the prices the worker asked for);
- rejections by reason: how many executions each reason refused, and their share;
- latency split in three, in ms: queue wait ``decided_at -> received_at`` (the RPM's clock
  against ours: skew shows here), worker ``received_at -> submitted_at``, broker
  ``submitted_at -> completed_at`` (completed_at is when the worker saw the fill settled and
  committed it: the fill time as the audit store knows it).

Percentiles interpolate linearly between ranks (PostgreSQL's ``percentile_cont``).
``--json F`` writes the whole document; ``--plot F.png`` draws it (``worker.tools.report_plot``).
Rows received before migration 0003 have no arrival price: they count everywhere except
the shortfall figures (``fills_without_arrival``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from worker.config import load_settings
from worker.observability.logs import redact, register_settings_secrets
from worker.store.reports import report_rows
from worker.tools.paths import check_output_path, check_plot_path

PERCENTILES = (5, 25, 50, 75, 95, 99)
LATENCY_PERCENTILES = (50, 90, 99)
SLIPPAGE_BUCKETS = (-5.0, -2.0, -1.0, -0.5, -0.2, 0.0, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
GROUPINGS = ("symbol", "session", "account", "hour")
DEFAULT_ACCOUNT_CURRENCY = "USD"


@dataclass(frozen=True)
class Measured:
    """The per-execution figures the report aggregates (None: not applicable/unknown)."""

    row: dict[str, Any]
    shortfall_pips: float | None
    shortfall_quote: float | None  # in the symbol's quote currency
    quote_currency: str | None
    shortfall_account: float | None  # in the account currency, when convertible
    slippage_quote: float | None  # slippage cost in the quote currency (+ = cost)
    slippage_account: float | None  # ... in the account currency, when convertible
    spread_paid_pips: float | None
    queue_ms: float | None
    worker_ms: float | None
    broker_ms: float | None


def currencies(symbol: str | None) -> tuple[str | None, str | None]:
    """(base, quote) of a six-letter symbol (EURUSD, XAUUSD); (None, None) otherwise."""
    if symbol and len(symbol) == 6 and symbol.isalpha() and symbol.isupper():
        return symbol[:3], symbol[3:]
    return None, None


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds() * 1000.0


def to_account(
    amount_quote: float, symbol: str | None, fill: float | None, account_currency: str
) -> float | None:
    """An amount in ``symbol``'s quote currency in the account currency, where no other
    rate is needed (quote = account: as is; base = account: / the fill price); else None."""
    base, quote = currencies(symbol)
    if quote == account_currency:
        return amount_quote
    if base == account_currency and fill:
        return amount_quote / fill
    return None


def measure(row: dict[str, Any], account_currency: str) -> Measured:
    lots = row.get("executed_lots") or 0.0
    fill = row.get("fill_price")
    bid, ask, pip = row.get("arrival_bid"), row.get("arrival_ask"), row.get("pip")
    shortfall_pips = shortfall_quote = shortfall_account = spread_paid = None
    slippage_quote = slippage_account = None
    _, quote = currencies(row.get("symbol"))
    contract = row.get("contract_size") or 0.0
    if bid is not None and ask is not None and pip:
        spread_paid = (ask - bid) / 2.0 / pip
    if lots > 0 and fill is not None and bid is not None and ask is not None and pip:
        mid = (bid + ask) / 2.0
        move = fill - mid if (row.get("direction") or 0) > 0 else mid - fill
        shortfall_pips = move / pip
        if contract > 0:
            shortfall_quote = shortfall_pips * pip * lots * contract
            shortfall_account = to_account(
                shortfall_quote, row.get("symbol"), fill, account_currency
            )
    slippage = row.get("slippage_pips")
    if lots > 0 and slippage is not None and pip and contract > 0:
        slippage_quote = slippage * pip * lots * contract
        slippage_account = to_account(slippage_quote, row.get("symbol"), fill, account_currency)
    return Measured(
        row=row,
        shortfall_pips=shortfall_pips,
        shortfall_quote=shortfall_quote,
        quote_currency=quote,
        shortfall_account=shortfall_account,
        slippage_quote=slippage_quote,
        slippage_account=slippage_account,
        spread_paid_pips=spread_paid,
        queue_ms=_ms(row.get("decided_at"), row.get("received_at")),
        worker_ms=_ms(row.get("received_at"), row.get("submitted_at")),
        broker_ms=_ms(row.get("submitted_at"), row.get("completed_at")),
    )


def percentile(values: Sequence[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (as PostgreSQL's percentile_cont)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Iterable[float | None], ps: Sequence[int] = PERCENTILES) -> dict[str, Any]:
    known = [value for value in values if value is not None and math.isfinite(value)]
    result: dict[str, Any] = {"n": len(known)}
    result["mean"] = sum(known) / len(known) if known else None
    result["max"] = max(known) if known else None
    for p in ps:
        result[f"p{p}"] = percentile(known, p)
    return result


def histogram(values: Iterable[float], edges: Sequence[float] = SLIPPAGE_BUCKETS) -> dict[str, int]:
    """Counts per bucket ``(previous edge, edge]``, plus one above the last edge."""
    counts = {f"<={edge:g}": 0 for edge in edges}
    counts[f">{edges[-1]:g}"] = 0
    for value in values:
        for edge in edges:
            if value <= edge:
                counts[f"<={edge:g}"] += 1
                break
        else:
            counts[f">{edges[-1]:g}"] += 1
    return counts


def _weighted_mean(pairs: Iterable[tuple[float, float]]) -> float | None:
    total_weight = total = 0.0
    for value, weight in pairs:
        total += value * weight
        total_weight += weight
    return total / total_weight if total_weight > 0 else None


def _money(
    measured: Sequence[Measured],
    quote_of: Callable[[Measured], float | None],
    account_of: Callable[[Measured], float | None],
    account_currency: str,
) -> dict[str, Any]:
    """A cost summed in the account currency; what cannot be converted, per quote currency."""
    known = [m for m in measured if quote_of(m) is not None]
    unconverted = [m for m in known if account_of(m) is None]
    by_quote: dict[str, float] = {}
    for m in unconverted:
        currency = m.quote_currency or "?"
        by_quote[currency] = by_quote.get(currency, 0.0) + (quote_of(m) or 0.0)
    converted = [value for m in known if (value := account_of(m)) is not None]
    return {
        "currency": account_currency,
        "total": sum(converted) if converted else None,
        "converted_fills": len(converted),
        "unconverted_fills": len(unconverted),
        "unconverted_by_quote_currency": by_quote,
    }


def rejections(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Executions refused, by reason, most frequent first, with their share of all."""
    counted = Counter(r["rejection_reason"] for r in rows if r.get("rejection_reason"))
    return [
        {"reason": reason, "count": count, "share": count / len(rows)}
        for reason, count in sorted(counted.items(), key=lambda item: (-item[1], item[0]))
    ]


def summarize(measured: Sequence[Measured], account_currency: str) -> dict[str, Any]:
    """The figures of one group of executions."""
    rows = [m.row for m in measured]
    sent = [r for r in rows if r.get("submitted_at") is not None]
    intended = sum(r.get("intended_lots") or 0.0 for r in sent)
    executed = sum(r.get("executed_lots") or 0.0 for r in sent)
    fills = [m for m in measured if (m.row.get("executed_lots") or 0) > 0]
    with_arrival = [m for m in fills if m.shortfall_pips is not None]
    unconverted = [m for m in with_arrival if m.shortfall_account is None]
    by_quote: dict[str, float] = {}
    for m in unconverted:
        if m.shortfall_quote is not None:
            currency = m.quote_currency or "?"
            by_quote[currency] = by_quote.get(currency, 0.0) + m.shortfall_quote
    slippage = [m.row["slippage_pips"] for m in fills if m.row.get("slippage_pips") is not None]
    return {
        "executions": len(rows),
        "by_status": dict(sorted(Counter(r["state"] for r in rows).items())),
        "by_reason": dict(
            sorted(
                Counter(r["rejection_reason"] for r in rows if r.get("rejection_reason")).items()
            )
        ),
        "sent_to_broker": len(sent),
        "intended_lots": intended,
        "executed_lots": executed,
        "fill_ratio": executed / intended if intended > 0 else None,
        "fills": len(fills),
        "fills_without_arrival": len(fills) - len(with_arrival),
        "shortfall_pips": {
            "lots_weighted_mean": _weighted_mean(
                (m.shortfall_pips, m.row["executed_lots"])
                for m in with_arrival
                if m.shortfall_pips is not None
            ),
            **distribution(m.shortfall_pips for m in with_arrival),
        },
        "shortfall_account": {
            "currency": account_currency,
            "total": sum(
                m.shortfall_account for m in with_arrival if m.shortfall_account is not None
            )
            if len(unconverted) < len(with_arrival)
            else None,
            "converted_fills": len(with_arrival) - len(unconverted),
            "unconverted_fills": len(unconverted),
            "unconverted_by_quote_currency": by_quote,
        },
        "spread_paid_pips": {
            "lots_weighted_mean": _weighted_mean(
                (m.spread_paid_pips, m.row["executed_lots"])
                for m in with_arrival
                if m.spread_paid_pips is not None
            ),
            **distribution(m.spread_paid_pips for m in with_arrival),
        },
        "slippage_pips": {**distribution(slippage), "histogram": histogram(slippage)},
        "slippage_cost_account": _money(
            fills, lambda m: m.slippage_quote, lambda m: m.slippage_account, account_currency
        ),
        "rejections": rejections(rows),
        "latency_ms": {
            "queue_wait": distribution((m.queue_ms for m in measured), LATENCY_PERCENTILES),
            "worker": distribution((m.worker_ms for m in measured), LATENCY_PERCENTILES),
            "broker": distribution((m.broker_ms for m in measured), LATENCY_PERCENTILES),
        },
    }


def group_key(by: str) -> Callable[[dict[str, Any]], str]:
    if by == "symbol":
        return lambda row: str(row.get("symbol") or "-")
    if by == "session":
        return lambda row: str(row.get("session_id") or "-")
    if by == "account":  # the account's name; rows from before accounts had names: the login
        return lambda row: str(row.get("account") or row.get("account_login") or "-")
    if by == "hour":
        return lambda row: row["received_at"].astimezone(UTC).strftime("%Y-%m-%dT%H:00Z")
    raise ValueError(f"--by must be one of {', '.join(GROUPINGS)}")


def build_report(
    rows: Sequence[dict[str, Any]],
    *,
    since: datetime,
    until: datetime,
    by: str | None = None,
    account_currency: str = DEFAULT_ACCOUNT_CURRENCY,
) -> dict[str, Any]:
    measured = [measure(row, account_currency) for row in rows]
    document: dict[str, Any] = {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "by": by,
        "account_currency": account_currency,
        "overall": summarize(measured, account_currency),
        "groups": {},
    }
    if by:
        key = group_key(by)
        grouped: dict[str, list[Measured]] = {}
        for m in measured:
            grouped.setdefault(key(m.row), []).append(m)
        document["groups"] = {
            name: summarize(items, account_currency) for name, items in sorted(grouped.items())
        }
    return document


# --- text --------------------------------------------------------------------------------

TABLE_COLUMNS = (
    "group",
    "n",
    "filled",
    "partial",
    "rejected",
    "other",
    "fill %",
    "IS pips",
    "IS p95",
    "IS {ccy}",
    "spread",
    "slip p50",
    "slip p95",
    "slip {ccy}",
    "queue p50",
    "worker p50",
    "broker p50",
    "broker p99",
)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_row(name: str, figures: dict[str, Any]) -> list[str]:
    status = figures["by_status"]
    filled = status.get("FILLED", 0)
    partial = status.get("PARTIALLY_FILLED", 0)
    rejected = status.get("REJECTED", 0)
    ratio = figures["fill_ratio"]
    latency = figures["latency_ms"]
    money = figures["shortfall_account"]
    total = _num(money["total"])
    if money["unconverted_fills"] and money["total"] is not None:
        total += "*"
    return [
        name,
        str(figures["executions"]),
        str(filled),
        str(partial),
        str(rejected),
        str(figures["executions"] - filled - partial - rejected),
        "-" if ratio is None else f"{ratio * 100:.1f}",
        _num(figures["shortfall_pips"]["lots_weighted_mean"]),
        _num(figures["shortfall_pips"]["p95"]),
        total,
        _num(figures["spread_paid_pips"]["lots_weighted_mean"]),
        _num(figures["slippage_pips"]["p50"]),
        _num(figures["slippage_pips"]["p95"]),
        _slippage_total(figures["slippage_cost_account"]),
        _num(latency["queue_wait"]["p50"], 1),
        _num(latency["worker"]["p50"], 1),
        _num(latency["broker"]["p50"], 1),
        _num(latency["broker"]["p99"], 1),
    ]


def _slippage_total(money: dict[str, Any]) -> str:
    total = _num(money["total"])
    return total + "*" if money["unconverted_fills"] and money["total"] is not None else total


def render_text(document: dict[str, Any]) -> str:
    ccy = document["account_currency"]
    if document["overall"]["executions"] == 0:
        return (
            f"No executions received between {document['since']} and {document['until']}:"
            " nothing to report (widen --since/--until, or check DATABASE_URL)."
        )
    headers = [column.format(ccy=ccy) for column in TABLE_COLUMNS]
    rows = [table_row(name, figures) for name, figures in document["groups"].items()]
    rows.append(table_row("all", document["overall"]))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    overall = document["overall"]
    out = [
        f"Execution quality {document['since']} .. {document['until']}"
        f" (received; {overall['executions']} executions)",
        "",
        line(headers),
        line(["-" * w for w in widths]),
        *(line(row) for row in rows),
        "",
        *textwrap.wrap(
            "IS = implementation shortfall, arrival mid -> fill VWAP, lots-weighted, + = cost;"
            f" IS {ccy} = its sum in the account currency (* = some fills not convertible);"
            " spread = half the arrival spread paid, pips; slip = fill vs requested price,"
            f" pips, + = adverse; slip {ccy} = what that slippage cost in the account currency"
            " (- = price improvement); latency in ms: queue = decided->received,"
            " worker = received->submitted,"
            " broker = submitted->completed.",
            100,
        ),
    ]
    refused = overall["rejections"]
    if refused:
        width = max(len(item["reason"]) for item in refused)
        out += ["", "Rejections by reason (share of all executions):"]
        out += [
            f"  {item['reason']:<{width}}  {item['count']:>6}  {item['share'] * 100:5.1f} %"
            for item in refused
        ]
    money = overall["shortfall_account"]
    if money["unconverted_fills"]:
        amounts = ", ".join(
            f"{amount:.2f} {currency}"
            for currency, amount in money["unconverted_by_quote_currency"].items()
        )
        out.append(
            f"Not converted to {ccy} (no rate recorded): {money['unconverted_fills']} fills,"
            f" {amounts or 'no contract size recorded'}"
        )
    if overall["fills_without_arrival"]:
        out.append(
            f"Fills without an arrival price (before 0003): {overall['fills_without_arrival']}"
        )
    return redact("\n".join(out))


def _json_default(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else str(value)


# --- command -----------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    register_settings_secrets(settings)
    url = settings.database_url.get_secret_value()
    since: datetime = args.since
    until: datetime = args.until or datetime.now(UTC)
    if until <= since:
        print("report: --until must be after --since", file=sys.stderr)
        return 2
    if args.plot:
        check_plot_path(args.plot)
    if args.json:
        check_output_path(args.json, "--json")
    with psycopg.connect(url, connect_timeout=10) as conn:  # errors: worker/explain.py
        rows = report_rows(conn, since, until)
    document = build_report(
        rows, since=since, until=until, by=args.by, account_currency=args.account_currency
    )
    print(render_text(document))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2, default=_json_default)
        print(f"report: JSON written to {args.json}")
    if args.plot:
        from worker.tools.report_plot import plot

        plot([measure(row, args.account_currency) for row in rows], document, args.plot)
        print(f"report: plot written to {args.plot}")
    return 0
