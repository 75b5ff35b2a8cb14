"""Enumerations shared by the wire models."""

from __future__ import annotations

from enum import Enum, StrEnum


class DecisionStatus(StrEnum):
    """The RPM's verdict on a proposed trade."""

    APPROVED = "APPROVED"
    ADJUSTED = "ADJUSTED"
    REJECTED = "REJECTED"


class ExecutionStatus(StrEnum):
    """Final outcome of one approval, as reported in the confirmation."""

    FILLED = "FILLED"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"


class RejectionReason(StrEnum):
    """Why an approval did not become (or did not fully become) a fill."""

    NOT_APPROVED = "NOT_APPROVED"
    KILL_SWITCH = "KILL_SWITCH"
    TRADING_HALTED = "TRADING_HALTED"
    STALE_APPROVAL = "STALE_APPROVAL"
    INVALID_REQUEST = "INVALID_REQUEST"
    SYMBOL_NOT_TRADABLE = "SYMBOL_NOT_TRADABLE"
    MARKET_CLOSED = "MARKET_CLOSED"
    NO_MARKET_DATA = "NO_MARKET_DATA"
    STALE_TICK = "STALE_TICK"
    SPREAD_TOO_WIDE = "SPREAD_TOO_WIDE"
    VOLUME_INVALID = "VOLUME_INVALID"
    MARGIN_INSUFFICIENT = "MARGIN_INSUFFICIENT"
    BROKER_REJECTED = "BROKER_REJECTED"
    ORDER_TIMEOUT = "ORDER_TIMEOUT"
    INSUFFICIENT_FILL = "INSUFFICIENT_FILL"
    SLIPPAGE_EXCEEDED = "SLIPPAGE_EXCEEDED"
    SESSION_UNAVAILABLE = "SESSION_UNAVAILABLE"
    TRADING_DISABLED = "TRADING_DISABLED"
    FIFO_RULE = "FIFO_RULE"
    HEDGING_PROHIBITED = "HEDGING_PROHIBITED"
    UNKNOWN_OUTCOME = "UNKNOWN_OUTCOME"
    ACCOUNT_REQUIRED = "ACCOUNT_REQUIRED"  # several accounts configured, the approval names none
    ACCOUNT_UNKNOWN = "ACCOUNT_UNKNOWN"  # the approval names an account this deployment lacks


class Direction(int, Enum):
    """+1 buy, -1 sell (the RPM's convention)."""

    BUY = 1
    SELL = -1
