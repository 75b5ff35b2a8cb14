"""Server hardening of the simulator (issue 17): cut comments, lagging deals, failing queries,
a DST clock and the one switch that turns every hardening on."""

from __future__ import annotations

import calendar
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from worker.mt5 import api
from worker.mt5.sim import config as sim_config
from worker.mt5.sim.clock import us_dst_bounds, us_dst_in_force
from worker.mt5.sim.config import FRIENDLY, HARDENED
from worker.mt5.sim.terminal import FaultConfig, SimConfig, SimTerminal

WINTER = 1764064800.0  # Tuesday 2025-11-25 10:00 UTC
SUMMER = float(calendar.timegm((2026, 7, 14, 10, 0, 0)))  # a Tuesday, US DST in force
NO_SLIP = ((0, 1.0),)
TOKEN = "xw0123456789abcdef0123"  # 22 characters


class Clock:
    def __init__(self, now: float = WINTER) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(clock: Clock | None = None, **faults: Any) -> tuple[SimTerminal, Clock]:
    clock = clock or Clock()
    config = SimConfig(faults=FaultConfig.friendly(slippage_points=NO_SLIP, **faults))
    sim = SimTerminal(config, clock=clock)
    assert sim.initialize()
    return sim, clock


def buy(sim: SimTerminal, **extra: Any) -> api.OrderSendResult:
    request: dict[str, Any] = {
        "action": api.TRADE_ACTION_DEAL,
        "symbol": "EURUSD",
        "volume": 0.1,
        "type": api.ORDER_TYPE_BUY,
        "price": 0.0,
        "deviation": 10,
        "magic": 77,
        "comment": TOKEN,
        "type_filling": api.ORDER_FILLING_FOK,
    }
    request.update(extra)
    result = sim.order_send(request)
    assert result is not None, sim.last_error()
    return result


# ---------------------------------------------------------------- one switch for all
def test_every_hardening_follows_the_module_default_and_the_presets() -> None:
    friendly = FaultConfig.friendly()
    hardened = FaultConfig.hardened()
    default = hardened if sim_config.HARDENED_BY_DEFAULT else friendly
    assert FaultConfig() == default
    for name, value in FRIENDLY.items():
        assert getattr(friendly, name) == value
        assert getattr(hardened, name) == HARDENED[name]
    assert {n for n in FRIENDLY if FRIENDLY[n] != HARDENED[n]} >= {
        "comment_keep_chars",
        "deal_lag_ms",
        "deal_zero_rate",
        "query_none_rate",
        "dst_clock",
        "filling_by_exemode",
        "strict_retcodes",
        "algo_off_returns_none",
        "float_only_binding",
        "symbol_info_needs_select",
        "position_ticket_differs",
    }
    assert set(FRIENDLY) <= {f.name for f in fields(FaultConfig)}
    assert SimConfig.hardened().faults == hardened
    assert FaultConfig.hardened(comment_keep_chars=8).comment_keep_chars == 8


@pytest.mark.parametrize("flag", [True, False])
def test_the_module_default_flips_every_new_config(
    monkeypatch: pytest.MonkeyPatch, flag: bool
) -> None:
    monkeypatch.setattr(sim_config, "HARDENED_BY_DEFAULT", flag)
    preset = FaultConfig.hardened if flag else FaultConfig.friendly
    assert FaultConfig(latency_ms=1.0) == preset(latency_ms=1.0)
    assert SimConfig().faults.comment_keep_chars == (16 if flag else None)
    assert FaultConfig.friendly().comment_keep_chars is None


def test_toml_preset_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text('[faults]\npreset = "hardened"\ncomment_keep_chars = 10\n')
    faults = SimConfig.from_toml(path).faults
    assert faults == FaultConfig.hardened(comment_keep_chars=10)
    path.write_text('[faults]\npreset = "friendly"\ndst_clock = true\ncomment_replace = ""\n')
    faults = SimConfig.from_toml(path).faults
    assert faults == FaultConfig.friendly(dst_clock=True, comment_replace="")
    path.write_text("[faults]\ndeal_zero_rate = 0.5\n")
    assert SimConfig.from_toml(path).faults == FaultConfig(deal_zero_rate=0.5)
    path.write_text("[symbols.EURUSD]\nrefused_fillings = [0]\n")
    assert SimConfig.from_toml(path).symbols["EURUSD"].refused_fillings == (api.ORDER_FILLING_FOK,)
    path.write_text('[faults]\npreset = "nasty"\n')
    with pytest.raises(ValueError, match="nasty"):
        SimConfig.from_toml(path)
    with pytest.raises(ValueError, match="comment_keep_chars"):
        FaultConfig(comment_keep_chars=-1)


# ---------------------------------------------------------------- comments
def test_comments_are_kept_whole_on_the_friendly_server() -> None:
    sim, _ = make()
    result = buy(sim)
    (deal,) = sim.history_deals_get(ticket=result.order) or ()
    assert deal.comment == TOKEN


def test_comments_are_cut_on_orders_deals_and_positions_and_magic_is_whole() -> None:
    sim, _ = make(comment_keep_chars=16)
    magic = 2**63 - 5
    result = buy(sim, magic=magic)
    assert result.request is not None and result.request.comment == TOKEN  # the echo
    (order,) = sim.history_orders_get(ticket=result.order) or ()
    (deal,) = sim.history_deals_get(ticket=result.order) or ()
    (position,) = sim.positions_get(symbol="EURUSD") or ()
    assert order.comment == deal.comment == position.comment == TOKEN[:16]
    assert order.magic == deal.magic == position.magic == magic
    sim.set_faults(comment_keep_chars=5)
    later = buy(sim)
    assert [d.comment for d in sim.history_deals_get(ticket=later.order) or ()] == [TOKEN[:5]]


@pytest.mark.parametrize("replacement", ["", "[sl 1.08]"])
def test_comments_replaced_or_blanked(replacement: str) -> None:
    sim, _ = make(comment_replace=replacement)
    result = buy(sim)
    (deal,) = sim.history_deals_get(ticket=result.order) or ()
    (position,) = sim.positions_get(symbol="EURUSD") or ()
    assert deal.comment == position.comment == replacement


# ---------------------------------------------------------------- deals lag the reply
def test_deals_show_up_only_after_the_lag() -> None:
    sim, clock = make(deal_lag_ms=300.0)
    result = buy(sim)
    assert result.retcode == api.TRADE_RETCODE_DONE and result.deal > 0
    (order,) = sim.history_orders_get(ticket=result.order) or ()
    assert order.state == api.ORDER_STATE_FILLED  # the order is final already
    server_now = int(clock.now) + 7200
    assert sim.history_deals_get(ticket=result.order) == ()
    assert sim.history_deals_get(position=order.position_id) == ()
    assert sim.history_deals_get(server_now - 60, server_now + 60) == ()
    clock.now += 0.2
    assert sim.history_deals_get(ticket=result.order) == ()
    clock.now += 0.1
    (deal,) = sim.history_deals_get(ticket=result.order) or ()
    assert deal.ticket == result.deal
    assert sim.history_deals_get(server_now - 60, server_now + 60) == (deal,)


def test_lag_jitter_is_bounded() -> None:
    sim, clock = make(deal_lag_ms=100.0, deal_lag_jitter_ms=400.0)
    orders = [buy(sim).order for _ in range(20)]
    clock.now += 0.05
    assert all(sim.history_deals_get(ticket=o) == () for o in orders)
    clock.now += 0.5
    assert all(len(sim.history_deals_get(ticket=o) or ()) == 1 for o in orders)


def test_deal_ticket_zero_in_the_reply_while_the_deal_exists() -> None:
    sim, _ = make(deal_zero_rate=1.0)
    result = buy(sim)
    assert result.retcode == api.TRADE_RETCODE_DONE and result.deal == 0
    assert result.order > 0 and result.volume == 0.1 and result.price > 0
    (deal,) = sim.history_deals_get(ticket=result.order) or ()
    assert deal.volume == 0.1
    sim.set_faults(deal_zero_rate=0.5)
    zeros = [buy(sim).deal == 0 for _ in range(60)]
    assert any(zeros) and not all(zeros)


# ---------------------------------------------------------------- queries answer None
QUERIES = ("history_deals_get", "history_orders_get", "orders_get", "positions_get")


def call(sim: SimTerminal, name: str) -> Any:
    if name.startswith("history"):
        return getattr(sim, name)(0, 2**31)
    return getattr(sim, name)()


@pytest.mark.parametrize("name", QUERIES)
def test_queries_fail_with_none_without_dropping_the_connection(name: str) -> None:
    sim, _ = make()
    buy(sim)
    sim.set_faults(query_none_rate=1.0)
    assert call(sim, name) is None
    assert sim.last_error()[0] in (api.RES_E_INTERNAL_FAIL_TIMEOUT, api.RES_E_INVALID_PARAMS)
    assert sim.terminal_info() is not None  # still connected, other calls work
    sim.set_faults(query_none_rate=0.0)
    assert call(sim, name) is not None


def test_query_failures_are_a_seeded_fraction() -> None:
    sim, _ = make(query_none_rate=0.3)
    answers = [sim.positions_get() for _ in range(200)]
    failed = sum(answer is None for answer in answers)
    assert 20 < failed < 100
    again, _ = make(query_none_rate=0.3)
    assert [again.positions_get() is None for _ in range(200)] == [a is None for a in answers]
    assert sim.symbol_info_tick("EURUSD") is not None  # only the four queries fail


# ---------------------------------------------------------------- the server clock
def test_us_dst_dates() -> None:
    start, end = us_dst_bounds(2026)
    assert start == calendar.timegm((2026, 3, 8, 7, 0, 0))  # second Sunday of March
    assert end == calendar.timegm((2026, 11, 1, 6, 0, 0))  # first Sunday of November
    assert us_dst_bounds(2025) == (
        calendar.timegm((2025, 3, 9, 7, 0, 0)),
        calendar.timegm((2025, 11, 2, 6, 0, 0)),
    )
    assert not us_dst_in_force(start - 1) and us_dst_in_force(start)
    assert us_dst_in_force(end - 1) and not us_dst_in_force(end)


@pytest.mark.parametrize(("now", "offset"), [(WINTER, 7200), (SUMMER, 10800)])
def test_dst_clock_offsets_ticks_orders_and_deals(now: float, offset: int) -> None:
    sim, _ = make(Clock(now), dst_clock=True)
    assert sim.server_offset_seconds == offset
    tick = sim.symbol_info_tick("EURUSD")
    assert tick is not None and tick.time_msc == int(now * 1000) + offset * 1000
    result = buy(sim)
    (order,) = sim.history_orders_get(ticket=result.order) or ()
    (deal,) = sim.history_deals_get(ticket=result.order) or ()
    assert deal.time_msc == order.time_done_msc == int(now * 1000) + offset * 1000
    fixed, _ = make(Clock(now))
    assert fixed.server_offset_seconds == 7200  # without the rule: always GMT+2


def test_dst_switch_while_running() -> None:
    sim, clock = make(Clock(calendar.timegm((2026, 3, 8, 6, 59, 0))), dst_clock=True)
    assert sim.symbol_select("BTCUSD")  # open on Sundays, when FX is closed
    before = sim.symbol_info_tick("BTCUSD")
    assert before is not None
    clock.now += 120  # 07:01 UTC: New York has sprung forward
    after = sim.symbol_info_tick("BTCUSD")
    assert after is not None
    assert after.time_msc - before.time_msc == 120_000 + 3_600_000


def test_forced_offset_switch_and_history_after_falling_back() -> None:
    sim, clock = make(dst_clock=False)
    first = buy(sim)
    tick = sim.symbol_info_tick("EURUSD")
    assert tick is not None
    sim.set_faults(clock_shift_seconds=3600)  # e.g. the spring switch, forced
    assert sim.server_offset_seconds == 10800
    shifted = sim.symbol_info_tick("EURUSD")
    assert shifted is not None and shifted.time_msc == tick.time_msc + 3_600_000
    clock.now += 60
    second = buy(sim)
    sim.set_faults(clock_shift_seconds=0)  # and back: server time repeats an hour
    clock.now += 60
    third = buy(sim)
    deals = sim.history_deals_get(0, 2**31) or ()
    assert [d.order for d in deals] == [first.order, third.order, second.order]  # time order
    times = [d.time_msc for d in deals]
    assert times == sorted(times)
    (late,) = sim.history_deals_get(ticket=second.order) or ()
    window = sim.history_deals_get(late.time_msc // 1000 - 1, late.time_msc // 1000 + 1)
    assert window == (late,)


def test_a_hardened_state_file_reopens_with_its_deals_and_clock(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    clock = Clock(SUMMER)
    config = SimConfig.hardened(
        faults=FaultConfig.hardened(slippage_points=NO_SLIP, query_none_rate=0.0)
    )
    first = SimTerminal(config, clock=clock, state_path=path)
    assert first.initialize()
    sent = buy(first)
    assert first.history_deals_get(ticket=sent.order) == ()  # still lagging
    first.close()
    clock.now -= 30  # the host clock stepped back: records still never go back in time
    second = SimTerminal(config, clock=clock, state_path=path)
    assert second.initialize()
    (deal,) = second.history_deals_get(ticket=sent.order) or ()  # nothing hides after a restart
    assert deal.comment == TOKEN[:16] and deal.time_msc == int(SUMMER * 1000) + 10_800_000
    later = buy(second)
    (order,) = second.history_orders_get(ticket=later.order) or ()
    assert order.time_setup_msc >= deal.time_msc
