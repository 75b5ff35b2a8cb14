"""The Risk & Portfolio Manager's output, as it arrives on ``execution.requests``.

Only the fields the worker reads are typed; every other field is kept (``extra="allow"``)
so that nothing the RPM adds later is rejected or lost from the audit trail.

Every field that can stop or make a trade (status, kill switch, halt, symbol, side, size) is
STRICT: anything but its exact JSON type refuses the message (``"kill_switch_triggered":
"false"`` or ``0`` is not a boolean, ``"direction": "1"`` or ``1.0`` is not a side). Fail
closed: a lax coercion could turn a hostile or broken flag into a live order.

Timestamps are ISO 8601 strings; the RPM writes naive UTC (``datetime.utcnow().isoformat()``),
so the offset is optional, and a naive stamp is read as UTC. The JSON Schema says exactly
that (a ``pattern``, not ``format: date-time``, which is RFC 3339 and requires an offset).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    field_validator,
)

from schemas.enums import DecisionStatus

SYMBOL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._#+\-]{0,31}$"
MAX_ORDER_ID_LENGTH = 128
# An account name: a session's ``account`` alias or ``"<server>:<login>"``
# (worker/mt5/sessions.py); printable, no control characters.
ACCOUNT_PATTERN = r"^[^\x00-\x1f\x7f]{1,128}$"
MAX_ACCOUNT_LENGTH = 128
# No real order is this large (1e15 units = 10 billion lots of EURUSD); beyond it the size is
# hostile, and the lot arithmetic's 28-digit decimals would overflow.
MAX_POSITION_UNITS = 1e15
# ISO 8601 date and time, optional fraction (up to microseconds), optional offset.
TIMESTAMP_PATTERN = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?"
    r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?$"
)
_TIMESTAMP = re.compile(TIMESTAMP_PATTERN)


def as_utc(value: datetime) -> datetime:
    """Naive timestamps are UTC (the RPM writes ``datetime.utcnow().isoformat()``)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-05:00
        raise ValueError("timestamp is out of range") from None


def _iso_timestamp_text(value: Any) -> Any:
    if isinstance(value, datetime):  # built in Python (a confirmation); JSON gives strings
        return value
    if not isinstance(value, str):
        raise ValueError("a timestamp must be an ISO 8601 string")
    if not _TIMESTAMP.fullmatch(value):
        raise ValueError("a timestamp must look like 2026-11-25T10:00:00.123456 (offset optional)")
    return value


UtcDatetime = Annotated[
    datetime,
    BeforeValidator(_iso_timestamp_text),
    AfterValidator(as_utc),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": TIMESTAMP_PATTERN,
            "description": "ISO 8601; no offset means UTC (the RPM writes naive UTC)",
        }
    ),
]


class _RpmModel(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, frozen=True)


class ApprovedTrade(_RpmModel):
    """A trade the RPM approved (possibly with an adjusted size)."""

    symbol: StrictStr = Field(pattern=SYMBOL_PATTERN, description="canonical symbol, e.g. EURUSD")
    direction: StrictInt = Field(description="+1 buy, -1 sell", json_schema_extra={"enum": [1, -1]})
    position_units: float = Field(
        strict=True,
        gt=0,
        le=MAX_POSITION_UNITS,
        description="size in base-currency UNITS, not lots",
    )
    timestamp: UtcDatetime | None = None
    confidence_score: float | None = None
    regime: str | None = None
    base_units: float | None = None
    atr: float | None = None
    risk_per_trade: float | None = None
    risk_override: bool | None = None
    rpm_version: str | None = None

    @field_validator("direction")
    @classmethod
    def _direction_is_a_side(cls, value: int) -> int:
        if value not in (1, -1):
            raise ValueError("direction must be +1 (buy) or -1 (sell)")
        return value


class RejectedTrade(_RpmModel):
    """A trade the RPM refused; never executed, kept for the record."""

    symbol: str | None = None
    direction: int | None = None
    rejection_reason: str | None = None


class TradeDecision(_RpmModel):
    """The RPM's ``decision`` object; some RPM builds publish it alone."""

    status: DecisionStatus = Field(strict=False)  # JSON gives strings; only the exact values pass
    approved_trade: ApprovedTrade | None = None
    rejected_trade: RejectedTrade | dict[str, Any] | None = None
    order_id: str | None = Field(default=None, max_length=MAX_ORDER_ID_LENGTH)
    kill_switch_triggered: StrictBool = False
    kill_switch_reason: str | None = None
    portfolio_constraints_passed: bool | None = None
    processing_time_ms: float | None = None
    timestamp: UtcDatetime | None = None
    account: StrictStr | None = Field(
        default=None,
        max_length=MAX_ACCOUNT_LENGTH,
        pattern=ACCOUNT_PATTERN,
        description="the broker account to execute on: a configured account alias or"
        " '<server>:<login>' (e.g. 'ICMarkets-Demo:5012345'); required when the worker has"
        " several accounts, optional with one",
    )


class PortfolioState(_RpmModel):
    """The part of the RPM's portfolio state the worker reads."""

    trading_halted: StrictBool = False
    halt_reason: str | None = None
    equity: float | None = None


class RPMOutput(_RpmModel):
    """``RPMOutput.to_dict()``: the full message shape."""

    decision: TradeDecision
    portfolio_state: PortfolioState | None = None
    risk_metrics: dict[str, Any] | None = None
    config_hash: str | None = None
    rpm_version: str | None = None
    timestamp: UtcDatetime | None = None
