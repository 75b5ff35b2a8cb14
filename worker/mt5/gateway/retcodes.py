"""How ``order_send`` retcodes are treated (DOMAIN.md 2): success, retry, unknown or final."""

from __future__ import annotations

from typing import Literal

from schemas.enums import RejectionReason
from worker.mt5 import api

Status = Literal["done", "partial", "placed", "rejected", "unknown"]
RetcodeClass = Literal[
    "done", "partial", "placed", "retry_price", "retry_backoff", "unknown", "final"
]


def classify_retcode(retcode: int | None) -> RetcodeClass:
    """How the gateway treats an ``order_send`` retcode (None = no result)."""
    if retcode is None:
        return "unknown"
    if retcode == api.TRADE_RETCODE_DONE:
        return "done"
    if retcode == api.TRADE_RETCODE_DONE_PARTIAL:
        return "partial"
    if retcode == api.TRADE_RETCODE_PLACED:
        return "placed"
    if retcode in (
        api.TRADE_RETCODE_REQUOTE,
        api.TRADE_RETCODE_PRICE_CHANGED,
        api.TRADE_RETCODE_PRICE_OFF,
    ):
        return "retry_price"
    if retcode in (
        api.TRADE_RETCODE_TOO_MANY_REQUESTS,
        api.TRADE_RETCODE_LOCKED,
        api.TRADE_RETCODE_FROZEN,
    ):
        return "retry_backoff"
    if retcode in (
        api.TRADE_RETCODE_ERROR,
        api.TRADE_RETCODE_TIMEOUT,
        api.TRADE_RETCODE_CONNECTION,
    ):
        return "unknown"
    return "final"


# Codes of the real module that worker/mt5/api.py does not carry (same names and values).
TRADE_RETCODE_INVALID_CLOSE_VOLUME = 10038
TRADE_RETCODE_LONG_ONLY = 10042
TRADE_RETCODE_SHORT_ONLY = 10043
TRADE_RETCODE_CLOSE_ONLY = 10044
TRADE_RETCODE_FIFO_CLOSE = 10045
TRADE_RETCODE_HEDGE_PROHIBITED = 10046

# Final broker refusals that have a more specific reason than BROKER_REJECTED.
REJECTION_REASONS: dict[int, RejectionReason] = {
    api.TRADE_RETCODE_MARKET_CLOSED: RejectionReason.MARKET_CLOSED,
    api.TRADE_RETCODE_NO_MONEY: RejectionReason.MARGIN_INSUFFICIENT,
    api.TRADE_RETCODE_INVALID_VOLUME: RejectionReason.VOLUME_INVALID,
    api.TRADE_RETCODE_TRADE_DISABLED: RejectionReason.SYMBOL_NOT_TRADABLE,
    api.TRADE_RETCODE_SERVER_DISABLES_AT: RejectionReason.TRADING_DISABLED,
    api.TRADE_RETCODE_CLIENT_DISABLES_AT: RejectionReason.TRADING_DISABLED,
    TRADE_RETCODE_INVALID_CLOSE_VOLUME: RejectionReason.VOLUME_INVALID,
    TRADE_RETCODE_LONG_ONLY: RejectionReason.SYMBOL_NOT_TRADABLE,
    TRADE_RETCODE_SHORT_ONLY: RejectionReason.SYMBOL_NOT_TRADABLE,
    TRADE_RETCODE_CLOSE_ONLY: RejectionReason.SYMBOL_NOT_TRADABLE,
    TRADE_RETCODE_FIFO_CLOSE: RejectionReason.FIFO_RULE,
    TRADE_RETCODE_HEDGE_PROHIBITED: RejectionReason.HEDGING_PROHIBITED,
}


def rejection_reason_for(retcode: int | None) -> RejectionReason:
    """The REJECTED reason of a final ``order_send`` retcode (BROKER_REJECTED by default)."""
    if retcode is None:
        return RejectionReason.BROKER_REJECTED
    return REJECTION_REASONS.get(retcode, RejectionReason.BROKER_REJECTED)
