"""Real-shaped RPM messages for tests (the shape of ``RPMOutput.to_dict()``)."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime
from typing import Any


def utc_naive_now() -> str:
    """What the RPM writes: ``datetime.utcnow().isoformat()`` (naive UTC)."""
    return datetime.now(UTC).replace(tzinfo=None).isoformat()


def approved_trade(
    symbol: str = "EURUSD", direction: int = 1, units: float = 95_000.0, **extra: Any
) -> dict[str, Any]:
    trade: dict[str, Any] = {
        "symbol": symbol,
        "direction": direction,
        "position_units": units,
        "confidence_score": 0.82,
        "regime": "TRENDING",
        "base_units": 100_000.0,
        "confidence_adjustment": 0.95,
        "regime_adjustment": 1.0,
        "correlation_adjustment": 1.0,
        "atr": 0.0012,
        "vol_percentile": 0.55,
        "risk_per_trade": 0.01,
        "risk_override": False,
        "timestamp": utc_naive_now(),
        "rpm_version": "1.0.0",
    }
    trade.update(extra)
    return trade


def decision(
    status: str = "APPROVED",
    order_id: str | None = "auto",
    trade: dict[str, Any] | None = None,
    kill_switch: bool = False,
) -> dict[str, Any]:
    approved = status in ("APPROVED", "ADJUSTED")
    return {
        "status": status,
        "approved_trade": (trade or approved_trade()) if approved else None,
        "rejected_trade": None if approved else {"symbol": "EURUSD", "rejection_reason": "risk"},
        "order_id": uuid.uuid4().hex if order_id == "auto" else order_id,
        "kill_switch_triggered": kill_switch,
        "kill_switch_reason": "drawdown limit" if kill_switch else None,
        "portfolio_constraints_passed": True,
        "portfolio_constraint_violations": [],
        "position_sizing_applied": True,
        "sizing_adjustments": {},
        "processing_time_ms": 1.7,
    }


def rpm_output(decision_obj: dict[str, Any] | None = None, halted: bool = False) -> dict[str, Any]:
    return {
        "decision": decision_obj if decision_obj is not None else decision(),
        "portfolio_state": {
            "trading_halted": halted,
            "halt_reason": "daily loss" if halted else None,
            "equity": 100_000.0,
            "open_positions": {},
        },
        "risk_metrics": {"var_95": 0.01},
        "config_hash": "abc123",
        "rpm_version": "1.0.0",
        "timestamp": utc_naive_now(),
    }


def body(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode("utf-8")


def clone(message: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(message)
