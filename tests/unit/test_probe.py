"""The broker probe's pure parts, its profile file and what the worker takes from it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from worker.config import ConfigError, Settings
from worker.mt5 import api
from worker.mt5.profile.model import AccountProfile, BehaviourProfile, BrokerProfile, ProbeRun
from worker.mt5.profile.toml import dumps_profile, load_profile, loads_profile, write_profile
from worker.mt5.profile.use import check_profiles
from worker.mt5.sessions import SessionSpec, broker_profiles
from worker.mt5.sim.config import SimConfig
from worker.mt5.sim.replay import replay
from worker.tools.probe import clock, naming
from worker.tools.probe.magic import is_probe_magic, probe_comment, probe_magic
from worker.tools.probe.queries import Queries
from worker.tools.probe.safety import RealAccountRefused, may_trade
from worker.tools.probe.stats import comment_kept, percentile

WINTER = datetime(2026, 1, 13, 10, tzinfo=UTC).timestamp()
SUMMER = datetime(2026, 7, 14, 10, tzinfo=UTC).timestamp()


def test_percentiles_and_comment_cuts() -> None:
    assert percentile([], 0.5) == 0.0
    assert percentile([10.0, 30.0, 20.0], 0.5) == 20.0
    assert percentile([0.0, 100.0], 0.9) == pytest.approx(90.0)
    sent = "xprobe0123456789000abcdefz"
    assert comment_kept(sent, sent[:16]) == (16, None)
    assert comment_kept(sent, sent) == (26, None)
    assert comment_kept(sent, "") == (0, None)
    assert comment_kept(sent, "desk order") == (0, "desk order")


@pytest.mark.parametrize(
    ("offset_hours", "at", "rule"),
    [
        (2, WINTER, "GMT+2/US-DST"),
        (3, SUMMER, "GMT+2/US-DST"),
        (2, SUMMER, "UTC+2"),  # +2 in US summer is no FX convention: fixed
        (0, WINTER, "UTC"),
        (5.5, WINTER, "UTC+5:30"),
        (-3, WINTER, "UTC-3"),
    ],
)
def test_the_clock_rule_one_measurement_implies(offset_hours: float, at: float, rule: str) -> None:
    assert clock.implied_rule(int(offset_hours * 3600), at)[0] == rule


def test_the_offset_is_the_largest_quarter_hour_estimate() -> None:
    utc = 1_700_000_000_000
    stale = (utc + 7200_000 - 40 * 60_000, utc)  # 40 minutes old: reads as +1:15
    fresh = (utc + 7200_000 + 300, utc)
    assert clock.offset_seconds([stale, fresh]) == 7200
    assert clock.offset_seconds([]) is None


@pytest.mark.parametrize(
    ("names", "mapping", "prefix", "suffix"),
    [
        (["EURUSD.a", "GBPUSD.a", "XAUUSD.a", "EURUSD.b"], {"EURUSD": "EURUSD.a"}, "", ".a"),
        (["EURUSDm", "GBPUSDm", "EURUSDT"], {"EURUSD": "EURUSDm"}, "", "m"),
        (["#EURUSD", "#GBPUSD"], {"EURUSD": "#EURUSD"}, "#", ""),
        (["EURUSD", "EURUSD.pro"], {"EURUSD": "EURUSD"}, "", ""),
        (["EURUSDT", "XEURUSD"], {}, "", ""),  # upper-case affixes are other instruments
    ],
)
def test_the_proposed_symbol_mapping(
    names: list[str], mapping: dict[str, str], prefix: str, suffix: str
) -> None:
    found = naming.propose(["EURUSD"], names)
    assert found.symbol_map == mapping
    assert (found.prefix, found.suffix) == (prefix, suffix)
    assert found.missing == (() if mapping else ("EURUSD",))


def test_two_equally_likely_names_are_reported_not_guessed_silently() -> None:
    found = naming.propose(["EURUSD"], ["EURUSD.a", "EURUSD.b"])
    assert found.ambiguous == {"EURUSD": ("EURUSD.a", "EURUSD.b")}


def test_probe_magics_are_63_bit_in_their_own_range_and_comments_fill_26() -> None:
    magic = probe_magic(run=12345, sequence=7)
    assert magic >= 1 << 62 and magic < 1 << 63
    assert is_probe_magic(magic) and not is_probe_magic(26112501 << 38 | 5)
    assert len(probe_comment(12345, 7)) == 26


class _Flaky:
    """A terminal whose positions_get answers None every other call."""

    def __init__(self) -> None:
        self.calls = 0

    def positions_get(self, **_: Any) -> tuple[api.TradePosition, ...] | None:
        self.calls += 1
        return None if self.calls % 2 else ()

    def last_error(self) -> tuple[int, str]:
        return (-10005, "timeout")


def test_queries_ask_again_on_none_and_count_it() -> None:
    queries = Queries(_Flaky())  # type: ignore[arg-type]
    assert queries.positions() == ()
    assert queries.positions() == ()
    assert (queries.asked, queries.none) == (4, 2)


def _account(**changes: Any) -> AccountProfile:
    values: dict[str, Any] = dict(
        server="Broker-Demo", login=51234, trade_mode="demo", margin_mode="hedging",
        terminal_trade_allowed=True, account_trade_allowed=True, expert_trade_allowed=True,
    )  # fmt: skip
    values.update(changes)
    return AccountProfile(**values)


def test_a_real_account_needs_allow_real_and_its_number_typed() -> None:
    real = _account(trade_mode="real")
    with pytest.raises(RealAccountRefused, match="REAL"):
        may_trade(real, allow_real=False, confirm=lambda _: "51234")
    with pytest.raises(RealAccountRefused, match="not confirmed"):
        may_trade(real, allow_real=True, confirm=lambda _: "yes")
    may_trade(real, allow_real=True, confirm=lambda _: " 51234\n")
    may_trade(_account(trade_mode="contest"), allow_real=False, confirm=None)


def _behaviour(**changes: Any) -> BehaviourProfile:
    values: dict[str, Any] = dict(
        comment_sent_chars=26, comment_chars_kept=16, comment_chars_kept_orders=16,
        comment_chars_kept_deals=16, magic_63_bit_kept=True, replies=20,
        reply_latency_ms_p50=1.0, reply_latency_ms_p95=2.0, deal_zero_replies=4,
        deal_zero_rate=0.2, deal_lag_samples=20, deal_lag_ms_min=200.0, deal_lag_ms_p50=400.0,
        deal_lag_ms_p90=560.0, deal_lag_ms_max=600.0, history_order_lag_ms_p50=0.1,
        history_order_lag_ms_max=0.5, history_queries=100, history_none_rate=0.05,
        position_ticket_differs=True,
    )  # fmt: skip
    values.update(changes)
    return BehaviourProfile(**values)


def _profile(**changes: Any) -> BrokerProfile:
    from worker.mt5.profile.model import ClockProfile, SymbolProfile

    values: dict[str, Any] = dict(
        probe=ProbeRun(measured_at_utc="2026-07-14T10:00:00+00:00", backend="bridge",
                       trade_symbol="EURUSD.a", round_trips=10),
        account=_account(),
        clock=ClockProfile(server_utc_offset_seconds=10800, server_timezone="GMT+2/US-DST",
                           rule_basis="fits", measured_from_symbol="EURUSD.a", tick_samples=4),
        symbol_suffix=".a",
        symbol_map={"EURUSD": "EURUSD.a", "GBPUSD": "GBPUSD.a"},
        symbols={
            "GBPUSD.a": SymbolProfile(
                canonical="GBPUSD", trade_mode="full", execution_mode="instant",
                filling_mode_flags=2, filling_modes_allowed=["FOK", "IOC"],
                filling_modes_accepted=["FOK"], digits=5, contract_size_units=100000.0,
                volume_min_lots=0.01, volume_max_lots=50.0, volume_step_lots=0.01,
                stops_level_points=10, freeze_level_points=5, market_open=True,
            ),
        },
        behaviour=_behaviour(),
    )  # fmt: skip
    values.update(changes)
    return BrokerProfile(**values)


def test_the_profile_file_documents_itself_and_reads_back_equal() -> None:
    profile = _profile()
    text = dumps_profile(profile)
    assert "# reply -> deal visible in history, median\ndeal_lag_ms_p50 = 400.0" in text
    assert '[symbols."GBPUSD.a"]' in text
    assert loads_profile(text) == profile
    with pytest.raises(ValueError, match=r"behaviour\.deal_lag_ms_p50"):
        loads_profile(text.replace("deal_lag_ms_p50 = 400.0", 'deal_lag_ms_p50 = "slow"'))


@pytest.mark.parametrize(
    ("behaviour", "keep", "replace_with"),
    [
        ({}, 16, None),
        ({"comment_chars_kept": 26}, None, None),
        ({"comment_chars_kept": 0}, None, ""),
        ({"comment_chars_kept": 0, "comment_rewritten_to": "desk"}, None, "desk"),
    ],
)
def test_replay_maps_the_profile_onto_the_simulators_switches(
    behaviour: dict[str, Any], keep: int | None, replace_with: str | None
) -> None:
    config = replay(_profile(behaviour=_behaviour(**behaviour)))
    faults = config.faults
    assert (faults.comment_keep_chars, faults.comment_replace) == (keep, replace_with)
    assert (faults.deal_lag_ms, faults.deal_lag_jitter_ms) == (200.0, 400.0)  # median 400
    assert (faults.deal_zero_rate, faults.query_none_rate) == (0.2, 0.05)
    assert faults.dst_clock and config.server_utc_offset_seconds == 7200
    assert faults.filling_by_exemode and faults.position_ticket_differs
    assert "EURUSD.a" in config.symbols and "EURUSD" not in config.symbols
    assert "XAUUSD.a" in config.symbols  # unprobed symbols follow the suffix
    gbp = config.symbols["GBPUSD.a"]
    assert (gbp.trade_stops_level, gbp.trade_freeze_level, gbp.refused_fillings) == (10, 5, ())
    assert config.account.login == 51234


def test_a_profile_is_a_simulator_configuration_file(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    write_profile(_profile(), path)
    assert load_profile(path) == _profile()
    config = SimConfig.from_toml(path)  # SIM_CONFIG and sim-terminal --config take it too
    assert config.faults.comment_keep_chars == 16 and "GBPUSD.a" in config.symbols


def _settings(**values: Any) -> Settings:
    return Settings.model_validate(values)


def _check(tmp_path: Path, settings: Settings, profile: BrokerProfile) -> Any:
    path = tmp_path / "p.toml"
    write_profile(profile, path)
    return check_profiles(settings, {None: str(path)}, [None])


def test_the_worker_takes_the_clock_rule_and_mapping_from_the_profile(tmp_path: Path) -> None:
    profiles = _check(tmp_path, _settings(symbol_map={"XAUUSD": "GOLD"}), _profile())
    assert profiles.timezone_for(None) is not None
    assert profiles.timezone_for(None).dst == "US"
    merged = profiles.symbol_map(_settings(symbol_map={"XAUUSD": "GOLD"}))
    assert merged == {"EURUSD": "EURUSD.a", "GBPUSD": "GBPUSD.a", "XAUUSD": "GOLD"}


@pytest.mark.parametrize(
    ("settings", "profile_changes", "message"),
    [
        ({"server_timezone": "UTC+2"}, {}, "server clock is configured"),
        ({"server_utc_offset_seconds": 7200}, {}, "server clock is configured"),
        ({"symbol_map": {"EURUSD": "EURUSD.pro"}}, {}, "found EURUSD.a"),
    ],
)
def test_the_worker_refuses_a_profile_that_contradicts_its_settings(
    tmp_path: Path, settings: dict[str, Any], profile_changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _check(tmp_path, _settings(**settings), _profile(**profile_changes))


def test_the_worker_refuses_a_symbol_whose_filling_it_cannot_send(tmp_path: Path) -> None:
    profile = _profile()
    gbp = profile.symbols["GBPUSD.a"].model_copy(update={"filling_modes_accepted": ["RETURN"]})
    with pytest.raises(ConfigError, match="the worker would send FOK/IOC"):
        _check(tmp_path, _settings(), profile.model_copy(update={"symbols": {"GBPUSD.a": gbp}}))
    ok = _check(tmp_path, _settings(server_timezone="GMT+2/US-DST"), profile)
    assert ok.warnings == ()


def test_one_broker_profile_per_account(tmp_path: Path) -> None:
    def spec(account: str, profile: str | None) -> SessionSpec:
        return SessionSpec(id=f"s-{account}-{profile}", backend="sim", account=account,
                           broker_profile=profile)  # fmt: skip

    specs = [spec("a", "a.toml"), spec("a", None), spec("b", "b.toml")]
    assert broker_profiles(specs, {}) == {"a": "a.toml", "b": "b.toml"}
    with pytest.raises(ConfigError, match="two broker profiles"):
        broker_profiles([spec("a", "a.toml"), spec("a", "c.toml")], {})
    with pytest.raises(ConfigError, match="several accounts"):
        broker_profiles([spec("a", None), spec("b", None)], {"BROKER_PROFILE": "x.toml"})
    assert broker_profiles([spec("a", None)], {"BROKER_PROFILE": "x.toml"}) == {"a": "x.toml"}


def test_a_worker_with_broker_profile_maps_symbols_and_runs_the_profiles_clock(
    tmp_path: Path,
) -> None:
    from worker.mt5.profile.model import ClockProfile
    from worker.mt5.sessions import load_session_specs
    from worker.service import gateway_factory, with_broker_profiles

    fixed = ClockProfile(
        server_utc_offset_seconds=18000,
        server_timezone="UTC+5",
        rule_basis="fixed",
        measured_from_symbol="EURUSD.a",
        tick_samples=3,
    )
    path = tmp_path / "broker.toml"
    write_profile(_profile(clock=fixed), path)
    settings = _settings()
    specs = load_session_specs(settings, {"BROKER_PROFILE": str(path)})
    completed, profiles = with_broker_profiles(settings, specs)
    assert completed.broker_symbol_for("EURUSD") == "EURUSD.a"
    gateway = gateway_factory(completed, profiles)(_sim(), specs[0])
    assert gateway.server_offset_seconds == 18000
    # a configured clock that the profile contradicts stops the worker before it starts
    with pytest.raises(ConfigError, match="server clock is configured"):
        with_broker_profiles(_settings(server_utc_offset_seconds=7200), specs)


def _sim() -> api.Terminal:
    from worker.mt5.sim.terminal import SimTerminal

    return SimTerminal()
