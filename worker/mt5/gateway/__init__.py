"""Broker operations for the pipeline, with the rules of DOMAIN.md sections 2 and 6.

One :class:`Gateway` (``facade``) wraps one terminal session. Its parts, one job each:

- ``model``: value types (Side, SymbolSpec, MarketSnapshot, LotPlan, SendOutcome, ...);
- ``errors``: GatewayRejection (a refusal), SessionLost (the terminal is gone) and
  QueryFailed (a query answered None: never "nothing there");
- ``identity``: how our orders are recognised (magic + comment token; the rule);
- ``calls``: every terminal call timed and recorded for the audit trail;
- ``lots``: pips, units -> lots (step, min, max, legs) and deviations;
- ``filling``: filling modes by execution mode;
- ``retcodes``: how ``order_send`` retcodes are treated, and their rejection reasons;
- ``clock``: the server's offset from UTC (configured, a DST rule, or learned);
- ``send``: ``order_send`` attempts and retries;
- ``reconcile``: finding our orders, deals and positions.

Every public name stays importable from ``worker.mt5.gateway``.
"""

from __future__ import annotations

from worker.mt5.gateway.clock import TimezoneRule, parse_timezone
from worker.mt5.gateway.errors import GatewayRejection, QueryFailed, SessionLost
from worker.mt5.gateway.facade import Gateway
from worker.mt5.gateway.identity import OrderIdentity
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
from worker.mt5.gateway.reconcile import HistoryWindow
from worker.mt5.gateway.retcodes import (
    REJECTION_REASONS,
    RetcodeClass,
    Status,
    classify_retcode,
    rejection_reason_for,
)

__all__ = [
    "REJECTION_REASONS",
    "BrokerCall",
    "Gateway",
    "GatewayRejection",
    "HistoryWindow",
    "LotPlan",
    "MarketSnapshot",
    "OrderIdentity",
    "QueryFailed",
    "Reconciliation",
    "RetcodeClass",
    "SendOutcome",
    "SessionLost",
    "Side",
    "Status",
    "SymbolSpec",
    "TimezoneRule",
    "classify_retcode",
    "parse_timezone",
    "rejection_reason_for",
    "signed_slippage_pips",
    "vwap",
]
