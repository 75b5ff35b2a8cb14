"""Readiness names what the worker is connected to, without changing the verdict."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from worker.observability.health import HealthServer


def _server() -> HealthServer:
    return HealthServer(0, registry=CollectorRegistry())


def test_details_are_in_the_body_and_not_in_the_verdict() -> None:
    health = _server()
    health.add_check("rabbitmq", lambda: True)
    health.add_detail("rabbitmq", lambda: {"node": "rmq-1:5672"})
    health.add_detail("database", lambda: {"timeline": 2, "synchronous_standby": False})
    ready, body = health.readiness()
    assert ready and body["checks"] == {"rabbitmq": True}
    assert body["details"] == {
        "rabbitmq": {"node": "rmq-1:5672"},
        "database": {"timeline": 2, "synchronous_standby": False},
    }


def test_a_failing_detail_says_so_without_its_message() -> None:
    health = _server()
    health.add_check("rabbitmq", lambda: True)

    def broken() -> dict[str, object]:
        raise RuntimeError("postgresql://u:hunter2@db/x")

    health.add_detail("database", broken)
    ready, body = health.readiness()
    assert ready and body["details"]["database"] == {"error": True}
    assert "hunter2" not in str(body)


def test_no_details_no_key() -> None:
    health = _server()
    health.add_check("rabbitmq", lambda: False)
    ready, body = health.readiness()
    assert not ready and "details" not in body
