"""A test double of ``MetaTrader5._core`` (the compiled binding), backed by the simulator.

The real wheel's ``__init__.py`` ends with ``from ._core import *``; :mod:`tests.native.package`
puts this module in its place, so the real constants and helpers run over it on any platform.
It mimics the binding as far as the worker can tell:

- module-level functions with the binding's names and calling conventions (positional-only
  ``symbol_info(symbol)``; keyword-only filters ``positions_get(symbol=...)``, where a
  positional argument is refused with ``Unnamed arguments not allowed``; history queries take
  two dates OR ``ticket=``/``position=``);
- results are named tuples of the binding's type names with its full field lists, in its
  order (MQL5 reference, python_metatrader5 pages, e.g. mt5ordersend_py; the field-name
  table in ``_core.pyd`` of MetaTrader5 5.0.6231 lists them in the same order);
- a refused call returns None (False for initialize/login) and sets ``last_error()`` to
  ``(-2, 'Invalid "volume" argument')``-style messages, the strings of the real binding;
  in a request an int or Decimal is refused where a float is expected and a float where an
  int is expected;
- everything the binding forwards to the terminal goes to a :class:`SimTerminal` (its None
  results and ``last_error()`` pass through).

What the simulator cannot answer (rates, ticks history, depth of market, profit calculation)
returns None with ``last_error() == (-7, ...)``: the double says so rather than invent data.
"""

from __future__ import annotations

import collections
import threading
from datetime import datetime
from typing import Any

from worker.mt5 import api

__all__ = [
    "account_info",
    "copy_rates_from",
    "copy_rates_from_pos",
    "copy_rates_range",
    "copy_ticks_from",
    "copy_ticks_range",
    "history_deals_get",
    "history_deals_total",
    "history_orders_get",
    "history_orders_total",
    "initialize",
    "last_error",
    "login",
    "market_book_add",
    "market_book_get",
    "market_book_release",
    "order_calc_margin",
    "order_calc_profit",
    "order_check",
    "order_send",
    "orders_get",
    "orders_total",
    "positions_get",
    "positions_total",
    "shutdown",
    "symbol_info",
    "symbol_info_tick",
    "symbol_select",
    "symbols_get",
    "symbols_total",
    "terminal_info",
    "version",
]

# --- result types: the binding's names, fields and field order --------------------------
_B, _I, _F, _S = False, 0, 0.0, ""


def _fields(spec: str, default: Any) -> list[tuple[str, Any]]:
    return [(name, default) for name in spec.split()]


_TERMINAL_INFO = (
    _fields(
        "community_account community_connection connected dlls_allowed trade_allowed "
        "tradeapi_disabled email_enabled ftp_enabled notifications_enabled mqid",
        _B,
    )
    + _fields("build maxbars codepage ping_last", _I)
    + _fields("community_balance retransmission", _F)
    + _fields("company name language path data_path commondata_path", _S)
)
_ACCOUNT_INFO = (
    _fields("login trade_mode leverage limit_orders margin_so_mode", _I)
    + _fields("trade_allowed trade_expert", _B)
    + _fields("margin_mode currency_digits", _I)
    + _fields("fifo_close", _B)
    + _fields(
        "balance credit profit equity margin margin_free margin_level margin_so_call "
        "margin_so_so margin_initial margin_maintenance assets liabilities commission_blocked",
        _F,
    )
    + _fields("name server currency company", _S)
)
_SYMBOL_INFO = (
    _fields("custom", _B)
    + _fields("chart_mode", _I)
    + _fields("select visible", _B)
    + _fields(
        "session_deals session_buy_orders session_sell_orders volume volumehigh volumelow "
        "time digits spread",
        _I,
    )
    + _fields("spread_float", _B)
    + _fields(
        "ticks_bookdepth trade_calc_mode trade_mode start_time expiration_time "
        "trade_stops_level trade_freeze_level trade_exemode swap_mode swap_rollover3days",
        _I,
    )
    + _fields("margin_hedged_use_leg", _B)
    + _fields("expiration_mode filling_mode order_mode order_gtc_mode option_mode option_right", _I)
    + _fields(
        "bid bidhigh bidlow ask askhigh asklow last lasthigh lastlow volume_real "
        "volumehigh_real volumelow_real option_strike point trade_tick_value "
        "trade_tick_value_profit trade_tick_value_loss trade_tick_size trade_contract_size "
        "trade_accrued_interest trade_face_value trade_liquidity_rate volume_min volume_max "
        "volume_step volume_limit swap_long swap_short margin_initial margin_maintenance "
        "session_volume session_turnover session_interest session_buy_orders_volume "
        "session_sell_orders_volume session_open session_close session_aw "
        "session_price_settlement session_price_limit_min session_price_limit_max "
        "margin_hedged price_change price_volatility price_theoretical price_greeks_delta "
        "price_greeks_theta price_greeks_gamma price_greeks_vega price_greeks_rho "
        "price_greeks_omega price_sensitivity",
        _F,
    )
    + _fields(
        "basis category currency_base currency_profit currency_margin bank description "
        "exchange formula isin name page path",
        _S,
    )
)


def _same_as(kind: Any) -> list[tuple[str, Any]]:
    """Types whose ``api`` twin already has the binding's full field list and order."""
    return [(name, None) for name in kind._fields]


_SPECS: dict[str, list[tuple[str, Any]]] = {
    "TerminalInfo": _TERMINAL_INFO,
    "AccountInfo": _ACCOUNT_INFO,
    "SymbolInfo": _SYMBOL_INFO,
    "Tick": _same_as(api.Tick),
    "TradeRequest": _same_as(api.TradeRequest),
    "OrderSendResult": _same_as(api.OrderSendResult),
    "OrderCheckResult": _same_as(api.OrderCheckResult),
    "TradeOrder": _same_as(api.TradeOrder),
    "TradePosition": _same_as(api.TradePosition),
    "TradeDeal": _same_as(api.TradeDeal),
}
TYPES: dict[str, Any] = {
    name: collections.namedtuple(name, [field for field, _ in spec])
    for name, spec in _SPECS.items()
}


def _real(name: str, value: Any) -> Any:
    """The simulator's ``api`` tuple as the binding's tuple (fields it lacks: zero values)."""
    if value is None:
        return None
    values = {field: getattr(value, field, default) for field, default in _SPECS[name]}
    if "request" in values:
        values["request"] = _real("TradeRequest", values["request"])
    return TYPES[name](**values)


def _many(name: str, values: Any) -> Any:
    return None if values is None else tuple(_real(name, value) for value in values)


# --- module state: one terminal per process, like the binding ---------------------------
_lock = threading.RLock()
_terminal: api.Terminal | None = None
_refused: tuple[int, str] | None = None  # set when the binding itself refused the last call

_NO_IPC = (api.RES_E_INTERNAL_FAIL_CONNECT, "No IPC connection")
_UNSUPPORTED = (api.RES_E_UNSUPPORTED, "Terminal: Unsupported function (not simulated)")


def bind(terminal: api.Terminal | None) -> None:
    """Test control, not part of the binding: the terminal behind the module."""
    global _terminal, _refused
    with _lock:
        _terminal = terminal
        _refused = None


class _Refusal(Exception):
    def __init__(self, message: str, code: int = api.RES_E_INVALID_PARAMS) -> None:
        super().__init__(message)
        self.error = (code, message)


def _call(refused: Any, body: Any) -> Any:
    """Run ``body(terminal)``; a refusal or a missing terminal returns ``refused``."""
    global _refused
    with _lock:
        _refused = None
        if _terminal is None:
            _refused = _NO_IPC
            return refused
        try:
            return body(_terminal)
        except _Refusal as refusal:
            _refused = refusal.error
            return refused


def _no_keywords(function: str, kwargs: dict[str, Any]) -> None:
    if kwargs:  # a METH_VARARGS C function: CPython itself raises
        raise TypeError(f"{function}() takes no keyword arguments")


def _positional(args: tuple[Any, ...], count: int) -> None:
    if len(args) != count:
        raise _Refusal("Invalid number of arguments")


def _symbol(value: Any, which: str = "1st") -> str:
    if not isinstance(value, str):
        raise _Refusal(f"Invalid {which} unnamed argument")
    return value


def _keywords(args: tuple[Any, ...], kwargs: dict[str, Any], kinds: dict[str, type]) -> None:
    if args:
        raise _Refusal("Unnamed arguments not allowed")
    for key, value in kwargs.items():
        kind = kinds.get(key)
        if kind is None or not isinstance(value, kind) or (kind is int and _is_bool(value)):
            raise _Refusal(f'Invalid "{key}" argument')


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


# --- connection ---------------------------------------------------------------------------
_INIT_KEYWORDS: dict[str, type] = {
    "path": str,
    "login": int,
    "password": str,
    "server": str,
    "timeout": int,
    "portable": bool,
}


def _init_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    for key, value in kwargs.items():
        kind = _INIT_KEYWORDS.get(key)
        if kind is None or not isinstance(value, kind):
            raise _Refusal(f'Invalid "{key}" argument')
    return {key: value for key, value in kwargs.items() if key != "portable"}


def initialize(*args: Any, **kwargs: Any) -> bool:
    def body(terminal: api.Terminal) -> bool:
        if len(args) > 1:
            raise _Refusal("Invalid number of arguments")
        if args and (not isinstance(args[0], str) or "path" in kwargs):
            raise _Refusal('Invalid "path" argument')
        return terminal.initialize(*args, **_init_kwargs(kwargs))

    return bool(_call(False, body))


def login(*args: Any, **kwargs: Any) -> bool:
    def body(terminal: api.Terminal) -> bool:
        values = dict(kwargs)
        if len(args) > 1 or (args and "login" in values):
            raise _Refusal("Invalid number of arguments")
        if args:
            values["login"] = args[0]
        number = values.pop("login", None)
        if "path" in values:
            raise _Refusal('Invalid "path" argument')
        if not isinstance(number, int) or _is_bool(number):
            raise _Refusal('Invalid "login" argument')
        return terminal.login(number, **_init_kwargs(values))

    return bool(_call(False, body))


def shutdown() -> None:
    global _refused
    with _lock:
        _refused = None
        if _terminal is not None:
            _terminal.shutdown()


def last_error() -> tuple[int, str]:
    with _lock:
        if _refused is not None:
            return _refused
        if _terminal is None:
            return (api.RES_S_OK, "Success")
        return _terminal.last_error()


def version() -> tuple[int, int, str] | None:
    def body(terminal: api.Terminal) -> tuple[int, int, str] | None:
        info = terminal.terminal_info()
        return None if info is None else (500, info.build, "1 Jan 2026")

    return _call(None, body)  # type: ignore[no-any-return]


def terminal_info() -> Any:
    return _call(None, lambda t: _real("TerminalInfo", t.terminal_info()))


def account_info() -> Any:
    return _call(None, lambda t: _real("AccountInfo", t.account_info()))


# --- symbols ------------------------------------------------------------------------------
def symbols_total() -> int | None:
    def body(terminal: api.Terminal) -> int | None:
        symbols = terminal.symbols_get()
        return None if symbols is None else len(symbols)

    return _call(None, body)  # type: ignore[no-any-return]


def symbols_get(*args: Any, **kwargs: Any) -> Any:
    def body(terminal: api.Terminal) -> Any:
        _keywords(args, kwargs, {"group": str})
        return _many("SymbolInfo", terminal.symbols_get(**kwargs))

    return _call(None, body)


def symbol_info(*args: Any, **kwargs: Any) -> Any:
    _no_keywords("symbol_info", kwargs)

    def body(terminal: api.Terminal) -> Any:
        _positional(args, 1)
        return _real("SymbolInfo", terminal.symbol_info(_symbol(args[0])))

    return _call(None, body)


def symbol_info_tick(*args: Any, **kwargs: Any) -> Any:
    _no_keywords("symbol_info_tick", kwargs)

    def body(terminal: api.Terminal) -> Any:
        _positional(args, 1)
        return _real("Tick", terminal.symbol_info_tick(_symbol(args[0])))

    return _call(None, body)


def symbol_select(*args: Any, **kwargs: Any) -> bool:
    _no_keywords("symbol_select", kwargs)

    def body(terminal: api.Terminal) -> bool:
        if len(args) not in (1, 2):
            raise _Refusal("Invalid number of arguments")
        enable = args[1] if len(args) == 2 else True
        if not isinstance(enable, bool):
            raise _Refusal("Invalid 2nd unnamed argument")
        return terminal.symbol_select(_symbol(args[0]), enable)

    return bool(_call(False, body))


def _unsupported(*args: Any, **kwargs: Any) -> None:
    del args, kwargs
    global _refused
    with _lock:
        _refused = _UNSUPPORTED if _terminal is not None else _NO_IPC


def market_book_add(*args: Any, **kwargs: Any) -> bool:
    _unsupported(*args, **kwargs)
    return False


def market_book_release(*args: Any, **kwargs: Any) -> bool:
    _unsupported(*args, **kwargs)
    return False


def market_book_get(*args: Any, **kwargs: Any) -> None:
    _unsupported(*args, **kwargs)


def copy_rates_from(*args: Any, **kwargs: Any) -> None:
    _unsupported(*args, **kwargs)


def copy_rates_from_pos(*args: Any, **kwargs: Any) -> None:
    _unsupported(*args, **kwargs)


def copy_rates_range(*args: Any, **kwargs: Any) -> None:
    _unsupported(*args, **kwargs)


def copy_ticks_from(*args: Any, **kwargs: Any) -> None:
    _unsupported(*args, **kwargs)


def copy_ticks_range(*args: Any, **kwargs: Any) -> None:
    _unsupported(*args, **kwargs)


def order_calc_profit(*args: Any, **kwargs: Any) -> None:
    _unsupported(*args, **kwargs)


# --- trading ------------------------------------------------------------------------------
_FLOAT_FIELDS = frozenset({"volume", "price", "stoplimit", "sl", "tp"})
_STR_FIELDS = frozenset({"symbol", "comment"})
_INT_FIELDS = frozenset(api.TradeRequest._fields) - _FLOAT_FIELDS - _STR_FIELDS


def _request(args: tuple[Any, ...]) -> dict[str, Any]:
    """The binding reads the dict field by field, with exact C types: 1 is not a double."""
    _positional(args, 1)
    request = args[0]
    if not isinstance(request, dict):
        raise _Refusal("Invalid arguments")
    for key, value in request.items():
        if key in _FLOAT_FIELDS:
            ok = isinstance(value, float)
        elif key in _INT_FIELDS:
            ok = isinstance(value, int)
        elif key in _STR_FIELDS:
            ok = isinstance(value, str)
        else:
            ok = True  # unknown keys: left to the terminal
        if not ok:
            raise _Refusal(f'Invalid "{key}" argument')
    return request


def order_check(*args: Any, **kwargs: Any) -> Any:
    _no_keywords("order_check", kwargs)
    return _call(None, lambda t: _real("OrderCheckResult", t.order_check(_request(args))))


def order_send(*args: Any, **kwargs: Any) -> Any:
    _no_keywords("order_send", kwargs)
    return _call(None, lambda t: _real("OrderSendResult", t.order_send(_request(args))))


def order_calc_margin(*args: Any, **kwargs: Any) -> float | None:
    _no_keywords("order_calc_margin", kwargs)
    if len(args) != 4:
        raise TypeError(f"function takes exactly 4 arguments ({len(args)} given)")
    action, symbol, volume, price = args
    if not isinstance(action, int):
        raise TypeError("an integer is required")
    # PyArg "d": anything with __float__ or __index__ (an int, a Decimal) is accepted here
    volume, price = float(volume), float(price)

    def body(terminal: api.Terminal) -> float | None:
        return terminal.order_calc_margin(action, _symbol(symbol, "2nd"), volume, price)

    return _call(None, body)  # type: ignore[no-any-return]


# --- open orders, positions, history ------------------------------------------------------
_OPEN_FILTERS: dict[str, type] = {"symbol": str, "group": str, "ticket": int}


def orders_total() -> int | None:
    def body(terminal: api.Terminal) -> int | None:
        orders = terminal.orders_get()
        return None if orders is None else len(orders)

    return _call(None, body)  # type: ignore[no-any-return]


def orders_get(*args: Any, **kwargs: Any) -> Any:
    def body(terminal: api.Terminal) -> Any:
        _keywords(args, kwargs, _OPEN_FILTERS)
        return _many("TradeOrder", terminal.orders_get(**kwargs))

    return _call(None, body)


def positions_total() -> int | None:
    def body(terminal: api.Terminal) -> int | None:
        positions = terminal.positions_get()
        return None if positions is None else len(positions)

    return _call(None, body)  # type: ignore[no-any-return]


def positions_get(*args: Any, **kwargs: Any) -> Any:
    def body(terminal: api.Terminal) -> Any:
        _keywords(args, kwargs, _OPEN_FILTERS)
        return _many("TradePosition", terminal.positions_get(**kwargs))

    return _call(None, body)


def _date(value: Any, which: str) -> int:
    # the binding turns a datetime into epoch seconds like datetime.timestamp() (a naive one
    # in local time: the MQL5 reference asks for datetimes created in UTC for that reason)
    if isinstance(value, datetime):
        return int(value.timestamp())
    if isinstance(value, int) and not _is_bool(value):
        return value
    raise _Refusal(f"Invalid {which} unnamed argument")


def _history_query(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``(date_from, date_to[, group=])`` or ``ticket=`` or ``position=``, nothing mixed."""
    for key, value in kwargs.items():
        kind = {"group": str, "ticket": int, "position": int}.get(key)
        if kind is None or not isinstance(value, kind) or _is_bool(value):
            raise _Refusal(f'Invalid "{key}" argument')
    if args:
        if len(args) != 2 or "ticket" in kwargs or "position" in kwargs:
            raise _Refusal("Invalid number of arguments")
        return {
            "date_from": _date(args[0], "1st"),
            "date_to": _date(args[1], "2nd"),
            **kwargs,
        }
    if len(kwargs) != 1 or not ({"ticket", "position"} & kwargs.keys()):
        raise _Refusal("Invalid number of arguments")
    return kwargs


def history_orders_total(*args: Any, **kwargs: Any) -> int | None:
    _no_keywords("history_orders_total", kwargs)

    def body(terminal: api.Terminal) -> int | None:
        _positional(args, 2)
        orders = terminal.history_orders_get(**_history_query(args, {}))
        return None if orders is None else len(orders)

    return _call(None, body)  # type: ignore[no-any-return]


def history_orders_get(*args: Any, **kwargs: Any) -> Any:
    def body(terminal: api.Terminal) -> Any:
        return _many("TradeOrder", terminal.history_orders_get(**_history_query(args, kwargs)))

    return _call(None, body)


def history_deals_total(*args: Any, **kwargs: Any) -> int | None:
    _no_keywords("history_deals_total", kwargs)

    def body(terminal: api.Terminal) -> int | None:
        _positional(args, 2)
        deals = terminal.history_deals_get(**_history_query(args, {}))
        return None if deals is None else len(deals)

    return _call(None, body)  # type: ignore[no-any-return]


def history_deals_get(*args: Any, **kwargs: Any) -> Any:
    def body(terminal: api.Terminal) -> Any:
        return _many("TradeDeal", terminal.history_deals_get(**_history_query(args, kwargs)))

    return _call(None, body)
