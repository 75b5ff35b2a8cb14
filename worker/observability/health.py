"""The operator HTTP endpoint on METRICS_PORT: ``/metrics``, ``/healthz``, ``/readyz``.

::

    server = HealthServer(port=settings.metrics_port).start()   # port 0 = any free port
    server.port -> int                                # the bound port
    server.beat() -> None                             # the runtime's loop: "I am not stuck"
    server.add_check("rabbitmq", rabbitmq_check(url)) # readiness: Callable[[], bool]
    server.add_check("database", database_check(url))
    server.add_check_group(service.readiness)         # Callable[[], Mapping[str, bool]]
    server.add_liveness_check("children", fn)         # extra liveness (e.g. a supervisor)
    server.add_detail("rabbitmq", fn)                 # readiness body: what it is connected to
    server.stop() -> None

- ``/metrics``: the Prometheus exposition; with ``PROMETHEUS_MULTIPROC_DIR`` set it merges
  every process's metrics. The callback gauges (worker.observability.metrics.refresh) are
  read first.
- ``/healthz``: 200 while the last ``beat()`` is younger than ``stall_after_seconds`` (the
  clock starts when the server is created) and every liveness check passes, else 503.
  Body: ``{"status": "ok"|"stalled", "heartbeat_age_seconds": ..., "checks": {...}}``.
- ``/readyz``: 200 when every readiness check returns True, else 503 (also with no checks
  registered: nothing says the worker can work). A check that raises counts as False; the
  exception is logged (redacted), never put in the body.
  Body: ``{"status": "ready"|"not_ready", "checks": {"rabbitmq": true, ...}}``, and with
  details registered ``"details": {"rabbitmq": {"node": "rmq-1:5672"}, "database":
  {"timeline": 2, "synchronous_standby": true, ...}}`` (names and flags, never secrets).

``database_check(url)`` and ``rabbitmq_check(url)`` open a real connection on each call
(bounded by ``timeout``); a runtime that holds a connection may register a cheaper check
instead, e.g. ``lambda: connection.is_open``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from worker.observability import metrics

Check = Callable[[], bool]
Detail = Callable[[], Mapping[str, Any]]
CheckGroup = Callable[[], Mapping[str, bool]]

_log = logging.getLogger(__name__)


def _run_check(name: str, check: Check) -> bool:
    try:
        return bool(check())
    except Exception:
        _log.warning("health check %s failed", name, exc_info=True)
        return False


def _run_detail(name: str, detail: Detail) -> dict[str, Any]:
    try:
        return dict(detail())
    except Exception:
        _log.warning("readiness detail %s failed", name, exc_info=True)
        return {"error": True}


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` served by a daemon thread."""

    def __init__(
        self,
        port: int,
        host: str = "0.0.0.0",
        *,
        stall_after_seconds: float = 30.0,
        multiprocess_dir: str | None = None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._host = host
        self._requested_port = port
        self.stall_after_seconds = stall_after_seconds
        self._multiprocess_dir = multiprocess_dir or metrics.multiprocess_dir()
        self._registry = registry
        self._last_beat = time.monotonic()
        self._checks: dict[str, Check] = {}
        self._groups: list[CheckGroup] = []
        self._liveness: dict[str, Check] = {}
        self._details: dict[str, Detail] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- registration, called by the runtime ---

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def add_check(self, name: str, check: Check) -> None:
        with self._lock:
            self._checks[name] = check

    def add_check_group(self, group: CheckGroup) -> None:
        with self._lock:
            self._groups.append(group)

    def add_liveness_check(self, name: str, check: Check) -> None:
        with self._lock:
            self._liveness[name] = check

    def add_detail(self, name: str, detail: Detail) -> None:
        """Readiness body only (never the verdict): e.g. the RabbitMQ node connected to."""
        with self._lock:
            self._details[name] = detail

    # --- lifecycle ---

    def start(self) -> HealthServer:
        server = ThreadingHTTPServer((self._host, self._requested_port), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="health-http", daemon=True
        )
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("HealthServer not started")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the three answers ---

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self._last_beat
        with self._lock:
            checks = dict(self._liveness)
        results = {name: _run_check(name, check) for name, check in checks.items()}
        alive = age < self.stall_after_seconds and all(results.values())
        body: dict[str, Any] = {
            "status": "ok" if alive else "stalled",
            "heartbeat_age_seconds": round(age, 3),
            "stall_after_seconds": self.stall_after_seconds,
            "checks": results,
        }
        return alive, body

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        with self._lock:
            checks = dict(self._checks)
            groups = list(self._groups)
            details = dict(self._details)
        results = {name: _run_check(name, check) for name, check in checks.items()}
        for group in groups:
            try:
                results.update({name: bool(ok) for name, ok in group().items()})
            except Exception:
                _log.warning("health check group failed", exc_info=True)
                results["readiness"] = False
        ready = bool(results) and all(results.values())
        body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "checks": results}
        if details:
            body["details"] = {name: _run_detail(name, detail) for name, detail in details.items()}
        return ready, body

    def exposition(self) -> bytes:
        metrics.record_ready(self.readiness()[0])
        metrics.refresh()
        if self._multiprocess_dir is None:
            return generate_latest(self._registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


def _handler_for(health: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "execution-worker"
        sys_version = ""

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(HTTPStatus.OK, health.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send_json(*health.liveness())
            elif path == "/readyz":
                self._send_json(*health.readiness())
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

        def _send_json(self, ok: bool, body: dict[str, Any]) -> None:
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            payload = (json.dumps(body) + "\n").encode()
            self._send(status, payload, "application/json")

        def _send(self, status: HTTPStatus, payload: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            _log.debug("health http: " + format, *args)

    return Handler


# --- checks others register --------------------------------------------------------------


def database_check(url: str, timeout: float = 2.0) -> Check:
    """True when PostgreSQL at ``url`` accepts a connection and answers ``SELECT 1``."""
    import psycopg

    def check() -> bool:
        try:
            with psycopg.connect(url, connect_timeout=max(1, round(timeout))) as conn:
                conn.execute("SELECT 1").fetchone()
            return True
        except psycopg.Error:
            return False

    return check


def rabbitmq_check(url: str, timeout: float = 2.0) -> Check:
    """True when RabbitMQ at ``url`` completes an AMQP handshake (then closes it)."""
    import pika
    import pika.exceptions

    def check() -> bool:
        # a cluster is comma-separated URLs (worker/amqp/nodes.py): any node answering will do
        every = [pika.URLParameters(part) for part in url.split(",") if "://" in part]
        for params in every:
            params.socket_timeout = timeout
            params.blocked_connection_timeout = timeout
            params.stack_timeout = timeout
            params.connection_attempts = 1
        try:
            connection = pika.BlockingConnection(every)
        except (pika.exceptions.AMQPError, OSError):
            return False
        try:
            return bool(connection.is_open)
        finally:
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()

    return check
