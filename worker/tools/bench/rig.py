"""The bench's shared rig: one vhost, one database, one observer, one publisher, and the child
processes it starts and stops (workers, floors, simulated terminals) for the phases."""

from __future__ import annotations

import os
import secrets
import sys
import time
import uuid
from pathlib import Path

from worker.amqp.topology import REQUESTS_QUEUE
from worker.config import Settings
from worker.tools.bench import cpu as bench_cpu
from worker.tools.bench import report as bench_report
from worker.tools.bench.children import (
    Child,
    free_port_block,
    sim_config_toml,
    spawn,
    wait_listening,
)
from worker.tools.bench.client import Arrivals, Publisher, approvals
from worker.tools.bench.counts import BenchError, Counts
from worker.tools.bench.floor import FLOOR_QUEUE
from worker.tools.publish import OutgoingMessage, publish_messages

START_TIMEOUT_SECONDS = 90.0


class Bench:
    """What the phases share: one vhost, one database, one observer, one publisher."""

    def __init__(
        self,
        settings: Settings,
        amqp_url: str,
        database_url: str,
        counts: Counts,
        workdir: Path,
        progress: bench_report.Progress,
    ) -> None:
        self.settings = settings
        self.amqp_url = amqp_url
        self.database_url = database_url
        self.counts = counts
        self.workdir = workdir
        self.progress = progress
        self.run_id = uuid.uuid4().hex[:8]
        self.samples: dict[str, list[float]] = {}
        self.children: list[Child] = []
        self.publisher = Publisher(amqp_url, settings.delivery_limit)
        self.arrivals = Arrivals(amqp_url)
        self.backends = bench_cpu.Backends(database_url)

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.backends.close()
        self.arrivals.close()
        self.publisher.close()

    # --- processes ----------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("PREFETCH", "PROMETHEUS_MULTIPROC_DIR", "MT5_BRIDGE_ADDRESS"):
            env.pop(name, None)
        env.update(
            RABBITMQ_URL=self.amqp_url,
            DATABASE_URL=self.database_url,
            METRICS_PORT="0",
            LOG_FORMAT="json",
            LOG_LEVEL="WARNING",
            # a backlog waits in the queue: the bench measures the worker, not the TTL check
            APPROVAL_TTL_SECONDS="86400",
        )
        return env

    def _start(self, name: str, command: list[str], env: dict[str, str]) -> Child:
        child = spawn(name, command, env, self.workdir)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        """Stop ``child`` (SIGTERM, then SIGKILL) and forget it."""
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def start_worker(
        self,
        sessions: int,
        latency_ms: float = 0.0,
        bridge: tuple[int, str] | None = None,
        processes: int = 1,
        group_commit: bool = False,
        hardened: bool = False,
    ) -> Child:
        """``execution-worker run`` with ``sessions`` in all (``sessions // processes`` each);
        its in-process simulated terminals friendly, or ``hardened`` (the simulator's default
        hard server)."""
        env = self._base_env()
        env["GROUP_COMMIT"] = "true" if group_commit else "false"
        if bridge is None:
            preset = "hardened" if hardened else "friendly"
            config = self.workdir / f"sim-{preset}-{latency_ms:g}.toml"
            config.write_text(sim_config_toml(latency_ms, hardened=hardened))
            env.update(
                MT5_BACKEND="sim", MT5_SESSIONS=str(sessions // processes), SIM_CONFIG=str(config)
            )
        else:
            port, secret = bridge
            env.update(
                MT5_BACKEND="bridge",
                MT5_SESSIONS=str(sessions),
                MT5_BRIDGE_ADDRESS=f"127.0.0.1:{port}",
                MT5_BRIDGE_SECRET=secret,
            )
        command = [sys.executable, "-m", "worker.cli", "run"]
        if processes > 1:
            command += ["--processes", str(processes)]
        name = ("hardened " if hardened else "") + f"worker {sessions} sessions"
        child = self._start(name, command, env)
        self._wait_consumers(REQUESTS_QUEUE, processes, child)
        return child

    def start_floor(self, concurrency: int) -> Child:
        env = dict(os.environ)
        env.update(BENCH_FLOOR_AMQP_URL=self.amqp_url, BENCH_FLOOR_DB_URL=self.database_url)
        command = [sys.executable, "-m", "worker.tools.bench.floor", str(concurrency)]
        child = self._start(f"floor x{concurrency}", command, env)
        self._wait_consumers(FLOOR_QUEUE, concurrency, child)
        return child

    def start_sim_terminals(self, count: int) -> tuple[int, str]:
        """``count`` sim-terminal processes on consecutive ports: (first port, secret)."""
        secret = secrets.token_hex(24)
        port = free_port_block(count)
        config = self.workdir / "sim-bridge.toml"
        config.write_text(sim_config_toml(0.0))
        env = dict(os.environ)
        env.update(MT5_BRIDGE_SECRET=secret, LOG_LEVEL="WARNING")
        for i in range(count):
            command = [
                sys.executable, "-m", "worker.cli", "sim-terminal", "--port", str(port + i),
                "--state", str(self.workdir / f"sim-{i}.state"), "--config", str(config),
            ]  # fmt: skip
            child = self._start(f"sim-terminal {i}", command, env)
            wait_listening(port + i, child, START_TIMEOUT_SECONDS)
        return port, secret

    def _wait_consumers(self, queue: str, count: int, child: Child) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while self.publisher.consumers(queue) < count:
            child.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{child.name} did not start consuming: {child.log_tail()}")
            self.publisher.sleep(0.05)

    # --- messages -------------------------------------------------------------------------

    def messages(self, phase: str, count: int) -> list[OutgoingMessage]:
        return approvals(f"bench-{self.run_id}-{phase}", count)

    def backlog(self, phase: str, queue: str, count: int) -> list[str]:
        """Publish ``count`` requests (async confirms) for a consumer started afterwards."""
        messages = self.messages(phase, count)
        report = publish_messages(
            self.amqp_url,
            messages,
            delivery_limit=self.settings.delivery_limit,
            routing_key=queue,
            timeout=max(60.0, count / 200.0),
        )
        if report.confirmed != count:
            raise BenchError(f"backlog for {phase}: {report.summary()}")
        return [m.message_id or "" for m in messages]
