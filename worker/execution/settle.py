"""Broker truth -> fills and the execution's final status, as pure functions.

Nothing here calls the terminal or the database: the caller gathers what the broker says
(deals, orders, positions, the reconcile result, a send's reply) into the small frozen
reports below and acts on what these functions return.

Fills come from deals only (DOMAIN.md 2, after the ``order_send`` reference: a 10009
reply's ``deal`` may be 0 and its deal recorded after the reply).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from schemas.confirmation import ExecutionConfirmation
from schemas.enums import ExecutionStatus, RejectionReason
from worker.mt5 import api
from worker.mt5.gateway import (
    Reconciliation,
    SendOutcome,
    Side,
    rejection_reason_for,
    signed_slippage_pips,
)

FINAL_ORDER_STATES = frozenset(
    {
        api.ORDER_STATE_FILLED,
        api.ORDER_STATE_CANCELED,
        api.ORDER_STATE_REJECTED,
        api.ORDER_STATE_EXPIRED,
    }
)
UNFILLED_FINAL_STATES = frozenset(
    {api.ORDER_STATE_CANCELED, api.ORDER_STATE_REJECTED, api.ORDER_STATE_EXPIRED}
)
_VOLUME_EPSILON = 1e-9

# --- broker reports ---------------------------------------------------------------------


@dataclass(frozen=True)
class Deal:
    """One deal of ours; ``side`` None for a deal that is no trade (balance, ...)."""

    ticket: int
    order: int
    side: Side | None
    volume: float
    price: float
    position: int

    @classmethod
    def of(cls, deal: api.TradeDeal) -> Deal:
        side = {api.DEAL_TYPE_BUY: Side.BUY, api.DEAL_TYPE_SELL: Side.SELL}.get(deal.type)
        return cls(deal.ticket, deal.order, side, deal.volume, deal.price, deal.position_id)


@dataclass(frozen=True)
class Order:
    """One order of ours, open or in history."""

    ticket: int
    state: int
    price_open: float
    filling: int
    volume_initial: float = 0.0
    volume_current: float = 0.0
    side: Side | None = None  # None: not a market order

    @classmethod
    def of(cls, order: api.TradeOrder) -> Order:
        side = {api.ORDER_TYPE_BUY: Side.BUY, api.ORDER_TYPE_SELL: Side.SELL}.get(order.type)
        return cls(
            order.ticket,
            order.state,
            order.price_open,
            order.type_filling,
            order.volume_initial,
            order.volume_current,
            side,
        )

    @property
    def final(self) -> bool:
        return self.state in FINAL_ORDER_STATES

    @property
    def executed(self) -> float:
        """Lots executed of the order (a FILLED order executed at least something)."""
        executed = max(self.volume_initial - self.volume_current, 0.0)
        if self.state == api.ORDER_STATE_FILLED:
            return max(executed, _VOLUME_EPSILON)
        return executed


@dataclass(frozen=True)
class Found:
    """What the terminal knows about one execution (found by comment token and magic)."""

    open_orders: tuple[Order, ...] = ()
    history_orders: tuple[Order, ...] = ()
    deals: tuple[Deal, ...] = ()
    positions: tuple[int, ...] = ()  # position tickets

    @classmethod
    def of(cls, found: Reconciliation) -> Found:
        return cls(
            open_orders=tuple(Order.of(order) for order in found.open_orders),
            history_orders=tuple(Order.of(order) for order in found.history_orders),
            deals=tuple(Deal.of(deal) for deal in found.deals),
            positions=tuple(position.ticket for position in found.positions),
        )

    @property
    def found(self) -> bool:
        return bool(self.open_orders or self.history_orders or self.deals or self.positions)


@dataclass(frozen=True)
class Fill:
    """What the broker executed for one order."""

    order: int
    deals: tuple[int, ...]
    volume: float
    price: float
    requested_price: float
    position: int | None = None


# --- fills ------------------------------------------------------------------------------


def fills_from_deals(
    deals: Iterable[Deal], side: Side, requested_price: float | None
) -> list[Fill]:
    """Our fills, one per order, from deals of ``side`` (e.g. not the close of
    SLIPPAGE_POLICY=close); ``requested_price`` None takes the deal's price."""
    by_order: dict[int, Fill] = {}
    for deal in deals:
        if deal.side is not side:
            continue
        fill = by_order.get(deal.order)
        requested = requested_price if requested_price is not None else deal.price
        if fill is None:
            by_order[deal.order] = Fill(
                deal.order, (deal.ticket,), deal.volume, deal.price, requested, deal.position
            )
            continue
        volume = fill.volume + deal.volume
        by_order[deal.order] = replace(
            fill,
            price=(fill.price * fill.volume + deal.price * deal.volume) / volume,
            volume=volume,
            deals=(*fill.deals, deal.ticket),
        )
    return list(by_order.values())


def fill_of_order(order: int, deals: Sequence[Deal], requested_price: float) -> Fill | None:
    """The fill of one order from all its deals (None: nothing executed)."""
    volume = sum(deal.volume for deal in deals)
    if volume <= 0:
        return None
    return Fill(
        order=order,
        deals=tuple(deal.ticket for deal in deals),
        volume=volume,
        price=sum(deal.volume * deal.price for deal in deals) / volume,
        requested_price=requested_price,
        position=deals[0].position,
    )


def executed_by(reply: SendOutcome) -> float:
    """The lots a done (10009/10010) reply says were executed; at least a deal's worth."""
    return max(reply.volume, _VOLUME_EPSILON)


def deals_visible(fill: Fill | None, executed: float) -> bool:
    """Whether an order's deals seen so far (``fill``) account for the ``executed`` lots
    the broker reports (a reply's volume, an order's initial minus current volume)."""
    if executed <= 0:
        return True
    return fill is not None and fill.volume >= executed - _VOLUME_EPSILON


def uncovered(found: Found, fills: Sequence[Fill], side: Side) -> tuple[Order, ...]:
    """Our history orders of ``side`` that executed more than ``fills`` show of them."""
    by_order = {fill.order: fill for fill in fills}
    return tuple(
        order
        for order in found.history_orders
        if order.side is side and not deals_visible(by_order.get(order.ticket), order.executed)
    )


def with_known(known: Iterable[Fill], shown: Sequence[Fill]) -> list[Fill]:
    """The broker's fills (``shown``) together with the fills of this handling it did not
    show (``known``: earlier legs of a plan whose later leg has an unknown outcome, when
    the history lags). The broker's account of an order wins; known legs come first."""
    by_order = {fill.order: fill for fill in shown}
    merged = [by_order.pop(fill.order, fill) for fill in known]
    return merged + list(by_order.values())


def differs(fills: Sequence[Fill], confirmed: ExecutionConfirmation) -> bool:
    """Whether the broker's fills tell another story than a (provisional) confirmation:
    other deals or other executed lots."""
    deals = sorted(deal for fill in fills for deal in fill.deals)
    executed = round(sum(fill.volume for fill in fills), 8)
    return (
        deals != sorted(confirmed.broker_deals)
        or abs(executed - confirmed.executed_lots) > _VOLUME_EPSILON
    )


# --- what a handling leaves for the settler, and how far the broker has got ---------------


@dataclass(frozen=True)
class Awaited:
    """What a handling left for the settler (the row's ``settling`` column).

    ``orders``: tickets the server took whose fills are not known yet (a 10009/10010 reply
    without its deal, a 10008 placed order). ``known``: fills confirmed by replies that
    named their deal (MqlTradeResult: deal, volume and price "confirmed by broker").
    ``unknown``: the last leg sent has an unknown outcome (None, 10011, 10012, transport
    error, or a handling that stopped between its intent and its reply): its order may show
    at any time and is never sent again. ``since``: epoch seconds when the handling left it
    (the order timeout and the reconcile grace count from there). ``verify``: a final row
    settled from its replies, whose deals are still to be checked against them.
    """

    legs_sent: int
    orders: tuple[int, ...] = ()
    known: tuple[Fill, ...] = ()
    unknown: bool = False
    since: float = 0.0
    verify: bool = False
    # the price each order in ``orders`` was sent at: its slippage is measured from it
    requested: tuple[tuple[int, float], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "legs_sent": self.legs_sent,
            "orders": list(self.orders),
            "known": [
                [f.order, list(f.deals), f.volume, f.price, f.requested_price, f.position]
                for f in self.known
            ],
            "unknown": self.unknown,
            "since": self.since,
            "verify": self.verify,
            "requested": [list(pair) for pair in self.requested],
        }

    @classmethod
    def from_json(cls, document: dict[str, Any] | None, *, legs: int, since: float) -> Awaited:
        """The row's document; a row without one (a handling that stopped before its reply,
        a row from before the settler) is an unknown outcome of every leg."""
        if not document:
            return cls(legs_sent=legs, unknown=True, since=since)
        return cls(
            legs_sent=int(document.get("legs_sent", legs)),
            orders=tuple(int(ticket) for ticket in document.get("orders", ())),
            known=tuple(
                Fill(int(o), tuple(int(d) for d in deals), float(v), float(p), float(r), pos)
                for o, deals, v, p, r, pos in document.get("known", ())
            ),
            unknown=bool(document.get("unknown", False)),
            since=float(document.get("since", since)),
            verify=bool(document.get("verify", False)),
            requested=tuple((int(o), float(p)) for o, p in document.get("requested", ())),
        )

    def checking(self) -> Awaited:
        """The check of a final row settled from replies (``known``): its deals later."""
        return replace(self, orders=(), unknown=False, verify=True)

    def by_deals_alone(self) -> Awaited:
        """What the deals must show for the check: the replies' orders, final and covered."""
        return replace(self, orders=tuple(fill.order for fill in self.known), known=())


@dataclass(frozen=True)
class Settled:
    """Every order of the execution is final and its deals account for what it executed."""

    fills: list[Fill]
    timed_out: bool  # an order ended cancelled or expired (the order timeout's cancel)


@dataclass(frozen=True)
class Waiting:
    """An order of ours is still working (``open_orders``) or its deals do not show yet."""

    open_orders: tuple[int, ...]
    fills: list[Fill]


@dataclass(frozen=True)
class Unaccounted:
    """An order whose outcome is unknown shows nothing yet: no proof either way."""

    fills: list[Fill]


Progress = Settled | Waiting | Unaccounted


def progress(awaited: Awaited, found: Found, side: Side, requested_price: float | None) -> Progress:
    """How far the broker's view (``found``: this execution's orders and deals) has got.

    Fills come from the deals, completed by the replies that named their deal (the broker's
    account of an order wins). An order the server took must show final in history with
    deals covering what it executed; an unknown leg is accounted for only by an order of
    ours that no reply named.
    """
    sent_at = dict(awaited.requested)
    shown = [
        replace(fill, requested_price=sent_at.get(fill.order, fill.requested_price))
        for fill in fills_from_deals(found.deals, side, requested_price)
    ]
    fills = with_known(awaited.known, shown)
    working = tuple(order.ticket for order in found.open_orders if order.side is side)
    history = {order.ticket: order for order in found.history_orders if order.side is side}
    if working or any(ticket not in history for ticket in awaited.orders):
        return Waiting(working, fills)
    if uncovered(found, fills, side):
        return Waiting((), fills)
    named = set(awaited.orders) | {fill.order for fill in awaited.known}
    if awaited.unknown and not any(ticket not in named for ticket in history):
        return Unaccounted(fills)
    timed_out = any(
        order.state in (api.ORDER_STATE_CANCELED, api.ORDER_STATE_EXPIRED)
        for order in history.values()
    )
    return Settled(fills, timed_out)


def seen(awaited: Awaited, found: Found, side: Side) -> Awaited:
    """An unknown outcome whose order the broker showed once is unknown no more: that order
    must end final with its deals visible, even if a later view loses it (a flapping
    history is no proof that nothing filled)."""
    if not awaited.unknown:
        return awaited
    named = set(awaited.orders) | {fill.order for fill in awaited.known}
    shown = [
        order.ticket
        for order in (*found.open_orders, *found.history_orders)
        if order.side is side and order.ticket not in named
    ]
    if not shown:
        return awaited
    return replace(awaited, orders=(*awaited.orders, *shown), unknown=False)


def closing_state(closing_sent: bool, side: Side, found: Found) -> list[Fill] | None:
    """Our slippage close's fills the broker shows (an earlier handling sent them). None: a
    close is on record (``closing_sent``) but does not show, or shows without all its
    deals: the execution waits (a close is never sent twice for the same lots)."""
    closed = closing_fills(found.deals, side)
    if not closing_sent:
        return closed
    opposite = side.opposite
    if any(order.side is opposite for order in found.open_orders):
        return None
    if not any(order.side is opposite for order in found.history_orders):
        return None
    if uncovered(found, closed, opposite):
        return None
    return closed


def disagrees(shown: Sequence[Fill], confirmed: Sequence[Fill]) -> bool:
    """Whether the broker's deals (``shown``) tell another story than the replies a
    confirmation was settled from: other deals, or other executed lots or price."""
    deals = sorted(deal for fill in shown for deal in fill.deals)
    if deals != sorted(deal for fill in confirmed for deal in fill.deals):
        return True
    executed = sum(fill.volume for fill in shown)
    if abs(executed - sum(fill.volume for fill in confirmed)) > _VOLUME_EPSILON:
        return True
    value = sum(fill.volume * fill.price for fill in shown)
    return abs(value - sum(fill.volume * fill.price for fill in confirmed)) > 1e-6 * max(
        abs(value), 1.0
    )


def fill_of_reply(reply: SendOutcome, position: int | None = None) -> Fill | None:
    """The fill a 10009/10010 reply confirms when it names its deal, with volume and price
    (MqlTradeResult: ``deal`` "if it is performed", ``volume`` and ``price`` "confirmed by
    broker"). None: settle from the order's deals (``deal`` may be 0 and the deal recorded
    after the reply, ``order_send`` reference)."""
    if reply.status not in ("done", "partial") or not reply.deal:
        return None
    if reply.volume <= 0 or reply.price <= 0:
        return None
    return Fill(
        reply.order, (reply.deal,), reply.volume, reply.price, reply.requested_price, position
    )


def rejection_of(reply: SendOutcome) -> tuple[RejectionReason, str]:
    """A final broker refusal of an order_send: its reason and details."""
    reason = rejection_reason_for(reply.retcode)
    return reason, f"retcode {reply.retcode}: {reply.comment}"


# --- the final status -------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """The fills added up: lots, VWAP, the requested price they weigh, slippage in pips."""

    executed_lots: float
    fill_price: float | None
    requested_price: float | None
    slippage_pips: float | None


def tally(fills: Sequence[Fill], side: Side, pip: float, requested_price: float | None) -> Tally:
    """``requested_price`` is the plan's, reported when nothing executed."""
    executed = round(sum(fill.volume for fill in fills), 8)
    fill_price = sum(f.volume * f.price for f in fills) / executed if executed > 0 else None
    requested = (
        sum(f.volume * f.requested_price for f in fills) / executed
        if executed > 0
        else requested_price
    )
    slippage = None
    if fill_price is not None and requested is not None:
        slippage = round(signed_slippage_pips(side, requested, fill_price, pip), 4)
    return Tally(executed, fill_price, requested, slippage)


@dataclass(frozen=True)
class Verdict:
    status: ExecutionStatus
    reason: RejectionReason | None = None
    details: str | None = None


@dataclass(frozen=True)
class FillRule:
    """The partial-fill rule (settings ``fill_ratio_filled`` / ``fill_ratio_partial``)."""

    filled: float  # ratio at or above: FILLED
    partial: float  # at or above: PARTIALLY_FILLED; below: also INSUFFICIENT_FILL
    order_timeout_seconds: float


def fill_ratio(executed_lots: float, intended_lots: float) -> float:
    return executed_lots / intended_lots if intended_lots else 1.0


def classify(
    executed_lots: float,
    intended_lots: float,
    rule: FillRule,
    *,
    timed_out: bool = False,
    reason: RejectionReason | None = None,
    details: str | None = None,
) -> Verdict:
    """The partial-fill rule: the ratio of executed to intended lots decides. Nothing
    executed: EXPIRED after the order timeout, else REJECTED with ``reason`` (default
    BROKER_REJECTED)."""
    if executed_lots <= 0:
        if timed_out:
            return Verdict(
                ExecutionStatus.EXPIRED,
                RejectionReason.ORDER_TIMEOUT,
                f"nothing filled within {rule.order_timeout_seconds:g} s",
            )
        return Verdict(ExecutionStatus.REJECTED, reason or RejectionReason.BROKER_REJECTED, details)
    ratio = fill_ratio(executed_lots, intended_lots)
    if ratio >= rule.filled:
        return Verdict(ExecutionStatus.FILLED)
    described = f"filled {executed_lots:g} of {intended_lots:g} lots ({ratio:.1%})"
    if ratio >= rule.partial:
        return Verdict(ExecutionStatus.PARTIALLY_FILLED, None, described)
    return Verdict(ExecutionStatus.PARTIALLY_FILLED, RejectionReason.INSUFFICIENT_FILL, described)


def slippage_breach(counted: Tally, limit_pips: float) -> str | None:
    """The breach of the slippage limit, described; None within it (or nothing executed)."""
    slippage = counted.slippage_pips
    if slippage is None or slippage <= limit_pips or counted.executed_lots <= 0:
        return None
    return f"slippage {slippage:.2f} pips > limit {limit_pips:g} pips"


def flagged(verdict: Verdict, breach: str) -> Verdict:
    """SLIPPAGE_POLICY=flag: the breach is the reason unless another is already given."""
    if verdict.reason is not None:
        return verdict
    return replace(verdict, reason=RejectionReason.SLIPPAGE_EXCEEDED, details=breach)


def after_close(verdict: Verdict, breach: str, closed_all: bool) -> Verdict:
    """SLIPPAGE_POLICY=close: CANCELLED when every fill was closed in full."""
    if closed_all:
        return Verdict(
            ExecutionStatus.CANCELLED,
            RejectionReason.SLIPPAGE_EXCEEDED,
            f"{breach}; closed at once",
        )
    return replace(
        verdict,
        reason=RejectionReason.SLIPPAGE_EXCEEDED,
        details=f"{breach}; closing it FAILED: the position may still be open",
    )


# --- the slippage close -----------------------------------------------------------------


@dataclass(frozen=True)
class Close:
    """The order that takes one fill's exposure off again."""

    side: Side
    volume: float
    position: int | None


def close_of(fill: Fill, side: Side) -> Close:
    """``side`` is the execution's; the fill's position is closed when known."""
    return Close(side.opposite, fill.volume, fill.position)


def closing_fills(deals: Iterable[Deal], side: Side) -> list[Fill]:
    """The fills of our slippage close among the execution's deals: the deals against the
    execution's ``side`` (its orders and the close's carry the same magic and comment)."""
    return fills_from_deals(deals, side.opposite, None)


def closes_left(
    fills: Sequence[Fill], side: Side, closed: Sequence[Fill]
) -> list[tuple[Fill, Close | None]]:
    """Each fill with the close still to send for it (None: ``closed``, the closing fills
    already done, cover it). Closed volume is matched by position: on a netting account
    the desk's own position is ours too, so only our closing deals ever count, and never
    more than once (a close is never sent twice for the same lots)."""
    available: dict[int | None, float] = {}
    for fill in closed:
        available[fill.position] = available.get(fill.position, 0.0) + fill.volume
    left: list[tuple[Fill, Close | None]] = []
    for fill in fills:
        taken = min(available.get(fill.position, 0.0), fill.volume)
        if taken > 0:
            available[fill.position] -= taken
        remaining = round(fill.volume - taken, 8)
        if remaining <= _VOLUME_EPSILON:
            left.append((fill, None))
        else:
            left.append((fill, Close(side.opposite, remaining, fill.position)))
    return left


def close_result(close: Close, reply: SendOutcome) -> tuple[Fill | None, bool]:
    """The closing fill a reply reports (None if nothing executed) and whether it closed
    the whole volume. An unknown reply is the caller's to handle (never settled here)."""
    fill = None
    if reply.status in ("done", "partial"):
        fill = Fill(reply.order, (reply.deal,), 0.0, reply.price, reply.price)
    in_full = reply.status == "done" and reply.volume >= close.volume - _VOLUME_EPSILON
    return fill, in_full
