"""``execution-worker probe`` against the simulator, over the native and bridge backends.

The probe must recover what the simulator was configured with (comment cut, deal lag, deal
0 rate, DST clock, filling modes, symbol suffixes), a profile it wrote must replay through
``sim-terminal --profile`` and probe again to the same values, a real account must be
refused, and a probe killed mid-way must leave nothing open once run again.

Time is compressed: deal lags of tens of ms, few round trips where the statistics allow (the
deal 0 rate is drawn from the simulator's seeded generator: with ``query_none_rate`` 0 the
draws depend only on the orders sent, so its figure does not vary between runs).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_bridge_helpers import (
    ROOT,
    address_of,
    cli_env,
    new_secret,
    served,
    start_sim_terminal,
)
from worker.mt5 import api
from worker.mt5.bridge.client import BridgeTerminal
from worker.mt5.profile.model import BrokerProfile
from worker.mt5.profile.toml import write_profile
from worker.mt5.sim.config import FaultConfig, SimAccount, SimConfig
from worker.mt5.sim.terminal import SimTerminal
from worker.tools.probe.magic import is_probe_magic
from worker.tools.probe.run import ProbeOptions, probe
from worker.tools.probe.safety import RealAccountRefused

_T0 = time.time()
SUMMER = datetime(2026, 7, 14, 10, tzinfo=UTC).timestamp()  # a Tuesday: markets open
WINTER = datetime(2026, 1, 13, 10, tzinfo=UTC).timestamp()
FAST_CLOCK = {"clock_samples": 2, "clock_pause_seconds": 0.26}  # ticks move every 250 ms


def clock_at(base: float) -> Callable[[], float]:
    return lambda: base + (time.time() - _T0)


def broker_config(suffix: str = ".a", **faults: Any) -> SimConfig:
    """The default symbols renamed with ``suffix``, open all week, on a hardened server."""
    base = SimConfig()
    symbols = {
        f"{name}{suffix}": replace(symbol, name=f"{name}{suffix}", closed_weekly=())
        for name, symbol in base.symbols.items()
    }
    return replace(base, symbols=symbols, faults=FaultConfig.hardened(**faults))


@contextlib.contextmanager
def backend(name: str, sim: SimTerminal) -> Iterator[api.Terminal]:
    """``sim`` behind the real MetaTrader5 package (native) or a bridge over TCP."""
    assert sim.initialize()
    if name == "native":
        from tests.native import core_double
        from tests.native.package import over
        from worker.mt5.native import NativeTerminal

        native = NativeTerminal(over(sim))
        assert native.initialize()
        try:
            yield native
        finally:
            core_double.bind(None)
        return
    secret = new_secret()
    with served(sim, secret) as server:
        client = BridgeTerminal(address_of(server), secret, timeout=10)
        assert client.initialize()
        try:
            yield client
        finally:
            client.shutdown()


def _probe(
    terminal: api.Terminal, base: float, *, backend_name: str = "sim", **options: Any
) -> BrokerProfile:
    chosen = ProbeOptions(backend=backend_name, **{**FAST_CLOCK, **options})  # type: ignore[arg-type]
    return probe(terminal, chosen, utc_clock=clock_at(base)).profile


def _no_probe_positions(sim: SimTerminal) -> bool:
    positions = sim.positions_get()
    assert positions is not None
    return not [p for p in positions if is_probe_magic(p.magic)]


HARD = {
    "comment_keep_chars": 16,
    "deal_lag_ms": 40.0,
    "deal_lag_jitter_ms": 40.0,  # uniform 40-80 ms: median 60
    "deal_zero_rate": 0.25,
    "query_none_rate": 0.0,
}


def _assert_recovered(profile: BrokerProfile, *, lag_p50_ms: float, deal_zero: float) -> None:
    behaviour = profile.behaviour
    assert behaviour is not None
    assert behaviour.comment_chars_kept == 16
    assert behaviour.comment_chars_kept_deals == behaviour.comment_chars_kept_positions == 16
    assert abs(behaviour.deal_lag_ms_p50 - lag_p50_ms) <= 0.3 * lag_p50_ms, behaviour
    assert abs(behaviour.deal_zero_rate - deal_zero) <= 0.10, behaviour
    assert behaviour.magic_63_bit_kept and behaviour.position_ticket_differs
    assert profile.clock is not None and profile.clock.server_timezone == "GMT+2/US-DST"
    assert (profile.symbol_prefix, profile.symbol_suffix) == ("", ".a")
    assert profile.symbol_map["EURUSD"] == "EURUSD.a"
    fillings = {name: spec.filling_modes_accepted for name, spec in profile.symbols.items()}
    assert fillings == {
        "EURUSD.a": ["FOK", "IOC"],
        "GBPUSD.a": ["FOK"],  # instant execution: FOK only, though the bitmask says IOC
        "USDJPY.a": ["FOK", "IOC"],
        "XAUUSD.a": ["FOK"],
    }
    assert profile.symbols["GBPUSD.a"].execution_mode == "instant"


@pytest.mark.parametrize("backend_name", ["native", "bridge"])
def test_the_probe_recovers_what_the_simulator_was_configured_with(backend_name: str) -> None:
    sim = SimTerminal(broker_config(**HARD), clock=clock_at(SUMMER))
    with backend(backend_name, sim) as terminal:
        profile = _probe(terminal, SUMMER, backend_name=backend_name, round_trips=40)
    assert profile.clock is not None and profile.clock.server_utc_offset_seconds == 3 * 3600
    assert profile.behaviour is not None and profile.behaviour.replies == 80
    _assert_recovered(profile, lag_p50_ms=60.0, deal_zero=0.25)
    assert _no_probe_positions(sim)


@pytest.mark.parametrize("backend_name", ["native", "bridge"])
@pytest.mark.parametrize(
    ("faults", "kept", "rewritten"),
    [
        ({"comment_keep_chars": None}, 26, None),
        ({"comment_keep_chars": None, "comment_replace": ""}, 0, None),
        ({"comment_keep_chars": 16, "comment_replace": "desk order"}, 0, "desk order"),
    ],
)
def test_the_comment_cut_is_measured(
    backend_name: str, faults: dict[str, Any], kept: int, rewritten: str | None
) -> None:
    config = broker_config(deal_lag_ms=0.0, deal_lag_jitter_ms=0.0, **faults)
    sim = SimTerminal(config, clock=clock_at(WINTER))
    with backend(backend_name, sim) as terminal:
        profile = _probe(terminal, WINTER, round_trips=2)
    assert profile.behaviour is not None
    assert profile.behaviour.comment_chars_kept == kept
    expected = rewritten[:16] if rewritten else None  # the cut applies to the rewrite too
    assert profile.behaviour.comment_rewritten_to == expected


@pytest.mark.parametrize("backend_name", ["native", "bridge"])
@pytest.mark.parametrize(
    ("base", "dst", "offset_hours", "rule"),
    [
        (SUMMER, True, 3, "GMT+2/US-DST"),
        (WINTER, True, 2, "GMT+2/US-DST"),
        (SUMMER, False, 2, "UTC+2"),
    ],
)
def test_the_server_clock_and_its_dst_rule_are_measured(
    backend_name: str, base: float, dst: bool, offset_hours: int, rule: str
) -> None:
    sim = SimTerminal(broker_config(dst_clock=dst), clock=clock_at(base))
    with backend(backend_name, sim) as terminal:
        profile = _probe(terminal, base, reads_only=True)
    assert profile.clock is not None
    assert profile.clock.server_utc_offset_seconds == offset_hours * 3600
    assert profile.clock.server_timezone == rule
    assert profile.behaviour is None and profile.probe.trades_skipped_reason == "--reads-only"


def test_a_profile_replayed_by_sim_terminal_probes_to_the_same_values(tmp_path: Path) -> None:
    sim = SimTerminal(broker_config(**HARD), clock=clock_at(SUMMER))
    assert sim.initialize()
    first = _probe(sim, SUMMER, round_trips=40)
    written = tmp_path / "broker.toml"
    write_profile(first, written)
    assert first.behaviour is not None
    # the replayed server runs on the real clock: its markets must be open on any day
    open_all_week = "".join(
        f"[symbols.{name}]\nclosed_weekly = []\n" for name in SimConfig().symbols
    )
    secret = new_secret()
    replayed = start_sim_terminal(
        tmp_path, tmp_path / "replay.db", secret, config=open_all_week,
        args=("--profile", str(written)),
    )  # fmt: skip
    try:
        client = BridgeTerminal(replayed.address, secret, timeout=10)
        assert client.initialize()
        second = probe(
            client, ProbeOptions(backend="bridge", round_trips=40, **FAST_CLOCK)
        ).profile  # the real clock, as the replayed server's
        client.shutdown()
    finally:
        replayed.kill()
    _assert_recovered(
        second, lag_p50_ms=first.behaviour.deal_lag_ms_p50, deal_zero=first.behaviour.deal_zero_rate
    )
    assert second.account.login == first.account.login
    assert second.account.margin_mode == first.account.margin_mode


def test_a_real_account_is_refused_without_allow_real(tmp_path: Path) -> None:
    real = replace(
        broker_config(query_none_rate=0.0),
        account=SimAccount(trade_mode=api.ACCOUNT_TRADE_MODE_REAL),
    )
    sim = SimTerminal(real, clock=clock_at(WINTER))
    assert sim.initialize()
    with pytest.raises(RealAccountRefused, match="REAL account"):
        _probe(sim, WINTER, round_trips=2)
    with pytest.raises(RealAccountRefused, match="not confirmed"):
        _probe(sim, WINTER, round_trips=2, allow_real=True, confirm=lambda _: "yes")
    assert sim.history_deals_get(0, 2**40) == ()  # nothing was traded
    # the command: exit code 2, no profile written
    sim_config = tmp_path / "real.toml"
    sim_config.write_text("[account]\ntrade_mode = 2\n", encoding="utf-8")
    out = tmp_path / "profile.toml"
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "probe", "--out", str(out)],
        cwd=ROOT, env=cli_env(None, MT5_BACKEND="sim", SIM_CONFIG=str(sim_config)),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "REAL account" in done.stderr and not out.exists()


def test_kill_9_mid_probe_then_a_rerun_leaves_no_open_position(tmp_path: Path) -> None:
    # a slow hardened server (deals 300 ms late, None from 5 % of queries): each round trip
    # holds its position long enough to be caught open
    config = "[faults]\ndeal_lag_ms = 300.0\ndeal_lag_jitter_ms = 0.0\n" + "".join(
        f"[symbols.{name}]\nclosed_weekly = []\n" for name in SimConfig().symbols
    )
    secret = new_secret()
    terminal = start_sim_terminal(tmp_path, tmp_path / "broker.db", secret, config=config)
    watcher = BridgeTerminal(terminal.address, secret, timeout=10)
    try:
        assert watcher.initialize()
        env = cli_env(secret, MT5_BACKEND="bridge", MT5_BRIDGE_ADDRESS=terminal.address)
        command = [sys.executable, "-m", "worker.cli", "probe", "--out", str(tmp_path / "p.toml"),
                   "--round-trips", "50"]  # fmt: skip
        prober = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)  # fmt: skip
        try:
            caught = False
            deadline = time.monotonic() + 60
            while not caught and time.monotonic() < deadline and prober.poll() is None:
                positions = watcher.positions_get()
                caught = bool(positions and any(is_probe_magic(p.magic) for p in positions))
                if not caught:
                    time.sleep(0.02)
            assert caught, "the probe never held a position"
            prober.send_signal(signal.SIGKILL)
        finally:
            prober.kill()
            prober.wait(10)
        positions = watcher.positions_get()
        assert positions is not None and any(is_probe_magic(p.magic) for p in positions)
        rerun = probe(watcher, ProbeOptions(backend="bridge", round_trips=1, **FAST_CLOCK))
        assert rerun.profile.probe.leftovers_closed >= 1
        assert rerun.profile.probe.round_trips == 1
        left = watcher.positions_get()
        while left is None:  # the hardened server answers None now and then
            left = watcher.positions_get()
        assert not [p for p in left if is_probe_magic(p.magic)]
    finally:
        watcher.shutdown()
        terminal.kill()
    assert not (tmp_path / "p.toml").exists()  # the killed run wrote nothing


def test_on_a_netting_account_the_probe_never_touches_someone_elses_position() -> None:
    netting = SimAccount(margin_mode=api.ACCOUNT_MARGIN_MODE_RETAIL_NETTING)
    config = replace(broker_config(deal_lag_ms=0.0, deal_lag_jitter_ms=0.0), account=netting)
    sim = SimTerminal(config, clock=clock_at(WINTER))
    assert sim.initialize()
    tick = sim.symbol_info_tick("EURUSD.a")
    assert tick is not None
    desk = sim.order_send(
        {"action": api.TRADE_ACTION_DEAL, "symbol": "EURUSD.a", "volume": 0.3,
         "type": api.ORDER_TYPE_BUY, "price": tick.ask, "deviation": 20, "magic": 26112501,
         "type_filling": api.ORDER_FILLING_FOK}
    )  # fmt: skip
    assert desk is not None and desk.retcode == api.TRADE_RETCODE_DONE
    profile = _probe(sim, WINTER, round_trips=2)
    assert profile.probe.trade_symbol == "GBPUSD.a"  # EURUSD.a holds the desk's position
    assert profile.behaviour is not None and profile.behaviour.position_ticket_differs is None
    positions = None
    while positions is None:  # the hardened server answers None now and then
        positions = sim.positions_get()
    assert [(p.symbol, p.volume, p.magic) for p in positions] == [("EURUSD.a", 0.3, 26112501)]
