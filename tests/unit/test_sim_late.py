"""Late executions of the simulated terminal (``timeout_late``, ``lost_reply_late``).

An order_send whose outcome the client cannot know may execute long after the call
(DOMAIN.md section 3): nothing of it shows until then, and then it is an ordinary market
order at the price of that moment. The delay is compressed to a fraction of a second on an
injected clock; one test runs the real ``sim-terminal`` process on the wall clock.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from worker.mt5 import api
from worker.mt5.sim.config import SCRIPTED_OUTCOMES
from worker.mt5.sim.faults import FaultInjector
from worker.mt5.sim.state import late_pending
from worker.mt5.sim.terminal import FaultConfig, SimConfig, SimTerminal

NOW = 1764064800.0  # Tuesday 10:00 UTC
DELAY = 0.2
BRIDGE_DELAY = 3.0  # on the wall clock, across a restart of the process
FIRST_ORDER = 50_000_001  # the ticket the simulator gives its first order
MAGIC = 26112577
COMMENT = "xwlate-0123456789abcdef"  # 23 characters: a hardened server keeps 16


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def faults(**changes: Any) -> FaultConfig:
    base: dict[str, Any] = {
        "slippage_points": ((0, 1.0),),
        "late_execution_seconds": (DELAY, DELAY),
        "comment_keep_chars": 16,
    }
    return FaultConfig.friendly(**{**base, **changes})


def make(clock: Clock, state_path: Path | None = None, **changes: Any) -> tuple[SimTerminal, Clock]:
    sim = SimTerminal(SimConfig(faults=faults(**changes)), state_path=state_path, clock=clock)
    assert sim.initialize()
    return sim, clock


def request(symbol: str = "EURUSD", **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "action": api.TRADE_ACTION_DEAL,
        "symbol": symbol,
        "volume": 0.3,
        "type": api.ORDER_TYPE_BUY,
        "price": 0.0,
        "deviation": 10,
        "magic": MAGIC,
        "comment": COMMENT,
        "type_filling": api.ORDER_FILLING_FOK,
    }
    base.update(extra)
    return base


def send_late(sim: SimTerminal, outcome: str, **extra: Any) -> None:
    """The call's reply: 10012 (``timeout_late``) or None + -10005 (``lost_reply_late``)."""
    result = sim.order_send(request(**extra))
    if outcome == "timeout_late":
        assert result is not None and result.retcode == api.TRADE_RETCODE_TIMEOUT
        assert result.order == 0 and result.deal == 0
    else:
        assert result is None
        assert sim.last_error() == (api.RES_E_INTERNAL_FAIL_TIMEOUT, "IPC timeout")


def invisible(sim: SimTerminal) -> bool:
    """Nothing of the order in any query: open orders, history by window and by ticket,
    deals by window and by (the would-be) order ticket, positions."""
    seen = (
        sim.orders_get(),
        sim.orders_get(ticket=FIRST_ORDER),
        sim.positions_get(),
        sim.positions_get(symbol="EURUSD"),
        sim.history_orders_get(0, 2**31),
        sim.history_orders_get(ticket=FIRST_ORDER),
        sim.history_orders_get(position=FIRST_ORDER),
        sim.history_deals_get(0, 2**31),
        sim.history_deals_get(ticket=FIRST_ORDER),
        sim.history_deals_get(position=FIRST_ORDER),
    )
    assert all(found is not None for found in seen), sim.last_error()
    return all(found == () for found in seen)


def assert_executed(sim: SimTerminal, ask: float, volume: float = 0.3) -> api.TradeDeal:
    """The late order is an ordinary filled market order: order in history, one deal at
    the then-current ask, a position, all with the request's magic and the cut comment."""
    assert sim.orders_get() == ()
    orders = sim.history_orders_get(0, 2**31)
    assert orders is not None and len(orders) == 1
    order = orders[0]
    assert order.state == api.ORDER_STATE_FILLED and order.magic == MAGIC
    assert order.comment == COMMENT[:16] and order.volume_initial == volume
    assert sim.history_orders_get(ticket=order.ticket) == (order,)
    deals = sim.history_deals_get(ticket=order.ticket)
    assert deals is not None and len(deals) == 1
    deal = deals[0]
    assert deal.magic == MAGIC and deal.comment == COMMENT[:16] and deal.volume == volume
    assert deal.price == ask and deal.entry == api.DEAL_ENTRY_IN
    assert sim.history_deals_get(0, 2**31) == (deal,)
    positions = sim.positions_get()
    assert positions is not None and len(positions) == 1
    assert positions[0].identifier == order.ticket and positions[0].magic == MAGIC
    assert positions[0].comment == COMMENT[:16] and positions[0].volume == volume
    return deal


def test_the_knobs_are_off_by_default_in_both_presets() -> None:
    assert {"timeout_late", "lost_reply_late"} <= SCRIPTED_OUTCOMES
    for config in (FaultConfig(), FaultConfig.hardened(), FaultConfig.friendly()):
        assert config.late_timeout_rate == 0.0 and config.late_lost_reply_rate == 0.0
        assert config.late_execution_seconds == (10.0, 30.0)


def test_the_toml_keys_of_the_faults_table() -> None:
    config = SimConfig.from_mapping(
        {
            "faults": {
                "scripted": ["timeout_late", "lost_reply_late", "ok"],
                "late_timeout_rate": 0.1,
                "late_lost_reply_rate": 0.2,
                "late_execution_seconds": [3, 8],
            }
        }
    )
    assert config.faults.scripted == ("timeout_late", "lost_reply_late", "ok")
    assert config.faults.late_timeout_rate == 0.1 and config.faults.late_lost_reply_rate == 0.2
    assert config.faults.late_execution_seconds == (3.0, 8.0)


@pytest.mark.parametrize("bad", [(8.0, 3.0), (-1.0, 2.0), (1.0,), "soon"])
def test_a_bad_delay_range_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="late_execution_seconds"):
        FaultConfig(late_execution_seconds=bad)


@pytest.mark.parametrize("outcome", ["timeout_late", "lost_reply_late"])
def test_invisible_until_it_executes_then_an_ordinary_market_fill(outcome: str) -> None:
    sim, clock = make(Clock(), scripted=(outcome,))
    send_late(sim, outcome)
    assert sim.late_pending == 1
    assert invisible(sim)
    clock.advance(DELAY * 0.9)
    assert invisible(sim) and sim.late_pending == 1  # silence proves nothing
    clock.advance(DELAY * 0.2)
    tick = sim.symbol_info_tick("EURUSD")  # any call executes what is due, first
    assert tick is not None and sim.late_pending == 0
    assert_executed(sim, tick.ask)


def test_it_fills_at_the_price_of_its_execution_not_of_the_call() -> None:
    # an instant-execution symbol: the request names a price, the late fill ignores it
    sim, clock = make(Clock(), scripted=("timeout_late",), late_execution_seconds=(60.0, 60.0))
    sim.symbol_select("GBPUSD", True)
    asked = sim.symbol_info_tick("GBPUSD")
    assert asked is not None
    result = sim.order_send(
        request("GBPUSD", price=asked.ask, type_filling=api.ORDER_FILLING_IOC, deviation=0)
    )
    assert result is not None and result.retcode == api.TRADE_RETCODE_TIMEOUT
    clock.advance(61.0)
    tick = sim.symbol_info_tick("GBPUSD")
    assert tick is not None and tick.ask != asked.ask  # the market moved meanwhile
    deals = sim.history_deals_get(0, 2**31)
    assert deals is not None and [d.price for d in deals] == [tick.ask]


def test_its_deal_honours_the_deal_lag_after_the_execution() -> None:
    sim, clock = make(Clock(), scripted=("lost_reply_late",), deal_lag_ms=500.0)
    send_late(sim, "lost_reply_late")
    clock.advance(DELAY + 0.01)
    orders = sim.history_orders_get(0, 2**31)  # executed: the order shows at once ...
    assert orders is not None and len(orders) == 1
    assert sim.history_deals_get(ticket=orders[0].ticket) == ()  # ... its deal lags
    clock.advance(0.5)
    deals = sim.history_deals_get(ticket=orders[0].ticket)
    assert deals is not None and len(deals) == 1


def test_a_late_close_whose_position_is_gone_leaves_no_trace() -> None:
    sim, clock = make(Clock(), scripted=("ok", "timeout_late", "ok"))
    opened = sim.order_send(request())
    assert opened is not None and opened.retcode == api.TRADE_RETCODE_DONE
    close = {"type": api.ORDER_TYPE_SELL, "position": opened.order}
    send_late(sim, "timeout_late", **close)
    done = sim.order_send(request(**close))  # the client closed it another way meanwhile
    assert done is not None and done.retcode == api.TRADE_RETCODE_DONE
    clock.advance(DELAY + 0.01)
    assert sim.positions_get() == () and sim.late_pending == 0
    orders = sim.history_orders_get(0, 2**31)
    assert orders is not None and len(orders) == 2


def test_a_waiting_order_survives_a_restart_and_executes_after_it(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite"
    clock = Clock()
    first, _ = make(clock, path, scripted=("timeout_late",))
    send_late(first, "timeout_late")
    first.close()  # the process ends (state committed before order_send answered)
    assert late_pending(path) == 1

    second, _ = make(clock, path)
    assert second.late_pending == 1 and invisible(second)
    second.close()
    clock.advance(DELAY * 5)  # due while no simulator ran

    third, _ = make(clock, path)
    assert third.late_pending == 1  # loaded, executes at the first call
    tick = third.symbol_info_tick("EURUSD")
    assert tick is not None and third.late_pending == 0
    deal = assert_executed(third, tick.ask)
    third.close()
    assert late_pending(path) == 0

    fourth, _ = make(clock, path)  # executed once, kept once
    assert fourth.late_pending == 0
    assert fourth.history_deals_get(0, 2**31) == (deal,)


def test_rates_and_delays_come_from_the_seeded_fault_generator() -> None:
    def run(seed: int) -> list[tuple[int | None, int]]:
        clock = Clock()
        sim, _ = make(
            clock,
            late_timeout_rate=0.3,
            late_lost_reply_rate=0.3,
            late_execution_seconds=(1.0, 2.0),
            fault_seed=seed,
        )
        replies = []
        for _ in range(40):
            result = sim.order_send(request(volume=0.01))
            replies.append((None if result is None else result.retcode, sim.late_pending))
        return replies

    first = run(11)
    assert first == run(11)  # reproducible
    assert first != run(12)
    kinds = [retcode for retcode, _ in first]
    late = kinds.count(None) + kinds.count(api.TRADE_RETCODE_TIMEOUT)
    assert kinds.count(None) >= 5 and kinds.count(api.TRADE_RETCODE_TIMEOUT) >= 5
    assert late + kinds.count(api.TRADE_RETCODE_DONE) == 40 and 12 <= late <= 36

    config = SimConfig(faults=faults(late_execution_seconds=(10.0, 30.0), fault_seed=5))
    delays = [FaultInjector(config).late_delay_seconds() for _ in range(2)]
    assert delays[0] == delays[1]  # same seed, same draw
    injector = FaultInjector(config)
    many = [injector.late_delay_seconds() for _ in range(200)]
    assert all(10.0 <= d <= 30.0 for d in many) and max(many) - min(many) > 15.0


def test_through_the_sim_terminal_process_and_its_restart(tmp_path: Path) -> None:
    """``execution-worker sim-terminal`` with the TOML keys, on the wall clock: the late order
    is invisible over the bridge, survives a kill -9 of the process, and executes after."""
    from tests.faults.processes import SimTerminalProcess
    from worker.mt5.bridge.client import BridgeTerminal

    config = tmp_path / "sim.toml"
    config.write_text(
        "[symbols.EURUSD]\nclosed_weekly = []\n"
        '[faults]\npreset = "friendly"\nscripted = ["lost_reply_late"]\n'
        f"late_execution_seconds = [{BRIDGE_DELAY}, {BRIDGE_DELAY}]\n"
    )
    secret = secrets.token_urlsafe(16)
    process = SimTerminalProcess(tmp_path, "late", config, secret).start()
    try:
        client = BridgeTerminal(process.address, secret, timeout=10)
        assert client.initialize(), client.last_error()
        sent = time.monotonic()
        assert client.order_send(request()) is None
        assert client.last_error()[0] == api.RES_E_INTERNAL_FAIL_TIMEOUT
        assert client.history_orders_get(0, 2**31) == () and client.positions_get() == ()
        client.shutdown()
        process.kill()  # kill -9: the waiting order is in the state file
        assert late_pending(process.state) == 1
        process.start()
        client = BridgeTerminal(process.address, secret, timeout=10)
        assert client.initialize(), client.last_error()
        if time.monotonic() - sent < BRIDGE_DELAY - 0.5:  # (a slow restart may take longer)
            assert client.history_deals_get(0, 2**31) == ()
        time.sleep(max(0.0, BRIDGE_DELAY + 0.1 - (time.monotonic() - sent)))
        deals = client.history_deals_get(0, 2**31)
        assert deals is not None and len(deals) == 1
        assert deals[0].magic == MAGIC and deals[0].comment == COMMENT
        client.shutdown()
    finally:
        process.stop()
    assert late_pending(process.state) == 0
    assert [deal["magic"] for deal in process.deals()] == [MAGIC]
