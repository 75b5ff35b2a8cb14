"""What the worker takes from a broker profile, and what makes it refuse to start.

Per account (``BROKER_PROFILE``, or ``broker_profile`` on the account's sessions in the
sessions file) the worker reads:

- the server clock rule: used as ``SERVER_TIMEZONE`` for that account's sessions when
  neither ``SERVER_TIMEZONE`` nor ``SERVER_UTC_OFFSET_SECONDS`` is set;
- the symbol mapping: canonical names ``[symbol_map]`` does not set are mapped as the
  profile proposes;
- the filling modes: the worker's choice for each profiled symbol (DOMAIN.md 2, by
  execution mode) must be one the server accepted (``order_check``), else it would pay a
  10030 on every order or never fill.

It refuses to start (``ConfigError``) when a profile contradicts its settings: a
configured server clock that disagrees with the measured offset, a ``[symbol_map]`` entry
naming another broker symbol than the profile found, a worker filling order no accepted
mode is in, or two accounts' profiles that map one canonical name to different broker
symbols (the mapping is one table for all). (A ``MAGIC`` equal to the probe's reserved tag
is refused by the settings themselves, profile or not.)
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from worker.config import ConfigError, Settings
from worker.mt5 import api
from worker.mt5.gateway.clock import TimezoneRule, parse_timezone
from worker.mt5.gateway.filling import filling_modes
from worker.mt5.gateway.model import SymbolSpec
from worker.mt5.profile.model import EXECUTION_MODES, FILLING_CODES, FILLINGS, BrokerProfile
from worker.mt5.profile.toml import ProfileError, load_profile

_EXEMODE_CODES = {name: code for code, name in EXECUTION_MODES.items()}


def worker_fillings(execution_mode: int, filling_flags: int) -> tuple[int, ...]:
    """The filling modes the worker would send for a market order, preferred first."""
    spec = SymbolSpec(
        name="",
        digits=5,
        point=1e-5,
        pip=1e-4,
        contract_size=1.0,
        volume_min=0.01,
        volume_max=1.0,
        volume_step=0.01,
        trade_mode=api.SYMBOL_TRADE_MODE_FULL,
        trade_exemode=execution_mode,
        filling_mode=filling_flags,
    )
    return filling_modes(spec)


@dataclass(frozen=True)
class AccountProfiles:
    """The profiles of a worker's accounts, checked against its settings."""

    by_account: Mapping[str | None, BrokerProfile] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def timezone_for(self, account: str | None) -> TimezoneRule | None:
        profile = self.by_account.get(account)
        if profile is None or profile.clock is None:
            return None
        return parse_timezone(profile.clock.server_timezone)

    def symbol_map(self, settings: Settings) -> dict[str, str]:
        """``settings.symbol_map`` completed with the profiles' proposals."""
        merged: dict[str, str] = {}
        for profile in self.by_account.values():
            merged.update(profile.symbol_map)
        merged.update(settings.symbol_map)
        return merged


def _configured_offset(settings: Settings, at: float) -> int | None:
    if settings.server_timezone is not None:
        return parse_timezone(settings.server_timezone).offset_ms_at(at) // 1000
    return settings.server_utc_offset_seconds


def _check_clock(settings: Settings, profile: BrokerProfile, where: str) -> None:
    """The configured clock must give the measured offset on the probe's date, and agree
    with the profile's rule today."""
    if profile.clock is None:
        return
    measured_at = datetime.fromisoformat(profile.probe.measured_at_utc).timestamp()
    rule = parse_timezone(profile.clock.server_timezone)
    now = time.time()
    pairs = (
        (measured_at, profile.clock.server_utc_offset_seconds, "measured"),
        (now, rule.offset_ms_at(now) // 1000, "its rule gives today"),
    )
    for at, profile_offset, what in pairs:
        configured = _configured_offset(settings, at)
        if configured is not None and configured != profile_offset:
            raise ConfigError(
                f"{where}: the server clock is configured at {configured:+d} s from UTC, but "
                f"the broker profile ({profile.clock.server_timezone}) {what} "
                f"{profile_offset:+d} s; fix SERVER_TIMEZONE / SERVER_UTC_OFFSET_SECONDS or "
                "probe again"
            )


def _check_symbols(settings: Settings, profile: BrokerProfile, where: str) -> list[str]:
    warnings: list[str] = []
    for canonical, broker in settings.symbol_map.items():
        found = profile.symbol_map.get(canonical)
        if found is not None and found != broker:
            raise ConfigError(
                f"{where}: [symbol_map] maps {canonical} to {broker}, but the broker profile "
                f"found {found}"
            )
        if profile.symbols and broker not in profile.symbols and found is None:
            warnings.append(f"{where}: {canonical} -> {broker} was not probed")
    for name, spec in profile.symbols.items():
        if spec.filling_modes_accepted is None:
            continue
        accepted = {FILLING_CODES[mode] for mode in spec.filling_modes_accepted}
        ours = worker_fillings(_EXEMODE_CODES[spec.execution_mode], spec.filling_mode_flags)
        if not ours:
            continue
        if not accepted & set(ours):
            raise ConfigError(
                f"{where}: {name}: the worker would send "
                f"{'/'.join(FILLINGS[m] for m in ours)} but the server accepted "
                f"{'/'.join(spec.filling_modes_accepted) or 'no filling mode'}"
            )
        if ours[0] not in accepted:
            warnings.append(
                f"{where}: {name}: {FILLINGS[ours[0]]} is refused (10030): each order falls "
                "back once to the next mode"
            )
    return warnings


def check_profiles(
    settings: Settings, paths: Mapping[str | None, str], accounts: Sequence[str | None]
) -> AccountProfiles:
    """Load and check the profiles named per account. Raises ConfigError."""
    loaded: dict[str | None, BrokerProfile] = {}
    warnings: list[str] = []
    owners: dict[str, tuple[str, str | None]] = {}
    for account in accounts:
        path = paths.get(account)
        if path is None:
            continue
        where = f"BROKER_PROFILE {path}" + (f" (account {account})" if account else "")
        try:
            profile = load_profile(path)
        except ProfileError as exc:
            raise ConfigError(f"BROKER_PROFILE: {exc}") from None
        _check_clock(settings, profile, where)
        warnings += _check_symbols(settings, profile, where)
        for canonical, broker in profile.symbol_map.items():
            if canonical in settings.symbol_map:
                continue
            other = owners.setdefault(canonical, (broker, account))
            if other[0] != broker:
                raise ConfigError(
                    f"{where}: maps {canonical} to {broker} but account {other[1]}'s profile "
                    f"to {other[0]}; set {canonical} in [symbol_map]"
                )
        loaded[account] = profile
    return AccountProfiles(loaded, tuple(warnings))
