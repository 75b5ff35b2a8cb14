"""A faithful simulated MetaTrader 5 terminal and broker (implements ``api.Terminal``).

The default backend of the demo and the broker of the tests. It validates requests like the
real trade server (retcodes of DOMAIN.md section 2), keeps server time in the broker's zone
(not UTC), follows a weekly market schedule, fills market orders with slippage and limited
liquidity, keeps netting or hedging positions and the order/deal history with the real field
names, and can inject the faults the worker must survive (latency, disconnects, lost replies,
timeouts, requotes...). With ``state_path`` the broker state persists in SQLite.

Configuration lives in :mod:`worker.mt5.sim.config`, prices and schedules in
:mod:`worker.mt5.sim.market`, records and persistence in :mod:`worker.mt5.sim.state`.
"""

from __future__ import annotations

import bisect
import calendar
import fnmatch
import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from worker.mt5 import api
from worker.mt5.sim.config import (
    SCRIPTED_OUTCOMES,
    FaultConfig,
    SimAccount,
    SimConfig,
    SimSymbol,
    default_symbols,
)
from worker.mt5.sim.market import PricePath, Schedule
from worker.mt5.sim.state import (
    DealRecord,
    OrderRecord,
    PositionRecord,
    SimStore,
    iter_deals,
)

__all__ = [
    "FaultConfig",
    "SimAccount",
    "SimConfig",
    "SimSymbol",
    "SimTerminal",
    "default_symbols",
    "iter_deals",
]

RETCODE_COMMENTS = {
    api.TRADE_RETCODE_REQUOTE: "Requote",
    api.TRADE_RETCODE_REJECT: "Request rejected",
    api.TRADE_RETCODE_CANCEL: "Request canceled by trader",
    api.TRADE_RETCODE_PLACED: "Order placed",
    api.TRADE_RETCODE_DONE: "Request executed",
    api.TRADE_RETCODE_DONE_PARTIAL: "Request executed partially",
    api.TRADE_RETCODE_ERROR: "Request processing error",
    api.TRADE_RETCODE_TIMEOUT: "Request canceled by timeout",
    api.TRADE_RETCODE_INVALID: "Invalid request",
    api.TRADE_RETCODE_INVALID_VOLUME: "Invalid volume in the request",
    api.TRADE_RETCODE_INVALID_PRICE: "Invalid price in the request",
    api.TRADE_RETCODE_TRADE_DISABLED: "Trade is disabled",
    api.TRADE_RETCODE_MARKET_CLOSED: "Market is closed",
    api.TRADE_RETCODE_NO_MONEY: "There is not enough money to complete the request",
    api.TRADE_RETCODE_PRICE_CHANGED: "Prices changed",
    api.TRADE_RETCODE_PRICE_OFF: "There are no quotes to process the request",
    api.TRADE_RETCODE_TOO_MANY_REQUESTS: "Too frequent requests",
    api.TRADE_RETCODE_SERVER_DISABLES_AT: "Autotrading disabled by server",
    api.TRADE_RETCODE_CLIENT_DISABLES_AT: "Autotrading disabled by client terminal",
    api.TRADE_RETCODE_LOCKED: "Request locked for processing",
    api.TRADE_RETCODE_FROZEN: "Order or position frozen",
    api.TRADE_RETCODE_INVALID_FILL: "Invalid order filling type",
    api.TRADE_RETCODE_CONNECTION: "No connection with the trade server",
    api.TRADE_RETCODE_INVALID_ORDER: "Invalid or prohibited order type",
    api.TRADE_RETCODE_POSITION_CLOSED: "Position with the specified identifier has been closed",
}

_SCRIPTED_RETCODES = {
    "requote": api.TRADE_RETCODE_REQUOTE,
    "price_changed": api.TRADE_RETCODE_PRICE_CHANGED,
    "off_quotes": api.TRADE_RETCODE_PRICE_OFF,
    "reject": api.TRADE_RETCODE_REJECT,
    "too_many_requests": api.TRADE_RETCODE_TOO_MANY_REQUESTS,
    "locked": api.TRADE_RETCODE_LOCKED,
    "frozen": api.TRADE_RETCODE_FROZEN,
    "invalid_fill": api.TRADE_RETCODE_INVALID_FILL,
    "error": api.TRADE_RETCODE_ERROR,
    "connection": api.TRADE_RETCODE_CONNECTION,
    "timeout": api.TRADE_RETCODE_TIMEOUT,
}

# request key -> accepted Python types (the binding refuses anything else)
_REQUEST_FIELDS: dict[str, tuple[type, ...]] = {
    "action": (int,),
    "magic": (int,),
    "order": (int,),
    "symbol": (str,),
    "volume": (float, int),
    "price": (float, int),
    "stoplimit": (float, int),
    "sl": (float, int),
    "tp": (float, int),
    "deviation": (int,),
    "type": (int,),
    "type_filling": (int,),
    "type_time": (int,),
    "expiration": (int,),
    "comment": (str,),
    "position": (int,),
    "position_by": (int,),
}
_MAX_COMMENT = 26
_EPS = 1e-9
_OPEN_STATES = (api.ORDER_STATE_STARTED, api.ORDER_STATE_PLACED, api.ORDER_STATE_PARTIAL)

T = TypeVar("T")


class _BindingError(Exception):
    """The Python binding refuses the call: the function returns None, last_error says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Request:
    echo: api.TradeRequest
    request_id: int

    @property
    def is_buy(self) -> bool:
        return self.echo.type == api.ORDER_TYPE_BUY


def _parse_request(request: Any) -> api.TradeRequest:
    if not isinstance(request, dict):
        raise _BindingError(api.RES_E_INVALID_PARAMS, "Invalid request argument")
    values: dict[str, Any] = dict.fromkeys(api.TradeRequest._fields, 0)
    values["symbol"] = ""
    values["comment"] = ""
    for key, value in request.items():
        accepted = _REQUEST_FIELDS.get(key)
        if accepted is None:
            raise _BindingError(api.RES_E_INVALID_PARAMS, f'Invalid "{key}" argument')
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise _BindingError(api.RES_E_INVALID_PARAMS, f'Invalid "{key}" argument type')
        values[key] = value
    if "action" not in request:
        raise _BindingError(api.RES_E_INVALID_PARAMS, 'Missing "action" argument')
    comment = values["comment"]
    if len(comment) > _MAX_COMMENT or not comment.isascii():
        raise _BindingError(api.RES_E_INVALID_PARAMS, 'Invalid "comment" argument')
    for key in ("volume", "price", "stoplimit", "sl", "tp"):
        values[key] = float(values[key])
    return api.TradeRequest(**values)


def _server_seconds(value: api.DateLike) -> int:
    """A history date as seconds of server time (naive datetimes are server wall clock)."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            return int(value.timestamp())
        return calendar.timegm(value.timetuple())
    return int(value)


def _group_matches(name: str, group: str | None) -> bool:
    """MT5 group filters: comma-separated wildcards, ``!`` excludes (``"*USD*,!EUR*"``)."""
    if not group:
        return True
    included = False
    for raw in group.split(","):
        pattern = raw.strip()
        if pattern.startswith("!"):
            if fnmatch.fnmatchcase(name, pattern[1:]):
                return False
        elif fnmatch.fnmatchcase(name, pattern):
            included = True
    return included


def _floor_step(volume: float, step: float) -> float:
    return round(int(volume / step + _EPS) * step, 8)


class SimTerminal:
    """Simulated terminal + broker. Thread-safe: every call holds one lock."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        state_path: str | Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config or SimConfig()
        self._clock = clock
        self._lock = threading.RLock()
        self._symbols: dict[str, SimSymbol] = dict(self._config.symbols)
        self._paths = {n: PricePath(self._config.seed, s) for n, s in self._symbols.items()}
        self._schedules = {n: Schedule(s.closed_windows()) for n, s in self._symbols.items()}
        self._selected = {n for n, s in self._symbols.items() if s.visible}
        self._tick_cache: dict[str, tuple[int, api.Tick]] = {}
        self._offset_ms = self._config.server_utc_offset_seconds * 1000
        self._connected = False
        self._error: tuple[int, str] = (api.RES_S_OK, "Success")
        account = self._config.account
        self._account = account
        self._terminal_trade_allowed = self._config.terminal_trade_allowed
        self._slip_rng = random.Random(self._config.seed * 1_000_003 + 2)
        self._faults = self._config.faults
        self._scripted: deque[str] = deque()
        self._apply_faults(self._faults, reseed=True)
        # broker state
        self._balance = account.balance
        self._next_order = 50_000_001
        self._next_deal = 40_000_001
        self._next_request = 1
        self._last_stamp = 0
        self._orders: dict[int, OrderRecord] = {}
        self._open_orders: dict[int, OrderRecord] = {}
        self._pending_fills: dict[int, float] = {}  # RETURN orders on exchange: ticket -> due
        self._history_orders: list[OrderRecord] = []
        self._history_order_times: list[int] = []
        self._orders_by_position: dict[int, list[OrderRecord]] = {}
        self._deals: list[DealRecord] = []
        self._deal_times: list[int] = []
        self._deals_by_order: dict[int, list[DealRecord]] = {}
        self._deals_by_position: dict[int, list[DealRecord]] = {}
        self._positions: dict[int, PositionRecord] = {}
        self._by_symbol: dict[str, dict[int, PositionRecord]] = {}
        self._netting: dict[str, int] = {}  # symbol -> position ticket (netting accounts)
        # per symbol [buy volume, sum buy volume*price, sell volume, sum sell volume*price]
        self._exposure: dict[str, list[float]] = {}
        self._margin_used = 0.0
        self._rate_symbols = {
            (s.currency_base, s.currency_profit): n for n, s in self._symbols.items()
        }
        self._store = SimStore(state_path) if state_path is not None else None
        if self._store is not None:
            self._load(self._store)

    # ------------------------------------------------------------------ control knobs
    @property
    def config(self) -> SimConfig:
        return self._config

    @property
    def faults(self) -> FaultConfig:
        return self._faults

    def set_faults(self, **changes: Any) -> FaultConfig:
        """Change fault knobs at run time (``FaultConfig`` field names)."""
        with self._lock:
            faults = replace(self._faults, **changes)
            self._apply_faults(faults, reseed="fault_seed" in changes)
            if "scripted" in changes:
                self._scripted = deque(faults.scripted)
            return faults

    def _apply_faults(self, faults: FaultConfig, *, reseed: bool) -> None:
        if reseed:
            seed = faults.fault_seed
            self._fault_rng = random.Random(self._config.seed * 7_919 + 1 if seed is None else seed)
            self._scripted = deque(faults.scripted)
        weights = [w for _, w in faults.slippage_points]
        self._slip_values = [p for p, _ in faults.slippage_points]
        self._slip_cumulative = list(itertools.accumulate(weights))
        self._faults = faults

    def disconnect(self) -> None:
        """Drop the connection: every call fails until ``initialize()`` succeeds again."""
        with self._lock:
            self._connected = False

    def set_trading(
        self,
        *,
        terminal: bool | None = None,
        account: bool | None = None,
        expert: bool | None = None,
    ) -> None:
        """Switch trading off/on at the terminal (Algo Trading button) or account level."""
        with self._lock:
            if terminal is not None:
                self._terminal_trade_allowed = terminal
            if account is not None:
                self._account = replace(self._account, trade_allowed=account)
            if expert is not None:
                self._account = replace(self._account, trade_expert=expert)

    def update_symbol(self, name: str, **changes: Any) -> SimSymbol:
        """Change a symbol's specification at run time (``SimSymbol`` field names)."""
        with self._lock:
            symbol = replace(self._symbols[name], **changes)
            self._symbols[name] = symbol
            self._paths[name] = PricePath(self._config.seed, symbol)
            self._schedules[name] = Schedule(symbol.closed_windows())
            self._tick_cache.pop(name, None)
            return symbol

    def close(self) -> None:
        """Release the state file (the terminal is unusable afterwards)."""
        with self._lock:
            self._connected = False
            if self._store is not None:
                self._store.close()
                self._store = None

    # ------------------------------------------------------------------ call plumbing
    def _fail(self, code: int, message: str) -> None:
        self._error = (code, message)

    def _begin(self, function: str) -> bool:
        faults = self._faults
        delay = faults.latency_by_function.get(function, faults.latency_ms)
        if faults.latency_jitter_ms:
            delay += self._fault_rng.uniform(0.0, faults.latency_jitter_ms)
        if delay > 0:
            time.sleep(delay / 1000.0)
        if not self._connected:
            self._fail(api.RES_E_INTERNAL_FAIL_CONNECT, "No IPC connection")
            return False
        if faults.disconnect_rate and self._fault_rng.random() < faults.disconnect_rate:
            self._connected = False
            self._fail(api.RES_E_INTERNAL_FAIL_SEND, "IPC send failed")
            return False
        self._error = (api.RES_S_OK, "Success")
        if self._pending_fills:
            self._pump()
        return True

    # ------------------------------------------------------------------ session
    def initialize(
        self,
        path: str | None = None,
        *,
        login: int | None = None,
        password: str | None = None,
        server: str | None = None,
        timeout: int | None = None,
    ) -> bool:
        del path, timeout
        with self._lock:
            if not self._credentials_ok(login, password, server):
                self._connected = False
                return False
            self._connected = True
            self._error = (api.RES_S_OK, "Success")
            return True

    def login(
        self,
        login: int,
        *,
        password: str | None = None,
        server: str | None = None,
        timeout: int | None = None,
    ) -> bool:
        del timeout
        with self._lock:
            if not self._begin("login"):
                return False
            return self._credentials_ok(login, password, server)

    def _credentials_ok(self, login: int | None, password: str | None, server: str | None) -> bool:
        account = self._account
        wrong = (
            (login is not None and login != account.login)
            or (server is not None and server != account.server)
            or (account.password is not None and password != account.password)
        )
        if wrong:
            self._fail(api.RES_E_AUTH_FAILED, "Terminal: Authorization failed")
        return not wrong

    def shutdown(self) -> None:
        with self._lock:
            self._connected = False

    def last_error(self) -> tuple[int, str]:
        with self._lock:
            return self._error

    # ------------------------------------------------------------------ time and prices
    def _server_ms(self) -> int:
        return int(self._clock() * 1000) + self._offset_ms

    def _stamp(self) -> int:
        """Server time (ms) of a new record; never goes backwards so history stays sorted."""
        self._last_stamp = max(self._server_ms(), self._last_stamp)
        return self._last_stamp

    def _tick(self, name: str) -> api.Tick:
        symbol = self._symbols[name]
        interval = self._config.tick_interval_ms
        moment = self._schedules[name].last_open(self._clock())
        quantum = int(moment * 1000) // interval
        cached = self._tick_cache.get(name)
        if cached is not None and cached[0] == quantum:
            return cached[1]
        utc_ms = quantum * interval
        spread = symbol.spread_points * symbol.point
        bid = round(self._paths[name].mid(utc_ms / 1000.0) - spread / 2, symbol.digits)
        ask = round(bid + spread, symbol.digits)
        server_ms = utc_ms + self._offset_ms
        tick = api.Tick(
            time=server_ms // 1000,
            bid=bid,
            ask=ask,
            last=0.0,
            volume=0,
            time_msc=server_ms,
            flags=6,  # TICK_FLAG_BID | TICK_FLAG_ASK
            volume_real=0.0,
        )
        self._tick_cache[name] = (quantum, tick)
        return tick

    def _is_open(self, name: str) -> bool:
        return self._schedules[name].is_open(self._clock())

    def _rate(self, currency: str) -> float:
        """Value of one unit of ``currency`` in the account currency (mid price)."""
        account = self._account.currency
        if currency == account:
            return 1.0
        direct = self._rate_symbols.get((currency, account))
        if direct is not None:
            tick = self._tick(direct)
            return (tick.bid + tick.ask) / 2
        inverse = self._rate_symbols.get((account, currency))
        if inverse is not None:
            tick = self._tick(inverse)
            return 2 / (tick.bid + tick.ask)
        return 1.0  # no conversion path configured: treat as account currency

    def _calc_margin(self, symbol: SimSymbol, volume: float, price: float) -> float:
        leverage = max(self._account.leverage, 1)
        if symbol.margin_calc == "cfd":
            return (
                volume
                * symbol.contract_size
                * price
                / leverage
                * self._rate(symbol.currency_profit)
            )
        base_margin = volume * symbol.contract_size / leverage  # in the margin currency
        if (
            symbol.currency_margin == symbol.currency_base
            and symbol.currency_profit == self._account.currency
        ):
            return base_margin * price
        return base_margin * self._rate(symbol.currency_margin)

    def _floating(self) -> float:
        total = 0.0
        for name, (buy_v, buy_vp, sell_v, sell_vp) in self._exposure.items():
            if not (buy_v or sell_v):
                continue
            symbol = self._symbols[name]
            tick = self._tick(name)
            profit = (tick.bid * buy_v - buy_vp) + (sell_vp - tick.ask * sell_v)
            total += profit * symbol.contract_size * self._rate(symbol.currency_profit)
        return total

    def _position_profit(self, position: PositionRecord) -> tuple[float, float]:
        symbol = self._symbols[position.symbol]
        tick = self._tick(position.symbol)
        if position.type == api.POSITION_TYPE_BUY:
            current, move = tick.bid, tick.bid - position.price_open
        else:
            current, move = tick.ask, position.price_open - tick.ask
        profit = move * position.volume * symbol.contract_size
        return current, round(profit * self._rate(symbol.currency_profit), 2)

    # ------------------------------------------------------------------ information
    def terminal_info(self) -> api.TerminalInfo | None:
        with self._lock:
            if not self._begin("terminal_info"):
                return None
            return api.TerminalInfo(
                connected=True,
                trade_allowed=self._terminal_trade_allowed,
                tradeapi_disabled=False,
                build=self._config.build,
                ping_last=500,
                company=self._account.company,
                name="MetaTrader 5 (simulated)",
                path="sim://terminal",
            )

    def account_info(self) -> api.AccountInfo | None:
        with self._lock:
            if not self._begin("account_info"):
                return None
            return self._account_info()

    def _account_info(self) -> api.AccountInfo:
        account = self._account
        equity = self._balance + self._floating()
        margin = self._margin_used
        return api.AccountInfo(
            login=account.login,
            trade_mode=0,  # demo
            leverage=account.leverage,
            trade_allowed=account.trade_allowed,
            trade_expert=account.trade_expert,
            margin_mode=account.margin_mode,
            currency_digits=2,
            balance=round(self._balance, 2),
            credit=0.0,
            profit=round(equity - self._balance, 2),
            equity=round(equity, 2),
            margin=round(margin, 2),
            margin_free=round(equity - margin, 2),
            margin_level=round(equity / margin * 100, 2) if margin else 0.0,
            name=account.name,
            server=account.server,
            currency=account.currency,
            company=account.company,
        )

    def _symbol_info(self, name: str) -> api.SymbolInfo:
        symbol = self._symbols[name]
        tick = self._tick(name)
        selected = name in self._selected
        tick_value = symbol.contract_size * symbol.point * self._rate(symbol.currency_profit)
        return api.SymbolInfo(
            name=name,
            visible=selected,
            select=selected,
            digits=symbol.digits,
            point=symbol.point,
            spread=symbol.spread_points,
            trade_contract_size=symbol.contract_size,
            trade_tick_size=symbol.point,
            trade_tick_value=tick_value,
            volume_min=symbol.volume_min,
            volume_max=symbol.volume_max,
            volume_step=symbol.volume_step,
            trade_mode=symbol.trade_mode,
            trade_exemode=symbol.trade_exemode,
            filling_mode=symbol.filling_mode,
            currency_base=symbol.currency_base,
            currency_profit=symbol.currency_profit,
            currency_margin=symbol.currency_margin,
            bid=tick.bid if selected else 0.0,
            ask=tick.ask if selected else 0.0,
            time=tick.time if selected else 0,
            description=symbol.description,
            path=symbol.path,
        )

    def symbols_get(self, group: str | None = None) -> tuple[api.SymbolInfo, ...] | None:
        with self._lock:
            if not self._begin("symbols_get"):
                return None
            return tuple(self._symbol_info(n) for n in self._symbols if _group_matches(n, group))

    def symbol_info(self, symbol: str) -> api.SymbolInfo | None:
        with self._lock:
            if not self._begin("symbol_info"):
                return None
            if symbol not in self._symbols:
                self._fail(api.RES_E_NOT_FOUND, "Terminal: Not found")
                return None
            return self._symbol_info(symbol)

    def symbol_info_tick(self, symbol: str) -> api.Tick | None:
        with self._lock:
            if not self._begin("symbol_info_tick"):
                return None
            if symbol not in self._symbols or symbol not in self._selected:
                # like the real terminal: no ticks for a symbol outside Market Watch
                self._fail(api.RES_E_NOT_FOUND, "Terminal: Not found")
                return None
            return self._tick(symbol)

    def symbol_select(self, symbol: str, enable: bool = True) -> bool:
        with self._lock:
            if not self._begin("symbol_select"):
                return False
            if symbol not in self._symbols:
                self._fail(api.RES_E_NOT_FOUND, "Terminal: Not found")
                return False
            if enable:
                self._selected.add(symbol)
                return True
            if self._by_symbol.get(symbol) or any(
                o.symbol == symbol for o in self._open_orders.values()
            ):
                self._fail(api.RES_E_FAIL, "Terminal: Call failed (symbol in use)")
                return False
            self._selected.discard(symbol)
            return True

    def order_calc_margin(
        self, action: int, symbol: str, volume: float, price: float
    ) -> float | None:
        with self._lock:
            if not self._begin("order_calc_margin"):
                return None
            if action not in (api.ORDER_TYPE_BUY, api.ORDER_TYPE_SELL):
                self._fail(api.RES_E_INVALID_PARAMS, 'Invalid "action" argument')
                return None
            if symbol not in self._symbols:
                self._fail(api.RES_E_NOT_FOUND, "Terminal: Not found")
                return None
            return round(self._calc_margin(self._symbols[symbol], volume, price), 2)

    # ------------------------------------------------------------------ trading
    def order_check(self, request: dict[str, Any]) -> api.OrderCheckResult | None:
        with self._lock:
            if not self._begin("order_check"):
                return None
            try:
                echo = _parse_request(request)
            except _BindingError as exc:
                self._fail(exc.code, exc.message)
                return None
            info = self._account_info()
            retcode, margin = self._validate_deal(echo)
            if retcode == 0 and echo.action != api.TRADE_ACTION_DEAL:
                retcode = api.TRADE_RETCODE_INVALID
            comment = "Done" if retcode == 0 else RETCODE_COMMENTS.get(retcode, "Rejected")
            margin_after = info.margin + (margin if retcode == 0 else 0.0)
            return api.OrderCheckResult(
                retcode=retcode,
                balance=info.balance,
                equity=info.equity,
                profit=info.profit,
                margin=round(margin_after, 2),
                margin_free=round(info.equity - margin_after, 2),
                margin_level=round(info.equity / margin_after * 100, 2) if margin_after else 0.0,
                comment=comment,
                request=echo,
            )

    def order_send(self, request: dict[str, Any]) -> api.OrderSendResult | None:
        with self._lock:
            if not self._begin("order_send"):
                return None
            try:
                echo = _parse_request(request)
            except _BindingError as exc:
                self._fail(exc.code, exc.message)
                return None
            req = _Request(echo, self._next_request)
            self._next_request += 1
            if echo.action == api.TRADE_ACTION_REMOVE:
                return self._remove(req)
            if echo.action != api.TRADE_ACTION_DEAL:
                return self._result(api.TRADE_RETCODE_INVALID, req)
            return self._deal(req)

    def _validate_deal(self, echo: api.TradeRequest) -> tuple[int, float]:
        """The server's checks of a market order: (retcode or 0, margin it needs)."""
        if echo.action != api.TRADE_ACTION_DEAL:
            return 0, 0.0
        if not self._terminal_trade_allowed:
            return api.TRADE_RETCODE_CLIENT_DISABLES_AT, 0.0
        symbol = self._symbols.get(echo.symbol)
        if symbol is None:
            return api.TRADE_RETCODE_INVALID, 0.0
        if echo.type not in (api.ORDER_TYPE_BUY, api.ORDER_TYPE_SELL):
            return api.TRADE_RETCODE_INVALID_ORDER, 0.0
        if not self._account.trade_allowed:
            return api.TRADE_RETCODE_TRADE_DISABLED, 0.0
        if not self._account.trade_expert:
            return api.TRADE_RETCODE_SERVER_DISABLES_AT, 0.0
        volume = echo.volume
        steps = volume / symbol.volume_step
        if (
            volume < symbol.volume_min - _EPS
            or volume > symbol.volume_max + _EPS
            or abs(steps - round(steps)) > 1e-6
        ):
            return api.TRADE_RETCODE_INVALID_VOLUME, 0.0
        is_buy = echo.type == api.ORDER_TYPE_BUY
        closing = 0.0  # volume of this deal that reduces an existing position
        if echo.position:
            position = self._positions.get(echo.position)
            if position is None or position.symbol != echo.symbol:
                return api.TRADE_RETCODE_POSITION_CLOSED, 0.0
            if (position.type == api.POSITION_TYPE_BUY) == is_buy:
                return api.TRADE_RETCODE_INVALID, 0.0
            if volume > position.volume + _EPS:
                return api.TRADE_RETCODE_INVALID_VOLUME, 0.0
            closing = volume
        elif self._account.margin_mode != api.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING:
            ticket = self._netting.get(echo.symbol)
            if ticket is not None:
                position = self._positions[ticket]
                if (position.type == api.POSITION_TYPE_BUY) != is_buy:
                    closing = min(volume, position.volume)
        opening = max(0.0, volume - closing)
        mode = symbol.trade_mode
        if (
            mode == api.SYMBOL_TRADE_MODE_DISABLED
            or (opening > _EPS and mode == api.SYMBOL_TRADE_MODE_CLOSEONLY)
            or (opening > _EPS and mode == api.SYMBOL_TRADE_MODE_LONGONLY and not is_buy)
            or (opening > _EPS and mode == api.SYMBOL_TRADE_MODE_SHORTONLY and is_buy)
        ):
            return api.TRADE_RETCODE_TRADE_DISABLED, 0.0
        if not self._is_open(echo.symbol):
            return api.TRADE_RETCODE_MARKET_CLOSED, 0.0
        if echo.type_filling not in self._allowed_fillings(symbol):
            return api.TRADE_RETCODE_INVALID_FILL, 0.0
        if symbol.trade_exemode in (
            api.SYMBOL_TRADE_EXECUTION_INSTANT,
            api.SYMBOL_TRADE_EXECUTION_REQUEST,
        ):
            if echo.price <= 0:
                return api.TRADE_RETCODE_INVALID_PRICE, 0.0
            tick = self._tick(echo.symbol)
            current = tick.ask if is_buy else tick.bid
            if abs(echo.price - current) > echo.deviation * symbol.point + _EPS:
                return api.TRADE_RETCODE_REQUOTE, 0.0
        tick = self._tick(echo.symbol)
        price = tick.ask if is_buy else tick.bid
        margin = self._calc_margin(symbol, opening, price) if opening > _EPS else 0.0
        if margin > self._balance + self._floating() - self._margin_used + _EPS:
            return api.TRADE_RETCODE_NO_MONEY, margin
        return 0, margin

    @staticmethod
    def _allowed_fillings(symbol: SimSymbol) -> tuple[int, ...]:
        allowed: list[int] = []
        if symbol.filling_mode & api.SYMBOL_FILLING_FOK:
            allowed.append(api.ORDER_FILLING_FOK)
        if symbol.filling_mode & api.SYMBOL_FILLING_IOC:
            allowed.append(api.ORDER_FILLING_IOC)
        if symbol.trade_exemode == api.SYMBOL_TRADE_EXECUTION_EXCHANGE:
            allowed.append(api.ORDER_FILLING_RETURN)
        elif symbol.trade_exemode != api.SYMBOL_TRADE_EXECUTION_MARKET and not allowed:
            allowed.append(api.ORDER_FILLING_FOK)  # request/instant: FOK is always possible
        return tuple(allowed)

    def _next_fault(self, instant: bool) -> str:
        if self._scripted:
            return self._scripted.popleft()
        faults = self._faults
        rng = self._fault_rng
        draws = (
            ("too_many_requests", faults.too_many_requests_rate),
            ("reject", faults.reject_rate),
            ("requote", faults.requote_rate if instant else 0.0),
            ("timeout_executed" if faults.timeout_executes else "timeout", faults.timeout_rate),
            ("no_result", faults.no_result_rate),
            ("lost_reply", faults.lost_reply_rate),
        )
        for name, rate in draws:
            if rate and rng.random() < rate:
                return name
        return "ok"

    def _deal(self, req: _Request) -> api.OrderSendResult | None:
        echo = req.echo
        retcode, _ = self._validate_deal(echo)
        if retcode:
            return self._result(retcode, req)
        symbol = self._symbols[echo.symbol]
        instant = symbol.trade_exemode in (
            api.SYMBOL_TRADE_EXECUTION_INSTANT,
            api.SYMBOL_TRADE_EXECUTION_REQUEST,
        )
        fault = self._next_fault(instant)
        assert fault in SCRIPTED_OUTCOMES
        if fault == "no_result":
            self._fail(api.RES_E_FAIL, "Terminal: Call failed")
            return None
        if fault in _SCRIPTED_RETCODES:
            return self._result(_SCRIPTED_RETCODES[fault], req)
        result = self._execute(req, symbol, instant)
        if fault == "lost_reply" and result.retcode in (
            api.TRADE_RETCODE_DONE,
            api.TRADE_RETCODE_DONE_PARTIAL,
            api.TRADE_RETCODE_PLACED,
        ):
            self._fail(api.RES_E_INTERNAL_FAIL_TIMEOUT, "IPC timeout")
            return None
        if fault == "timeout_executed" and result.retcode == api.TRADE_RETCODE_DONE:
            return result._replace(
                retcode=api.TRADE_RETCODE_TIMEOUT,
                comment=RETCODE_COMMENTS[api.TRADE_RETCODE_TIMEOUT],
            )
        return result

    def _execute(self, req: _Request, symbol: SimSymbol, instant: bool) -> api.OrderSendResult:
        echo = req.echo
        tick = self._tick(echo.symbol)
        is_buy = req.is_buy
        now = self._stamp()
        liquidity = _floor_step(symbol.liquidity_lots, symbol.volume_step)
        order = OrderRecord(
            ticket=self._next_order,
            symbol=echo.symbol,
            type=echo.type,
            type_filling=echo.type_filling,
            state=api.ORDER_STATE_STARTED,
            magic=echo.magic,
            position_id=0,
            volume_initial=echo.volume,
            volume_current=echo.volume,
            price_open=echo.price,
            time_setup_msc=now,
            time_done_msc=0,
            comment=echo.comment,
        )
        if echo.type_filling == api.ORDER_FILLING_RETURN:
            self._next_order += 1
            order.state = api.ORDER_STATE_PLACED
            self._orders[order.ticket] = order
            self._open_orders[order.ticket] = order
            self._pending_fills[order.ticket] = self._clock() + symbol.exchange_fill_delay_seconds
            self._save_order(order)
            self._save_meta()
            self._commit()
            return self._result(
                api.TRADE_RETCODE_PLACED, req, order=order.ticket, volume=echo.volume, tick=tick
            )
        volume = echo.volume
        if volume > liquidity + _EPS:
            if echo.type_filling == api.ORDER_FILLING_FOK or liquidity < symbol.volume_min:
                return self._result(api.TRADE_RETCODE_REJECT, req, tick=tick)
            volume = liquidity
        if instant:
            price = echo.price
        else:
            price = self._slipped(symbol, tick.ask if is_buy else tick.bid, is_buy)
        self._next_order += 1
        deal = self._fill(order, volume, price, echo.position or None, now)
        retcode = api.TRADE_RETCODE_DONE
        if order.volume_current > _EPS:
            retcode = api.TRADE_RETCODE_DONE_PARTIAL
        self._finish_order(order, api.ORDER_STATE_PARTIAL if retcode == 10010 else None, now)
        self._save_meta()
        self._commit()
        return self._result(
            retcode,
            req,
            deal=deal.ticket,
            order=order.ticket,
            volume=volume,
            price=price,
            tick=tick,
        )

    def _slipped(self, symbol: SimSymbol, price: float, is_buy: bool) -> float:
        if not self._slip_values:
            return price
        draw = self._slip_rng.random() * self._slip_cumulative[-1]
        points = self._slip_values[
            min(bisect.bisect_right(self._slip_cumulative, draw), len(self._slip_values) - 1)
        ]
        signed = points if is_buy else -points
        return round(price + signed * symbol.point, symbol.digits)

    def _finish_order(self, order: OrderRecord, state: int | None, now: int) -> None:
        """Move a filled/cancelled order into history."""
        order.state = state if state is not None else api.ORDER_STATE_FILLED
        order.time_done_msc = now
        self._orders[order.ticket] = order
        self._open_orders.pop(order.ticket, None)
        self._pending_fills.pop(order.ticket, None)
        self._history_orders.append(order)
        self._history_order_times.append(now)
        if order.position_id:
            self._orders_by_position.setdefault(order.position_id, []).append(order)
        self._save_order(order)

    def _fill(
        self, order: OrderRecord, volume: float, price: float, position: int | None, now: int
    ) -> DealRecord:
        """One deal of ``order``: update positions, balance and history."""
        symbol = self._symbols[order.symbol]
        is_buy = order.type == api.ORDER_TYPE_BUY
        hedging = self._account.margin_mode == api.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING
        target: PositionRecord | None = None
        if position is not None:
            target = self._positions[position]
        elif not hedging and order.symbol in self._netting:
            target = self._positions[self._netting[order.symbol]]
        profit = 0.0
        entry = api.DEAL_ENTRY_IN
        if target is None:
            target = PositionRecord(
                ticket=order.ticket,
                identifier=order.ticket,
                symbol=order.symbol,
                type=api.POSITION_TYPE_BUY if is_buy else api.POSITION_TYPE_SELL,
                magic=order.magic,
                volume=0.0,
                price_open=price,
                time_msc=now,
                time_update_msc=now,
                comment=order.comment,
                margin=0.0,
            )
        else:
            self._expose(target, -1)
            self._drop_position(target.ticket)
        same_side = (target.type == api.POSITION_TYPE_BUY) == is_buy
        if same_side:
            total = target.volume + volume
            target.price_open = round(
                (target.price_open * target.volume + price * volume) / total, symbol.digits + 3
            )
            target.volume = round(total, 8)
            target.margin += self._calc_margin(symbol, volume, price)
        else:
            closed = min(volume, target.volume)
            sign = 1.0 if target.type == api.POSITION_TYPE_BUY else -1.0
            profit = round(
                (price - target.price_open)
                * sign
                * closed
                * symbol.contract_size
                * self._rate(symbol.currency_profit),
                2,
            )
            self._balance += profit
            target.margin *= (target.volume - closed) / target.volume
            target.volume = round(target.volume - closed, 8)
            remainder = round(volume - closed, 8)
            entry = api.DEAL_ENTRY_OUT
            if remainder > _EPS:  # netting reversal: same identifier, new ticket and side
                entry = api.DEAL_ENTRY_INOUT
                target.ticket = order.ticket
                target.type = api.POSITION_TYPE_BUY if is_buy else api.POSITION_TYPE_SELL
                target.volume = remainder
                target.price_open = price
                target.margin = self._calc_margin(symbol, remainder, price)
        target.time_update_msc = now
        order.position_id = target.identifier
        order.volume_current = round(order.volume_current - volume, 8)
        if order.price_open == 0.0 or order.state == api.ORDER_STATE_STARTED:
            order.price_open = price
        if target.volume > _EPS:
            self._add_position(target)
            if not hedging:
                self._netting[target.symbol] = target.ticket
            self._expose(target, +1)
            self._save_position(target)
        elif not hedging:
            self._netting.pop(target.symbol, None)
        deal = DealRecord(
            ticket=self._next_deal,
            order=order.ticket,
            time_msc=now,
            type=api.DEAL_TYPE_BUY if is_buy else api.DEAL_TYPE_SELL,
            entry=entry,
            magic=order.magic,
            position_id=target.identifier,
            volume=volume,
            price=price,
            profit=profit,
            symbol=order.symbol,
            comment=order.comment,
        )
        self._next_deal += 1
        self._add_deal(deal)
        if self._store is not None:
            self._store.put_deal(deal)
        return deal

    def _add_deal(self, deal: DealRecord) -> None:
        self._deals.append(deal)
        self._deal_times.append(deal.time_msc)
        self._deals_by_order.setdefault(deal.order, []).append(deal)
        self._deals_by_position.setdefault(deal.position_id, []).append(deal)

    def _expose(self, position: PositionRecord, sign: int) -> None:
        """Add (+1) or remove (-1) a position from the equity and margin aggregates."""
        if position.volume <= 0:
            return
        sums = self._exposure.setdefault(position.symbol, [0.0, 0.0, 0.0, 0.0])
        offset = 0 if position.type == api.POSITION_TYPE_BUY else 2
        sums[offset] += sign * position.volume
        sums[offset + 1] += sign * position.volume * position.price_open
        self._margin_used += sign * position.margin
        if abs(self._margin_used) < 1e-6:
            self._margin_used = 0.0

    def _remove(self, req: _Request) -> api.OrderSendResult:
        order = self._open_orders.get(req.echo.order)
        if order is None:
            return self._result(api.TRADE_RETCODE_INVALID, req)
        self._finish_order(order, api.ORDER_STATE_CANCELED, self._stamp())
        self._save_meta()
        self._commit()
        return self._result(api.TRADE_RETCODE_DONE, req, order=order.ticket)

    def _pump(self) -> None:
        """Fill RETURN orders on exchange-execution symbols whose delay has elapsed."""
        now = self._clock()
        for ticket, due in list(self._pending_fills.items()):
            order = self._open_orders.get(ticket)
            if order is None:
                self._pending_fills.pop(ticket, None)
                continue
            if now < due or not self._is_open(order.symbol):
                continue
            symbol = self._symbols[order.symbol]
            volume = min(
                order.volume_current, _floor_step(symbol.liquidity_lots, symbol.volume_step)
            )
            tick = self._tick(order.symbol)
            is_buy = order.type == api.ORDER_TYPE_BUY
            price = self._slipped(symbol, tick.ask if is_buy else tick.bid, is_buy)
            stamp = self._stamp()
            self._fill(order, volume, price, None, stamp)
            if order.volume_current > _EPS:
                order.state = api.ORDER_STATE_PARTIAL
                self._pending_fills[ticket] = now + symbol.exchange_fill_delay_seconds
                self._save_order(order)
            else:
                self._finish_order(order, None, stamp)
        self._save_meta()
        self._commit()

    def _result(
        self,
        retcode: int,
        req: _Request,
        *,
        deal: int = 0,
        order: int = 0,
        volume: float = 0.0,
        price: float = 0.0,
        tick: api.Tick | None = None,
    ) -> api.OrderSendResult:
        if tick is None and req.echo.symbol in self._symbols:
            tick = self._tick(req.echo.symbol)
        return api.OrderSendResult(
            retcode=retcode,
            deal=deal,
            order=order,
            volume=volume,
            price=price,
            bid=tick.bid if tick else 0.0,
            ask=tick.ask if tick else 0.0,
            comment=RETCODE_COMMENTS.get(retcode, "Rejected"),
            request_id=req.request_id,
            retcode_external=0,
            request=req.echo,
        )

    # ------------------------------------------------------------------ open state
    def _price_for(self, name: str, order_type: int) -> float:
        tick = self._tick(name)
        return tick.ask if order_type == api.ORDER_TYPE_BUY else tick.bid

    def orders_get(
        self, symbol: str | None = None, group: str | None = None, ticket: int | None = None
    ) -> tuple[api.TradeOrder, ...] | None:
        with self._lock:
            if not self._begin("orders_get"):
                return None
            orders: Iterable[OrderRecord] = self._open_orders.values()
            if ticket is not None:
                found = self._open_orders.get(ticket)
                orders = () if found is None else (found,)
            return tuple(
                o.to_api(self._price_for(o.symbol, o.type))
                for o in orders
                if (symbol is None or o.symbol == symbol) and _group_matches(o.symbol, group)
            )

    def positions_get(
        self, symbol: str | None = None, group: str | None = None, ticket: int | None = None
    ) -> tuple[api.TradePosition, ...] | None:
        with self._lock:
            if not self._begin("positions_get"):
                return None
            positions: Iterable[PositionRecord] = self._positions.values()
            if ticket is not None:
                found = self._positions.get(ticket)
                positions = () if found is None else (found,)
            elif symbol is not None:
                positions = self._by_symbol.get(symbol, {}).values()
            return tuple(
                p.to_api(*self._position_profit(p))
                for p in sorted(positions, key=lambda p: p.ticket)
                if (symbol is None or p.symbol == symbol) and _group_matches(p.symbol, group)
            )

    # ------------------------------------------------------------------ history
    def history_orders_get(
        self,
        date_from: api.DateLike | None = None,
        date_to: api.DateLike | None = None,
        group: str | None = None,
        ticket: int | None = None,
        position: int | None = None,
    ) -> tuple[api.TradeOrder, ...] | None:
        """Orders in history. By ``ticket`` or ``position``, else those done in the window."""
        with self._lock:
            if not self._begin("history_orders_get"):
                return None
            if ticket is not None:
                found = self._orders.get(ticket)
                selected: Iterable[OrderRecord] = (
                    () if found is None or ticket in self._open_orders else (found,)
                )
            elif position is not None:
                selected = self._orders_by_position.get(position, ())
            else:
                window = self._window(date_from, date_to, self._history_order_times)
                if window is None:
                    return None
                selected = self._history_orders[window[0] : window[1]]
            return tuple(
                o.to_api(o.price_open) for o in selected if _group_matches(o.symbol, group)
            )

    def history_deals_get(
        self,
        date_from: api.DateLike | None = None,
        date_to: api.DateLike | None = None,
        group: str | None = None,
        ticket: int | None = None,
        position: int | None = None,
    ) -> tuple[api.TradeDeal, ...] | None:
        """Deals by ORDER ``ticket``, by ``position`` id, else those in the window."""
        with self._lock:
            if not self._begin("history_deals_get"):
                return None
            if ticket is not None:
                selected: Iterable[DealRecord] = self._deals_by_order.get(ticket, ())
            elif position is not None:
                selected = self._deals_by_position.get(position, ())
            else:
                window = self._window(date_from, date_to, self._deal_times)
                if window is None:
                    return None
                selected = self._deals[window[0] : window[1]]
            return tuple(d.to_api() for d in selected if _group_matches(d.symbol, group))

    def _window(
        self, date_from: api.DateLike | None, date_to: api.DateLike | None, times: list[int]
    ) -> tuple[int, int] | None:
        if date_from is None or date_to is None:
            self._fail(api.RES_E_INVALID_PARAMS, "Invalid arguments")
            return None
        start = _server_seconds(date_from) * 1000
        end = _server_seconds(date_to) * 1000 + 999
        return bisect.bisect_left(times, start), bisect.bisect_right(times, end)

    # ------------------------------------------------------------------ persistence
    def _save_order(self, order: OrderRecord) -> None:
        if self._store is not None:
            self._store.put_order(order)

    def _save_position(self, position: PositionRecord) -> None:
        if self._store is not None:
            self._store.put_position(position)

    def _add_position(self, position: PositionRecord) -> None:
        self._positions[position.ticket] = position
        self._by_symbol.setdefault(position.symbol, {})[position.ticket] = position

    def _drop_position(self, ticket: int) -> None:
        position = self._positions.pop(ticket, None)
        if position is not None:
            self._by_symbol.get(position.symbol, {}).pop(ticket, None)
        if self._store is not None:
            self._store.delete_position(ticket)

    def _save_meta(self) -> None:
        if self._store is not None:
            self._store.put_meta(
                "state",
                {
                    "balance": self._balance,
                    "next_order": self._next_order,
                    "next_deal": self._next_deal,
                    "next_request": self._next_request,
                    "last_stamp": self._last_stamp,
                },
            )

    def _commit(self) -> None:
        if self._store is not None:
            self._store.commit()

    def _load(self, store: SimStore) -> None:
        loaded = store.load()
        state = loaded.meta.get("state")
        if state is not None:
            self._balance = float(state["balance"])
            self._next_order = int(state["next_order"])
            self._next_deal = int(state["next_deal"])
            self._next_request = int(state["next_request"])
            self._last_stamp = int(state["last_stamp"])
        for deal in loaded.deals:
            self._add_deal(deal)
        now = self._clock()
        history: list[OrderRecord] = []
        for order in loaded.orders:
            self._orders[order.ticket] = order
            if order.state in _OPEN_STATES and not order.time_done_msc:
                self._open_orders[order.ticket] = order
                self._pending_fills[order.ticket] = now
                continue
            history.append(order)
            if order.position_id:
                self._orders_by_position.setdefault(order.position_id, []).append(order)
        history.sort(key=lambda o: (o.time_done_msc, o.ticket))
        self._history_orders = history
        self._history_order_times = [o.time_done_msc for o in history]
        hedging = self._account.margin_mode == api.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING
        for position in loaded.positions:
            self._add_position(position)
            if not hedging:
                self._netting[position.symbol] = position.ticket
            self._expose(position, +1)
        for name in {p.symbol for p in loaded.positions} | {
            o.symbol for o in self._open_orders.values()
        }:
            if name in self._symbols:
                self._selected.add(name)
