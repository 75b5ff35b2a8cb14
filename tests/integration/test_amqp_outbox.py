"""The outbox sweep against real PostgreSQL and RabbitMQ: refused confirmations back off.

Issue 18, item 8: the sweep read ``ORDER BY created_at LIMIT 500``, so 500 old confirmations
the broker keeps returning (no queue bound for their routing key) filled every sweep and a
routable one behind them was never published.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from schemas.identity import comment_token_for
from tests.integration.test_amqp_support import Running, broker, ids_of, vhost_of, wait_until
from worker.amqp.runtime import AmqpRuntime, RuntimeOptions
from worker.amqp.topology import UNROUTED_QUEUE, unrouted_queue_arguments
from worker.errors import ExitCode
from worker.execution.outcome import Delivery, Outcome, Publish, Requeue
from worker.store.store import Store

ROUTABLE_KEY = "confirmation.filled.EURUSD"
UNROUTABLE_KEY = "confirmation.filled.NOWHERE"  # no queue is bound for it
OPTIONS = RuntimeOptions(
    prefetch=1,
    sweep_interval_seconds=3600.0,  # one sweep per runtime: the one at start-up
    reconnect_min_delay_seconds=0.1,
    reconnect_max_delay_seconds=1.0,
)


@pytest.fixture
def store(new_database: Callable[[], str]) -> Iterator[Store]:
    opened = Store.open(new_database(), max_size=4)
    opened.migrate()
    yield opened
    opened.close()


def _no_requests(_delivery: Delivery) -> Outcome:
    return Requeue("this test sends no requests")


def _add(store: Store, routing_key: str, count: int, age_seconds: float) -> list[uuid.UUID]:
    """``count`` committed confirmations, ``age_seconds`` old (older first, a ms apart)."""
    ids = [uuid.uuid4() for _ in range(count)]
    with store.connection() as conn:
        for execution_id in ids:
            fields: dict[str, Any] = {
                "execution_id": execution_id,
                "idempotency_key": f"key-{execution_id}",
                "state": "FILLED",
                "comment_token": comment_token_for(execution_id),
                "received_at": datetime.now(UTC),
                "symbol": "EURUSD",
                "request": {"symbol": "EURUSD"},
            }
            payload = f'{{"execution_id": "{execution_id}"}}'.encode()
            publish = Publish(execution_id, routing_key, payload, None, None)
            store.finish(conn, fields, [], publish, insert_only=True)
        conn.execute(
            "UPDATE execution.outbox o"
            " SET created_at = now() - make_interval(secs => %s) + i.n * interval '1 ms'"
            " FROM unnest(%s::uuid[]) WITH ORDINALITY AS i(id, n) WHERE o.execution_id = i.id",
            (age_seconds, ids),
        )
        conn.execute(  # as migration 0002 leaves existing rows: due at their creation
            "UPDATE execution.outbox SET next_attempt_at = created_at WHERE execution_id = ANY(%s)",
            (ids,),
        )
    return ids


def _outbox(store: Store, ids: list[uuid.UUID]) -> list[tuple[int, bool, bool]]:
    """(attempts, published, due now) of each row."""
    with store.connection() as conn:
        return [
            (row[0], row[1], row[2])
            for row in conn.execute(
                "SELECT attempts, published_at IS NOT NULL, next_attempt_at <= now()"
                " FROM execution.outbox WHERE execution_id = ANY(%s)",
                (ids,),
            )
        ]


def test_old_unroutable_confirmations_do_not_starve_a_routable_one(
    new_vhost: Callable[[], str], store: Store, rabbitmq_broker: Any
) -> None:
    url = new_vhost()
    # the unrouted queue refuses too (full: a quorum queue takes one past its max-length):
    # the returned confirmations stay in the outbox
    rabbitmq_broker.ctl(
        "set_policy",
        "-p",
        vhost_of(url),
        "--apply-to",
        "queues",
        "full",
        r"^execution\.confirmations\.unrouted$",
        '{"max-length": 0, "overflow": "reject-publish"}',
    )
    with broker(url) as side:
        side.channel.queue_declare(
            UNROUTED_QUEUE, durable=True, arguments=unrouted_queue_arguments()
        )
        side.publish(b"filler", routing_key=UNROUTED_QUEUE)
    unroutable = _add(store, UNROUTABLE_KEY, 600, age_seconds=3600.0)
    [routable] = _add(store, ROUTABLE_KEY, 1, age_seconds=60.0)
    with broker(url) as side:
        side.bind_confirmations("observer", ROUTABLE_KEY)

        # sweep 1: the 500 rows due first, all returned by the broker
        first = AmqpRuntime(url, _no_requests, store, OPTIONS)
        running = Running(first).start()
        wait_until(lambda: first.stats.nacked == OPTIONS.sweep_limit, "sweep 1's refusals")
        assert running.stop() == ExitCode.OK
        assert side.drain("observer") == []

        # sweep 2: the 100 older rows left, and the routable one
        second = AmqpRuntime(url, _no_requests, store, OPTIONS)
        running = Running(second).start()
        got = side.take("observer", 1)
        assert ids_of(got) == [str(routable)]
        wait_until(lambda: second.stats.nacked == 100, "sweep 2's refusals")
        assert running.stop() == ExitCode.OK

    assert first.stats.confirmations_published == 0
    assert second.stats.confirmations_published == 1
    assert _outbox(store, [routable]) == [(0, True, True)]
    # every refused row was tried once and now waits for its next attempt
    assert sorted(_outbox(store, unroutable)) == [(1, False, False)] * 600


def test_mark_failed_backs_off_exponentially_up_to_the_limit(store: Store) -> None:
    [row] = _add(store, UNROUTABLE_KEY, 1, age_seconds=10.0)
    attempts, delays = [], []
    for _ in range(5):
        store.mark_failed([row], backoff_seconds=10.0, max_backoff_seconds=60.0)
        with store.connection() as conn:
            found = conn.execute(
                "SELECT attempts, extract(epoch FROM next_attempt_at - now())"
                " FROM execution.outbox WHERE execution_id = %s",
                (row,),
            ).fetchone()
        assert found is not None
        attempts.append(found[0])
        delays.append(float(found[1]))
    assert attempts == [1, 2, 3, 4, 5]
    # next_attempt_at was set a moment before this read: allow for that moment only
    for delay, expected in zip(delays, [10, 20, 40, 60, 60], strict=True):
        assert expected - 5 < delay <= expected
    assert store.unpublished(10) == []
    store.mark_published([row])
    store.mark_failed([row])  # a late refusal of a row already published changes nothing
    assert _outbox(store, [row]) == [(5, True, False)]
