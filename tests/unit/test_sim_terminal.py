"""The simulated terminal validates and executes like the real trade server (DOMAIN.md 2)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from worker.mt5 import api
from worker.mt5.sim.terminal import FaultConfig, SimAccount, SimConfig, SimSymbol, SimTerminal

TUESDAY_10_UTC = 1764064800.0  # 2025-11-25 10:00 UTC
SATURDAY_10_UTC = TUESDAY_10_UTC + 4 * 86400
# the friendly server: these tests pin it (the hardened one: test_sim_hardening/_server_rules)
NO_SLIP = FaultConfig.friendly(slippage_points=((0, 1.0),))


class Clock:
    def __init__(self, now: float = TUESDAY_10_UTC) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(
    *, clock: Clock | None = None, netting: bool = False, **config: Any
) -> tuple[SimTerminal, Clock]:
    clock = clock or Clock()
    account = config.pop("account", SimAccount())
    config.setdefault("faults", NO_SLIP)
    account = replace(account, margin_mode=0 if netting else 2)
    sim = SimTerminal(SimConfig(account=account, **config), clock=clock)
    assert sim.initialize()
    return sim, clock


def order(
    symbol: str = "EURUSD", volume: float = 0.1, side: int = 0, **extra: Any
) -> dict[str, Any]:
    request: dict[str, Any] = {
        "action": api.TRADE_ACTION_DEAL,
        "symbol": symbol,
        "volume": volume,
        "type": side,
        "price": 0.0,
        "deviation": 20,
        "magic": 77,
        "comment": "xwtest",
        "type_time": api.ORDER_TIME_GTC,
        "type_filling": api.ORDER_FILLING_FOK,
    }
    request.update(extra)
    return request


def send(sim: SimTerminal, **kwargs: Any) -> api.OrderSendResult:
    result = sim.order_send(order(**kwargs))
    assert result is not None, sim.last_error()
    return result


# ---------------------------------------------------------------- module-like session
def test_calls_fail_until_initialized_and_after_shutdown() -> None:
    sim = SimTerminal(clock=Clock())
    assert sim.account_info() is None
    assert sim.last_error()[0] == api.RES_E_INTERNAL_FAIL_CONNECT
    assert sim.initialize()
    assert sim.account_info() is not None
    assert sim.last_error() == (api.RES_S_OK, "Success")
    sim.shutdown()
    assert sim.symbol_info_tick("EURUSD") is None


def test_initialize_checks_credentials_without_echoing_the_password() -> None:
    config = SimConfig(account=SimAccount(password="s3cret-pw"), faults=NO_SLIP)
    sim = SimTerminal(config, clock=Clock())
    assert not sim.initialize(login=5_000_001, password="wrong")
    code, message = sim.last_error()
    assert code == api.RES_E_AUTH_FAILED
    assert "s3cret" not in message and "wrong" not in message
    assert "s3cret" not in repr(sim.config)
    assert not sim.initialize(login=123, password="s3cret-pw")
    assert sim.initialize(login=5_000_001, password="s3cret-pw", server="SimBroker-Demo")


# ---------------------------------------------------------------- symbols, ticks, time
def test_default_symbols_have_realistic_specs() -> None:
    sim, _ = make()
    eurusd = sim.symbol_info("EURUSD")
    assert eurusd is not None
    assert (eurusd.digits, eurusd.point, eurusd.trade_contract_size) == (5, 1e-05, 100000.0)
    assert (eurusd.volume_min, eurusd.volume_max, eurusd.volume_step) == (0.01, 100.0, 0.01)
    assert eurusd.trade_exemode == api.SYMBOL_TRADE_EXECUTION_MARKET
    assert eurusd.filling_mode == 3 and eurusd.path == "Forex\\Majors\\EURUSD"
    gbpusd, usdjpy, gold, index, btc = (
        sim.symbol_info(n) for n in ("GBPUSD", "USDJPY", "XAUUSD", "US500", "BTCUSD")
    )
    assert gbpusd and gbpusd.trade_exemode == api.SYMBOL_TRADE_EXECUTION_INSTANT
    assert gbpusd.filling_mode == api.SYMBOL_FILLING_IOC
    assert usdjpy and usdjpy.digits == 3 and 140 < usdjpy.bid < 160
    assert gold and gold.digits == 2 and gold.trade_contract_size == 100
    assert gold.filling_mode == api.SYMBOL_FILLING_FOK and gold.path == "Metals\\XAUUSD"
    assert index and index.trade_exemode == api.SYMBOL_TRADE_EXECUTION_EXCHANGE
    assert btc and btc.trade_contract_size == 1 and not btc.visible


def test_ticks_are_in_server_time_seeded_and_reproducible() -> None:
    sim_a, clock = make()
    sim_b, _ = make(clock=clock)
    tick = sim_a.symbol_info_tick("EURUSD")
    assert tick is not None
    assert tick == sim_b.symbol_info_tick("EURUSD")
    assert tick.time_msc == int(TUESDAY_10_UTC * 1000) + 7200 * 1000  # UTC+2, not UTC
    assert tick.time == tick.time_msc // 1000
    assert round((tick.ask - tick.bid) / 1e-5) == 12  # the spread in points
    other_seed, _ = make(clock=clock, seed=99)
    assert other_seed.symbol_info_tick("EURUSD") != tick
    clock.now += 120
    later = sim_a.symbol_info_tick("EURUSD")
    assert later is not None and later.time_msc == tick.time_msc + 120_000
    assert later.bid != tick.bid


def test_symbol_outside_market_watch_needs_symbol_select() -> None:
    sim, _ = make()
    assert sim.symbol_info_tick("BTCUSD") is None
    assert sim.symbol_select("BTCUSD", True)
    tick = sim.symbol_info_tick("BTCUSD")
    assert tick is not None and tick.bid > 1000
    assert not sim.symbol_select("NOPE", True)
    assert sim.symbol_info("NOPE") is None


def test_weekend_market_is_closed_and_ticks_stop() -> None:
    sim, _ = make(clock=Clock(SATURDAY_10_UTC))
    tick = sim.symbol_info_tick("EURUSD")
    assert tick is not None
    friday_close_server_ms = int((TUESDAY_10_UTC + 3 * 86400 + 12 * 3600) * 1000) + 7_200_000
    assert tick.time_msc == friday_close_server_ms
    assert send(sim).retcode == api.TRADE_RETCODE_MARKET_CLOSED
    assert sim.symbol_select("BTCUSD")
    assert send(sim, symbol="BTCUSD", volume=0.01, type_filling=1).retcode == 10009


def test_configured_symbol_and_schedule() -> None:
    exotic = SimSymbol("EURUSD.a", 5, 100_000.0, 1.1, closed_weekly=(("Tue 09:00", "Tue 11:00"),))
    sim, _ = make(symbols=SimConfig().with_symbols(exotic).symbols)
    assert sim.symbol_info("EURUSD.a") is not None
    assert send(sim, symbol="EURUSD.a").retcode == api.TRADE_RETCODE_MARKET_CLOSED
    assert send(sim, symbol="EURUSD").retcode == api.TRADE_RETCODE_DONE


def test_from_toml(tmp_path: Any) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(
        "seed = 3\nserver_utc_offset_seconds = 10800\n"
        "[account]\nbalance = 5000.0\nmargin_mode = 0\n"
        "[faults]\nreject_rate = 0.5\nslippage_points = [[0, 1.0]]\n"
        "[symbols.EURUSD]\nliquidity_lots = 2.0\n"
        "[symbols.EURUSDm]\ndigits = 5\ncontract_size = 100000.0\nbase_price = 1.1\n"
    )
    config = SimConfig.from_toml(path)
    assert config.seed == 3 and config.server_utc_offset_seconds == 10800
    assert config.account.balance == 5000.0 and config.account.margin_mode == 0
    assert config.faults.reject_rate == 0.5 and config.faults.slippage_points == ((0, 1.0),)
    assert config.symbols["EURUSD"].liquidity_lots == 2.0
    assert config.symbols["EURUSD"].digits == 5  # other fields keep their defaults
    assert config.symbols["EURUSDm"].contract_size == 100000.0
    path.write_text("[faults]\nnot_a_knob = 1\n")
    with pytest.raises(ValueError, match="not_a_knob"):
        SimConfig.from_toml(path)


# ---------------------------------------------------------------- margin and account
def test_margin_per_symbol_in_account_currency() -> None:
    sim, _ = make()
    assert sim.order_calc_margin(api.ORDER_TYPE_BUY, "EURUSD", 1.0, 1.1) == 1100.0
    assert sim.order_calc_margin(api.ORDER_TYPE_BUY, "USDJPY", 1.0, 150.0) == 1000.0
    assert sim.order_calc_margin(api.ORDER_TYPE_SELL, "XAUUSD", 1.0, 2000.0) == 2000.0
    assert sim.order_calc_margin(api.ORDER_TYPE_BUY, "US500", 10.0, 5000.0) == 500.0
    gbp = sim.order_calc_margin(api.ORDER_TYPE_BUY, "GBPUSD", 1.0, 1.25)
    assert gbp == 1250.0
    assert sim.order_calc_margin(api.ORDER_TYPE_BUY, "NOPE", 1.0, 1.0) is None


def test_account_tracks_balance_equity_and_margin() -> None:
    sim, clock = make()
    before = sim.account_info()
    assert before is not None and before.margin == 0 and before.balance == 100_000
    assert before.margin_mode == api.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING
    opened = send(sim, volume=1.0)
    after = sim.account_info()
    assert after is not None
    assert after.margin == pytest.approx(100_000 * opened.price / 100, abs=0.01)
    assert after.equity == pytest.approx(100_000 - 1.0 * 100_000 * (opened.price - opened.bid))
    assert after.margin_free == pytest.approx(after.equity - after.margin)
    clock.now += 3600
    position = sim.positions_get(symbol="EURUSD")
    assert position
    closed = send(sim, volume=1.0, side=1, position=position[0].ticket)
    final = sim.account_info()
    assert final is not None and final.margin == 0
    expected = round((closed.price - opened.price) * 100_000, 2)
    assert final.balance == pytest.approx(100_000 + expected, abs=0.01)
    deals = sim.history_deals_get(position=position[0].identifier)
    assert deals and deals[-1].entry == api.DEAL_ENTRY_OUT
    assert deals[-1].profit == pytest.approx(expected, abs=0.01)


def test_order_check_reports_margin_without_executing() -> None:
    sim, _ = make()
    check = sim.order_check(order(volume=1.0))
    assert check is not None and check.retcode == 0 and check.margin > 1000
    assert sim.positions_get() == ()
    poor, _ = make(account=SimAccount(balance=100.0))
    check = poor.order_check(order(volume=1.0))
    assert check is not None and check.retcode == api.TRADE_RETCODE_NO_MONEY


# ---------------------------------------------------------------- validation retcodes
@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"comment": "x" * 27}, 'Invalid "comment" argument'),
        ({"comment": "caf\u00e9"}, 'Invalid "comment" argument'),
        ({"volume": "0.1"}, 'Invalid "volume" argument type'),
        ({"magic": 1.5}, 'Invalid "magic" argument type'),
        ({"password": "x"}, 'Invalid "password" argument'),
    ],
)
def test_binding_refuses_bad_requests_with_none(changes: dict[str, Any], error: str) -> None:
    sim, _ = make()
    assert sim.order_send(order(**changes)) is None
    assert sim.last_error() == (api.RES_E_INVALID_PARAMS, error)
    assert sim.history_deals_get(0, 2**31) == ()


@pytest.mark.parametrize(
    ("request_changes", "retcode"),
    [
        ({"volume": 0.015}, api.TRADE_RETCODE_INVALID_VOLUME),
        ({"volume": 0.001}, api.TRADE_RETCODE_INVALID_VOLUME),
        ({"volume": 100.01}, api.TRADE_RETCODE_INVALID_VOLUME),
        ({"type_filling": api.ORDER_FILLING_RETURN}, api.TRADE_RETCODE_INVALID_FILL),
        ({"symbol": "XAUUSD", "type_filling": api.ORDER_FILLING_IOC}, 10030),
        ({"symbol": "NOPE"}, api.TRADE_RETCODE_INVALID),
        ({"type": 7}, api.TRADE_RETCODE_INVALID_ORDER),
        ({"position": 999}, api.TRADE_RETCODE_POSITION_CLOSED),
        ({"action": api.TRADE_ACTION_PENDING}, api.TRADE_RETCODE_INVALID),
    ],
)
def test_server_validation_retcodes(request_changes: dict[str, Any], retcode: int) -> None:
    sim, _ = make()
    result = sim.order_send(order(**request_changes))
    assert result is not None and result.retcode == retcode
    assert result.order == 0 and result.deal == 0
    assert sim.history_orders_get(0, 2**31) == ()


def test_exactly_step_multiples_are_accepted_despite_float_noise() -> None:
    sim, _ = make()
    assert send(sim, volume=0.1 + 0.2).retcode == api.TRADE_RETCODE_DONE  # 0.30000000000000004


def test_trade_mode_and_permissions() -> None:
    sim, _ = make()
    sim.update_symbol("EURUSD", trade_mode=api.SYMBOL_TRADE_MODE_DISABLED)
    assert send(sim).retcode == api.TRADE_RETCODE_TRADE_DISABLED
    sim.update_symbol("EURUSD", trade_mode=api.SYMBOL_TRADE_MODE_LONGONLY)
    assert send(sim, side=1).retcode == api.TRADE_RETCODE_TRADE_DISABLED
    assert send(sim, side=0).retcode == api.TRADE_RETCODE_DONE
    sim.update_symbol("EURUSD", trade_mode=api.SYMBOL_TRADE_MODE_CLOSEONLY)
    assert send(sim, side=0).retcode == api.TRADE_RETCODE_TRADE_DISABLED
    ticket = sim.positions_get(symbol="EURUSD")[0].ticket  # type: ignore[index]
    assert send(sim, side=1, position=ticket).retcode == api.TRADE_RETCODE_DONE
    sim.update_symbol("EURUSD", trade_mode=api.SYMBOL_TRADE_MODE_FULL)
    sim.set_trading(terminal=False)
    terminal = sim.terminal_info()
    assert terminal is not None and not terminal.trade_allowed
    assert send(sim).retcode == api.TRADE_RETCODE_CLIENT_DISABLES_AT
    sim.set_trading(terminal=True, expert=False)
    assert send(sim).retcode == api.TRADE_RETCODE_SERVER_DISABLES_AT
    sim.set_trading(expert=True, account=False)
    assert send(sim).retcode == api.TRADE_RETCODE_TRADE_DISABLED


def test_no_money() -> None:
    sim, _ = make(account=SimAccount(balance=500.0))
    assert send(sim, volume=1.0).retcode == api.TRADE_RETCODE_NO_MONEY
    assert send(sim, volume=0.01).retcode == api.TRADE_RETCODE_DONE


# ---------------------------------------------------------------- execution
def test_market_execution_fills_with_configured_slippage() -> None:
    adverse = FaultConfig.friendly(slippage_points=((7, 1.0),))
    sim, _ = make(faults=adverse)
    buy = send(sim)
    assert buy.retcode == 10009 and buy.price == pytest.approx(buy.ask + 7e-5)
    sell = send(sim, side=1)
    assert sell.price == pytest.approx(sell.bid - 7e-5)
    # market execution ignores the deviation: slippage beyond it still fills
    wide = send(sim, deviation=1)
    assert wide.retcode == 10009 and wide.price > wide.ask


def test_success_result_fields_and_history() -> None:
    sim, clock = make()
    result = send(sim, volume=0.25, comment="xw0123456789abcdef0123")
    assert result.retcode == api.TRADE_RETCODE_DONE
    assert result.comment == "Request executed"
    assert result.volume == 0.25 and result.price == result.ask
    assert result.request is not None and result.request.comment == "xw0123456789abcdef0123"
    assert result.request_id > 0
    hist = sim.history_orders_get(ticket=result.order)
    assert hist and hist[0].state == api.ORDER_STATE_FILLED
    assert hist[0].volume_initial == 0.25 and hist[0].volume_current == 0
    assert hist[0].comment == "xw0123456789abcdef0123" and hist[0].magic == 77
    deals = sim.history_deals_get(ticket=result.order)  # by ORDER ticket
    assert deals and deals[0].ticket == result.deal and deals[0].order == result.order
    assert deals[0].entry == api.DEAL_ENTRY_IN and deals[0].volume == 0.25
    position = sim.positions_get(ticket=deals[0].position_id)
    assert position and position[0].identifier == result.order
    assert sim.orders_get() == ()
    # date windows are server time: a UTC window misses the deal made 10:00 UTC / 12:00 server
    server_now = int(clock.now) + 7200
    assert sim.history_deals_get(server_now - 60, server_now + 60) == deals
    utc_window = sim.history_deals_get(int(clock.now) - 3600, int(clock.now) + 60)
    assert utc_window == ()
    naive = datetime.fromtimestamp(server_now, UTC).replace(tzinfo=None)
    assert sim.history_orders_get(naive, naive) == hist
    assert sim.history_deals_get(server_now - 60, server_now + 60, group="*JPY*") == ()
    assert sim.history_deals_get() is None  # a window is required without ticket/position


def test_instant_execution_requotes_beyond_deviation() -> None:
    sim, _ = make()
    tick = sim.symbol_info_tick("GBPUSD")
    assert tick is not None
    stale = tick.ask - 30e-5
    kwargs = {"symbol": "GBPUSD", "type_filling": api.ORDER_FILLING_IOC}
    requote = send(sim, price=stale, deviation=20, **kwargs)
    assert requote.retcode == api.TRADE_RETCODE_REQUOTE and requote.deal == 0
    assert (requote.bid, requote.ask) == (tick.bid, tick.ask)  # fresh prices in the result
    filled = send(sim, price=stale, deviation=40, **kwargs)
    assert filled.retcode == api.TRADE_RETCODE_DONE and filled.price == stale
    assert send(sim, price=0.0, **kwargs).retcode == api.TRADE_RETCODE_INVALID_PRICE
    sim.set_faults(scripted=("price_changed",))
    assert send(sim, price=tick.ask, **kwargs).retcode == api.TRADE_RETCODE_PRICE_CHANGED


def test_liquidity_gives_partial_ioc_and_rejects_fok() -> None:
    sim, _ = make()
    sim.update_symbol("EURUSD", liquidity_lots=2.0)
    fok = send(sim, volume=5.0, type_filling=api.ORDER_FILLING_FOK)
    assert fok.retcode == api.TRADE_RETCODE_REJECT and fok.deal == 0
    ioc = send(sim, volume=5.0, type_filling=api.ORDER_FILLING_IOC)
    assert ioc.retcode == api.TRADE_RETCODE_DONE_PARTIAL and ioc.volume == 2.0
    hist = sim.history_orders_get(ticket=ioc.order)
    assert hist and hist[0].state == api.ORDER_STATE_PARTIAL
    assert hist[0].volume_initial == 5.0 and hist[0].volume_current == 3.0


def test_exchange_execution_places_then_fills_later() -> None:
    sim, clock = make()
    sim.symbol_select("US500")
    placed = send(sim, symbol="US500", volume=3.0, type_filling=api.ORDER_FILLING_RETURN)
    assert placed.retcode == api.TRADE_RETCODE_PLACED and placed.order and placed.deal == 0
    open_orders = sim.orders_get(ticket=placed.order)
    assert open_orders and open_orders[0].state == api.ORDER_STATE_PLACED
    assert sim.history_deals_get(ticket=placed.order) == ()
    clock.now += 1.0
    assert sim.orders_get() == ()
    deals = sim.history_deals_get(ticket=placed.order)
    assert deals and deals[0].volume == 3.0
    hist = sim.history_orders_get(ticket=placed.order)
    assert hist and hist[0].state == api.ORDER_STATE_FILLED


def test_remove_cancels_a_placed_order() -> None:
    sim, clock = make()
    sim.symbol_select("US500")
    placed = send(sim, symbol="US500", volume=1.0, type_filling=api.ORDER_FILLING_RETURN)
    removed = sim.order_send({"action": api.TRADE_ACTION_REMOVE, "order": placed.order})
    assert removed is not None and removed.retcode == api.TRADE_RETCODE_DONE
    clock.now += 5
    hist = sim.history_orders_get(ticket=placed.order)
    assert hist and hist[0].state == api.ORDER_STATE_CANCELED
    assert sim.history_deals_get(ticket=placed.order) == ()
    again = sim.order_send({"action": api.TRADE_ACTION_REMOVE, "order": placed.order})
    assert again is not None and again.retcode == api.TRADE_RETCODE_INVALID


# ---------------------------------------------------------------- netting vs hedging
def test_hedging_opens_a_position_per_deal_and_closes_by_ticket() -> None:
    sim, _ = make()
    first = send(sim, volume=1.0)
    second = send(sim, volume=0.5, side=1)
    positions = sim.positions_get(symbol="EURUSD")
    assert positions is not None
    assert [p.type for p in positions] == [api.POSITION_TYPE_BUY, api.POSITION_TYPE_SELL]
    assert [p.ticket for p in positions] == [first.order, second.order]
    partial = send(sim, volume=0.4, side=1, position=first.order)
    assert partial.retcode == 10009
    remaining = sim.positions_get(ticket=first.order)
    assert remaining and remaining[0].volume == pytest.approx(0.6)
    assert send(sim, volume=0.7, side=1, position=first.order).retcode == 10014
    assert send(sim, volume=0.6, side=0, position=first.order).retcode == 10013  # same side
    send(sim, volume=0.6, side=1, position=first.order)
    assert sim.positions_get(ticket=first.order) == ()


def test_netting_reduces_closes_and_reverses_one_position() -> None:
    sim, _ = make(netting=True)
    first = send(sim, volume=1.0)
    send(sim, volume=0.5)
    (position,) = sim.positions_get(symbol="EURUSD") or ()
    assert position.volume == 1.5 and position.identifier == first.order
    send(sim, volume=0.5, side=1)
    (position,) = sim.positions_get(symbol="EURUSD") or ()
    assert position.volume == 1.0 and position.type == api.POSITION_TYPE_BUY
    reverse = send(sim, volume=1.5, side=1)
    (position,) = sim.positions_get(symbol="EURUSD") or ()
    assert position.type == api.POSITION_TYPE_SELL and position.volume == 0.5
    assert position.identifier == first.order and position.ticket == reverse.order
    deals = sim.history_deals_get(ticket=reverse.order)
    assert deals and deals[0].entry == api.DEAL_ENTRY_INOUT
    send(sim, volume=0.5, side=0)
    assert sim.positions_get(symbol="EURUSD") == ()
    entries = [d.entry for d in sim.history_deals_get(position=first.order) or ()]
    assert entries == [0, 0, 1, 2, 1]


def test_thread_safety_under_concurrent_sends() -> None:
    import threading

    sim, _ = make(netting=True)
    results: list[int] = []

    def worker() -> None:
        for _ in range(50):
            results.append(send(sim, volume=0.01).retcode)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [10009] * 200
    (position,) = sim.positions_get(symbol="EURUSD") or ()
    assert position.volume == pytest.approx(2.0)
    deals = sim.history_deals_get(position=position.identifier) or ()
    assert len({d.ticket for d in deals}) == 200


def test_config_is_a_frozen_copy() -> None:
    config = SimConfig()
    with pytest.raises(AttributeError):
        config.seed = 3  # type: ignore[misc]
    assert replace(config, seed=3).seed == 3
