"""Issue 18.2: the lease is proven immediately before every order_send.

A worker whose session lock died after its intent commit (its lock connection killed, the
session locked by another process since) must send nothing: the order would be a second
one if the new holder settles the row. The delivery is requeued; the redelivery, once the
session is free again, settles the row and sends exactly one order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from schemas.identity import execution_id_for
from tests.integration.pipeline_env import approval, pipeline_env
from worker.execution.outcome import Publish, Requeue
from worker.mt5 import api
from worker.pool.leases import LOCK_CLASS

pytestmark = pytest.mark.integration

_IN_FLIGHT = "SELECT count(*) FROM execution.executions WHERE state IN ('SUBMITTING', 'SUBMITTED')"
_HOLDERS = (
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


@pytest.mark.parametrize("group_commit", [False, True], ids=["own", "grouped"])
def test_a_lease_lost_after_the_intent_sends_nothing(database_url: str, group_commit: bool) -> None:
    with pipeline_env(database_url, group_commit=group_commit) as env:
        message = approval("EURUSD", 1, 100_000.0)
        other = psycopg.connect(database_url, autocommit=True)
        original: Callable[[str], api.Tick | None] = env.sim.symbol_info_tick
        armed = {"on": True}

        def tick_then_lose_the_lease(symbol: str) -> Any:
            """The tick read just before order_send: the lock is lost right now."""
            with psycopg.connect(database_url, autocommit=True) as admin:
                intent_committed = admin.execute(_IN_FLIGHT).fetchone() == (1,)
                if armed["on"] and intent_committed:
                    armed["on"] = False
                    for (pid,) in admin.execute(_HOLDERS, (LOCK_CLASS,)).fetchall():
                        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    lock_key = env.pool._slots[0].spec.lock_key
                    other.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, lock_key))
            return original(symbol)

        env.sim.symbol_info_tick = tick_then_lose_the_lease  # type: ignore[method-assign]
        try:
            outcome = env.deliver(message)
            assert isinstance(outcome, Requeue) and "lease" in outcome.reason
            assert not armed["on"], "the lease was lost between the intent and the send"
            assert env.deals() == [], "fenced: no order left this worker"
            row = env.row(str(execution_id_for(message["decision"]["order_id"])))
            assert row["state"] == "SUBMITTING"
        finally:
            other.close()  # the other holder goes: the session is free again
        again = env.deliver(message, redelivered=True)
        # the row cannot tell a fenced send from a lost reply: never sent again (issue 26)
        assert isinstance(again, Publish)
        document = json.loads(again.payload)
        assert (document["status"], document["provisional"]) == ("FAILED", True)
        assert env.deals() == [], "no order for a send that may have left"


def test_a_lease_lost_after_the_send_commits_no_final(database_url: str) -> None:
    """Issue 19: finals are group-committed on a connection other than the lease's; the lock
    lost after the order (another process holds the session now) must leave the row in
    flight for its holder, not commit this handling's answer beside the holder's."""
    with pipeline_env(database_url, group_commit=True) as env:
        message = approval("EURUSD", 1, 100_000.0)
        other = psycopg.connect(database_url, autocommit=True)
        original: Callable[..., Any] = env.sim.order_send
        armed = {"on": True}

        def send_then_lose_the_lease(request: Any) -> Any:
            """The order is filled (its reply names its deal): the lock is lost right now."""
            result = original(request)
            if armed["on"]:
                armed["on"] = False
                with psycopg.connect(database_url, autocommit=True) as admin:
                    for (pid,) in admin.execute(_HOLDERS, (LOCK_CLASS,)).fetchall():
                        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                lock_key = env.pool._slots[0].spec.lock_key
                other.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, lock_key))
            return result

        env.sim.set_faults(deal_zero_rate=0.0)  # settled from the reply, at once
        env.sim.order_send = send_then_lose_the_lease  # type: ignore[method-assign]
        try:
            outcome = env.deliver(message)
            assert not armed["on"], "the lease was lost between the send and the final"
            assert isinstance(outcome, Requeue) and "lease" in outcome.reason
            row = env.row(str(execution_id_for(message["decision"]["order_id"])))
            assert row["state"] in ("SUBMITTING", "SUBMITTED"), "no final without the lock"
            assert len(env.deals()) == 1
        finally:
            other.close()
        again = env.deliver(message, redelivered=True)
        assert isinstance(again, Publish)
        assert len(env.deals()) == 1, "settled from the broker's truth: no second order"
