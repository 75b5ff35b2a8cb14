"""The real package's own Python layer over the ``_core`` double: what the binding does."""

from __future__ import annotations

from decimal import Decimal
from types import ModuleType
from typing import Any

import pytest

from tests.native import core_double
from tests.native.conftest import until
from tests.native.package import over
from tests.simbooks import broker_deals
from worker.mt5 import api
from worker.mt5.sim.terminal import SimTerminal


def _request(mt5: ModuleType, **changes: Any) -> dict[str, Any]:
    tick = mt5.symbol_info_tick("EURUSD")
    request = {
        "action": mt5.TRADE_ACTION_DEAL,
        "symbol": "EURUSD",
        "volume": 0.1,
        "type": mt5.ORDER_TYPE_BUY,
        "price": tick.ask,
        "deviation": 20,
        "magic": 7,
        "comment": "double",
        "type_time": mt5.ORDER_TIME_GTC,
        "type_filling": mt5.ORDER_FILLING_FOK,
    }
    request.update(changes)
    return request


def test_the_wheels_helpers_trade_through_the_double(mt5: ModuleType, sim: SimTerminal) -> None:
    result = mt5.Buy("EURUSD", 0.2, comment="helper")
    assert type(result).__name__ == "OrderSendResult" and result.retcode == 10009
    assert type(result.request).__name__ == "TradeRequest"
    assert result.request.volume == 0.2 and result.request.comment == "helper"
    [position] = mt5.positions_get(symbol="EURUSD")
    assert position.volume == 0.2 and mt5.positions_total() == 1
    assert mt5.Close("EURUSD") is True
    assert mt5.positions_get(symbol="EURUSD") == ()
    assert [d.volume for d in broker_deals(sim)] == [0.2, 0.2]
    assert until(lambda: mt5.history_deals_total(0, 2**31 - 1), done=lambda n: n == 2) == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("volume", 1),
        ("volume", Decimal("0.1")),
        ("price", 1),
        ("sl", Decimal("1.0")),
        ("magic", 7.0),
        ("deviation", 20.0),
        ("comment", 5),
    ],
)
def test_a_request_field_of_the_wrong_c_type_is_refused(
    mt5: ModuleType, sim: SimTerminal, field: str, value: Any
) -> None:
    assert mt5.order_send(_request(mt5, **{field: value})) is None
    assert mt5.last_error() == (mt5.RES_E_INVALID_PARAMS, f'Invalid "{field}" argument')
    assert mt5.order_check(_request(mt5, **{field: value})) is None
    assert not sim.history_deals_get(0, 2**31 - 1), "a refused request never reaches the server"
    assert mt5.order_send(_request(mt5)).retcode == 10009
    assert mt5.last_error() == (mt5.RES_S_OK, "Success")


def test_filters_are_keyword_only_and_history_wants_two_dates_or_a_ticket(
    mt5: ModuleType,
) -> None:
    assert mt5.positions_get("EURUSD") is None
    assert mt5.last_error() == (-2, "Unnamed arguments not allowed")
    assert mt5.orders_get(ticket="1") is None
    assert mt5.last_error() == (-2, 'Invalid "ticket" argument')
    assert mt5.history_deals_get(0) is None
    assert mt5.last_error() == (-2, "Invalid number of arguments")
    assert mt5.history_orders_get(0, 10, ticket=5) is None
    assert mt5.history_deals_get(1.5, 10) is None
    assert mt5.last_error() == (-2, "Invalid 1st unnamed argument")
    assert mt5.history_deals_get(0, 10) == ()
    with pytest.raises(TypeError):
        mt5.symbol_info(symbol="EURUSD")


def test_results_carry_the_bindings_full_field_lists(mt5: ModuleType) -> None:
    info = mt5.symbol_info("EURUSD")
    assert type(info).__name__ == "SymbolInfo" and len(info._fields) == 96
    assert info._fields[:4] == ("custom", "chart_mode", "select", "visible")
    assert info._fields[-1] == "path" and info.name == "EURUSD" and info.trade_contract_size > 0
    account = mt5.account_info()
    assert len(account._fields) == 28 and account._fields[-1] == "company"
    assert account.login == 5_000_001 and account.limit_orders == 0
    terminal = mt5.terminal_info()
    assert len(terminal._fields) == 22 and terminal.connected and terminal.commondata_path == ""
    assert mt5.version()[0] == 500 and mt5.symbols_total() == len(mt5.symbols_get())


def test_errors_return_none_and_set_last_error(mt5: ModuleType) -> None:
    assert mt5.symbol_info("NO_SUCH") is None
    assert mt5.last_error() == (api.RES_E_NOT_FOUND, "Terminal: Not found")
    assert mt5.copy_rates_from_pos("EURUSD", mt5.TIMEFRAME_M1, 0, 10) is None
    assert mt5.last_error()[0] == api.RES_E_UNSUPPORTED
    mt5.shutdown()
    assert mt5.terminal_info() is None
    assert mt5.last_error()[0] in api.CONNECTION_LOST_ERRORS


def test_without_a_terminal_every_call_fails_with_no_ipc_connection() -> None:
    mt5 = over(None)
    assert mt5.initialize() is False
    assert mt5.last_error() == (api.RES_E_INTERNAL_FAIL_CONNECT, "No IPC connection")
    assert mt5.account_info() is None and mt5.Buy("EURUSD", 0.1, 1.1) is None
    core_double.bind(None)


def test_initialize_checks_argument_types_and_credentials(sim: SimTerminal) -> None:
    mt5 = over(sim)
    try:
        assert mt5.initialize(login="5000001") is False
        assert mt5.last_error() == (-2, 'Invalid "login" argument')
        assert mt5.initialize(login=123, server="SimBroker-Demo") is False
        assert mt5.last_error()[0] == api.RES_E_AUTH_FAILED
        assert mt5.initialize("C:/terminal64.exe", login=5_000_001, password="x", timeout=5000)
    finally:
        core_double.bind(None)
