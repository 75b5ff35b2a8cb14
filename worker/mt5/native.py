"""The real ``MetaTrader5`` module (Windows only) behind the :class:`api.Terminal` interface.

The module is imported when a :class:`NativeTerminal` is created, never at import time, so
this file loads on every platform. Results are converted into the ``api`` named tuples by
field name (fields the module does not report take a neutral default), so nothing else in
the worker depends on which backend runs. The module keeps one terminal connection per
process and is not thread-safe: calls are serialised by a process-wide lock.
"""

from __future__ import annotations

import importlib
import threading
import typing
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from types import ModuleType
from typing import Any, TypeVar

from worker.mt5 import api
from worker.mt5.calls import CALLS, RECORD_TYPES, given

N = TypeVar("N")

_MODULE_LOCK = threading.RLock()  # the module has process-global state
_DEFAULTS: dict[type, Any] = {int: 0, float: 0.0, str: "", bool: False}


def _defaults(kind: type) -> dict[str, Any]:
    hints = typing.get_type_hints(kind)
    return {name: _DEFAULTS.get(hint) for name, hint in hints.items()}


_FIELD_DEFAULTS: dict[Any, dict[str, Any]] = {kind: _defaults(kind) for kind in RECORD_TYPES}


def convert(kind: Callable[..., N], raw: Any) -> N:
    """Pick ``kind``'s fields by name from a module result (a named tuple or object)."""
    defaults = _FIELD_DEFAULTS[kind]
    getter = raw._asdict() if hasattr(raw, "_asdict") else None
    values: dict[str, Any] = {}
    for name, default in defaults.items():
        value = getter.get(name, default) if getter is not None else getattr(raw, name, default)
        if name == "request" and value is not None:
            value = convert(api.TradeRequest, value)
        values[name] = value
    return kind(**values)


def converted(name: str, raw: Any) -> Any:
    """A module result as the call table's result kind for ``name`` (api named tuples)."""
    spec = CALLS[name]
    if raw is None or spec.record is None:
        return raw
    if spec.result == "records":
        return tuple(convert(spec.record, item) for item in raw)
    return convert(spec.record, raw)


# The binding reads a request dict field by field with exact C types: an int or a Decimal
# where it wants a double is refused (None, last_error() (-2, 'Invalid "volume" argument')),
# and a float where it wants an integer likewise (strings in _core of MetaTrader5 5.0.6231;
# DOMAIN.md section 2). The other backends accept both, so the same request must work here.
_FLOAT_FIELDS = frozenset({"volume", "price", "stoplimit", "sl", "tp"})
_INT_FIELDS = frozenset(
    {"action", "magic", "order", "deviation", "type", "type_filling", "type_time"}
    | {"expiration", "position", "position_by"}
)


def binding_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """``request`` with the C types the binding accepts; only lossless conversions."""
    converted = dict(request)
    for key, value in request.items():
        if isinstance(value, bool):
            continue
        if key in _FLOAT_FIELDS and isinstance(value, int | Decimal):
            converted[key] = float(value)
        elif key in _INT_FIELDS and isinstance(value, float | Decimal):
            try:
                whole = int(value)
            except (ValueError, OverflowError):  # nan, inf: left for the binding to refuse
                continue
            if whole == value:
                converted[key] = whole
    return converted


def load_module() -> ModuleType:
    try:
        return importlib.import_module("MetaTrader5")
    except ImportError as exc:
        raise RuntimeError(
            "the MetaTrader5 package is only available on Windows (pip install MetaTrader5 "
            "next to a MetaTrader 5 terminal); elsewhere use MT5_BACKEND=sim, or "
            "MT5_BACKEND=bridge pointing at a Windows host running `execution-worker "
            "bridge-serve`"
        ) from exc


class NativeTerminal:
    """``api.Terminal`` over the real module. Passwords are passed through, never logged.

    The module keeps one ``last_error()`` for the whole process; each call here reads it
    under the same lock, so :meth:`last_error` answers for this terminal's last call even
    when another thread (or another instance) called the module in between.
    """

    def __init__(self, module: ModuleType | None = None) -> None:
        self._mt5 = module if module is not None else load_module()
        self._error: tuple[int, str] = (api.RES_S_OK, "Success")

    def __repr__(self) -> str:
        return "NativeTerminal()"

    def _call(self, function: str, *args: Any, **kwargs: Any) -> Any:
        with _MODULE_LOCK:
            try:
                return getattr(self._mt5, function)(*args, **kwargs)
            finally:
                code, message = self._mt5.last_error()
                self._error = (int(code), str(message))

    def initialize(
        self,
        path: str | None = None,
        *,
        login: int | None = None,
        password: str | None = None,
        server: str | None = None,
        timeout: int | None = None,
    ) -> bool:
        kwargs = _present(login=login, password=password, server=server, timeout=timeout)
        args = () if path is None else (path,)
        return bool(self._call("initialize", *args, **kwargs))

    def login(
        self,
        login: int,
        *,
        password: str | None = None,
        server: str | None = None,
        timeout: int | None = None,
    ) -> bool:
        kwargs = _present(password=password, server=server, timeout=timeout)
        return bool(self._call("login", login, **kwargs))

    def shutdown(self) -> None:
        self._call("shutdown")

    def last_error(self) -> tuple[int, str]:
        return self._error

    def _answer(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``name`` (unset filters left out) and convert its result by the call table."""
        return converted(name, self._call(name, *args, **given(name, kwargs)))

    def terminal_info(self) -> api.TerminalInfo | None:
        result: api.TerminalInfo | None = self._answer("terminal_info")
        return result

    def account_info(self) -> api.AccountInfo | None:
        result: api.AccountInfo | None = self._answer("account_info")
        return result

    def symbols_get(self, group: str | None = None) -> tuple[api.SymbolInfo, ...] | None:
        result: tuple[api.SymbolInfo, ...] | None = self._answer("symbols_get", group=group or None)
        return result

    def symbol_info(self, symbol: str) -> api.SymbolInfo | None:
        result: api.SymbolInfo | None = self._answer("symbol_info", symbol)
        return result

    def symbol_info_tick(self, symbol: str) -> api.Tick | None:
        result: api.Tick | None = self._answer("symbol_info_tick", symbol)
        return result

    def symbol_select(self, symbol: str, enable: bool = True) -> bool:
        return bool(self._call("symbol_select", symbol, bool(enable)))

    def order_calc_margin(
        self, action: int, symbol: str, volume: float, price: float
    ) -> float | None:
        raw = self._call("order_calc_margin", int(action), symbol, float(volume), float(price))
        return None if raw is None else float(raw)

    def order_check(self, request: dict[str, Any]) -> api.OrderCheckResult | None:
        result: api.OrderCheckResult | None = self._answer("order_check", binding_request(request))
        return result

    def order_send(self, request: dict[str, Any]) -> api.OrderSendResult | None:
        result: api.OrderSendResult | None = self._answer("order_send", binding_request(request))
        return result

    def orders_get(
        self, symbol: str | None = None, group: str | None = None, ticket: int | None = None
    ) -> tuple[api.TradeOrder, ...] | None:
        result: tuple[api.TradeOrder, ...] | None = self._answer(
            "orders_get", symbol=symbol, group=group, ticket=ticket
        )
        return result

    def positions_get(
        self, symbol: str | None = None, group: str | None = None, ticket: int | None = None
    ) -> tuple[api.TradePosition, ...] | None:
        result: tuple[api.TradePosition, ...] | None = self._answer(
            "positions_get", symbol=symbol, group=group, ticket=ticket
        )
        return result

    def history_orders_get(
        self,
        date_from: api.DateLike | None = None,
        date_to: api.DateLike | None = None,
        group: str | None = None,
        ticket: int | None = None,
        position: int | None = None,
    ) -> tuple[api.TradeOrder, ...] | None:
        args, kwargs = _history_args(date_from, date_to, group, ticket, position)
        result: tuple[api.TradeOrder, ...] | None = self._answer(
            "history_orders_get", *args, **kwargs
        )
        return result

    def history_deals_get(
        self,
        date_from: api.DateLike | None = None,
        date_to: api.DateLike | None = None,
        group: str | None = None,
        ticket: int | None = None,
        position: int | None = None,
    ) -> tuple[api.TradeDeal, ...] | None:
        args, kwargs = _history_args(date_from, date_to, group, ticket, position)
        result: tuple[api.TradeDeal, ...] | None = self._answer(
            "history_deals_get", *args, **kwargs
        )
        return result


def _present(**kwargs: Any) -> dict[str, Any]:
    return {key: value for key, value in kwargs.items() if value is not None}


def _history_args(
    date_from: api.DateLike | None,
    date_to: api.DateLike | None,
    group: str | None,
    ticket: int | None,
    position: int | None,
) -> tuple[tuple[api.DateLike, ...], dict[str, Any]]:
    """The module takes EITHER ``ticket=`` OR ``position=`` OR a date window (+ group)."""
    if ticket is not None:
        return (), {"ticket": ticket}
    if position is not None:
        return (), {"position": position}
    dates: tuple[api.DateLike, ...] = tuple(
        d if isinstance(d, datetime | int) else int(d)
        for d in (date_from, date_to)
        if d is not None
    )
    return dates, given("history_deals_get", {"group": group})
