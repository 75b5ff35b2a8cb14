"""The bench's child processes: a worker, the floor or a simulated terminal, and their settings."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from worker.tools.bench import report as bench_report
from worker.tools.bench.counts import SIM_SYMBOL, BenchError

STOP_TIMEOUT_SECONDS = 45.0


@dataclass
class Child:
    """A child process of the bench: a worker, the floor, or a simulated terminal."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited {code}: {self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])[-600:] or "(empty log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def rss_mb(self) -> float:
        process = bench_report.process_metrics().Process(self.process.pid)
        return float(process.memory_info().rss) / 2**20


@dataclass(frozen=True)
class Target:
    """Where one side of a comparison consumes: its label, its queue and its process."""

    label: str
    queue: str
    child: Child


def spawn(name: str, command: list[str], env: dict[str, str], workdir: Path) -> Child:
    log_path = workdir / f"{name.replace(' ', '-')}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Child(name, process, log_path)


def sim_config_toml(order_send_latency_ms: float, hardened: bool = False) -> str:
    """Simulator settings for the bench: open all week, netting, ample balance, friendly.

    The bench measures what the worker adds to the broker's own latency, against a floor that
    has no broker at all: a hardened server's deal lag (hundreds of ms per fill, which the
    worker rightly waits for) would be the server's time, not the worker's. Correctness
    against the hardened server is the fault suite's and the tests' job.

    ``hardened``: the simulator's default hard server instead (``preset = "hardened"``: deal
    lag, deal 0 in replies, None from history queries, cut comments, ...), for the ``hardened``
    figures, which show what a hard server costs the worker beside the friendly one.
    """
    preset = "hardened" if hardened else "friendly"
    text = (
        "[account]\nbalance = 1000000000000.0\nmargin_mode = 0\n\n"
        f"[symbols.{SIM_SYMBOL}]\nclosed_weekly = []\n\n"
        f'[faults]\npreset = "{preset}"\n'
    )
    if order_send_latency_ms > 0:
        text += f"\n[faults.latency_by_function]\norder_send = {order_send_latency_ms}\n"
    return text


def free_port_block(size: int) -> int:
    """The first port of ``size`` consecutive free ports on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base: int = probe.getsockname()[1]
        if base + size > 65535:
            continue
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + size):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise BenchError("no block of free local ports for the simulated terminals")


def wait_listening(port: int, child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child.check_alive()
        with socket.socket() as probe:
            probe.settimeout(0.5)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise BenchError(f"{child.name} did not listen on port {port}")
