"""Browsing ``execution.requests.dead`` without losing a message, and acting on what is held.

RabbitMQ has no browse operation (AMQP 0-9-1 ``basic.get`` takes a message off the queue).
A :class:`DeadQueue` session therefore *holds* what it reads: on ONE channel it
``basic.get``\\ s with manual acknowledgement until the queue answers empty (or ``limit``
messages are held); a held message is unacknowledged, so the same pass never gets it twice
and no other consumer gets it meanwhile. Acting on a message acks it (after its replay was
confirmed by the broker); everything else goes back with one ``basic.nack(multiple,
requeue)`` when the session ends, and if the tool dies first the broker requeues them when
the channel closes. Nothing is ever lost; the cost is that a message is invisible to others
while a listing holds it (seconds), and that each listing counts as one more delivery in
the quorum queue's ``x-delivery-count`` (the dead queue has no delivery limit of its own;
on RabbitMQ 4.x, whose quorum queues default to a limit of 20, set a policy with
``delivery-limit: -1`` on it: docs/OPERATIONS.md). The alternative, consume-and-hold with
a prefetch, gives the same guarantees with more machinery; ``basic.get`` in a loop is
simpler and a dead-letter queue is small.

IDs: the message's ``message_id`` when it has one (an RPM approval's key, usually), else
``h-`` and 16 hex digits of a SHA-256 over the body and the properties that never change
(not the broker's ``x-*`` headers, which change on every return).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions

from worker.amqp.nodes import connection_parameters
from worker.amqp.publisher import PERSISTENT
from worker.amqp.topology import DEAD_QUEUE, REQUESTS_QUEUE
from worker.errors import WorkerError
from worker.observability.logs import redact

REASON_HEADER = "x-rejection-reason"  # set by the worker (worker/amqp/deliveries.py)
DETAILS_HEADER = "x-rejection-details"
DEAD_LETTERED_AT_HEADER = "x-dead-lettered-at"  # set by the worker, like the reason
REPLAYED_HEADER = "x-replayed-from"
REPLAY_ACTION_HEADER = "x-replay-action"
# headers the broker or the worker added on dead-lettering: not sent again on a replay
_DEAD_HEADER_PREFIXES = (
    "x-death",
    "x-first-death-",
    "x-last-death-",
    "x-rejection-",
    DEAD_LETTERED_AT_HEADER,
)
_DEAD_HEADERS = frozenset({"x-delivery-count", REPLAYED_HEADER, REPLAY_ACTION_HEADER})
PREVIEW_CHARS = 400
MAX_KEY_BODY_BYTES = 1_000_000
SECRET_KEYS = ("password", "passwd", "pwd", "secret", "token", "api_key", "apikey", "credential")
MASK = "***"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _stable_properties(props: Any) -> dict[str, Any]:
    headers = props.headers if isinstance(props.headers, dict) else {}
    return {
        "content_type": props.content_type,
        "correlation_id": props.correlation_id,
        "reply_to": props.reply_to,
        "timestamp": props.timestamp,
        "type": props.type,
        "app_id": props.app_id,
        "headers": {
            str(k): _text(v) for k, v in sorted(headers.items()) if not str(k).startswith("x-")
        },
    }


def dead_letter_id(body: bytes, props: Any) -> str:
    """The message_id, else a stable hash of the body and the unchanging properties."""
    if props.message_id:
        return str(props.message_id)
    digest = hashlib.sha256(body)
    digest.update(json.dumps(_stable_properties(props), sort_keys=True, default=str).encode())
    return "h-" + digest.hexdigest()[:16]


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: MASK
            if any(secret in str(key).lower() for secret in SECRET_KEYS)
            else _masked(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value


def _document(body: bytes) -> Any:
    if len(body) > MAX_KEY_BODY_BYTES:
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def preview(body: bytes, chars: int = PREVIEW_CHARS) -> str:
    """The body as one line, secrets masked (JSON keys that name one, and everything
    ``redact`` knows), at most ``chars`` characters."""
    document = _document(body)
    if document is not None:
        text = json.dumps(_masked(document), separators=(",", ":"), ensure_ascii=False)
    else:
        text = body[: chars * 4].decode("utf-8", "replace")
    text = redact(" ".join(text.split()))
    return text if len(text) <= chars else text[: chars - 1] + "…"


def key_of(body: bytes, props: Any) -> str | None:
    """The idempotency key as the worker derives it: decision.order_id, else message_id."""
    document = _document(body)
    if isinstance(document, dict):
        decision = document.get("decision", document)
        if isinstance(decision, dict):
            order_id = decision.get("order_id")
            if isinstance(order_id, str) and order_id.strip():
                return order_id
    return _text(props.message_id)


@dataclass(frozen=True)
class DeadLetter:
    id: str
    tag: int
    body: bytes
    properties: Any  # pika.BasicProperties
    routing_key: str

    @property
    def headers(self) -> dict[str, Any]:
        headers = self.properties.headers
        return headers if isinstance(headers, dict) else {}

    def _first_death(self) -> dict[str, Any]:
        deaths = self.headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[-1], dict):
            first: dict[str, Any] = deaths[-1]  # the newest entry comes first
            return first
        return {}

    @property
    def reason(self) -> str:
        """The worker's rejection reason, else the broker's (delivery_limit, expired, ...)."""
        worker = _text(self.headers.get(REASON_HEADER))
        if worker:
            return worker
        broker = _text(self.headers.get("x-first-death-reason")) or _text(
            self._first_death().get("reason")
        )
        return broker or "unknown"

    @property
    def details(self) -> str:
        worker = _text(self.headers.get(DETAILS_HEADER))
        if worker:
            return redact(worker)
        death = self._first_death()
        if death:
            return (
                f"dead-lettered by the broker from {_text(death.get('queue'))}"
                f" ({_text(death.get('reason'))}, {death.get('count', 1)} time(s))"
            )
        return "-"

    def _worker_dead_lettered_at(self) -> datetime | None:
        text = _text(self.headers.get(DEAD_LETTERED_AT_HEADER))
        if not text:
            return None
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            return None
        return at if at.tzinfo else at.replace(tzinfo=UTC)

    @property
    def first_seen(self) -> datetime | None:
        """When the broker (x-death) or the worker (x-dead-lettered-at) dead-lettered it,
        else when it was published."""
        at = self._first_death().get("time")
        if isinstance(at, datetime):
            return at if at.tzinfo else at.replace(tzinfo=UTC)
        worker = self._worker_dead_lettered_at()
        if worker is not None:
            return worker
        stamp = self.properties.timestamp
        return datetime.fromtimestamp(stamp, UTC) if isinstance(stamp, int) else None

    @property
    def first_seen_source(self) -> str:
        if isinstance(self._first_death().get("time"), datetime):
            return "dead-lettered"
        if self._worker_dead_lettered_at() is not None:
            return "dead-lettered"
        return "published" if isinstance(self.properties.timestamp, int) else "-"

    @property
    def delivery_count(self) -> int:
        """Deliveries from the dead queue so far (each listing is one)."""
        value = self.headers.get("x-delivery-count")
        return int(value) if isinstance(value, int) else 0

    @property
    def key(self) -> str | None:
        return key_of(self.body, self.properties)

    def preview(self, chars: int = PREVIEW_CHARS) -> str:
        return preview(self.body, chars)

    def body_sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    def summary(self, chars: int = PREVIEW_CHARS) -> dict[str, Any]:
        first_seen = self.first_seen
        return {
            "id": self.id,
            "reason": self.reason,
            "details": self.details,
            "first_seen": first_seen.isoformat() if first_seen else None,
            "first_seen_source": self.first_seen_source,
            "delivery_count": self.delivery_count,
            "key": redact(self.key) if self.key else None,
            "message_id": _text(self.properties.message_id),
            "correlation_id": _text(self.properties.correlation_id),
            "reply_to": _text(self.properties.reply_to),
            "routing_key": self.routing_key,
            "body_bytes": len(self.body),
            "body_sha256": self.body_sha256(),
            "preview": self.preview(chars),
        }

    def replay_properties(self, action_id: int | None) -> pika.BasicProperties:
        """The original properties (same message_id), without what dead-lettering added."""
        headers = {
            key: value
            for key, value in self.headers.items()
            if key not in _DEAD_HEADERS and not key.startswith(_DEAD_HEADER_PREFIXES)
        }
        headers[REPLAYED_HEADER] = DEAD_QUEUE
        if action_id is not None:
            headers[REPLAY_ACTION_HEADER] = action_id
        p = self.properties
        return pika.BasicProperties(
            content_type=p.content_type,
            content_encoding=p.content_encoding,
            headers=headers,
            delivery_mode=PERSISTENT,
            priority=p.priority,
            correlation_id=p.correlation_id,
            reply_to=p.reply_to,
            message_id=p.message_id,
            timestamp=p.timestamp,
            type=p.type,
            app_id=p.app_id,
        )


class ReplayRefused(WorkerError):
    """The broker did not confirm the republished message (returned or nacked)."""


class DeadQueue:
    """One browsing session (see the module docstring): hold, act, return the rest."""

    def __init__(self, connection: pika.BlockingConnection, limit: int) -> None:
        self._connection = connection
        self._browse = connection.channel()
        self._publish: Any = None
        self.held: list[DeadLetter] = []
        self._hold(limit)

    def _hold(self, limit: int) -> None:
        while len(self.held) < limit:
            method, props, body = self._browse.basic_get(DEAD_QUEUE, auto_ack=False)
            if method is None:
                break
            self.held.append(
                DeadLetter(
                    dead_letter_id(body, props),
                    method.delivery_tag,
                    body,
                    props,
                    method.routing_key,
                )
            )

    def find(self, dead_id: str) -> list[DeadLetter]:
        return [item for item in self.held if item.id == dead_id]

    def replay(self, item: DeadLetter, action_id: int | None) -> None:
        """Republish to execution.requests, confirmed and routed, then remove it here."""
        if self._publish is None:
            self._publish = self._connection.channel()
            self._publish.confirm_delivery()
        try:
            self._publish.basic_publish(
                "",
                REQUESTS_QUEUE,
                item.body,
                item.replay_properties(action_id),
                mandatory=True,
            )
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            raise ReplayRefused(f"the broker refused the replay: {type(exc).__name__}") from None
        self._browse.basic_ack(item.tag)

    def purge(self, item: DeadLetter) -> None:
        self._browse.basic_ack(item.tag)

    def release(self) -> None:
        """Every message not acted on goes back to the queue."""
        if self._browse.is_open:
            self._browse.basic_nack(delivery_tag=0, multiple=True, requeue=True)
            self._browse.close()
        if self._publish is not None and self._publish.is_open:
            self._publish.close()


@contextmanager
def dead_queue(url: str, limit: int) -> Iterator[DeadQueue]:
    """A browsing session; the held messages go back when it ends, whatever happens."""
    parameters = connection_parameters(url, shuffle=True)  # a cluster's nodes, in turn
    for one in parameters:
        one.connection_attempts = 1
        one.blocked_connection_timeout = 30
    connection = pika.BlockingConnection(parameters)
    try:
        queue = DeadQueue(connection, limit)
        try:
            yield queue
        finally:
            queue.release()
    finally:
        if connection.is_open:
            connection.close()
