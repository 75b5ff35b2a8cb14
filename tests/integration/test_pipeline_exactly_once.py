"""The exactly-once protocol under the interleavings of issue 18 (items 1, 3, 7, and the
pipeline-level half of item 15's single-test guarantees).

- item 1: the slippage close's stage is committed before the close is sent; a redelivery
  counts our closing deals already done, so the close is never sent twice and the
  confirmation lists every deal (netting with a desk position, hedging; lost reply, failed
  final commit);
- item 3: an unknown outcome is answered provisionally (row UNKNOWN), never settled on a
  guess; the background recheck publishes a corrected version when a fill appears, or a
  final one when its window ends;
- item 7: a stale approval is refused without a session; on the last deliveries before the
  queue's limit an approval is answered (REJECTED row + confirmation) or dead-lettered with a
  reason, never requeued into a silent dead letter;
- item 15: two first deliveries of one key racing on two sessions send one order.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from schemas.identity import execution_id_for
from tests.integration.pipeline_env import PipelineEnv, approval, pipeline_env
from tests.simbooks import broker_positions
from worker.execution.outcome import DeadLetter, Publish, Requeue
from worker.mt5 import api
from worker.mt5.gateway import OrderIdentity, Side
from worker.mt5.sim.terminal import SimAccount, SimConfig

RICH = SimConfig(account=SimAccount(balance=10_000_000.0))
NETTING = SimConfig(
    account=SimAccount(balance=10_000_000.0, margin_mode=api.ACCOUNT_MARGIN_MODE_RETAIL_NETTING)
)
DESK_MAGIC = 777


def _key(message: dict[str, Any]) -> str:
    key: str = message["decision"]["order_id"]
    return key


def _execution_id(message: dict[str, Any]) -> str:
    return str(execution_id_for(_key(message)))


def _ours(env: PipelineEnv, message: dict[str, Any]) -> list[api.TradeDeal]:
    return env.deals(execution_id_for(_key(message)))  # by magic: comments are cut


def _payload(outcome: Any) -> dict[str, Any]:
    assert isinstance(outcome, Publish), outcome
    document: dict[str, Any] = json.loads(outcome.payload)
    return document


def _desk_position(env: PipelineEnv, lots: float) -> None:
    """The desk's own position on the account (another magic, another comment)."""
    tick = env.sim.symbol_info_tick("EURUSD")
    assert tick is not None
    result = env.sim.order_send(
        {
            "action": api.TRADE_ACTION_DEAL,
            "symbol": "EURUSD",
            "volume": lots,
            "type": api.ORDER_TYPE_BUY,
            "price": tick.ask,
            "deviation": 50,
            "magic": DESK_MAGIC,
            "comment": "desk",
            "type_filling": api.ORDER_FILLING_IOC,
        }
    )
    assert result is not None and result.retcode == api.TRADE_RETCODE_DONE, result


# --- item 1: the slippage close is never sent twice ---------------------------------------


@pytest.fixture
def netting(new_database: Callable[[], str]) -> Iterator[PipelineEnv]:
    with pipeline_env(new_database(), NETTING, slippage_policy="close") as built:
        yield built


@pytest.fixture
def hedging(new_database: Callable[[], str]) -> Iterator[PipelineEnv]:
    with pipeline_env(new_database(), RICH, slippage_policy="close") as built:
        yield built


def _breach_then_lose_the_close_reply(env: PipelineEnv, message: dict[str, Any]) -> None:
    env.sim.set_faults(slippage_points=((50, 1.0),), scripted=("ok", "lost_reply"))
    outcome = env.deliver(message)
    assert isinstance(outcome, Requeue), outcome  # the close's outcome is unknown
    row = env.row(_execution_id(message))
    assert row["state"] in ("SUBMITTING", "SUBMITTED")
    assert row["closing_sent_at"] is not None  # committed before the close went out
    env.sim.set_faults(slippage_points=((0, 1.0),), scripted=())


def test_netting_close_reply_lost_is_not_closed_again(netting: PipelineEnv) -> None:
    env = netting
    _desk_position(env, 1.0)
    message = approval("EURUSD", 1, 100_000.0)
    _breach_then_lose_the_close_reply(env, message)

    confirmation = _payload(env.settled(message))  # the close's deals may lag

    deals = _ours(env, message)
    assert [(d.type, d.volume) for d in deals] == [
        (api.DEAL_TYPE_BUY, 1.0),
        (api.DEAL_TYPE_SELL, 1.0),
    ]  # BUY 1, SELL 1: no second close
    assert confirmation["status"] == "CANCELLED"
    assert sorted(confirmation["broker_deals"]) == sorted(d.ticket for d in deals)
    (position,) = broker_positions(env.sim, "EURUSD")
    assert position.volume == pytest.approx(1.0)  # the desk's own position is untouched


def test_hedging_close_reply_lost_is_reported_closed(hedging: PipelineEnv) -> None:
    env = hedging
    message = approval("EURUSD", 1, 100_000.0)
    _breach_then_lose_the_close_reply(env, message)

    confirmation = _payload(env.settled(message))  # the close's deals may lag

    deals = _ours(env, message)
    assert [d.type for d in deals] == [api.DEAL_TYPE_BUY, api.DEAL_TYPE_SELL]
    assert confirmation["status"] == "CANCELLED"
    assert "FAILED" not in (confirmation["rejection_details"] or "")
    assert sorted(confirmation["broker_deals"]) == sorted(d.ticket for d in deals)
    assert broker_positions(env.sim) == []


def _fail_the_first_final_commit(env: PipelineEnv, state: str = "CANCELLED") -> None:
    """A real commit failure: a trigger refuses the first final row of ``state`` (a
    sequence counts across the rolled-back transaction)."""
    with env.store.connection() as conn:
        conn.execute("CREATE SEQUENCE IF NOT EXISTS public.fail_once")
        conn.execute(
            "CREATE OR REPLACE FUNCTION public.fail_once() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN IF NEW.state = '{state}' AND nextval('public.fail_once') = 1 THEN"
            " RAISE EXCEPTION 'injected commit failure'; END IF; RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER fail_once BEFORE UPDATE ON execution.executions"
            " FOR EACH ROW EXECUTE FUNCTION public.fail_once()"
        )


@pytest.mark.parametrize("account", ["netting", "hedging"])
def test_a_failed_final_commit_after_the_close_is_not_closed_again(
    new_database: Callable[[], str], account: str
) -> None:
    config = NETTING if account == "netting" else RICH
    with pipeline_env(new_database(), config, slippage_policy="close") as env:
        if account == "netting":
            _desk_position(env, 1.0)
        _fail_the_first_final_commit(env)
        message = approval("EURUSD", 1, 100_000.0)
        env.sim.set_faults(slippage_points=((50, 1.0),))
        assert isinstance(env.deliver(message), Requeue)  # closed, then the commit failed
        env.sim.set_faults(slippage_points=((0, 1.0),))

        confirmation = _payload(env.deliver(message, redelivered=True))

        deals = _ours(env, message)
        assert [d.type for d in deals] == [api.DEAL_TYPE_BUY, api.DEAL_TYPE_SELL]
        assert confirmation["status"] == "CANCELLED"
        assert sorted(confirmation["broker_deals"]) == sorted(d.ticket for d in deals)
        desk = 1.0 if account == "netting" else 0.0
        assert sum(p.volume for p in broker_positions(env.sim)) == pytest.approx(desk)


# --- item 3: an unknown outcome is never final on a guess ---------------------------------


@pytest.fixture
def unknown(new_database: Callable[[], str]) -> Iterator[PipelineEnv]:
    with pipeline_env(
        new_database(),
        RICH,
        max_send_attempts=1,
        unknown_reconcile_first_seconds=0.001,
        unknown_reconcile_max_seconds=0.001,
    ) as built:
        yield built


def _provisional(env: PipelineEnv, message: dict[str, Any]) -> dict[str, Any]:
    env.sim.set_faults(scripted=("timeout",))  # 10012, nothing executed (yet)
    confirmation = _payload(env.deliver(message))
    assert (confirmation["status"], confirmation["rejection_reason"]) == (
        "FAILED",
        "UNKNOWN_OUTCOME",
    )
    assert confirmation["provisional"] is True and confirmation["version"] == 1
    assert env.row(_execution_id(message))["state"] == "UNKNOWN"
    return confirmation


def _due(env: PipelineEnv) -> list[Any]:
    with env.store.connection() as conn:
        conn.execute("UPDATE execution.executions SET next_reconcile_at = now()")
        return env.store.unknown_due(conn)


def _late_execution(env: PipelineEnv, message: dict[str, Any]) -> None:
    """The broker executes the timed-out order minutes later: a deal of our order (same
    magic and comment token) appears on the account."""
    row = env.row(_execution_id(message))
    with env.pool.claim(5.0) as lease:
        gateway = lease.session.gateway
        spec = gateway.symbol_spec("EURUSD")
        identity = OrderIdentity(row["magic"], row["comment_token"])
        reply = gateway.send(spec, Side.BUY, 1.0, identity=identity, deviation=50)
        assert reply.status == "done", reply
    time.sleep(1.0)  # "minutes later": past the hardened server's deal lag (< 1 s)


def test_an_unknown_outcome_is_provisional_and_redeliveries_answer_it(
    unknown: PipelineEnv,
) -> None:
    env = unknown
    message = approval("EURUSD", 1, 100_000.0)
    first = _provisional(env, message)
    again = _payload(env.deliver(message, redelivered=True))
    assert again == first  # the recorded answer: no resend, no guess
    assert _ours(env, message) == []


def test_a_late_execution_is_published_as_a_corrected_confirmation(unknown: PipelineEnv) -> None:
    env = unknown
    message = approval("EURUSD", 1, 100_000.0)
    _provisional(env, message)
    (row,) = _due(env)
    assert isinstance(env.pipeline.recheck(row), Requeue)  # still nothing: backs off
    assert env.row(_execution_id(message))["reconcile_attempts"] == 1

    _late_execution(env, message)
    before = REGISTRY.get_sample_value(
        "execution_worker_confirmation_corrections_total", {"status": "filled"}
    )
    (row,) = _due(env)
    corrected = env.pipeline.recheck(row)

    document = _payload(corrected)
    assert isinstance(corrected, Publish) and corrected.version == 2
    (deal,) = _ours(env, message)
    assert document["execution_id"] == _execution_id(message)
    assert (document["version"], document["provisional"]) == (2, False)
    assert document["status"] == "FILLED" and document["rejection_reason"] is None
    assert document["broker_deals"] == [deal.ticket]
    assert document["executed_lots"] == pytest.approx(deal.volume)
    assert document["fill_price"] == pytest.approx(deal.price)
    assert "provisional" in document["correction"]
    after = REGISTRY.get_sample_value(
        "execution_worker_confirmation_corrections_total", {"status": "filled"}
    )
    assert (after or 0) - (before or 0) == 1
    # the record answers the corrected version from now on, and both versions are kept
    assert _payload(env.deliver(message, redelivered=True)) == document
    with env.store.connection() as conn:
        versions = conn.execute(
            "SELECT version, published_at IS NULL FROM execution.outbox"
            " WHERE execution_id = %s ORDER BY version",
            (uuid.UUID(_execution_id(message)),),
        ).fetchall()
    assert [v for v, _ in versions] == [1, 2]
    assert env.row(_execution_id(message))["state"] == "FILLED"
    assert _due(env) == []


def test_an_unknown_outcome_becomes_final_when_its_window_ends(
    new_database: Callable[[], str],
) -> None:
    with pipeline_env(
        new_database(), RICH, max_send_attempts=1, unknown_reconcile_hours=1e-9
    ) as env:
        message = approval("EURUSD", 1, 100_000.0)
        _provisional(env, message)
        (row,) = _due(env)
        document = _payload(env.pipeline.recheck(row))
        assert (document["version"], document["provisional"]) == (2, False)
        assert (document["status"], document["rejection_reason"]) == ("FAILED", "UNKNOWN_OUTCOME")
        assert document["correction"].startswith("final")
        assert env.row(_execution_id(message))["state"] == "FAILED"


# --- item 7: every approval is answered, even during outages ------------------------------


@pytest.fixture
def outage(new_database: Callable[[], str]) -> Iterator[PipelineEnv]:
    with pipeline_env(
        new_database(), RICH, claim_timeout_seconds=0.2, delivery_limit=5, delivery_last_chances=2
    ) as built:
        yield built


def _stale(message: dict[str, Any]) -> dict[str, Any]:
    old = (datetime.now(UTC) - timedelta(seconds=31)).replace(tzinfo=None).isoformat()
    message["decision"]["approved_trade"]["timestamp"] = old
    return message


def test_a_stale_approval_is_refused_without_a_session(outage: PipelineEnv) -> None:
    env = outage
    message = _stale(approval("EURUSD", 1, 100_000.0))
    with env.pool.claim(5.0):  # the only session is busy (an outage, as the handler sees it)
        confirmation = _payload(env.deliver(message))
    assert confirmation["rejection_reason"] == "STALE_APPROVAL"
    assert _ours(env, message) == []


def test_an_early_delivery_without_a_session_is_requeued(outage: PipelineEnv) -> None:
    env = outage
    message = approval("EURUSD", 1, 100_000.0)
    with env.pool.claim(5.0):
        assert isinstance(env.deliver(message, delivery_count=3), Requeue)


def test_a_forged_delivery_count_on_a_first_delivery_is_not_believed(
    outage: PipelineEnv,
) -> None:
    env = outage
    message = approval("EURUSD", 1, 100_000.0)
    with env.pool.claim(5.0):
        outcome = env.deliver(message, delivery_count=99, redelivered=False)
    assert isinstance(outcome, Requeue)


def test_the_last_deliveries_without_a_session_are_answered(outage: PipelineEnv) -> None:
    env = outage
    message = approval("EURUSD", 1, 100_000.0)
    with env.pool.claim(5.0):
        confirmation = _payload(env.deliver(message, delivery_count=4))
    assert (confirmation["status"], confirmation["rejection_reason"]) == (
        "REJECTED",
        "SESSION_UNAVAILABLE",
    )
    assert "no MT5 session" in confirmation["rejection_details"]
    assert env.row(_execution_id(message))["state"] == "REJECTED"
    # a later copy gets the same answer, and never an order
    assert _payload(env.deliver(message, redelivered=True)) == confirmation
    assert _ours(env, message) == []


def test_the_last_delivery_with_no_database_is_dead_lettered_with_a_reason(
    outage: PipelineEnv,
) -> None:
    env = outage
    message = approval("EURUSD", 1, 100_000.0)
    env.store.pool.close()
    outcome = env.deliver(message, delivery_count=4)
    assert isinstance(outcome, DeadLetter) and outcome.reason == "DATABASE_UNAVAILABLE"


def test_the_last_delivery_of_an_execution_in_flight_is_dead_lettered_as_in_flight(
    outage: PipelineEnv,
) -> None:
    env = outage
    message = approval("EURUSD", 1, 100_000.0)
    _fail_the_first_final_commit(env, "FILLED")  # filled, then the final commit failed
    assert isinstance(env.deliver(message), Requeue)
    assert env.row(_execution_id(message))["state"] in ("SUBMITTING", "SUBMITTED")
    with env.pool.claim(5.0):
        outcome = env.deliver(message, delivery_count=4)
    assert isinstance(outcome, DeadLetter) and outcome.reason == "IN_FLIGHT"


# --- item 15: the intent's ON CONFLICT at the pipeline level ------------------------------


def test_two_first_deliveries_of_one_key_on_two_sessions_send_one_order(
    new_database: Callable[[], str],
) -> None:
    with pipeline_env(new_database(), RICH, sessions=2) as env:
        message = approval("EURUSD", 1, 100_000.0)
        both = threading.Barrier(2, timeout=10)
        commit_intent = env.pipeline.sender.commit_intent

        def together(*args: Any, **kwargs: Any) -> bool:
            both.wait()  # both handlings validated: they race on the intent insert
            return commit_intent(*args, **kwargs)

        env.pipeline.sender.commit_intent = together  # type: ignore[method-assign]
        outcomes: list[Any] = []

        def deliver() -> None:
            outcomes.append(env.deliver(message))

        threads = [threading.Thread(target=deliver) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(outcomes) == 2
        assert len(_ours(env, message)) == 1  # one order
        first, second = (_payload(outcome) for outcome in outcomes)
        assert first == second and first["status"] == "FILLED"
