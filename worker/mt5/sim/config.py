"""Configuration of the simulated terminal: account, symbols, market schedule and fault knobs.

Everything here is plain data (frozen dataclasses) so a configuration can be built in code,
loaded from TOML (``SimConfig.from_toml``) and changed at run time (``SimTerminal.set_faults``).

Server hardening (issue 17, DOMAIN.md sections 2 and 6)
-------------------------------------------------------
Real trade servers are less kind than the simulator once was. Each behaviour below is a
``FaultConfig`` field (so ``set_faults`` changes it at run time and the ``[faults]`` TOML
table sets it). ``HARDENED`` holds the values of a hard server and ``FRIENDLY`` those of the
kind simulator of old. Every field defaults to its hardened value (``HARDENED_BY_DEFAULT =
True``): the demo, ``sim-terminal``, the compose stack and every test meet a hard server
unless they opt out:

- ``FaultConfig.friendly(**overrides)`` in code (a test of the friendly path says why),
- ``preset = "friendly"`` in the ``[faults]`` TOML table (``preset = "hardened"`` says the
  default out loud; ``FaultConfig.hardened()`` / ``SimConfig.hardened()`` in code),
- single fields, e.g. ``query_none_rate = 0.0``.

``comment_keep_chars`` (friendly None, hardened 16)
    Orders, deals and positions keep only the first N characters of the request comment
    (the MQL5 reference shows ``'python script op'`` for ``"python script open"``).
    None keeps the comment whole. The ``request`` echoed in the result keeps it whole.
``comment_replace`` (None, hardened None)
    A broker that rewrites comments: orders, deals and positions get this text instead
    (``""`` blanks them). Applied before ``comment_keep_chars``. Magic is always kept whole.
``deal_lag_ms`` / ``deal_lag_jitter_ms`` (0 / 0, hardened 200 / 400)
    A deal becomes visible in ``history_deals_get`` only this long (plus a uniform jitter)
    after the fill, on the terminal's clock; the order shows in history at once.
``deal_zero_rate`` (0, hardened 0.2)
    Share of 10009/10010 replies whose ``deal`` is 0 although the deal exists.
``query_none_rate`` (0, hardened 0.05)
    Share of ``history_deals_get``, ``history_orders_get``, ``orders_get`` and
    ``positions_get`` calls answering None with ``last_error()`` -10005 or -2; the connection
    stays up (the next call works).
``dst_clock`` (False, hardened True)
    Server time = UTC + ``SimConfig.server_utc_offset_seconds`` (GMT+2) plus one hour while
    US daylight saving time is in force (second Sunday of March 07:00 UTC to first Sunday
    of November 06:00 UTC): tick, order and deal times follow.
``clock_shift_seconds`` (0 in both)
    Run-time knob: added to the server offset at once, e.g.
    ``sim.set_faults(clock_shift_seconds=3600)`` forces a DST-like switch while a worker runs.
``filling_by_exemode`` (False, hardened True)
    Request and Instant execution accept market orders only with FOK (others: 10030), so an
    instant-execution symbol never partially fills; Market execution: FOK/IOC per the
    symbol's ``filling_mode`` bitmask; Exchange execution: RETURN as well. (Off: the bitmask
    decides on every mode, and an instant symbol without FOK in its bitmask accepts IOC.)
``strict_retcodes`` (False, hardened True)
    10038 when a close names more volume than the position holds (off: 10014), and
    10042/10043/10044 for long-only/short-only/close-only symbols (off: 10017).
``fifo_close`` (False, hardened False)
    Account rule of US brokers: on a hedging account a close must name the oldest open
    position of that symbol and side, else 10045.
``hedging_prohibited`` (False, hardened False)
    Account rule: on a hedging account an order that would open a position opposite to an
    open one of the same symbol is refused with 10046 (a close naming ``position`` is fine).
``algo_off_returns_none`` (False, hardened True)
    With the terminal's Algo Trading off, ``order_send`` returns None with ``last_error()``
    -8 (a definite non-send) instead of a 10027 reply. ``order_check`` still answers 10027.
``float_only_binding`` (False, hardened True)
    The binding refuses an int or Decimal for ``volume``, ``price``, ``stoplimit``, ``sl``,
    ``tp`` (None + ``(-2, 'Invalid "volume" argument')``), like the real ``MetaTrader5``.
``symbol_info_needs_select`` (False, hardened True)
    ``symbol_info`` answers None (-4) for a symbol outside Market Watch until
    ``symbol_select(symbol, True)`` (``symbol_info_tick`` always does).
``position_ticket_differs`` (False, hardened True)
    On hedging accounts a new position's ``ticket`` comes from its own counter and differs
    from its ``identifier`` (the opening order's ticket), as after a broker's service
    re-opening: a close must name the ticket; naming the identifier answers 10036.

Late executions (DOMAIN.md section 3)
-------------------------------------
An ``order_send`` whose outcome the client cannot know may execute long after the call: the
order waits in a dealer's queue, or a terminal sends it again when it reconnects. These
knobs are not part of the hardening presets (both leave them off):

``scripted`` outcomes ``"timeout_late"`` and ``"lost_reply_late"``
    The server accepts the order and answers 10012 (``timeout_late``), or ``order_send``
    returns None with ``last_error()`` -10005 (``lost_reply_late``). Nothing of the order is
    visible (``orders_get``, ``history_orders_get``, ``history_deals_get`` by window or by
    ticket, ``positions_get``) until it executes ``late_execution_seconds`` later, on the
    terminal's clock: then it is a normal market order at the then-current price (ticket,
    deal, order in history, position, the request's magic and the served comment; the deal
    honours ``deal_lag_ms``). The server's checks run again at that moment (without the
    requote check of instant symbols): an order they refuse then (the position it closes is
    gone, no margin) vanishes without a trace; a closed market delays it until the open.
    A waiting order is kept in the ``--state`` file, so it survives a restart of the
    simulator and executes after it once due. The simulator executes due orders at the
    start of any terminal call (``sim-terminal`` makes one every few seconds on its own).
``late_timeout_rate`` / ``late_lost_reply_rate`` (0 / 0)
    Share of ``order_send`` calls drawn as ``timeout_late`` / ``lost_reply_late`` (after the
    classic fault rates, from the same seeded generator).
``late_execution_seconds`` ((10.0, 30.0))
    The (min, max) delay of a late execution, drawn uniformly from the seeded fault
    generator; TOML ``late_execution_seconds = [10.0, 30.0]``.

FIFO and the hedging prohibition are account rules of some brokers only, so the hardened
preset leaves them off; turn them on per test. A symbol's ``refused_fillings`` (ORDER_FILLING_*
values the server answers 10030 although the bitmask advertises them, as some brokers do) is
symbol data, empty on every default symbol.
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
    # ORDER_FILLING_* values answered 10030 although filling_mode advertises them
    refused_fillings: tuple[int, ...] = ()
    exchange_fill_delay_seconds: float = 0.5  # RETURN orders on exchange execution fill after
    trade_stops_level: int = 0  # points: closest SL/TP to the price (symbol_info)
    trade_freeze_level: int = 0  # points: no modification this close to the price

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
    trade_mode: int = api.ACCOUNT_TRADE_MODE_DEMO  # 0 demo, 1 contest, 2 real
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
        "timeout_late",  # 10012, executed late_execution_seconds later, invisible until then
        "lost_reply_late",  # None + last_error (-10005), executed late, invisible until then
        "no_result",  # not executed, None + last_error (-1)
        "ok",  # no fault
    }
)


# Every FaultConfig() (and so every SimConfig()) is a hardened server; False: friendly.
HARDENED_BY_DEFAULT = True

# The friendly value of every server-hardening field (see the module docstring) ...
FRIENDLY: Mapping[str, Any] = {
    "comment_keep_chars": None,
    "comment_replace": None,
    "deal_lag_ms": 0.0,
    "deal_lag_jitter_ms": 0.0,
    "deal_zero_rate": 0.0,
    "query_none_rate": 0.0,
    "dst_clock": False,
    "filling_by_exemode": False,
    "strict_retcodes": False,
    "fifo_close": False,
    "hedging_prohibited": False,
    "algo_off_returns_none": False,
    "float_only_binding": False,
    "symbol_info_needs_select": False,
    "position_ticket_differs": False,
}
# ... and its value on a hardened server: the one place that turns them all on.
HARDENED: Mapping[str, Any] = {
    **FRIENDLY,
    "comment_keep_chars": 16,
    "deal_lag_ms": 200.0,
    "deal_lag_jitter_ms": 400.0,
    "deal_zero_rate": 0.2,
    "query_none_rate": 0.05,
    "dst_clock": True,
    "filling_by_exemode": True,
    "strict_retcodes": True,
    "algo_off_returns_none": True,
    "float_only_binding": True,
    "symbol_info_needs_select": True,
    "position_ticket_differs": True,
}


def _server(name: str) -> Any:
    """A hardening field whose default follows ``HARDENED_BY_DEFAULT`` when instantiated."""
    return field(default_factory=lambda: (HARDENED if HARDENED_BY_DEFAULT else FRIENDLY)[name])


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
    # late executions (module docstring): 10012 / None, executed later, invisible until then
    late_timeout_rate: float = 0.0
    late_lost_reply_rate: float = 0.0
    late_execution_seconds: tuple[float, float] = (10.0, 30.0)  # (min, max), uniform
    # forced outcomes of the next order_send calls, consumed one per call (SCRIPTED_OUTCOMES)
    scripted: tuple[str, ...] = ()
    fault_seed: int | None = None  # default: derived from SimConfig.seed
    # server hardening: see the module docstring; defaults follow HARDENED_BY_DEFAULT
    comment_keep_chars: int | None = _server("comment_keep_chars")
    comment_replace: str | None = _server("comment_replace")
    deal_lag_ms: float = _server("deal_lag_ms")
    deal_lag_jitter_ms: float = _server("deal_lag_jitter_ms")
    deal_zero_rate: float = _server("deal_zero_rate")
    query_none_rate: float = _server("query_none_rate")
    dst_clock: bool = _server("dst_clock")
    clock_shift_seconds: int = 0
    filling_by_exemode: bool = _server("filling_by_exemode")
    strict_retcodes: bool = _server("strict_retcodes")
    fifo_close: bool = _server("fifo_close")
    hedging_prohibited: bool = _server("hedging_prohibited")
    algo_off_returns_none: bool = _server("algo_off_returns_none")
    float_only_binding: bool = _server("float_only_binding")
    symbol_info_needs_select: bool = _server("symbol_info_needs_select")
    position_ticket_differs: bool = _server("position_ticket_differs")

    def __post_init__(self) -> None:
        unknown = set(self.scripted) - SCRIPTED_OUTCOMES
        if unknown:
            raise ValueError(f"unknown scripted outcomes: {sorted(unknown)}")
        if self.comment_keep_chars is not None and self.comment_keep_chars < 0:
            raise ValueError("comment_keep_chars must be >= 0 (None keeps the comment whole)")
        try:
            low, high = (float(value) for value in self.late_execution_seconds)
        except (TypeError, ValueError):
            raise ValueError("late_execution_seconds must be a (min, max) pair") from None
        if not 0.0 <= low <= high:
            raise ValueError("late_execution_seconds must be (min, max) with 0 <= min <= max")
        object.__setattr__(self, "late_execution_seconds", (low, high))  # TOML gives a list

    @classmethod
    def hardened(cls, **changes: Any) -> FaultConfig:
        """Every server hardening on (``HARDENED``), then ``changes``."""
        return cls(**{**HARDENED, **changes})

    @classmethod
    def friendly(cls, **changes: Any) -> FaultConfig:
        """Every server hardening off (``FRIENDLY``), then ``changes``."""
        return cls(**{**FRIENDLY, **changes})

    def served_comment(self, comment: str) -> str:
        """The comment the server keeps on orders, deals and positions."""
        if self.comment_replace is not None:
            comment = self.comment_replace
        if self.comment_keep_chars is not None:
            comment = comment[: self.comment_keep_chars]
        return comment


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

    @classmethod
    def hardened(cls, **changes: Any) -> SimConfig:
        """A configuration whose faults are ``FaultConfig.hardened()`` (unless given)."""
        changes.setdefault("faults", FaultConfig.hardened())
        return cls(**changes)

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
        A broker profile written by ``execution-worker probe`` is replayed instead
        (:mod:`worker.mt5.sim.replay`).
        """
        with Path(path).open("rb") as handle:
            data = tomllib.load(handle)
        from worker.mt5.profile.toml import is_profile, profile_from_mapping

        if is_profile(data):
            from worker.mt5.sim.replay import replay

            return replay(profile_from_mapping(data))
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
            if "refused_fillings" in values:
                values["refused_fillings"] = tuple(values["refused_fillings"])
            if "closed_weekly" in values:
                values["closed_weekly"] = tuple(tuple(pair) for pair in values["closed_weekly"])
            if name in symbols:
                symbols[name] = replace(symbols[name], **values)
            else:
                symbols[name] = SimSymbol(name=name, **values)
        top = _known(cls, data)
        return cls(account=account, faults=faults, symbols=symbols, **top)


_PRESETS = {"hardened": HARDENED, "friendly": FRIENDLY}


def _faults_from(table: Mapping[str, Any]) -> FaultConfig:
    table = dict(table)
    preset = table.pop("preset", None)
    if preset is not None and preset not in _PRESETS:
        raise ValueError(f"unknown faults preset {preset!r} (expected one of {sorted(_PRESETS)})")
    values = {**(_PRESETS[preset] if preset else {}), **_known(FaultConfig, table)}
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
