"""Settling from broker truth: pure functions over typed broker reports (no database, no
terminal). The partial-fill thresholds are tested on their boundaries."""

from __future__ import annotations

import pytest

from schemas.enums import ExecutionStatus, RejectionReason
from worker.config import load_settings
from worker.execution import settle
from worker.execution.settle import (
    Close,
    Deal,
    Fill,
    FillRule,
    Found,
    Order,
    Verdict,
)
from worker.mt5 import api
from worker.mt5.gateway import SendOutcome, Side

DEFAULTS = load_settings({})
RULE = FillRule(
    filled=DEFAULTS.fill_ratio_filled,
    partial=DEFAULTS.fill_ratio_partial,
    order_timeout_seconds=DEFAULTS.order_timeout_seconds,
)


def buy(ticket: int, order: int, volume: float, price: float, position: int = 7) -> Deal:
    return Deal(ticket, order, Side.BUY, volume, price, position)


def sell(ticket: int, order: int, volume: float, price: float, position: int = 7) -> Deal:
    return Deal(ticket, order, Side.SELL, volume, price, position)


def reply(status: str, *, volume: float = 1.0, order: int = 5, deal: int = 9) -> SendOutcome:
    return SendOutcome(
        status=status,  # type: ignore[arg-type]
        retcode=api.TRADE_RETCODE_DONE if status == "done" else api.TRADE_RETCODE_REJECT,
        order=order,
        deal=deal,
        volume=volume,
        price=1.1,
        bid=1.0999,
        ask=1.1,
        comment="",
        attempts=1,
        requested_price=1.1,
        filling_mode=api.ORDER_FILLING_FOK,
        deviation=20,
    )


# --- the partial-fill rule -------------------------------------------------------------


def test_the_thresholds_under_test_are_the_defaults() -> None:
    assert (RULE.filled, RULE.partial) == (0.99, 0.90)


@pytest.mark.parametrize(
    ("executed", "intended", "status", "reason"),
    [
        (1.0, 1.0, ExecutionStatus.FILLED, None),
        (0.99, 1.0, ExecutionStatus.FILLED, None),  # exactly 0.99
        (9.9, 10.0, ExecutionStatus.FILLED, None),  # exactly 0.99
        (0.98, 1.0, ExecutionStatus.PARTIALLY_FILLED, None),
        (0.9, 1.0, ExecutionStatus.PARTIALLY_FILLED, None),  # exactly 0.90
        (4.5, 5.0, ExecutionStatus.PARTIALLY_FILLED, None),  # exactly 0.90
        (0.89, 1.0, ExecutionStatus.PARTIALLY_FILLED, RejectionReason.INSUFFICIENT_FILL),
        (8.9, 10.0, ExecutionStatus.PARTIALLY_FILLED, RejectionReason.INSUFFICIENT_FILL),
        (0.01, 1.0, ExecutionStatus.PARTIALLY_FILLED, RejectionReason.INSUFFICIENT_FILL),
    ],
)
def test_partial_fill_rule_on_and_around_each_threshold(
    executed: float, intended: float, status: ExecutionStatus, reason: RejectionReason | None
) -> None:
    verdict = settle.classify(executed, intended, RULE)
    assert (verdict.status, verdict.reason) == (status, reason)
    if status is ExecutionStatus.PARTIALLY_FILLED:
        assert verdict.details == (
            f"filled {executed:g} of {intended:g} lots ({executed / intended:.1%})"
        )
    else:
        assert verdict.details is None


def test_thresholds_come_from_the_rule_not_constants() -> None:
    strict = FillRule(filled=1.0, partial=0.5, order_timeout_seconds=60.0)
    assert settle.classify(0.99, 1.0, strict).status is ExecutionStatus.PARTIALLY_FILLED
    assert settle.classify(0.5, 1.0, strict).reason is None
    assert settle.classify(0.49, 1.0, strict).reason is RejectionReason.INSUFFICIENT_FILL


def test_nothing_executed_is_rejected_with_the_reason_given_or_broker_rejected() -> None:
    given = settle.classify(
        0.0, 1.0, RULE, reason=RejectionReason.MARKET_CLOSED, details="retcode 10018: closed"
    )
    assert given == Verdict(
        ExecutionStatus.REJECTED, RejectionReason.MARKET_CLOSED, "retcode 10018: closed"
    )
    assert settle.classify(0.0, 1.0, RULE).reason is RejectionReason.BROKER_REJECTED


def test_nothing_executed_after_the_order_timeout_is_expired() -> None:
    verdict = settle.classify(0.0, 1.0, RULE, timed_out=True, reason=RejectionReason.MARKET_CLOSED)
    assert verdict.status is ExecutionStatus.EXPIRED
    assert verdict.reason is RejectionReason.ORDER_TIMEOUT
    assert verdict.details == f"nothing filled within {RULE.order_timeout_seconds:g} s"


def test_a_timed_out_order_that_filled_in_part_is_classified_by_ratio() -> None:
    verdict = settle.classify(0.5, 1.0, RULE, timed_out=True)
    assert verdict.status is ExecutionStatus.PARTIALLY_FILLED
    assert verdict.reason is RejectionReason.INSUFFICIENT_FILL


# --- fills from deals ------------------------------------------------------------------


def test_fills_group_deals_by_order_with_their_vwap() -> None:
    deals = [buy(1, 100, 1.0, 1.1000), buy(2, 100, 3.0, 1.1004), buy(3, 200, 0.5, 1.2)]
    fills = settle.fills_from_deals(deals, Side.BUY, 1.1001)
    assert [fill.order for fill in fills] == [100, 200]
    first = fills[0]
    assert first.deals == (1, 2) and first.volume == 4.0
    assert first.price == pytest.approx((1.1 + 3 * 1.1004) / 4)
    assert first.requested_price == 1.1001 and first.position == 7


def test_deals_of_the_other_side_or_no_trade_are_not_fills() -> None:
    close = sell(2, 101, 1.0, 1.09)  # the close of SLIPPAGE_POLICY=close
    balance = Deal(3, 0, None, 0.0, 0.0, 0)
    fills = settle.fills_from_deals([buy(1, 100, 1.0, 1.1), close, balance], Side.BUY, None)
    assert [fill.order for fill in fills] == [100]
    assert settle.fills_from_deals([close], Side.SELL, None)[0].order == 101


def test_without_a_requested_price_the_deal_price_is_taken() -> None:
    (fill,) = settle.fills_from_deals([sell(1, 100, 1.0, 1.2345)], Side.SELL, None)
    assert fill.requested_price == 1.2345


def test_deal_reports_map_the_terminal_deal_types() -> None:
    raw = api.TradeDeal._make([0] * len(api.TradeDeal._fields))
    raw = raw._replace(ticket=1, order=2, type=api.DEAL_TYPE_SELL, volume=0.3, price=1.5)
    assert Deal.of(raw) == Deal(1, 2, Side.SELL, 0.3, 1.5, 0)
    assert Deal.of(raw._replace(type=2)).side is None  # DEAL_TYPE_BALANCE


def test_fill_of_order_takes_all_its_deals() -> None:
    fill = settle.fill_of_order(100, [buy(1, 100, 1.0, 1.0, 55), buy(2, 100, 1.0, 2.0, 55)], 1.2)
    assert fill == Fill(100, (1, 2), 2.0, 1.5, 1.2, 55)
    assert settle.fill_of_order(100, [], 1.2) is None


def test_a_done_reply_needs_deals_for_its_volume() -> None:
    done = reply("done", volume=1.0, deal=0)
    assert settle.executed_by(done) == 1.0
    assert not settle.deals_visible(None, settle.executed_by(done))
    assert not settle.deals_visible(Fill(5, (1,), 0.4, 1.1, 1.1), 1.0)  # one of two deals
    assert settle.deals_visible(Fill(5, (1, 2), 1.0, 1.1, 1.1), 1.0)
    # a reply without a volume still needs a deal before it counts as a fill
    assert not settle.deals_visible(None, settle.executed_by(reply("done", volume=0.0)))


@pytest.mark.parametrize(
    ("state", "initial", "current", "needs_deal"),
    [
        (api.ORDER_STATE_FILLED, 1.0, 0.0, True),
        (api.ORDER_STATE_FILLED, 0.0, 0.0, True),  # filled says something executed
        (api.ORDER_STATE_CANCELED, 1.0, 0.4, True),  # cancelled after a partial fill
        (api.ORDER_STATE_CANCELED, 1.0, 1.0, False),
        (api.ORDER_STATE_EXPIRED, 1.0, 1.0, False),
    ],
)
def test_a_final_order_needs_deals_for_what_it_executed(
    state: int, initial: float, current: float, needs_deal: bool
) -> None:
    order = Order(100, state, 1.1, 0, initial, current)
    assert settle.deals_visible(None, order.executed) is not needs_deal


# --- a reply that names its deal is the fill; how far the broker's view has got ----------


def order(ticket: int, state: int, initial: float, current: float = 0.0, side: Side = Side.BUY):  # type: ignore[no-untyped-def]
    return Order(ticket, state, 1.1, api.ORDER_FILLING_FOK, initial, current, side)


FILLED, PLACED = api.ORDER_STATE_FILLED, api.ORDER_STATE_PLACED


def test_a_done_reply_naming_its_deal_is_the_fill() -> None:
    fill = settle.fill_of_reply(reply("done", volume=0.7, order=5, deal=9), position=3)
    assert fill == Fill(5, (9,), 0.7, 1.1, 1.1, 3)


@pytest.mark.parametrize(
    ("status", "deal", "volume"),
    [("done", 0, 1.0), ("done", 9, 0.0), ("placed", 9, 1.0), ("rejected", 9, 1.0)],
)
def test_a_reply_without_deal_volume_or_price_is_no_fill(
    status: str, deal: int, volume: float
) -> None:
    assert settle.fill_of_reply(reply(status, deal=deal, volume=volume)) is None


def test_deal_zero_waits_until_the_order_and_its_deals_show() -> None:
    awaited = settle.Awaited(legs_sent=1, orders=(5,))
    nothing = settle.progress(awaited, Found(), Side.BUY, 1.1)
    assert isinstance(nothing, settle.Waiting) and nothing.open_orders == ()
    order_only = Found(history_orders=(order(5, FILLED, 1.0),))
    assert isinstance(settle.progress(awaited, order_only, Side.BUY, 1.1), settle.Waiting)
    shown = Found(history_orders=(order(5, FILLED, 1.0),), deals=(buy(9, 5, 1.0, 1.1001),))
    settled = settle.progress(awaited, shown, Side.BUY, 1.1)
    assert settled == settle.Settled([Fill(5, (9,), 1.0, 1.1001, 1.1, 7)], timed_out=False)


def test_a_placed_order_still_working_is_named_for_the_cancel() -> None:
    awaited = settle.Awaited(legs_sent=1, orders=(5,))
    working = Found(open_orders=(order(5, PLACED, 1.0, 1.0),))
    assert settle.progress(awaited, working, Side.BUY, 1.1) == settle.Waiting((5,), [])
    cancelled = Found(history_orders=(order(5, api.ORDER_STATE_CANCELED, 1.0, 1.0),))
    assert settle.progress(awaited, cancelled, Side.BUY, 1.1) == settle.Settled([], True)


def test_an_unknown_leg_is_unaccounted_until_an_order_no_reply_named_shows() -> None:
    """Issue 26 (a): a split plan whose later leg is unknown is never settled from the
    earlier legs alone."""
    leg_1 = Fill(5, (9,), 50.0, 1.1, 1.1)
    awaited = settle.Awaited(legs_sent=2, known=(leg_1,), unknown=True)
    first_only = Found(history_orders=(order(5, FILLED, 50.0),), deals=(buy(9, 5, 50.0, 1.1),))
    state = settle.progress(awaited, first_only, Side.BUY, 1.1)
    assert isinstance(state, settle.Unaccounted) and [f.order for f in state.fills] == [5]
    both = Found(
        history_orders=(order(5, FILLED, 50.0), order(6, FILLED, 50.0)),
        deals=(buy(9, 5, 50.0, 1.1), buy(10, 6, 50.0, 1.1)),
    )
    settled = settle.progress(awaited, both, Side.BUY, 1.1)
    assert isinstance(settled, settle.Settled)
    assert sum(f.volume for f in settled.fills) == 100.0


def test_a_reply_fill_counts_until_the_broker_shows_its_own_account() -> None:
    leg = Fill(5, (9,), 1.0, 1.1, 1.1)
    awaited = settle.Awaited(legs_sent=1, known=(leg,))
    assert settle.progress(awaited, Found(), Side.BUY, 1.1) == settle.Settled([leg], False)


def test_checking_a_reply_fill_decides_by_the_deals_alone() -> None:
    leg = Fill(5, (9,), 1.0, 1.1, 1.1)
    check = settle.Awaited(legs_sent=1, known=(leg,)).checking().by_deals_alone()
    assert isinstance(settle.progress(check, Found(), Side.BUY, 1.1), settle.Waiting)
    other = Found(history_orders=(order(5, FILLED, 1.0),), deals=(buy(11, 5, 1.0, 1.2),))
    shown = settle.progress(check, other, Side.BUY, 1.1)
    assert isinstance(shown, settle.Settled)
    assert settle.disagrees(shown.fills, [leg])
    same = Found(history_orders=(order(5, FILLED, 1.0),), deals=(buy(9, 5, 1.0, 1.1),))
    agreed = settle.progress(check, same, Side.BUY, 1.1)
    assert isinstance(agreed, settle.Settled) and not settle.disagrees(agreed.fills, [leg])


def test_awaited_survives_its_json_and_a_missing_document_is_an_unknown_outcome() -> None:
    awaited = settle.Awaited(
        legs_sent=2, orders=(6,), known=(Fill(5, (9,), 1.0, 1.1, 1.1, 3),), unknown=True, since=5.0
    )
    assert settle.Awaited.from_json(awaited.to_json(), legs=9, since=0.0) == awaited
    assert settle.Awaited.from_json(None, legs=3, since=7.0) == settle.Awaited(
        legs_sent=3, unknown=True, since=7.0
    )


def test_found_is_empty_only_without_orders_deals_and_positions() -> None:
    assert not Found().found
    assert Found(positions=(1,)).found and Found(deals=(buy(1, 1, 1.0, 1.0),)).found


def test_final_broker_refusals_map_to_specific_reasons() -> None:
    closed = SendOutcome(**{**reply("rejected").__dict__, "retcode": 10018, "comment": "closed"})
    assert settle.rejection_of(closed) == (RejectionReason.MARKET_CLOSED, "retcode 10018: closed")
    other = settle.rejection_of(reply("rejected"))
    assert other[0] is RejectionReason.BROKER_REJECTED


# --- tally and slippage ----------------------------------------------------------------


def test_tally_weighs_prices_by_volume_and_signs_slippage_by_side() -> None:
    fills = [Fill(1, (1,), 1.0, 1.1002, 1.1000), Fill(2, (2,), 3.0, 1.1002, 1.1000)]
    bought = settle.tally(fills, Side.BUY, 0.0001, 1.0)
    assert bought.executed_lots == 4.0
    assert bought.fill_price == pytest.approx(1.1002)
    assert bought.requested_price == pytest.approx(1.1)
    assert bought.slippage_pips == pytest.approx(2.0)  # adverse for a buy
    assert settle.tally(fills, Side.SELL, 0.0001, 1.0).slippage_pips == pytest.approx(-2.0)


def test_tally_of_nothing_reports_the_planned_price() -> None:
    empty = settle.tally([], Side.BUY, 0.0001, 1.2345)
    assert empty == settle.Tally(0.0, None, 1.2345, None)


def test_slippage_exactly_at_the_limit_is_no_breach() -> None:
    at = settle.Tally(1.0, 1.1003, 1.1, 3.0)
    assert settle.slippage_breach(at, 3.0) is None
    above = settle.Tally(1.0, 1.1003, 1.1, 3.0001)
    assert settle.slippage_breach(above, 3.0) == "slippage 3.00 pips > limit 3 pips"
    assert settle.slippage_breach(settle.Tally(0.0, None, 1.1, None), 0.0) is None


def test_flag_policy_keeps_an_earlier_reason() -> None:
    filled = settle.flagged(Verdict(ExecutionStatus.FILLED), "breach")
    assert filled == Verdict(ExecutionStatus.FILLED, RejectionReason.SLIPPAGE_EXCEEDED, "breach")
    short = Verdict(ExecutionStatus.PARTIALLY_FILLED, RejectionReason.INSUFFICIENT_FILL, "x")
    assert settle.flagged(short, "breach") == short


def test_close_policy_cancels_only_when_everything_closed() -> None:
    filled = Verdict(ExecutionStatus.FILLED)
    closed = settle.after_close(filled, "breach", True)
    assert closed == Verdict(
        ExecutionStatus.CANCELLED, RejectionReason.SLIPPAGE_EXCEEDED, "breach; closed at once"
    )
    failed = settle.after_close(filled, "breach", False)
    assert failed.status is ExecutionStatus.FILLED
    assert failed.details == "breach; closing it FAILED: the position may still be open"


def test_the_close_of_a_fill_is_the_opposite_order_on_its_position() -> None:
    fill = Fill(100, (1,), 2.0, 1.1, 1.1, position=55)
    assert settle.close_of(fill, Side.BUY) == Close(Side.SELL, 2.0, 55)


@pytest.mark.parametrize(
    ("status", "volume", "has_fill", "in_full"),
    [
        ("done", 2.0, True, True),
        ("done", 2.0 - 1e-10, True, True),  # float noise of the volume
        ("done", 1.0, True, False),
        ("partial", 2.0, True, False),
        ("rejected", 0.0, False, False),
    ],
)
def test_close_result(status: str, volume: float, has_fill: bool, in_full: bool) -> None:
    close = Close(Side.SELL, 2.0, 55)
    fill, full = settle.close_result(close, reply(status, volume=volume))
    assert (fill is not None, full) == (has_fill, in_full)
    if fill is not None:
        assert fill == Fill(5, (9,), 0.0, 1.1, 1.1)


def test_known_fills_the_broker_does_not_show_are_kept_in_leg_order() -> None:
    leg_1 = Fill(100, (1,), 0.5, 1.1, 1.1)
    leg_2 = Fill(200, (2,), 0.5, 1.1, 1.1)
    assert settle.with_known([leg_1], [leg_2]) == [leg_1, leg_2]
    fuller = Fill(100, (1, 3), 0.7, 1.1, 1.1)  # the broker's account of an order wins
    assert settle.with_known([leg_1], [leg_2, fuller]) == [fuller, leg_2]
    assert settle.with_known([], [leg_2]) == [leg_2]


# --- the slippage close never sent twice (issue 18 item 1) --------------------------------


def test_closing_fills_are_the_deals_against_the_execution() -> None:
    deals = [buy(1, 10, 1.0, 1.1), sell(2, 11, 1.0, 1.09)]
    (closing,) = settle.closing_fills(deals, Side.BUY)
    assert (closing.order, closing.deals, closing.volume) == (11, (2,), 1.0)


def test_closes_left_counts_closing_deals_already_done() -> None:
    opened = settle.fills_from_deals([buy(1, 10, 1.0, 1.1, 7)], Side.BUY, 1.1)
    closed = settle.closing_fills([sell(2, 11, 1.0, 1.09, 7)], Side.BUY)
    assert [close for _, close in settle.closes_left(opened, Side.BUY, closed)] == [None]
    assert [close for _, close in settle.closes_left(opened, Side.BUY, ())] == [
        Close(Side.SELL, 1.0, 7)
    ]


def test_closes_left_closes_only_the_rest_and_never_counts_a_close_twice() -> None:
    opened = settle.fills_from_deals(
        [buy(1, 10, 1.0, 1.1, 7), buy(3, 12, 0.5, 1.1, 8)], Side.BUY, 1.1
    )
    closed = settle.closing_fills([sell(2, 11, 0.4, 1.09, 7)], Side.BUY)
    left = [close for _, close in settle.closes_left(opened, Side.BUY, closed)]
    # 0.6 of position 7 still open; position 8's close is not covered by position 7's
    assert left == [Close(Side.SELL, 0.6, 7), Close(Side.SELL, 0.5, 8)]


def test_a_provisional_answer_differs_from_a_late_fill_only_when_the_deals_do() -> None:
    from datetime import UTC, datetime
    from uuid import uuid4

    from schemas.confirmation import ExecutionConfirmation

    provisional = ExecutionConfirmation(
        execution_id=uuid4(),
        idempotency_key="k",
        status=ExecutionStatus.FAILED,
        rejection_reason=RejectionReason.UNKNOWN_OUTCOME,
        received_at=datetime.now(UTC),
        completed_at=datetime.now(UTC),
        provisional=True,
    )
    late = settle.fills_from_deals([buy(1, 10, 1.0, 1.1)], Side.BUY, 1.1)
    assert settle.differs(late, provisional)
    assert not settle.differs([], provisional)


def test_a_waited_fill_is_measured_from_the_price_its_order_was_sent_at() -> None:
    awaited = settle.Awaited(legs_sent=1, orders=(5,), requested=((5, 1.1003),))
    shown = Found(history_orders=(order(5, FILLED, 1.0),), deals=(buy(9, 5, 1.0, 1.1005),))
    settled = settle.progress(awaited, shown, Side.BUY, 1.1)  # 1.1: the validation's price
    assert isinstance(settled, settle.Settled)
    (fill,) = settled.fills
    assert fill.requested_price == 1.1003
    again = settle.Awaited.from_json(awaited.to_json(), legs=1, since=0.0)
    assert again.requested == ((5, 1.1003),)
