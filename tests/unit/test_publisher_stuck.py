"""A channel whose publishes the broker only nacks is given up after STUCK_NACK_SECONDS
(the worker then opens a new channel, on the next node): one quorum-queue stall seen in the
cluster scenario lasted minutes on the old channel."""

from __future__ import annotations

from typing import Any

import pika

from worker.amqp.publisher import STUCK_NACK_SECONDS, ConfirmingPublisher, PublishResult


class _Channel:
    """What ConfirmingPublisher calls on a pika channel (the broker's frames are fed in)."""

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
