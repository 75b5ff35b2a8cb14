"""The plan of one execution: its legs (orders) and everything needed to send, monitor and
settle them, built from a validated request or rebuilt from an in-flight row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from schemas.identity import order_magic_for
from schemas.request import ExecutionRequest
from worker.mt5 import api
from worker.mt5.gateway import OrderIdentity, Side, SymbolSpec
from worker.store.store import ExecutionRow


@dataclass(frozen=True)
class Leg:
    """One order of a plan: ``lots`` to trade, closing ``position`` when set (hedging)."""

    lots: float
    position: int | None = None


@dataclass
class Plan:
    """Everything needed to send, monitor and settle one execution; rebuildable from its row."""

    execution_id: UUID
    idempotency_key: str
    rpm_order_id: str | None
    token: str
    symbol: str
    broker_symbol: str
    side: Side
    intended_units: float
    intended_lots: float
    legs: list[Leg]
    requested_price: float | None
    deviation: int
    spread_pips: float | None
    received_at: datetime
    decided_at: datetime | None
    reply_to: str | None
    correlation_id: str | None
    contract_size: float
    pip: float
    magic: int  # on every order of this execution (legacy rows: the deployment's magic)
    submitted_at: datetime | None = None
    attempts: int = 0
    arrival_bid: float | None = None  # the tick the checks used (issue 20: TCA)
    arrival_ask: float | None = None
    # the slippage close's stage is on record (committed before its first order): a
    # redelivery counts the closing deals already done instead of closing again
    closing_sent: bool = False

    @property
    def identity(self) -> OrderIdentity:
        """What marks this execution's orders, deals and positions on the server."""
        return OrderIdentity(self.magic, self.token)


def round_step(volume: float, step: float) -> float:
    """Round to the volume step (nearest, to undo float noise; never used to upsize)."""
    steps = round(volume / step)
    return round(steps * step, 8)


def hedging_closes_first(enabled: bool, account: api.AccountInfo) -> bool:
    """On hedging accounts an opposite approval closes our opposite positions first."""
    return enabled and account.margin_mode == api.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING


def plan_legs(
    spec: SymbolSpec,
    chunks: tuple[float, ...],
    opposite: Sequence[api.TradePosition] | None,
) -> list[Leg]:
    """The orders of one approval: ``chunks`` (each at most the volume maximum) as new
    exposure, or, given our ``opposite`` positions (oldest first; None when they are not to
    be closed), closes of those first and the rest as new exposure."""
    if opposite is None:
        return [Leg(lots) for lots in chunks]
    remaining = sum(chunks)
    legs: list[Leg] = []
    for position in opposite:
        if remaining < spec.volume_min / 2:
            break
        close = round_step(min(position.volume, remaining), spec.volume_step)
        if close <= 0:
            continue
        legs.append(Leg(close, position.ticket))
        remaining = round_step(remaining - close, spec.volume_step)
    if not legs:
        return [Leg(lots) for lots in chunks]
    while remaining >= spec.volume_min:
        lots = min(remaining, spec.volume_max)
        legs.append(Leg(lots))
        remaining = round_step(remaining - lots, spec.volume_step)
    return legs


def plan_for(
    request: ExecutionRequest,
    *,
    broker_symbol: str,
    lots: float,
    legs: list[Leg],
    requested_price: float,
    deviation: int,
    spread_pips: float,
    spec: SymbolSpec,
    deployment_magic: int,
) -> Plan:
    """The plan of a validated approval (``request.trade`` is set)."""
    trade = request.trade
    assert trade is not None
    return Plan(
        execution_id=request.execution_id,
        idempotency_key=request.idempotency_key,
        rpm_order_id=request.rpm_order_id,
        token=request.comment_token,
        symbol=trade.symbol,
        broker_symbol=broker_symbol,
        side=Side(trade.direction),
        intended_units=trade.position_units,
        intended_lots=lots,
        legs=legs,
        requested_price=requested_price,
        deviation=deviation,
        spread_pips=spread_pips,
        received_at=request.received_at,
        decided_at=request.decided_at,
        reply_to=request.reply_to,
        correlation_id=request.correlation_id,
        contract_size=spec.contract_size,
        pip=spec.pip,
        magic=order_magic_for(request.execution_id, deployment_magic),
    )


def plan_snapshot(plan: Plan, request_snapshot: dict[str, Any]) -> dict[str, Any]:
    """The request as stored with the intent, plus what rebuilding the plan needs."""
    snapshot = dict(request_snapshot)
    snapshot["legs"] = [[leg.lots, leg.position] for leg in plan.legs]
    # what settling needs even if the terminal cannot describe the symbol then
    snapshot["contract_size"] = plan.contract_size
    snapshot["pip"] = plan.pip
    return snapshot


def plan_from_row(row: ExecutionRow, deployment_magic: int) -> Plan:
    """Rebuild the plan of an in-flight row (redelivery, restart).

    The row's stored magic is the one its orders carry: a row written before magics were
    per execution holds the deployment's, and is then matched by the legacy rule.
    """
    snapshot: dict[str, Any] = row.get("request") or {}
    legs = [Leg(float(lots), position) for lots, position in snapshot.get("legs", [])]
    return Plan(
        execution_id=row.execution_id,
        idempotency_key=row.get("idempotency_key"),
        rpm_order_id=row.get("rpm_order_id"),
        token=row.get("comment_token"),
        symbol=row.get("symbol"),
        broker_symbol=row.get("broker_symbol"),
        side=Side(row.get("direction")),
        intended_units=row.get("intended_units"),
        intended_lots=row.get("intended_lots"),
        legs=legs or [Leg(row.get("intended_lots"))],
        requested_price=row.get("requested_price"),
        deviation=row.get("deviation_points") or 0,
        spread_pips=row.get("spread_pips"),
        received_at=row.get("received_at"),
        decided_at=row.get("decided_at"),
        reply_to=snapshot.get("reply_to"),
        correlation_id=snapshot.get("correlation_id") or row.get("rpm_order_id"),
        contract_size=float(snapshot.get("contract_size") or 0.0),
        pip=float(snapshot.get("pip") or 0.0),
        magic=int(row.get("magic") or deployment_magic),
        submitted_at=row.get("submitted_at"),
        attempts=row.get("attempts") or 0,
        arrival_bid=row.get("arrival_bid"),
        arrival_ask=row.get("arrival_ask"),
        closing_sent=row.get("closing_sent_at") is not None,
    )


def request_snapshot(request: ExecutionRequest) -> dict[str, Any]:
    """The request as the audit row keeps it (JSON types already)."""
    snapshot: dict[str, Any] = request.model_dump(mode="json")
    return snapshot
