"""The terminal's call table: one description of every call, shared by the backends.

:class:`worker.mt5.api.Terminal` declares the calls for the type checker; this table says
what each backend needs to know about a call at run time, once:

- ``result``: what it answers (a ``record``: one :mod:`~worker.mt5.api` named tuple or None;
  ``records``: a tuple of them or None; ``bool``, ``float``, ``none`` or the ``error`` pair),
  and ``record``, the named tuple type;
- ``filters``: keyword arguments passed on only when given (the ``MetaTrader5`` binding
  refuses ``None`` for them, and the bridge sends the call in the caller's shape);
- ``remote``: whether a bridge serves it (the lifecycle calls belong to the process that
  owns the terminal, so no password crosses a bridge).

The native adapter converts module results by this table, the bridge derives its
allow-list, wire types and per-call result check from it, and the simulator its failed
answers (``failed_answer``). A test holds the Protocol, the table and every backend's
methods to the same names and signatures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from worker.mt5 import api

ResultKind = Literal["record", "records", "bool", "float", "none", "error"]
Record = type[tuple[Any, ...]]


@dataclass(frozen=True)
class CallSpec:
    name: str
    result: ResultKind
    record: Record | None = None
    filters: tuple[str, ...] = ()
    remote: bool = True


_OPEN_FILTERS = ("symbol", "group", "ticket")
_HISTORY_FILTERS = ("date_from", "date_to", "group", "ticket", "position")

CALLS: Final[Mapping[str, CallSpec]] = {
    spec.name: spec
    for spec in (
        CallSpec("initialize", "bool", remote=False),
        CallSpec("login", "bool", remote=False),
        CallSpec("shutdown", "none", remote=False),
        CallSpec("last_error", "error"),
        CallSpec("terminal_info", "record", api.TerminalInfo),
        CallSpec("account_info", "record", api.AccountInfo),
        CallSpec("symbols_get", "records", api.SymbolInfo, filters=("group",)),
        CallSpec("symbol_info", "record", api.SymbolInfo),
        CallSpec("symbol_info_tick", "record", api.Tick),
        CallSpec("symbol_select", "bool"),
        CallSpec("order_calc_margin", "float"),
        CallSpec("order_check", "record", api.OrderCheckResult),
        CallSpec("order_send", "record", api.OrderSendResult),
        CallSpec("orders_get", "records", api.TradeOrder, filters=_OPEN_FILTERS),
        CallSpec("positions_get", "records", api.TradePosition, filters=_OPEN_FILTERS),
        CallSpec("history_orders_get", "records", api.TradeOrder, filters=_HISTORY_FILTERS),
        CallSpec("history_deals_get", "records", api.TradeDeal, filters=_HISTORY_FILTERS),
    )
}

REMOTE_CALLS: Final = frozenset(name for name, spec in CALLS.items() if spec.remote)

# Every named tuple a call can answer, and the request echoed inside a send/check result.
RECORD_TYPES: Final[tuple[Record, ...]] = (
    *dict.fromkeys(spec.record for spec in CALLS.values() if spec.record is not None),
    api.TradeRequest,
)


def failed_answer(name: str) -> Any:
    """What the call answers when it fails (then ``last_error()`` says why)."""
    return False if CALLS[name].result == "bool" else None


def given(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the filters left unset (None): the binding refuses None there."""
    filters = CALLS[name].filters
    return {key: value for key, value in kwargs.items() if key not in filters or value is not None}


def result_fits(name: str, result: Any) -> bool:
    """Whether ``result`` has the shape the table gives for ``name`` (None always fits a
    query: the terminal's failure, explained by ``last_error()``)."""
    spec = CALLS[name]
    if spec.result == "bool":
        return isinstance(result, bool)
    if spec.result == "none":
        return result is None
    if spec.result == "error":
        return isinstance(result, tuple) and len(result) == 2
    if result is None:
        return True
    if spec.result == "float":
        return isinstance(result, int | float) and not isinstance(result, bool)
    if spec.result == "record":
        return isinstance(result, spec.record or ())
    return isinstance(result, tuple) and all(isinstance(r, spec.record or ()) for r in result)
