"""Filling modes for a market order (DOMAIN.md 2)."""

from __future__ import annotations

from worker.mt5 import api
from worker.mt5.gateway.model import SymbolSpec


def filling_modes(spec: SymbolSpec) -> tuple[int, ...]:
    """Allowed filling modes, preferred first (empty: the symbol cannot be traded)."""
    modes: list[int] = []
    if spec.filling_mode & api.SYMBOL_FILLING_FOK:
        modes.append(api.ORDER_FILLING_FOK)
    if spec.filling_mode & api.SYMBOL_FILLING_IOC:
        modes.append(api.ORDER_FILLING_IOC)
    if spec.trade_exemode == api.SYMBOL_TRADE_EXECUTION_EXCHANGE:
        modes.append(api.ORDER_FILLING_RETURN)  # always allowed on exchange execution
    elif spec.trade_exemode != api.SYMBOL_TRADE_EXECUTION_MARKET and not modes:
        modes.append(api.ORDER_FILLING_FOK)  # request/instant execution: FOK
    return tuple(modes)
