"""``execution-worker bench``: the worker against the floor of durable work, on real services.

Every figure comes from ONE invocation, so that the noise of a shared machine hits the worker
and the floor alike. The bench isolates itself: a vhost of its own (``rabbitmqctl add_vhost``,
or ``--vhost-url``) and a database of its own, dropped at the end. The worker runs as
``execution-worker run`` in a child process (in-process simulated sessions, never closed,
netting account, ample balance); the floor (worker/tools/bench/floor.py) in another. The bench
process is only the client: it publishes RPM approvals and times their confirmations.

1. overhead: publish -> confirmation, one message at a time, worker (1 session) and floor
   (1 consumer) running side by side and taking turns message by message; then at 100
   msg/s offered with ``prefetch`` in flight, in alternating rounds, each latency timed from
   the message's intended send time (no coordinated omission);
2. throughput: a backlog drained by the worker (n sessions, latency 0) and by the floor
   (n consumers, each with prefetch 1: the same messages in flight) for n = ``prefetch``, 4,
   8 and 16, all in alternating rounds, with the CPU per message of the worker or floor
   process and of PostgreSQL's backends (worker/tools/bench/cpu.py); and the worker's
   ``prefetch`` sessions split over two processes;
3. scaling: worker throughput with 1, 2, 4, 8 sessions at 20 ms ``order_send`` latency, in
   two rounds of 1, 2, 4, 8;
4. memory: worker RSS after 1k and after 50k messages. The simulated terminals run in their
   own processes here (``sim-terminal`` behind the bridge, as a real terminal would), so the
   worker's RSS does not include the simulated broker's ever-growing deal history.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pika.exceptions
import psycopg

from worker.amqp.topology import (
    CONFIRMATIONS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_QUEUE,
    REQUESTS_QUEUE,
    dead_queue_arguments,
    requests_queue_arguments,
)
from worker.config import Settings, load_settings, mask_url
from worker.errors import WorkerError
from worker.tools.bench import cpu as bench_cpu
from worker.tools.bench import report as bench_report
from worker.tools.bench.floor import FLOOR_EXCHANGE, FLOOR_QUEUE, declare_floor
from worker.tools.publish import OutgoingMessage, approved_trade, publish_messages, rpm_output

RESULTS_DIR = "bench-results"
STOP_TIMEOUT_SECONDS = 45.0
# the instant a message of the offered-rate runs was due to be sent, in microseconds since the
# epoch: its latency runs from there, not from the (maybe later) actual send
INTENDED_HEADER = "x-bench-intended-us"
START_TIMEOUT_SECONDS = 90.0
SIM_SYMBOL = "EURUSD"
UNITS = 10_000.0  # 0.1 lots


class BenchError(WorkerError):
    """The bench cannot go on; one line, safe to print (no secrets)."""


@dataclass(frozen=True)
class Counts:
    warmup: int  # unrecorded messages before each latency run
    serial: int  # one at a time
    rated: int  # at ``rate`` msg/s offered
    rate: float
    throughput: int  # backlog drained by the worker and by the floor
    prefetch: int
    scaling_per_session: int  # backlog per session in the scaling runs
    scaling_latency_ms: float
    memory_first: int  # RSS sample "1k"
    memory_total: int  # RSS sample "50k"
    memory_sessions: int


FULL = Counts(
    warmup=30,
    serial=500,
    rated=1000,
    rate=100.0,
    throughput=3000,
    prefetch=4,
    scaling_per_session=150,
    scaling_latency_ms=20.0,
    memory_first=1000,
    memory_total=50_000,
    memory_sessions=4,  # bridge calls wait on I/O: more sessions, faster run
)
QUICK = Counts(
    warmup=2,
    serial=10,
    rated=15,
    rate=100.0,
    throughput=160,  # 80 a round: waves of 16 in flight, so the CPU figures count some
    prefetch=4,
    scaling_per_session=3,
    scaling_latency_ms=20.0,
    memory_first=10,
    memory_total=30,
    memory_sessions=2,
)


# ----------------------------------------------------------------------------- isolation


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def _rabbitmqctl(*args: str) -> None:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise BenchError(f"rabbitmqctl {args[0]} failed: {' '.join(last)}")


@contextlib.contextmanager
def isolated_vhost(admin_url: str, given_url: str | None) -> Iterator[str]:
    """A vhost of the bench's own: created and deleted with rabbitmqctl, or ``--vhost-url``."""
    if given_url:
        yield given_url
        return
    if shutil.which("rabbitmqctl") is None:
        raise BenchError(
            "rabbitmqctl is not available to create the bench's own vhost; "
            "pass --vhost-url with the URL of an empty vhost reserved for the bench"
        )
    name = f"ew_bench_{uuid.uuid4().hex[:10]}"
    user = urlsplit(admin_url).username or "guest"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        yield _with_path(admin_url, "/" + quote(name, safe=""))
    finally:
        with contextlib.suppress(BenchError, OSError, subprocess.SubprocessError):
            _rabbitmqctl("delete_vhost", name)


@contextlib.contextmanager
def isolated_database(admin_url: str) -> Iterator[str]:
    """A database of the bench's own, dropped at the end."""
    name = f"ew_bench_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        raise BenchError(
            f"cannot create the bench database at {mask_url(admin_url)}: {type(exc).__name__}"
        ) from None
    try:
        yield _with_path(admin_url, f"/{name}")
    finally:
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(admin_url, autocommit=True) as conn,
        ):
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ----------------------------------------------------------------------------- client


def _client_parameters(url: str, name: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = 0  # the client idles while a phase runs; never time it out
    params.client_properties = {"connection_name": name}
    return params


class Arrivals:
    """Confirmations of the worker and of the floor, timed as they arrive (own thread)."""

    def __init__(self, url: str) -> None:
        self.times: dict[str, float] = {}
        self.statuses: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise BenchError(f"cannot consume confirmations: {self._error!r}")

    def _run(self, url: str) -> None:
        try:
            connection = pika.BlockingConnection(_client_parameters(url, "bench observer"))
            channel = connection.channel()
            channel.exchange_declare(CONFIRMATIONS_EXCHANGE, exchange_type="topic", durable=True)
            channel.exchange_declare(FLOOR_EXCHANGE, exchange_type="topic", durable=True)
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue, CONFIRMATIONS_EXCHANGE, "confirmation.#")
            channel.queue_bind(queue, FLOOR_EXCHANGE, "#")
            channel.basic_consume(queue, self._on_message, auto_ack=True)
        except Exception as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.1)
        except Exception as exc:
            self._error = exc
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    def _on_message(self, _channel: Any, _method: Any, properties: Any, body: bytes) -> None:
        now = time.perf_counter()
        key = properties.correlation_id
        try:
            status = str(json.loads(body).get("status"))
        except ValueError:
            status = "unparsable"
        with self._cond:
            if key not in self.times:
                self.times[key] = now
                self.statuses[status] += 1
            self._cond.notify_all()

    def wait(self, keys: Sequence[str], timeout: float, on_progress: Progressed) -> None:
        """Until every key arrived; raises BenchError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                done = sum(1 for key in keys if key in self.times)
                on_progress(done, len(keys))
                if done == len(keys):
                    return
                if self._error is not None:
                    raise BenchError(f"observer failed: {type(self._error).__name__}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"timed out: {done} of {len(keys)} confirmations arrived")
                self._cond.wait(min(left, 0.5))

    def wait_first(self, keys: Sequence[str], timeout: float) -> None:
        """Until any one of ``keys`` arrived; raises BenchError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(key in self.times for key in keys):
                if self._error is not None:
                    raise BenchError(f"observer failed: {type(self._error).__name__}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"timed out: none of {len(keys)} confirmations arrived")
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


Progressed = Callable[[int, int], None]


class Publisher:
    """Requests, one at a time with a publisher confirm each (main thread only)."""

    def __init__(self, url: str, delivery_limit: int) -> None:
        self.connection = pika.BlockingConnection(_client_parameters(url, "bench publisher"))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        # the worker's topology, so a backlog can wait in the queue before a worker starts
        channel = self.channel
        channel.exchange_declare(DEAD_LETTER_EXCHANGE, exchange_type="fanout", durable=True)
        channel.queue_declare(DEAD_QUEUE, durable=True, arguments=dead_queue_arguments())
        channel.queue_bind(DEAD_QUEUE, DEAD_LETTER_EXCHANGE, routing_key="#")
        channel.queue_declare(
            REQUESTS_QUEUE, durable=True, arguments=requests_queue_arguments(delivery_limit)
        )
        channel.exchange_declare(CONFIRMATIONS_EXCHANGE, exchange_type="topic", durable=True)
        declare_floor(channel)

    @property
    def server_version(self) -> str | None:
        properties = getattr(self.connection._impl, "server_properties", None)
        return bench_report.rabbitmq_version(properties)

    def publish(self, queue: str, message: OutgoingMessage) -> None:
        self.channel.basic_publish(
            "", queue, message.body, properties=message.properties(), mandatory=True
        )

    def consumers(self, queue: str) -> int:
        count: int = self.channel.queue_declare(queue, passive=True).method.consumer_count
        return count

    def messages(self, queue: str) -> int:
        count: int = self.channel.queue_declare(queue, passive=True).method.message_count
        return count

    def sleep(self, seconds: float) -> None:
        self.connection.sleep(seconds)

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            self.connection.close()


def approvals(prefix: str, count: int) -> list[OutgoingMessage]:
    """``count`` EURUSD approvals, buys and sells alternating (no position piles up)."""
    messages = []
    for i in range(count):
        trade = approved_trade(SIM_SYMBOL, 1 if i % 2 == 0 else -1, UNITS)
        order_id = f"{prefix}-{i}"
        body = json.dumps(rpm_output(trade, order_id=order_id)).encode()
        messages.append(OutgoingMessage(body, order_id, correlation_id=order_id))
    return messages


def stamped(message: OutgoingMessage, intended_epoch_s: float) -> OutgoingMessage:
    """``message`` with its intended send time (epoch seconds) in ``INTENDED_HEADER``, in µs."""
    headers = {**(message.headers or {}), INTENDED_HEADER: round(intended_epoch_s * 1e6)}
    return dataclasses.replace(message, headers=headers)


# ----------------------------------------------------------------------------- targets

ROUNDS = 2  # alternating rounds of each drained figure: a slow spell hits both sides
SCALING_SESSIONS = (1, 2, 4, 8)
INFLIGHT = (4, 8, 16)  # messages in flight of the drained throughput runs


def _shares(count: int) -> list[int]:
    """``count`` split over ``ROUNDS`` rounds of at least 2 messages (a rate needs two)."""
    rounds = max(1, min(ROUNDS, count // 2))
    return [count // rounds + (1 if index < count % rounds else 0) for index in range(rounds)]


@dataclass(frozen=True)
class Drained:
    """Messages after the first confirmation of a backlog, the seconds they took, and the
    CPU the consumer and PostgreSQL spent meanwhile."""

    messages: int
    seconds: float
    cpu: bench_cpu.Cost = field(default_factory=bench_cpu.Cost)

    def __add__(self, other: Drained) -> Drained:
        return Drained(
            self.messages + other.messages, self.seconds + other.seconds, self.cpu + other.cpu
        )

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("nan")


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


def sim_config_toml(order_send_latency_ms: float) -> str:
    """Simulator settings for the bench: open all week, netting, ample balance, friendly.

    The bench measures what the worker adds to the broker's own latency, against a floor that
    has no broker at all: a hardened server's deal lag (hundreds of ms per fill, which the
    worker rightly waits for) would be the server's time, not the worker's. Correctness
    against the hardened server is the fault suite's and the tests' job.
    """
    text = (
        "[account]\nbalance = 1000000000000.0\nmargin_mode = 0\n\n"
        f"[symbols.{SIM_SYMBOL}]\nclosed_weekly = []\n\n"
        '[faults]\npreset = "friendly"\n'
    )
    if order_send_latency_ms > 0:
        text += f"\n[faults.latency_by_function]\norder_send = {order_send_latency_ms}\n"
    return text


def _free_port_block(size: int) -> int:
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


def _wait_listening(port: int, child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child.check_alive()
        with socket.socket() as probe:
            probe.settimeout(0.5)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise BenchError(f"{child.name} did not listen on port {port}")


class Bench:
    """The phases, sharing one vhost, one database, one observer and one publisher."""

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

    def _stop(self, child: Child) -> None:
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
    ) -> Child:
        """``execution-worker run`` with ``sessions`` in all (``sessions // processes`` each)."""
        env = self._base_env()
        env["GROUP_COMMIT"] = "true" if group_commit else "false"
        if bridge is None:
            config = self.workdir / f"sim-{latency_ms:g}.toml"
            config.write_text(sim_config_toml(latency_ms))
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
        child = self._start(f"worker {sessions} sessions", command, env)
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
        port = _free_port_block(count)
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
            _wait_listening(port + i, child, START_TIMEOUT_SECONDS)
        return port, secret

    def _wait_consumers(self, queue: str, count: int, child: Child) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while self.publisher.consumers(queue) < count:
            child.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{child.name} did not start consuming: {child.log_tail()}")
            self.publisher.sleep(0.05)

    # --- measurements ---------------------------------------------------------------------

    def _messages(self, phase: str, count: int) -> list[OutgoingMessage]:
        return approvals(f"bench-{self.run_id}-{phase}", count)

    def serial(self, targets: Sequence[Target]) -> dict[str, list[float]]:
        """One message at a time, to each target in turn: publish, wait, next.

        Both targets run side by side and take turns message by message, so a slow spell
        of the machine slows both alike.
        """
        per_target = self.counts.warmup + self.counts.serial
        messages = {t.label: self._messages(f"{t.label}-serial", per_target) for t in targets}
        names = " and ".join(t.label for t in targets)
        self.progress.start(f"{names}: one at a time")
        latencies: dict[str, list[float]] = {t.label: [] for t in targets}
        for index in range(per_target):
            for target in targets:
                message = messages[target.label][index]
                key = message.message_id or ""
                sent = time.perf_counter()
                self.publisher.publish(target.queue, message)
                self.arrivals.wait([key], 30.0, lambda _d, _t: None)
                if index >= self.counts.warmup:
                    latencies[target.label].append(self.arrivals.times[key] - sent)
                if index % 20 == 0:
                    target.child.check_alive()
            self.progress.update(index + 1, per_target)
        self.progress.finish(
            ", ".join(
                f"{label} p50 {bench_report.summary_ms(values)['p50']:.2f} ms"
                for label, values in latencies.items()
            )
        )
        return latencies

    def rated(self, label: str, queue: str, child: Child, count: int) -> list[float]:
        """``count`` messages at ``rate`` msg/s offered on a fixed schedule, whatever the
        answers do (after ``warmup`` unrecorded ones).

        Each latency runs from the message's *intended* send time (``start + i / rate``,
        stamped in its ``INTENDED_HEADER``), not from when the publisher got round to it:
        a publish that waits behind a slow one would otherwise hide that wait (coordinated
        omission).
        """
        warm = self._messages(f"{label}-ratewarm", self.counts.warmup)
        for message in warm:
            self.publisher.publish(queue, message)
        self.arrivals.wait([m.message_id or "" for m in warm], 60.0, lambda _d, _t: None)
        messages = self._messages(f"{label}-rated", count)
        interval = 1.0 / self.counts.rate
        self.progress.start(f"{label}: {self.counts.rate:g} msg/s")
        intended: dict[str, float] = {}
        start = time.perf_counter()
        epoch_offset = time.time() - time.perf_counter()  # perf_counter -> epoch seconds
        for index, message in enumerate(messages):
            due = start + index * interval
            pause = due - time.perf_counter()
            if pause > 0:
                self.publisher.sleep(pause)
            key = message.message_id or ""
            intended[key] = due
            self.publisher.publish(queue, stamped(message, due + epoch_offset))
            self.progress.update(index + 1, len(messages))
        child.check_alive()
        self.arrivals.wait(list(intended), 120.0, lambda _d, _t: None)
        latencies = [self.arrivals.times[key] - due for key, due in intended.items()]
        self.progress.finish(f"p50 {bench_report.summary_ms(latencies)['p50']:.2f} ms")
        return latencies

    def backlog(self, phase: str, queue: str, count: int) -> list[str]:
        """Publish ``count`` requests (async confirms) for a consumer started afterwards."""
        messages = self._messages(phase, count)
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

    def drain(self, label: str, keys: Sequence[str], child: Child) -> Drained:
        """The time between the first and the last confirmation of a backlog, and the CPU
        of ``child`` (with its descendants) and of the database's backends in between.

        The CPU counters are read when the first confirmation has arrived (so the start-up
        of the child is left out) and again at the last; the messages they are divided by
        are the confirmations that arrived after the first reading.
        """
        self.progress.start(label)

        def progressed(done: int, total: int) -> None:
            self.progress.update(done, total)
            if done < total:
                child.check_alive()

        timeout = max(120.0, len(keys) / 5.0)
        self.arrivals.wait_first(keys, timeout)
        before = bench_cpu.sample(child.process.pid, self.backends)
        self.arrivals.wait(keys, timeout, progressed)
        after = bench_cpu.sample(child.process.pid, self.backends)
        times = sorted(self.arrivals.times[key] for key in keys)
        counted = sum(1 for at in times if at > before.at)
        cost = bench_cpu.cost(before, after, counted)
        drained = Drained(len(times) - 1, times[-1] - times[0], cost)
        self.progress.finish(
            f"{drained.rate:.1f} msg/s, CPU/msg {cost.process_ms:.3f} ms"
            f" + PostgreSQL {cost.postgres_ms:.3f} ms"
        )
        return drained

    def drain_in_rounds(
        self, phase: str, starts: Sequence[tuple[str, str, Callable[[], Child]]], count: int
    ) -> dict[str, Drained]:
        """Each target's backlog drained over ``ROUNDS`` alternating rounds of ``count`` in all.

        ``starts``: (label, queue, start) per target; each round fills the target's queue,
        starts its consumer and drains the backlog, so slow spells are shared.
        """
        totals = {label: Drained(0, 0.0) for label, _, _ in starts}
        for index, share in enumerate(_shares(count)):
            for label, queue, start in starts:
                keys = self.backlog(f"{phase}-{label}-{index}", queue, share)
                child = start()
                drained = self.drain(f"{label}: backlog {share}", keys, child)
                self._stop(child)
                totals[label] = totals[label] + drained
        return totals

    # --- phases ---------------------------------------------------------------------------

    def overhead(self) -> dict[str, Any]:
        """One at a time: the worker with 1 session and the floor with 1 consumer, in turn."""
        floor = Target("floor", FLOOR_QUEUE, self.start_floor(1))
        worker = Target("worker", REQUESTS_QUEUE, self.start_worker(1))
        latencies = self.serial([floor, worker])
        self._stop(worker.child)
        self._stop(floor.child)
        self.samples["worker, one at a time"] = latencies["worker"]
        self.samples["floor, one at a time"] = latencies["floor"]
        return {
            "overhead_ms": bench_report.summary_ms(latencies["worker"]),
            "floor_ms": bench_report.summary_ms(latencies["floor"]),
        }

    def throughput(self) -> dict[str, Any]:
        """At ``prefetch`` in flight: latency at the offered rate, then a backlog drained.

        The worker and the floor take turns: two rounds each of the offered rate (both
        running, one of them idle), then alternating rounds of the backlog.
        """
        prefetch, count, rate = self.counts.prefetch, self.counts.throughput, self.counts.rate
        floor = self.start_floor(prefetch)
        worker = self.start_worker(prefetch)
        rated: dict[str, list[float]] = {"floor": [], "worker": []}
        for index, share in enumerate(_shares(self.counts.rated)):
            for label, queue, child in (
                ("floor", FLOOR_QUEUE, floor),
                ("worker", REQUESTS_QUEUE, worker),
            ):
                rated[label] += self.rated(f"{label} x{prefetch} #{index + 1}", queue, child, share)
        self._stop(worker)
        self._stop(floor)
        inflight = self._drain_inflight(sorted({prefetch, *INFLIGHT}), count)
        floor_rate, worker_rate = (
            inflight[prefetch]["floor"].rate,
            inflight[prefetch]["worker"].rate,
        )
        # the same sessions over two processes (``run --processes 2``): two GILs
        split = 2 if prefetch % 2 == 0 else 1
        keys = self.backlog("worker-processes", REQUESTS_QUEUE, count)
        child = self.start_worker(prefetch, processes=split)
        label = f"worker {split}x{prefetch // split} sessions: backlog {count}"
        split_rate = self.drain(label, keys, child).rate
        self._stop(child)
        self.samples[f"worker, {rate:g} msg/s"] = rated["worker"]
        self.samples[f"floor, {rate:g} msg/s"] = rated["floor"]
        return {
            "overhead_100_ms": bench_report.summary_ms(rated["worker"]),
            "floor_100_ms": bench_report.summary_ms(rated["floor"]),
            "throughput": {"worker": round(worker_rate, 1), "floor": round(floor_rate, 1)},
            "throughput_ratio": round(worker_rate / floor_rate, 3),
            "throughput_inflight": {
                str(n): {side: round(inflight[n][side].rate, 1) for side in ("worker", "floor")}
                for n in INFLIGHT
            },
            "throughput_inflight_ratio": {
                str(n): round(inflight[n]["worker"].rate / inflight[n]["floor"].rate, 3)
                for n in INFLIGHT
            },
            "cpu_ms_per_message": _cpu_figures(inflight[prefetch]),
            "group_commit": _group_commit_figures(inflight[min(prefetch, *INFLIGHT)]),
            "cpu_ms_per_message_inflight": {str(n): _cpu_figures(inflight[n]) for n in INFLIGHT},
            # the confirmations the CPU figures are divided by (after the first reading)
            "cpu_messages": {
                side: inflight[prefetch][side].cpu.messages for side in ("worker", "floor")
            },
            "throughput_processes": {
                "processes": split,
                "worker": round(split_rate, 1),
                "ratio": round(split_rate / floor_rate, 3),
            },
            "prefetch": prefetch,
        }

    def _drain_inflight(self, levels: Sequence[int], count: int) -> dict[int, dict[str, Drained]]:
        """A backlog of ``count`` drained by the floor (n consumers, prefetch 1 each) and by
        the worker (n sessions, prefetch n) at each level n, all of them taking turns."""
        starts: list[tuple[str, str, Callable[[], Child]]] = []
        for n in levels:
            starts.append((f"floor x{n}", FLOOR_QUEUE, functools.partial(self.start_floor, n)))
            starts.append(
                (f"worker {n} sessions", REQUESTS_QUEUE, functools.partial(self.start_worker, n))
            )
        # GROUP_COMMIT=true at the first level, in the same rounds: what grouping the
        # intents and finals costs or saves on this machine
        grouped = f"worker {levels[0]} sessions, group commit"
        start = functools.partial(self.start_worker, levels[0], group_commit=True)
        starts.insert(2, (grouped, REQUESTS_QUEUE, start))
        drained = self.drain_in_rounds("throughput", starts, count)
        figures = {
            n: {"floor": drained[f"floor x{n}"], "worker": drained[f"worker {n} sessions"]}
            for n in levels
        }
        figures[levels[0]]["group_commit"] = drained[grouped]
        return figures

    def scaling(self) -> dict[str, Any]:
        """1, 2, 4, 8 sessions at ``scaling_latency_ms``, in two alternating rounds."""
        latency = self.counts.scaling_latency_ms
        totals = {sessions: Drained(0, 0.0) for sessions in SCALING_SESSIONS}
        for round_ in range(ROUNDS):
            for sessions in SCALING_SESSIONS:
                share = _shares(sessions * self.counts.scaling_per_session)
                if round_ >= len(share):
                    continue
                keys = self.backlog(f"scaling-{sessions}-{round_}", REQUESTS_QUEUE, share[round_])
                worker = self.start_worker(sessions, latency)
                label = f"worker {sessions} sessions at {latency:g} ms #{round_ + 1}"
                totals[sessions] = totals[sessions] + self.drain(label, keys, worker)
                self._stop(worker)
        rates = {str(sessions): round(totals[sessions].rate, 1) for sessions in SCALING_SESSIONS}
        return {"scaling": rates, "scaling_latency_ms": latency}

    def memory(self) -> dict[str, Any]:
        """Worker RSS after ``memory_first`` and ``memory_total`` messages (bridge sims)."""
        counts = self.counts
        bridge = self.start_sim_terminals(counts.memory_sessions)
        worker = self.start_worker(counts.memory_sessions, bridge=bridge)
        keys = self._messages("memory", counts.memory_total)
        publishing = threading.Thread(
            target=self._publish_quietly, args=(keys,), name="bench-backlog", daemon=True
        )
        publishing.start()
        ids = [m.message_id or "" for m in keys]
        curve: list[tuple[int, float]] = [(0, round(worker.rss_mb(), 1))]
        step = max(1, counts.memory_total // 50)
        checkpoints = sorted({counts.memory_first, *range(step, counts.memory_total + 1, step)})
        self.progress.start(f"memory: worker {counts.memory_sessions} sessions (bridge)")
        done = 0
        started = time.perf_counter()
        for checkpoint in checkpoints:
            self.arrivals.wait(ids[done:checkpoint], 600.0, lambda _d, _t: None)
            worker.check_alive()
            done = checkpoint
            curve.append((checkpoint, round(worker.rss_mb(), 1)))
            self.progress.update(done, counts.memory_total)
        elapsed = time.perf_counter() - started
        publishing.join(60)
        rss = dict(curve)
        self.progress.finish(f"RSS {rss[counts.memory_first]:.1f} -> {rss[counts.memory_total]} MB")
        self._stop(worker)
        return {
            "rss_mb": {"1k": rss[counts.memory_first], "50k": rss[counts.memory_total]},
            "rss_curve": [list(point) for point in curve],
            "memory_messages": {"1k": counts.memory_first, "50k": counts.memory_total},
            "memory_rate": round(counts.memory_total / elapsed, 1),
            "memory_backend": f"bridge, {counts.memory_sessions} sim-terminal processes",
        }

    def _publish_quietly(self, messages: Sequence[OutgoingMessage]) -> None:
        with contextlib.suppress(Exception):
            publish_messages(
                self.amqp_url,
                messages,
                delivery_limit=self.settings.delivery_limit,
                timeout=max(60.0, len(messages) / 50.0),
            )


def _group_commit_figures(sides: dict[str, Drained]) -> dict[str, float]:
    """The worker with GROUP_COMMIT=true beside the default (same level, same rounds)."""
    grouped, plain = sides["group_commit"], sides["worker"]
    return {
        "worker": round(grouped.rate, 1),
        "ratio_to_default": round(grouped.rate / plain.rate, 3),
        "cpu_ms_per_message": round(grouped.cpu.process_ms, 4),
        "postgres_ms_per_message": round(grouped.cpu.postgres_ms, 4),
    }


def _cpu_figures(sides: dict[str, Drained]) -> dict[str, float]:
    """CPU ms per message of the worker and the floor processes and of their PostgreSQL."""
    worker, floor = sides["worker"].cpu, sides["floor"].cpu
    return {
        "worker": round(worker.process_ms, 4),
        "floor": round(floor.process_ms, 4),
        "postgres_worker": round(worker.postgres_ms, 4),
        "postgres_floor": round(floor.postgres_ms, 4),
    }


# ----------------------------------------------------------------------------- main


def run(
    settings: Settings, counts: Counts, vhost_url: str | None, progress: bench_report.Progress
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Every phase, in the bench's own vhost and database; (results, latency samples)."""
    admin_amqp = settings.rabbitmq_url.get_secret_value()
    admin_db = settings.database_url.get_secret_value()
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="ew-bench-"))
    keep_logs = True
    try:
        with (
            isolated_vhost(admin_amqp, vhost_url) as amqp_url,
            isolated_database(admin_db) as database_url,
        ):
            progress.say(f"bench: broker {mask_url(amqp_url)}, database {mask_url(database_url)}")
            bench = Bench(settings, amqp_url, database_url, counts, workdir, progress)
            try:
                if vhost_url and bench.publisher.messages(REQUESTS_QUEUE):
                    raise BenchError(f"{REQUESTS_QUEUE} in --vhost-url is not empty")
                results: dict[str, Any] = {}
                results.update(bench.overhead())
                results.update(bench.throughput())
                results.update(bench.scaling())
                results.update(bench.memory())
                results["statuses"] = dict(bench.arrivals.statuses)
                results["machine"] = bench_report.machine(
                    database_url, bench.publisher.server_version
                )
            finally:
                bench.close()
        keep_logs = False
    except (pika.exceptions.AMQPError, psycopg.Error) as exc:
        raise BenchError(f"{type(exc).__name__}: {exc}") from None
    finally:
        if keep_logs:
            progress.say(f"bench: logs of the child processes kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["goals_met"] = bench_report.goals_met(results)
    results["counts"] = asdict(counts)
    results["quick"] = counts is QUICK
    results["duration_s"] = round(time.perf_counter() - started, 1)
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return results, bench.samples


def default_json_path() -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(RESULTS_DIR) / f"bench-{stamp}.json"


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    counts = QUICK if args.quick else FULL
    progress = bench_report.Progress()
    try:
        results, samples = run(settings, counts, args.vhost_url, progress)
    except BenchError as exc:
        print(f"execution-worker bench: {exc}", file=sys.stderr)
        return 1
    path = Path(args.json_path) if args.json_path else default_json_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(bench_report.table(results), file=sys.stderr)
    print(f"bench: results in {path}", file=sys.stderr)
    if args.plot:
        problem = bench_report.plot(results, samples, args.plot)
        if problem:
            print(f"bench: no plot: {problem}", file=sys.stderr)
        else:
            print(f"bench: plot in {args.plot}", file=sys.stderr)
    return 0
