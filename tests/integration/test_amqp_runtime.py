"""The AMQP runtime against the real RabbitMQ, with a small in-memory handler and outbox.

Each test gets its own vhost. The handler stands in for the pipeline: it is idempotent by
message id (one "order" per execution id, the same confirmation on every redelivery), as
the real pipeline is through its store.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pika.exceptions
import pytest
from prometheus_client import REGISTRY

from tests.integration.test_amqp_support import (
    Running,
    broker,
    close_connections,
    ids_of,
    reset_vhost,
    settled_ready,
    vhost_of,
    wait_until,
)
from worker.amqp.outbox import ORIGINAL_ROUTING_KEY_HEADER
from worker.amqp.runtime import AmqpRuntime, RuntimeOptions
from worker.amqp.topology import (
    CONFIRMATIONS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_QUEUE,
    POLICY_NAME,
    POLICY_PATTERN,
    REQUESTS_QUEUE,
    UNROUTED_QUEUE,
    alternate_exchange_policy,
    requests_queue_arguments,
)
from worker.errors import ExitCode
from worker.execution.outcome import (
    CONFIRMATION_SCHEMA_HEADER,
    DeadLetter,
    Delivery,
    Outcome,
    Publish,
    Requeue,
)
from worker.observability import metrics

NAMESPACE = uuid.UUID("0b3c3f4e-2f1a-4c55-9d0e-6b1f0a7e5c21")
OPTIONS = RuntimeOptions(
    prefetch=4,
    delivery_limit=3,
    drain_timeout_seconds=10.0,
    requeue_delay_seconds=0.05,
    sweep_interval_seconds=0.3,
    reconnect_min_delay_seconds=0.1,
    reconnect_max_delay_seconds=1.0,
)


def execution_id(message_id: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, message_id)


class MemoryOutbox:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: dict[uuid.UUID, Publish] = {}
        self.published: set[uuid.UUID] = set()

    def add(self, publish: Publish) -> None:
        with self.lock:
            self.rows.setdefault(publish.execution_id, publish)

    def unpublished(self, limit: int) -> list[Publish]:
        with self.lock:
            return [p for i, p in self.rows.items() if i not in self.published][:limit]

    def mark_published(self, execution_ids: Sequence[uuid.UUID | tuple[uuid.UUID, int]]) -> None:
        with self.lock:
            self.published.update(k if isinstance(k, uuid.UUID) else k[0] for k in execution_ids)


def confirmation_for(message_id: str, reply_to: str | None) -> Publish:
    eid = execution_id(message_id)
    payload = json.dumps({"execution_id": str(eid), "status": "FILLED"}).encode()
    return Publish(eid, "confirmation.filled.EURUSD", payload, message_id, reply_to)


class FakePipeline:
    """Actions come from the ``test-action`` header: publish (default), dead, requeue-once,
    raise, block (waits for ``release``), block-first (only the first delivery waits).
    A first delivery with a ``test-gate`` header waits for ``open_gate`` of that name first."""

    def __init__(self, outbox: MemoryOutbox) -> None:
        self.outbox = outbox
        self.lock = threading.Lock()
        self.orders: Counter[uuid.UUID] = Counter()
        self.seen: list[Delivery] = []
        self.release = threading.Event()
        self.gates: dict[str, threading.Event] = {}

    def started(self) -> int:
        with self.lock:
            return len(self.seen)

    def deliveries_of(self, message_id: str) -> int:
        with self.lock:
            return sum(d.properties.message_id == message_id for d in self.seen)

    def gate(self, name: str) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(name, threading.Event())

    def open_gate(self, name: str) -> None:
        self.gate(name).set()

    def __call__(self, delivery: Delivery) -> Outcome:
        with self.lock:
            self.seen.append(delivery)
            first = len(self.seen) == 1
        gate = delivery.properties.headers.get("test-gate")
        if isinstance(gate, str) and not delivery.redelivered:
            self.gate(gate).wait(30)
        action = delivery.properties.headers.get("test-action", "publish")
        message_id = delivery.properties.message_id or ""
        if action == "raise":
            raise RuntimeError("a bug in the pipeline")
        if action == "dead":
            return DeadLetter("missing_idempotency_key", "neither order_id nor message_id")
        if action == "requeue-once" and not delivery.redelivered:
            return Requeue("no session free")
        if action == "block" or (action == "block-first" and first):
            self.release.wait(30)
        with self.lock:
            eid = execution_id(message_id)
            if eid not in self.outbox.rows:
                self.orders[eid] += 1
                self.outbox.add(confirmation_for(message_id, delivery.properties.reply_to))
            return self.outbox.rows[eid]


Factory = Callable[..., tuple[AmqpRuntime, FakePipeline, MemoryOutbox]]


@pytest.fixture(scope="module")
def module_vhost(new_vhost: Callable[[], str]) -> str:
    return new_vhost()


@pytest.fixture
def vhost_url(module_vhost: str) -> str:
    """The module's vhost, emptied of everything the previous test declared."""
    reset_vhost(module_vhost, ("observer", "late-observer", "rpm.replies"))
    return module_vhost


@pytest.fixture
def make_runtime(vhost_url: str) -> Iterator[Factory]:
    made: list[tuple[AmqpRuntime, FakePipeline]] = []

    def make(**overrides: object) -> tuple[AmqpRuntime, FakePipeline, MemoryOutbox]:
        outbox = MemoryOutbox()
        pipeline = FakePipeline(outbox)
        options = replace(OPTIONS, **overrides)  # type: ignore[arg-type]
        runtime = AmqpRuntime(vhost_url, pipeline, outbox, options)
        made.append((runtime, pipeline))
        return runtime, pipeline, outbox

    yield make
    for runtime, pipeline in made:  # a failed test must not leave a runtime reconnecting
        pipeline.release.set()
        for gate in list(pipeline.gates.values()):
            gate.set()
        runtime.stop()


def test_topology_is_declared_idempotently(vhost_url: str, make_runtime: Factory) -> None:
    for _ in range(2):
        runtime, _, _ = make_runtime()
        assert Running(runtime).start().stop() == ExitCode.OK
    with broker(vhost_url) as side:
        ch = side.channel
        # re-declaring with the contract's arguments is accepted: they are what exists
        ch.queue_declare(REQUESTS_QUEUE, durable=True, arguments=requests_queue_arguments(3))
        ch.queue_declare(DEAD_QUEUE, passive=True)
        ch.exchange_declare(CONFIRMATIONS_EXCHANGE, "topic", durable=True)
        ch.exchange_declare(DEAD_LETTER_EXCHANGE, "fanout", durable=True)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            ch.queue_declare(REQUESTS_QUEUE, durable=True, arguments=requests_queue_arguments(9))
        assert refused.value.reply_code == 406


def test_a_queue_with_other_arguments_is_a_one_line_error(
    vhost_url: str, make_runtime: Factory
) -> None:
    with broker(vhost_url) as side:
        side.declare_queue(REQUESTS_QUEUE)  # classic, no delivery limit
    runtime, _, _ = make_runtime()
    assert Running(runtime).start(wait_consuming=False).join() == ExitCode.TOPOLOGY_MISMATCH
    assert runtime.error is not None
    assert "\n" not in runtime.error
    assert "queue 'execution.requests' exists with a different x-" in runtime.error


def test_a_different_delivery_limit_names_both_values(
    vhost_url: str, make_runtime: Factory
) -> None:
    with broker(vhost_url) as side:
        side.channel.queue_declare(
            REQUESTS_QUEUE, durable=True, arguments=requests_queue_arguments(9)
        )
    runtime, _, _ = make_runtime()
    assert Running(runtime).start(wait_consuming=False).join() == ExitCode.TOPOLOGY_MISMATCH
    assert runtime.error == (
        "queue 'execution.requests' exists with a different x-delivery-limit: the worker "
        "declares 3, the existing queue has 9; set DELIVERY_LIMIT to the existing value, "
        "or delete the queue"
    )


def test_confirmations_are_published_then_requests_acked(
    vhost_url: str, make_runtime: Factory
) -> None:
    runtime, pipeline, outbox = make_runtime()
    with broker(vhost_url) as side:
        side.bind_confirmations("observer")
        side.declare_queue("rpm.replies")
        running = Running(runtime).start()
        ids = [f"order-{i}" for i in range(6)]
        for mid in ids:
            side.publish(
                b"{}", message_id=mid, reply_to="rpm.replies" if mid == "order-0" else None
            )
        got = side.take("observer", 6)
        replies = side.take("rpm.replies", 1)
        wait_until(lambda: outbox.published == {execution_id(m) for m in ids}, "marks")
        assert running.stop() == ExitCode.OK
    assert sorted(m.properties.message_id for m in got) == sorted(str(execution_id(m)) for m in ids)
    for message in got:
        assert message.routing_key == "confirmation.filled.EURUSD"
        assert message.properties.delivery_mode == 2
        assert message.properties.content_type == "application/json"
        assert message.properties.headers == {"schema": CONFIRMATION_SCHEMA_HEADER}
        eid = uuid.UUID(message.properties.message_id)
        assert message.body == outbox.rows[eid].payload
        assert message.properties.correlation_id == outbox.rows[eid].correlation_id
    assert replies[0].properties.message_id == str(execution_id("order-0"))
    assert runtime.stats.acked == 6
    settled_ready(vhost_url, REQUESTS_QUEUE, 0)
    assert set(pipeline.orders.values()) == {1}


class AnnouncingMemoryOutbox(MemoryOutbox):
    """Tells its watchers of confirmations committed off the handler path, as the store
    does for the settler's."""

    def __init__(self) -> None:
        super().__init__()
        self.watchers: list[Callable[[Publish], None]] = []

    def watch(self, watcher: Callable[[Publish], None]) -> Callable[[], None]:
        self.watchers.append(watcher)
        return lambda: self.watchers.remove(watcher)

    def announce(self, publish: Publish) -> None:
        self.add(publish)
        for watcher in list(self.watchers):
            watcher(publish)


def test_a_confirmation_announced_before_the_runtime_runs_stalls_nothing(vhost_url: str) -> None:
    """The settler settles an execution the recovery handed it while the runtime is being
    built, before its IO loop opens. That announcement must neither be lost (the sweep
    publishes it) nor block the outcomes of the deliveries that follow (CI saw a worker
    consume its whole prefetch and answer none of it)."""
    outbox = AnnouncingMemoryOutbox()
    runtime = AmqpRuntime(vhost_url, FakePipeline(outbox), outbox, OPTIONS)
    recovered = confirmation_for("recovered-at-start", None)
    outbox.announce(recovered)  # the runtime watches the outbox; its loop is not open yet
    ids = [f"after-start-{i}" for i in range(3)]
    with broker(vhost_url) as side:
        side.bind_confirmations("observer")
        running = Running(runtime).start()
        try:
            for mid in ids:
                side.publish(b"{}", message_id=mid)
            got = side.take("observer", 4)
        finally:
            code = running.stop()
    assert code == ExitCode.OK
    expected = [recovered.execution_id, *(execution_id(m) for m in ids)]
    assert sorted(ids_of(got)) == sorted(str(e) for e in expected)
    assert runtime.stats.acked == len(ids)
    settled_ready(vhost_url, REQUESTS_QUEUE, 0)


def _unrouted_count() -> float:
    return REGISTRY.get_sample_value("execution_worker_confirmations_unrouted_total") or 0.0


def test_nothing_bound_the_worker_moves_returned_confirmations_to_the_unrouted_queue(
    vhost_url: str, make_runtime: Factory
) -> None:
    """No binding and no alternate-exchange policy: the broker returns the confirmation; the
    worker puts it in execution.confirmations.unrouted and acks: nothing stalls."""
    runtime, _, outbox = make_runtime()
    before = _unrouted_count()
    running = Running(runtime).start()
    with broker(vhost_url) as side:
        for n in range(3):
            side.publish(b"{}", message_id=f"order-unroutable-{n}")
        wait_until(lambda: runtime.stats.acked == 3, "every request acked")
        got = side.take(UNROUTED_QUEUE, 3)
    assert sorted(ids_of(got)) == sorted(
        str(execution_id(f"order-unroutable-{n}")) for n in range(3)
    )
    assert {m.properties.headers[ORIGINAL_ROUTING_KEY_HEADER] for m in got} == {
        "confirmation.filled.EURUSD"
    }
    assert runtime.stats.returned == runtime.stats.unrouted == 3
    assert _unrouted_count() - before == 3
    wait_until(lambda: len(outbox.published) == 3, "the marks")
    assert running.stop() == ExitCode.OK
    assert runtime.stats.requeued == 0
    settled_ready(vhost_url, REQUESTS_QUEUE, 0)


def test_with_the_policy_the_broker_routes_unbound_confirmations_to_the_unrouted_queue(
    vhost_url: str, make_runtime: Factory, rabbitmq_broker: Any
) -> None:
    vhost = vhost_of(vhost_url)
    rabbitmq_broker.ctl(
        "set_policy",
        "-p",
        vhost,
        "--apply-to",
        "exchanges",
        POLICY_NAME,
        POLICY_PATTERN,
        json.dumps(alternate_exchange_policy()),
    )
    try:
        runtime, _, _ = make_runtime()
        running = Running(runtime).start()
        with broker(vhost_url) as side:
            side.publish(b"{}", message_id="order-policy")
            wait_until(lambda: runtime.stats.acked == 1, "the request acked")
            (got,) = side.take(UNROUTED_QUEUE, 1)
        assert got.properties.message_id == str(execution_id("order-policy"))
        assert runtime.stats.returned == runtime.stats.unrouted == 0  # the broker routed it
        assert running.stop() == ExitCode.OK
    finally:
        rabbitmq_broker.ctl("clear_policy", "-p", vhost, POLICY_NAME)


def test_a_vanished_reply_queue_does_not_block_the_ack(
    vhost_url: str, make_runtime: Factory
) -> None:
    runtime, _, _ = make_runtime()
    with broker(vhost_url) as side:
        side.bind_confirmations("observer")
        running = Running(runtime).start()
        side.publish(b"{}", message_id="order-r", reply_to="amq.gen-gone-long-ago")
        side.take("observer", 1)
        wait_until(lambda: runtime.stats.acked == 1, "the ack")
    assert runtime.stats.reply_returned == 1
    assert running.stop() == ExitCode.OK
    settled_ready(vhost_url, REQUESTS_QUEUE, 0)


def test_dead_letter_outcome_keeps_body_and_properties_with_the_reason(
    vhost_url: str, make_runtime: Factory
) -> None:
    runtime, _, _ = make_runtime()
    running = Running(runtime).start()
    before = datetime.now(UTC)
    with broker(vhost_url) as side:
        side.publish(b'{"no": "key"}', message_id=None, headers={"test-action": "dead", "k": "v"})
        dead = side.take(DEAD_QUEUE, 1)
        wait_until(lambda: runtime.stats.acked == 1, "the ack")
    assert dead[0].body == b'{"no": "key"}'
    headers = dead[0].properties.headers
    # the broker writes no x-death for what the worker dead-letters itself: the worker says when
    at = datetime.fromisoformat(headers["x-dead-lettered-at"])
    assert before - timedelta(seconds=1) <= at <= datetime.now(UTC)
    assert headers["x-rejection-reason"] == "missing_idempotency_key"
    assert headers["x-rejection-details"] == "neither order_id nor message_id"
    assert headers["k"] == "v"
    assert dead[0].properties.content_type == "application/json"
    assert running.stop() == ExitCode.OK
    settled_ready(vhost_url, REQUESTS_QUEUE, 0)


def test_requeue_redelivers_with_the_delivery_count(vhost_url: str, make_runtime: Factory) -> None:
    runtime, pipeline, _ = make_runtime()
    running = Running(runtime).start()
    with broker(vhost_url) as side:
        side.bind_confirmations("observer")
        side.publish(b"{}", message_id="order-q", headers={"test-action": "requeue-once"})
        side.take("observer", 1)
    assert running.stop() == ExitCode.OK
    first, second = pipeline.seen
    assert (first.redelivered, first.delivery_count) == (False, None)
    assert (second.redelivered, second.delivery_count) == (True, 1)
    assert runtime.stats.requeued == 1


def test_a_handler_that_raises_is_dead_lettered_by_the_delivery_limit(
    vhost_url: str, make_runtime: Factory
) -> None:
    runtime, pipeline, _ = make_runtime(delivery_limit=2)
    running = Running(runtime).start()
    with broker(vhost_url) as side:
        side.bind_confirmations("observer")
        side.publish(b"{}", message_id="poison", headers={"test-action": "raise"})
        dead = side.take(DEAD_QUEUE, 1)
        # the worker survived: the next message is executed normally
        side.publish(b"{}", message_id="healthy")
        confirmed = side.take("observer", 1)
    assert running.stop() == ExitCode.OK
    assert dead[0].properties.message_id == "poison"
    assert runtime.stats.handler_errors == 3  # first delivery + delivery limit of 2
    assert ids_of(confirmed) == [str(execution_id("healthy"))]
    assert [d.properties.message_id for d in pipeline.seen].count("poison") == 3


def test_the_outbox_is_swept_at_start_up(vhost_url: str, make_runtime: Factory) -> None:
    runtime, _, outbox = make_runtime(sweep_interval_seconds=60.0)
    left_over = [confirmation_for(f"crashed-{i}", None) for i in range(3)]
    for publish in left_over:
        outbox.add(publish)
    with broker(vhost_url) as side:
        side.bind_confirmations("observer")
        running = Running(runtime).start()
        got = side.take("observer", 3)
        wait_until(lambda: len(outbox.published) == 3, "marks")
    assert running.stop() == ExitCode.OK
    assert sorted(ids_of(got)) == sorted(str(p.execution_id) for p in left_over)


def test_broker_loss_mid_stream_loses_and_doubles_nothing(
    vhost_url: str, make_runtime: Factory
) -> None:
    runtime, pipeline, outbox = make_runtime()
    ids = [f"order-{i}" for i in range(60)]
    with broker(vhost_url) as side:
        side.bind_confirmations("observer")
        running = Running(runtime).start()
        for mid in ids:
            side.publish(b"{}", message_id=mid)
    wait_until(lambda: runtime.stats.acked >= 5, "some progress")
    close_connections(vhost_url)
    wait_until(lambda: runtime.stats.connections >= 2, "a reconnect")
    expected = {str(execution_id(m)) for m in ids}
    seen: set[str] = set()
    with broker(vhost_url) as side:

        def all_confirmed() -> bool:
            seen.update(m.properties.message_id for m in side.drain("observer"))
            return seen == expected

        wait_until(all_confirmed, "every confirmation")
    wait_until(lambda: outbox.unpublished(100) == [], "the outbox to drain")
    assert running.stop() == ExitCode.OK
    # every request confirmed and acked; copies (same message_id) are allowed, orders not
    settled_ready(vhost_url, REQUESTS_QUEUE, 0)
    assert set(pipeline.orders.values()) == {1}
    assert len(pipeline.orders) == 60


def test_a_result_from_a_dead_channel_is_not_acked_on_the_new_one(
    vhost_url: str, make_runtime: Factory
) -> None:
    runtime, pipeline, _ = make_runtime()
    running = Running(runtime).start()
    with broker(vhost_url) as side:
        side.bind_confirmations("observer")
        side.publish(b"{}", message_id="order-s", headers={"test-action": "block-first"})
    wait_until(lambda: pipeline.started() == 1, "the first delivery")
    close_connections(vhost_url)
    # the redelivery runs on the new channel while the first call is still blocked
    wait_until(lambda: pipeline.started() == 2, "the redelivery")
    wait_until(lambda: runtime.stats.acked == 1, "the redelivery's ack")
    pipeline.release.set()
    wait_until(lambda: runtime.stats.stale_results == 1, "the stale result")
    assert running.stop() == ExitCode.OK
    assert runtime.stats.acked == 1
    assert pipeline.seen[1].redelivered
    settled_ready(vhost_url, REQUESTS_QUEUE, 0)


def test_acks_settled_together_never_cover_an_older_delivery_still_in_flight(
    vhost_url: str, make_runtime: Factory
) -> None:
    """Issue 19: B, C and D settle in one go while A (delivered first) is still with its
    handler. Their acks may be coalesced, but a multiple ack would settle A too: the broker
    would then not hand A back when the connection is lost."""
    runtime, pipeline, _ = make_runtime()
    running = Running(runtime).start()
    later = ["order-b", "order-c", "order-d"]
    with broker(vhost_url) as side:
        side.bind_confirmations("observer")
        side.publish(b"{}", message_id="order-a", headers={"test-gate": "a"})
        wait_until(lambda: pipeline.started() == 1, "A with its handler")
        for mid in later:
            side.publish(b"{}", message_id=mid, headers={"test-gate": "later"})
        wait_until(lambda: pipeline.started() == 4, "B, C, D with their handlers")
        pipeline.open_gate("later")  # their outcomes reach the IO thread together
        wait_until(lambda: runtime.stats.acked == 3, "the acks of B, C, D")
    close_connections(vhost_url)
    # A was never acked: redelivered on the new channel (its first call is still held)
    wait_until(lambda: pipeline.deliveries_of("order-a") == 2, "A redelivered")
    wait_until(lambda: pipeline.orders[execution_id("order-a")] == 1, "A executed")
    pipeline.open_gate("a")
    wait_until(lambda: runtime.stats.stale_results == 1, "the first call's stale result")
    with broker(vhost_url) as side:
        wait_until(lambda: str(execution_id("order-a")) in ids_of(side.drain("observer")), "A")
    assert running.stop() == ExitCode.OK
    settled_ready(vhost_url, REQUESTS_QUEUE, 0)
    assert set(pipeline.orders.values()) == {1}


def test_a_requeue_waiting_below_later_acks_is_not_swallowed(
    vhost_url: str, make_runtime: Factory
) -> None:
    """Issue 19: A's nack waits out the requeue delay while B, C and D, delivered after it,
    are acked. A multiple ack over them would ack A as well (its nack then names an unknown
    tag and A is gone, unexecuted); A must come back and be confirmed."""
    runtime, pipeline, _ = make_runtime(requeue_delay_seconds=2.0)
    running = Running(runtime).start()
    later = ["order-b", "order-c", "order-d"]
    with broker(vhost_url) as side:
        side.bind_confirmations("observer")
        side.publish(b"{}", message_id="order-a", headers={"test-action": "requeue-once"})
        for mid in later:
            side.publish(b"{}", message_id=mid, headers={"test-gate": "later"})
        wait_until(lambda: pipeline.started() == 4, "four deliveries with their handlers")
        pipeline.open_gate("later")
        # the sweep may publish a copy of a confirmation not marked yet (same message_id)
        expected = {str(execution_id(m)) for m in ["order-a", *later]}
        seen: set[str] = set()

        def all_confirmed() -> bool:
            seen.update(ids_of(side.drain("observer")))
            return seen == expected

        wait_until(all_confirmed, "every confirmation")
        wait_until(lambda: runtime.stats.acked == 4, "the acks")
    assert pipeline.deliveries_of("order-a") == 2
    assert running.stop() == ExitCode.OK
    assert runtime.stats.requeued == 1
    assert runtime.stats.acked == 4
    assert runtime.stats.connections == 1  # no channel error from an unknown delivery tag
    settled_ready(vhost_url, REQUESTS_QUEUE, 0)


def test_stop_finishes_in_flight_messages_and_leaves_the_rest_queued(
    vhost_url: str, make_runtime: Factory
) -> None:
    runtime, pipeline, _ = make_runtime(prefetch=2)
    running = Running(runtime).start()
    with broker(vhost_url) as side:
        side.bind_confirmations("observer")
        for i in range(5):
            side.publish(b"{}", message_id=f"order-{i}", headers={"test-action": "block"})
        wait_until(lambda: pipeline.started() == 2, "two deliveries in flight")
        runtime.stop()
        wait_until(lambda: not runtime.consuming.is_set(), "the consumer to stop")
        pipeline.release.set()
        assert running.join() == ExitCode.OK
        confirmed = side.drain("observer")
    assert len(confirmed) == 2
    assert runtime.stats.acked == 2
    settled_ready(vhost_url, REQUESTS_QUEUE, 3)


def test_the_drain_timeout_requeues_what_is_stuck(vhost_url: str, make_runtime: Factory) -> None:
    runtime, pipeline, _ = make_runtime(drain_timeout_seconds=0.3)
    running = Running(runtime).start()
    try:
        with broker(vhost_url) as side:
            side.publish(b"{}", message_id="order-stuck", headers={"test-action": "block"})
        wait_until(lambda: pipeline.started() == 1, "the delivery")
        assert running.stop() == ExitCode.OK
        assert runtime.stats.requeued == 1
        settled_ready(vhost_url, REQUESTS_QUEUE, 1)
    finally:
        pipeline.release.set()


def test_a_consumer_cancelled_by_the_broker_is_handled_like_a_lost_channel(
    vhost_url: str, make_runtime: Factory
) -> None:
    """Issue 18 item 13: the queue deleted under the consumer (Basic.Cancel) must not leave
    the worker "ready" with nothing arriving; it re-declares and consumes again."""
    runtime, pipeline, _ = make_runtime()
    running = Running(runtime).start()
    not_ready = threading.Event()
    clear = runtime.consuming.clear

    def record_clear() -> None:
        clear()
        not_ready.set()

    runtime.consuming.clear = record_clear  # type: ignore[method-assign]
    with broker(vhost_url) as side:
        side.bind_confirmations("observer")
        side.channel.queue_delete(REQUESTS_QUEUE)
        wait_until(not_ready.is_set, "readiness to drop after the broker's cancel")
        wait_until(runtime.consuming.is_set, "the runtime to consume again")
        side.channel.queue_declare(REQUESTS_QUEUE, passive=True)  # re-declared by the runtime
        side.publish(b"{}", message_id="after-cancel")
        got = side.take("observer", 1)
    assert ids_of(got) == [str(execution_id("after-cancel"))]
    assert runtime.stats.consumer_cancels == 1
    assert running.stop() == ExitCode.OK
    assert pipeline.orders[execution_id("after-cancel")] == 1
    settled_ready(vhost_url, REQUESTS_QUEUE, 0)


def test_the_heartbeat_refreshes_the_callback_gauges(vhost_url: str, make_runtime: Factory) -> None:
    """Issue 18 item 12: a ``run --processes N`` child serves no /metrics, so only its own
    loop can set the session and outbox gauges; nobody calls ``metrics.refresh`` here."""
    metrics.clear_state_readers()
    metrics.OUTBOX_BACKLOG.set(0)
    metrics.SESSIONS_IN_USE.set(0)
    backlog = [7]
    metrics.register_outbox_state(lambda: metrics.OutboxState(backlog[0], 1.5))
    metrics.register_pool_state(lambda: metrics.PoolState(size=3, in_use=2, unhealthy=0))
    try:
        runtime, _, _ = make_runtime()
        running = Running(runtime).start()
        wait_until(lambda: gauge("execution_worker_outbox_backlog") == 7, "the outbox gauge")
        wait_until(lambda: gauge("execution_worker_sessions_in_use") == 2, "the session gauge")
        backlog[0] = 11  # and it keeps refreshing (every metrics_refresh_seconds, 5 s)
        wait_until(lambda: gauge("execution_worker_outbox_backlog") == 11, "a later refresh")
        assert running.stop() == ExitCode.OK
    finally:
        metrics.clear_state_readers()


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


def test_no_heartbeat_while_handler_outcomes_wait_unread(vhost_url: str) -> None:
    """The loop turning is not enough for liveness: outcomes queued by the handlers and not
    taken by the loop (a lost wake-up) withhold the beat, so that /healthz says stalled."""
    outbox = MemoryOutbox()
    beats: list[float] = []
    runtime = AmqpRuntime(
        vhost_url, FakePipeline(outbox), outbox, OPTIONS, beat=lambda: beats.append(1)
    )
    waited = [0.0]
    runtime._outcomes.waiting_seconds = lambda: waited[0]  # type: ignore[method-assign]
    running = Running(runtime).start()
    try:
        wait_until(lambda: len(beats) >= 1, "a first beat")
        waited[0] = 6.0  # past MAILBOX_STUCK_SECONDS
        time.sleep(1.2)  # a heartbeat turn sees it
        stalled_at = len(beats)
        time.sleep(2.2)
        assert len(beats) == stalled_at, "beat while outcomes waited unread"
        waited[0] = 0.0
        wait_until(lambda: len(beats) > stalled_at, "the beat back once they move")
    finally:
        assert running.stop() == ExitCode.OK
