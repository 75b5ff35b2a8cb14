"""The HA deployment files: the compose profile and the Kubernetes overlay (issue 27)."""

from __future__ import annotations

import glob
import importlib.util
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from worker.amqp.nodes import split_nodes

ROOT = Path(__file__).resolve().parents[2]
HA_COMPOSE = ROOT / "deploy" / "compose" / "ha.yml"
HA_DIR = ROOT / "deploy" / "compose" / "ha"
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "ha"
K8S_SCHEMA_VERSION = "1.31.0"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(HA_COMPOSE.read_text(encoding="utf-8"))
    return loaded


def test_compose_profile_clusters_three_rabbitmq_nodes_by_name() -> None:
    services = compose()["services"]
    nodes = ["rabbitmq", "rabbitmq-2", "rabbitmq-3"]
    conf = (HA_DIR / "rabbitmq-cluster.conf").read_text(encoding="utf-8")
    named = re.findall(
        r"^cluster_formation\.classic_config\.nodes\.\d+ = rabbit@(\S+)$", conf, re.M
    )
    assert named == nodes
    for name in nodes:
        service = services[name]
        assert "RABBITMQ_ERLANG_COOKIE" in service["environment"]
        assert any(
            str(v).endswith("/etc/rabbitmq/conf.d/20-cluster.conf:ro") for v in service["volumes"]
        )
        if name != "rabbitmq":
            assert service["profiles"] == ["ha"] and service["hostname"] == name


def test_compose_workers_name_every_node_and_both_postgres_hosts() -> None:
    services = compose()["services"]
    for worker in ("worker-1", "worker-2"):
        env = {
            key: re.sub(r"\$\{[^}]*\}", "x", str(value))  # ${VAR:-default} -> a plain word
            for key, value in services[worker]["environment"].items()
        }
        hosts = [urlsplit(url).hostname for url in split_nodes(env["RABBITMQ_URL"])]
        assert hosts == ["rabbitmq", "rabbitmq-2", "rabbitmq-3"]
        database = urlsplit(env["DATABASE_URL"])
        assert database.netloc.rpartition("@")[2] == "postgres:5432,postgres-standby:5432"
        assert parse_qs(database.query)["target_session_attrs"] == ["read-write"]


def test_compose_standby_is_the_synchronous_one_the_primary_names() -> None:
    primary = (HA_DIR / "primary-replication.sh").read_text(encoding="utf-8")
    standby = (HA_DIR / "standby-entrypoint.sh").read_text(encoding="utf-8")
    (wanted,) = re.findall(r"synchronous_standby_names = '([^']+)'", primary)
    assert f"application_name={wanted}" in standby
    assert "pg_basebackup" in standby and " -R " in standby
    assert "REPLICATION_PASSWORD" not in standby.split("pg_basebackup", 1)[1].split("\n")[0]
    assert "host replication replicator all scram-sha-256" in primary


def test_compose_profile_holds_no_secret_values() -> None:
    text = HA_COMPOSE.read_text(encoding="utf-8")
    for variable in (
        "RABBITMQ_PASSWORD",
        "RABBITMQ_ERLANG_COOKIE",
        "POSTGRES_REPLICATION_PASSWORD",
    ):
        assert re.search(rf"\${{{variable}:\?", text), variable
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    assert "RABBITMQ_ERLANG_COOKIE=\n" in example and "POSTGRES_REPLICATION_PASSWORD=\n" in example


def rendered() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (deploy/check-deploy.sh renders them where it is)")
    done = subprocess.run(
        [kubectl, "kustomize", str(OVERLAY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def test_overlay_runs_the_engines_by_their_operators() -> None:
    objects = {(doc["apiVersion"], doc["kind"]): doc for doc in rendered()}
    rabbit = objects[("rabbitmq.com/v1beta1", "RabbitmqCluster")]
    assert rabbit["spec"]["replicas"] == 3
    assert (
        "cluster_partition_handling = pause_minority"
        in rabbit["spec"]["rabbitmq"]["additionalConfig"]
    )
    postgres = objects[("postgresql.cnpg.io/v1", "Cluster")]
    assert postgres["spec"]["instances"] >= 2
    synchronous = postgres["spec"]["postgresql"]["synchronous"]
    assert synchronous["number"] >= 1 and synchronous["dataDurability"] == "required"
    assert synchronous["method"] in ("any", "first")
    for doc in (rabbit, postgres):
        assert doc["metadata"]["namespace"] == "mt5-execution"
    # the workers may reach both engines' pods
    policy = next(
        d
        for (_, kind), d in objects.items()
        if d["metadata"]["name"] == "execution-worker-ha-engines"
    )
    selectors = [rule["to"][0]["podSelector"]["matchLabels"] for rule in policy["spec"]["egress"]]
    assert {"app.kubernetes.io/name": "execution-rabbitmq"} in selectors
    assert {"cnpg.io/cluster": "execution-db"} in selectors


def test_overlay_kubernetes_objects_match_the_schemas() -> None:
    validation = pytest.importorskip("kubernetes_validate.utils")
    checked = 0
    for doc in rendered():
        group = doc["apiVersion"].split("/")[0]
        if group in ("keda.sh", "rabbitmq.com", "postgresql.cnpg.io"):
            continue  # custom resources: checked field by field above
        validation.validate(doc, K8S_SCHEMA_VERSION, strict=True)
        checked += 1
    assert checked


def _schema_keys() -> list[re.Pattern[str]]:
    """The rabbitmq.conf keys the installed server accepts (its rabbit.schema mappings;
    ``$name`` parts match one segment)."""
    found = sorted(
        glob.glob(
            "/usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/rabbit-*/priv/schema/rabbit.schema"
        )
    )
    assert found, "RabbitMQ's server package is not installed (the machine's services need it)"
    names = re.findall(r'\{mapping, "([^"]+)"', Path(found[-1]).read_text())
    return [re.compile(re.sub(r"\\\$\w+", r"[^.]+", re.escape(name)) + "$") for name in names]


def _conf_keys(text: str) -> list[str]:
    return [
        line.split("=", 1)[0].strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_every_rabbitmq_setting_of_the_ha_configs_is_one_the_server_knows() -> None:
    """An unknown key stops the node at boot ("Conf file attempted to set unknown
    variable"): quorum_queue.initial_cluster_size did, in the compose HA profile."""
    known = _schema_keys()
    objects = {(doc["apiVersion"], doc["kind"]): doc for doc in rendered()}
    rabbit = objects[("rabbitmq.com/v1beta1", "RabbitmqCluster")]
    texts = {
        "deploy/compose/ha/rabbitmq-cluster.conf": Path(
            "deploy/compose/ha/rabbitmq-cluster.conf"
        ).read_text(),
        "deploy/k8s/overlays/ha additionalConfig": rabbit["spec"]["rabbitmq"]["additionalConfig"],
    }
    for where, text in texts.items():
        keys = _conf_keys(text)
        assert keys, where
        unknown = [key for key in keys if not any(pattern.match(key) for pattern in known)]
        assert unknown == [], f"{where}: {unknown}"


def _drill() -> Any:
    """deploy/compose/ha/drill.py, the HA drill's traffic and judge (not a package)."""
    spec = importlib.util.spec_from_file_location("ha_drill", "deploy/compose/ha/drill.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_drill_judge_counts_an_order_no_confirmation_names(tmp_path: Path) -> None:
    from schemas.identity import execution_id_for, order_magic_for
    from worker.config import load_settings

    execution_id = str(execution_id_for("rpm-1"))
    magic = order_magic_for(uuid.UUID(execution_id), load_settings({}).magic)
    answer = {"t": 10.0, "message_id": "m1", "order_id": "rpm-1", "execution_id": execution_id,
              "status": "FILLED", "version": 1, "provisional": False, "rejection_reason": None,
              "broker_deals": [7]}  # fmt: skip
    (tmp_path / "published.json").write_text(json.dumps(["rpm-1"]))
    (tmp_path / "confirmations.jsonl").write_text(json.dumps(answer) + "\n")
    (tmp_path / "rows.txt").write_text(f"{execution_id}|FILLED\n")
    deal = {"ticket": 7, "order": 70, "magic": magic}
    (tmp_path / "deals.jsonl").write_text(json.dumps(deal) + "\n")
    judge = _drill().verify
    assert judge(tmp_path, "rabbitmq", 5.0, 6.0) == 0
    second = {"ticket": 8, "order": 80, "magic": magic}  # a second order of the approval
    (tmp_path / "deals.jsonl").write_text(json.dumps(deal) + "\n" + json.dumps(second) + "\n")
    assert judge(tmp_path, "rabbitmq", 5.0, 6.0) == 1
