"""The simulated broker's state file survives new instances and a process killed with -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from worker.mt5 import api
from worker.mt5.sim.terminal import FaultConfig, SimAccount, SimConfig, SimTerminal, iter_deals

NOW = 1764064800.0  # Tuesday 10:00 UTC
CONFIG = SimConfig(faults=FaultConfig.friendly(slippage_points=((0, 1.0),)))


def buy(sim: SimTerminal, comment: str, volume: float = 0.1, **extra: Any) -> api.OrderSendResult:
    request: dict[str, Any] = {
        "action": api.TRADE_ACTION_DEAL,
        "symbol": "EURUSD",
        "volume": volume,
        "type": api.ORDER_TYPE_BUY,
        "price": 0.0,
        "deviation": 10,
        "magic": 9,
        "comment": comment,
        "type_filling": api.ORDER_FILLING_FOK,
    }
    request.update(extra)
    result = sim.order_send(request)
    assert result is not None
    return result


def open_sim(path: Path, config: SimConfig = CONFIG, now: float = NOW) -> SimTerminal:
    sim = SimTerminal(config, state_path=path, clock=lambda: now)
    assert sim.initialize()
    return sim


def test_state_continues_in_a_new_instance(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite"
    first = open_sim(path)
    a = buy(first, "xwa")
    b = buy(first, "xwb", volume=0.2)
    closing = buy(first, "xwc", type=api.ORDER_TYPE_SELL, position=a.order)
    account = first.account_info()
    first.close()

    second = open_sim(path)
    assert second.account_info() == account
    positions = second.positions_get()
    assert positions is not None and [p.ticket for p in positions] == [b.order]
    assert positions[0].volume == 0.2 and positions[0].comment == "xwb"
    hist = second.history_orders_get(ticket=closing.order)
    assert hist and hist[0].position_id == a.order and hist[0].comment == "xwc"
    deals = second.history_deals_get(position=a.order)
    assert deals is not None and [d.entry for d in deals] == [0, 1]
    later = buy(second, "xwd")
    assert later.order > closing.order and later.deal > closing.deal
    second.close()

    dumped = list(iter_deals(path))
    assert [d["comment"] for d in dumped] == ["xwa", "xwb", "xwc", "xwd"]
    assert set(dumped[0]) >= {
        "ticket", "order", "position_id", "symbol", "type", "volume", "price", "comment",
        "magic", "time_msc",
    }  # fmt: skip
    assert dumped[0]["order"] == a.order and dumped[0]["magic"] == 9
    assert dumped[0]["time_msc"] == int(NOW * 1000) + 7_200_000


def test_netting_position_and_placed_order_survive(tmp_path: Path) -> None:
    path = tmp_path / "netting.sqlite"
    netting = SimConfig(account=SimAccount(margin_mode=0), faults=CONFIG.faults)
    sim = open_sim(path, netting)
    buy(sim, "xwn1", volume=1.0)
    assert sim.symbol_select("US500")
    placed = buy(sim, "xwp", symbol="US500", volume=2.0, type_filling=api.ORDER_FILLING_RETURN)
    assert placed.retcode == api.TRADE_RETCODE_PLACED
    sim.close()

    again = open_sim(path, netting)
    assert again.orders_get(ticket=placed.order) == ()  # due: filled on the first call
    deals = again.history_deals_get(ticket=placed.order)
    assert deals and deals[0].volume == 2.0
    buy(again, "xwn2", volume=0.5, type=api.ORDER_TYPE_SELL)  # reduces the netting position
    (position,) = again.positions_get(symbol="EURUSD") or ()
    assert position.volume == 0.5


CHILD = textwrap.dedent(
    """
    import sys
    from worker.mt5 import api
    from worker.mt5.sim.terminal import FaultConfig, SimConfig, SimTerminal
    sim = SimTerminal(SimConfig(faults=FaultConfig.friendly()), state_path=sys.argv[1])
    sim.initialize()
    sim.symbol_select("BTCUSD")  # trades every day of the week
    for i in range(1_000_000):
        result = sim.order_send({
            "action": 1, "symbol": "BTCUSD", "volume": 0.01, "type": i % 2,
            "price": 0.0, "deviation": 10, "magic": 5, "comment": f"xwk{i}",
            "type_filling": api.ORDER_FILLING_IOC,
        })
        print(result.retcode, result.order, result.deal, flush=True)
    """
)


def test_orders_answered_before_kill_9_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "killed.sqlite"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    answered: list[tuple[int, int, int]] = []
    assert child.stdout is not None
    for line in child.stdout:
        retcode, order, deal = (int(x) for x in line.split())
        answered.append((retcode, order, deal))
        if len(answered) == 40:
            child.send_signal(signal.SIGKILL)
            break
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert all(retcode == api.TRADE_RETCODE_DONE for retcode, _, _ in answered)

    sim = SimTerminal(SimConfig(faults=FaultConfig.friendly()), state_path=path)
    assert sim.initialize()
    for _, order, deal in answered:
        hist = sim.history_orders_get(ticket=order)
        assert hist and hist[0].state == api.ORDER_STATE_FILLED
        deals = sim.history_deals_get(ticket=order)
        assert deals and deals[0].ticket == deal
    dumped = [json.loads(json.dumps(d)) for d in iter_deals(path)]
    assert len(dumped) >= len(answered)
    sim.symbol_select("BTCUSD")
    last_order = max(order for _, order, _ in answered)
    result = sim.order_send(
        {
            "action": 1,
            "symbol": "BTCUSD",
            "volume": 0.01,
            "type": 0,
            "price": 0.0,
            "magic": 5,
            "comment": "xwafter",
            "type_filling": api.ORDER_FILLING_IOC,
        }
    )
    assert result is not None and result.order > last_order
    sim.close()


def test_history_orders_are_built_once_and_their_cache_is_not_kept(tmp_path: Path) -> None:
    """Every settler round asks for a window of many history orders: each is built once."""
    path = tmp_path / "broker.sqlite"
    first = open_sim(path)
    sent = buy(first, "xwh")
    window = (int(NOW) - 86400, int(NOW) + 86400)  # server time: the zone is not UTC
    one, two = first.history_orders_get(*window), first.history_orders_get(*window)
    assert one and two and one[0] is two[0]
    assert one[0] == first._book.orders[sent.order].to_api(one[0].price_open)
    first.close()
    rows = [json.loads(data) for (data,) in _sqlite_rows(path, "orders")]
    assert rows and all(not key.startswith("_") for row in rows for key in row)
    again = open_sim(path).history_orders_get(*window)
    assert again == one


def _sqlite_rows(path: Path, table: str) -> list[tuple[str]]:
    with sqlite3.connect(path) as db:
        return list(db.execute(f"SELECT data FROM {table}"))
