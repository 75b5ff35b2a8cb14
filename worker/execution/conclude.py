"""Concluding an execution that reached the intent: its fills counted, its status decided
(the fill rule, a slippage breach and the close it may call for), then the final row and its
confirmation committed by the finisher."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from schemas.enums import ExecutionStatus, RejectionReason
from worker.config import Settings
from worker.execution import settle
from worker.execution.audit import Run
from worker.execution.finish import Finisher
from worker.execution.outcome import Outcome
from worker.execution.plan import Plan
from worker.execution.settle import Fill, FillRule
from worker.execution.submit import Sender
from worker.mt5.gateway import Gateway, SymbolSpec
from worker.observability import metrics
from worker.pool.leases import Lease
from worker.store.store import UNKNOWN_STATE


class Concluder:
    """Ends executions (thread-safe; state per call)."""

    def __init__(
        self, settings: Settings, sender: Sender, finisher: Finisher, fill_rule: FillRule
    ) -> None:
        self._settings = settings
        self._sender = sender
        self._finisher = finisher
        self._fill_rule = fill_rule

    def conclude(
        self,
        plan: Plan,
        lease: Lease,
        run: Run,
        fills: Sequence[Fill],
        *,
        timed_out: bool = False,
        reason: RejectionReason | None = None,
        details: str | None = None,
        status: ExecutionStatus | None = None,
        spec: SymbolSpec | None = None,
        closed: Sequence[Fill] = (),
        provisional: bool = False,
        version: int = 1,
        correction: str | None = None,
        settling: dict[str, Any] | None = None,
        corrects: str = UNKNOWN_STATE,
    ) -> Outcome:
        """``closed``: our slippage close's fills already done; ``provisional``: the outcome
        is unknown; ``settling``: what the row keeps for the settler or the recheck."""
        gateway: Gateway = lease.session.gateway
        if plan.contract_size <= 0 or plan.pip <= 0:  # a row from before these were kept
            spec = spec or gateway.symbol_spec(plan.broker_symbol)
            plan.contract_size, plan.pip = spec.contract_size, spec.pip
        counted = settle.tally(fills, plan.side, plan.pip, plan.requested_price)
        if counted.slippage_pips is not None:
            metrics.record_slippage(plan.symbol, plan.side.name.lower(), counted.slippage_pips)
            metrics.record_shortfall(
                plan.symbol,
                plan.side.value,
                plan.arrival_bid,
                plan.arrival_ask,
                counted.fill_price,
                plan.pip,
            )
        if status is None:
            if counted.executed_lots > 0:
                metrics.observe_fill_ratio(
                    settle.fill_ratio(counted.executed_lots, plan.intended_lots)
                )
            verdict = settle.classify(
                counted.executed_lots,
                plan.intended_lots,
                self._fill_rule,
                timed_out=timed_out,
                reason=reason,
                details=details,
            )
        else:
            verdict = settle.Verdict(status, reason, details)
        breach = settle.slippage_breach(counted, self._settings.slippage_limit_for(plan.symbol))
        if breach is not None:
            metrics.record_slippage_breach(plan.symbol)
            # a correction (version > 1) only reports: the row is no longer in flight
            if self._settings.slippage_policy == "close" and version == 1:
                spec = spec or gateway.symbol_spec(plan.broker_symbol)
                fills, closed_all = self._sender.close(plan, spec, fills, lease, run, closed=closed)
                verdict = settle.after_close(verdict, breach, closed_all)
            else:
                verdict = settle.flagged(verdict, breach)
        return self._finisher.finish(
            plan,
            lease,
            run,
            fills,
            counted,
            verdict,
            provisional=provisional,
            version=version,
            correction=correction,
            settling=settling,
            corrects=corrects,
        )
