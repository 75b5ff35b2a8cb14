"""A channel whose publishes the broker only nacks is given up after STUCK_NACK_SECONDS
(the worker then opens a new channel, on the next node): one quorum-queue stall seen in the
cluster scenario lasted minutes on the old channel."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pika
import pika.exceptions

from worker.amqp.deliveries import Deliveries
from worker.amqp.options import RuntimeOptions, RuntimeStats
from worker.amqp.publisher import STUCK_NACK_SECONDS, ConfirmingPublisher, PublishResult


class _Channel:
    """What ConfirmingPublisher calls on a pika channel (the broker's frames are fed in)."""

    is_open = True

    def add_on_return_callback(self, _callback: Any) -> None:
        pass

    def confirm_delivery(self, _on_confirm: Any, callback: Any) -> None:
        callback(None)

    def basic_publish(self, *_args: Any, **_kwargs: Any) -> None:
        pass


class _Frame:
    def __init__(self, method: Any) -> None:
        self.method = method


def _publisher(now: list[float], stuck: list[int]) -> tuple[ConfirmingPublisher, list[Any]]:
    results: list[Any] = []
    publisher = ConfirmingPublisher(
        _Channel(), lambda: None, on_stuck=lambda: stuck.append(1), clock=lambda: now[0]
    )
    return publisher, results


def _publish(publisher: ConfirmingPublisher, results: list[Any]) -> None:
    publisher.publish(
        "x", "k", b"{}", pika.BasicProperties(message_id="m"), mandatory=True,
        on_result=results.append,
    )  # fmt: skip


def test_nacks_for_the_whole_stuck_time_give_the_channel_up_once() -> None:
    now, stuck = [100.0], []
    publisher, results = _publisher(now, stuck)
    for tag in range(1, 40):
        _publish(publisher, results)
        publisher._on_confirm(_Frame(pika.spec.Basic.Nack(delivery_tag=tag)))
        now[0] += 1.0
    assert results and set(results) == {PublishResult.NACKED}
    assert stuck == [1]  # once, after STUCK_NACK_SECONDS of nothing but nacks
    assert STUCK_NACK_SECONDS < 39


def test_an_ack_between_the_nacks_keeps_the_channel() -> None:
    now, stuck = [100.0], []
    publisher, results = _publisher(now, stuck)
    for tag in range(1, 60):
        _publish(publisher, results)
        frame = pika.spec.Basic.Ack if tag % 10 == 0 else pika.spec.Basic.Nack
        publisher._on_confirm(_Frame(frame(delivery_tag=tag)))
        now[0] += 1.0
    assert PublishResult.NACKED in results and PublishResult.CONFIRMED in results
    assert stuck == []  # the broker takes some: not stuck


class _ClosingChannel(_Channel):
    """A channel that ``on_stuck`` (or the broker) began to close: pika refuses publishes."""

    is_open = False

    def basic_publish(self, *_args: Any, **_kwargs: Any) -> None:
        raise pika.exceptions.ChannelWrongStateError("Channel is closing.")


def test_a_publish_on_a_closing_channel_is_lost_not_raised() -> None:
    """Seen in the cluster scenario: an outcome published after on_stuck closed the channel
    raised ChannelWrongStateError on the IO thread, and the worker exited."""
    results: list[Any] = []
    publisher = ConfirmingPublisher(_ClosingChannel(), lambda: None)
    _publish(publisher, results)
    assert results == [PublishResult.LOST]
    assert publisher.in_flight == 0


def test_a_publish_pika_refuses_is_lost_not_raised() -> None:
    """The channel still says open, but its connection is closing."""

    class Refusing(_Channel):
        def basic_publish(self, *_args: Any, **_kwargs: Any) -> None:
            raise pika.exceptions.ConnectionWrongStateError("Connection is closing.")

    results: list[Any] = []
    publisher = ConfirmingPublisher(Refusing(), lambda: None)
    _publish(publisher, results)
    assert results == [PublishResult.LOST] and publisher.in_flight == 0


def test_a_requeue_on_a_closing_channel_is_left_to_the_redelivery() -> None:
    """The same window for a nack: the delivery is redelivered once the channel is closed."""

    class Closing(_ClosingChannel):
        def basic_nack(self, *_args: Any, **_kwargs: Any) -> None:
            raise pika.exceptions.ChannelWrongStateError("Channel is closing.")

    channel = Closing()
    stats = RuntimeStats()
    deliveries = Deliveries(
        SimpleNamespace(call_later=lambda *_a: None),  # type: ignore[arg-type]
        RuntimeOptions(prefetch=1),
        stats,
        stopping=lambda: False,
        on_settled=lambda: None,
    )
    deliveries.attach(channel, ConfirmingPublisher(channel, lambda: None))
    method = SimpleNamespace(delivery_tag=1, redelivered=False, routing_key="execution.requests")
    item = deliveries.receive(channel, method, pika.BasicProperties(), b"{}")
    assert item is not None
    deliveries.settle(item, ack=False)
    assert stats.requeued == 1 and len(deliveries) == 0
