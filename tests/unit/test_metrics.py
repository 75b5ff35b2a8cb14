"""The metric helpers move exactly the series docs/METRICS.md says they move."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.observability import metrics

ROOT = Path(__file__).resolve().parents[2]


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(autouse=True)
def _no_state_readers() -> Iterator[None]:
    metrics.clear_state_readers()
    yield
    metrics.clear_state_readers()


def test_outcome_counts_by_lower_case_status_and_reason() -> None:
    name = "execution_worker_executions_total"
    filled = value(name, status="filled", reason="none", account="none")
    spread = value(name, status="rejected", reason="SPREAD_TOO_WIDE", account="none")
    other = value(name, status="rejected", reason="other", account="none")

    metrics.record_outcome("FILLED")
    metrics.record_outcome("REJECTED", "SPREAD_TOO_WIDE")
    metrics.record_outcome("REJECTED", "SPREAD_TOO_WIDE")
    metrics.record_outcome("REJECTED", "password=hunter2 in a free text reason")

    assert value(name, status="filled", reason="none", account="none") == filled + 1
    assert value(name, status="rejected", reason="SPREAD_TOO_WIDE", account="none") == spread + 2
    assert value(name, status="rejected", reason="other", account="none") == other + 1


def test_stage_histogram_counts_and_buckets() -> None:
    name = "execution_worker_stage_duration_seconds"
    count = value(name + "_count", stage="submit")
    fast = value(name + "_bucket", stage="submit", le="0.005")
    slow = value(name + "_bucket", stage="submit", le="0.25")

    metrics.observe_stage("submit", 0.2)
    metrics.observe_stage("submit", -1.0)  # a clock step backwards is not a duration
    metrics.observe_stage("submit", float("nan"))

    assert value(name + "_count", stage="submit") == count + 1
    assert value(name + "_bucket", stage="submit", le="0.005") == fast
    assert value(name + "_bucket", stage="submit", le="0.25") == slow + 1


def test_stage_timer_observes_also_when_the_block_raises() -> None:
    name = "execution_worker_stage_duration_seconds_count"
    before = value(name, stage="commit")
    with pytest.raises(RuntimeError), metrics.stage_timer("commit"):
        raise RuntimeError("database gone")
    assert value(name, stage="commit") == before + 1


def test_unknown_stage_is_counted_as_other() -> None:
    name = "execution_worker_stage_duration_seconds_count"
    before = value(name, stage="other")
    parse = value(name, stage="parse")
    metrics.observe_stage("bogus", 0.1)
    metrics.observe_stage("parse", 0.1)
    assert value(name, stage="other") == before + 1
    assert value(name, stage="parse") == parse + 1


def test_retcodes_retries_and_unknown_outcomes() -> None:
    codes = "execution_worker_broker_retcodes_total"
    done, none, other = (value(codes, retcode=c) for c in ("10009", "none", "other"))
    retries = value("execution_worker_send_retries_total")
    unknown = value("execution_worker_unknown_outcomes_total", session="sim-1")
    unknown_none = value("execution_worker_unknown_outcomes_total", session="none")

    metrics.record_retcode(10009)
    metrics.record_retcode(None)
    metrics.record_retcode(1)
    metrics.record_retries(2)
    metrics.record_retries(0)
    metrics.record_unknown_outcome("sim-1")
    metrics.record_unknown_outcome()

    assert value(codes, retcode="10009") == done + 1
    assert value(codes, retcode="none") == none + 1
    assert value(codes, retcode="other") == other + 1
    assert value("execution_worker_send_retries_total") == retries + 2
    assert value("execution_worker_unknown_outcomes_total", session="sim-1") == unknown + 1
    assert value("execution_worker_unknown_outcomes_total", session="none") == unknown_none + 1


def test_slippage_is_signed_by_symbol_and_side_and_breaches_count() -> None:
    hist = "execution_worker_slippage_pips"
    labels = {"symbol": "USDJPY", "side": "sell"}
    favourable = value(hist + "_bucket", le="-0.5", **labels)
    adverse_small = value(hist + "_bucket", le="0.2", **labels)
    count = value(hist + "_count", **labels)
    buys = value(hist + "_count", symbol="USDJPY", side="buy")
    breaches = value("execution_worker_slippage_breaches_total", symbol="USDJPY")

    metrics.record_slippage("USDJPY", -1, -0.7)  # favourable: below -0.5
    metrics.record_slippage("usdjpy", "SELL", 2.4)
    metrics.record_slippage("USDJPY", "sell", float("nan"))
    metrics.record_slippage_breach("USDJPY")

    assert value(hist + "_count", **labels) == count + 2
    assert value(hist + "_count", symbol="USDJPY", side="buy") == buys
    assert value(hist + "_bucket", le="-0.5", **labels) == favourable + 1
    assert value(hist + "_bucket", le="0.2", **labels) == adverse_small + 1
    assert value("execution_worker_slippage_breaches_total", symbol="USDJPY") == breaches + 1


def test_symbol_labels_are_bounded_and_shaped(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "execution_worker_slippage_breaches_total"
    other = value(name, symbol="other")
    metrics.record_slippage_breach("EUR USD; DROP TABLE")  # not a symbol's shape
    assert value(name, symbol="other") == other + 1

    monkeypatch.setattr(metrics, "_symbols", set())  # a fresh guard, restored afterwards
    monkeypatch.setattr(metrics, "MAX_SYMBOLS", 3)
    assert [metrics.symbol_label(s) for s in ("AAA", "BBB", "CCC", "DDD")] == [
        "AAA",
        "BBB",
        "CCC",
        "other",
    ]
    assert metrics.symbol_label("aaa") == "AAA"


def test_fill_ratio_and_claim_wait() -> None:
    ratio = "execution_worker_fill_ratio_bucket"
    below_full = value(ratio, le="0.95")
    timeouts = value(
        "execution_worker_session_claim_wait_seconds_count", result="timeout", account="none"
    )
    acquired = value(
        "execution_worker_session_claim_wait_seconds_count", result="acquired", account="none"
    )

    metrics.observe_fill_ratio(0.92)
    metrics.observe_fill_ratio(1.0)
    metrics.record_claim_wait(5.0, acquired=False)
    metrics.record_claim_wait(0.001, acquired=True)

    assert value(ratio, le="0.95") == below_full + 1
    assert (
        value("execution_worker_session_claim_wait_seconds_count", result="timeout", account="none")
        == timeouts + 1
    )
    assert (
        value(
            "execution_worker_session_claim_wait_seconds_count", result="acquired", account="none"
        )
        == acquired + 1
    )


def test_received_dead_letters_reconnects_and_in_flight() -> None:
    received = "execution_worker_requests_received_total"
    valid_again = value(received, result="valid", redelivered="true")
    invalid = value(received, result="invalid", redelivered="false")
    duplicates = value("execution_worker_duplicates_total")
    dead = value("execution_worker_dead_lettered_total", reason="MALFORMED_JSON")
    dead_other = value("execution_worker_dead_lettered_total", reason="other")
    reconnects = value("execution_worker_reconnects_total", target="rabbitmq")
    flying = value("execution_worker_in_flight_messages")

    metrics.record_received(redelivered=True)
    metrics.record_received("invalid")
    metrics.record_duplicate()
    metrics.record_dead_letter("MALFORMED_JSON")
    metrics.record_dead_letter("order 3f0c-42 was bad")  # free text never becomes a label
    metrics.record_reconnect("rabbitmq")
    metrics.in_flight(+1)
    metrics.in_flight(+1)
    metrics.in_flight(-1)

    assert value(received, result="valid", redelivered="true") == valid_again + 1
    assert value(received, result="invalid", redelivered="false") == invalid + 1
    assert value("execution_worker_duplicates_total") == duplicates + 1
    assert value("execution_worker_dead_lettered_total", reason="MALFORMED_JSON") == dead + 1
    assert value("execution_worker_dead_lettered_total", reason="other") == dead_other + 1
    assert value("execution_worker_reconnects_total", target="rabbitmq") == reconnects + 1
    assert value("execution_worker_in_flight_messages") == flying + 1
    metrics.in_flight(-1)


def test_state_gauges_come_from_registered_callbacks() -> None:
    by_session = (("acct-1", False), ("acct-2", True), ("acct-3", False), ("acct-4", False))
    metrics.register_pool_state(lambda: metrics.PoolState(4, 3, 1, by_session))
    metrics.register_outbox_state(lambda: metrics.OutboxState(7, 12.5))
    metrics.register_in_flight_state(lambda: metrics.InFlightState(2, 95.0))
    metrics.refresh()
    assert value("execution_worker_sessions") == 4
    assert value("execution_worker_sessions_in_use") == 3
    assert value("execution_worker_sessions_unhealthy", session="acct-2") == 1
    assert value("execution_worker_sessions_unhealthy", session="acct-1") == 0
    assert value("execution_worker_outbox_backlog") == 7
    assert value("execution_worker_outbox_oldest_age_seconds") == 12.5
    assert value("execution_worker_executions_in_flight") == 2
    assert value("execution_worker_executions_in_flight_oldest_seconds") == 95.0


def test_unhealthy_sessions_are_named_and_recover_to_zero() -> None:
    state = {"down": True}
    metrics.register_pool_state(
        lambda: metrics.PoolState(
            2, 0, int(state["down"]), (("b-1", state["down"]), ("b-2", False))
        )
    )
    metrics.refresh()
    assert value("execution_worker_sessions_unhealthy", session="b-1") == 1
    state["down"] = False
    metrics.refresh()
    assert value("execution_worker_sessions_unhealthy", session="b-1") == 0


def test_unhealthy_session_labels_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_sessions", set())
    monkeypatch.setattr(metrics, "MAX_SESSIONS", 2)
    sessions = (*((f"s-{i}", True) for i in range(5)), ("bad label; x", True))
    metrics.register_pool_state(lambda: metrics.PoolState(6, 0, 6, sessions))
    metrics.refresh()
    assert value("execution_worker_sessions_unhealthy", session="s-0") == 1
    assert value("execution_worker_sessions_unhealthy", session="s-1") == 1
    # the rest share one bounded label and still add up to the count
    assert value("execution_worker_sessions_unhealthy", session="other") == 4


def test_a_pool_without_session_detail_reports_its_count_as_none() -> None:
    metrics.register_pool_state(lambda: metrics.PoolState(size=3, in_use=0, unhealthy=2))
    metrics.refresh()
    assert value("execution_worker_sessions_unhealthy", session="none") == 2


def test_recoveries_and_readiness() -> None:
    name = "execution_worker_recoveries_total"
    settled, unresolved = value(name, result="settled"), value(name, result="unresolved")
    metrics.record_recovery(settled=True)
    metrics.record_recovery(settled=False)
    metrics.record_recovery(settled=False)
    assert value(name, result="settled") == settled + 1
    assert value(name, result="unresolved") == unresolved + 2
    metrics.record_ready(False)
    assert value("execution_worker_ready") == 0
    metrics.record_ready(True)
    assert value("execution_worker_ready") == 1


def test_a_failing_callback_keeps_the_last_value_and_does_not_raise() -> None:
    metrics.register_outbox_state(lambda: metrics.OutboxState(2, 1.0))
    metrics.refresh()

    def broken() -> metrics.OutboxState:
        raise ConnectionError("database down")

    metrics.register_outbox_state(broken)
    metrics.refresh()
    assert value("execution_worker_outbox_backlog") == 2


ALLOWED_LABELS = {"symbol", "side", "status", "reason", "retcode", "stage", "session"}
ALLOWED_LABELS |= {"redelivered", "result", "target", "le", "account"}
ALLOWED_LABELS |= {"node"}  # the RabbitMQ node the worker is on: one of the configured nodes


def test_exposition_uses_the_prefix_units_and_bounded_label_names() -> None:
    families = {
        family.name: family
        for family in text_string_to_metric_families(generate_latest(REGISTRY).decode())
        if family.name.startswith(metrics.PREFIX)
    }
    assert {name.removesuffix("_total") for name in metrics.metric_names()} <= set(families)
    for family in families.values():
        if family.type == "counter":
            assert any(s.name.endswith("_total") for s in family.samples) or not family.samples
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_pips", "_ratio")), family.name
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (family.name, sample.labels)
            assert not any(re.fullmatch(r"[0-9a-f-]{36}", v) for v in sample.labels.values())


def test_metrics_doc_lists_every_metric() -> None:
    doc = (ROOT / "docs" / "METRICS.md").read_text(encoding="utf-8")
    missing = [name for name in metrics.metric_names() if f"`{name}`" not in doc]
    assert not missing, f"docs/METRICS.md does not document {missing}"
