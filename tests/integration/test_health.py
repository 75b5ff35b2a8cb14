"""/metrics, /healthz and /readyz over real HTTP, with real PostgreSQL and RabbitMQ checks."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.observability import metrics
from worker.observability.health import HealthServer, database_check, rabbitmq_check

pytestmark = pytest.mark.integration


def get(server: HealthServer, path: str) -> tuple[int, str, str]:
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def server() -> Iterator[HealthServer]:
    with HealthServer(port=0, host="127.0.0.1", stall_after_seconds=30.0) as running:
        yield running
    metrics.clear_state_readers()


def test_port_zero_binds_a_free_port_and_unknown_paths_are_404(server: HealthServer) -> None:
    assert server.port > 0
    status, _, _ = get(server, "/nope")
    assert status == 404


def test_metrics_endpoint_serves_the_exposition_with_fresh_state(server: HealthServer) -> None:
    metrics.register_outbox_state(lambda: metrics.OutboxState(backlog=3, oldest_age_seconds=4.5))
    metrics.record_outcome("FILLED")
    status, content_type, body = get(server, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    assert samples[("execution_worker_outbox_backlog", ())] == 3
    assert samples[("execution_worker_outbox_oldest_age_seconds", ())] == 4.5
    filled = (("account", "none"), ("reason", "none"), ("status", "filled"))
    before = samples[("execution_worker_executions_total", filled)]
    metrics.record_outcome("FILLED")
    _, _, again = get(server, "/metrics")
    after = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(again)
        for s in f.samples
    }
    assert after[("execution_worker_executions_total", filled)] == before + 1


def test_healthz_follows_the_heartbeat() -> None:
    with HealthServer(port=0, host="127.0.0.1", stall_after_seconds=0.0) as stalled:
        status, content_type, body = get(stalled, "/healthz")
        assert status == 503 and content_type == "application/json"
        assert json.loads(body)["status"] == "stalled"
        stalled.stall_after_seconds = 3600.0
        stalled.beat()
        status, _, body = get(stalled, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        stalled.add_liveness_check("children", lambda: False)
        status, _, body = get(stalled, "/healthz")
        assert status == 503 and json.loads(body)["checks"] == {"children": False}


def test_readyz_flips_with_its_checks(
    server: HealthServer, database_url: str, rabbitmq_url: str
) -> None:
    status, _, body = get(server, "/readyz")
    assert status == 503 and json.loads(body) == {"status": "not_ready", "checks": {}}

    sessions_healthy = threading.Event()
    server.add_check("database", database_check(database_url))
    server.add_check("rabbitmq", rabbitmq_check(rabbitmq_url))
    server.add_check_group(lambda: {"sessions": sessions_healthy.is_set()})
    status, _, body = get(server, "/readyz")
    assert status == 503
    assert json.loads(body)["checks"] == {"database": True, "rabbitmq": True, "sessions": False}

    sessions_healthy.set()
    status, _, body = get(server, "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"

    def broken() -> bool:
        raise RuntimeError("boom")

    server.add_check("broken", broken)
    status, _, body = get(server, "/readyz")
    assert status == 503 and json.loads(body)["checks"]["broken"] is False


def test_real_checks_fail_for_unreachable_or_unauthorised_services(
    database_url: str, rabbitmq_url: str
) -> None:
    assert database_check(database_url)() is True
    assert rabbitmq_check(rabbitmq_url)() is True
    missing_db = urlunsplit(urlsplit(database_url)._replace(path="/ew_no_such_database"))
    assert database_check(missing_db, timeout=2)() is False
    assert database_check("postgresql://postgres@127.0.0.1:1/x", timeout=1)() is False
    assert rabbitmq_check(with_password(rabbitmq_url, "wrong-password"), timeout=2)() is False
    assert rabbitmq_check("amqp://guest:guest@127.0.0.1:1/%2F", timeout=1)() is False


def test_readyz_body_never_carries_a_url_or_password(server: HealthServer) -> None:
    secret_url = "amqp://guest:Hunter2Secret@127.0.0.1:1/%2F"
    server.add_check("rabbitmq", rabbitmq_check(secret_url, timeout=1))
    status, _, body = get(server, "/readyz")
    assert status == 503
    assert "Hunter2Secret" not in body and "127.0.0.1" not in body
