"""The Risk & Portfolio Manager's output, as it arrives on ``execution.requests``.

Only the fields the worker reads are typed; every other field is kept (``extra="allow"``)
so that nothing the RPM adds later is rejected or lost from the audit trail.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from schemas.enums import DecisionStatus

SYMBOL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._#+\-]{0,31}$"
MAX_ORDER_ID_LENGTH = 128


def as_utc(value: datetime) -> datetime:
    """Naive timestamps are UTC (the RPM writes ``datetime.utcnow().isoformat()``)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-05:00
        raise ValueError("timestamp is out of range") from None


UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


class _RpmModel(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, frozen=True)


class ApprovedTrade(_RpmModel):
    """A trade the RPM approved (possibly with an adjusted size)."""

    symbol: str = Field(pattern=SYMBOL_PATTERN, description="canonical symbol, e.g. EURUSD")
    direction: int = Field(description="+1 buy, -1 sell")
    position_units: float = Field(gt=0, description="size in base-currency UNITS, not lots")
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

    @field_validator("position_units")
    @classmethod
    def _units_finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("position_units must be finite")
        return value


class RejectedTrade(_RpmModel):
    """A trade the RPM refused; never executed, kept for the record."""

    symbol: str | None = None
    direction: int | None = None
    rejection_reason: str | None = None


class TradeDecision(_RpmModel):
    """The RPM's ``decision`` object; some RPM builds publish it alone."""

    status: DecisionStatus
    approved_trade: ApprovedTrade | None = None
    rejected_trade: RejectedTrade | dict[str, Any] | None = None
    order_id: str | None = Field(default=None, max_length=MAX_ORDER_ID_LENGTH)
    kill_switch_triggered: bool = False
    kill_switch_reason: str | None = None
    portfolio_constraints_passed: bool | None = None
    processing_time_ms: float | None = None
    timestamp: UtcDatetime | None = None


class PortfolioState(_RpmModel):
    """The part of the RPM's portfolio state the worker reads."""

    trading_halted: bool = False
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
