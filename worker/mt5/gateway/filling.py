"""Filling modes for a market order, by the symbol's execution mode (DOMAIN.md 2).

- Request and Instant execution: market orders use FOK, whatever the bitmask says.
- Market execution: FOK if the bitmask allows it, else IOC.
- Exchange execution: the bitmask's FOK/IOC, and RETURN (always allowed there).

The first mode is the one sent; the others are candidates for the single fallback after
a 10030 (invalid fill), tried once only. On Request/Instant execution the bitmask's other
modes are kept as that fallback for servers that disagree with the rule.
"""

from __future__ import annotations

from worker.mt5 import api
from worker.mt5.gateway.model import SymbolSpec


def _bitmask_modes(spec: SymbolSpec) -> list[int]:
    modes: list[int] = []
    if spec.filling_mode & api.SYMBOL_FILLING_FOK:
        modes.append(api.ORDER_FILLING_FOK)
    if spec.filling_mode & api.SYMBOL_FILLING_IOC:
        modes.append(api.ORDER_FILLING_IOC)
    return modes


def filling_modes(spec: SymbolSpec) -> tuple[int, ...]:
    """Allowed filling modes, preferred first (empty: the symbol cannot be traded)."""
    allowed = _bitmask_modes(spec)
    if spec.trade_exemode in (
        api.SYMBOL_TRADE_EXECUTION_REQUEST,
        api.SYMBOL_TRADE_EXECUTION_INSTANT,
    ):
        return (api.ORDER_FILLING_FOK, *(m for m in allowed if m != api.ORDER_FILLING_FOK))
    if spec.trade_exemode == api.SYMBOL_TRADE_EXECUTION_EXCHANGE:
        return (*allowed, api.ORDER_FILLING_RETURN)
    if spec.trade_exemode == api.SYMBOL_TRADE_EXECUTION_MARKET:
        return tuple(allowed)
    return ()
