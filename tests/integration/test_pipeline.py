"""The execution pipeline against a real PostgreSQL and the simulated terminal."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from schemas.identity import comment_token_for, deployment_of, execution_id_for, order_magic_for
from schemas.request import MessageProperties
from tests import samples
from tests.integration.pipeline_env import PipelineEnv, approval, pipeline_env
from worker.execution.outcome import DeadLetter, Publish, Requeue, Settling
from worker.execution.pipeline import Pipeline
from worker.mt5 import api
from worker.mt5.sim.terminal import FaultConfig, SimAccount, SimConfig

RICH = SimConfig(account=SimAccount(balance=10_000_000.0))


@pytest.fixture
def env(new_database: Callable[[], str]) -> Iterator[PipelineEnv]:
    with pipeline_env(new_database(), RICH) as built:
        yield built


def _key(message: dict[str, Any]) -> str:
    key: str = message["decision"]["order_id"]
    return key


def test_an_approval_becomes_one_filled_order(env: PipelineEnv) -> None:
    message = approval("EURUSD", 1, 100_000.0)
    confirmation = env.confirm(message)
    token = comment_token_for(execution_id_for(_key(message)))
    assert confirmation["status"] == "FILLED" and confirmation["rejection_reason"] is None
    assert confirmation["executed_lots"] == 1.0 and confirmation["executed_units"] == 100_000.0
    assert confirmation["intended_lots"] == 1.0 and confirmation["session_id"] == "sim-0"
    deals = env.deals(execution_id_for(_key(message)))
    magic = order_magic_for(execution_id_for(_key(message)), env.settings.magic)
    assert len(deals) == 1 and deals[0].magic == magic  # this execution's own magic
    assert deployment_of(magic) == env.settings.magic
    assert confirmation["broker_deals"] == [deals[0].ticket]
    assert confirmation["fill_price"] == deals[0].price
    row = env.row(confirmation["execution_id"])
    assert row["state"] == "FILLED" and row["broker_order"] == deals[0].order
    assert row["magic"] == magic
    [order] = env.sim.history_orders_get(ticket=deals[0].order) or ()
    assert row["filling_mode"] == order.type_filling, "the filling mode sent is on record"
    events = env.events(confirmation["execution_id"])
    states = [event["state"] for event in events if event["kind"] == "transition"]
    assert states == ["VALIDATED", "SUBMITTING", "FILLED"]
    queried = {
        call["function"]
        for event in events
        if event["kind"] == "broker_queries"
        for call in event["detail"]["calls"]
    }
    assert {"symbol_info", "symbol_info_tick", "account_info", "order_calc_margin"} <= queried
    sent = [event for event in events if event["kind"] == "broker_call"]
    assert [event["function"] for event in sent] == ["order_send"]
    assert sent[0]["retcode"] == 10009 and sent[0]["detail"]["request"]["comment"] == token


def test_a_redelivery_gets_the_same_confirmation_and_no_second_order(env: PipelineEnv) -> None:
    message = approval("USDJPY", -1, 50_000.0)
    first = env.deliver(message)
    second = env.deliver(message, redelivered=True)
    assert isinstance(first, Publish) and second == first
    assert len(env.deals(first.execution_id)) == 1


def _all_at_once(call: Callable[[], object], count: int) -> list[object]:
    """``count`` threads make ``call`` at the same moment; their results."""
    start = threading.Barrier(count)
    results: list[object] = []

    def run() -> None:
        start.wait()
        results.append(call())

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_simultaneous_first_deliveries_of_one_key_send_one_order(
    new_database: Callable[[], str],
) -> None:
    """No lock is taken before the intent: the intent's primary key and the session lease
    must still let exactly one of several simultaneous deliveries send."""
    slow = SimConfig(faults=FaultConfig(latency_by_function={"order_send": 30.0}))
    with pipeline_env(new_database(), slow, sessions=3, claim_timeout_seconds=10.0) as env:
        for round_ in range(4):
            message = approval("EURUSD", 1 if round_ % 2 == 0 else -1, 10_000.0)
            outcomes = _all_at_once(lambda message=message: env.deliver(message), 3)
            published = [outcome for outcome in outcomes if isinstance(outcome, Publish)]
            assert len(outcomes) == 3 and published, outcomes
            assert all(outcome == published[0] for outcome in published), "one confirmation"
            assert all(isinstance(o, Publish | Requeue) for o in outcomes), outcomes
            assert len(env.deals(published[0].execution_id)) == 1, "exactly one order for the key"
            assert json.loads(published[0].payload)["status"] == "FILLED"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"status": "REJECTED"}, "NOT_APPROVED"),
        ({"kill_switch_triggered": True}, "KILL_SWITCH"),
    ],
)
def test_refusals_that_never_reach_the_broker(
    env: PipelineEnv, change: dict[str, Any], reason: str
) -> None:
    message = approval()
    message["decision"].update(change)
    if change.get("status") == "REJECTED":
        message["decision"]["approved_trade"] = None
    confirmation = env.confirm(message)
    assert confirmation["status"] == "REJECTED" and confirmation["rejection_reason"] == reason
    assert env.deals() == []


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"execution_worker_{name}", labels) or 0.0


def test_a_repeated_refusal_answers_the_first_and_counts_as_a_duplicate(
    env: PipelineEnv,
) -> None:
    message = approval()
    message["decision"]["kill_switch_triggered"] = True
    refused = {"status": "rejected", "reason": "KILL_SWITCH", "account": "none"}
    before = (_counter("executions_total", **refused), _counter("duplicates_total"))
    first = env.deliver(message)
    second = env.deliver(message)  # the RPM published it twice: not a redelivery
    assert isinstance(first, Publish) and second == first
    after = (_counter("executions_total", **refused), _counter("duplicates_total"))
    assert after == (before[0] + 1, before[1] + 1)


def test_halted_portfolio_is_refused(env: PipelineEnv) -> None:
    message = samples.rpm_output(samples.decision(), halted=True)
    confirmation = env.confirm(message)
    assert confirmation["rejection_reason"] == "TRADING_HALTED"
    assert confirmation["rejection_details"] == "daily loss"
    assert env.deals() == []


def test_a_stale_approval_is_refused(env: PipelineEnv) -> None:
    old = (datetime.now(UTC) - timedelta(seconds=31)).replace(tzinfo=None).isoformat()
    message = approval()
    message["decision"]["approved_trade"]["timestamp"] = old
    confirmation = env.confirm(message)
    assert confirmation["rejection_reason"] == "STALE_APPROVAL"
    assert env.deals() == []


def test_invalid_message_with_a_key_is_rejected_with_a_confirmation(env: PipelineEnv) -> None:
    message = approval()
    message["decision"]["approved_trade"]["position_units"] = -5
    confirmation = env.confirm(message)
    assert confirmation["status"] == "REJECTED"
    assert confirmation["rejection_reason"] == "INVALID_REQUEST"
    assert "position_units" in confirmation["rejection_details"]
    assert env.row(confirmation["execution_id"])["state"] == "REJECTED"
    assert env.deals() == []


def test_invalid_message_without_a_key_is_dead_lettered(env: PipelineEnv) -> None:
    outcome = env.deliver(b"{not json")
    assert isinstance(outcome, DeadLetter) and outcome.reason == "not_json"
    outcome = env.deliver(samples.decision(order_id=None))
    assert isinstance(outcome, DeadLetter) and outcome.reason == "missing_idempotency_key"
    assert env.deals() == []


@pytest.mark.parametrize(
    ("symbol", "units", "reason"),
    [
        ("EURUSDX", 100_000.0, "SYMBOL_NOT_TRADABLE"),
        ("EURUSD", 500.0, "VOLUME_INVALID"),
        ("BTCUSD", 1.0, "SPREAD_TOO_WIDE"),
    ],
)
def test_validation_rejections(env: PipelineEnv, symbol: str, units: float, reason: str) -> None:
    confirmation = env.confirm(approval(symbol, 1, units))
    assert confirmation["status"] == "REJECTED" and confirmation["rejection_reason"] == reason
    assert env.deals() == []


def test_margin_with_cushion(new_database: Callable[[], str]) -> None:
    with pipeline_env(new_database()) as env:
        # 70 lots EURUSD at 1:100 needs ~76k; with the 1.5 cushion that exceeds 100k free
        confirmation = env.confirm(approval("EURUSD", 1, 7_000_000.0))
        assert confirmation["rejection_reason"] == "MARGIN_INSUFFICIENT"
        assert env.deals() == []


def test_trading_disabled_at_the_terminal(env: PipelineEnv) -> None:
    env.sim.set_trading(terminal=False)
    confirmation = env.confirm(approval())
    assert confirmation["rejection_reason"] == "TRADING_DISABLED"
    assert env.deals() == []


def test_market_closed_by_the_server(new_database: Callable[[], str]) -> None:
    with pipeline_env(new_database(), RICH, max_tick_age_seconds=10**9) as env:
        env.sim.update_symbol("EURUSD", closed_weekly=(("Mon 00:00", "Mon 00:00"),))
        now = datetime.now(UTC)
        start = now - timedelta(minutes=5)
        end = now + timedelta(minutes=5)
        window = (start.strftime("%a %H:%M"), end.strftime("%a %H:%M"))
        env.sim.update_symbol("EURUSD", closed_weekly=(window,))
        confirmation = env.confirm(approval())
        assert confirmation["rejection_reason"] in ("MARKET_CLOSED", "STALE_TICK")
        assert env.deals() == []


def test_broker_rejection_is_final_and_reported(env: PipelineEnv) -> None:
    env.sim.set_faults(scripted=("reject",))
    confirmation = env.confirm(approval())
    assert confirmation["status"] == "REJECTED"
    assert confirmation["rejection_reason"] == "BROKER_REJECTED"
    assert confirmation["retcode"] == api.TRADE_RETCODE_REJECT
    assert env.deals() == []


def test_requote_is_retried_with_a_fresh_price(env: PipelineEnv) -> None:
    # instant execution fills market orders FOK (DOMAIN.md 2): allowed here, so no 10030
    env.sim.update_symbol("GBPUSD", filling_mode=api.SYMBOL_FILLING_FOK)
    env.sim.set_faults(scripted=("requote",))
    confirmation = env.confirm(approval("GBPUSD", 1, 100_000.0))
    assert confirmation["status"] == "FILLED" and confirmation["attempts"] == 2
    assert len(env.deals()) == 1


def _market_execution_gbpusd(env: PipelineEnv) -> None:
    """GBPUSD is an instant-execution symbol, where a real server fills market orders FOK
    only (never partially); under market execution its IOC-only bitmask does apply."""
    env.sim.update_symbol("GBPUSD", trade_exemode=api.SYMBOL_TRADE_EXECUTION_MARKET)


def test_partial_fill_under_ioc(env: PipelineEnv) -> None:
    # GBPUSD fills IOC only, 30 lots of liquidity per order: 32 lots -> 93.75 %
    _market_execution_gbpusd(env)
    confirmation = env.confirm(approval("GBPUSD", 1, 3_200_000.0))
    assert confirmation["status"] == "PARTIALLY_FILLED"
    assert confirmation["executed_lots"] == 30.0 and confirmation["intended_lots"] == 32.0
    assert confirmation["rejection_reason"] is None


def test_insufficient_fill(env: PipelineEnv) -> None:
    _market_execution_gbpusd(env)
    confirmation = env.confirm(approval("GBPUSD", 1, 4_000_000.0))
    assert confirmation["status"] == "PARTIALLY_FILLED"
    assert confirmation["rejection_reason"] == "INSUFFICIENT_FILL"
    assert confirmation["executed_units"] == 3_000_000.0


def test_exchange_execution_placed_then_filled(env: PipelineEnv) -> None:
    env.sim.update_symbol("US500", exchange_fill_delay_seconds=0.05)
    confirmation = env.confirm(approval("US500", 1, 5.0))
    assert confirmation["status"] == "FILLED" and confirmation["executed_lots"] == 5.0
    assert "settle" in confirmation["timings_ms"]  # watched off its session, by the settler


def test_exchange_order_expires_and_is_cancelled(new_database: Callable[[], str]) -> None:
    with pipeline_env(new_database(), RICH, order_timeout_seconds=0.2) as env:
        env.sim.update_symbol("US500", exchange_fill_delay_seconds=3600)
        confirmation = env.confirm(approval("US500", -1, 5.0))
        assert confirmation["status"] == "EXPIRED"
        assert confirmation["rejection_reason"] == "ORDER_TIMEOUT"
        assert env.deals() == [] and env.sim.orders_get() == ()


def test_lost_reply_is_reconciled_without_a_second_order(env: PipelineEnv) -> None:
    env.sim.set_faults(scripted=("lost_reply",))
    message = approval("EURUSD", -1, 200_000.0)
    confirmation = env.confirm(message)
    assert confirmation["status"] == "FILLED" and confirmation["executed_lots"] == 2.0
    assert len(env.deals()) == 1
    notes = [e["detail"] for e in env.events(confirmation["execution_id"]) if e["kind"] == "note"]
    assert {"outcome": "unknown", "retcode": None} in notes
    assert any(note.get("off_session") is True for note in notes)  # found by the settler


def test_no_result_is_never_sent_again(env: PipelineEnv) -> None:
    """None from order_send is an unknown outcome (DOMAIN.md 2): even when the server did
    not take the order, nothing proves it, so nothing is sent again (issue 26)."""
    env.sim.set_faults(scripted=("no_result",))
    confirmation = env.confirm(approval())
    assert (confirmation["status"], confirmation["rejection_reason"]) == (
        "FAILED",
        "UNKNOWN_OUTCOME",
    )
    assert confirmation["provisional"] is True
    assert env.deals() == [] and env.sim.orders_get() == ()
    sends = [e for e in env.events(confirmation["execution_id"]) if e["function"] == "order_send"]
    assert len(sends) == 1


class Crash(BaseException):
    """A worker dying at a given point (not caught by the pipeline's error handling)."""


@pytest.mark.parametrize("point", ["before_send", "after_fill", "in_final_commit"])
def test_a_crash_then_a_redelivery_gives_exactly_one_order(
    env: PipelineEnv, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    message = approval("XAUUSD", 1, 200.0)
    crashing = Pipeline(env.settings, env.store, env.pool)
    if point == "before_send":
        monkeypatch.setattr(crashing, "_submit", _raise)
    elif point == "after_fill":
        monkeypatch.setattr(crashing, "conclude", _raise)
    else:
        monkeypatch.setattr(crashing.store, "finish", _raise)
    with pytest.raises(Crash):
        crashing.handle(_delivery(message))
    monkeypatch.undo()
    execution_id = str(execution_id_for(_key(message)))
    assert env.row(execution_id)["state"] == "SUBMITTING"
    confirmation = env.confirm(message, redelivered=True)
    if point == "before_send":
        # no reply proves the order never left: it is never sent again (issue 26)
        assert (confirmation["status"], confirmation["provisional"]) == ("FAILED", True)
        assert confirmation["rejection_reason"] == "UNKNOWN_OUTCOME"
        assert env.deals() == [] and env.row(execution_id)["state"] == "UNKNOWN"
        return
    assert confirmation["status"] == "FILLED" and confirmation["executed_lots"] == 2.0
    assert confirmation["executed_units"] == 200.0  # XAUUSD: contract 100 per lot
    assert confirmation["slippage_pips"] is not None
    assert len(env.deals()) == 1
    assert env.row(execution_id)["state"] == "FILLED"


def test_restart_recovery_settles_in_flight_rows(
    env: PipelineEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = approval("EURUSD", 1, 100_000.0)
    crashing = Pipeline(env.settings, env.store, env.pool)
    monkeypatch.setattr(crashing, "conclude", _raise)
    with pytest.raises(Crash):
        crashing.handle(_delivery(message))
    monkeypatch.undo()
    with env.store.connection() as conn:
        (row,) = env.store.in_flight(conn)
    handed = env.pipeline.resume(row)  # to the settler, off the session
    assert isinstance(handed, Settling) and handed.execution_id == row.execution_id
    outcome = env.pipeline.settler.wait_for(row.execution_id, 10.0)
    assert isinstance(outcome, Publish)
    assert json.loads(outcome.payload)["status"] == "FILLED"
    assert env.store.unpublished(10) == [outcome]
    assert len(env.deals()) == 1


@pytest.mark.parametrize(
    ("symbol", "direction", "units", "points", "expected"),
    [
        ("USDJPY", -1, 100_000.0, 5, 0.5),  # 5 points of 0.001 = 0.5 pip adverse
        ("USDJPY", 1, 100_000.0, -5, -0.5),  # favourable
        ("XAUUSD", 1, 100.0, 5, 0.5),  # gold: point 0.01, pip 0.1
        ("XAUUSD", -1, 100.0, -5, -0.5),
        ("EURUSD", 1, 100_000.0, 3, 0.3),
    ],
)
def test_signed_slippage_in_pips(
    env: PipelineEnv, symbol: str, direction: int, units: float, points: int, expected: float
) -> None:
    env.sim.set_faults(slippage_points=((points, 1.0),))
    confirmation = env.confirm(approval(symbol, direction, units))
    assert confirmation["status"] == "FILLED"
    assert confirmation["slippage_pips"] == pytest.approx(expected)


def test_slippage_breach_is_flagged(env: PipelineEnv) -> None:
    env.sim.set_faults(slippage_points=((50, 1.0),))
    confirmation = env.confirm(approval("EURUSD", 1, 100_000.0))
    assert confirmation["status"] == "FILLED"
    assert confirmation["rejection_reason"] == "SLIPPAGE_EXCEEDED"
    assert confirmation["slippage_pips"] == pytest.approx(5.0)


def test_slippage_breach_close_policy(new_database: Callable[[], str]) -> None:
    with pipeline_env(new_database(), RICH, slippage_policy="close") as env:
        env.sim.set_faults(slippage_points=((50, 1.0),))
        confirmation = env.confirm(approval("EURUSD", 1, 100_000.0))
        assert confirmation["status"] == "CANCELLED"
        assert confirmation["rejection_reason"] == "SLIPPAGE_EXCEEDED"
        assert len(confirmation["broker_deals"]) == 2
        assert env.sim.positions_get() == ()


def test_hedging_account_closes_opposite_positions_first(env: PipelineEnv) -> None:
    env.confirm(approval("EURUSD", 1, 100_000.0))
    env.confirm(approval("EURUSD", -1, 40_000.0))
    (position,) = env.sim.positions_get(symbol="EURUSD")
    assert position.type == api.POSITION_TYPE_BUY and position.volume == pytest.approx(0.6)
    confirmation = env.confirm(approval("EURUSD", -1, 100_000.0))
    assert confirmation["status"] == "FILLED" and confirmation["executed_lots"] == 1.0
    (position,) = env.sim.positions_get(symbol="EURUSD")
    assert position.type == api.POSITION_TYPE_SELL and position.volume == pytest.approx(0.4)


def test_database_down_requeues_and_sends_nothing(new_database: Callable[[], str]) -> None:
    with pipeline_env(new_database(), RICH) as env:
        env.store.pool.close()
        outcome = env.deliver(approval())
        # the session lease needs the database first: no lease, no order
        assert isinstance(outcome, Requeue)
        assert outcome.reason in ("no MT5 session available", "database: PoolClosed")
        assert env.deals() == []


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise Crash


def _delivery(message: dict[str, Any]) -> Any:
    from worker.execution.outcome import Delivery

    return Delivery(
        body=json.dumps(message).encode(),
        properties=MessageProperties(),
        redelivered=False,
        delivery_count=None,
        received_at=datetime.now(UTC),
    )


def test_a_lost_terminal_requeues_and_the_redelivery_fills_once(env: PipelineEnv) -> None:
    env.sim.set_faults(disconnect_rate=1.0)  # every call drops the connection
    message = approval("EURUSD", 1, 100_000.0)
    outcome = env.deliver(message)
    assert isinstance(outcome, Requeue)
    assert env.deals() == []
    with env.store.connection() as conn:  # a transient fault never refuses the approval
        assert env.store.load(conn, execution_id_for(_key(message))) is None
    env.sim.set_faults(disconnect_rate=0.0)
    confirmation: dict[str, Any] | None = None
    for _ in range(100):  # the pool reconnects the session in the background
        outcome = env.deliver(message, redelivered=True)
        if isinstance(outcome, Publish):
            confirmation = json.loads(outcome.payload)
            break
        time.sleep(0.05)
    assert confirmation is not None and confirmation["status"] == "FILLED"
    assert len(env.deals()) == 1


def test_readiness_reports_each_trading_permission_level(env: PipelineEnv) -> None:
    from worker.service import Service

    service = Service(env.settings, env.store, env.pool, env.pipeline)
    env.confirm(approval())
    ready = service.readiness()
    assert ready["database"] and ready["sessions"]
    assert ready["trading_terminal_trade_allowed"] and ready["trading_account_trade_expert"]
    env.sim.set_trading(terminal=False)  # the terminal's Algo Trading button
    assert env.confirm(approval())["rejection_reason"] == "TRADING_DISABLED"
    ready = service.readiness()
    assert ready["trading_terminal_trade_allowed"] is False
    assert ready["trading_account_trade_allowed"] is True
