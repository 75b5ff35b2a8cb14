"""Issue 26: settlement that never doubles and never holds a terminal.

- A 10009 reply that names its deal is the fill: settled with no history query; the settler
  checks its deals later, and a contradiction publishes a corrected version.
- An execution whose deals lag leaves its session at once (Settling), and the settler
  finishes it from the account's history.
- An unknown outcome is never followed by a second order, whatever MAX_SEND_ATTEMPTS says:
  the answer is provisional, and the order that executes later is reported by a correction
  (also when a resend would have been refused for good, and when it is a split plan's later
  leg: never a final answer while a leg is unaccounted for).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import REGISTRY

from schemas.identity import execution_id_for
from schemas.request import MessageProperties
from tests.integration.pipeline_env import PipelineEnv, approval, pipeline_env
from tests.simbooks import broker_deals
from worker.execution import settler as settler_module
from worker.execution.outcome import Delivery, Publish, Requeue, Settling
from worker.execution.settler import Settler
from worker.mt5.sim.terminal import FaultConfig, SimAccount, SimConfig

RICH = SimConfig(account=SimAccount(balance=10_000_000.0))


@pytest.fixture
def env(new_database: Callable[[], str]) -> Iterator[PipelineEnv]:
    with pipeline_env(
        new_database(),
        RICH,
        unknown_reconcile_first_seconds=0.001,
        unknown_reconcile_max_seconds=0.001,
    ) as built:
        yield built


def _id(message: dict[str, Any]) -> str:
    return str(execution_id_for(message["decision"]["order_id"]))


def _doc(outcome: Any) -> dict[str, Any]:
    assert isinstance(outcome, Publish), outcome
    document: dict[str, Any] = json.loads(outcome.payload)
    return document


def _sends(env: PipelineEnv, message: dict[str, Any]) -> int:
    return sum(1 for e in env.events(_id(message)) if e["function"] == "order_send")


def _checks(result: str) -> float:
    value = REGISTRY.get_sample_value("execution_worker_deal_checks_total", {"result": result})
    return value or 0.0


def _recheck(env: PipelineEnv) -> list[Any]:
    with env.store.connection() as conn:
        conn.execute("UPDATE execution.executions SET next_reconcile_at = now()")
        rows = env.store.unknown_due(conn)
    return [env.pipeline.recheck(row) for row in rows]


def _corrected(env: PipelineEnv, seconds: float = 5.0) -> Publish:
    """Recheck until a corrected version is published (the late order, then its deal,
    which lags the fill on the hardened server)."""
    deadline = time.monotonic() + seconds
    while True:
        published = [o for o in _recheck(env) if isinstance(o, Publish)]
        if published:
            (one,) = published
            return one
        assert time.monotonic() < deadline, "no correction"
        time.sleep(0.1)


def _deal_check(env: PipelineEnv, execution_id: str) -> dict[str, Any] | None:
    with env.store.connection() as conn:
        return env.store.deal_check(conn, uuid.UUID(execution_id))


def _rounds_until_checked(env: PipelineEnv, execution_id: str, seconds: float = 10.0) -> None:
    """Run the settler's rounds until the execution has no deal check left."""
    deadline = time.monotonic() + seconds
    while _deal_check(env, execution_id) is not None:
        assert time.monotonic() < deadline, _deal_check(env, execution_id)
        time.sleep(min(env.pipeline.settler.round(), 0.1))


def test_a_reply_naming_its_deal_is_settled_without_reading_history(env: PipelineEnv) -> None:
    env.sim.set_faults(deal_zero_rate=0.0)
    read = env.sim.history_deals_get
    asked: list[int] = []

    def history_deals_get(*args: Any, **kwargs: Any) -> Any:
        asked.append(1)
        return read(*args, **kwargs)

    env.sim.history_deals_get = history_deals_get  # type: ignore[method-assign]
    message = approval("EURUSD", 1, 100_000.0)
    document = _doc(env.pipeline.handle(_delivery(message)))
    assert asked == []  # settled from the reply alone
    (deal,) = broker_deals(env.sim)
    assert document["status"] == "FILLED" and document["broker_deals"] == [deal.ticket]
    assert document["fill_price"] == pytest.approx(deal.price)
    check = _deal_check(env, _id(message))
    assert check is not None and check["verify"] is True  # its deals are checked later
    assert env.row(_id(message))["settling"] is None  # the final row is not written again

    agreed = _checks("agreed")
    _rounds_until_checked(env, _id(message))
    assert asked  # the settler read the account's deals ...
    assert _checks("agreed") == agreed + 1  # ... and they agreed: nothing published
    assert env.row(_id(message))["confirmation_version"] == 1


def test_fills_settled_from_replies_over_a_second_are_checked_in_one_or_two_windows(
    env: PipelineEnv,
) -> None:
    """Checks fall due on a grid: the fills of a second share a window (each window reads the
    account's history around them), instead of one window per round."""
    env.sim.set_faults(deal_zero_rate=0.0)
    read = env.sim.history_deals_get
    windows: list[int] = []

    def history_deals_get(*args: Any, **kwargs: Any) -> Any:
        windows.append(1)
        return read(*args, **kwargs)

    env.sim.history_deals_get = history_deals_get  # type: ignore[method-assign]
    messages = [approval("EURUSD", 1, 100_000.0) for _ in range(4)]
    for message in messages:  # handed over 0.3 s apart: four rounds' worth of batches
        assert _doc(env.pipeline.handle(_delivery(message)))["status"] == "FILLED"
        time.sleep(0.3)
    for message in messages:
        _rounds_until_checked(env, _id(message))
    assert 1 <= len(windows) <= 2, len(windows)


def test_a_reply_its_deals_contradict_is_corrected(env: PipelineEnv) -> None:
    env.sim.set_faults(deal_zero_rate=0.0)
    send = env.sim.order_send

    def order_send(request: dict[str, Any]) -> Any:
        result = send(request)  # the server's reply says another price than its deal
        return result._replace(price=result.price + 0.0010) if result is not None else None

    env.sim.order_send = order_send  # type: ignore[method-assign]
    message = approval("EURUSD", 1, 100_000.0)
    first = _doc(env.pipeline.handle(_delivery(message)))
    (deal,) = broker_deals(env.sim)
    assert first["fill_price"] == pytest.approx(deal.price + 0.0010)

    corrected = _checks("corrected")
    _rounds_until_checked(env, _id(message))
    assert _checks("corrected") == corrected + 1
    published = env.pipeline.settler.wait_for(uuid.UUID(_id(message)), 1.0)
    second = _doc(published)
    assert (second["version"], second["provisional"]) == (2, False)
    assert second["fill_price"] == pytest.approx(deal.price)
    assert second["broker_deals"] == [deal.ticket]
    assert "reply" in second["correction"]
    assert env.row(_id(message))["confirmation_version"] == 2
    # a redelivery answers the corrected version
    assert _doc(env.deliver(message, redelivered=True)) == second


def test_the_session_is_released_while_the_deals_lag(new_database: Callable[[], str]) -> None:
    lagging = SimConfig(
        account=SimAccount(balance=10_000_000.0),
        faults=FaultConfig(deal_lag_ms=800.0, deal_lag_jitter_ms=0.0, deal_zero_rate=1.0),
    )
    with pipeline_env(new_database(), lagging) as env:
        message = approval("EURUSD", 1, 100_000.0)
        started = time.monotonic()
        outcome = env.pipeline.handle(_delivery(message))
        assert isinstance(outcome, Settling), outcome
        assert env.deals(_id(message)) == [] or time.monotonic() - started < 0.8
        with env.pool.claim(0.5) as lease:  # the only session is free: nothing holds it
            assert lease.session.id == "sim-0"
        row = env.row(_id(message))
        assert row["state"] == "SUBMITTED" and row["settling"]["orders"]
        document = _doc(env.pipeline.settler.wait_for(outcome.execution_id, 10.0))
        (deal,) = broker_deals(env.sim)
        assert document["status"] == "FILLED" and document["broker_deals"] == [deal.ticket]
        assert document["provisional"] is False
        assert "settle" in document["timings_ms"]


def test_an_unknown_outcome_is_never_sent_again_and_its_late_fill_is_reported(
    env: PipelineEnv,
) -> None:
    """Issue 26 (b): a resend here would be refused for good (10006); there is none, so the
    first send's late fill is reported, not a final REJECTED."""
    assert env.settings.max_send_attempts == 3
    env.sim.set_faults(scripted=("timeout_late", "reject"), late_execution_seconds=(0.6, 0.6))
    message = approval("EURUSD", 1, 100_000.0)
    first = _doc(env.deliver(message))
    assert (first["status"], first["rejection_reason"], first["provisional"]) == (
        "FAILED",
        "UNKNOWN_OUTCOME",
        True,
    )
    assert _sends(env, message) == 1
    assert env.row(_id(message))["state"] == "UNKNOWN"

    time.sleep(0.6)  # the dealer executes the held order
    second = _doc(_corrected(env))
    (deal,) = env.deals(_id(message))
    assert (second["version"], second["provisional"], second["status"]) == (2, False, "FILLED")
    assert second["broker_deals"] == [deal.ticket]
    assert _sends(env, message) == 1
    assert len(env.deals(_id(message))) == 1


def test_a_split_plan_with_an_unknown_later_leg_is_final_only_once_the_leg_shows(
    env: PipelineEnv,
) -> None:
    """Issue 26 (a): leg 2 comes back 10012 and executes later. The answer from leg 1 is
    provisional; a recheck before leg 2 shows stays provisional; after it, final."""
    env.sim.update_symbol("EURUSD", volume_max=0.5)
    env.sim.set_faults(scripted=("ok", "timeout_late"), late_execution_seconds=(1.5, 1.5))
    message = approval("EURUSD", 1, 100_000.0)
    first = _doc(env.deliver(message))
    assert (first["status"], first["provisional"]) == ("PARTIALLY_FILLED", True)
    assert first["executed_lots"] == pytest.approx(0.5)

    assert all(isinstance(o, Requeue) for o in _recheck(env))  # leg 2 shows nothing yet
    assert env.row(_id(message))["state"] == "UNKNOWN"

    time.sleep(1.5)
    second = _doc(_corrected(env))
    deals = env.deals(_id(message))
    assert len(deals) == 2 and _sends(env, message) == 2
    assert (second["status"], second["provisional"]) == ("FILLED", False)
    assert second["executed_lots"] == pytest.approx(1.0)
    assert sorted(second["broker_deals"]) == sorted(d.ticket for d in deals)


def _delivery(message: dict[str, Any]) -> Delivery:
    return Delivery(
        body=json.dumps(message).encode(),
        properties=MessageProperties(content_type="application/json"),
        redelivered=False,
        delivery_count=None,
        received_at=datetime.now(UTC),
    )


def test_a_deal_check_a_killed_worker_owed_is_taken_over_and_done(env: PipelineEnv) -> None:
    """The deal check lives in the database (``deal_checks``), not in the worker that owed
    it: another settler finds it (the scan) and checks the deals."""
    env.sim.set_faults(deal_zero_rate=0.0)
    message = approval("EURUSD", 1, 100_000.0)
    assert _doc(env.pipeline.handle(_delivery(message)))["status"] == "FILLED"
    env.pipeline.settler.stop()  # the worker that owed the check is gone
    assert _deal_check(env, _id(message)) is not None
    with env.store.connection() as conn:  # ... for longer than a live worker would leave it
        conn.execute("UPDATE execution.deal_checks SET created_at = now() - interval '1 hour'")

    successor = Settler(env.pipeline)
    agreed = _checks("agreed")
    assert successor.scan() == 1
    deadline = time.monotonic() + 10.0
    while _deal_check(env, _id(message)) is not None:
        assert time.monotonic() < deadline
        time.sleep(min(successor.round(), 0.1))
    assert _checks("agreed") == agreed + 1
    successor.stop()


def test_hand_overs_wake_the_settler_only_when_they_fall_due_before_its_next_round(
    env: PipelineEnv,
) -> None:
    """A round goes through every waiting execution: one per hand-over made the settler's
    work grow with the square of the rate. Checks due at the next grid second do not wake
    it; an execution due sooner (its deals lag a deal-0 reply) does, and is settled."""
    settler = env.pipeline.settler
    rounds: list[float] = []
    run_round = settler.round

    def counted() -> float:
        rounds.append(time.monotonic())
        return run_round()

    settler.round = counted  # type: ignore[method-assign]
    env.sim.set_faults(deal_zero_rate=0.0)
    first = approval("EURUSD", 1, 100_000.0)
    assert _doc(env.pipeline.handle(_delivery(first)))["status"] == "FILLED"
    time.sleep(0.05)  # the settler's thread has started and sleeps until the check is due
    before = len(rounds)
    for _ in range(10):
        message = approval("EURUSD", 1, 100_000.0)
        assert _doc(env.pipeline.handle(_delivery(message)))["status"] == "FILLED"
    assert len(rounds) - before <= 2, len(rounds) - before

    env.sim.set_faults(deal_zero_rate=1.0)  # the reply names no deal: the settler decides
    late = approval("EURUSD", 1, 100_000.0)
    assert isinstance(env.pipeline.handle(_delivery(late)), Settling)
    settled = settler.wait_for(uuid.UUID(_id(late)), 10.0)
    assert _doc(settled)["status"] == "FILLED"


def test_a_settler_whose_store_was_closed_stops_instead_of_retrying_for_ever(
    env: PipelineEnv, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A closed store means the process is closing: the settler's thread ends, as it does
    when the session pool is closed. It used to scan the closed pool every few seconds for
    as long as the process lived, logging each time (a test's leftover settler once wrote
    into another test's log)."""
    monkeypatch.setattr(settler_module, "SCAN_SECONDS", 0.05)
    settler = env.pipeline.settler
    settler.start()
    assert settler.running
    env.store.close()
    deadline = time.monotonic() + 5.0
    while settler.running:
        assert time.monotonic() < deadline, "the settler still runs on a closed store"
        time.sleep(0.02)
    assert "cannot scan the database" not in caplog.text
