"""The desk tools' pure parts: times, IDs and previews of dead letters, TCA arithmetic."""

from __future__ import annotations

import json
import statistics
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pytest
from prometheus_client import REGISTRY

from worker.observability import metrics
from worker.observability.logs import forget_secrets, register_secret
from worker.tools.dead_letters_queue import DeadLetter, dead_letter_id, key_of, preview
from worker.tools.report import build_report, group_key, measure, percentile, render_text
from worker.tools.report_time import parse_time

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        ("90m", NOW - timedelta(minutes=90)),
        ("7d", NOW - timedelta(days=7)),
        ("1.5h", NOW - timedelta(hours=1.5)),
        ("2026-11-30T08:00", datetime(2026, 11, 30, 8, 0, tzinfo=UTC)),  # naive = UTC
        ("2026-11-30T09:00+01:00", datetime(2026, 11, 30, 8, 0, tzinfo=UTC)),
        ("2026-11-30T08:00Z", datetime(2026, 11, 30, 8, 0, tzinfo=UTC)),
    ],
)
def test_times_are_iso_or_an_age(text: str, expected: datetime) -> None:
    assert parse_time(text, NOW) == expected


def test_a_time_that_is_neither_says_so() -> None:
    with pytest.raises(ValueError, match="not a time"):
        parse_time("last tuesday", NOW)


def _props(**kwargs: Any) -> pika.BasicProperties:
    return pika.BasicProperties(content_type="application/json", **kwargs)


def test_the_id_is_the_message_id_else_a_hash_that_ignores_broker_headers() -> None:
    assert dead_letter_id(b"{}", _props(message_id="rpm-1")) == "rpm-1"
    first = dead_letter_id(b'{"a":1}', _props(headers={"x-delivery-count": 0}))
    again = dead_letter_id(
        b'{"a":1}', _props(headers={"x-delivery-count": 7, "x-death": [{"count": 1}]})
    )
    other = dead_letter_id(b'{"a":2}', _props(headers={"x-delivery-count": 0}))
    assert first == again != other
    assert first.startswith("h-") and len(first) == 18


def test_the_preview_masks_secrets_and_is_bounded() -> None:
    register_secret("s3cr3t-from-settings")
    try:
        body = json.dumps(
            {
                "decision": {"order_id": "o-1", "note": "s3cr3t-from-settings"},
                "api_token": "abc",
                "nested": [{"Password": "p"}],
                "filler": "x" * 1000,
            }
        ).encode()
        shown = preview(body, 200)
        assert "s3cr3t-from-settings" not in shown and '"api_token":"***"' in shown
        assert '"Password":"***"' in shown
        assert len(shown) == 200 and shown.endswith("…")
        assert preview(b"amqp://user:pw@host/ not json", 100) == "amqp://user:***@host/ not json"
    finally:
        forget_secrets()


def test_the_key_is_the_order_id_else_the_message_id() -> None:
    assert key_of(b'{"decision": {"order_id": "o-9"}}', _props(message_id="m")) == "o-9"
    assert key_of(b'{"order_id": "o-8"}', _props()) == "o-8"
    assert key_of(b"not json", _props(message_id="m-7")) == "m-7"
    assert key_of(b"not json", _props()) is None


def test_a_broker_dead_letter_reads_reason_and_first_seen_from_x_death() -> None:
    died = datetime(2026, 12, 1, 11, 0, tzinfo=UTC)
    props = _props(
        message_id="m",
        headers={
            "x-death": [{"reason": "delivery_limit", "queue": "execution.requests", "time": died}],
            "x-first-death-reason": "delivery_limit",
            "x-delivery-count": 3,
            "keep": "me",
        },
    )
    item = DeadLetter("m", 1, b"{}", props, "execution.requests")
    assert (item.reason, item.first_seen, item.delivery_count) == ("delivery_limit", died, 3)
    replayed = item.replay_properties(42)
    assert replayed.message_id == "m"
    assert replayed.headers == {
        "keep": "me",
        "x-replayed-from": "execution.requests.dead",
        "x-replay-action": 42,
    }
    worker = DeadLetter(
        "h",
        2,
        b"{}",
        _props(headers={"x-rejection-reason": "missing_idempotency_key"}, timestamp=1_700_000_000),
        "execution.requests",
    )
    assert worker.reason == "missing_idempotency_key"
    assert worker.first_seen_source == "published"


def test_percentiles_interpolate_like_percentile_cont() -> None:
    values = [3.0, 1.0, 7.0, 2.0, 10.0, 4.0]
    inclusive = statistics.quantiles(values, n=100, method="inclusive")
    assert percentile(values, 50) == pytest.approx(inclusive[49])
    assert percentile(values, 95) == pytest.approx(inclusive[94])
    assert percentile([5.0], 99) == 5.0 and percentile([], 50) is None


def _row(
    symbol: str,
    direction: int,
    bid: float,
    ask: float,
    fill: float,
    pip: float,
    contract: float,
    lots: float = 1.0,
) -> dict[str, Any]:
    return {
        "execution_id": "x",
        "state": "FILLED",
        "rejection_reason": None,
        "symbol": symbol,
        "direction": direction,
        "session_id": "s",
        "account_login": 1,
        "intended_lots": lots,
        "executed_lots": lots,
        "requested_price": ask,
        "fill_price": fill,
        "spread_pips": 0.0,
        "slippage_pips": 0.0,
        "arrival_bid": bid,
        "arrival_ask": ask,
        "pip": pip,
        "contract_size": contract,
        "decided_at": NOW,
        "received_at": NOW,
        "submitted_at": NOW,
        "completed_at": NOW,
    }


def test_shortfall_is_converted_only_where_no_other_rate_is_needed() -> None:
    eurusd = measure(_row("EURUSD", 1, 1.1000, 1.1002, 1.1003, 0.0001, 100_000), "USD")
    assert eurusd.shortfall_pips == pytest.approx(2.0)  # mid 1.1001 -> 1.1003
    assert eurusd.shortfall_account == pytest.approx(20.0)  # 0.0002 x 100,000 USD
    assert eurusd.spread_paid_pips == pytest.approx(1.0)
    usdjpy = measure(_row("USDJPY", -1, 150.00, 150.02, 149.99, 0.01, 100_000), "USD")
    assert usdjpy.shortfall_pips == pytest.approx(2.0)  # sold 2 pips below the mid
    assert usdjpy.shortfall_quote == pytest.approx(2000.0)  # JPY
    assert usdjpy.shortfall_account == pytest.approx(2000.0 / 149.99)
    eurgbp = measure(_row("EURGBP", 1, 0.8500, 0.8502, 0.8502, 0.0001, 100_000), "USD")
    assert eurgbp.shortfall_pips == pytest.approx(1.0) and eurgbp.shortfall_account is None
    document = build_report(
        [
            _row("EURUSD", 1, 1.1000, 1.1002, 1.1003, 0.0001, 100_000),
            _row("EURGBP", 1, 0.8500, 0.8502, 0.8502, 0.0001, 100_000),
        ],
        since=NOW,
        until=NOW + timedelta(hours=1),
        by="symbol",
    )
    money = document["overall"]["shortfall_account"]
    assert money["total"] == pytest.approx(20.0) and money["unconverted_fills"] == 1
    assert money["unconverted_by_quote_currency"] == {"GBP": pytest.approx(10.0)}
    text = render_text(document)
    assert (
        "20.00*" in text and "Not converted to USD (no rate recorded): 1 fills, 10.00 GBP" in text
    )


def test_the_shortfall_metric_is_observed_per_symbol() -> None:
    def count(symbol: str) -> float:
        value = REGISTRY.get_sample_value(
            "execution_worker_shortfall_pips_count", {"symbol": symbol}
        )
        return value or 0.0

    before = count("EURUSD")
    metrics.record_shortfall("EURUSD", 1, 1.1000, 1.1002, 1.1003, 0.0001)
    metrics.record_shortfall("EURUSD", 1, None, None, 1.1003, 0.0001)  # no arrival: nothing
    assert count("EURUSD") == before + 1
    le_2 = REGISTRY.get_sample_value(
        "execution_worker_shortfall_pips_bucket", {"symbol": "EURUSD", "le": "2.0"}
    )
    assert le_2 is not None and le_2 >= 1


def test_the_report_groups_by_the_accounts_name_and_by_login_for_older_rows() -> None:
    """Two sessions of one named account are one group; a row from before account names
    existed (no ``account``) is grouped by the login it traded on."""
    key = group_key("account")
    named_a = {"account": "live-eu", "account_login": 1001}
    named_b = {"account": "live-eu", "account_login": 1002}
    older = {"account": None, "account_login": 1003}
    assert key(named_a) == key(named_b) == "live-eu"
    assert key(older) == "1003"
    assert key({}) == "-"


def test_publish_account_names_the_account_where_the_approval_names_none() -> None:
    from worker.tools.publish import approved_trade, rpm_output, with_account

    whole = rpm_output(approved_trade("EURUSD", 1, 100_000.0), order_id="o-1")
    named = with_account(whole, "ICMarkets-Demo:5012345")
    assert named["decision"]["account"] == "ICMarkets-Demo:5012345"
    assert "account" not in whole["decision"]  # the original is not changed
    bare = with_account(whole["decision"], "desk-2")
    assert bare["account"] == "desk-2"
    already = with_account(named, "desk-2")
    assert already["decision"]["account"] == "ICMarkets-Demo:5012345"


def test_a_short_range_gets_buckets_that_draw_lines() -> None:
    from datetime import UTC, datetime, timedelta

    from worker.tools.report import measure
    from worker.tools.report_plot import bucket_size, data_extent

    since = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    until = since + timedelta(hours=1)
    # one minute of trading in a one-hour window: buckets of seconds over that minute
    rows = [{"received_at": since + timedelta(minutes=20, seconds=s)} for s in range(0, 60, 3)]
    first, last = data_extent([measure(row, "USD") for row in rows], since, until)
    assert (first, last) == (rows[0]["received_at"], rows[-1]["received_at"])
    size = bucket_size(first, last)
    assert 10 <= (last - first) / size <= 40
    assert bucket_size(since, since + timedelta(days=30)) == timedelta(days=1)
