"""Prometheus rules pass promtool's checks and unit tests; rules and dashboard only use metrics
that exist."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from worker.mt5.bridge import metrics as bridge_metrics
from worker.observability import metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
# RabbitMQ's rabbitmq_prometheus plugin (per-object endpoint) and Prometheus itself
EXTERNAL = {"rabbitmq_queue_messages_ready", "rabbitmq_queue_messages_unacked", "up"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool is missing (apt-get install prometheus); CI must run it")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def run(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_rules_are_valid() -> None:
    done = run("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_rules_unit_tests_pass() -> None:
    done = run("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_config_is_valid(tmp_path: Path) -> None:
    # the config names the rules by their path inside the container
    config = (PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8")
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/alerts.yml", str(PROMETHEUS / "alerts.yml")),
        encoding="utf-8",
    )
    done = run("check", "config", "prometheus.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def _known_series() -> set[str]:
    known = set(EXTERNAL)
    for name in [*metrics.metric_names(), *bridge_metrics.metric_names()]:
        known.add(name)
        known.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
    return known


def _referenced(expression: str) -> set[str]:
    return set(re.findall(r"\b((?:execution_worker|rabbitmq|mt5_bridge)_[a-z_]+|up)\b", expression))


def _alert_expressions() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, object]:
    [path] = (GRAFANA / "dashboards").glob("*.json")
    document: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
    return document


def _panel_expressions(dashboard: dict[str, object]) -> list[str]:
    panels = dashboard["panels"]
    assert isinstance(panels, list)
    return [
        target["expr"]
        for panel in panels
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def test_rules_only_use_existing_metrics() -> None:
    unknown = set().union(*map(_referenced, _alert_expressions())) - _known_series()
    assert not unknown, f"alerts.yml uses undefined metrics {unknown}"


def test_every_required_alert_exists() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {
        "ExecutionRequestsNotConsumed",
        "ExecutionDeadLetters",
        "ExecutionUnknownOutcomes",
        "ExecutionSlippageBreaches",
        "ExecutionSessionsUnhealthy",
        "ExecutionOutboxBacklog",
        "MT5BridgeRefusalSpike",
    } <= names
    doc = (ROOT / "docs" / "METRICS.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in doc for name in names)


def test_dashboard_panels_use_existing_metrics_and_cover_the_essentials() -> None:
    dashboard = _dashboard()
    expressions = _panel_expressions(dashboard)
    used = set().union(*map(_referenced, expressions))
    assert not used - _known_series(), f"dashboard uses undefined metrics {used - _known_series()}"
    for essential in (
        "execution_worker_requests_received_total",
        "execution_worker_executions_total",
        "execution_worker_stage_duration_seconds_bucket",
        "execution_worker_end_to_end_seconds_bucket",
        "execution_worker_slippage_pips_bucket",
        "execution_worker_fill_ratio_bucket",
        "execution_worker_sessions_unhealthy",
        "execution_worker_outbox_backlog",
        "execution_worker_dead_lettered_total",
        "mt5_bridge_refusals_total",
        "mt5_bridge_calls_total",
        "mt5_bridge_call_duration_seconds_bucket",
        "mt5_bridge_connected_clients",
    ):
        assert essential in used, essential
    panels = dashboard["panels"]
    assert isinstance(panels, list)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_grafana_provisioning_points_at_the_dashboard_and_datasource() -> None:
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "provider.yml").read_text(encoding="utf-8")
    )
    [provider] = providers["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard_text = json.dumps(_dashboard())
    assert source["uid"] in dashboard_text


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    expressions = [
        expr.replace("$__rate_interval", "5m") for expr in _panel_expressions(_dashboard())
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{index}", "expr": expr}
                    for index, expr in enumerate(expressions)
                ],
            }
        ]
    }
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules), encoding="utf-8")
    done = run("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
