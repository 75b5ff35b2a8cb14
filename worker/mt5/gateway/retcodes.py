"""How ``order_send`` retcodes are treated (DOMAIN.md 2): success, retry, unknown or final."""

from __future__ import annotations

from typing import Literal

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
