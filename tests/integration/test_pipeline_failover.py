"""A database failover that lost the newest commits: the redelivery finds its order by magic.

Two pipelines on one simulated terminal (the broker's books) and two databases: the first
database is the old primary, the second the promoted standby that never received the
approval's rows (asynchronous replication). The second pipeline has seen the switch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest

from tests.integration.pipeline_env import PipelineEnv, approval, pipeline_env
from worker.execution.outcome import DeadLetter, Publish, Requeue


@pytest.fixture
def old_and_new(new_database: Callable[[], str]) -> Iterator[tuple[PipelineEnv, PipelineEnv]]:
    with (
        pipeline_env(new_database(), approval_ttl_seconds=1.0) as old,
        pipeline_env(new_database(), sim=old.sim, approval_ttl_seconds=1.0) as new,
    ):
        new.store.epochs._switched_quietly(time.time())  # what observe() records
        yield old, new


def test_an_order_sent_before_the_switch_is_settled_from_the_books_not_sent_again(
    old_and_new: tuple[PipelineEnv, PipelineEnv],
) -> None:
    old, new = old_and_new
    message = approval("EURUSD", 1, 100_000.0)
    before = old.confirm(message)
    assert before["status"] == "FILLED" and len(old.deals()) == 1

    after = new.confirm(message, redelivered=True)
    assert len(new.deals()) == 1, "a second order"
    assert after["status"] == "FILLED"
    assert after["broker_deals"] == before["broker_deals"]
    assert after["executed_lots"] == before["executed_lots"]
    assert new.row(after["execution_id"])["state"] == "FILLED"


def test_a_stale_redelivery_of_an_executed_approval_is_not_refused(
    old_and_new: tuple[PipelineEnv, PipelineEnv],
) -> None:
    old, new = old_and_new
    message = approval("USDJPY", -1, 50_000.0)
    before = old.confirm(message)
    time.sleep(1.2)  # past the 1 s TTL: a new approval this old would be refused
    after = new.confirm(message, redelivered=True)
    assert (after["status"], len(new.deals())) == ("FILLED", 1)
    assert after["broker_deals"] == before["broker_deals"]


def _stages(env: PipelineEnv, execution_id: str) -> list[tuple[str, str]]:
    return [(e["stage"], e["kind"]) for e in env.events(execution_id)]


def test_an_approval_the_broker_has_nothing_of_is_sent_once(
    old_and_new: tuple[PipelineEnv, PipelineEnv],
) -> None:
    _, new = old_and_new
    message = approval("GBPUSD", 1, 30_000.0)
    waited = new.deliver(message)  # within the reconcile grace (0.05 s) since the switch
    assert isinstance(waited, Requeue) and new.deals() == []
    time.sleep(0.1)
    confirmation = new.confirm(message, redelivered=True)
    assert confirmation["status"] == "FILLED" and len(new.deals()) == 1
    stages = _stages(new, confirmation["execution_id"])
    # the broker was asked (by magic) before the order went out
    assert stages.index(("reconcile", "broker_queries")) < stages.index(("submit", "broker_call"))


def test_without_a_switch_the_broker_is_not_asked_first(new_database: Callable[[], str]) -> None:
    with pipeline_env(new_database()) as env:
        confirmation = env.confirm(approval())
        assert confirmation["status"] == "FILLED"
        assert ("reconcile", "broker_queries") not in _stages(env, confirmation["execution_id"])


def test_an_order_still_invisible_at_the_switch_is_waited_for_not_sent_again(
    new_database: Callable[[], str],
) -> None:
    """Its reply was unknown and it executes a second later: nothing shows on the books when
    the redelivery first asks. Within the reconcile grace since the switch the redelivery is
    requeued, not sent; once the order shows, it is settled from the books."""
    with (
        pipeline_env(new_database()) as old,
        pipeline_env(new_database(), sim=old.sim, reconcile_grace_seconds=3.0) as new,
    ):
        old.sim.set_faults(scripted=("timeout_late",), late_execution_seconds=(1.0, 1.0))
        message = approval("EURUSD", 1, 100_000.0)
        old.deliver(message)  # the order is in, invisible; then the primary is lost
        new.store.epochs._switched_quietly(time.time())
        assert old.deals() == []

        first = new.deliver(message, redelivered=True)
        assert isinstance(first, Requeue) and "database switch" in first.reason
        assert new.deals() == [], "sent again while the first order was invisible"

        outcome = new.settled(message, attempts=40)
        assert len(new.deals()) == 1, "a second order"
        assert isinstance(outcome, Publish)
        assert json.loads(outcome.payload)["status"] == "FILLED"


def test_at_the_last_chances_an_approval_in_doubt_is_dead_lettered_not_rejected(
    new_database: Callable[[], str],
) -> None:
    """Its last deliveries come while the broker still shows nothing (here: within a long
    grace; in life: a terminal that cannot be asked). A REJECTED answer would contradict
    the order that executes a moment later."""
    with (
        pipeline_env(new_database()) as old,
        pipeline_env(new_database(), sim=old.sim, reconcile_grace_seconds=60.0) as new,
    ):
        old.sim.set_faults(scripted=("timeout_late",), late_execution_seconds=(0.5, 0.5))
        message = approval("EURUSD", 1, 100_000.0)
        old.deliver(message)
        new.store.epochs._switched_quietly(time.time())
        last = new.settings.delivery_limit
        outcome = new.deliver(message, redelivered=True, delivery_count=last)
        assert isinstance(outcome, DeadLetter), outcome
        assert outcome.reason == "IN_DOUBT_AFTER_DATABASE_SWITCH"
        time.sleep(0.6)
        new.sim.account_info()  # any call: the simulated server executes what is due
        assert len(new.deals()) == 1  # the order executed, and was answered by nobody
        with new.store.connection() as conn:
            assert conn.execute("SELECT count(*) FROM execution.executions").fetchone() == (0,)
