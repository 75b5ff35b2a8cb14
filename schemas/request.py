"""AMQP body + properties -> a validated ``ExecutionRequest``, or a typed ``InvalidMessage``.

Nothing here raises anything but ``InvalidMessage``: every malformed input becomes an error
naming the field and what is wrong with it, and carries the idempotency key when one could be
read, so that the caller can answer with a REJECTED confirmation instead of a dead letter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, ValidationError

from schemas.enums import DecisionStatus
from schemas.identity import comment_token_for, execution_id_for
from schemas.rpm import MAX_ORDER_ID_LENGTH, ApprovedTrade, RPMOutput, TradeDecision, as_utc

DEFAULT_MAX_BODY_BYTES = 1_048_576
JSON_CONTENT_TYPES = frozenset({"application/json", "text/json", "application/x-json"})
UTF8_ENCODINGS = frozenset({"utf-8", "utf8", "identity"})
MAX_ERROR_DETAIL = 500


@dataclass(frozen=True)
class MessageProperties:
    """The AMQP properties the worker reads (independent of the client library)."""

    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)


class InvalidMessage(Exception):
    """A message that cannot be executed. ``idempotency_key`` is set when it could be read."""

    def __init__(
        self,
        code: str,
        field_name: str,
        detail: str,
        *,
        idempotency_key: str | None = None,
        rpm_order_id: str | None = None,
        symbol: str | None = None,
    ) -> None:
        self.code = code
        self.field = field_name
        self.detail = detail[:MAX_ERROR_DETAIL]
        self.idempotency_key = idempotency_key
        self.rpm_order_id = rpm_order_id
        self.symbol = symbol
        super().__init__(f"{code}: {field_name}: {self.detail}")

    @property
    def execution_id(self) -> UUID | None:
        if self.idempotency_key is None:
            return None
        return execution_id_for(self.idempotency_key)


class ExecutionRequest(BaseModel):
    """One approval (or refusal) from the RPM, ready for the pipeline."""

    model_config = ConfigDict(frozen=True)

    execution_id: UUID
    idempotency_key: str
    rpm_order_id: str | None
    shape: Literal["rpm_output", "decision"]
    status: DecisionStatus
    trade: ApprovedTrade | None
    kill_switch: bool
    kill_switch_reason: str | None
    trading_halted: bool
    halt_reason: str | None
    decided_at: datetime
    received_at: datetime
    reply_to: str | None
    correlation_id: str | None
    message_id: str | None

    @property
    def comment_token(self) -> str:
        return comment_token_for(self.execution_id)

    @property
    def symbol(self) -> str | None:
        return self.trade.symbol if self.trade is not None else None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _decode_json(body: bytes, props: MessageProperties) -> Any:
    if props.content_type and props.content_type.split(";")[0].strip().lower() not in (
        JSON_CONTENT_TYPES
    ):
        raise InvalidMessage("unsupported_content_type", "content_type", props.content_type)
    if props.content_encoding and props.content_encoding.lower() not in UTF8_ENCODINGS:
        raise InvalidMessage("unsupported_encoding", "content_encoding", props.content_encoding)
    if not body:
        raise InvalidMessage("empty_body", "body", "the message body is empty")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage("not_utf8", "body", f"not UTF-8 at byte {exc.start}") from None
    try:
        return json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys
        )
    except RecursionError:
        raise InvalidMessage("too_deep", "body", "JSON nesting is too deep") from None
    except ValueError as exc:
        raise InvalidMessage("not_json", "body", str(exc)) from None


def _decision_of(document: Any) -> tuple[Literal["rpm_output", "decision"], Any]:
    if not isinstance(document, dict):
        raise InvalidMessage(
            "not_an_object", "body", f"expected a JSON object, got {type(document).__name__}"
        )
    if "decision" in document:
        return "rpm_output", document["decision"]
    if "status" in document:
        return "decision", document
    raise InvalidMessage(
        "unknown_shape", "body", "neither an RPMOutput ('decision') nor a TradeDecision ('status')"
    )


def _order_id_of(decision: Any) -> str | None:
    if not isinstance(decision, dict):
        return None
    order_id = decision.get("order_id")
    if isinstance(order_id, str) and order_id.strip() and len(order_id) <= MAX_ORDER_ID_LENGTH:
        return order_id
    return None


def _symbol_of(decision: Any) -> str | None:
    if isinstance(decision, dict):
        trade = decision.get("approved_trade")
        if isinstance(trade, dict) and isinstance(trade.get("symbol"), str):
            symbol: str = trade["symbol"]
            return symbol[:32]
    return None


def _describe(error: ValidationError, prefix: str) -> tuple[str, str]:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    path = f"{prefix}.{location}" if prefix and location else (prefix or location or "body")
    return path, first["msg"]


def _valid_message_id(props: MessageProperties) -> str | None:
    mid = props.message_id
    if mid is not None and mid.strip() and len(mid) <= MAX_ORDER_ID_LENGTH:
        return mid
    return None


def parse_request(
    body: bytes,
    props: MessageProperties,
    *,
    received_at: datetime,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> ExecutionRequest:
    """Validate one delivery. Raises ``InvalidMessage`` (and nothing else) on bad input."""
    if len(body) > max_body_bytes:
        raise InvalidMessage(
            "body_too_large",
            "body",
            f"{len(body)} bytes exceeds the limit of {max_body_bytes}",
            idempotency_key=_valid_message_id(props),
        )
    try:
        document = _decode_json(body, props)
    except InvalidMessage as exc:
        exc.idempotency_key = _valid_message_id(props)
        raise
    shape, raw_decision = _decision_of_or_keyless(document, props)
    order_id = _order_id_of(raw_decision)
    key = order_id or _valid_message_id(props)
    symbol = _symbol_of(raw_decision)
    context: dict[str, Any] = {"idempotency_key": key, "rpm_order_id": order_id, "symbol": symbol}
    if key is None:
        raise InvalidMessage(
            "missing_idempotency_key",
            "decision.order_id",
            "neither decision.order_id nor the AMQP message_id is set",
        )
    try:
        if shape == "rpm_output":
            output = RPMOutput.model_validate(document)
            decision = output.decision
            halted = bool(output.portfolio_state and output.portfolio_state.trading_halted)
            halt_reason = output.portfolio_state.halt_reason if output.portfolio_state else None
            outer_time = output.timestamp
        else:
            decision = TradeDecision.model_validate(document)
            halted, halt_reason, outer_time = False, None, None
    except ValidationError as exc:
        path, message = _describe(exc, "" if shape == "rpm_output" else "decision")
        raise InvalidMessage("invalid_field", path, message, **context) from None

    trade = decision.approved_trade
    if decision.status in (DecisionStatus.APPROVED, DecisionStatus.ADJUSTED) and trade is None:
        raise InvalidMessage(
            "missing_field",
            "decision.approved_trade",
            f"status {decision.status.value} requires an approved_trade",
            **context,
        )
    decided_at = (trade.timestamp if trade else None) or decision.timestamp or outer_time
    if decided_at is None:
        raise InvalidMessage(
            "missing_field",
            "decision.approved_trade.timestamp",
            "no decision timestamp: the approval's age cannot be checked",
            **context,
        )
    return ExecutionRequest(
        execution_id=execution_id_for(key),
        idempotency_key=key,
        rpm_order_id=order_id,
        shape=shape,
        status=decision.status,
        trade=trade,
        kill_switch=decision.kill_switch_triggered,
        kill_switch_reason=decision.kill_switch_reason,
        trading_halted=halted,
        halt_reason=halt_reason,
        decided_at=decided_at,
        received_at=as_utc(received_at),
        reply_to=props.reply_to or None,
        correlation_id=props.correlation_id or order_id,
        message_id=props.message_id,
    )


def _decision_of_or_keyless(
    document: Any, props: MessageProperties
) -> tuple[Literal["rpm_output", "decision"], Any]:
    try:
        return _decision_of(document)
    except InvalidMessage as exc:
        exc.idempotency_key = _valid_message_id(props)
        raise
