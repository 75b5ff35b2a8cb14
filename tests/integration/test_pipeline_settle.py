"""Settling after an unknown outcome keeps what this handling already knows (issue 18,
item 5): a later leg's unknown outcome never forgets earlier legs' fills, and a resend
never sends a leg that already filled."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.pipeline_env import PipelineEnv, approval, pipeline_env
from worker.mt5.sim.terminal import SimAccount, SimConfig

RICH = SimConfig(account=SimAccount(balance=10_000_000.0))
KEPT_COMMENT = 16  # what some servers keep of an order's comment (MQL5 reference example)


@pytest.fixture
def env(new_database: Callable[[], str]) -> Iterator[PipelineEnv]:
    with pipeline_env(new_database(), RICH) as built:
        built.sim.update_symbol("EURUSD", volume_max=0.5)  # 1 lot = two legs of 0.5
        yield built


def cut_comments(env: PipelineEnv) -> None:
    """The simulated server keeps only 16 characters of comments on what it reports, so
    finding our orders by comment token (reconcile) sees nothing of them."""
    for name in ("orders_get", "positions_get", "history_orders_get", "history_deals_get"):
        read = getattr(env.sim, name)

        def cut(*args: Any, _read: Any = read, **kwargs: Any) -> Any:
            items = _read(*args, **kwargs)
            if items is None:
                return None
            return tuple(item._replace(comment=item.comment[:KEPT_COMMENT]) for item in items)

        setattr(env.sim, name, cut)


def test_an_unknown_later_leg_does_not_resend_the_filled_first_leg(env: PipelineEnv) -> None:
    cut_comments(env)
    # leg 1 fills; leg 2 gets no result and was not executed
    env.sim.set_faults(scripted=("ok", "no_result"))
    confirmation = env.confirm(approval("EURUSD", 1, 100_000.0))
    deals = env.deals()
    assert sum(deal.volume for deal in deals) == pytest.approx(1.0)  # not 1.5
    assert len(deals) == 2
    assert confirmation["status"] == "FILLED"
    assert confirmation["executed_lots"] == pytest.approx(1.0)
    assert sorted(confirmation["broker_deals"]) == sorted(deal.ticket for deal in deals)


def test_a_give_up_after_an_unknown_later_leg_reports_the_known_fill(
    new_database: Callable[[], str],
) -> None:
    with pipeline_env(new_database(), RICH, max_send_attempts=1) as env:
        env.sim.update_symbol("EURUSD", volume_max=0.5)
        cut_comments(env)
        env.sim.set_faults(scripted=("ok", "no_result"))
        confirmation = env.confirm(approval("EURUSD", 1, 100_000.0))
        (deal,) = env.deals()
        assert confirmation["executed_lots"] == pytest.approx(0.5)
        assert confirmation["broker_deals"] == [deal.ticket]
        assert confirmation["status"] == "PARTIALLY_FILLED"
        assert confirmation["rejection_reason"] == "INSUFFICIENT_FILL"
