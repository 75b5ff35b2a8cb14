"""What the probe reads without trading: terminal, account, symbols, server clock."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.mt5 import api
from worker.mt5.profile.model import (
    EXECUTION_MODES,
    FILLINGS,
    MARGIN_MODES,
    SYMBOL_TRADE_MODES,
    TRADE_MODES,
    AccountProfile,
    ClockProfile,
    FillingName,
    SymbolProfile,
)
from worker.mt5.profile.use import worker_fillings
from worker.tools.probe import clock
from worker.tools.probe.orders import market_request
from worker.tools.probe.queries import ProbeQueryFailed

FRESH_TICK_SECONDS = 60.0
CLOCK_SAMPLES = 5
CLOCK_PAUSE_SECONDS = 0.3


@dataclass(frozen=True)
class SymbolRead:
    profile: SymbolProfile
    info: api.SymbolInfo
    tick: api.Tick | None


def _required(terminal: api.Terminal, name: str, value: object) -> None:
    if value is None:
        code, message = terminal.last_error()
        raise ProbeQueryFailed(f"{name} failed: {code} {message}")


def read_account(terminal: api.Terminal) -> AccountProfile:
    info = terminal.terminal_info()
    _required(terminal, "terminal_info", info)
    account = terminal.account_info()
    _required(terminal, "account_info", account)
    assert info is not None and account is not None
    return AccountProfile(
        server=account.server,
        login=account.login,
        company=account.company,
        currency=account.currency,
        trade_mode=TRADE_MODES.get(account.trade_mode, "real"),  # unknown: the careful answer
        margin_mode=MARGIN_MODES.get(account.margin_mode, "netting"),
        leverage=account.leverage,
        fifo_close=bool(account.fifo_close),
        terminal_trade_allowed=bool(info.trade_allowed) and not info.tradeapi_disabled,
        account_trade_allowed=bool(account.trade_allowed),
        expert_trade_allowed=bool(account.trade_expert),
        terminal_build=info.build,
    )


def _accepted_fillings(
    terminal: api.Terminal, info: api.SymbolInfo, tick: api.Tick
) -> list[FillingName] | None:
    """Filling modes ``order_check`` accepts for a minimum buy (None: it told nothing)."""
    accepted: list[FillingName] = []
    conclusive = False
    for code, name in FILLINGS.items():
        request = market_request(
            info.name, info.volume_min, buy=True, price=tick.ask, magic=0, comment="", filling=code
        )
        check = terminal.order_check(request)
        if check is None:
            continue
        if check.retcode in (0, api.TRADE_RETCODE_DONE):
            accepted.append(name)
            conclusive = True
        elif check.retcode == api.TRADE_RETCODE_INVALID_FILL:
            conclusive = True
    return accepted if conclusive else None


def read_symbol(
    terminal: api.Terminal, name: str, canonical: str | None, server_now_ms: int | None
) -> SymbolRead | None:
    """``server_now_ms`` None (the server clock is unknown): no tick is proven fresh."""
    terminal.symbol_select(name, True)
    info = terminal.symbol_info(name)
    if info is None:
        return None
    tick = terminal.symbol_info_tick(name)
    age: float | None = None
    if tick is not None and tick.time_msc and server_now_ms is not None:
        age = max(0.0, (server_now_ms - tick.time_msc) / 1000.0)
    tradable = info.trade_mode != api.SYMBOL_TRADE_MODE_DISABLED
    market_open = tradable and age is not None and age < FRESH_TICK_SECONDS
    accepted = _accepted_fillings(terminal, info, tick) if market_open and tick else None
    rule = worker_fillings(info.trade_exemode, info.filling_mode)
    profile = SymbolProfile(
        canonical=canonical,
        trade_mode=SYMBOL_TRADE_MODES.get(info.trade_mode, "disabled"),
        execution_mode=EXECUTION_MODES.get(info.trade_exemode, "market"),
        filling_mode_flags=info.filling_mode,
        filling_modes_allowed=[FILLINGS[code] for code in rule],
        filling_modes_accepted=accepted,
        digits=info.digits,
        contract_size_units=info.trade_contract_size,
        volume_min_lots=info.volume_min,
        volume_max_lots=info.volume_max,
        volume_step_lots=info.volume_step,
        stops_level_points=info.trade_stops_level,
        freeze_level_points=info.trade_freeze_level,
        market_open=market_open,
        tick_age_seconds=None if age is None else round(age, 3),
    )
    return SymbolRead(profile, info, tick)


def read_clock(
    terminal: api.Terminal,
    symbol: str,
    utc_clock: Callable[[], float],
    *,
    samples: int = CLOCK_SAMPLES,
    pause: float = CLOCK_PAUSE_SECONDS,
) -> ClockProfile | None:
    """The offset from ticks that moved while read (proven fresh), and its implied rule."""
    seen: list[tuple[int, int]] = []
    last: int | None = None
    for index in range(samples):
        if index:
            time.sleep(pause)
        tick = terminal.symbol_info_tick(symbol)
        utc_ms = int(utc_clock() * 1000)
        if tick is None or not tick.time_msc:
            continue
        if last is not None and tick.time_msc != last:
            seen.append((tick.time_msc, utc_ms))
        last = tick.time_msc
    offset = clock.offset_seconds(seen)
    if offset is None:
        return None
    rule, basis = clock.implied_rule(offset, utc_clock())
    return ClockProfile(
        server_utc_offset_seconds=offset,
        server_timezone=rule,
        rule_basis=basis,
        measured_from_symbol=symbol,
        tick_samples=len(seen),
    )


def broker_names(terminal: api.Terminal) -> Sequence[str]:
    symbols = terminal.symbols_get()
    _required(terminal, "symbols_get", symbols)
    assert symbols is not None
    return [symbol.name for symbol in symbols]
