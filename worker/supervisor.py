"""``execution-worker run``: one worker process, or a supervisor of N of them.

One process: ``Service.start`` (migrate, pools, sessions, recovery), then the AMQP runtime
with prefetch = the process's sessions, the health/metrics endpoint on ``METRICS_PORT``, and
SIGTERM/SIGINT draining in-flight messages before a clean exit 0.

``--processes N`` (N > 1): N child processes, each with its own connection, service and
sessions; a child that dies is restarted with backoff, SIGTERM/SIGINT is forwarded, and the
supervisor exits when every child has. A child that exits with a configuration error
(bad settings, access refused, topology mismatch) is not restarted: the supervisor stops the
others and exits with that code instead of crash-looping.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from types import FrameType

from worker.amqp.runtime import runtime_from_settings
from worker.config import ConfigError, Settings, load_settings, mask_url
from worker.errors import FATAL, ExitCode

log = logging.getLogger(__name__)

SUPERVISED_ENV = "EXECUTION_WORKER_SUPERVISED"  # set for children: the supervisor serves health
RESTART_MIN_SECONDS = 0.5
RESTART_MAX_SECONDS = 30.0
HEALTHY_RUN_SECONDS = 60.0  # a child that lived this long restarts without backoff


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    _configure_logging(settings)
    if args.processes < 1:
        raise ConfigError("--processes must be at least 1")
    if args.processes == 1:
        return run_worker(settings)
    return supervise(args.processes, settings)


def _configure_logging(settings: Settings) -> None:
    from worker.observability.logs import configure_logging, register_settings_secrets

    register_settings_secrets(settings)
    configure_logging(settings.log_format, settings.log_level)


def _on_signals(handler: signal.Handlers | object) -> None:
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, handler)  # type: ignore[arg-type]


def run_worker(settings: Settings) -> int:
    """Run one worker in this process until SIGTERM/SIGINT (0) or a fatal broker error."""
    from worker.observability.health import HealthServer
    from worker.service import Service

    supervised = bool(os.environ.get(SUPERVISED_ENV))
    if not supervised:
        check_port_free(settings.metrics_port)  # before minutes of start-up, not after
    try:
        service = Service.start(settings)
    except Exception as exc:
        return _start_failed(exc)
    health: HealthServer | None = None
    try:
        if not supervised:
            health = HealthServer(settings.metrics_port).start()
        runtime = runtime_from_settings(
            settings,
            service.handler,
            service.outbox,
            service.sessions,
            beat=health.beat if health is not None else None,
        )
        if health is not None:
            health.add_check("rabbitmq", runtime.consuming.is_set)
            health.add_check_group(service.readiness)
            health.add_detail("rabbitmq", lambda: {"node": runtime.node})
            health.add_detail("database", service.store.epochs.describe)

        def on_signal(number: int, _frame: FrameType | None) -> None:
            log.info("%s: draining", signal.Signals(number).name)
            runtime.stop()

        _on_signals(on_signal)
        log.info(
            "worker starting: %d session(s), broker %s",
            service.sessions,
            mask_url(settings.rabbitmq_url.get_secret_value()),
        )
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(runtime.run()), name="amqp-io")
        thread.start()
        # the main thread only waits, so that signal handlers never interrupt the IO loop
        while thread.is_alive():
            thread.join(0.5)
        code = result[0] if result else 1
        log.info("worker stopped (exit %d)", code)
        if runtime.error:  # the one line, last
            fix = (
                " (wrong user, password or vhost in RABBITMQ_URL: fix it; a restart cannot help)"
                if code == ExitCode.ACCESS_REFUSED
                else ""
            )
            print(f"execution-worker run: {runtime.error}{fix}", file=sys.stderr)
        return code
    finally:
        _on_signals(signal.SIG_DFL)
        if health is not None:
            health.stop()
        service.close()


def _start_failed(exc: Exception) -> int:
    """One line for a service that could not start, and the code that tells the supervisor
    whether a restart can help: a configuration error (MT5_SESSIONS=0...) is fatal, a
    database that does not answer yet is not."""
    from worker.explain import explain

    explained = explain(exc)
    log.error("cannot start the service: %s", explained.line)
    print(f"execution-worker run: {explained.line}", file=sys.stderr)
    if explained.code in (ExitCode.CONFIG, ExitCode.DATABASE_UNREACHABLE):
        return explained.code
    return ExitCode.START_FAILED


def check_port_free(port: int, host: str = "0.0.0.0") -> None:
    """ConfigError when ``METRICS_PORT`` is taken (0: any free port, always fine)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"METRICS_PORT {port} is in use ({exc.strerror}): stop the other process"
                " (another worker?) or set METRICS_PORT to a free port"
            ) from None


# ----------------------------------------------------------------------------- supervisor


@dataclass
class _Child:
    slot: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float = 0.0
    delay: float = RESTART_MIN_SECONDS
    restarts: int = 0


def _child_command() -> list[str]:
    return [sys.executable, "-m", "worker.cli", "run", "--processes", "1"]


def supervise(count: int, settings: Settings) -> int:
    """Run ``count`` worker processes until SIGTERM/SIGINT; restart the ones that die."""
    from worker.observability import metrics
    from worker.observability.health import HealthServer
    from worker.observability.logs import WORKER_INDEX_ENV

    check_port_free(settings.metrics_port)
    env = dict(os.environ)
    env[SUPERVISED_ENV] = "1"
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="execution-worker-metrics-")
    children = [_Child(slot) for slot in range(count)]
    stopping = threading.Event()
    fatal: list[int] = []

    def spawn(child: _Child) -> None:
        child.process = subprocess.Popen(
            _child_command(), env={**env, WORKER_INDEX_ENV: str(child.slot)}
        )
        child.started = time.monotonic()
        log.info("worker %d started (pid %d)", child.slot, child.process.pid)

    def forward(number: int) -> None:
        for child in children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(number)

    def on_signal(number: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping %d worker(s)", signal.Signals(number).name, count)
        stopping.set()
        forward(signal.SIGTERM)

    health = HealthServer(settings.metrics_port, multiprocess_dir=env["PROMETHEUS_MULTIPROC_DIR"])
    health.add_check(
        "workers", lambda: all(c.process and c.process.poll() is None for c in children)
    )
    _on_signals(on_signal)
    health.start()
    try:
        for child in children:
            spawn(child)
        while True:
            health.beat()
            now = time.monotonic()
            for child in children:
                if child.process is not None and (code := child.process.poll()) is not None:
                    metrics.mark_process_dead(child.process.pid)
                    child.process = None
                    if stopping.is_set():
                        continue
                    if code in FATAL:
                        log.error("worker %d exited %d: not restarting; stopping", child.slot, code)
                        fatal.append(code)
                        stopping.set()
                        forward(signal.SIGTERM)
                        continue
                    if now - child.started >= HEALTHY_RUN_SECONDS:
                        child.delay = RESTART_MIN_SECONDS
                    child.restart_at = now + child.delay
                    log.warning(
                        "worker %d exited %d; restarting in %.1f s", child.slot, code, child.delay
                    )
                    child.delay = min(child.delay * 2, RESTART_MAX_SECONDS)
                if (
                    child.process is None
                    and not stopping.is_set()
                    and child.restart_at
                    and now >= child.restart_at
                ):
                    child.restart_at = 0.0
                    child.restarts += 1
                    spawn(child)
            if stopping.is_set() and all(c.process is None for c in children):
                break
            time.sleep(0.2)
    finally:
        _on_signals(signal.SIG_DFL)
        forward(signal.SIGTERM)
        health.stop()
    return fatal[0] if fatal else 0
