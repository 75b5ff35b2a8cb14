"""The whole probe on an open terminal: reads, leftovers, round trips, the profile."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from worker.mt5 import api
from worker.mt5.profile.model import (
    FILLING_CODES,
    AccountProfile,
    BrokerProfile,
    ClockProfile,
    ProbeRun,
)
from worker.mt5.profile.use import worker_fillings
from worker.tools.probe.behaviour import summarise
from worker.tools.probe.leftovers import close_leftovers
from worker.tools.probe.magic import new_run
from worker.tools.probe.naming import Naming, propose
from worker.tools.probe.queries import Queries
from worker.tools.probe.reads import SymbolRead, broker_names, read_account, read_clock, read_symbol
from worker.tools.probe.safety import may_trade
from worker.tools.probe.trades import RoundTrip, Trader

DEFAULT_CANONICALS = ("EURUSD", "GBPUSD", "USDJPY", "XAUUSD")


@dataclass(frozen=True)
class ProbeOptions:
    canonicals: Sequence[str] = DEFAULT_CANONICALS
    round_trips: int = 10
    trade_symbol: str | None = None  # a canonical or broker name; default: the first open
    reads_only: bool = False
    allow_real: bool = False
    confirm: Callable[[str], str] | None = None
    backend: Literal["sim", "native", "bridge"] = "sim"
    account_alias: str | None = None
    wait_seconds: float = 10.0
    clock_samples: int = 5
    clock_pause_seconds: float = 0.3


@dataclass(frozen=True)
class ProbeResult:
    profile: BrokerProfile
    naming: Naming


def _clock(
    terminal: api.Terminal, naming: Naming, options: ProbeOptions, utc: Callable[[], float]
) -> ClockProfile | None:
    for canonical in options.canonicals:
        name = naming.symbol_map.get(canonical)
        if name is None:
            continue
        terminal.symbol_select(name, True)
        found = read_clock(
            terminal,
            name,
            utc,
            samples=options.clock_samples,
            pause=options.clock_pause_seconds,
        )
        if found is not None:
            return found
    return None


def _why_not(account: AccountProfile) -> str | None:
    if not account.terminal_trade_allowed:
        return "the terminal's Algo Trading is off"
    if not account.account_trade_allowed:
        return "trading is disabled on the account"
    if not account.expert_trade_allowed:
        return "expert (API) trading is disabled on the account"
    return None


def _trade_symbol(
    reads: dict[str, SymbolRead], options: ProbeOptions, busy: set[str]
) -> SymbolRead | None:
    """The first open, fully tradable symbol (``busy``: never one holding a position of
    someone else on a netting account: a probe order would change it)."""
    wanted = options.trade_symbol
    for name, read in reads.items():
        if wanted is not None and wanted not in (name, read.profile.canonical):
            continue
        if name in busy:
            continue
        if read.profile.market_open and read.profile.trade_mode == "full":
            return read
    return None


def _filling(read: SymbolRead) -> int:
    accepted = read.profile.filling_modes_accepted
    rule = worker_fillings(read.info.trade_exemode, read.info.filling_mode)
    if accepted:
        preferred = [m for m in rule if m in {FILLING_CODES[a] for a in accepted}]
        return preferred[0] if preferred else FILLING_CODES[accepted[0]]
    return rule[0] if rule else api.ORDER_FILLING_FOK


def probe(
    terminal: api.Terminal,
    options: ProbeOptions,
    *,
    utc_clock: Callable[[], float] = time.time,
) -> ProbeResult:
    """Measure the account behind ``terminal``. Raises RealAccountRefused before any order
    on a real account without confirmation; closes whatever it opened (or an earlier run
    left) before it returns or raises."""
    started = utc_clock()
    account = read_account(terminal)
    naming = propose(list(options.canonicals), broker_names(terminal))
    clock = _clock(terminal, naming, options, utc_clock)
    offset_ms = clock.server_utc_offset_seconds * 1000 if clock else None
    reads: dict[str, SymbolRead] = {}
    for canonical, name in naming.symbol_map.items():
        server_now = int(utc_clock() * 1000) + offset_ms if offset_ms is not None else None
        read = read_symbol(terminal, name, canonical, server_now)
        if read is not None:
            reads[name] = read
    trips: list[RoundTrip] = []
    queries = Queries(terminal)
    skipped: str | None = None
    leftovers = 0
    chosen: SymbolRead | None = None
    if options.reads_only or options.round_trips <= 0:
        skipped = "--reads-only" if options.reads_only else "--round-trips 0"
    else:
        may_trade(account, allow_real=options.allow_real, confirm=options.confirm)
        leftovers = close_leftovers(terminal, queries, wait_seconds=options.wait_seconds)
        busy: set[str] = set()
        if account.margin_mode != "hedging":
            busy = {position.symbol for position in queries.positions()}
        chosen = _trade_symbol(reads, options, busy)
        skipped = _why_not(account) or (
            None if chosen else "no open symbol without a position of someone else"
        )
    if skipped is None and chosen is not None:
        trader = Trader(
            terminal,
            queries,
            chosen.info,
            _filling(chosen),
            hedging=account.margin_mode == "hedging",
            run=new_run(),
            wait_seconds=options.wait_seconds,
        )
        try:
            for sequence in range(options.round_trips):
                trips.append(trader.round_trip(sequence))
        finally:
            close_leftovers(terminal, queries, wait_seconds=options.wait_seconds)
    run = ProbeRun(
        measured_at_utc=datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        backend=options.backend,
        account_alias=options.account_alias,
        trade_symbol=chosen.info.name if chosen and trips else None,
        round_trips=len(trips),
        trades_skipped_reason=skipped,
        leftovers_closed=leftovers,
    )
    profile = BrokerProfile(
        probe=run,
        account=account,
        clock=clock,
        symbol_prefix=naming.prefix,
        symbol_suffix=naming.suffix,
        symbol_map=dict(naming.symbol_map),
        symbols={name: read.profile for name, read in reads.items()},
        behaviour=summarise(trips, queries.asked, queries.none) if trips else None,
    )
    return ProbeResult(profile, naming)
