"""Helpers of the bridge and pool tests (no tests here): servers, sim-terminal processes."""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from tests.ports import restartable_port
from worker.mt5 import api
from worker.mt5.bridge.client import BridgeServer
from worker.mt5.sim.terminal import SimConfig, SimTerminal

ROOT = Path(__file__).resolve().parents[2]
MAGIC = 26112501
# A Wednesday morning: every simulated market is open.
FIXED_NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC).timestamp()
# FX closes at weekends; these tests must not depend on the day they run.
OPEN_MARKETS_TOML = """
[symbols.EURUSD]
closed_weekly = []
[symbols.USDJPY]
closed_weekly = []
"""


def open_config(extra: str = "") -> SimConfig:
    return SimConfig.from_mapping(tomllib.loads(OPEN_MARKETS_TOML + extra))


def new_secret() -> str:
    return secrets.token_hex(16)


def eventually(check: Callable[[], bool], attempts: int = 200) -> bool:
    """A server counts a refusal in its own thread, maybe just after the client saw it."""
    for _ in range(attempts):
        if check():
            return True
        threading.Event().wait(0.025)
    return False


T = TypeVar("T")


def answered(query: Callable[[], T | None], seconds: float = 10.0) -> T | None:
    """Ask again until the answer is there: the (hardened) server answers None now and then
    and shows a deal only some hundreds of ms after its 10009."""
    deadline = time.monotonic() + seconds
    while True:
        answer = query()
        if answer or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


def address_of(server: BridgeServer) -> str:
    host, port = server.address
    return f"{host}:{port}"


@contextlib.contextmanager
def served(terminal: SimTerminal, secret: str, **options: Any) -> Iterator[BridgeServer]:
    """A bridge server for ``terminal`` in this process (its own threads)."""
    server = BridgeServer(terminal, secret.encode(), **options)
    server.start()
    try:
        yield server
    finally:
        server.stop(timeout=5)


def market_order(
    terminal: api.Terminal, comment: str, *, symbol: str = "EURUSD", volume: float = 0.1
) -> dict[str, Any]:
    tick = terminal.symbol_info_tick(symbol)
    assert tick is not None
    return {
        "action": api.TRADE_ACTION_DEAL,
        "symbol": symbol,
        "volume": volume,
        "type": api.ORDER_TYPE_BUY,
        "price": tick.ask,
        "deviation": 20,
        "magic": MAGIC,
        "comment": comment,
        "type_time": api.ORDER_TIME_GTC,
        "type_filling": api.ORDER_FILLING_FOK,
    }


class SimProcess:
    """``execution-worker sim-terminal`` in a child process."""

    def __init__(
        self, proc: subprocess.Popen[str], address: str, log: Path, metrics: str | None = None
    ) -> None:
        self.proc = proc
        self.address = address
        self.log = log
        self.metrics_address = metrics  # HOST:PORT of /metrics, with --metrics-port

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _read_line(stream: IO[str], timeout: float) -> str:
    """One line from the pipe, byte by byte from its descriptor: a buffered readline could
    swallow the next line too, and select() would then wait for it in vain."""
    line = bytearray()
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([stream], [], [], timeout)
        if not ready:
            break
        byte = os.read(stream.fileno(), 1)
        if not byte:
            break
        line += byte
    return line.decode("utf-8", errors="replace")


def cli_env(secret: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MT5_")}
    env["LOG_FORMAT"] = "console"
    env["PYTHONPATH"] = str(ROOT)
    if secret is not None:
        env["MT5_BRIDGE_SECRET"] = secret
    env.update(extra)
    return env


def start_sim_terminal(
    tmp: Path,
    state: Path,
    secret: str,
    *,
    port: int | None = None,
    config: str = OPEN_MARKETS_TOML,
    name: str = "sim",
    args: Sequence[str] = (),
) -> SimProcess:
    """``sim-terminal`` on 127.0.0.1 (unless ``args`` say ``--host``), ``args`` appended."""
    if port is None:
        port = restartable_port()  # a test may restart it on this port
    config_path = tmp / f"{name}.toml"
    config_path.write_text(config, encoding="utf-8")
    log = tmp / f"{name}-{port}-{os.urandom(3).hex()}.log"
    command = [
        sys.executable, "-m", "worker.cli", "sim-terminal", "--port", str(port),
        "--state", str(state), "--config", str(config_path), *args,
    ]  # fmt: skip
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=cli_env(secret), stdout=subprocess.PIPE, stderr=log_file,
            text=True,
        )  # fmt: skip
    assert proc.stdout is not None
    line = _read_line(proc.stdout, 30)
    if not line.startswith("listening on "):
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"sim-terminal did not start: {line!r} {log.read_text()}")
    metrics = None
    if "--metrics-port" in args:
        metrics_line = _read_line(proc.stdout, 30)
        assert metrics_line.startswith("metrics on "), (metrics_line, log.read_text())
        metrics = metrics_line.removeprefix("metrics on ").strip()
    return SimProcess(proc, line.removeprefix("listening on ").strip(), log, metrics)
