"""Gateway rules (DOMAIN.md 2 and 6) driven through the simulated terminal."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.enums import RejectionReason
from schemas.identity import comment_token_for, execution_id_for
from tests.simbooks import broker_deals
from worker.mt5 import api
from worker.mt5.gateway import (
    Gateway,
    GatewayRejection,
    HistoryWindow,
    OrderIdentity,
    SessionLost,
    Side,
    classify_retcode,
    signed_slippage_pips,
    vwap,
)
from worker.mt5.sim.terminal import FaultConfig, SimAccount, SimConfig, SimTerminal

TUESDAY_10_UTC = 1764064800.0
PIPS = {"XAUUSD": 0.1, "US500": 1.0, "BTCUSD": 1.0}
TOKEN = comment_token_for(execution_id_for("rpm-order-1"))


class Clock:
    def __init__(self, now: float = TUESDAY_10_UTC) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, *, offset: int | None = None, **config: Any) -> None:
        self.clock = Clock()
        config.setdefault("faults", FaultConfig(slippage_points=((0, 1.0),)))
        self.sim = SimTerminal(SimConfig(**config), clock=self.clock)
        assert self.sim.initialize()
        self.sleeps: list[float] = []
        self.gateway = Gateway(
            self.sim,
            magic=26112501,
            pip_sizes=PIPS,
            max_tick_age_seconds=10.0,
            server_utc_offset_seconds=offset,
            clock=self.clock,
            sleep=self.sleeps.append,
        )

    def send(self, symbol: str = "EURUSD", side: Side = Side.BUY, lots: float = 0.1) -> Any:
        spec = self.gateway.symbol_spec(symbol)
        return self.gateway.send(spec, side, lots, comment=TOKEN, deviation=20)

    def our_deals(self) -> int:
        """Deals the broker booked under our magic (its books: lagging deals count too)."""
        return len(broker_deals(self.sim, 26112501))

    def after_the_deal_lag(self) -> None:
        self.clock.now += 2  # deal_lag_ms + jitter < 1 s on the hardened simulator


class NoTicks:
    """A terminal whose symbol_info_tick always fails (no feed for anything)."""

    def __init__(self, inner: SimTerminal) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def symbol_info_tick(self, symbol: str) -> None:
        del symbol


@pytest.fixture
def h() -> Harness:
    return Harness()


# ---------------------------------------------------------------- pure helpers
def test_signed_slippage_both_sides() -> None:
    assert signed_slippage_pips(Side.BUY, 1.10000, 1.10020, 0.0001) == pytest.approx(2.0)
    assert signed_slippage_pips(Side.BUY, 1.10000, 1.09990, 0.0001) == pytest.approx(-1.0)
    assert signed_slippage_pips(Side.SELL, 1.10000, 1.09970, 0.0001) == pytest.approx(3.0)
    assert signed_slippage_pips(Side.SELL, 150.000, 150.050, 0.01) == pytest.approx(-5.0)
    assert signed_slippage_pips(Side.BUY, 2350.00, 2350.50, 0.1) == pytest.approx(5.0)


def test_classify_retcode() -> None:
    assert classify_retcode(None) == "unknown"
    assert [classify_retcode(c) for c in (10009, 10010, 10008)] == ["done", "partial", "placed"]
    assert {classify_retcode(c) for c in (10004, 10020, 10021)} == {"retry_price"}
    assert {classify_retcode(c) for c in (10024, 10028, 10029)} == {"retry_backoff"}
    assert {classify_retcode(c) for c in (10011, 10012, 10031)} == {"unknown"}
    finals = (10006, 10007, 10013, 10014, 10015, 10016, 10017, 10018, 10019, 10022, 10026, 10027)
    assert {classify_retcode(c) for c in (*finals, 10030, 10032, 10046)} == {"final"}


def test_vwap() -> None:
    deal = api.TradeDeal(1, 1, 0, 0, 0, 0, 0, 0, 0, 1.0, 1.1, 0, 0, 0, 0, "EURUSD", "", "")
    assert vwap([]) is None
    assert vwap([deal, deal._replace(volume=3.0, price=1.2)]) == pytest.approx(1.175)


# ---------------------------------------------------------------- symbols and pips
def test_pips_deviation_and_fx_digits_rule(h: Harness) -> None:
    eurusd = h.gateway.symbol_spec("EURUSD")
    usdjpy = h.gateway.symbol_spec("USDJPY")
    gold = h.gateway.symbol_spec("XAUUSD")
    assert (eurusd.pip, usdjpy.pip, gold.pip) == (0.0001, pytest.approx(0.01), 0.1)
    assert h.gateway.deviation_points(eurusd, 2.0) == 20
    assert h.gateway.deviation_points(usdjpy, 2.0) == 20
    assert h.gateway.deviation_points(gold, 2.0) == 20  # 2 * 0.1 / 0.01
    assert h.gateway.deviation_points(eurusd, 0.5) == 5


def test_symbol_select_and_unknown_symbols(h: Harness) -> None:
    spec = h.gateway.symbol_spec("BTCUSD")  # not in Market Watch at start
    assert spec.pip == 1.0
    assert h.gateway.snapshot(spec).bid > 0
    with pytest.raises(GatewayRejection) as unknown:
        h.gateway.symbol_spec("EURUSD.x")
    assert unknown.value.reason is RejectionReason.SYMBOL_NOT_TRADABLE
    no_pips = Gateway(h.sim, magic=1, pip_sizes={}, max_tick_age_seconds=10, clock=h.clock)
    with pytest.raises(GatewayRejection, match="pip_sizes") as gold:
        no_pips.symbol_spec("XAUUSD")
    assert gold.value.reason is RejectionReason.SYMBOL_NOT_TRADABLE


def test_trading_permissions_at_three_levels(h: Harness) -> None:
    spec = h.gateway.symbol_spec("EURUSD")
    h.gateway.check_trading_allowed(spec, Side.SELL)
    h.sim.set_trading(terminal=False)
    with pytest.raises(GatewayRejection, match="Algo Trading") as exc:
        h.gateway.check_trading_allowed(spec, Side.BUY)
    assert exc.value.reason is RejectionReason.TRADING_DISABLED
    h.sim.set_trading(terminal=True, expert=False)
    with pytest.raises(GatewayRejection, match="expert"):
        h.gateway.check_trading_allowed(spec, Side.BUY)
    h.sim.set_trading(expert=True)
    h.sim.update_symbol("EURUSD", trade_mode=api.SYMBOL_TRADE_MODE_LONGONLY)
    long_only = h.gateway.symbol_spec("EURUSD")
    h.gateway.check_trading_allowed(long_only, Side.BUY)
    with pytest.raises(GatewayRejection, match="long only") as side:
        h.gateway.check_trading_allowed(long_only, Side.SELL)
    assert side.value.reason is RejectionReason.SYMBOL_NOT_TRADABLE


# ---------------------------------------------------------------- ticks and clocks
@pytest.mark.parametrize("configured", [7200, None])
def test_stale_tick_with_a_non_utc_server_clock(configured: int | None) -> None:
    h = Harness(offset=configured)  # server is UTC+2; learned when not configured
    spec = h.gateway.symbol_spec("EURUSD")
    fresh = h.gateway.snapshot(spec)
    assert fresh.tick_age_seconds < 1.0  # naive "server vs UTC" would say 7200 s
    assert fresh.spread_pips == pytest.approx(1.2)
    assert h.gateway.server_offset_seconds == 7200
    h.sim.update_symbol("EURUSD", closed_weekly=(("Tue 09:59", "Tue 11:00"),))
    with pytest.raises(GatewayRejection) as stale:
        h.gateway.snapshot(spec)
    assert stale.value.reason is RejectionReason.STALE_TICK


def test_weekend_shows_as_stale_with_configured_offset() -> None:
    h = Harness(offset=7200)
    h.clock.now += 4 * 86400  # Saturday
    spec = h.gateway.symbol_spec("EURUSD")
    with pytest.raises(GatewayRejection) as stale:
        h.gateway.snapshot(spec)
    assert stale.value.reason is RejectionReason.STALE_TICK


def test_no_market_data_when_the_tick_is_missing(h: Harness) -> None:
    spec = h.gateway.symbol_spec("EURUSD")
    h.sim.symbol_select("EURUSD", False)
    assert h.gateway.snapshot(spec).bid > 0  # hidden from Market Watch: selected again
    no_ticks: Any = NoTicks(h.sim)
    gateway = Gateway(no_ticks, magic=26112501, pip_sizes={}, max_tick_age_seconds=10)
    with pytest.raises(GatewayRejection) as missing:
        gateway.snapshot(spec)
    assert missing.value.reason is RejectionReason.NO_MARKET_DATA


# ---------------------------------------------------------------- lots
def test_lots_round_down_with_float_traps(h: Harness) -> None:
    eurusd = h.gateway.symbol_spec("EURUSD")
    noisy = 0.1 * 3 * 100_000  # 30000.000000000004
    assert h.gateway.lots_for(eurusd, noisy, "split").lots == 0.3
    assert h.gateway.lots_for(eurusd, 29999.999999999996, "split").lots == 0.3  # float noise
    plan = h.gateway.lots_for(eurusd, 29_999.0, "split")  # 0.29999 lots: genuinely below
    assert plan.lots == 0.29 and plan.units_effective == 29_000.0 and plan.units == 29_999.0
    assert h.gateway.lots_for(eurusd, 95_000.0, "split").chunks == (0.95,)
    with pytest.raises(GatewayRejection) as small:
        h.gateway.lots_for(eurusd, 999.0, "split")  # 0.00999 lots: never upsized to 0.01
    assert small.value.reason is RejectionReason.VOLUME_INVALID
    gold = h.gateway.symbol_spec("XAUUSD")
    assert h.gateway.lots_for(gold, 150.0, "split").lots == 1.5  # contract 100 oz


def test_lots_over_volume_max_split_or_reject(h: Harness) -> None:
    eurusd = h.gateway.symbol_spec("EURUSD")
    plan = h.gateway.lots_for(eurusd, 25_050_000.0, "split")  # 250.5 lots, max 100
    assert plan.split and plan.chunks == (100.0, 100.0, 50.5) and plan.lots == 250.5
    assert all(chunk <= eurusd.volume_max for chunk in plan.chunks)
    with pytest.raises(GatewayRejection, match="volume_max"):
        h.gateway.lots_for(eurusd, 25_050_000.0, "reject")
    index = h.gateway.symbol_spec("US500")  # min 0.1, step 0.1, max 1000
    odd = h.gateway.lots_for(index, 2000.05, "split")
    assert odd.chunks == (1000.0, 1000.0) and not odd.units_effective > 2000.05


# ---------------------------------------------------------------- margin and filling
def test_check_margin_with_cushion() -> None:
    h = Harness(account=SimAccount(balance=2000.0))
    spec = h.gateway.symbol_spec("EURUSD")
    price = h.gateway.snapshot(spec).ask
    required, free = h.gateway.check_margin(spec, Side.BUY, 1.0, price, 1.5)
    assert required == pytest.approx(100_000 * price / 100, abs=0.01) and free == 2000.0
    with pytest.raises(GatewayRejection) as short:
        h.gateway.check_margin(spec, Side.BUY, 1.5, price, 1.5)  # 1628 * 1.5 > 2000
    assert short.value.reason is RejectionReason.MARGIN_INSUFFICIENT


def test_filling_mode_preferences(h: Harness) -> None:
    get = h.gateway.symbol_spec
    assert h.gateway.filling_modes(get("EURUSD")) == (api.ORDER_FILLING_FOK, api.ORDER_FILLING_IOC)
    assert h.gateway.filling_modes(get("XAUUSD")) == (api.ORDER_FILLING_FOK,)
    # instant execution: FOK, whatever the bitmask (IOC kept as the one 10030 fallback)
    assert h.gateway.filling_modes(get("GBPUSD")) == (api.ORDER_FILLING_FOK, api.ORDER_FILLING_IOC)
    assert h.gateway.filling_modes(get("US500")) == (api.ORDER_FILLING_RETURN,)
    h.sim.update_symbol("EURUSD", filling_mode=0)
    assert h.gateway.filling_modes(get("EURUSD")) == ()
    with pytest.raises(GatewayRejection, match="no filling mode"):
        h.send()


# ---------------------------------------------------------------- send
def test_send_done_fills_at_the_fresh_price(h: Harness) -> None:
    outcome = h.send(lots=0.3)
    assert outcome.status == "done" and outcome.retcode == 10009 and outcome.attempts == 1
    assert outcome.volume == 0.3 and outcome.price == outcome.requested_price == outcome.ask
    assert outcome.filling_mode == api.ORDER_FILLING_FOK and outcome.deviation == 20
    h.after_the_deal_lag()
    deals = h.gateway.deals_for_order(outcome.order)
    assert [d.ticket for d in deals] == [d.ticket for d in broker_deals(h.sim)]
    assert outcome.deal in (0, deals[0].ticket)  # a real 10009 may say deal 0
    state = h.gateway.order_state(outcome.order)
    assert state is not None and state.state == api.ORDER_STATE_FILLED
    calls = h.gateway.drain_calls()
    sends = [c for c in calls if c.function == "order_send"]
    assert len(sends) == 1 and sends[0].retcode == 10009 and sends[0].request is not None
    assert sends[0].request["comment"] == TOKEN and sends[0].at.tzinfo is not None
    assert h.gateway.drain_calls() == []


def test_filling_fallback_after_10030_once(h: Harness) -> None:
    h.sim.set_faults(scripted=("invalid_fill",))
    outcome = h.send()
    assert outcome.status == "done" and outcome.filling_mode == api.ORDER_FILLING_IOC
    assert outcome.attempts == 2 and h.our_deals() == 1
    h.sim.set_faults(scripted=("invalid_fill", "invalid_fill"))
    refused = h.send()
    assert refused.status == "rejected" and refused.retcode == api.TRADE_RETCODE_INVALID_FILL
    assert refused.attempts == 2 and h.our_deals() == 1  # fell back once only


def test_requote_refreshes_the_price_and_retries(h: Harness) -> None:
    h.sim.update_symbol("GBPUSD", filling_mode=api.SYMBOL_FILLING_FOK)
    h.sim.set_faults(scripted=("requote", "price_changed"))
    outcome = h.send("GBPUSD")  # instant execution
    assert outcome.status == "done" and outcome.attempts == 3 and h.our_deals() == 1
    assert not any(h.sleeps)  # price retries do not back off
    h.sim.set_faults(scripted=("requote", "requote", "off_quotes"))
    exhausted = h.send("GBPUSD")
    assert exhausted.status == "rejected" and exhausted.retcode == 10021
    assert exhausted.attempts == 3 and h.our_deals() == 1


def test_too_many_requests_backs_off_and_retries(h: Harness) -> None:
    h.sim.set_faults(scripted=("too_many_requests", "locked"))
    outcome = h.send()
    assert outcome.status == "done" and outcome.attempts == 3
    assert h.sleeps == [pytest.approx(0.05), pytest.approx(0.1)]
    assert h.our_deals() == 1


@pytest.mark.parametrize(
    ("fault", "executed"),
    [("lost_reply", 1), ("no_result", 0), ("timeout_executed", 1), ("error", 0), ("connection", 0)],
)
def test_unknown_outcome_is_never_resent(h: Harness, fault: str, executed: int) -> None:
    h.sim.set_faults(scripted=(fault,))
    since = datetime.fromtimestamp(h.clock.now, UTC)
    outcome = h.send(lots=0.2)
    assert outcome.status == "unknown" and outcome.attempts == 1
    assert h.our_deals() == executed  # exactly what the broker did: no second order
    h.clock.now += 2
    found = h.gateway.reconcile(TOKEN, "EURUSD", since)
    assert found.found is bool(executed)
    assert found.filled_volume == pytest.approx(0.2 * executed)
    if executed:
        assert found.history_orders and found.positions and not found.pending
        assert found.vwap == found.deals[0].price
    assert h.our_deals() == executed


def test_transport_error_during_send_is_unknown(h: Harness) -> None:
    class Flaky:
        def __init__(self, inner: SimTerminal) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def order_send(self, request: dict[str, Any]) -> Any:
            self.inner.order_send(request)  # reached the terminal, reply lost in transit
            raise api.TransportError("bridge connection reset")

    flaky: Any = Flaky(h.sim)
    gateway = Gateway(flaky, magic=26112501, pip_sizes=PIPS, max_tick_age_seconds=10, clock=h.clock)
    outcome = gateway.send(
        gateway.symbol_spec("EURUSD"), Side.BUY, 0.1, comment=TOKEN, deviation=20
    )
    assert outcome.status == "unknown" and "TransportError" in outcome.comment
    assert h.our_deals() == 1
    assert gateway.drain_calls()[-1].error is not None


def test_partial_fill_is_reported_as_partial(h: Harness) -> None:
    h.sim.update_symbol("EURUSD", liquidity_lots=1.0, filling_mode=api.SYMBOL_FILLING_IOC)
    outcome = h.send(lots=2.5)
    assert outcome.status == "partial" and outcome.retcode == 10010 and outcome.volume == 1.0
    h.after_the_deal_lag()
    assert sum(d.volume for d in h.gateway.deals_for_order(outcome.order)) == 1.0


def test_final_codes_are_rejected_without_retry(h: Harness) -> None:
    h.sim.set_faults(scripted=("reject",))
    outcome = h.send()
    assert outcome.status == "rejected" and outcome.retcode == 10006 and outcome.attempts == 1
    assert outcome.comment == "Request rejected"
    closed = Harness()
    closed.clock.now += 4 * 86400
    refused = closed.send()
    assert refused.status == "rejected" and refused.retcode == 10018
    with pytest.raises(GatewayRejection) as bad:
        h.gateway.send(
            h.gateway.symbol_spec("EURUSD"), Side.BUY, 0.1, comment="x" * 27, deviation=1
        )
    assert bad.value.reason is RejectionReason.INVALID_REQUEST


def test_exchange_execution_placed_then_filled(h: Harness) -> None:
    placed = h.send("US500", lots=3.0)
    assert placed.status == "placed" and placed.retcode == 10008 and placed.deal == 0
    state = h.gateway.order_state(placed.order)
    assert state is not None and state.state == api.ORDER_STATE_PLACED
    pending = h.gateway.reconcile(TOKEN, "US500", datetime.fromtimestamp(h.clock.now, UTC))
    assert pending.pending and pending.filled_volume == 0
    h.clock.now += 1.0
    state = h.gateway.order_state(placed.order)
    assert state is not None and state.state == api.ORDER_STATE_FILLED
    h.after_the_deal_lag()
    deals = h.gateway.deals_for_order(placed.order)
    assert sum(d.volume for d in deals) == 3.0


def test_cancel_a_placed_order(h: Harness) -> None:
    placed = h.send("US500", lots=1.0)
    cancelled = h.gateway.cancel(placed.order)
    assert cancelled.status == "done" and cancelled.retcode == 10009
    state = h.gateway.order_state(placed.order)
    assert state is not None and state.state == api.ORDER_STATE_CANCELED
    assert h.gateway.cancel(placed.order).status == "rejected"


# ---------------------------------------------------------------- reconcile and positions
def test_reconcile_filters_by_token_and_magic_in_server_time(h: Harness) -> None:
    since = datetime.fromtimestamp(h.clock.now, UTC)
    h.send(lots=0.1)
    other = Gateway(h.sim, magic=999, pip_sizes=PIPS, max_tick_age_seconds=10, clock=h.clock)
    other.send(other.symbol_spec("EURUSD"), Side.BUY, 0.2, comment=TOKEN, deviation=20)
    h.gateway.send(h.gateway.symbol_spec("EURUSD"), Side.BUY, 0.3, comment="xwother", deviation=20)
    h.clock.now += 30
    found = h.gateway.reconcile(TOKEN, "EURUSD", since)
    assert found.filled_volume == pytest.approx(0.1) and len(found.positions) == 1
    assert found.deals[0].magic == 26112501 and found.deals[0].comment == TOKEN[:16]  # cut
    # the window is in server time, padded by a day: deals made at 12:00 server time are
    # found from a UTC "since" of 10:00, but not from two days later
    later = h.gateway.reconcile(TOKEN, "EURUSD", since + timedelta(days=2))
    assert later.deals == () and later.positions  # positions are not windowed
    assert not h.gateway.reconcile("xwnothing", "EURUSD", since).found


def test_opposite_positions_oldest_first(h: Harness) -> None:
    spec = h.gateway.symbol_spec("EURUSD")
    first = h.send(side=Side.SELL, lots=0.1)
    second = h.send(side=Side.SELL, lots=0.2)
    h.send(side=Side.BUY, lots=0.3)
    opposite = h.gateway.opposite_positions(spec, Side.BUY)
    assert [p.identifier for p in opposite] == [first.order, second.order]
    # a close names the position's ticket, which differs from its identifier
    close = h.gateway.send(
        spec, Side.BUY, 0.1, comment=TOKEN, deviation=20, position=opposite[0].ticket
    )
    assert close.status == "done"
    assert [p.identifier for p in h.gateway.opposite_positions(spec, Side.BUY)] == [second.order]


def test_netting_account_reports_margin_mode() -> None:
    h = Harness(account=SimAccount(margin_mode=api.ACCOUNT_MARGIN_MODE_RETAIL_NETTING))
    assert h.gateway.account().margin_mode == 0


# ---------------------------------------------------------------- lost sessions
def test_connection_loss_raises_session_lost_outside_send(h: Harness) -> None:
    spec = h.gateway.symbol_spec("EURUSD")
    h.sim.disconnect()
    for call in (
        lambda: h.gateway.symbol_spec("EURUSD"),
        lambda: h.gateway.snapshot(spec),
        h.gateway.account,
        lambda: h.gateway.order_state(1),
        lambda: h.gateway.reconcile(TOKEN, "EURUSD", datetime.now(UTC)),
    ):
        with pytest.raises(SessionLost) as lost:
            call()
        assert lost.value.reason is RejectionReason.SESSION_UNAVAILABLE
    # during send the connection drops before the order leaves: nothing was sent
    with pytest.raises(SessionLost):
        h.send()
    h.sim.initialize()
    h.sim.set_faults(scripted=("lost_reply",))
    assert h.send().status == "unknown"


def test_absurd_sizes_are_volume_invalid_not_a_crash(h: Harness) -> None:
    spec = h.gateway.symbol_spec("EURUSD")
    with pytest.raises(GatewayRejection) as huge:
        h.gateway.lots_for(spec, 1e300, "split")
    assert huge.value.reason is RejectionReason.VOLUME_INVALID


def test_a_tick_too_old_to_learn_the_server_clock_is_stale_not_a_crash(h: Harness) -> None:
    import time

    later = Gateway(
        h.sim, magic=1, pip_sizes={}, max_tick_age_seconds=10,
        clock=lambda: time.time() + 20 * 3600,
    )  # fmt: skip
    with pytest.raises(GatewayRejection) as stale:
        later.snapshot(later.symbol_spec("EURUSD"))
    assert stale.value.reason is RejectionReason.STALE_TICK


def test_a_history_window_gives_each_execution_its_own_items_only() -> None:
    """One window serves every execution of a round: each gets its orders and deals (by
    magic, the comment naming it or cut), never another's or another symbol's."""
    deployment = 4242
    ours, theirs = uuid.uuid4(), uuid.uuid4()
    mine = OrderIdentity.for_execution(ours, deployment)
    other = OrderIdentity.for_execution(theirs, deployment)

    def order(ticket: int, magic: int, comment: str, symbol: str = "EURUSD") -> api.TradeOrder:
        values: list[Any] = [ticket, *[0] * 9, magic, *[0] * 3, 1.0, 0.0, 1.1, 0, 0, 0, 0]
        return api.TradeOrder(*values, symbol, comment, "")

    def deal(ticket: int, order_ticket: int, magic: int, comment: str) -> api.TradeDeal:
        return api.TradeDeal(
            ticket, order_ticket, 0, 0, 0, 0, magic, 0, 0, 1.0, 1.1, 0, 0, 0, 0, "EURUSD",
            comment, "",
        )  # fmt: skip

    window = HistoryWindow(
        open_orders=(order(1, mine.magic, mine.comment_token), order(2, other.magic, "")),
        history_orders=(
            order(3, mine.magic, mine.comment_token[:16]),  # cut by the server
            order(4, mine.magic, mine.comment_token, symbol="GBPUSD"),
            order(5, other.magic, other.comment_token),
        ),
        deals=(
            deal(10, 3, mine.magic, ""),  # blanked by the server
            deal(11, 5, other.magic, other.comment_token),
            deal(12, 6, mine.magic, other.comment_token),  # same magic, another's comment
        ),
    )

    found = window.of(mine, "EURUSD")
    assert [o.ticket for o in found.open_orders] == [1]
    assert [o.ticket for o in found.history_orders] == [3]
    assert [d.ticket for d in found.deals] == [10]
    assert [d.ticket for d in window.of(other, "EURUSD").deals] == [11]
    assert window.of(OrderIdentity.for_execution(uuid.uuid4(), deployment), "EURUSD").deals == ()
