"""AMQP body + properties -> a validated ``ExecutionRequest``, or a typed ``InvalidMessage``.

Nothing here raises anything but ``InvalidMessage``: every malformed input becomes an error
naming the field and what is wrong with it, and carries the idempotency key when one could be
read, so that the caller can answer with a REJECTED confirmation instead of a dead letter.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, ValidationError

from schemas.enums import DecisionStatus
from schemas.identity import comment_token_for, execution_id_for
from schemas.rpm import MAX_ORDER_ID_LENGTH, ApprovedTrade, RPMOutput, TradeDecision, as_utc

DEFAULT_MAX_BODY_BYTES = 1_048_576
# Structure bounds checked by a linear pre-scan BEFORE json.loads (see _check_structure). An
# RPM message is ~4 levels deep with ~100 values; these leave wide room for extra fields.
DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_ELEMENTS = 50_000
DEFAULT_PARSE_TIMEOUT_SECONDS = 1.0
# How far ahead of this machine's clock a decision timestamp may be (clock skew between the
# RPM's host and ours). Further ahead is an invalid field: a future stamp would stretch the
# approval's time-to-live by the same amount.
MAX_FUTURE_SKEW_SECONDS = 5.0
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
    account: str | None = None  # ``decision.account``: where the approval is to be executed

    @property
    def comment_token(self) -> str:
        return comment_token_for(self.execution_id)

    @property
    def symbol(self) -> str | None:
        return self.trade.symbol if self.trade is not None else None


# A JSON string (closing quote optional, so an unterminated one ends the scan in one pass;
# possessive quantifiers: no backtracking, linear in the body; "unrolled": runs of plain
# characters between escapes, which matches the same spans as an alternation, faster).
_JSON_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def _check_structure(text: str, max_depth: int, max_elements: int) -> None:
    """Bound nesting depth and value count in linear time, before ``json.loads`` runs.

    ``json.loads`` recurses per nesting level and allocates per value; the size limit alone
    lets 1 MB of ``[[[[`` or of ``0,0,0,`` through. Strings are blanked first (brackets in
    them do not count), then separators and brackets are counted with ``str.count`` (C
    speed); the depth loop stops after ``2 * max_elements`` brackets, and is skipped when
    there are no more opening brackets than ``max_depth`` (they cannot nest deeper).

    Without a backslash (no escapes) a string runs from a quote to the next one, or to the
    end: the text outside strings is every other piece between quotes, which is cheaper to
    count than to rebuild (taken only when it cannot be deep, and with a bounded number of
    pieces).
    """
    if "\\" not in text and text.count('"') <= 4 * max_elements:
        outside = "".join(text.split('"')[0::2])
        opened = outside.count("[") + outside.count("{")
        if opened <= max_depth:
            if opened + outside.count(",") + outside.count(":") > max_elements:
                raise InvalidMessage(
                    "too_many_elements", "body", f"more than {max_elements} JSON values and keys"
                )
            return
    skeleton = _JSON_STRING.sub('""', text)
    opened = skeleton.count("[") + skeleton.count("{")
    depth = deepest = 0
    for seen, bracket in enumerate(_BRACKETS.finditer(skeleton) if opened > max_depth else ()):
        if seen >= 2 * max_elements:
            break  # more brackets than that fail the element bound below
        depth += 1 if bracket.group() in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > max_depth:
                raise InvalidMessage(
                    "too_deep", "body", f"JSON nesting deeper than {max_depth} levels"
                )
    elements = opened + skeleton.count(",") + skeleton.count(":")
    if elements > max_elements:
        raise InvalidMessage(
            "too_many_elements", "body", f"more than {max_elements} JSON values and keys"
        )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = dict(pairs)
    if len(result) == len(pairs):
        return result
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


class _Decoders(threading.local):
    """One decoder per thread (``json.loads`` with hooks builds a new one per call)."""

    def __init__(self) -> None:
        self.decoder = json.JSONDecoder(
            parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys
        )


_decoders = _Decoders()


@dataclass(frozen=True)
class ParseLimits:
    """Bounds on the work one message may cost; all checked before or around ``json.loads``."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_depth: int = DEFAULT_MAX_DEPTH
    max_elements: int = DEFAULT_MAX_ELEMENTS
    timeout_seconds: float = DEFAULT_PARSE_TIMEOUT_SECONDS
    max_future_skew_seconds: float = MAX_FUTURE_SKEW_SECONDS


class _Budget:
    """The parse-time budget: checked between stages (C code such as ``json.loads`` cannot be
    interrupted; the structure bounds are what keep each stage short)."""

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._seconds = seconds
        self._deadline = clock() + seconds

    def check(self, stage: str, **context: Any) -> None:
        if self._clock() > self._deadline:
            raise InvalidMessage(
                "parse_timeout",
                "body",
                f"{stage} exceeded the {self._seconds:g} s parse budget",
                **context,
            )


def _decode_json(body: bytes, props: MessageProperties, limits: ParseLimits) -> Any:
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
    _check_structure(text, limits.max_depth, limits.max_elements)
    try:
        if text.startswith("\ufeff"):  # what json.loads refuses before decoding
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        document = _decoders.decoder.decode(text)
    except RecursionError:
        raise InvalidMessage("too_deep", "body", "JSON nesting is too deep") from None
    except ValueError as exc:
        raise InvalidMessage("not_json", "body", str(exc)) from None
    return document


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
    if (
        isinstance(order_id, str)
        and order_id.strip()
        and len(order_id) <= MAX_ORDER_ID_LENGTH
        and "\x00" not in order_id
    ):
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
    if (
        isinstance(mid, str)
        and mid.strip()
        and len(mid) <= MAX_ORDER_ID_LENGTH
        and "\x00" not in mid
    ):
        return mid
    return None


def parse_request(
    body: bytes,
    props: MessageProperties,
    *,
    received_at: datetime,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    parse_timeout_seconds: float = DEFAULT_PARSE_TIMEOUT_SECONDS,
    limits: ParseLimits | None = None,
    now: datetime | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ExecutionRequest:
    """Validate one delivery. Raises ``InvalidMessage`` (and nothing else) on bad input.

    ``limits`` overrides ``max_body_bytes`` / ``parse_timeout_seconds`` when given. ``now``
    (default: this machine's clock) is the reference for refusing decision timestamps more
    than ``limits.max_future_skew_seconds`` in the future.
    """
    if limits is None:
        limits = ParseLimits(max_body_bytes=max_body_bytes, timeout_seconds=parse_timeout_seconds)
    try:
        return _parse(body, props, received_at, limits, now, _Budget(limits.timeout_seconds, clock))
    except InvalidMessage:
        raise
    except Exception as exc:  # a safety net: a parser bug must not crash or loop the worker
        raise InvalidMessage(
            "unparseable",
            "body",
            f"{type(exc).__name__} while parsing",
            idempotency_key=_valid_message_id(props),
        ) from None


def _parse(
    body: bytes,
    props: MessageProperties,
    received_at: datetime,
    limits: ParseLimits,
    now: datetime | None,
    budget: _Budget,
) -> ExecutionRequest:
    if len(body) > limits.max_body_bytes:
        raise InvalidMessage(
            "body_too_large",
            "body",
            f"{len(body)} bytes exceeds the limit of {limits.max_body_bytes}",
            idempotency_key=_valid_message_id(props),
        )
    try:
        document = _decode_json(body, props, limits)
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
    if b"\\u0000" in body:  # PostgreSQL text cannot hold NUL: refused, with the key known
        raise InvalidMessage("nul_character", "body", "a string contains \\u0000", **context)
    # The key is known before any budget applies: a parse that overruns is refused under the
    # same key as every other outcome of this approval, never under a second one.
    budget.check("JSON decoding", **context)
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
    except (ArithmeticError, ValueError, TypeError) as exc:
        # e.g. a timestamp at year 9999 with a negative offset overflows its UTC conversion
        raise InvalidMessage(
            "invalid_field", "body", f"{type(exc).__name__}: {exc}", **context
        ) from None
    budget.check("validation", **context)

    trade = decision.approved_trade
    if decision.status in (DecisionStatus.APPROVED, DecisionStatus.ADJUSTED) and trade is None:
        raise InvalidMessage(
            "missing_field",
            "decision.approved_trade",
            f"status {decision.status.value} requires an approved_trade",
            **context,
        )
    stamped = (
        ("decision.approved_trade.timestamp", trade.timestamp if trade else None),
        ("decision.timestamp", decision.timestamp),
        ("timestamp", outer_time),
    )
    found = [(path, value) for path, value in stamped if value is not None]
    if not found:
        raise InvalidMessage(
            "missing_field",
            "decision.approved_trade.timestamp",
            "no decision timestamp: the approval's age cannot be checked",
            **context,
        )
    decided_path, decided_at = found[0]
    reference = as_utc(now) if now is not None else datetime.now(UTC)
    ahead = decided_at - reference
    if ahead > timedelta(seconds=limits.max_future_skew_seconds):
        raise InvalidMessage(
            "future_timestamp",
            decided_path,
            f"{ahead.total_seconds():.1f} s in the future (allowed clock skew "
            f"{limits.max_future_skew_seconds:g} s)",
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
        account=decision.account,
    )


def _decision_of_or_keyless(
    document: Any, props: MessageProperties
) -> tuple[Literal["rpm_output", "decision"], Any]:
    try:
        return _decision_of(document)
    except InvalidMessage as exc:
        exc.idempotency_key = _valid_message_id(props)
        raise
