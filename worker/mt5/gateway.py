"""Broker operations for the pipeline, with the rules of DOMAIN.md sections 2 and 6.

One :class:`Gateway` wraps one terminal session. It turns symbol specifications into pips,
lots and deviations, reads fresh ticks judged in one clock, checks trading permissions and
margin, sends market orders with bounded retries (never after an unknown outcome) and
reconciles by comment token + magic. Every terminal call is recorded as a
:class:`BrokerCall` for the audit trail (``drain_calls``).
"""

from __future__ import annotations

import contextlib
import enum
import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Literal, TypeVar

from schemas.enums import RejectionReason
from worker.mt5 import api

T = TypeVar("T")

Status = Literal["done", "partial", "placed", "rejected", "unknown"]
RetcodeClass = Literal[
    "done", "partial", "placed", "retry_price", "retry_backoff", "unknown", "final"
]

_COMMENT = re.compile(r"^[A-Za-z0-9_-]{0,26}$")
# Currencies whose pairs follow the digits rule for pips (5/3 digits: pip = 10 points).
_FIAT = frozenset(
    ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "NZD", "SEK", "NOK", "DKK", "PLN", "HUF",
     "CZK", "TRY", "ZAR", "MXN", "SGD", "HKD", "CNH", "CNY", "RUB", "ILS", "THB", "INR", "KRW",
     "BRL")
)  # fmt: skip
_RECONCILE_PAD = timedelta(minutes=10)
_MAX_CHUNKS = 100
_OFFSET_GRAIN_MS = 15 * 60 * 1000  # time zones are whole quarter hours
_FLOAT_NOISE = Decimal("0.000000001")  # lots below this are float noise (0.29999999999999996)


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


class GatewayRejection(Exception):
    """A validation or broker refusal: becomes a REJECTED confirmation."""

    def __init__(self, reason: RejectionReason, details: str, retcode: int | None = None) -> None:
        super().__init__(f"{reason.value}: {details}")
        self.reason = reason
        self.details = details
        self.retcode = retcode


class SessionLost(api.TransportError):
    """The terminal connection is gone (last_error -10000..-10005 or a transport error).

    Raised by every call except ``send`` (where it is an unknown outcome) so that the
    session pool can reconnect. Not a rejection: the approval is retried (requeued) on a
    healthy session, never refused because of a transient fault.
    """

    reason = RejectionReason.SESSION_UNAVAILABLE

    def __init__(self, details: str) -> None:
        super().__init__(f"{self.reason.value}: {details}")
        self.details = details


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
    """What the terminal knows about one execution (comment token AND magic)."""

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


def _is_fx(info: api.SymbolInfo) -> bool:
    return (
        info.currency_base in _FIAT
        and info.currency_profit in _FIAT
        and info.currency_base != info.currency_profit
    )


def _decimal(value: float) -> Decimal:
    return Decimal(repr(value))


@dataclass
class _SendState:
    modes: tuple[int, ...]
    mode_index: int = 0
    fell_back: bool = False
    attempts: int = 0
    last: SendOutcome | None = None
    kind: RetcodeClass = "final"


class Gateway:
    """Broker operations on one terminal session (not thread-safe: one lease at a time)."""

    def __init__(
        self,
        terminal: api.Terminal,
        *,
        magic: int,
        pip_sizes: Mapping[str, float],
        max_tick_age_seconds: float,
        server_utc_offset_seconds: int | None = None,
        max_attempts: int = 3,
        backoff_seconds: float = 0.05,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.permissions: dict[str, bool] = {}
        self._terminal = terminal
        self._magic = magic
        self._pip_sizes = dict(pip_sizes)
        self._max_tick_age = max_tick_age_seconds
        self._configured_offset_ms = (
            None if server_utc_offset_seconds is None else server_utc_offset_seconds * 1000
        )
        self._learned_offset_ms: int | None = None
        self._max_attempts = max(1, max_attempts)
        self._backoff = backoff_seconds
        self._clock = clock
        self._sleep = sleep
        self._calls: deque[BrokerCall] = deque(maxlen=10_000)

    @property
    def terminal(self) -> api.Terminal:
        return self._terminal

    @property
    def magic(self) -> int:
        return self._magic

    @property
    def server_offset_seconds(self) -> float | None:
        """The server's offset from UTC: configured, else learned from ticks, else None."""
        offset = self._offset_ms()
        return None if offset is None else offset / 1000

    # ------------------------------------------------------------------ call recording
    def drain_calls(self) -> list[BrokerCall]:
        """Every terminal call since the last drain, oldest first."""
        calls = list(self._calls)
        self._calls.clear()
        return calls

    def _call(
        self,
        function: str,
        call: Callable[[], T],
        *,
        request: dict[str, Any] | None = None,
        failed: Callable[[T], bool] = lambda result: result is None,
    ) -> tuple[T, tuple[int, str] | None]:
        """Run one terminal call; returns (result, error). Raises TransportError through."""
        at = datetime.fromtimestamp(self._clock(), UTC)
        started = time.perf_counter()
        error: tuple[int, str] | None = None
        try:
            result = call()
        except api.TransportError as exc:
            error = (api.RES_E_INTERNAL_FAIL, f"transport error: {type(exc).__name__}")
            self._record(function, None, error, started, at, request)
            raise
        if failed(result):
            code, message = self._terminal.last_error()
            error = (int(code), str(message))
        retcode = getattr(result, "retcode", None)
        self._record(function, retcode, error, started, at, request)
        return result, error

    def _record(
        self,
        function: str,
        retcode: int | None,
        error: tuple[int, str] | None,
        started: float,
        at: datetime,
        request: dict[str, Any] | None,
    ) -> None:
        latency = (time.perf_counter() - started) * 1000
        self._calls.append(
            BrokerCall(function, retcode, error, round(latency, 3), at, dict(request or {}) or None)
        )

    def _query(
        self,
        function: str,
        call: Callable[[], T],
        failed: Callable[[T], bool] = lambda result: result is None,
    ) -> tuple[T, tuple[int, str] | None]:
        """A non-send call: a lost connection raises SessionLost for the pool."""
        try:
            result, error = self._call(function, call, failed=failed)
        except api.TransportError as exc:
            raise SessionLost(f"{function}: transport error ({type(exc).__name__})") from exc
        if error is not None and error[0] in api.CONNECTION_LOST_ERRORS:
            raise SessionLost(f"{function}: connection lost ({error[0]}, {error[1]})")
        return result, error

    # ------------------------------------------------------------------ symbols
    def symbol_spec(self, broker_symbol: str) -> SymbolSpec:
        """The symbol's specification (selected into Market Watch if needed)."""
        info, error = self._query("symbol_info", lambda: self._terminal.symbol_info(broker_symbol))
        if info is None:
            raise GatewayRejection(
                RejectionReason.SYMBOL_NOT_TRADABLE,
                f"unknown symbol {broker_symbol!r} on this terminal {error or ''}".strip(),
            )
        if not info.visible:
            selected, error = self._query(
                "symbol_select",
                lambda: self._terminal.symbol_select(broker_symbol, True),
                failed=lambda ok: not ok,
            )
            if not selected:
                raise GatewayRejection(
                    RejectionReason.SYMBOL_NOT_TRADABLE,
                    f"cannot select {broker_symbol} into Market Watch {error or ''}".strip(),
                )
        pip = self._pip_size(info)
        return SymbolSpec(
            name=info.name,
            digits=info.digits,
            point=info.point,
            pip=pip,
            contract_size=info.trade_contract_size,
            volume_min=info.volume_min,
            volume_max=info.volume_max,
            volume_step=info.volume_step,
            trade_mode=info.trade_mode,
            trade_exemode=info.trade_exemode,
            filling_mode=info.filling_mode,
        )

    def _pip_size(self, info: api.SymbolInfo) -> float:
        configured = self._pip_sizes.get(info.name)
        if configured is None:
            # broker suffixes/prefixes: "XAUUSD" also covers "XAUUSD.a" and "XAUUSDm"
            prefixes = [k for k in self._pip_sizes if k and info.name.startswith(k)]
            if prefixes:
                configured = self._pip_sizes[max(prefixes, key=len)]
        if configured is not None:
            if configured <= 0:
                raise GatewayRejection(
                    RejectionReason.SYMBOL_NOT_TRADABLE,
                    f"configured pip size for {info.name} is not positive",
                )
            return configured
        if _is_fx(info) and info.digits in (2, 3, 4, 5):
            return info.point * (10 if info.digits in (3, 5) else 1)
        raise GatewayRejection(
            RejectionReason.SYMBOL_NOT_TRADABLE,
            f"no pip size for {info.name}: it is not an FX pair ({info.currency_base}/"
            f"{info.currency_profit}, {info.digits} digits); configure pip_sizes",
        )

    def check_trading_allowed(
        self, spec: SymbolSpec, side: Side, account: api.AccountInfo | None = None
    ) -> None:
        """Terminal, account and symbol permissions for opening ``side``.

        ``account``: an account_info already read for this order (else it is read here).
        """
        terminal, _ = self._query("terminal_info", self._terminal.terminal_info)
        if terminal is None:
            raise SessionLost("terminal_info failed")
        account = account or self.account()
        self.permissions = {  # the last seen, for readiness (DOMAIN.md 6: report each level)
            "terminal_trade_allowed": terminal.trade_allowed,
            "terminal_tradeapi_enabled": not terminal.tradeapi_disabled,
            "account_trade_allowed": account.trade_allowed,
            "account_trade_expert": account.trade_expert,
        }
        if not terminal.trade_allowed:
            raise GatewayRejection(
                RejectionReason.TRADING_DISABLED,
                "terminal: Algo Trading is off (terminal_info().trade_allowed is false)",
                api.TRADE_RETCODE_CLIENT_DISABLES_AT,
            )
        if terminal.tradeapi_disabled:
            raise GatewayRejection(
                RejectionReason.TRADING_DISABLED, "terminal: the trade API is disabled"
            )
        if not account.trade_allowed:
            raise GatewayRejection(
                RejectionReason.TRADING_DISABLED, "account: trading is not allowed"
            )
        if not account.trade_expert:
            raise GatewayRejection(
                RejectionReason.TRADING_DISABLED, "account: expert advisors may not trade"
            )
        mode = spec.trade_mode
        refused = {
            api.SYMBOL_TRADE_MODE_DISABLED: "trading is disabled",
            api.SYMBOL_TRADE_MODE_CLOSEONLY: "close only",
        }.get(mode)
        if mode == api.SYMBOL_TRADE_MODE_LONGONLY and side is Side.SELL:
            refused = "long only"
        if mode == api.SYMBOL_TRADE_MODE_SHORTONLY and side is Side.BUY:
            refused = "short only"
        if refused:
            raise GatewayRejection(
                RejectionReason.SYMBOL_NOT_TRADABLE,
                f"{spec.name}: {refused} (trade_mode {mode})",
                api.TRADE_RETCODE_TRADE_DISABLED,
            )

    # ------------------------------------------------------------------ market data
    def _offset_ms(self) -> int | None:
        if self._configured_offset_ms is not None:
            return self._configured_offset_ms
        return self._learned_offset_ms

    def _learn_offset(self, tick_time_msc: int) -> None:
        """Learn the server's UTC offset from a tick (rounded to a quarter hour).

        A stale tick underestimates the offset, so the largest estimate wins: after one
        fresh tick of any symbol the offset is right, and it never decreases.
        """
        if self._configured_offset_ms is not None:
            return
        estimate = tick_time_msc - int(self._clock() * 1000)
        rounded = round(estimate / _OFFSET_GRAIN_MS) * _OFFSET_GRAIN_MS
        if not -12 * 3600_000 <= rounded <= 14 * 3600_000:
            return
        if self._learned_offset_ms is None or rounded > self._learned_offset_ms:
            self._learned_offset_ms = rounded

    def _tick(self, name: str) -> api.Tick:
        tick, error = self._query("symbol_info_tick", lambda: self._terminal.symbol_info_tick(name))
        if tick is None or (tick.bid <= 0 and tick.ask <= 0):
            raise GatewayRejection(
                RejectionReason.NO_MARKET_DATA, f"no tick for {name} {error or ''}".strip()
            )
        self._learn_offset(tick.time_msc)
        return tick

    def snapshot(self, spec: SymbolSpec) -> MarketSnapshot:
        """A fresh tick; its age is judged in server time (never against local UTC)."""
        tick = self._tick(spec.name)
        offset = self._offset_ms()
        if offset is None:  # only ticks too old to learn the server clock from
            raise GatewayRejection(
                RejectionReason.STALE_TICK,
                f"{spec.name}: the last tick is too old to judge (server clock offset unknown; "
                "set SERVER_UTC_OFFSET_SECONDS)",
            )
        server_now_ms = int(self._clock() * 1000) + offset
        age = (server_now_ms - tick.time_msc) / 1000
        if age > self._max_tick_age:
            raise GatewayRejection(
                RejectionReason.STALE_TICK,
                f"{spec.name}: last tick is {age:.1f}s old (limit {self._max_tick_age:g}s; "
                "market closed or feed stopped)",
            )
        if age < -self._max_tick_age:
            raise GatewayRejection(
                RejectionReason.STALE_TICK,
                f"{spec.name}: tick is {-age:.1f}s in the future: server UTC offset misconfigured?",
            )
        if tick.bid <= 0 or tick.ask <= 0 or tick.ask < tick.bid:
            raise GatewayRejection(
                RejectionReason.NO_MARKET_DATA, f"{spec.name}: no two-sided quote"
            )
        return MarketSnapshot(
            symbol=spec.name,
            bid=tick.bid,
            ask=tick.ask,
            spread_pips=round((tick.ask - tick.bid) / spec.pip, 6),
            pip=spec.pip,
            point=spec.point,
            tick_time_msc=tick.time_msc,
            tick_age_seconds=max(0.0, age),
        )

    # ------------------------------------------------------------------ sizing
    def lots_for(
        self, spec: SymbolSpec, units: float, over_max: Literal["split", "reject"]
    ) -> LotPlan:
        """Units -> lots rounded DOWN to the volume step; never upsized."""
        if not math.isfinite(units) or units <= 0:
            raise GatewayRejection(RejectionReason.VOLUME_INVALID, f"units must be > 0: {units}")
        contract = _decimal(spec.contract_size)
        step = _decimal(spec.volume_step)
        vmin = _decimal(spec.volume_min)
        vmax = _decimal(spec.volume_max)
        try:
            raw = (_decimal(units) / contract).quantize(_FLOAT_NOISE, rounding=ROUND_HALF_EVEN)
            lots = (raw / step).to_integral_value(rounding=ROUND_FLOOR) * step
        except InvalidOperation:  # beyond Decimal's precision: absurdly large
            raise GatewayRejection(
                RejectionReason.VOLUME_INVALID, f"{units:g} units is not a tradable size"
            ) from None
        if lots < vmin or lots <= 0:
            raise GatewayRejection(
                RejectionReason.VOLUME_INVALID,
                f"{units:g} units = {raw.normalize():f} lots on {spec.name} (contract "
                f"{spec.contract_size:g}): below volume_min {spec.volume_min:g}",
            )
        chunks: list[Decimal] = [lots]
        if lots > vmax:
            if over_max == "reject":
                raise GatewayRejection(
                    RejectionReason.VOLUME_INVALID,
                    f"{lots.normalize():f} lots on {spec.name} exceed volume_max "
                    f"{spec.volume_max:g} (splitting is off)",
                )
            count, rest = divmod(lots, vmax)
            if count + (1 if rest else 0) > _MAX_CHUNKS:
                raise GatewayRejection(
                    RejectionReason.VOLUME_INVALID,
                    f"{lots.normalize():f} lots would need more than {_MAX_CHUNKS} orders",
                )
            chunks = [vmax] * int(count)
            if rest:
                if rest < vmin:  # keep every chunk valid: move volume from the last full one
                    chunks[-1] = vmax - (vmin - rest)
                    rest = vmin
                chunks.append(rest)
        return LotPlan(
            units=units,
            chunks=tuple(float(chunk) for chunk in chunks),
            lots=float(lots),
            units_effective=float(lots * contract),
            split=len(chunks) > 1,
        )

    def deviation_points(self, spec: SymbolSpec, max_slippage_pips: float) -> int:
        """Slippage limit in pips -> ``deviation`` in POINTS."""
        points = _decimal(max_slippage_pips) * _decimal(spec.pip) / _decimal(spec.point)
        return max(0, int(points.to_integral_value(rounding=ROUND_HALF_EVEN)))

    def filling_modes(self, spec: SymbolSpec) -> tuple[int, ...]:
        """Allowed filling modes, preferred first (empty: the symbol cannot be traded)."""
        modes: list[int] = []
        if spec.filling_mode & api.SYMBOL_FILLING_FOK:
            modes.append(api.ORDER_FILLING_FOK)
        if spec.filling_mode & api.SYMBOL_FILLING_IOC:
            modes.append(api.ORDER_FILLING_IOC)
        if spec.trade_exemode == api.SYMBOL_TRADE_EXECUTION_EXCHANGE:
            modes.append(api.ORDER_FILLING_RETURN)  # always allowed on exchange execution
        elif spec.trade_exemode != api.SYMBOL_TRADE_EXECUTION_MARKET and not modes:
            modes.append(api.ORDER_FILLING_FOK)  # request/instant execution: FOK
        return tuple(modes)

    def check_margin(
        self,
        spec: SymbolSpec,
        side: Side,
        lots: float,
        price: float,
        cushion: float,
        account: api.AccountInfo | None = None,
    ) -> tuple[float, float]:
        """(required, free); raises MARGIN_INSUFFICIENT when free < required * cushion.

        ``account``: an account_info already read for this order (else it is read here).
        """
        required, error = self._query(
            "order_calc_margin",
            lambda: self._terminal.order_calc_margin(side.order_type, spec.name, lots, price),
        )
        if required is None:
            raise GatewayRejection(
                RejectionReason.MARGIN_INSUFFICIENT,
                f"order_calc_margin failed for {spec.name} {error or ''}".strip(),
            )
        free = (account or self.account()).margin_free
        if free < required * cushion:
            raise GatewayRejection(
                RejectionReason.MARGIN_INSUFFICIENT,
                f"{lots:g} lots {spec.name} need {required:.2f} margin x {cushion:g} cushion; "
                f"free margin is {free:.2f}",
                api.TRADE_RETCODE_NO_MONEY,
            )
        return float(required), float(free)

    # ------------------------------------------------------------------ sending
    def send(
        self,
        spec: SymbolSpec,
        side: Side,
        lots: float,
        *,
        comment: str,
        deviation: int,
        position: int | None = None,
    ) -> SendOutcome:
        """Send one market order with the retry rules of DOMAIN.md 2.

        Requotes refresh the price and retry; busy codes back off and retry; 10030 tries the
        next filling mode once; an unknown outcome returns at once and is never resent.
        Raises GatewayRejection only when nothing was sent (bad comment, no filling mode,
        no quote, connection lost before the order left).
        """
        if not _COMMENT.match(comment):
            raise GatewayRejection(
                RejectionReason.INVALID_REQUEST,
                "comment must be at most 26 characters of [A-Za-z0-9_-]",
            )
        modes = self.filling_modes(spec)
        if not modes:
            raise GatewayRejection(
                RejectionReason.SYMBOL_NOT_TRADABLE,
                f"{spec.name}: no filling mode allowed (filling_mode {spec.filling_mode}, "
                f"exemode {spec.trade_exemode})",
            )
        state = _SendState(modes=modes)
        attempt = 1
        while True:
            outcome = self._attempt(spec, side, lots, comment, deviation, position, state)
            if state.kind not in ("retry_price", "retry_backoff"):
                return outcome
            if attempt >= self._max_attempts:
                return outcome  # retryable codes still there after the last attempt: rejected
            if state.kind == "retry_backoff":
                self._sleep(self._backoff * 2 ** (attempt - 1))
            attempt += 1

    def _attempt(
        self,
        spec: SymbolSpec,
        side: Side,
        lots: float,
        comment: str,
        deviation: int,
        position: int | None,
        state: _SendState,
    ) -> SendOutcome:
        while True:
            tick = self._tick(spec.name)  # nothing in flight yet: SessionLost is safe here
            price = tick.ask if side is Side.BUY else tick.bid
            mode = state.modes[state.mode_index]
            request: dict[str, Any] = {
                "action": api.TRADE_ACTION_DEAL,
                "symbol": spec.name,
                "volume": float(lots),
                "type": side.order_type,
                "price": price,
                "deviation": int(deviation),
                "magic": self._magic,
                "comment": comment,
                "type_time": api.ORDER_TIME_GTC,
                "type_filling": mode,
            }
            if position:
                request["position"] = int(position)
            state.attempts += 1
            outcome = self._order_send(request, state.attempts, price, mode, deviation)
            state.last = outcome
            if (
                outcome.retcode == api.TRADE_RETCODE_INVALID_FILL
                and not state.fell_back
                and state.mode_index + 1 < len(state.modes)
            ):
                state.fell_back = True
                state.mode_index += 1
                continue
            state.kind = (
                "unknown" if outcome.status == "unknown" else classify_retcode(outcome.retcode)
            )
            return outcome

    def _order_send(
        self, request: dict[str, Any], attempts: int, price: float, mode: int, deviation: int
    ) -> SendOutcome:
        def outcome(
            status: Status, result: api.OrderSendResult | None, comment: str
        ) -> SendOutcome:
            return SendOutcome(
                status=status,
                retcode=None if result is None else result.retcode,
                order=0 if result is None else result.order,
                deal=0 if result is None else result.deal,
                volume=0.0 if result is None else result.volume,
                price=0.0 if result is None else result.price,
                bid=0.0 if result is None else result.bid,
                ask=0.0 if result is None else result.ask,
                comment=comment,
                attempts=attempts,
                requested_price=price,
                filling_mode=mode,
                deviation=deviation,
            )

        try:
            result, error = self._call(
                "order_send", lambda: self._terminal.order_send(request), request=request
            )
        except api.TransportError as exc:
            return outcome("unknown", None, f"transport error: {type(exc).__name__}")
        if result is None:
            code, message = error or (api.RES_E_FAIL, "no result")
            return outcome("unknown", None, f"order_send returned None: ({code}, {message})")
        kind = classify_retcode(result.retcode)
        # final codes, and retryable ones (retried by the caller), are "rejected" here
        status: Status = kind if kind in ("done", "partial", "placed", "unknown") else "rejected"
        return outcome(status, result, result.comment)

    # ------------------------------------------------------------------ orders and history
    def order_state(self, order_ticket: int) -> api.TradeOrder | None:
        """The order, open or in history (None when the terminal does not know it)."""
        open_orders, _ = self._query(
            "orders_get", lambda: self._terminal.orders_get(ticket=order_ticket)
        )
        if open_orders:
            return open_orders[0]
        history, _ = self._query(
            "history_orders_get", lambda: self._terminal.history_orders_get(ticket=order_ticket)
        )
        return history[0] if history else None

    def deals_for_order(self, order_ticket: int) -> tuple[api.TradeDeal, ...]:
        deals, _ = self._query(
            "history_deals_get", lambda: self._terminal.history_deals_get(ticket=order_ticket)
        )
        return tuple(deals or ())

    def cancel(self, order_ticket: int) -> SendOutcome:
        """Remove a placed order (TRADE_ACTION_REMOVE)."""
        request = {"action": api.TRADE_ACTION_REMOVE, "order": int(order_ticket)}
        result = self._order_send(request, 1, 0.0, api.ORDER_FILLING_RETURN, 0)
        if result.status == "unknown":
            return result
        return _with_status(
            result, "done" if result.retcode == api.TRADE_RETCODE_DONE else "rejected"
        )

    def reconcile(self, comment_token: str, broker_symbol: str, since: datetime) -> Reconciliation:
        """Everything of ours (comment token AND magic) on ``broker_symbol`` since ``since``.

        ``since`` is UTC (aware, or naive UTC); the history window is expressed in server
        time and padded by minutes on both sides (wider when the offset is unknown).
        """
        offset = self._offset_ms()
        if offset is None:
            with contextlib.suppress(GatewayRejection):  # no tick: use the wider window
                self._tick(broker_symbol)
            offset = self._offset_ms()
        pad = _RECONCILE_PAD if offset is not None else _RECONCILE_PAD + timedelta(hours=14)
        since_utc = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
        shift = timedelta(milliseconds=offset or 0)
        now_utc = datetime.fromtimestamp(self._clock(), UTC)
        date_from = int((since_utc + shift - pad).timestamp())
        date_to = int((now_utc + shift + pad).timestamp())

        def ours(item: api.TradeOrder | api.TradeDeal | api.TradePosition) -> bool:
            return (
                item.comment == comment_token
                and item.magic == self._magic
                and item.symbol == broker_symbol
            )

        open_orders, _ = self._query(
            "orders_get", lambda: self._terminal.orders_get(symbol=broker_symbol)
        )
        positions, _ = self._query(
            "positions_get", lambda: self._terminal.positions_get(symbol=broker_symbol)
        )
        history_orders, _ = self._query(
            "history_orders_get",
            lambda: self._terminal.history_orders_get(date_from, date_to),
        )
        deals, _ = self._query(
            "history_deals_get", lambda: self._terminal.history_deals_get(date_from, date_to)
        )
        return Reconciliation(
            open_orders=tuple(o for o in open_orders or () if ours(o)),
            history_orders=tuple(o for o in history_orders or () if ours(o)),
            deals=tuple(d for d in deals or () if ours(d)),
            positions=tuple(p for p in positions or () if ours(p)),
        )

    def opposite_positions(self, spec: SymbolSpec, side: Side) -> tuple[api.TradePosition, ...]:
        """Our (magic) positions on the other side of ``side``, oldest first by ticket."""
        positions, _ = self._query(
            "positions_get", lambda: self._terminal.positions_get(symbol=spec.name)
        )
        opposite = side.opposite.position_type
        return tuple(
            sorted(
                (
                    p
                    for p in positions or ()
                    if p.type == opposite and p.magic == self._magic and p.symbol == spec.name
                ),
                key=lambda p: p.ticket,
            )
        )

    def account(self) -> api.AccountInfo:
        info, error = self._query("account_info", self._terminal.account_info)
        if info is None:  # the terminal cannot answer: retry elsewhere, never refuse
            raise SessionLost(f"account_info failed {error or ''}".strip())
        return info


def _with_status(outcome: SendOutcome, status: Status) -> SendOutcome:
    return replace(outcome, status=status)
