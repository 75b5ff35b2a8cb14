"""The gateway's value types: sides, symbol specifications, snapshots, outcomes, calls."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.mt5 import api
from worker.mt5.gateway.retcodes import Status


class Side(enum.Enum):
    """+1 buy, -1 sell (the RPM direction)."""

    BUY = 1
    SELL = -1

    @property
    def order_type(self) -> int:
        return api.ORDER_TYPE_BUY if self is Side.BUY else api.ORDER_TYPE_SELL

    @property
    def position_type(self) -> int:
        return api.POSITION_TYPE_BUY if self is Side.BUY else api.POSITION_TYPE_SELL

    @property
    def opposite(self) -> Side:
        return Side.SELL if self is Side.BUY else Side.BUY


@dataclass(frozen=True)
class SymbolSpec:
    name: str
    digits: int
    point: float
    pip: float
    contract_size: float
    volume_min: float
    volume_max: float
    volume_step: float
    trade_mode: int
    trade_exemode: int
    filling_mode: int


@dataclass(frozen=True)
class MarketSnapshot:
    symbol: str
    bid: float
    ask: float
    spread_pips: float
    pip: float
    point: float
    tick_time_msc: int  # server time
    tick_age_seconds: float


@dataclass(frozen=True)
class LotPlan:
    units: float  # requested
    chunks: tuple[float, ...]  # each <= volume_max
    lots: float  # total
    units_effective: float  # lots * contract_size
    split: bool


@dataclass(frozen=True)
class BrokerCall:
    function: str
    retcode: int | None
    error: tuple[int, str] | None
    latency_ms: float
    at: datetime  # aware UTC
    request: dict[str, Any] | None


@dataclass(frozen=True)
class SendOutcome:
    status: Status
    retcode: int | None
    order: int
    deal: int
    volume: float
    price: float
    bid: float
    ask: float
    comment: str  # the broker's comment (or the error text)
    attempts: int
    requested_price: float
    filling_mode: int
    deviation: int


@dataclass(frozen=True)
class Reconciliation:
    """What the terminal knows about one execution (its ``OrderIdentity``)."""

    open_orders: tuple[api.TradeOrder, ...]
    history_orders: tuple[api.TradeOrder, ...]
    deals: tuple[api.TradeDeal, ...]
    positions: tuple[api.TradePosition, ...]

    @property
    def found(self) -> bool:
        return bool(self.open_orders or self.history_orders or self.deals or self.positions)

    @property
    def filled_volume(self) -> float:
        return round(sum(deal.volume for deal in self.deals), 8)

    @property
    def vwap(self) -> float | None:
        return vwap(self.deals)

    @property
    def pending(self) -> bool:
        return bool(self.open_orders)


def signed_slippage_pips(side: Side, requested: float, fill: float, pip: float) -> float:
    """Positive = adverse: buy ``(fill - requested) / pip``, sell ``(requested - fill) / pip``."""
    move = fill - requested if side is Side.BUY else requested - fill
    return round(move / pip, 6)


def vwap(deals: Iterable[api.TradeDeal]) -> float | None:
    """Volume-weighted average price of the deals (None without volume)."""
    volume = 0.0
    notional = 0.0
    for deal in deals:
        volume += deal.volume
        notional += deal.volume * deal.price
    return notional / volume if volume > 0 else None
