"""``execution-worker report`` and ``trail --since`` over a few hundred real executions.

The executions are made by the real pipeline (real PostgreSQL, two simulated terminals
with the simulator's default slippage). The report runs as the command an operator runs;
every figure it prints in JSON is recomputed here independently, in SQL, from the audit
rows (``percentile_cont`` for the percentiles), and must agree.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.pipeline_env import approval, pipeline_env
from worker.execution.outcome import Publish

SYMBOLS = ("EURUSD", "GBPUSD", "USDJPY", "XAUUSD")
COUNT = 320


@dataclass(frozen=True)
class Run:
    database_url: str
    since: datetime
    until: datetime


@pytest.fixture(scope="module")
def executions(new_database: Callable[[], str]) -> Iterator[Run]:
    database_url = new_database()
    rng = random.Random(20)
    since = datetime.now(UTC) - timedelta(seconds=1)
    with pipeline_env(database_url, sessions=2) as env:
        for i in range(COUNT):
            symbol = SYMBOLS[i % len(SYMBOLS)]
            units = (
                rng.choice((10.0, 20.0, 30.0))
                if symbol == "XAUUSD"
                else rng.choice((10_000.0, 20_000.0, 30_000.0))
            )
            fields: dict[str, Any] = {}
            if i % 25 == 7:
                fields["kill_switch_triggered"] = True
            outcome = env.deliver(approval(symbol, 1 if i % 2 else -1, units, **fields))
            assert isinstance(outcome, Publish), outcome
    yield Run(database_url, since, datetime.now(UTC) + timedelta(seconds=1))


def _cli(run: Run, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DATABASE_URL=run.database_url, METRICS_PORT="0")
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _query(run: Run, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(run.database_url, autocommit=True) as conn:
        return conn.execute(sql, {"since": run.since, "until": run.until, **params}).fetchall()


def _window(run: Run) -> list[str]:
    return ["--since", run.since.isoformat(), "--until", run.until.isoformat()]


@pytest.fixture(scope="module")
def report(executions: Run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("report")
    out, png = directory / "report.json", directory / "report.png"
    done = _cli(
        executions,
        "report",
        *_window(executions),
        "--by",
        "symbol",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    assert done.returncode == 0, done.stderr
    assert "EURUSD" in done.stdout and "IS pips" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document: dict[str, Any] = json.loads(out.read_text())
    document["_stdout"] = done.stdout
    return document


# Each fill, recomputed: shortfall from the arrival mid in pips (+ = cost), in the quote
# currency, in USD where the quote or the base is USD, and half the arrival spread in pips.
_FILLS = """
WITH f AS (
  SELECT symbol, executed_lots AS lots, slippage_pips, fill_price,
         direction * (fill_price - (arrival_bid + arrival_ask) / 2)
           / (request ->> 'pip')::float8 AS is_pips,
         (arrival_ask - arrival_bid) / 2 / (request ->> 'pip')::float8 AS half_spread,
         direction * (fill_price - (arrival_bid + arrival_ask) / 2) * executed_lots
           * (request ->> 'contract_size')::float8 AS is_quote,
         slippage_pips * (request ->> 'pip')::float8 * executed_lots
           * (request ->> 'contract_size')::float8 AS slip_quote
  FROM execution.executions
  WHERE received_at >= %(since)s AND received_at < %(until)s AND executed_lots > 0
)
SELECT symbol,
       sum(is_pips * lots) / sum(lots),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY is_pips),
       sum(CASE WHEN right(symbol, 3) = 'USD' THEN is_quote
                WHEN left(symbol, 3) = 'USD' THEN is_quote / fill_price END),
       sum(half_spread * lots) / sum(lots),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY slippage_pips),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY slippage_pips),
       count(*),
       sum(CASE WHEN right(symbol, 3) = 'USD' THEN slip_quote
                WHEN left(symbol, 3) = 'USD' THEN slip_quote / fill_price END)
FROM f GROUP BY ROLLUP (symbol)
"""
_LATENCY = """
SELECT symbol,
  percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - decided_at)),
  percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM submitted_at - received_at)),
  percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - submitted_at)),
  sum(executed_lots) FILTER (WHERE submitted_at IS NOT NULL)
    / nullif(sum(intended_lots) FILTER (WHERE submitted_at IS NOT NULL), 0)
FROM execution.executions
WHERE received_at >= %(since)s AND received_at < %(until)s
GROUP BY ROLLUP (symbol)
"""


def _figures(report: dict[str, Any], symbol: str | None) -> dict[str, Any]:
    figures: dict[str, Any] = report["overall"] if symbol is None else report["groups"][symbol]
    return figures


def test_a_few_hundred_executions_with_their_arrival_price(executions: Run) -> None:
    [(total, filled, with_arrival, spread_ok)] = _query(
        executions,
        "SELECT count(*), count(*) FILTER (WHERE executed_lots > 0),"
        " count(*) FILTER (WHERE executed_lots > 0 AND arrival_bid IS NOT NULL),"
        # the arrival tick is the one the spread check read (the order is priced again
        # from a fresh tick when it is sent: requested_price may differ)
        " bool_and(abs((arrival_ask - arrival_bid) / (request ->> 'pip')::float8 - spread_pips)"
        " < 1e-6) FILTER (WHERE arrival_bid IS NOT NULL)"
        " FROM execution.executions"
        " WHERE received_at >= %(since)s AND received_at < %(until)s",
    )
    assert total == COUNT
    assert filled >= COUNT * 0.8
    assert with_arrival == filled
    assert spread_ok is True


def test_the_report_counts_agree_with_the_audit_rows(
    executions: Run, report: dict[str, Any]
) -> None:
    rows = _query(
        executions,
        "SELECT symbol, state, count(*) FROM execution.executions"
        " WHERE received_at >= %(since)s AND received_at < %(until)s GROUP BY 1, 2",
    )
    expected: dict[str, dict[str, int]] = {}
    for symbol, state, count in rows:
        expected.setdefault(symbol, {})[state] = count
    assert {s: g["by_status"] for s, g in report["groups"].items()} == expected
    assert report["overall"]["executions"] == COUNT
    [(kills,)] = _query(
        executions,
        "SELECT count(*) FROM execution.executions WHERE rejection_reason = 'KILL_SWITCH'"
        " AND received_at >= %(since)s AND received_at < %(until)s",
    )
    assert kills > 0 and report["overall"]["by_reason"]["KILL_SWITCH"] == kills


@pytest.mark.parametrize("symbol", [*SYMBOLS, None])
def test_shortfall_spread_and_slippage_agree_with_an_independent_computation(
    executions: Run, report: dict[str, Any], symbol: str | None
) -> None:
    by_symbol = {row[0]: row[1:] for row in _query(executions, _FILLS)}
    is_mean, is_p95, is_usd, half_spread, slip_p50, slip_p95, fills, slip_usd = by_symbol[symbol]
    figures = _figures(report, symbol)
    assert figures["fills"] == fills
    assert figures["shortfall_pips"]["lots_weighted_mean"] == pytest.approx(is_mean, abs=1e-9)
    assert figures["shortfall_pips"]["p95"] == pytest.approx(is_p95, abs=1e-9)
    assert figures["shortfall_account"]["currency"] == "USD"
    assert figures["shortfall_account"]["unconverted_fills"] == 0  # USD is base or quote
    assert figures["shortfall_account"]["total"] == pytest.approx(is_usd, rel=1e-9)
    assert figures["spread_paid_pips"]["lots_weighted_mean"] == pytest.approx(half_spread)
    assert figures["slippage_pips"]["p50"] == pytest.approx(slip_p50, abs=1e-9)
    assert figures["slippage_pips"]["p95"] == pytest.approx(slip_p95, abs=1e-9)
    assert sum(figures["slippage_pips"]["histogram"].values()) == fills
    cost = figures["slippage_cost_account"]
    assert (cost["currency"], cost["unconverted_fills"]) == ("USD", 0)
    assert cost["converted_fills"] == fills
    assert cost["total"] == pytest.approx(slip_usd, rel=1e-9, abs=1e-9)
    assert is_mean > 0  # crossing half the spread costs


@pytest.mark.parametrize("symbol", [*SYMBOLS, None])
def test_latency_and_fill_ratio_agree_with_an_independent_computation(
    executions: Run, report: dict[str, Any], symbol: str | None
) -> None:
    by_symbol = {row[0]: row[1:] for row in _query(executions, _LATENCY)}
    queue_p50, worker_p50, broker_p99, fill_ratio = by_symbol[symbol]
    latency = _figures(report, symbol)["latency_ms"]
    assert latency["queue_wait"]["p50"] == pytest.approx(float(queue_p50) * 1000, abs=1e-3)
    assert latency["worker"]["p50"] == pytest.approx(float(worker_p50) * 1000, abs=1e-3)
    assert latency["broker"]["p99"] == pytest.approx(float(broker_p99) * 1000, abs=1e-3)
    assert _figures(report, symbol)["fill_ratio"] == pytest.approx(fill_ratio)


def test_the_table_shows_one_line_per_group_and_the_total(report: dict[str, Any]) -> None:
    lines = report["_stdout"].splitlines()
    starts = [line.split()[0] for line in lines if line.split()]
    for name in (*SYMBOLS, "all"):
        assert name in starts, report["_stdout"]
    total = next(line for line in lines if line.startswith("all "))
    assert total.split()[1] == str(COUNT)


def test_report_by_session_and_hour(executions: Run, tmp_path: Path) -> None:
    for by, expected in (("session", {"sim-0", "sim-1", "-"}), ("hour", None)):
        out = tmp_path / f"{by}.json"
        done = _cli(executions, "report", *_window(executions), "--by", by, "--json", str(out))
        assert done.returncode == 0, done.stderr
        groups = json.loads(out.read_text())["groups"]
        assert sum(g["executions"] for g in groups.values()) == COUNT
        if expected is not None:
            assert set(groups) <= expected and len(groups) >= 1


def test_trail_over_a_range_with_filters(executions: Run) -> None:
    [(rejected,)] = _query(
        executions,
        "SELECT count(*) FROM execution.executions WHERE state = 'REJECTED' AND symbol = 'EURUSD'"
        " AND received_at >= %(since)s AND received_at < %(until)s",
    )
    done = _cli(
        executions,
        "trail",
        *_window(executions),
        "--status",
        "rejected",
        "--symbol",
        "EURUSD",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert len(document["executions"]) == rejected > 0
    assert {(e["state"], e["symbol"]) for e in document["executions"]} == {("REJECTED", "EURUSD")}
    [(login,)] = _query(executions, "SELECT min(account_login) FROM execution.executions")
    done = _cli(executions, "trail", *_window(executions), "--account", str(login), "--limit", "5")
    assert done.returncode == 0, done.stderr
    assert "5 execution(s) (the limit" in done.stdout
    other = _cli(executions, "trail", "--since", "1d", "--account", "1")
    assert other.returncode == 1 and "0 execution(s)" in other.stdout


def test_report_refuses_a_window_that_ends_before_it_starts(executions: Run) -> None:
    done = _cli(executions, "report", "--since", "now", "--until", "1h")
    assert done.returncode == 2 and "--until must be after --since" in done.stderr
    bad = _cli(executions, "report", "--since", "yesterday")
    assert bad.returncode == 2 and "is not a time" in bad.stderr


def test_rejections_by_reason_agree_with_the_audit_rows(
    executions: Run, report: dict[str, Any]
) -> None:
    counted = dict(
        _query(
            executions,
            "SELECT rejection_reason, count(*) FROM execution.executions"
            " WHERE received_at >= %(since)s AND received_at < %(until)s"
            " AND rejection_reason IS NOT NULL GROUP BY 1",
        )
    )
    refused = report["overall"]["rejections"]
    assert {item["reason"]: item["count"] for item in refused} == counted
    counts = [item["count"] for item in refused]
    assert counts == sorted(counts, reverse=True)
    if counted:
        assert "Rejections by reason" in report["_stdout"]


def test_an_empty_range_says_so_in_text_and_plot(executions: Run, tmp_path: Path) -> None:
    png = tmp_path / "empty.png"
    done = _cli(
        executions,
        "report",
        "--since",
        "2001-01-01T00:00:00",
        "--until",
        "2001-01-02T00:00:00",
        "--plot",
        str(png),
    )
    assert done.returncode == 0, done.stderr
    assert "No executions received between" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Warning" not in done.stderr, done.stderr
