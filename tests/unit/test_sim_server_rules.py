"""Server rules of a hardened simulator (issue 17): filling by execution mode, the rarer
retcodes, the binding's float-only fields, Market Watch selection and hedging tickets."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from worker.mt5 import api
from worker.mt5.sim import retcodes
from worker.mt5.sim.terminal import FaultConfig, SimAccount, SimConfig, SimTerminal

NOW = 1764064800.0  # Tuesday 2025-11-25 10:00 UTC
NO_SLIP = ((0, 1.0),)
FOK, IOC, RETURN = api.ORDER_FILLING_FOK, api.ORDER_FILLING_IOC, api.ORDER_FILLING_RETURN
BUY, SELL = api.ORDER_TYPE_BUY, api.ORDER_TYPE_SELL


def make(*, netting: bool = False, state: Path | None = None, **faults: Any) -> SimTerminal:
    account = SimAccount(margin_mode=0 if netting else 2)
    faults_config = FaultConfig.friendly(slippage_points=NO_SLIP, **faults)
    config = SimConfig(account=account, faults=faults_config)
    sim = SimTerminal(config, clock=lambda: NOW, state_path=state)
    assert sim.initialize()
    return sim


def request(symbol: str = "EURUSD", **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "action": api.TRADE_ACTION_DEAL,
        "symbol": symbol,
        "volume": 0.1,
        "type": BUY,
        "price": 0.0,
        "deviation": 20,
        "magic": 5,
        "comment": "xwrules",
        "type_filling": FOK,
    }
    base.update(extra)
    return base


def send(sim: SimTerminal, symbol: str = "EURUSD", **extra: Any) -> api.OrderSendResult:
    if symbol == "GBPUSD" and "price" not in extra:  # instant execution names its price
        tick = sim.symbol_info_tick(symbol)
        assert tick is not None
        extra["price"] = tick.ask if extra.get("type", BUY) == BUY else tick.bid
    result = sim.order_send(request(symbol, **extra))
    assert result is not None, sim.last_error()
    return result


# ---------------------------------------------------------------- filling by execution mode
def test_instant_execution_takes_fok_only_and_never_fills_partially() -> None:
    sim = make(filling_by_exemode=True)
    assert send(sim, "GBPUSD", type_filling=IOC).retcode == api.TRADE_RETCODE_INVALID_FILL
    assert send(sim, "GBPUSD", type_filling=RETURN).retcode == api.TRADE_RETCODE_INVALID_FILL
    assert send(sim, "GBPUSD", type_filling=FOK).retcode == api.TRADE_RETCODE_DONE
    sim.update_symbol("GBPUSD", liquidity_lots=1.0)
    big = send(sim, "GBPUSD", volume=5.0, type_filling=FOK)
    assert big.retcode == api.TRADE_RETCODE_REJECT and big.volume == 0  # not a partial fill
    sim.update_symbol("GBPUSD", trade_exemode=api.SYMBOL_TRADE_EXECUTION_REQUEST)
    assert send(sim, "GBPUSD", type_filling=IOC).retcode == api.TRADE_RETCODE_INVALID_FILL


def test_without_the_switch_an_instant_symbol_keeps_its_bitmask() -> None:
    sim = make()
    sim.update_symbol("GBPUSD", liquidity_lots=1.0)
    partial = send(sim, "GBPUSD", volume=5.0, type_filling=IOC)
    assert partial.retcode == api.TRADE_RETCODE_DONE_PARTIAL  # the old, kinder behaviour


def test_market_execution_follows_the_bitmask_and_exchange_allows_return() -> None:
    sim = make(filling_by_exemode=True)
    assert send(sim, "EURUSD", type_filling=FOK).retcode == api.TRADE_RETCODE_DONE
    assert send(sim, "EURUSD", type_filling=IOC).retcode == api.TRADE_RETCODE_DONE
    assert send(sim, "EURUSD", type_filling=RETURN).retcode == api.TRADE_RETCODE_INVALID_FILL
    assert send(sim, "XAUUSD", type_filling=IOC).retcode == api.TRADE_RETCODE_INVALID_FILL
    assert sim.symbol_select("US500")
    placed = send(sim, "US500", volume=1.0, type_filling=RETURN)
    assert placed.retcode == api.TRADE_RETCODE_PLACED


def test_a_refused_filling_answers_10030_and_the_next_mode_fills() -> None:
    sim = make(filling_by_exemode=True)
    sim.update_symbol("EURUSD", refused_fillings=(FOK,))
    info = sim.symbol_info("EURUSD")
    assert info is not None and info.filling_mode == api.SYMBOL_FILLING_FOK | api.SYMBOL_FILLING_IOC
    assert info.trade_exemode == api.SYMBOL_TRADE_EXECUTION_MARKET
    assert send(sim, type_filling=FOK).retcode == api.TRADE_RETCODE_INVALID_FILL
    assert send(sim, type_filling=IOC).retcode == api.TRADE_RETCODE_DONE


# ---------------------------------------------------------------- retcodes
def test_close_volume_beyond_the_position_is_10038() -> None:
    sim = make(strict_retcodes=True)
    opened = send(sim, volume=0.5)
    (position,) = sim.positions_get(symbol="EURUSD") or ()
    too_much = send(sim, volume=0.6, type=SELL, position=position.ticket)
    assert too_much.retcode == retcodes.TRADE_RETCODE_INVALID_CLOSE_VOLUME
    assert too_much.comment == "A close volume exceeds the current position volume"
    assert send(sim, volume=0.5, type=SELL, position=position.ticket).retcode == 10009
    assert opened.retcode == 10009
    loose = make()
    send(loose, volume=0.5)
    (position,) = loose.positions_get(symbol="EURUSD") or ()
    assert send(loose, volume=0.6, type=SELL, position=position.ticket).retcode == 10014


@pytest.mark.parametrize(
    ("mode", "side", "retcode"),
    [
        (api.SYMBOL_TRADE_MODE_LONGONLY, SELL, retcodes.TRADE_RETCODE_LONG_ONLY),
        (api.SYMBOL_TRADE_MODE_SHORTONLY, BUY, retcodes.TRADE_RETCODE_SHORT_ONLY),
        (api.SYMBOL_TRADE_MODE_CLOSEONLY, BUY, retcodes.TRADE_RETCODE_CLOSE_ONLY),
        (api.SYMBOL_TRADE_MODE_DISABLED, BUY, api.TRADE_RETCODE_TRADE_DISABLED),
    ],
)
def test_trade_mode_retcodes(mode: int, side: int, retcode: int) -> None:
    sim = make(strict_retcodes=True)
    sim.update_symbol("EURUSD", trade_mode=mode)
    assert send(sim, type=side).retcode == retcode


def test_close_only_still_closes() -> None:
    sim = make(strict_retcodes=True)
    send(sim)
    (position,) = sim.positions_get(symbol="EURUSD") or ()
    sim.update_symbol("EURUSD", trade_mode=api.SYMBOL_TRADE_MODE_CLOSEONLY)
    assert send(sim, type=SELL, position=position.ticket).retcode == 10009


def test_fifo_rule_closes_the_oldest_first() -> None:
    sim = make(fifo_close=True)
    send(sim)
    send(sim)
    older, newer = sim.positions_get(symbol="EURUSD") or ()
    refused = send(sim, type=SELL, position=newer.ticket)
    assert refused.retcode == retcodes.TRADE_RETCODE_FIFO_CLOSE
    assert send(sim, type=SELL, position=older.ticket).retcode == 10009
    assert send(sim, type=SELL, position=newer.ticket).retcode == 10009


def test_hedging_prohibited_refuses_an_opposite_open_but_not_a_close() -> None:
    sim = make(hedging_prohibited=True)
    send(sim)
    assert send(sim, type=SELL).retcode == retcodes.TRADE_RETCODE_HEDGE_PROHIBITED
    assert send(sim).retcode == 10009  # same side is fine
    first, _ = sim.positions_get(symbol="EURUSD") or ()
    assert send(sim, type=SELL, position=first.ticket).retcode == 10009
    netting = make(hedging_prohibited=True, netting=True)
    send(netting)
    assert send(netting, type=SELL).retcode == 10009  # netting: an opposite deal reduces


def test_algo_trading_off_is_a_definite_none() -> None:
    sim = make(algo_off_returns_none=True)
    sim.set_trading(terminal=False)
    assert sim.order_send(request()) is None
    assert sim.last_error()[0] == api.RES_E_AUTO_TRADING_DISABLED == -8
    assert sim.history_orders_get(0, 2**31) == ()
    check = sim.order_check(request())
    assert check is not None and check.retcode == api.TRADE_RETCODE_CLIENT_DISABLES_AT
    sim.set_trading(terminal=True)
    assert send(sim).retcode == 10009
    assert make().order_send(request()) is not None


# ---------------------------------------------------------------- the binding and the terminal
@pytest.mark.parametrize(
    ("field", "value"),
    [("volume", 1), ("volume", Decimal("0.1")), ("price", 0), ("sl", 0)],
)
def test_binding_refuses_non_floats(field: str, value: Any) -> None:
    sim = make(float_only_binding=True)
    assert sim.order_send(request(**{field: value})) is None
    assert sim.last_error() == (api.RES_E_INVALID_PARAMS, f'Invalid "{field}" argument')
    assert sim.order_check(request(**{field: value})) is None
    assert sim.history_orders_get(0, 2**31) == ()
    assert send(sim, volume=1.0).retcode == 10009


def test_without_the_switch_an_int_volume_passes() -> None:
    assert send(make(), volume=1).retcode == 10009


def test_symbol_info_needs_market_watch() -> None:
    sim = make(symbol_info_needs_select=True)
    assert sim.symbol_info("BTCUSD") is None
    assert sim.last_error()[0] == api.RES_E_NOT_FOUND
    assert sim.symbol_info_tick("BTCUSD") is None
    assert sim.symbol_select("BTCUSD", True)
    info = sim.symbol_info("BTCUSD")
    assert info is not None and info.visible
    assert sim.symbol_info_tick("BTCUSD") is not None
    assert make().symbol_info("BTCUSD") is not None  # the kinder terminal


# ---------------------------------------------------------------- hedging tickets
def test_position_ticket_differs_from_identifier_and_closes_name_the_ticket() -> None:
    sim = make(position_ticket_differs=True)
    opened = send(sim, volume=0.3)
    (position,) = sim.positions_get(symbol="EURUSD") or ()
    assert position.identifier == opened.order and position.ticket != position.identifier
    assert sim.positions_get(ticket=position.ticket) == (position,)
    by_identifier = send(sim, type=SELL, position=position.identifier)
    assert by_identifier.retcode == api.TRADE_RETCODE_POSITION_CLOSED
    closed = send(sim, type=SELL, volume=0.3, position=position.ticket)
    assert closed.retcode == 10009
    deals = sim.history_deals_get(position=position.identifier) or ()
    assert [d.entry for d in deals] == [api.DEAL_ENTRY_IN, api.DEAL_ENTRY_OUT]
    assert sim.positions_get() == ()


def test_position_ticket_counter_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = make(position_ticket_differs=True, state=path)
    send(first)
    (a,) = first.positions_get() or ()
    first.close()
    second = make(position_ticket_differs=True, state=path)
    send(second)
    tickets = [p.ticket for p in second.positions_get() or ()]
    assert tickets[0] == a.ticket and len(set(tickets)) == 2
    assert all(p.ticket != p.identifier for p in second.positions_get() or ())


def test_netting_keeps_ticket_equal_to_identifier_at_opening() -> None:
    sim = make(position_ticket_differs=True, netting=True)
    opened = send(sim)
    (position,) = sim.positions_get() or ()
    assert position.ticket == position.identifier == opened.order
