"""``execution-worker sim-terminal`` as a separate process: kills mid-order_send, --dump."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.integration.test_bridge_helpers import (
    MAGIC,
    OPEN_MARKETS_TOML,
    ROOT,
    SimProcess,
    cli_env,
    market_order,
    new_secret,
    start_sim_terminal,
)
from worker.mt5 import api
from worker.mt5.bridge.client import BridgeTerminal
from worker.mt5.gateway import Gateway, QueryFailed, Reconciliation

SLOW_SEND = OPEN_MARKETS_TOML + "\n[faults]\nlatency_by_function = { order_send = 2500 }\n"
DUMP_KEYS = [
    "ticket", "order", "position_id", "symbol", "type", "volume", "price", "comment", "magic",
    "time_msc",
]  # fmt: skip


def _cli(*args: str, secret: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=ROOT, env=cli_env(secret, **env), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _dump(state: Path) -> list[dict[str, object]]:
    done = _cli("sim-terminal", "--state", str(state), "--dump")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _send_in_background(
    terminal: BridgeTerminal, request: dict[str, object]
) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def send() -> None:
        try:
            outcome.append(terminal.order_send(request))
        except api.TransportError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    return thread, outcome


def _gateway(terminal: BridgeTerminal) -> Gateway:
    return Gateway(terminal, magic=MAGIC, pip_sizes={}, max_tick_age_seconds=60)


def _killed_mid_send(tmp_path: Path, signum: int, token: str) -> tuple[Path, str, SimProcess]:
    """Start a slow terminal, send an order, deliver ``signum`` during the call, restart."""
    secret = new_secret()
    state = tmp_path / "broker.db"
    first = start_sim_terminal(tmp_path, state, secret, config=SLOW_SEND)
    terminal = BridgeTerminal(first.address, secret, timeout=30)
    assert terminal.initialize()
    thread, outcome = _send_in_background(terminal, market_order(terminal, token))
    threading.Event().wait(0.5)  # the call is now inside the terminal's 2.5 s latency
    first.signal(signum)
    thread.join(30)
    first.wait(30)
    assert len(outcome) == 1
    assert isinstance(outcome[0], api.TransportError)  # an UNKNOWN outcome for the gateway
    restarted = start_sim_terminal(tmp_path, state, secret, port=first.port, config=SLOW_SEND)
    return state, secret, restarted


def _reconciled(
    gateway: Gateway, token: str, since: datetime, *, until_deals: bool = False
) -> Reconciliation:
    """Reconcile as the pipeline does on a hardened server: a failed query (QueryFailed) is
    asked again, and with ``until_deals`` until the order's deal shows (it lags the order)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            found = gateway.reconcile(token, "EURUSD", since)
            if found.deals or not until_deals or time.monotonic() > deadline:
                return found
        except QueryFailed:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def test_terminal_stopped_mid_order_send_reconciles_to_exactly_one_deal(tmp_path: Path) -> None:
    token = "xw" + "a1" * 10
    since = datetime.now(UTC) - timedelta(seconds=5)
    state, secret, restarted = _killed_mid_send(tmp_path, signal.SIGTERM, token)
    try:
        # the same address as before: the client of the worker would simply reconnect
        terminal = BridgeTerminal(restarted.address, secret)
        assert terminal.initialize()
        found = _reconciled(_gateway(terminal), token, since, until_deals=True)
        assert found.found
        assert len(found.deals) == 1
        assert found.deals[0].comment == token[:16] and found.deals[0].magic == MAGIC
        assert found.filled_volume == pytest.approx(0.1)
    finally:
        restarted.signal(signal.SIGTERM)
        assert restarted.wait() == 0
    assert [deal["comment"] for deal in _dump(state)] == [token[:16]]  # cut by the server


def test_terminal_killed_mid_order_send_reconciles_to_what_the_broker_has(
    tmp_path: Path,
) -> None:
    # SIGKILL during the terminal's latency: the order never reached the simulated server,
    # so reconcile finds nothing (and only then may the order be sent again).
    token = "xw" + "b2" * 10
    since = datetime.now(UTC) - timedelta(seconds=5)
    state, secret, restarted = _killed_mid_send(tmp_path, signal.SIGKILL, token)
    try:
        terminal = BridgeTerminal(restarted.address, secret, timeout=30)
        assert terminal.initialize()
        gateway = _gateway(terminal)
        assert not _reconciled(gateway, token, since).found
        result = terminal.order_send(market_order(terminal, token))
        assert result is not None and result.retcode == api.TRADE_RETCODE_DONE
        assert len(_reconciled(gateway, token, since, until_deals=True).deals) == 1
    finally:
        restarted.kill()
    assert [deal["comment"] for deal in _dump(state)] == [token[:16]]  # cut by the server


def test_dump_prints_every_deal_as_one_json_object_per_line(tmp_path: Path) -> None:
    secret = new_secret()
    state = tmp_path / "broker.db"
    process = start_sim_terminal(tmp_path, state, secret)
    try:
        terminal = BridgeTerminal(process.address, secret)
        assert terminal.initialize()
        results = []
        for n, symbol in enumerate(("EURUSD", "USDJPY")):
            request = market_order(terminal, f"xw{n:020d}", symbol=symbol, volume=0.2)
            results.append(terminal.order_send(request))
    finally:
        process.signal(signal.SIGTERM)
        assert process.wait() == 0
    lines = _dump(state)
    assert [list(line) for line in lines] == [DUMP_KEYS, DUMP_KEYS]
    for line, result, symbol in zip(lines, results, ("EURUSD", "USDJPY"), strict=True):
        assert result is not None
        assert result.deal in (0, line["ticket"])  # a 10009 may say deal 0
        assert line["order"] == result.order
        assert line["symbol"] == symbol
        assert line["type"] == api.DEAL_TYPE_BUY
        assert line["volume"] == pytest.approx(0.2)
        assert line["price"] == pytest.approx(result.price)
        assert line["magic"] == MAGIC
        assert isinstance(line["time_msc"], int) and isinstance(line["position_id"], int)
    assert [line["comment"] for line in lines] == ["xw" + "0" * 14] * 2  # cut to 16


def test_sim_terminal_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    done = _cli("sim-terminal", "--port", "0", "--state", str(tmp_path / "s.db"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "MT5_BRIDGE_SECRET" in lines[0]
    assert not (tmp_path / "s.db").exists()


def test_sim_terminal_reads_its_secret_from_a_file(tmp_path: Path) -> None:
    secret = new_secret()
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret + "\n", encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "sim-terminal", "--port", "0", "--state",
         str(tmp_path / "s.db")],
        cwd=ROOT, env=cli_env(None, MT5_BRIDGE_SECRET_FILE=str(secret_file)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().removeprefix("listening on ").strip()
        terminal = BridgeTerminal(address, secret)
        assert terminal.initialize()
        assert not BridgeTerminal(address, "wrong").initialize()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert secret not in stderr
    assert "bad_auth" in stderr


def test_bridge_serve_needs_a_secret_and_the_native_module(tmp_path: Path) -> None:
    without_secret = _cli("bridge-serve", "--port", "0")
    assert without_secret.returncode == 2
    assert "MT5_BRIDGE_SECRET" in without_secret.stderr
    password = "pw-" + new_secret()
    on_linux = _cli("bridge-serve", "--port", "0", secret=new_secret(), MT5_PASSWORD=password)
    assert on_linux.returncode == 2
    assert len(on_linux.stderr.strip().splitlines()) == 1
    assert "MetaTrader5" in on_linux.stderr
    assert password not in on_linux.stderr + on_linux.stdout


def test_sim_terminal_comes_back_after_its_connection_drops(tmp_path: Path) -> None:
    secret = new_secret()
    flaky = OPEN_MARKETS_TOML + "\n[faults]\ndisconnect_rate = 0.5\nfault_seed = 3\n"
    sim = start_sim_terminal(tmp_path, tmp_path / "state.db", secret, config=flaky)
    try:
        terminal = BridgeTerminal(sim.address, secret)
        seen: list[bool] = []
        for _ in range(300):  # bounded: the watch re-initializes every few seconds
            seen.append(terminal.terminal_info() is not None)
            if False in seen and seen[-1]:
                break
            time.sleep(0.05)
        failed_at = seen.index(False)
        assert True in seen[failed_at:], "the terminal never reconnected after a drop"
    finally:
        sim.kill()
