"""A faithful simulated MetaTrader 5 terminal and broker (implements ``api.Terminal``).

The default backend of the demo and the broker of the tests. It validates requests like the
real trade server (retcodes of DOMAIN.md section 2), keeps server time in the broker's zone
(not UTC), follows a weekly market schedule, fills market orders with slippage and limited
liquidity, keeps netting or hedging positions and the order/deal history with the real field
names, and can inject the faults the worker must survive (latency, disconnects, lost replies,
timeouts, requotes, orders that execute long after an unknown outcome...). With
``state_path`` the broker state persists in SQLite.

It can also be as hard as a real server (cut comments, lagging deals, failing queries, a DST
clock, filling by execution mode, the rarer retcodes...): every such behaviour is a switch of
``FaultConfig``, all listed in :mod:`worker.mt5.sim.config`, all on with
``SimConfig.hardened()`` / ``FaultConfig.hardened()`` / ``preset = "hardened"`` in TOML.

``SimTerminal`` is the module-shaped facade; the work is done by its parts:

- :mod:`~worker.mt5.sim.config` configuration (symbols, account, fault knobs, TOML)
- :mod:`~worker.mt5.sim.clock` server time
- :mod:`~worker.mt5.sim.market` symbols, Market Watch, ticks, trading hours
- :mod:`~worker.mt5.sim.margin` balance, rates, margin, account figures, permissions
- :mod:`~worker.mt5.sim.binding` what the Python binding refuses (None + last_error)
- :mod:`~worker.mt5.sim.rules` the server's checks of an order
- :mod:`~worker.mt5.sim.retcodes` retcodes and reply comments (incl. 10038, 10042-10046)
- :mod:`~worker.mt5.sim.fills` execution, deals, positions (netting and hedging)
- :mod:`~worker.mt5.sim.faults` injected faults and scripted outcomes
- :mod:`~worker.mt5.sim.book` orders, deals, positions and their lookups
- :mod:`~worker.mt5.sim.state` records and the SQLite state file
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from worker.mt5 import api
from worker.mt5.calls import failed_answer
from worker.mt5.sim.binding import CallFailed, parse_request
from worker.mt5.sim.book import Book, group_matches
from worker.mt5.sim.clock import ServerClock
from worker.mt5.sim.config import FaultConfig, SimAccount, SimConfig, SimSymbol, default_symbols
from worker.mt5.sim.faults import FaultInjector
from worker.mt5.sim.fills import Dealer
from worker.mt5.sim.margin import Ledger
from worker.mt5.sim.market import Market
from worker.mt5.sim.retcodes import RETCODE_COMMENTS
from worker.mt5.sim.rules import Rules
from worker.mt5.sim.state import SimStore, iter_deals

__all__ = [
    "RETCODE_COMMENTS",
    "FaultConfig",
    "SimAccount",
    "SimConfig",
    "SimSymbol",
    "SimTerminal",
    "default_symbols",
    "iter_deals",
]

P = ParamSpec("P")
R = TypeVar("R")
Method = Callable[Concatenate["SimTerminal", P], R]


def _terminal_call(name: str) -> Callable[[Method[P, R]], Method[P, R]]:
    """A call of the terminal API: under the lock, after the latency, connection and fault
    checks of ``SimTerminal._begin``; answers the call table's failed answer when those
    fail (False for a bool call, else None)."""
    failed = failed_answer(name)

    def decorate(method: Method[P, R]) -> Method[P, R]:
        @functools.wraps(method)
        def wrapper(self: SimTerminal, /, *args: P.args, **kwargs: P.kwargs) -> R:
            with self._lock:
                if not self._begin(name):
                    return cast(R, failed)
                return method(self, *args, **kwargs)

        return wrapper

    return decorate


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
        self._lock = threading.RLock()
        self._connected = False
        self._error: tuple[int, str] = (api.RES_S_OK, "Success")
        self._clock = ServerClock(clock, self._config.server_utc_offset_seconds)
        self._market = Market(self._config, self._clock)
        self._ledger = Ledger(self._config, self._market)
        self._faults = FaultInjector(self._config)
        self._book = Book(SimStore(state_path) if state_path is not None else None)
        self._rules = Rules(self._market, self._ledger, self._book, self._faults)
        self._configure_clock()
        self._dealer = Dealer(
            self._market, self._ledger, self._book, self._clock, self._faults, self._rules
        )
        if self._book.store is not None:
            self._load(self._book.store)

    def _load(self, store: SimStore) -> None:
        state = self._book.load(store.load(), self._clock.now(), self._ledger.hedging)
        if state is not None:
            self._ledger.balance = float(state["balance"])
            offset_ms = self._config.server_utc_offset_seconds * 1000
            last_utc = state.get("last_utc_ms", int(state["last_stamp"]) - offset_ms)
            self._clock.last_utc_ms = int(last_utc)
        for position in self._book.positions.values():
            self._ledger.expose(position, +1)
        in_use = {p.symbol for p in self._book.positions.values()}
        in_use |= {o.symbol for o in self._book.open_orders.values()}
        self._market.selected |= in_use & set(self._market.symbols)

    # ------------------------------------------------------------------ control knobs
    @property
    def config(self) -> SimConfig:
        return self._config

    @property
    def faults(self) -> FaultConfig:
        return self._faults.config

    def set_faults(self, **changes: Any) -> FaultConfig:
        """Change fault knobs at run time (``FaultConfig`` field names)."""
        with self._lock:
            faults = replace(self._faults.config, **changes)
            self._faults.apply(faults, reseed="fault_seed" in changes)
            if "scripted" in changes:
                self._faults.rescript()
            self._configure_clock()
            return faults

    def _configure_clock(self) -> None:
        faults = self._faults.config
        self._clock.configure(dst=faults.dst_clock, shift_seconds=faults.clock_shift_seconds)

    @property
    def server_offset_seconds(self) -> int:
        """The server's offset from UTC now (changes with ``dst_clock``/``clock_shift_seconds``)."""
        with self._lock:
            return self._clock.offset_ms(self._clock.now()) // 1000

    @property
    def late_pending(self) -> int:
        """Orders taken with an unknown outcome that have not executed yet (``timeout_late``,
        ``lost_reply_late``); they execute at the first call after they are due."""
        with self._lock:
            return len(self._book.late_orders)

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
            ledger = self._ledger
            if terminal is not None:
                ledger.terminal_trade_allowed = terminal
            if account is not None:
                ledger.account = replace(ledger.account, trade_allowed=account)
            if expert is not None:
                ledger.account = replace(ledger.account, trade_expert=expert)

    def update_symbol(self, name: str, **changes: Any) -> SimSymbol:
        """Change a symbol's specification at run time (``SimSymbol`` field names)."""
        with self._lock:
            return self._market.update(name, **changes)

    def close(self) -> None:
        """Release the state file (the terminal is unusable afterwards)."""
        with self._lock:
            self._connected = False
            self._book.close()

    # ------------------------------------------------------------------ call plumbing
    def _fail(self, code: int, message: str) -> None:
        self._error = (code, message)

    def _begin(self, function: str) -> bool:
        delay = self._faults.call_delay_ms(function)
        if delay > 0:
            time.sleep(delay / 1000.0)
        if not self._connected:
            self._fail(api.RES_E_INTERNAL_FAIL_CONNECT, "No IPC connection")
            return False
        if self._faults.drops_connection():
            self._connected = False
            self._fail(api.RES_E_INTERNAL_FAIL_SEND, "IPC send failed")
            return False
        self._error = (api.RES_S_OK, "Success")
        if self._book.pending_fills or self._book.late_orders:
            self._dealer.pump()
        return True

    def _query_fails(self) -> bool:
        """``query_none_rate``: a history/position query answers None, the connection stays."""
        failure = self._faults.query_failure()
        if failure is not None:
            self._fail(*failure)
        return failure is not None

    def _known_symbol(self, symbol: str, *, selected: bool = False) -> bool:
        """Whether ``symbol`` exists (and, with ``selected``, is in Market Watch)."""
        market = self._market
        if symbol in market.symbols and (not selected or symbol in market.selected):
            return True
        self._fail(api.RES_E_NOT_FOUND, "Terminal: Not found")
        return False

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

    @_terminal_call("login")
    def login(
        self,
        login: int,
        *,
        password: str | None = None,
        server: str | None = None,
        timeout: int | None = None,
    ) -> bool:
        del timeout
        return self._credentials_ok(login, password, server)

    def _credentials_ok(self, login: int | None, password: str | None, server: str | None) -> bool:
        account = self._ledger.account
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

    # ------------------------------------------------------------------ information
    @_terminal_call("terminal_info")
    def terminal_info(self) -> api.TerminalInfo | None:
        return self._ledger.terminal_info(self._config.build)

    @_terminal_call("account_info")
    def account_info(self) -> api.AccountInfo | None:
        return self._ledger.account_info()._replace(fifo_close=self._faults.config.fifo_close)

    def _symbol_info(self, name: str) -> api.SymbolInfo:
        rate = self._ledger.rate(self._market.symbols[name].currency_profit)
        return self._market.symbol_info(name, rate)

    @_terminal_call("symbols_get")
    def symbols_get(self, group: str | None = None) -> tuple[api.SymbolInfo, ...] | None:
        names = self._market.symbols
        return tuple(self._symbol_info(n) for n in names if group_matches(n, group))

    @_terminal_call("symbol_info")
    def symbol_info(self, symbol: str) -> api.SymbolInfo | None:
        if not self._known_symbol(symbol, selected=self._faults.config.symbol_info_needs_select):
            return None
        return self._symbol_info(symbol)

    @_terminal_call("symbol_info_tick")
    def symbol_info_tick(self, symbol: str) -> api.Tick | None:
        # like the real terminal: no ticks for a symbol outside Market Watch
        if not self._known_symbol(symbol, selected=True):
            return None
        return self._market.tick(symbol)

    @_terminal_call("symbol_select")
    def symbol_select(self, symbol: str, enable: bool = True) -> bool:
        if not self._known_symbol(symbol):
            return False
        if enable:
            self._market.selected.add(symbol)
            return True
        if self._book.by_symbol.get(symbol) or any(
            o.symbol == symbol for o in self._book.open_orders.values()
        ):
            self._fail(api.RES_E_FAIL, "Terminal: Call failed (symbol in use)")
            return False
        self._market.selected.discard(symbol)
        return True

    @_terminal_call("order_calc_margin")
    def order_calc_margin(
        self, action: int, symbol: str, volume: float, price: float
    ) -> float | None:
        if action not in (api.ORDER_TYPE_BUY, api.ORDER_TYPE_SELL):
            self._fail(api.RES_E_INVALID_PARAMS, 'Invalid "action" argument')
            return None
        if not self._known_symbol(symbol):
            return None
        margin = self._ledger.calc_margin(self._market.symbols[symbol], volume, price)
        return round(margin, 2)

    # ------------------------------------------------------------------ trading
    @_terminal_call("order_check")
    def order_check(self, request: dict[str, Any]) -> api.OrderCheckResult | None:
        try:
            return self._rules.order_check(self._parse(request))
        except CallFailed as exc:
            self._fail(exc.code, exc.message)
            return None

    @_terminal_call("order_send")
    def order_send(self, request: dict[str, Any]) -> api.OrderSendResult | None:
        try:
            return self._dealer.send(self._parse(request))
        except CallFailed as exc:
            self._fail(exc.code, exc.message)
            return None

    def _parse(self, request: Any) -> api.TradeRequest:
        return parse_request(request, float_only=self._faults.config.float_only_binding)

    # ------------------------------------------------------------------ open state
    @_terminal_call("orders_get")
    def orders_get(
        self, symbol: str | None = None, group: str | None = None, ticket: int | None = None
    ) -> tuple[api.TradeOrder, ...] | None:
        if self._query_fails():
            return None
        found = self._book.find_open_orders(symbol, group, ticket)
        return tuple(o.to_api(self._market.price_for(o.symbol, o.type)) for o in found)

    @_terminal_call("positions_get")
    def positions_get(
        self, symbol: str | None = None, group: str | None = None, ticket: int | None = None
    ) -> tuple[api.TradePosition, ...] | None:
        if self._query_fails():
            return None
        found = self._book.find_positions(symbol, group, ticket)
        return tuple(p.to_api(*self._ledger.position_profit(p)) for p in found)

    # ------------------------------------------------------------------ history
    @_terminal_call("history_orders_get")
    def history_orders_get(
        self,
        date_from: api.DateLike | None = None,
        date_to: api.DateLike | None = None,
        group: str | None = None,
        ticket: int | None = None,
        position: int | None = None,
    ) -> tuple[api.TradeOrder, ...] | None:
        """Orders in history. By ``ticket`` or ``position``, else those done in the window."""
        if self._query_fails():
            return None
        found = self._book.find_history_orders(date_from, date_to, ticket, position)
        if found is None:
            self._fail(api.RES_E_INVALID_PARAMS, "Invalid arguments")
            return None
        return tuple(o.history_api() for o in found if group_matches(o.symbol, group))

    @_terminal_call("history_deals_get")
    def history_deals_get(
        self,
        date_from: api.DateLike | None = None,
        date_to: api.DateLike | None = None,
        group: str | None = None,
        ticket: int | None = None,
        position: int | None = None,
    ) -> tuple[api.TradeDeal, ...] | None:
        """Deals by ORDER ``ticket``, by ``position`` id, else those in the window."""
        if self._query_fails():
            return None
        self._book.reveal_deals(self._clock.now())
        found = self._book.find_deals(date_from, date_to, ticket, position)
        if found is None:
            self._fail(api.RES_E_INVALID_PARAMS, "Invalid arguments")
            return None
        return tuple(d.to_api() for d in found if group_matches(d.symbol, group))
