"""Settling from the broker's truth.

- What this handling already knows is kept (issue 18, item 5): a later leg's unknown
  outcome never forgets earlier legs' fills; nothing is ever sent again after an unknown
  outcome (issue 26), and the answer stays provisional while a leg is unaccounted for.
- Fills come from the reply that names its deal, else from the order's deals (issue 17,
  item 3; issue 26): a done reply without its deal is settled by the settler once they
  show, off the session, and an order whose deals do not show is answered provisionally.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from schemas.identity import execution_id_for
from schemas.request import MessageProperties
from tests.integration.pipeline_env import PipelineEnv, approval, pipeline_env
from worker.execution.outcome import Delivery, Publish
from worker.execution.pipeline import Pipeline
from worker.mt5 import api
from worker.mt5.sim.terminal import FaultConfig, SimAccount, SimConfig

RICH = SimConfig(account=SimAccount(balance=10_000_000.0))


@pytest.fixture
def env(new_database: Callable[[], str]) -> Iterator[PipelineEnv]:
    with pipeline_env(new_database(), RICH) as built:
        built.sim.update_symbol("EURUSD", volume_max=0.5)  # 1 lot = two legs of 0.5
        yield built


class ListsLagOnFirstFill:
    """The server's lists lag behind its replies: once the first order has filled, the list
    queries (open orders and positions by symbol, history by date range) do not show that
    order, its deals or its position; queries by ticket do. So reconcile finds nothing of
    the first leg, whatever the identification rule."""

    def __init__(self, env: PipelineEnv) -> None:
        self.sim = env.sim
        self.hidden: set[int] = set()
        send = env.sim.order_send

        def order_send(request: dict[str, Any]) -> Any:
            result = send(request)
            if result is not None and result.retcode == 10009 and not self.hidden:
                self.hidden.add(result.order)
            return result

        env.sim.order_send = order_send  # type: ignore[method-assign]
        for name in ("orders_get", "positions_get", "history_orders_get", "history_deals_get"):
            setattr(env.sim, name, self._lagging(getattr(env.sim, name)))

    def _lagging(self, read: Callable[..., Any]) -> Callable[..., Any]:
        def lagging(*args: Any, **kwargs: Any) -> Any:
            items = read(*args, **kwargs)
            if items is None or "ticket" in kwargs:
                return items
            return tuple(item for item in items if not self._of_hidden(item))

        return lagging

    def _of_hidden(self, item: Any) -> bool:
        if isinstance(item, api.TradeDeal):
            return item.order in self.hidden
        if isinstance(item, api.TradePosition):
            return item.identifier in self.hidden
        return bool(item.ticket in self.hidden)


def test_an_unknown_later_leg_is_never_sent_again_and_stays_provisional(
    env: PipelineEnv,
) -> None:
    """Issue 26 (a): leg 2's outcome is unknown (no result; it was not executed, but
    nothing proves it): no second order for it, whatever MAX_SEND_ATTEMPTS says, and the
    answer from leg 1 alone is provisional, never final."""
    assert env.settings.max_send_attempts > 1
    lag = ListsLagOnFirstFill(env)
    env.sim.set_faults(scripted=("ok", "no_result"))
    message = approval("EURUSD", 1, 100_000.0)
    confirmation = env.confirm(message)
    lag.hidden.clear()
    (deal,) = env.deals()  # leg 1 only: leg 2 was not sent again
    assert deal.volume == pytest.approx(0.5)
    assert confirmation["provisional"] is True
    assert confirmation["status"] == "PARTIALLY_FILLED"
    assert confirmation["executed_lots"] == pytest.approx(0.5)
    assert confirmation["broker_deals"] == [deal.ticket]
    execution_id = str(execution_id_for(message["decision"]["order_id"]))
    assert env.row(execution_id)["state"] == "UNKNOWN"
    sends = [e for e in env.events(execution_id) if e["function"] == "order_send"]
    assert len(sends) == 2


def test_a_give_up_after_an_unknown_later_leg_reports_the_known_fill(
    new_database: Callable[[], str],
) -> None:
    with pipeline_env(new_database(), RICH, max_send_attempts=1) as env:
        env.sim.update_symbol("EURUSD", volume_max=0.5)
        lag = ListsLagOnFirstFill(env)
        env.sim.set_faults(scripted=("ok", "no_result"))
        confirmation = env.confirm(approval("EURUSD", 1, 100_000.0))
        lag.hidden.clear()
        (deal,) = env.deals()
        assert confirmation["executed_lots"] == pytest.approx(0.5)
        assert confirmation["broker_deals"] == [deal.ticket]
        assert confirmation["status"] == "PARTIALLY_FILLED"
        assert confirmation["rejection_reason"] == "INSUFFICIENT_FILL"
        assert confirmation["provisional"] is True


# --- fills come from deals (issue 17, item 3) ------------------------------------------


class LaggingDeals:
    """The simulated server records deals after its reply: ``history_deals_get`` answers
    nothing for the first ``hidden`` calls, or until ``release()`` when ``hidden`` is None."""

    def __init__(self, env: PipelineEnv, hidden: int | None) -> None:
        self.hidden = hidden
        self.calls = 0
        self.released = False
        self._read = env.sim.history_deals_get
        env.sim.history_deals_get = self._lagging  # type: ignore[method-assign]

    def release(self) -> None:
        self.released = True

    def truth(self) -> list[Any]:
        """Every deal on the server, lag or not."""
        return list(self._read(0, 2**31 - 1) or ())

    def _lagging(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        lagging = not self.released and (self.hidden is None or self.calls <= self.hidden)
        return () if lagging else self._read(*args, **kwargs)


def reply_without_fill(env: PipelineEnv) -> None:
    """A 10009 reply with ``deal`` 0 and no price, as the order_send reference allows."""
    send = env.sim.order_send

    def order_send(request: dict[str, Any]) -> Any:
        result = send(request)
        if result is not None and result.retcode == 10009:
            return result._replace(deal=0, price=0.0)
        return result

    env.sim.order_send = order_send  # type: ignore[method-assign]


def test_a_done_reply_is_confirmed_from_the_orders_deals(env: PipelineEnv) -> None:
    reply_without_fill(env)
    lag = LaggingDeals(env, hidden=3)
    confirmation = env.confirm(approval("EURUSD", 1, 50_000.0))
    (deal,) = lag.truth()
    assert confirmation["status"] == "FILLED"
    assert confirmation["executed_lots"] == pytest.approx(deal.volume)
    assert confirmation["fill_price"] == pytest.approx(deal.price)
    assert confirmation["broker_deals"] == [deal.ticket]
    assert confirmation["broker_order"] == deal.order
    assert lag.calls > 3  # the deals were asked for until they showed


def test_a_done_order_whose_deals_never_show_is_answered_provisionally(
    env: PipelineEnv,
) -> None:
    reply_without_fill(env)
    lag = LaggingDeals(env, hidden=None)
    message = approval("EURUSD", 1, 50_000.0)
    document = env.confirm(message)
    assert len(lag.truth()) == 1
    # never settled REJECTED with 0 lots: provisional, after the order timeout
    assert (document["status"], document["provisional"]) == ("FAILED", True)
    assert "not its deals" in document["rejection_details"]
    execution_id = str(execution_id_for(message["decision"]["order_id"]))
    assert env.row(execution_id)["state"] == "UNKNOWN"
    lag.release()
    with env.store.connection() as conn:
        conn.execute("UPDATE execution.executions SET next_reconcile_at = now()")
        (row,) = env.store.unknown_due(conn)
    corrected = env.pipeline.recheck(row)
    assert isinstance(corrected, Publish) and corrected.version == 2
    confirmation = json.loads(corrected.payload)
    (deal,) = env.deals()  # the recheck reconciled, no second order
    assert (confirmation["status"], confirmation["provisional"]) == ("FILLED", False)
    assert confirmation["broker_deals"] == [deal.ticket]
    assert confirmation["fill_price"] == pytest.approx(deal.price)


def test_a_placed_order_filled_before_its_deal_shows_is_not_rejected(env: PipelineEnv) -> None:
    env.sim.update_symbol("US500", exchange_fill_delay_seconds=0.05)
    lag = LaggingDeals(env, hidden=3)
    confirmation = env.confirm(approval("US500", 1, 5.0))
    (deal,) = lag.truth()
    assert confirmation["status"] == "FILLED" and confirmation["executed_lots"] == 5.0
    assert confirmation["broker_deals"] == [deal.ticket]


class Crash(BaseException):
    """A worker dying at a given point (not caught by the pipeline's error handling)."""


def _crash(*args: Any, **kwargs: Any) -> Any:
    raise Crash


def _delivery(message: dict[str, Any]) -> Delivery:
    return Delivery(
        body=json.dumps(message).encode(),
        properties=MessageProperties(),
        redelivered=False,
        delivery_count=None,
        received_at=datetime.now(UTC),
    )


def test_a_redelivery_asks_for_the_deals_the_history_window_misses(
    env: PipelineEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = approval("EURUSD", 1, 100_000.0)  # two legs of 0.5
    env.sim.set_faults(deal_zero_rate=0.0)  # both replies name their deals: no settler yet
    crashing = Pipeline(env.settings, env.store, env.pool)
    monkeypatch.setattr(crashing, "conclude", _crash)  # both legs filled, then the crash
    with pytest.raises(Crash):
        crashing.handle(_delivery(message))
    monkeypatch.undo()
    first, second = sorted(env.deals(), key=lambda deal: deal.order)

    window = env.sim.history_deals_get

    def window_lags_on_leg_1(*args: Any, **kwargs: Any) -> Any:
        deals = window(*args, **kwargs)
        if args and deals is not None:  # the date-range query of reconcile, not by ticket
            return tuple(deal for deal in deals if deal.order != first.order)
        return deals

    env.sim.history_deals_get = window_lags_on_leg_1  # type: ignore[method-assign]
    confirmation = env.confirm(message, redelivered=True)
    assert confirmation["status"] == "FILLED"
    assert confirmation["executed_lots"] == pytest.approx(1.0)
    assert sorted(confirmation["broker_deals"]) == [first.ticket, second.ticket]


# --- the same against the simulator's own lagging-deals hardening ------------------------


LAGGING = SimConfig(
    account=SimAccount(balance=10_000_000.0),
    faults=FaultConfig(deal_lag_ms=300.0, deal_zero_rate=1.0),
)


@pytest.mark.parametrize(("symbol", "units"), [("EURUSD", 100_000.0), ("US500", 5.0)])
def test_fills_match_the_deals_of_a_server_whose_deals_lag(
    new_database: Callable[[], str], symbol: str, units: float
) -> None:
    with pipeline_env(new_database(), LAGGING) as env:
        env.sim.update_symbol("US500", exchange_fill_delay_seconds=0.05)
        confirmation = env.confirm(approval(symbol, 1, units))
        deals = env.deals()
        for _ in range(100):  # the server's own view, once its lag has passed
            if deals:
                break
            time.sleep(0.05)
            deals = env.deals()
        assert deals  # the order did execute
        volume = sum(deal.volume for deal in deals)
        assert confirmation["status"] == "FILLED"
        assert confirmation["executed_lots"] == pytest.approx(volume)
        assert confirmation["fill_price"] == pytest.approx(
            sum(deal.volume * deal.price for deal in deals) / volume
        )
        assert sorted(confirmation["broker_deals"]) == sorted(deal.ticket for deal in deals)


def test_a_lost_reply_whose_deal_lags_is_settled_once_the_deal_shows(
    new_database: Callable[[], str],
) -> None:
    with pipeline_env(new_database(), LAGGING) as env:
        # executed, reply lost: reconcile finds the order at once, its deal 300 ms later
        env.sim.set_faults(scripted=("lost_reply",))
        confirmation = env.confirm(approval("EURUSD", 1, 100_000.0))
        (deal,) = env.deals()
        assert confirmation["status"] == "FILLED"
        assert confirmation["broker_deals"] == [deal.ticket]
        assert confirmation["fill_price"] == pytest.approx(deal.price)


def test_a_failed_deals_query_is_asked_again_not_taken_as_no_deal(env: PipelineEnv) -> None:
    """The settler's window of deals answers None once (the connection stays up): it is
    asked again, never read as "no deal"."""
    reply_without_fill(env)
    read = env.sim.history_deals_get
    failures = [None]

    def history_deals_get(*args: Any, **kwargs: Any) -> Any:
        if args and failures:  # the date-range query of the settler's window
            return failures.pop()
        return read(*args, **kwargs)

    env.sim.history_deals_get = history_deals_get  # type: ignore[method-assign]
    confirmation = env.confirm(approval("EURUSD", 1, 50_000.0))
    (deal,) = env.deals()
    assert not failures  # the failing answer was met
    assert confirmation["status"] == "FILLED" and confirmation["provisional"] is False
    assert confirmation["broker_deals"] == [deal.ticket]


def test_a_failed_query_while_waiting_for_a_lagging_deal_is_asked_again(
    new_database: Callable[[], str],
) -> None:
    with pipeline_env(new_database(), LAGGING) as env:
        read = env.sim.history_orders_get
        calls: list[int] = []

        def history_orders_get(*args: Any, **kwargs: Any) -> Any:
            if args:  # the date-range query of reconcile
                calls.append(1)
                if len(calls) == 2:  # the first reconcile again, while the deal lags
                    return None
            return read(*args, **kwargs)

        env.sim.history_orders_get = history_orders_get  # type: ignore[method-assign]
        env.sim.set_faults(scripted=("lost_reply",))
        confirmation = env.confirm(approval("EURUSD", 1, 100_000.0))
        (deal,) = env.deals()
        assert len(calls) > 2
        assert confirmation["status"] == "FILLED"
        assert confirmation["broker_deals"] == [deal.ticket]
