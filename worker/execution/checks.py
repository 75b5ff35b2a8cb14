"""Refusals before any order is sent.

- :func:`refusal`: what follows from the message alone (status, kill switch, halt);
- :func:`route`: the account an approval is executed on, or why it cannot be;
- :func:`staleness`: the approval's age against its TTL;
- :func:`validate`: what the terminal says about this trade now (symbol tradable, tick age,
  spread, volume, margin), giving the plan's legs and price. Raises ``GatewayRejection``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from schemas.enums import DecisionStatus, RejectionReason
from schemas.request import ExecutionRequest
from schemas.rpm import ApprovedTrade
from worker.config import Settings
from worker.execution.plan import Leg, hedging_closes_first, plan_legs
from worker.mt5.gateway import Gateway, GatewayRejection, MarketSnapshot, Side, SymbolSpec

Refusal = tuple[RejectionReason, str]


def refusal(request: ExecutionRequest) -> Refusal | None:
    """Refusals that follow from the message itself: they never reach the broker.

    (Staleness depends on the time too, so it is judged only for a key without a row: a
    redelivery of an approval already in flight must be settled, not refused.)
    """
    if request.status not in (DecisionStatus.APPROVED, DecisionStatus.ADJUSTED):
        return RejectionReason.NOT_APPROVED, f"RPM status {request.status.value}"
    if request.kill_switch:
        return RejectionReason.KILL_SWITCH, request.kill_switch_reason or "kill switch set"
    if request.trading_halted:
        return RejectionReason.TRADING_HALTED, request.halt_reason or "trading halted"
    return None


@dataclass(frozen=True)
class Routed:
    """The configured account an approval is executed on (None: the one unnamed account)."""

    account: str | None


def route(named: str | None, accounts: tuple[str | None, ...]) -> Routed | Refusal:
    """The account (of ``accounts``, the configured ones) to execute on, or a refusal.

    One account: an approval naming none, or naming it, goes to it. Several: the approval
    must name one of them. Never guessed: a name that is not configured exactly is refused,
    also when the one account is unnamed (its name cannot be checked).
    """
    if named is None:
        if len(accounts) == 1:
            return Routed(accounts[0])
        return (
            RejectionReason.ACCOUNT_REQUIRED,
            f"{len(accounts)} accounts are configured and the approval names none "
            "(decision.account)",
        )
    if named in accounts:
        return Routed(named)
    if accounts == (None,):
        detail = "this deployment's one account has no name (login and server, or account)"
    else:
        detail = "configured: " + ", ".join(str(name) for name in accounts)
    return RejectionReason.ACCOUNT_UNKNOWN, f"account {named!r} is not configured; {detail}"[:500]


def staleness(decided_at: datetime | None, now: float, ttl_seconds: float) -> Refusal | None:
    """An approval older than its TTL (``now`` in epoch seconds) is refused STALE_APPROVAL."""
    if decided_at is None:
        return None
    age = now - decided_at.timestamp()
    if age > ttl_seconds:
        return (
            RejectionReason.STALE_APPROVAL,
            f"approval is {age:.1f} s old (TTL {ttl_seconds:g} s)",
        )
    return None


@dataclass(frozen=True)
class Validated:
    """A trade the terminal accepts now: what its plan is built from."""

    broker_symbol: str
    spec: SymbolSpec
    snapshot: MarketSnapshot
    lots: float
    legs: list[Leg]
    price: float
    deviation: int


def validate(gateway: Gateway, settings: Settings, trade: ApprovedTrade) -> Validated:
    """The terminal's checks of one trade, on one account reading. Raises GatewayRejection."""
    side = Side(trade.direction)
    broker_symbol = settings.broker_symbol_for(trade.symbol)
    spec = gateway.symbol_spec(broker_symbol)
    account = gateway.account()  # one reading for every check of this order
    gateway.check_trading_allowed(spec, side, account)
    snapshot = gateway.snapshot(spec)
    limit = settings.spread_limit_for(trade.symbol)
    if snapshot.spread_pips > limit:
        raise GatewayRejection(
            RejectionReason.SPREAD_TOO_WIDE,
            f"spread {snapshot.spread_pips:.2f} pips > limit {limit:g} pips",
        )
    lot_plan = gateway.lots_for(spec, trade.position_units, settings.volume_over_max)
    price = snapshot.ask if side is Side.BUY else snapshot.bid
    opposite = (
        gateway.opposite_positions(spec, side)
        if hedging_closes_first(settings.hedging_close_opposite, account)
        else None
    )
    legs = plan_legs(spec, lot_plan.chunks, opposite)
    opening = sum(leg.lots for leg in legs if leg.position is None)
    if opening > 0:
        gateway.check_margin(spec, side, opening, price, settings.margin_cushion, account)
    deviation = gateway.deviation_points(spec, settings.slippage_limit_for(trade.symbol))
    return Validated(
        broker_symbol=broker_symbol,
        spec=spec,
        snapshot=snapshot,
        lots=lot_plan.lots,
        legs=legs,
        price=price,
        deviation=deviation,
    )
