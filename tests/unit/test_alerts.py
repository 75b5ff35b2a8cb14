"""Prometheus rules pass promtool's checks and unit tests; rules and dashboard only use metrics
that exist."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.mt5.bridge import metrics as bridge_metrics
from worker.observability import metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
# RabbitMQ's rabbitmq_prometheus plugin (per-object endpoint) and Prometheus itself
EXTERNAL = frozenset({"rabbitmq_queue_messages_ready", "rabbitmq_queue_messages_unacked", "up"})


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


def exported_series(exposition: str) -> set[str]:
    """The sample names an exposition really carries, plus what its families will carry:
    a counter's ``_total``, a histogram's ``_bucket`` and ``_count``. A histogram's ``_sum``
    only when the exposition shows one: prometheus_client drops it for a histogram whose
    lowest bucket is negative (execution_worker_slippage_pips)."""
    names = set(EXTERNAL)
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update((family.name + "_bucket", family.name + "_count"))
        else:
            names.add(family.name)
    return names


def _exercised_exposition() -> str:
    """The in-process registry after one call of every helper that creates series."""
    metrics.record_received()
    metrics.record_outcome("FILLED")
    metrics.observe_stage("submit", 0.1)
    metrics.observe_end_to_end(0.2)
    metrics.record_retcode(10009)
    metrics.record_unknown_outcome("sim-1")
    metrics.record_slippage("EURUSD", "buy", -0.3)
    metrics.record_slippage_breach("EURUSD")
    metrics.observe_fill_ratio(1.0)
    metrics.record_claim_wait(0.01, acquired=True)
    metrics.record_claim_wait(5.0, acquired=False)
    metrics.record_dead_letter("MALFORMED_JSON")
    metrics.record_reconnect("mt5")
    metrics.record_recovery(settled=False)
    return generate_latest(REGISTRY).decode()


def _known_series() -> set[str]:
    return exported_series(_exercised_exposition()) | exported_series(_bridge_exposition())


def _bridge_exposition() -> str:
    """A bridge's own registry (``bridge-serve --metrics-port``) after a refusal and a call."""
    bridge = bridge_metrics.BridgeMetrics()
    bridge.refused("expired")
    bridge.called("account_info", "ok", 0.001)
    return generate_latest(bridge.registry).decode()


def referenced_series() -> dict[str, set[str]]:
    """Every metric name each alert and dashboard expression reads, by where it is used."""
    used = {f"alert {rule}": _referenced(expr) for rule, expr in _alert_rules().items()}
    for index, expr in enumerate(_panel_expressions(_dashboard())):
        used[f"dashboard query {index}: {expr[:60]}"] = _referenced(expr)
    return used


def test_no_histogram_with_a_negative_bucket_is_read_by_its_sum() -> None:
    exposition = _exercised_exposition()
    assert "execution_worker_slippage_pips_count" in exposition
    assert "execution_worker_slippage_pips_sum" not in exposition  # the library's behaviour
    assert "execution_worker_slippage_pips_sum" not in _known_series()
    assert "execution_worker_end_to_end_seconds_sum" in _known_series()


def test_every_alert_and_dashboard_expression_reads_exported_series() -> None:
    known = _known_series()
    unknown = {where: names - known for where, names in referenced_series().items()}
    assert not {where: names for where, names in unknown.items() if names}


def _referenced(expression: str) -> set[str]:
    return set(re.findall(r"\b((?:execution_worker|rabbitmq|mt5_bridge)_[a-z_]+|up)\b", expression))


def _alert_list() -> list[dict[str, Any]]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def _alert_rules() -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for rule in _alert_list()}


def _alert_expressions() -> list[str]:
    return list(_alert_rules().values())


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


REQUIRED_ALERTS = {
    "ExecutionWorkersAbsent",
    "ExecutionWorkerDown",
    "ExecutionWorkerNotReady",
    "ExecutionRequestsNotConsumed",
    "ExecutionSessionPoolExhausted",
    "ExecutionsStuckInFlight",
    "ExecutionReconciliationUnresolved",
    "ExecutionDeadLetters",
    "ExecutionUnknownOutcomes",
    "ExecutionSlippageBreaches",
    "ExecutionSessionsUnhealthy",
    "ExecutionOutboxBacklog",
    "MT5BridgeRefusalSpike",
}


def test_every_required_alert_exists() -> None:
    names = set(_alert_rules())
    assert names >= REQUIRED_ALERTS
    doc = (ROOT / "docs" / "METRICS.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in doc for name in names)


def test_no_rule_names_a_job() -> None:
    # under a ServiceMonitor the job is the Service's name: a fixed job label never matches
    for rule, expr in _alert_rules().items():
        assert not re.search(r"\bjob\s*(=|!=|=~|!~)", expr), rule


def test_every_alert_has_a_runbook_section_in_operations() -> None:
    doc = (ROOT / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    headings = {
        re.sub(r"[^a-z0-9 _-]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in doc.splitlines()
        if line.startswith("#")
    }
    for rule in _alert_list():
        url = rule["annotations"].get("runbook_url", "")
        assert url == f"docs/OPERATIONS.md#{rule['alert'].lower()}", rule["alert"]
        assert url.split("#")[1] in headings, f"OPERATIONS.md has no section {url}"
        assert rule["labels"]["severity"] in {"warning", "critical"}


def test_every_alert_is_tested_firing_and_silent() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text(encoding="utf-8"))
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert set(_alert_rules()) <= firing, set(_alert_rules()) - firing
    assert set(_alert_rules()) <= silent, set(_alert_rules()) - silent


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
