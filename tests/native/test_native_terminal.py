"""``NativeTerminal`` over the real package and the ``_core`` double: what native.py must do."""

from __future__ import annotations

import math
from decimal import Decimal
from types import ModuleType
from typing import Any

import pytest

from tests.native import core_double
from tests.native.conftest import until
from tests.simbooks import broker_deals
from worker.mt5 import api
from worker.mt5.native import NativeTerminal, binding_request
from worker.mt5.sim.terminal import SimTerminal


@pytest.fixture
def native(mt5: ModuleType) -> NativeTerminal:
    return NativeTerminal(mt5)


def _order(native: NativeTerminal, **changes: Any) -> dict[str, Any]:
    tick = native.symbol_info_tick("EURUSD")
    assert tick is not None
    request: dict[str, Any] = {
        "action": api.TRADE_ACTION_DEAL,
        "symbol": "EURUSD",
        "volume": 0.1,
        "type": api.ORDER_TYPE_BUY,
        "price": tick.ask,
        "deviation": 20,
        "magic": 26112599,
        "comment": "native",
        "type_time": api.ORDER_TIME_GTC,
        "type_filling": api.ORDER_FILLING_FOK,
    }
    request.update(changes)
    return request


@pytest.mark.parametrize(
    "changes",
    [
        {"volume": 1},  # whole lots as an int: the binding wants a double
        {"volume": Decimal("0.30")},
        {"deviation": 20.0, "magic": 26112599.0, "type_filling": 0.0},
    ],
)
def test_requests_reach_the_binding_with_its_c_types(
    native: NativeTerminal, sim: SimTerminal, changes: dict[str, Any]
) -> None:
    check = native.order_check(_order(native, **changes))
    assert isinstance(check, api.OrderCheckResult), native.last_error()
    result = native.order_send(_order(native, **changes))
    assert isinstance(result, api.OrderSendResult), native.last_error()
    assert result.retcode == api.TRADE_RETCODE_DONE
    assert isinstance(result.request, api.TradeRequest)
    assert result.request.volume == float(changes.get("volume", 0.1))
    [deal] = [d for d in broker_deals(sim) if d.order == result.order]
    assert deal.volume == result.volume and deal.magic == 26112599


def test_only_lossless_conversions_are_made() -> None:
    request = {"volume": True, "deviation": 20.5, "price": "1.1", "sl": 2, "position": Decimal(7)}
    converted = binding_request(request)
    assert converted == {
        "volume": True,
        "deviation": 20.5,
        "price": "1.1",
        "sl": 2.0,
        "position": 7,
    }
    assert type(converted["sl"]) is float and type(converted["position"]) is int
    assert math.isnan(binding_request({"deviation": float("nan")})["deviation"])


def test_a_request_the_binding_refuses_is_none_with_its_reason(native: NativeTerminal) -> None:
    assert native.order_send(_order(native, deviation=20.5)) is None
    assert native.last_error() == (api.RES_E_INVALID_PARAMS, 'Invalid "deviation" argument')


def test_results_become_api_tuples_by_field_name(native: NativeTerminal, mt5: ModuleType) -> None:
    info = native.symbol_info("EURUSD")
    raw = mt5.symbol_info("EURUSD")
    assert type(info) is api.SymbolInfo and type(raw) is not api.SymbolInfo
    assert info._asdict() == {field: getattr(raw, field) for field in api.SymbolInfo._fields}
    account = native.account_info()
    assert type(account) is api.AccountInfo and account.login == mt5.account_info().login
    symbols = native.symbols_get(group="EUR*")
    assert symbols and all(type(s) is api.SymbolInfo for s in symbols)
    assert {s.name for s in symbols} == {s.name for s in mt5.symbols_get(group="EUR*")}


def test_history_queries_use_the_bindings_calling_forms(native: NativeTerminal) -> None:
    result = native.order_send(_order(native))
    assert result is not None and result.retcode == api.TRADE_RETCODE_DONE
    [deal] = until(lambda: native.history_deals_get(ticket=result.order)) or ()  # deals lag
    assert type(deal) is api.TradeDeal and result.deal in (0, deal.ticket)
    # a window and a position together: the binding takes one form, ticket/position first
    by_position = until(lambda: native.history_deals_get(0, 2**31 - 1, position=deal.position_id))
    assert by_position and by_position[0].ticket == deal.ticket
    window = until(lambda: native.history_orders_get(deal.time - 60, deal.time + 60, group="EUR*"))
    assert window and window[0].ticket == result.order
    assert native.history_deals_get(0) is None, "one date is refused, not widened"
    assert native.last_error()[0] == api.RES_E_INVALID_PARAMS


def test_failed_queries_are_none_with_last_error_not_empty(
    native: NativeTerminal, mt5: ModuleType
) -> None:
    assert native.symbol_info("NO_SUCH") is None
    assert native.last_error() == (api.RES_E_NOT_FOUND, "Terminal: Not found")
    core_double.bind(None)  # the terminal process is gone
    assert native.positions_get(symbol="EURUSD") is None
    assert native.history_deals_get(ticket=1) is None
    assert native.last_error()[0] in api.CONNECTION_LOST_ERRORS
    assert native.terminal_info() is None


def test_last_error_answers_for_this_terminals_last_call(
    native: NativeTerminal, mt5: ModuleType
) -> None:
    # the module keeps one last_error() per process: a call made in between (another
    # thread, a health check, another instance) must not overwrite this terminal's reason
    assert native.order_send(_order(native, deviation=20.5)) is None
    other = NativeTerminal(mt5)
    assert other.symbol_info("EURUSD") is not None
    assert mt5.last_error() == (api.RES_S_OK, "Success")
    assert native.last_error() == (api.RES_E_INVALID_PARAMS, 'Invalid "deviation" argument')
    assert other.last_error() == (api.RES_S_OK, "Success")
