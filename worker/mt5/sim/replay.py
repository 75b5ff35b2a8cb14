"""Replay a broker profile: a :class:`SimConfig` whose server behaves as the probe found.

Every profile field maps onto a switch the simulator already has (``FaultConfig``,
``SimAccount``, ``SimSymbol``); nothing here adds a parallel one:

==================================  ===================================================
profile                             simulator
==================================  ===================================================
``account.*``                       ``SimAccount`` (login, server, trade and margin mode,
                                    leverage, trade switches), ``terminal_trade_allowed``
``account.fifo_close``              ``faults.fifo_close``
``clock.server_timezone``           ``server_utc_offset_seconds`` + ``faults.dst_clock``
                                    (the simulator follows US DST only: an EU rule is
                                    replayed as its standard offset, and noted)
``symbol_prefix/suffix``, ``map``   the default symbols renamed to the broker's names
``symbols.NAME.*``                  that symbol's modes, volumes, levels, filling flags;
                                    ``filling_modes_accepted`` -> ``faults.filling_by_exemode``
                                    and the symbol's ``refused_fillings``
``behaviour.comment_*``             ``faults.comment_keep_chars`` / ``comment_replace``
``behaviour.deal_lag_ms_*``         ``faults.deal_lag_ms`` = min, ``deal_lag_jitter_ms`` =
                                    2 x (p50 - min) (a uniform spread with that median)
``behaviour.deal_zero_rate``        ``faults.deal_zero_rate``
``behaviour.history_none_rate``     ``faults.query_none_rate``
``behaviour.position_ticket_...``   ``faults.position_ticket_differs``
==================================  ===================================================

Switches the probe does not measure (strict retcodes, the float-only binding, Algo Trading
off -> None, symbol_info before symbol_select...) keep the base configuration's values
(hardened by default). :func:`replay_notes` lists what could not be replayed exactly.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from worker.mt5 import api
from worker.mt5.profile.model import (
    EXECUTION_MODES,
    FILLING_CODES,
    MARGIN_MODES,
    SYMBOL_TRADE_MODES,
    TRADE_MODES,
    BrokerProfile,
    SymbolProfile,
)
from worker.mt5.sim.config import SimAccount, SimConfig, SimSymbol
from worker.mt5.sim.rules import allowed_fillings

_HOUR_SECONDS = 3600


def _code(table: dict[int, Any], name: str) -> int:
    return next(code for code, value in table.items() if value == name)


def _parse_rule(rule: str) -> tuple[int, str | None]:
    """(standard offset in seconds, "US"/"EU"/None) of a SERVER_TIMEZONE rule."""
    from worker.mt5.gateway.clock import parse_timezone

    parsed = parse_timezone(rule)
    return parsed.standard_ms // 1000, parsed.dst


def _account(profile: BrokerProfile, base: SimAccount) -> SimAccount:
    account = profile.account
    return replace(
        base,
        login=account.login,
        server=account.server,
        company=account.company or base.company,
        currency=account.currency or base.currency,
        leverage=account.leverage or base.leverage,
        margin_mode=_code(MARGIN_MODES, account.margin_mode),
        trade_mode=_code(TRADE_MODES, account.trade_mode),
        trade_allowed=account.account_trade_allowed,
        trade_expert=account.expert_trade_allowed,
    )


def _broker_name(profile: BrokerProfile, canonical: str) -> str:
    mapped = profile.symbol_map.get(canonical)
    return mapped or f"{profile.symbol_prefix}{canonical}{profile.symbol_suffix}"


def _symbol(template: SimSymbol, name: str, spec: SymbolProfile | None) -> SimSymbol:
    symbol = replace(template, name=name)
    if spec is None:
        return symbol
    return replace(
        symbol,
        digits=spec.digits,
        contract_size=spec.contract_size_units,
        volume_min=spec.volume_min_lots,
        volume_max=spec.volume_max_lots,
        volume_step=spec.volume_step_lots,
        trade_mode=_code(SYMBOL_TRADE_MODES, spec.trade_mode),
        trade_exemode=_code(EXECUTION_MODES, spec.execution_mode),
        filling_mode=spec.filling_mode_flags,
        trade_stops_level=spec.stops_level_points,
        trade_freeze_level=spec.freeze_level_points,
    )


def _accepted(spec: SymbolProfile) -> set[int] | None:
    if spec.filling_modes_accepted is None:
        return None
    return {FILLING_CODES[name] for name in spec.filling_modes_accepted}


def _by_exemode(symbols: dict[str, SimSymbol], profile: BrokerProfile, default: bool) -> bool:
    """Whether the accepted modes are the hardened rule's (FOK only on request/instant)."""
    votes = []
    for name, spec in profile.symbols.items():
        accepted, symbol = _accepted(spec), symbols.get(name)
        if (
            accepted is None
            or symbol is None
            or symbol.trade_exemode
            not in (
                api.SYMBOL_TRADE_EXECUTION_REQUEST,
                api.SYMBOL_TRADE_EXECUTION_INSTANT,
            )
        ):
            continue
        votes.append(set(allowed_fillings(symbol, by_exemode=True)) >= accepted)
    return all(votes) if votes else default


def _refusals(symbols: dict[str, SimSymbol], profile: BrokerProfile, by_exemode: bool) -> None:
    for name, spec in profile.symbols.items():
        accepted, symbol = _accepted(spec), symbols.get(name)
        if accepted is None or symbol is None:
            continue
        allowed = set(allowed_fillings(symbol, by_exemode=by_exemode))
        symbols[name] = replace(symbol, refused_fillings=tuple(sorted(allowed - accepted)))


def _faults(profile: BrokerProfile, by_exemode: bool) -> dict[str, Any]:
    changes: dict[str, Any] = {
        "fifo_close": profile.account.fifo_close,
        "filling_by_exemode": by_exemode,
    }
    if profile.clock is not None:
        changes["dst_clock"] = _parse_rule(profile.clock.server_timezone)[1] is not None
        changes["clock_shift_seconds"] = 0
    behaviour = profile.behaviour
    if behaviour is None:
        return changes
    kept = behaviour.comment_chars_kept
    if behaviour.comment_rewritten_to is not None:
        changes.update(comment_replace=behaviour.comment_rewritten_to, comment_keep_chars=None)
    elif kept == 0:
        changes.update(comment_replace="", comment_keep_chars=None)
    else:
        whole = kept >= behaviour.comment_sent_chars
        changes.update(comment_replace=None, comment_keep_chars=None if whole else kept)
    low = behaviour.deal_lag_ms_min
    changes.update(
        deal_lag_ms=round(low, 1),
        deal_lag_jitter_ms=round(max(0.0, 2 * (behaviour.deal_lag_ms_p50 - low)), 1),
        deal_zero_rate=behaviour.deal_zero_rate,
        query_none_rate=behaviour.history_none_rate,
    )
    if behaviour.position_ticket_differs is not None:
        changes["position_ticket_differs"] = behaviour.position_ticket_differs
    return changes


def replay(profile: BrokerProfile, base: SimConfig | None = None) -> SimConfig:
    """``base`` (default: a hardened ``SimConfig()``) behaving as ``profile`` says."""
    base = base or SimConfig()
    by_canonical = {
        spec.canonical: name for name, spec in profile.symbols.items() if spec.canonical
    }
    symbols: dict[str, SimSymbol] = {}
    for canonical, template in base.symbols.items():
        name = by_canonical.get(canonical) or _broker_name(profile, canonical)
        symbols[name] = _symbol(template, name, profile.symbols.get(name))
    by_exemode = _by_exemode(symbols, profile, base.faults.filling_by_exemode)
    _refusals(symbols, profile, by_exemode)
    offset = base.server_utc_offset_seconds
    if profile.clock is not None:
        offset = _parse_rule(profile.clock.server_timezone)[0]
    faults = replace(base.faults, **_faults(profile, by_exemode))
    return replace(
        base,
        account=_account(profile, base.account),
        terminal_trade_allowed=profile.account.terminal_trade_allowed,
        symbols=symbols,
        server_utc_offset_seconds=offset,
        faults=faults,
    )


def replay_notes(profile: BrokerProfile, base: SimConfig | None = None) -> list[str]:
    """What the replay cannot reproduce exactly (one line each)."""
    base = base or SimConfig()
    notes: list[str] = []
    if profile.clock is not None and _parse_rule(profile.clock.server_timezone)[1] == "EU":
        notes.append(
            f"clock {profile.clock.server_timezone}: the simulator switches with US DST only"
        )
    templates = set(base.symbols)
    for name, spec in sorted(profile.symbols.items()):
        if (spec.canonical or name) not in templates:
            notes.append(f"symbol {name}: no simulated market for it (no template)")
    if profile.behaviour is not None and profile.behaviour.comment_chars_kept_deals != (
        profile.behaviour.comment_chars_kept_orders
    ):
        notes.append("comments: kept differently on orders and deals; replayed with the fewest")
    return notes
