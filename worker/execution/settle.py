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


def orders_to_ask(found: Found, fills: Sequence[Fill], side: Side) -> tuple[Order, ...]:
    """The orders whose deals are to be asked by ticket, the deals window having missed
    them: every history order when the window showed no fill and nothing is pending, else
    those that executed more than the window shows."""
    if not fills and not found.open_orders:
        return found.history_orders
    return uncovered(found, fills, side)


def fills_with_asked(
    found: Found,
    window: Sequence[Fill],
    asked: Iterable[Deal],
    side: Side,
    requested_price: float | None,
) -> list[Fill] | None:
    """The fills of the deals window completed by the deals ``asked`` by order ticket.

    None: the broker shows our order but not yet (all) its deals (history lag, a position
    without its deal), so the execution stays in flight. Settling with nothing filled is
    only right when every order we sent is final without a fill.
    """
    fills = with_known(window, fills_from_deals(asked, side, requested_price))
    if uncovered(found, fills, side):
        return None
    if not fills and not found.open_orders:
        unfilled_final = all(order.state in UNFILLED_FINAL_STATES for order in found.history_orders)
        if found.positions or not unfilled_final:
            return None
    return fills


def with_known(known: Sequence[Fill], shown: Sequence[Fill]) -> list[Fill]:
    """The broker's fills (``shown``) together with the fills of this handling it did not
    show (``known``: earlier legs of a plan whose later leg has an unknown outcome, when
    the history lags). The broker's account of an order wins; known legs come first."""
    by_order = {fill.order: fill for fill in shown}
    merged = [by_order.pop(fill.order, fill) for fill in known]
    return merged + list(by_order.values())


def with_monitored(fills: Sequence[Fill], order: int, fill: Fill | None) -> list[Fill]:
    """The fills with ``order``'s fill replaced by what monitoring it found."""
    merged = [known for known in fills if known.order != order]
    if fill is not None:
        merged.append(fill)
    return merged


def differs(fills: Sequence[Fill], confirmed: ExecutionConfirmation) -> bool:
    """Whether the broker's fills tell another story than a (provisional) confirmation:
    other deals or other executed lots."""
    deals = sorted(deal for fill in fills for deal in fill.deals)
    executed = round(sum(fill.volume for fill in fills), 8)
    return (
        deals != sorted(confirmed.broker_deals)
        or abs(executed - confirmed.executed_lots) > _VOLUME_EPSILON
    )


# --- what to do when the broker knows nothing of the execution --------------------------


@dataclass(frozen=True)
class Resend:
    """The order never reached the broker: send it again, same comment token."""


@dataclass(frozen=True)
class GiveUp:
    status: ExecutionStatus | None  # None: classified as nothing filled
    reason: RejectionReason
    details: str


def when_not_found(
    stale: tuple[RejectionReason, str] | None,
    submissions: int,
    max_send_attempts: int,
    *,
    filled: bool = False,
) -> Resend | GiveUp:
    """The broker shows nothing of the execution. ``filled``: earlier legs of this handling
    are known filled; a give-up then settles them by the partial-fill rule, not FAILED.
    A resend sends only the legs without a known outcome."""
    if stale is not None:
        return GiveUp(None, *stale)
    if submissions >= max_send_attempts:
        return GiveUp(
            None if filled else ExecutionStatus.FAILED,
            RejectionReason.UNKNOWN_OUTCOME,
            f"no order reached the broker after {submissions} submissions",
        )
    return Resend()


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
