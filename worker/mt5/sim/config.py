"""Configuration of the simulated terminal: account, symbols, market schedule and fault knobs.

Everything here is plain data (frozen dataclasses) so a configuration can be built in code,
loaded from TOML (``SimConfig.from_toml``) and changed at run time (``SimTerminal.set_faults``).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from worker.mt5 import api

WEEK_SECONDS = 7 * 86400
_DAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}
# FX (and most CFDs) close from Friday 22:00 to Sunday 22:00 UTC.
FX_CLOSED: tuple[tuple[str, str], ...] = (("Fri 22:00", "Sun 22:00"),)


def week_second(spec: str) -> int:
    """``"Fri 22:00"`` -> seconds since Monday 00:00 (UTC)."""
    day, _, clock = spec.strip().partition(" ")
    hours, _, minutes = clock.partition(":")
    try:
        return _DAYS[day[:3].lower()] * 86400 + int(hours) * 3600 + int(minutes or 0) * 60
    except (KeyError, ValueError):
        raise ValueError(f"invalid weekly time {spec!r} (expected e.g. 'Fri 22:00')") from None


@dataclass(frozen=True)
class SimSymbol:
    """One tradable instrument with the fields the real ``symbol_info`` reports."""

    name: str
    digits: int
    contract_size: float
    base_price: float
    volume_min: float = 0.01
    volume_max: float = 100.0
    volume_step: float = 0.01
    trade_mode: int = api.SYMBOL_TRADE_MODE_FULL
    trade_exemode: int = api.SYMBOL_TRADE_EXECUTION_MARKET
    filling_mode: int = api.SYMBOL_FILLING_FOK | api.SYMBOL_FILLING_IOC
    spread_points: int = 10
    path: str = ""
    description: str = ""
    currency_base: str = "USD"
    currency_profit: str = "USD"
    currency_margin: str = "USD"
    # "forex": lots * contract / leverage in the margin currency; "cfd": * price as well
    margin_calc: Literal["forex", "cfd"] = "forex"
    # relative volatility per sqrt(second) of the simulated mid price
    volatility: float = 2e-5
    liquidity_lots: float = 50.0  # most that one order can fill at once
    closed_weekly: tuple[tuple[str, str], ...] = FX_CLOSED  # UTC windows, e.g. Fri 22:00-Sun 22:00
    visible: bool = True  # in Market Watch at start (else symbol_select first)
    exchange_fill_delay_seconds: float = 0.5  # RETURN orders on exchange execution fill after

    @property
    def point(self) -> float:
        return float(10.0**-self.digits)

    def closed_windows(self) -> tuple[tuple[int, int], ...]:
        return tuple((week_second(a), week_second(b)) for a, b in self.closed_weekly)


def default_symbols() -> dict[str, SimSymbol]:
    fx = api.SYMBOL_FILLING_FOK | api.SYMBOL_FILLING_IOC
    symbols = (
        SimSymbol(
            "EURUSD", 5, 100_000.0, 1.08500, spread_points=12, filling_mode=fx,
            path="Forex\\Majors\\EURUSD", description="Euro vs US Dollar",
            currency_base="EUR", currency_margin="EUR", liquidity_lots=50.0,
        ),
        SimSymbol(
            "GBPUSD", 5, 100_000.0, 1.26500, volume_max=50.0, spread_points=15,
            trade_exemode=api.SYMBOL_TRADE_EXECUTION_INSTANT, filling_mode=api.SYMBOL_FILLING_IOC,
            path="Forex\\Majors\\GBPUSD", description="Great Britain Pound vs US Dollar",
            currency_base="GBP", currency_margin="GBP", liquidity_lots=30.0,
        ),
        SimSymbol(
            "USDJPY", 3, 100_000.0, 150.250, spread_points=14, filling_mode=fx,
            path="Forex\\Majors\\USDJPY", description="US Dollar vs Japanese Yen",
            currency_base="USD", currency_profit="JPY", currency_margin="USD",
            liquidity_lots=50.0,
        ),
        SimSymbol(
            "XAUUSD", 2, 100.0, 2350.00, volume_max=50.0, spread_points=25,
            filling_mode=api.SYMBOL_FILLING_FOK, path="Metals\\XAUUSD",
            description="Gold vs US Dollar", currency_base="XAU", margin_calc="cfd",
            volatility=3e-5, liquidity_lots=20.0,
        ),
        SimSymbol(
            "US500", 2, 1.0, 5200.00, volume_min=0.1, volume_max=1000.0, volume_step=0.1,
            spread_points=50, trade_exemode=api.SYMBOL_TRADE_EXECUTION_EXCHANGE,
            filling_mode=0, path="Indices\\US500", description="US 500 Index",
            margin_calc="cfd", volatility=3e-5, liquidity_lots=500.0, visible=False,
        ),
        SimSymbol(
            "BTCUSD", 2, 1.0, 65000.00, volume_max=20.0, spread_points=1500,
            filling_mode=api.SYMBOL_FILLING_IOC, path="Crypto\\BTCUSD",
            description="Bitcoin vs US Dollar", currency_base="BTC", margin_calc="cfd",
            volatility=8e-5, liquidity_lots=10.0, closed_weekly=(), visible=False,
        ),
    )  # fmt: skip
    return {symbol.name: symbol for symbol in symbols}


@dataclass(frozen=True)
class SimAccount:
    login: int = 5_000_001
    server: str = "SimBroker-Demo"
    name: str = "Simulated Account"
    company: str = "Simulated Broker Ltd"
    currency: str = "USD"
    balance: float = 100_000.0
    leverage: int = 100
    margin_mode: int = api.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING
    trade_allowed: bool = True
    trade_expert: bool = True
    password: str | None = field(default=None, repr=False)  # None: any password is accepted


# Outcomes that ``FaultConfig.scripted`` can force on the next order_send calls.
SCRIPTED_OUTCOMES = frozenset(
    {
        "requote",  # 10004, not executed
        "price_changed",  # 10020
        "off_quotes",  # 10021
        "reject",  # 10006
        "too_many_requests",  # 10024
        "locked",  # 10028
        "frozen",  # 10029
        "invalid_fill",  # 10030
        "error",  # 10011, not executed
        "connection",  # 10031, not executed
        "timeout",  # 10012, not executed
        "timeout_executed",  # 10012, executed
        "lost_reply",  # executed, None + last_error (-10005)
        "no_result",  # not executed, None + last_error (-1)
        "ok",  # no fault
    }
)


@dataclass(frozen=True)
class FaultConfig:
    """Fault knobs; rates are probabilities per call, drawn from their own seeded generator."""

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    latency_by_function: Mapping[str, float] = field(default_factory=dict)
    disconnect_rate: float = 0.0  # per call: the connection drops until initialize()
    lost_reply_rate: float = 0.0  # order executed, reply lost: None + (-10005)
    no_result_rate: float = 0.0  # not executed, None + (-1)
    timeout_rate: float = 0.0  # retcode 10012
    timeout_executes: bool = True  # whether a 10012 order was executed anyway
    too_many_requests_rate: float = 0.0  # 10024, not executed
    reject_rate: float = 0.0  # 10006
    requote_rate: float = 0.0  # 10004 on instant-execution symbols
    # signed slippage in points (positive = adverse) of market executions, with weights
    slippage_points: tuple[tuple[int, float], ...] = ((0, 0.85), (1, 0.08), (-1, 0.05), (4, 0.02))
    # forced outcomes of the next order_send calls, consumed one per call (SCRIPTED_OUTCOMES)
    scripted: tuple[str, ...] = ()
    fault_seed: int | None = None  # default: derived from SimConfig.seed

    def __post_init__(self) -> None:
        unknown = set(self.scripted) - SCRIPTED_OUTCOMES
        if unknown:
            raise ValueError(f"unknown scripted outcomes: {sorted(unknown)}")


@dataclass(frozen=True)
class SimConfig:
    seed: int = 7
    server_utc_offset_seconds: int = 7200  # server time is NOT UTC
    account: SimAccount = field(default_factory=SimAccount)
    terminal_trade_allowed: bool = True
    symbols: Mapping[str, SimSymbol] = field(default_factory=default_symbols)
    faults: FaultConfig = field(default_factory=FaultConfig)
    tick_interval_ms: int = 250  # prices move in steps of this length
    build: int = 4410

    def with_symbols(self, *symbols: SimSymbol) -> SimConfig:
        """A copy with these symbols added (or replacing those of the same name)."""
        merged = dict(self.symbols)
        merged.update({symbol.name: symbol for symbol in symbols})
        return replace(self, symbols=merged)

    @classmethod
    def from_toml(cls, path: str | Path) -> SimConfig:
        """Load a configuration; tables ``account``, ``faults`` and ``symbols.NAME``.

        A ``symbols.NAME`` table for a default symbol overrides some of its fields; for a new
        symbol it must give at least ``digits``, ``contract_size`` and ``base_price``.
        """
        with Path(path).open("rb") as handle:
            data = tomllib.load(handle)
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SimConfig:
        data = dict(data)
        account = SimAccount(**_known(SimAccount, data.pop("account", {})))
        faults = _faults_from(data.pop("faults", {}))
        symbols = default_symbols()
        for name, table in data.pop("symbols", {}).items():
            values = _known(SimSymbol, table)
            values.pop("name", None)
            if "closed_weekly" in values:
                values["closed_weekly"] = tuple(tuple(pair) for pair in values["closed_weekly"])
            if name in symbols:
                symbols[name] = replace(symbols[name], **values)
            else:
                symbols[name] = SimSymbol(name=name, **values)
        top = _known(cls, data)
        return cls(account=account, faults=faults, symbols=symbols, **top)


def _faults_from(table: Mapping[str, Any]) -> FaultConfig:
    values = _known(FaultConfig, table)
    if "slippage_points" in values:
        raw = values["slippage_points"]
        pairs = raw.items() if isinstance(raw, Mapping) else raw
        values["slippage_points"] = tuple((int(k), float(w)) for k, w in pairs)
    if "scripted" in values:
        values["scripted"] = tuple(values["scripted"])
    return FaultConfig(**values)


def _known(kind: type, table: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(kind)}
    unknown = set(table) - names
    if unknown:
        raise ValueError(f"unknown {kind.__name__} settings: {sorted(unknown)}")
    return dict(table)
