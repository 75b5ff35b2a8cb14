"""Broker operations for the pipeline, with the rules of DOMAIN.md sections 2 and 6.

One :class:`Gateway` (``facade``) wraps one terminal session. Its parts, one job each:

- ``model``: value types (Side, SymbolSpec, MarketSnapshot, LotPlan, SendOutcome, ...);
- ``errors``: GatewayRejection (a refusal) and SessionLost (the terminal is gone);
- ``calls``: every terminal call timed and recorded for the audit trail;
- ``lots``: pips, units -> lots (step, min, max, legs) and deviations;
- ``filling``: filling modes by execution mode;
- ``retcodes``: how ``order_send`` retcodes are treated;
- ``clock``: the server's offset from UTC;
- ``send``: ``order_send`` attempts and retries;
- ``reconcile``: finding our orders, deals and positions.

Every public name stays importable from ``worker.mt5.gateway``.
"""

from __future__ import annotations

from worker.mt5.gateway.errors import GatewayRejection, SessionLost
from worker.mt5.gateway.facade import Gateway
from worker.mt5.gateway.model import (
    BrokerCall,
    LotPlan,
    MarketSnapshot,
    Reconciliation,
    SendOutcome,
    Side,
    SymbolSpec,
    signed_slippage_pips,
    vwap,
)
from worker.mt5.gateway.retcodes import RetcodeClass, Status, classify_retcode

__all__ = [
    "BrokerCall",
    "Gateway",
    "GatewayRejection",
    "LotPlan",
    "MarketSnapshot",
    "Reconciliation",
    "RetcodeClass",
    "SendOutcome",
    "SessionLost",
    "Side",
    "Status",
    "SymbolSpec",
    "classify_retcode",
    "signed_slippage_pips",
    "vwap",
]
