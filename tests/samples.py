"""Real-shaped RPM messages for tests (the shape of ``RPMOutput.to_dict()``).

Built on the same builders as ``execution-worker publish`` (worker/tools/publish.py), with the
defaults and the auto-generated order ids that tests want.
"""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

from worker.tools import publish
from worker.tools.publish import utc_naive_now

__all__ = ["approved_trade", "body", "clone", "decision", "rpm_output", "utc_naive_now"]


def approved_trade(
    symbol: str = "EURUSD", direction: int = 1, units: float = 95_000.0, **extra: Any
) -> dict[str, Any]:
    return publish.approved_trade(symbol, direction, units, **extra)


def decision(
    status: str = "APPROVED",
    order_id: str | None = "auto",
    trade: dict[str, Any] | None = None,
    kill_switch: bool = False,
) -> dict[str, Any]:
    approved = status in ("APPROVED", "ADJUSTED")
    document = publish.rpm_output(
        (trade or approved_trade()) if approved else None,
        status=status,
        order_id=uuid.uuid4().hex if order_id == "auto" else order_id,
        kill_switch=kill_switch,
    )
    made: dict[str, Any] = document["decision"]
    return made


def rpm_output(decision_obj: dict[str, Any] | None = None, halted: bool = False) -> dict[str, Any]:
    document = publish.rpm_output(None, status="REJECTED", halted=halted)
    document["decision"] = decision_obj if decision_obj is not None else decision()
    return document


def body(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode("utf-8")


def clone(message: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(message)
