"""Pips, lots and deviations from a symbol's specification (DOMAIN.md 2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Literal

from schemas.enums import RejectionReason
from worker.mt5 import api
from worker.mt5.gateway.errors import GatewayRejection
from worker.mt5.gateway.model import LotPlan, SymbolSpec

# Currencies whose pairs follow the digits rule for pips (5/3 digits: pip = 10 points).
_FIAT = frozenset(
    ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "NZD", "SEK", "NOK", "DKK", "PLN", "HUF",
     "CZK", "TRY", "ZAR", "MXN", "SGD", "HKD", "CNH", "CNY", "RUB", "ILS", "THB", "INR", "KRW",
     "BRL")
)  # fmt: skip
MAX_CHUNKS = 100
_FLOAT_NOISE = Decimal("0.000000001")  # lots below this are float noise (0.29999999999999996)


def _is_fx(info: api.SymbolInfo) -> bool:
    return (
        info.currency_base in _FIAT
        and info.currency_profit in _FIAT
        and info.currency_base != info.currency_profit
    )


def _decimal(value: float) -> Decimal:
    return Decimal(repr(value))


def pip_size(info: api.SymbolInfo, pip_sizes: Mapping[str, float]) -> float:
    """Configured pip size (also by prefix, for broker suffixes), else the FX digits rule."""
    configured = pip_sizes.get(info.name)
    if configured is None:
        # broker suffixes/prefixes: "XAUUSD" also covers "XAUUSD.a" and "XAUUSDm"
        prefixes = [k for k in pip_sizes if k and info.name.startswith(k)]
        if prefixes:
            configured = pip_sizes[max(prefixes, key=len)]
    if configured is not None:
        if configured <= 0:
            raise GatewayRejection(
                RejectionReason.SYMBOL_NOT_TRADABLE,
                f"configured pip size for {info.name} is not positive",
            )
        return configured
    if _is_fx(info) and info.digits in (2, 3, 4, 5):
        return info.point * (10 if info.digits in (3, 5) else 1)
    raise GatewayRejection(
        RejectionReason.SYMBOL_NOT_TRADABLE,
        f"no pip size for {info.name}: it is not an FX pair ({info.currency_base}/"
        f"{info.currency_profit}, {info.digits} digits); configure pip_sizes",
    )


def lots_for(spec: SymbolSpec, units: float, over_max: Literal["split", "reject"]) -> LotPlan:
    """Units -> lots rounded DOWN to the volume step; never upsized."""
    if not math.isfinite(units) or units <= 0:
        raise GatewayRejection(RejectionReason.VOLUME_INVALID, f"units must be > 0: {units}")
    contract = _decimal(spec.contract_size)
    step = _decimal(spec.volume_step)
    vmin = _decimal(spec.volume_min)
    vmax = _decimal(spec.volume_max)
    try:
        raw = (_decimal(units) / contract).quantize(_FLOAT_NOISE, rounding=ROUND_HALF_EVEN)
        lots = (raw / step).to_integral_value(rounding=ROUND_FLOOR) * step
    except InvalidOperation:  # beyond Decimal's precision: absurdly large
        raise GatewayRejection(
            RejectionReason.VOLUME_INVALID, f"{units:g} units is not a tradable size"
        ) from None
    if lots < vmin or lots <= 0:
        raise GatewayRejection(
            RejectionReason.VOLUME_INVALID,
            f"{units:g} units = {raw.normalize():f} lots on {spec.name} (contract "
            f"{spec.contract_size:g}): below volume_min {spec.volume_min:g}",
        )
    chunks: list[Decimal] = [lots]
    if lots > vmax:
        if over_max == "reject":
            raise GatewayRejection(
                RejectionReason.VOLUME_INVALID,
                f"{lots.normalize():f} lots on {spec.name} exceed volume_max "
                f"{spec.volume_max:g} (splitting is off)",
            )
        count, rest = divmod(lots, vmax)
        if count + (1 if rest else 0) > MAX_CHUNKS:
            raise GatewayRejection(
                RejectionReason.VOLUME_INVALID,
                f"{lots.normalize():f} lots would need more than {MAX_CHUNKS} orders",
            )
        chunks = [vmax] * int(count)
        if rest:
            if rest < vmin:  # keep every chunk valid: move volume from the last full one
                chunks[-1] = vmax - (vmin - rest)
                rest = vmin
            chunks.append(rest)
    return LotPlan(
        units=units,
        chunks=tuple(float(chunk) for chunk in chunks),
        lots=float(lots),
        units_effective=float(lots * contract),
        split=len(chunks) > 1,
    )


def deviation_points(spec: SymbolSpec, max_slippage_pips: float) -> int:
    """Slippage limit in pips -> ``deviation`` in POINTS."""
    points = _decimal(max_slippage_pips) * _decimal(spec.pip) / _decimal(spec.point)
    return max(0, int(points.to_integral_value(rounding=ROUND_HALF_EVEN)))
