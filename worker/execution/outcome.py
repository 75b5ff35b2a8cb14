"""What passes between the AMQP runtime and the pipeline.

The runtime turns a RabbitMQ delivery into a :class:`Delivery`, hands it to a handler on a
worker thread, and carries out the :class:`Outcome` it gets back:

- :class:`Publish`: publish the confirmation (publisher confirms, mandatory, persistent) to
  ``execution.confirmations`` and to ``reply_to`` if set, mark the outbox row published, then
  ack the request. The confirmation is already committed in the outbox.
- :class:`DeadLetter`: publish the original body to ``execution.requests.dlx`` with
  ``x-rejection-reason`` / ``x-rejection-details`` headers (confirmed), then ack.
- :class:`Requeue`: nack with requeue; no work was done (no session, database down, draining).
  With ``to_back`` (a claim that timed out waiting for its account's sessions, with several
  accounts): published again at the back of ``execution.requests`` (confirmed), then acked,
  so the approvals queued behind it, for other accounts, are delivered first.

- :class:`Settling`: the broker took the order but its fills do not show yet, or its outcome
  is unknown: the execution waits on the settler, off its terminal session. The delivery is
  kept unacked (parked on the execution id) and acked once a confirmation of that execution
  is confirmed, which the settler publishes as soon as it commits it.

Confirmations committed but never confirmed (a crash between commit and publish) are found in
the :class:`Outbox` and published again; all copies are byte-identical with the same
``message_id``, so consumers deduplicate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from uuid import UUID

from schemas.request import MessageProperties

CONFIRMATION_SCHEMA_HEADER = "execution.confirmation.v1"


@dataclass(frozen=True)
class Delivery:
    body: bytes
    properties: MessageProperties
    redelivered: bool
    delivery_count: int | None
    received_at: datetime


@dataclass(frozen=True)
class Publish:
    execution_id: UUID
    routing_key: str
    payload: bytes
    correlation_id: str | None
    reply_to: str | None
    version: int = 1  # of the confirmation: a correction replaces the outbox row


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    details: str


@dataclass(frozen=True)
class Requeue:
    reason: str
    to_back: bool = False


@dataclass(frozen=True)
class Settling:
    execution_id: UUID


Outcome = Publish | DeadLetter | Requeue | Settling
Handler = Callable[[Delivery], Outcome]


class Outbox(Protocol):
    """Committed confirmations not yet confirmed by the broker (the transactional outbox)."""

    def unpublished(self, limit: int) -> list[Publish]: ...

    def mark_published(self, execution_ids: Sequence[UUID | tuple[UUID, int]]) -> None:
        """``(execution_id, version)``: that version; a bare id: every version of it."""
