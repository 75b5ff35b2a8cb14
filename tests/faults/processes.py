"""The fault suite's processes: simulated terminals and workers, started as the CLI starts them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from tests.ports import restartable_port

ROOT = Path(__file__).resolve().parents[2]
CLI = (sys.executable, "-m", "worker.cli")


def base_env() -> dict[str, str]:
    """This environment without the worker's settings (each process gets them explicitly)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MT5_", "FAULT_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class SimTerminalProcess:
    """``execution-worker sim-terminal`` on a fixed port, its state in an SQLite file.

    ``kill()`` then ``start()`` is a terminal that crashed and came back: same port, same
    broker state (the connection of every client drops meanwhile).
    """

    def __init__(self, directory: Path, name: str, config: Path, secret: str) -> None:
        self.name = name
        self.state = directory / f"{name}.db"
        self.config = config
        self.secret = secret
        self.port = restartable_port()  # it restarts on this port
        self.log_path = directory / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        env = base_env()
        env["MT5_BRIDGE_SECRET"] = self.secret
        env["LOG_LEVEL"] = "WARNING"
        return env

    def start(self) -> SimTerminalProcess:
        log = self.log_path.open("ab")
        state, config = str(self.state), str(self.config)
        self.process = subprocess.Popen(
            [*CLI, "sim-terminal", "--port", str(self.port), "--state", state, "--config", config],
            cwd=ROOT,
            env=self._env(),
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode(errors="replace")
        if not line.startswith("listening on"):
            self.process.kill()
            raise AssertionError(f"sim-terminal {self.name} did not start: {self.tail()}")
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
        self.close_pipe()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self.close_pipe()

    def close_pipe(self) -> None:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def deals(self) -> list[dict[str, Any]]:
        """``sim-terminal --state PATH --dump``: every deal the broker ever made."""
        done = subprocess.run(
            [*CLI, "sim-terminal", "--state", str(self.state), "--dump"],
            cwd=ROOT,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"--dump of {self.name} failed: {done.stderr[-500:]}"
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def late_pending(self) -> int:
        """Orders this terminal took with an unknown outcome that have not executed yet
        (``timeout_late``/``lost_reply_late``), from its state file."""
        from worker.mt5.sim.state import late_pending

        return late_pending(self.state) if self.state.exists() else 0

    def tail(self, size: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""


class WorkerProcess:
    """``execution-worker run`` through the fault launcher (armed or not)."""

    def __init__(self, env: dict[str, str], log_path: Path, processes: int = 1) -> None:
        self.log_path = log_path
        log: IO[bytes] = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.launcher", "run", "--processes", str(processes)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a supervisor's children die with their group
        )
        log.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, seconds: float) -> int:
        try:
            return self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.pid} still running after {seconds:.0f} s:\n{self.tail()}"
            ) from None

    def stop(self, seconds: float = 60.0) -> int:
        """SIGTERM (drain), then wait for the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        return self.wait(seconds)

    def kill(self) -> int:
        """``kill -9`` now, from outside (the worker and any child it supervises: no drain,
        no finally blocks); returns the exit status (-9)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait(30)

    def kill_group(self) -> None:
        """Cleanup after a failed test: the worker and any children it supervises."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""


def wait_for(condition: Any, what: str, seconds: float, interval: float = 0.1) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(interval)
