"""Fault knobs of the simulated terminal: each one does what the worker must survive."""

from __future__ import annotations

import time
from typing import Any

import pytest

from worker.mt5 import api
from worker.mt5.sim.terminal import FaultConfig, SimConfig, SimTerminal

NOW = 1764064800.0  # Tuesday 10:00 UTC


def make(**faults: Any) -> SimTerminal:
    config = SimConfig(faults=FaultConfig.friendly(slippage_points=((0, 1.0),), **faults))
    sim = SimTerminal(config, clock=lambda: NOW)
    assert sim.initialize()
    return sim


def request(comment: str = "xwfault", symbol: str = "EURUSD", **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "action": api.TRADE_ACTION_DEAL,
        "symbol": symbol,
        "volume": 0.1,
        "type": api.ORDER_TYPE_BUY,
        "price": 0.0,
        "deviation": 10,
        "magic": 3,
        "comment": comment,
        "type_filling": api.ORDER_FILLING_FOK,
    }
    base.update(extra)
    return base


def executed(sim: SimTerminal, comment: str) -> int:
    deals = sim.history_deals_get(0, 2**31) or ()
    return sum(1 for d in deals if d.comment == comment)


def test_lost_reply_executes_but_returns_none() -> None:
    sim = make(lost_reply_rate=1.0)
    assert sim.order_send(request("xwlost")) is None
    assert sim.last_error() == (api.RES_E_INTERNAL_FAIL_TIMEOUT, "IPC timeout")
    assert executed(sim, "xwlost") == 1  # the unknown outcome: it DID execute
    positions = sim.positions_get()
    assert positions and positions[0].comment == "xwlost"


def test_no_result_does_not_execute() -> None:
    sim = make(no_result_rate=1.0)
    assert sim.order_send(request("xwnone")) is None
    assert sim.last_error()[0] == api.RES_E_FAIL
    assert executed(sim, "xwnone") == 0


@pytest.mark.parametrize(("executes", "count"), [(True, 1), (False, 0)])
def test_timeout_retcode_executed_or_not(executes: bool, count: int) -> None:
    sim = make(timeout_rate=1.0, timeout_executes=executes)
    result = sim.order_send(request("xwtime"))
    assert result is not None and result.retcode == api.TRADE_RETCODE_TIMEOUT
    assert executed(sim, "xwtime") == count


@pytest.mark.parametrize(
    ("knob", "retcode"),
    [
        ("too_many_requests_rate", api.TRADE_RETCODE_TOO_MANY_REQUESTS),
        ("reject_rate", api.TRADE_RETCODE_REJECT),
    ],
)
def test_refusals_do_not_execute(knob: str, retcode: int) -> None:
    sim = make(**{knob: 1.0})
    result = sim.order_send(request("xwref"))
    assert result is not None and result.retcode == retcode
    assert executed(sim, "xwref") == 0
    sim.set_faults(**{knob: 0.0})
    result = sim.order_send(request("xwref"))
    assert result is not None and result.retcode == api.TRADE_RETCODE_DONE


def test_requote_rate_only_hits_instant_execution() -> None:
    sim = make(requote_rate=1.0)
    tick = sim.symbol_info_tick("GBPUSD")
    assert tick is not None
    instant = request(symbol="GBPUSD", price=tick.ask, type_filling=api.ORDER_FILLING_IOC)
    result = sim.order_send(instant)
    assert result is not None and result.retcode == api.TRADE_RETCODE_REQUOTE
    market = sim.order_send(request())
    assert market is not None and market.retcode == api.TRADE_RETCODE_DONE


def test_rates_are_seeded_and_reproducible() -> None:
    def run(seed: int) -> list[int]:
        sim = make(reject_rate=0.5, fault_seed=seed)
        results = [sim.order_send(request(f"xw{i}")) for i in range(40)]
        return [r.retcode for r in results if r is not None]

    first = run(11)
    assert first == run(11)
    assert first != run(12)
    assert 5 < first.count(api.TRADE_RETCODE_REJECT) < 35


def test_scripted_outcomes_are_consumed_in_order() -> None:
    sim = make(scripted=("requote", "invalid_fill", "lost_reply", "ok"))
    codes = []
    for i in range(5):
        result = sim.order_send(request(f"xws{i}"))
        codes.append(None if result is None else result.retcode)
    assert codes == [10004, 10030, None, 10009, 10009]
    assert [executed(sim, f"xws{i}") for i in range(5)] == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="bogus"):
        sim.set_faults(scripted=("bogus",))


def test_disconnect_fails_every_call_until_initialize() -> None:
    sim = make()
    sim.disconnect()
    assert sim.order_send(request()) is None
    assert sim.last_error()[0] in range(-10005, -10000)
    assert sim.symbol_info("EURUSD") is None
    assert not sim.symbol_select("EURUSD")
    assert sim.account_info() is None
    assert sim.initialize()
    assert sim.account_info() is not None


def test_disconnect_rate_drops_the_connection() -> None:
    sim = make(disconnect_rate=1.0)
    assert sim.terminal_info() is None
    assert sim.last_error()[0] in api.CONNECTION_LOST_ERRORS
    sim.set_faults(disconnect_rate=0.0)
    assert sim.terminal_info() is None  # still down: needs initialize()
    assert sim.initialize()
    assert sim.terminal_info() is not None


def test_latency_per_function() -> None:
    sim = make(latency_by_function={"order_send": 30.0})
    started = time.perf_counter()
    sim.order_send(request())
    slow = time.perf_counter() - started
    # a lower bound only (sleep never returns early); no upper bound on a shared machine
    assert slow >= 0.030
