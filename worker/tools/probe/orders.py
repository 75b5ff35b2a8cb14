"""Market-order requests of the probe: the minimum volume, closes by position ticket."""

from __future__ import annotations

from typing import Any

from worker.mt5 import api


def market_request(
    symbol: str,
    volume: float,
    *,
    buy: bool,
    price: float,
    magic: int,
    comment: str,
    filling: int,
    position: int = 0,
) -> dict[str, Any]:
    request: dict[str, Any] = {
        "action": api.TRADE_ACTION_DEAL,
        "symbol": symbol,
        "volume": float(volume),
        "type": api.ORDER_TYPE_BUY if buy else api.ORDER_TYPE_SELL,
        "price": float(price),
        "deviation": 50,
        "magic": magic,
        "comment": comment,
        "type_time": api.ORDER_TIME_GTC,
        "type_filling": filling,
    }
    if position:
        request["position"] = position
    return request


def close_request(
    position: api.TradePosition, price: float, filling: int, comment: str
) -> dict[str, Any]:
    return market_request(
        position.symbol,
        position.volume,
        buy=position.type == api.POSITION_TYPE_SELL,
        price=price,
        magic=position.magic,
        comment=comment,
        filling=filling,
        position=position.ticket,
    )


def done(result: api.OrderSendResult | None) -> bool:
    return result is not None and result.retcode in (
        api.TRADE_RETCODE_DONE,
        api.TRADE_RETCODE_DONE_PARTIAL,
    )
