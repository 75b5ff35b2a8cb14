"""The gateway against what real trade servers do (issue 17), on a harder simulator.

``HardSim`` makes the simulator behave like a real server where it is kinder: comments cut
(or blanked) on orders, deals and positions; queries answering None; a server clock that
switches its offset while running; symbols unknown to ``symbol_info`` until selected.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest

from schemas.enums import RejectionReason
from schemas.identity import (
    MAX_DEPLOYMENT_MAGIC,
    comment_token_for,
    deployment_of,
    execution_id_for,
    order_magic_for,
)
from worker.config import ConfigError, load_settings
from worker.mt5 import api
from worker.mt5.gateway import (
    Gateway,
    GatewayRejection,
    OrderIdentity,
    QueryFailed,
    Side,
    rejection_reason_for,
)
from worker.mt5.gateway.clock import parse_timezone, us_dst
from worker.mt5.gateway.identity import comment_relation
from worker.mt5.sim.terminal import FaultConfig, SimConfig, SimTerminal

T = TypeVar("T")
TUESDAY_10_UTC = 1764064800.0  # 2025-11-25, the server (GMT+2/US-DST) runs at +2
DEPLOYMENT = 26112501
EXECUTION = execution_id_for("rpm-order-1")
IDENTITY = OrderIdentity.for_execution(EXECUTION, DEPLOYMENT)
TOKEN = IDENTITY.comment_token


class Clock:
    def __init__(self, now: float = TUESDAY_10_UTC) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class HardSim(SimTerminal):
    """The simulator, harder: cut comments, failing queries, a clock that switches."""

    def __init__(self, config: SimConfig, clock: Clock) -> None:
        super().__init__(config, clock=clock)
        self.comment_length: int | None = None  # None: whole; 0: blanked
        self.failing: set[str] = set()  # these queries answer None (last_error -2)
        self.strict_select = False  # symbol_info answers None until symbol_select

    def switch_offset(self, seconds: int) -> None:
        """The server's clock jumps to UTC + ``seconds`` (the simulator's run-time knob)."""
        self.set_faults(clock_shift_seconds=seconds - self.config.server_utc_offset_seconds)
        assert self.server_offset_seconds == seconds

    def _cut(self, items: tuple[T, ...] | None, function: str) -> tuple[T, ...] | None:
        if function in self.failing:
            self._fail(api.RES_E_INVALID_PARAMS, "Terminal: Invalid params")
            return None
        if items is None or self.comment_length is None:
            return items
        return tuple(
            item._replace(comment=item.comment[: self.comment_length])  # type: ignore[attr-defined]
            for item in items
        )

    def orders_get(self, *args: Any, **kwargs: Any) -> tuple[api.TradeOrder, ...] | None:
        return self._cut(super().orders_get(*args, **kwargs), "orders_get")

    def positions_get(self, *args: Any, **kwargs: Any) -> tuple[api.TradePosition, ...] | None:
        return self._cut(super().positions_get(*args, **kwargs), "positions_get")

    def history_orders_get(self, *args: Any, **kwargs: Any) -> tuple[api.TradeOrder, ...] | None:
        return self._cut(super().history_orders_get(*args, **kwargs), "history_orders_get")

    def history_deals_get(self, *args: Any, **kwargs: Any) -> tuple[api.TradeDeal, ...] | None:
        return self._cut(super().history_deals_get(*args, **kwargs), "history_deals_get")

    def symbol_info(self, symbol: str) -> api.SymbolInfo | None:
        if self.strict_select and symbol not in self._market.selected:
            self._fail(api.RES_E_NOT_FOUND, "Terminal: Not found")
            return None
        return super().symbol_info(symbol)


class Harness:
    def __init__(
        self,
        *,
        offset: int | None = None,
        timezone: str | None = None,
        magic: int = DEPLOYMENT,
        sim: HardSim | None = None,
        **config: Any,
    ) -> None:
        self.clock = Clock()
        config.setdefault("faults", FaultConfig(slippage_points=((0, 1.0),)))
        self.sim = sim or HardSim(SimConfig(**config), self.clock)
        assert self.sim.initialize()
        self.gateway = self.gateway_for(self.sim, magic, offset=offset, timezone=timezone)

    def gateway_for(
        self, terminal: Any, magic: int, *, offset: int | None = None, timezone: str | None = None
    ) -> Gateway:
        return Gateway(
            terminal,
            magic=magic,
            pip_sizes={"XAUUSD": 0.1, "US500": 1.0, "BTCUSD": 1.0},
            max_tick_age_seconds=10.0,
            server_utc_offset_seconds=offset,
            server_timezone=timezone,
            clock=self.clock,
            sleep=self.clock.sleep,
        )

    def send(
        self, identity: OrderIdentity = IDENTITY, symbol: str = "EURUSD", lots: float = 0.1
    ) -> Any:
        spec = self.gateway.symbol_spec(symbol)
        return self.gateway.send(spec, Side.BUY, lots, identity=identity, deviation=20)

    def since(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now, UTC)


# ---------------------------------------------------------------- 1. identification
def test_order_magic_keeps_the_deployment_and_fits_a_bigint() -> None:
    ids = [execution_id_for(f"key-{n}") for n in range(200)]
    magics = {order_magic_for(i, DEPLOYMENT) for i in ids}
    assert len(magics) == 200 and all(0 < m < 2**63 for m in magics)
    assert {deployment_of(m) for m in magics} == {DEPLOYMENT}
    assert deployment_of(DEPLOYMENT) == DEPLOYMENT  # a legacy magic is all deployment
    assert order_magic_for(uuid.UUID(int=2**128 - 1), MAX_DEPLOYMENT_MAGIC) < 2**63
    for bad in (0, MAX_DEPLOYMENT_MAGIC + 1):
        with pytest.raises(ValueError, match="magic"):
            order_magic_for(EXECUTION, bad)
    assert OrderIdentity.for_execution(EXECUTION, DEPLOYMENT).comment_token == (
        comment_token_for(EXECUTION)
    )


def test_config_refuses_a_magic_that_does_not_fit_the_deployment_part() -> None:
    assert load_settings({}).magic == DEPLOYMENT
    largest = MAX_DEPLOYMENT_MAGIC - 1  # MAX_DEPLOYMENT_MAGIC itself is the probe's
    assert load_settings({"MAGIC": str(largest)}).magic == largest
    for bad in ("0", str(MAX_DEPLOYMENT_MAGIC), str(MAX_DEPLOYMENT_MAGIC + 1), str(2**62)):
        with pytest.raises(ConfigError, match="MAGIC"):
            load_settings({"MAGIC": bad})


def test_comment_relation_is_a_prefix_hint() -> None:
    assert comment_relation(TOKEN, TOKEN) == "same"
    assert comment_relation(TOKEN[:16], TOKEN) == "same"
    assert comment_relation(TOKEN[:12], TOKEN) == "same"
    assert comment_relation(TOKEN + " [sl]", TOKEN) == "same"
    other = comment_token_for(execution_id_for("rpm-order-2"))
    assert comment_relation(other[:16], TOKEN) == "other"
    for nothing in ("", TOKEN[:8], "python script", "[tp 1.2345]"):
        assert comment_relation(nothing, TOKEN) == "unknown"


@pytest.mark.parametrize("length", [16, 10, 0])
def test_unknown_outcome_is_found_when_the_server_cuts_or_blanks_comments(length: int) -> None:
    h = Harness()
    h.sim.comment_length = length
    since = h.since()
    h.sim.set_faults(scripted=("lost_reply",))
    assert h.send(lots=0.2).status == "unknown"
    # noise: another execution of ours, another deployment with our token, a manual order
    h.send(OrderIdentity.for_execution(execution_id_for("rpm-order-2"), DEPLOYMENT), lots=0.3)
    other_deployment = h.gateway_for(h.sim, 999)
    other_deployment.send(
        other_deployment.symbol_spec("EURUSD"),
        Side.BUY,
        0.4,
        identity=OrderIdentity.for_execution(EXECUTION, 999),
        deviation=20,
    )
    h.sim.order_send(
        {"action": 1, "symbol": "EURUSD", "volume": 0.5, "type": 0, "price": 0.0,
         "deviation": 1000, "magic": 0, "comment": TOKEN, "type_filling": 0}
    )  # fmt: skip
    h.clock.now += 2
    found = h.gateway.reconcile(IDENTITY, "EURUSD", since)
    assert found.filled_volume == pytest.approx(0.2)
    assert len(found.history_orders) == 1 and len(found.positions) == 1
    assert {d.magic for d in found.deals} == {IDENTITY.magic}


def test_a_comment_naming_another_execution_vetoes_a_magic_match() -> None:
    h = Harness()
    h.sim.comment_length = 16
    since = h.since()
    h.send()
    twin = OrderIdentity(IDENTITY.magic, comment_token_for(execution_id_for("rpm-order-2")))
    assert not h.gateway.reconcile(twin, "EURUSD", since).found
    assert h.gateway.reconcile(IDENTITY, "EURUSD", since).found


def test_legacy_rows_reconcile_by_the_old_rule_with_a_cut_comment() -> None:
    h = Harness()
    h.sim.comment_length = 16
    since = h.since()
    spec = h.gateway.symbol_spec("EURUSD")
    legacy = h.gateway.legacy_identity(TOKEN)
    assert legacy == OrderIdentity(DEPLOYMENT, TOKEN) and legacy.legacy
    h.gateway.send(spec, Side.BUY, 0.1, comment=TOKEN, deviation=20)  # the old call
    h.send(lots=0.3)  # the same execution under the new magic: not the legacy order
    h.clock.now += 2  # past the hardened simulator's deal lag
    found = h.gateway.reconcile(TOKEN, "EURUSD", since)  # a bare token: legacy
    assert found.filled_volume == pytest.approx(0.1)
    assert h.gateway.reconcile(legacy, "EURUSD", since).filled_volume == pytest.approx(0.1)
    assert h.gateway.reconcile(IDENTITY, "EURUSD", since).filled_volume == pytest.approx(0.3)
    h.sim.comment_length = 0  # blanked: a legacy order cannot be told from another
    assert not h.gateway.reconcile(legacy, "EURUSD", since).found


def test_hedging_sees_the_deployments_positions_under_both_schemes() -> None:
    h = Harness()
    h.sim.comment_length = 0
    spec = h.gateway.symbol_spec("EURUSD")
    legacy = h.gateway.send(spec, Side.SELL, 0.1, comment=TOKEN, deviation=20)
    new = h.gateway.send(spec, Side.SELL, 0.2, identity=IDENTITY, deviation=20)
    stranger = h.gateway_for(h.sim, 999)
    stranger.send(spec, Side.SELL, 0.3, comment=TOKEN, deviation=20)
    opposite = h.gateway.opposite_positions(spec, Side.BUY)
    assert [p.identifier for p in opposite] == [legacy.order, new.order]
    assert all(h.gateway.is_ours(p.magic) for p in opposite)
    assert not h.gateway.is_ours(0) and not h.gateway.is_ours(999)


# ---------------------------------------------------------------- 2. None is never "nothing"
@pytest.mark.parametrize(
    "function", ["orders_get", "positions_get", "history_orders_get", "history_deals_get"]
)
def test_a_failed_query_raises_instead_of_reading_as_nothing(function: str) -> None:
    h = Harness()
    since = h.since()
    sent = h.send()
    spec = h.gateway.symbol_spec("EURUSD")
    h.sim.failing = {function}
    with pytest.raises(QueryFailed) as failed:
        h.gateway.reconcile(IDENTITY, "EURUSD", since)
    assert isinstance(failed.value, api.TransportError)  # the pipeline requeues, in flight
    assert failed.value.error[0] == api.RES_E_INVALID_PARAMS
    if function in ("orders_get", "history_orders_get"):
        with pytest.raises(QueryFailed):
            h.gateway.order_state(sent.order)
    if function == "history_deals_get":
        with pytest.raises(QueryFailed):
            h.gateway.deals_for_order(sent.order)
    if function == "positions_get":
        with pytest.raises(QueryFailed):
            h.gateway.opposite_positions(spec, Side.SELL)
        with pytest.raises(QueryFailed):  # a hedging close cannot resolve its position
            h.gateway.send(spec, Side.SELL, 0.1, identity=IDENTITY, deviation=20, position=1)
    h.sim.failing = set()
    assert h.gateway.reconcile(IDENTITY, "EURUSD", since).found
    assert h.gateway.deals_for_order(10**9) == ()  # empty is still empty


class FailsTwice(HardSim):
    """Each listed query answers None twice in a row, then answers again (transient)."""

    def __init__(self, config: SimConfig, clock: Clock, code: int) -> None:
        super().__init__(config, clock)
        self.left: dict[str, int] = {}
        self.code = code

    def _cut(self, items: tuple[T, ...] | None, function: str) -> tuple[T, ...] | None:
        if self.left.get(function, 0) > 0:
            self.left[function] -= 1
            self._fail(self.code, "Terminal: transient")
            return None
        return super()._cut(items, function)


@pytest.mark.parametrize("code", [api.RES_E_INVALID_PARAMS, api.RES_E_INTERNAL_FAIL_TIMEOUT])
def test_a_transient_none_is_asked_again_before_the_query_fails(code: int) -> None:
    """A real server's None is usually transient (-2, or -10005 with the connection up):
    re-asking the read (safe) keeps a 5 % None rate from requeueing one handling in five,
    dropping the session on -10005, and burning the queue's delivery limit."""
    clock = Clock()
    functions = {"orders_get", "positions_get", "history_orders_get", "history_deals_get"}
    h = Harness(sim=FailsTwice(SimConfig(faults=FaultConfig()), clock, code))
    h.clock = clock
    since = h.since()
    h.send()
    h.clock.now += 2  # past the deal lag
    h.sim.left = dict.fromkeys(functions, 2)
    h.gateway.drain_calls()
    found = h.gateway.reconcile(IDENTITY, "EURUSD", since)  # no QueryFailed
    assert found.found and found.filled_volume == pytest.approx(0.1)
    calls = h.gateway.drain_calls()
    failed = [c for c in calls if c.error is not None and c.function in functions]
    assert len(failed) >= 2 and all(c.error[0] == code for c in failed)


# ---------------------------------------------------------------- 3. one clock
def test_autumn_switch_while_running_does_not_make_fresh_ticks_stale() -> None:
    h = Harness(server_utc_offset_seconds=3 * 3600)
    spec = h.gateway.symbol_spec("EURUSD")
    assert h.gateway.snapshot(spec).tick_age_seconds < 1
    assert h.gateway.server_offset_seconds == 3 * 3600
    h.clock.now += 1
    h.sim.switch_offset(2 * 3600)
    assert h.gateway.snapshot(spec).tick_age_seconds < 1
    assert h.gateway.server_offset_seconds == 2 * 3600


def test_autumn_switch_while_idle_is_learned_from_a_fresh_tick() -> None:
    h = Harness(server_utc_offset_seconds=3 * 3600)
    spec = h.gateway.symbol_spec("EURUSD")
    h.gateway.snapshot(spec)
    h.clock.now += 3600  # an idle hour across the switch
    h.sim.switch_offset(2 * 3600)
    assert h.gateway.snapshot(spec).tick_age_seconds < 1
    assert h.gateway.server_offset_seconds == 2 * 3600


def test_a_stale_symbol_does_not_pull_the_learned_offset_down() -> None:
    h = Harness()
    eurusd = h.gateway.symbol_spec("EURUSD")
    h.gateway.snapshot(eurusd)
    h.sim.update_symbol("USDJPY", closed_weekly=(("Tue 07:00", "Tue 12:00"),))
    with pytest.raises(GatewayRejection) as stale:  # 3 hours old: stale, offset kept
        h.gateway.snapshot(h.gateway.symbol_spec("USDJPY"))
    assert stale.value.reason is RejectionReason.STALE_TICK
    assert h.gateway.server_offset_seconds == 2 * 3600
    assert h.gateway.snapshot(eurusd).tick_age_seconds < 10


def test_spring_switch_deals_are_found_even_with_a_fixed_offset() -> None:
    h = Harness(offset=2 * 3600)  # configured for winter; the server moves to +3
    since = h.since()
    h.clock.now += 1
    h.sim.switch_offset(3 * 3600)
    h.sim.set_faults(scripted=("lost_reply",))
    assert h.send().status == "unknown"
    h.clock.now += 60
    found = h.gateway.reconcile(IDENTITY, "EURUSD", since)
    assert found.filled_volume == pytest.approx(0.1) and found.history_orders


def test_spring_switch_learned_while_running() -> None:
    h = Harness()
    h.gateway.snapshot(h.gateway.symbol_spec("EURUSD"))
    since = h.since()
    h.clock.now += 1
    h.sim.switch_offset(3 * 3600)
    assert h.send().status == "done"
    assert h.gateway.server_offset_seconds == 3 * 3600
    assert h.gateway.reconcile(IDENTITY, "EURUSD", since).found


def test_spring_switch_after_a_pause_is_learned_from_a_fresh_tick() -> None:
    h = Harness()
    spec = h.gateway.symbol_spec("EURUSD")
    h.gateway.snapshot(spec)
    h.clock.now += 1
    h.gateway.snapshot(spec)  # proven +2
    h.clock.now += 6 * 60
    h.sim.switch_offset(3 * 3600)  # the first tick after it looks an hour in the future
    assert abs(h.gateway.snapshot(spec).tick_age_seconds) < 1
    assert h.gateway.server_offset_seconds == 3 * 3600


def test_server_timezone_rule() -> None:
    rule = parse_timezone("GMT+2/US-DST")
    winter = datetime(2026, 1, 10, tzinfo=UTC).timestamp()
    summer = datetime(2026, 7, 10, tzinfo=UTC).timestamp()
    assert (rule.offset_ms_at(winter), rule.offset_ms_at(summer)) == (7200_000, 10800_000)
    assert not us_dst(datetime(2026, 3, 8, 6, 59, tzinfo=UTC))
    assert us_dst(datetime(2026, 3, 8, 7, 0, tzinfo=UTC))
    assert us_dst(datetime(2026, 11, 1, 5, 59, tzinfo=UTC))
    assert not us_dst(datetime(2026, 11, 1, 6, 0, tzinfo=UTC))
    eu = parse_timezone("UTC+1/EU-DST")
    assert eu.offset_ms_at(datetime(2026, 3, 29, 1, 0, tzinfo=UTC).timestamp()) == 7200_000
    assert eu.offset_ms_at(datetime(2026, 3, 29, 0, 59, tzinfo=UTC).timestamp()) == 3600_000
    assert parse_timezone("UTC-3:30").offset_ms_at(winter) == -12_600_000
    assert parse_timezone("UTC").offset_ms_at(winter) == 0
    for bad in ("GMT+2/US", "Europe/Athens", "UTC+99"):
        with pytest.raises(ValueError):
            parse_timezone(bad)


def test_server_timezone_setting_drives_the_gateway_clock() -> None:
    assert load_settings({"SERVER_TIMEZONE": "GMT+2/US-DST"}).server_timezone == "GMT+2/US-DST"
    with pytest.raises(ConfigError, match="SERVER_TIMEZONE"):
        load_settings({"SERVER_TIMEZONE": "Athens"})
    with pytest.raises(ConfigError, match="not both"):
        load_settings({"SERVER_TIMEZONE": "UTC+2", "SERVER_UTC_OFFSET_SECONDS": "7200"})
    h = Harness(timezone="GMT+2/US-DST")  # November: +2, as the simulated server
    assert h.gateway.server_offset_seconds == 7200
    assert h.gateway.snapshot(h.gateway.symbol_spec("EURUSD")).tick_age_seconds < 1


# ---------------------------------------------------------------- 4. filling by execution mode
def test_filling_by_execution_mode() -> None:
    h = Harness()
    gw = h.gateway
    sim = h.sim
    sim.update_symbol("GBPUSD", filling_mode=api.SYMBOL_FILLING_IOC)  # instant execution
    assert gw.filling_modes(gw.symbol_spec("GBPUSD"))[0] == api.ORDER_FILLING_FOK
    sim.update_symbol("GBPUSD", trade_exemode=api.SYMBOL_TRADE_EXECUTION_REQUEST, filling_mode=0)
    assert gw.filling_modes(gw.symbol_spec("GBPUSD")) == (api.ORDER_FILLING_FOK,)
    sim.update_symbol("EURUSD", filling_mode=api.SYMBOL_FILLING_IOC)  # market execution
    assert gw.filling_modes(gw.symbol_spec("EURUSD")) == (api.ORDER_FILLING_IOC,)
    sim.update_symbol("EURUSD", filling_mode=api.SYMBOL_FILLING_FOK | api.SYMBOL_FILLING_IOC)
    assert gw.filling_modes(gw.symbol_spec("EURUSD")) == (
        api.ORDER_FILLING_FOK,
        api.ORDER_FILLING_IOC,
    )


def test_the_10030_fallback_is_tried_once_with_three_modes() -> None:
    h = Harness()
    h.sim.update_symbol("US500", filling_mode=api.SYMBOL_FILLING_FOK | api.SYMBOL_FILLING_IOC)
    spec = h.gateway.symbol_spec("US500")  # exchange execution
    assert h.gateway.filling_modes(spec) == (
        api.ORDER_FILLING_FOK,
        api.ORDER_FILLING_IOC,
        api.ORDER_FILLING_RETURN,
    )
    h.sim.set_faults(scripted=("invalid_fill", "invalid_fill"))
    refused = h.send(symbol="US500", lots=1.0)
    assert refused.status == "rejected" and refused.retcode == api.TRADE_RETCODE_INVALID_FILL
    sent = [c.request for c in h.gateway.drain_calls() if c.function == "order_send"]
    assert [r["type_filling"] for r in sent if r] == [api.ORDER_FILLING_FOK, api.ORDER_FILLING_IOC]


# ---------------------------------------------------------------- 5. smaller ones
def test_retcodes_of_position_rules_have_reasons() -> None:
    assert rejection_reason_for(10038) is RejectionReason.VOLUME_INVALID
    assert {rejection_reason_for(c) for c in (10042, 10043, 10044)} == {
        RejectionReason.SYMBOL_NOT_TRADABLE
    }
    assert rejection_reason_for(10045) is RejectionReason.FIFO_RULE
    assert rejection_reason_for(10046) is RejectionReason.HEDGING_PROHIBITED
    assert rejection_reason_for(10019) is RejectionReason.MARGIN_INSUFFICIENT
    assert rejection_reason_for(10006) is RejectionReason.BROKER_REJECTED
    assert rejection_reason_for(None) is RejectionReason.BROKER_REJECTED


class Binding:
    """The real binding's manners over the simulator: floats only, -8 when algo trading is off,
    position tickets that differ from position identifiers."""

    TICKET_SHIFT = 1_000_000

    def __init__(self, inner: HardSim) -> None:
        self.inner = inner
        self.algo_trading = True
        self.error: tuple[int, str] | None = None
        self.requests: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def last_error(self) -> tuple[int, str]:
        return self.error or self.inner.last_error()

    def symbol_info_tick(self, symbol: str) -> api.Tick | None:
        tick = self.inner.symbol_info_tick(symbol)  # a bridge may hand back whole numbers
        return None if tick is None else tick._replace(bid=int(tick.bid), ask=int(tick.ask) + 1)

    def positions_get(self, **kwargs: Any) -> tuple[api.TradePosition, ...] | None:
        found = self.inner.positions_get(**kwargs)
        if found is None:
            return None
        return tuple(p._replace(ticket=p.ticket + self.TICKET_SHIFT) for p in found)

    def order_send(self, request: dict[str, Any]) -> api.OrderSendResult | None:
        self.requests.append(dict(request))
        self.error = None
        if not self.algo_trading:
            self.error = (api.RES_E_AUTO_TRADING_DISABLED, "Terminal: Autotrading disabled")
            return None
        for key in ("volume", "price"):
            if key in request and type(request[key]) is not float:
                self.error = (api.RES_E_INVALID_PARAMS, f'Invalid "{key}" argument')
                return None
        inner = dict(request)
        if "position" in inner:
            if inner["position"] < self.TICKET_SHIFT:  # an identifier is not a ticket
                self.error = None
                return self.inner.order_send({**inner, "position": 999_999_999})
            inner["position"] -= self.TICKET_SHIFT
        return self.inner.order_send(inner)


def test_the_binding_gets_floats_and_a_hedging_close_names_the_ticket() -> None:
    h = Harness()
    binding: Any = Binding(h.sim)
    gateway = h.gateway_for(binding, DEPLOYMENT)
    spec = gateway.symbol_spec("EURUSD")  # market execution: the price is not checked
    opened = gateway.send(spec, Side.SELL, 1.0, identity=IDENTITY, deviation=20)
    assert opened.status == "done", opened
    position = gateway.opposite_positions(spec, Side.BUY)[0]
    assert position.ticket != position.identifier
    closed = gateway.send(
        spec, Side.BUY, 1.0, identity=IDENTITY, deviation=20, position=position.identifier
    )
    assert closed.status == "done", closed
    assert binding.requests[-1]["position"] == position.ticket
    assert all(type(r["price"]) is float for r in binding.requests)


def test_algo_trading_off_in_the_client_is_a_definite_refusal() -> None:
    h = Harness()
    binding: Any = Binding(h.sim)
    binding.algo_trading = False
    gateway = h.gateway_for(binding, DEPLOYMENT)
    with pytest.raises(GatewayRejection) as refused:
        gateway.send(gateway.symbol_spec("EURUSD"), Side.BUY, 0.1, identity=IDENTITY, deviation=20)
    assert refused.value.reason is RejectionReason.TRADING_DISABLED
    assert len(binding.requests) == 1  # refused once, not retried, not "unknown"
    assert gateway.cancel(12345).status == "rejected"  # a cancel is not sent either


def test_symbols_are_selected_before_their_info_is_read() -> None:
    h = Harness()
    h.sim.strict_select = True
    spec = h.gateway.symbol_spec("BTCUSD")  # not in Market Watch at start
    assert spec.pip == 1.0 and h.gateway.snapshot(spec).bid > 0
    with pytest.raises(GatewayRejection) as unknown:
        h.gateway.symbol_spec("EURUSD.x")
    assert unknown.value.reason is RejectionReason.SYMBOL_NOT_TRADABLE
