"""The deployment files: compose stack, .env.example, container image, Kubernetes manifests.

Structural checks that fail when a file drifts from the external contract (DESIGN.md) or from
the settings the worker actually reads (worker/config.py). deploy/check-deploy.sh builds and
runs the same files where a Docker engine is available.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.config import Settings, load_settings
from worker.mt5.sessions import SessionSpec, load_session_specs

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
PRODUCTION = ROOT / "deploy" / "compose" / "production.yml"

CONTRACT_ENV = {
    "RABBITMQ_URL",
    "DATABASE_URL",
    "MT5_BACKEND",
    "MT5_SESSIONS",
    "MT5_BRIDGE_ADDRESS",
    "MT5_BRIDGE_SECRET",
    "METRICS_PORT",
    "LOG_FORMAT",
}
IMAGE_VARIABLES = {
    "rabbitmq": "RABBITMQ_IMAGE",
    "postgres": "POSTGRES_IMAGE",
    "sim-terminal": "WORKER_IMAGE",
    "migrate": "WORKER_IMAGE",
    "worker-1": "WORKER_IMAGE",
    "worker-2": "WORKER_IMAGE",
    "prometheus": "PROMETHEUS_IMAGE",
    "grafana": "GRAFANA_IMAGE",
}
SECRET_VARIABLES = {
    "RABBITMQ_PASSWORD",
    "POSTGRES_PASSWORD",
    "MT5_BRIDGE_SECRET",
    "GRAFANA_ADMIN_PASSWORD",
}
# read by load_settings / load_session_specs themselves, not Settings fields
EXTRA_WORKER_ENV = {"WORKER_CONFIG", "MT5_BRIDGE_TLS_CA"}
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def known_worker_variable(name: str) -> bool:
    base = name.removesuffix("_FILE")
    return base.lower() in Settings.model_fields or name in EXTRA_WORKER_ENV


# --- docker-compose.yml -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == set(IMAGE_VARIABLES)


def test_every_image_is_a_variable_with_a_default(compose: dict[str, Any]) -> None:
    for name, variable in IMAGE_VARIABLES.items():
        image = compose["services"][name]["image"]
        match = INTERPOLATION.fullmatch(image)
        assert match, f"{name}: image {image!r} is not a variable"
        assert match.group(1) == variable
        assert match.group(2) == ":-" and match.group(3), f"{name}: no default image"


def test_long_running_services_have_health_checks(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        check = service.get("healthcheck", {})
        if name == "migrate":
            assert check.get("disable") is True
            assert service["restart"] == "no"
            continue
        assert check.get("test"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL")
        assert service["restart"] == "unless-stopped"


def test_workers_wait_for_healthy_dependencies(compose: dict[str, Any]) -> None:
    for name in ("worker-1", "worker-2"):
        depends = compose["services"][name]["depends_on"]
        for dependency in ("rabbitmq", "postgres", "sim-terminal"):
            assert depends[dependency] == {"condition": "service_healthy"}
        assert depends["migrate"] == {"condition": "service_completed_successfully"}
    migrate = compose["services"]["migrate"]["depends_on"]
    assert migrate == {"postgres": {"condition": "service_healthy"}}
    grafana = compose["services"]["grafana"]["depends_on"]
    assert grafana["prometheus"] == {"condition": "service_healthy"}


def test_worker_environment_is_the_contract(compose: dict[str, Any]) -> None:
    for name in ("worker-1", "worker-2", "migrate"):
        env = compose["services"][name]["environment"]
        assert set(env) >= CONTRACT_ENV, f"{name} misses {CONTRACT_ENV - set(env)}"
        assert all(known_worker_variable(key) for key in env), env
        assert env["MT5_BACKEND"] == "bridge"
        assert env["MT5_BRIDGE_ADDRESS"] == "sim-terminal:18812"
        assert env["METRICS_PORT"] == "9108"
        assert (
            env["RABBITMQ_URL"].startswith("amqp://") and "@rabbitmq:5672/" in env["RABBITMQ_URL"]
        )
        assert env["DATABASE_URL"].startswith("postgresql://")
        assert "@postgres:5432/" in env["DATABASE_URL"]


def bridge_specs(sessions: str, **environ: str) -> list[SessionSpec]:
    settings = load_settings({"MT5_BACKEND": "bridge", "MT5_SESSIONS": sessions, **environ})
    return load_session_specs(settings, {**environ})


def test_compose_sessions_resolve_to_the_simulated_terminal(compose: dict[str, Any]) -> None:
    env = compose["services"]["worker-1"]["environment"]
    example = env_example()
    (spec,) = bridge_specs(
        example["MT5_SESSIONS"],
        MT5_BRIDGE_ADDRESS=env["MT5_BRIDGE_ADDRESS"],
        MT5_BRIDGE_SECRET="not-a-real-secret",
    )
    assert (spec.backend, spec.address) == ("bridge", "sim-terminal:18812")


def test_worker_health_checks_hit_the_metrics_port(compose: dict[str, Any]) -> None:
    for name in ("worker-1", "worker-2"):
        service = compose["services"][name]
        check = " ".join(service["healthcheck"]["test"])
        assert "http://127.0.0.1:9108/readyz" in check
        assert "curl" not in check and "wget" not in check  # the image has neither
        assert service["command"] == ["run"]
        assert any(port.endswith(":9108") for port in service["ports"])
    host_ports = [
        compose["services"][n]["ports"][0].split(":")[-2] for n in ("worker-1", "worker-2")
    ]
    assert len(set(host_ports)) == 2, "the two workers publish the same host port"


def test_sim_terminal_serves_the_bridge_port_with_persistent_state(
    compose: dict[str, Any],
) -> None:
    service = compose["services"]["sim-terminal"]
    command = service["command"]
    assert command[0] == "sim-terminal"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options == {"--host": "0.0.0.0", "--port": "18812", "--state": "/data/sim.db"}
    assert "sim-data:/data" in service["volumes"]
    assert set(service["environment"]) >= {"MT5_BRIDGE_SECRET"}
    assert "18812" in " ".join(service["healthcheck"]["test"])


def test_published_ports_bind_to_a_configurable_address(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port}"


def test_observability_uses_the_shared_prometheus_and_grafana_files(
    compose: dict[str, Any],
) -> None:
    prometheus = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in prometheus
    grafana = compose["services"]["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana


def test_compose_holds_no_secret_values(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    for match in INTERPOLATION.finditer(text):
        if match.group(1) in SECRET_VARIABLES:
            # required, never defaulted
            assert match.group(2) == ":?", f"{match.group(0)} must be required (:?)"
    for value in strings(compose):
        names: list[str] = []

        def token(match: re.Match[str], names: list[str] = names) -> str:
            names.append(match.group(1))
            return f"@VAR{len(names) - 1}@"

        url = re.match(r"^[a-z]+://[^:/]+:([^/]+)@[a-z]", INTERPOLATION.sub(token, value))
        if url:
            password = re.fullmatch(r"@VAR(\d+)@", url.group(1))
            assert password, f"literal password in {value}"
            assert names[int(password.group(1))] in SECRET_VARIABLES
    for service in compose["services"].values():
        env = service.get("environment", {})
        for key, value in env.items():
            if re.search(r"PASS|SECRET|TOKEN", key):
                assert INTERPOLATION.fullmatch(str(value)), f"{key} is not from .env"


def test_env_example_covers_every_compose_variable() -> None:
    used = {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text(encoding="utf-8"))}
    example = env_example()
    assert used - set(example) == set()
    assert set(example) - used <= {"BASE_IMAGE"} | used  # nothing stale
    for name in SECRET_VARIABLES:
        assert example[name] == "", f".env.example must not carry a value for {name}"
    for name in IMAGE_VARIABLES.values():
        assert example[name], f"{name} has no example image"


def test_env_file_is_git_ignored() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".env"], cwd=ROOT, check=False, capture_output=True
    )
    assert ignored.returncode == 0
    tracked = subprocess.run(
        ["git", "check-ignore", "-q", ".env.example"], cwd=ROOT, check=False, capture_output=True
    )
    assert tracked.returncode == 1


@pytest.mark.parametrize(
    "path", ["deploy/compose/worker.toml", "deploy/compose/sessions.example.toml"]
)
def test_shipped_toml_files_parse(path: str) -> None:
    import tomllib

    with (ROOT / path).open("rb") as handle:
        assert tomllib.load(handle)


def test_production_sessions_example_is_accepted_by_the_worker() -> None:
    specs = bridge_specs(
        str(ROOT / "deploy/compose/sessions.example.toml"), MT5_BRIDGE_SECRET="not-a-real-secret"
    )
    assert [spec.backend for spec in specs] == ["bridge", "bridge"]
    production = load_yaml(PRODUCTION)["services"]["worker"]
    mounted = {v.removesuffix(":ro").rsplit(":", 1)[1] for v in production["volumes"]}
    assert {spec.tls_ca for spec in specs} <= mounted
    assert production["environment"]["MT5_SESSIONS"] in mounted
    assert production["environment"]["WORKER_CONFIG"] in mounted


def test_compose_worker_config_is_accepted_by_the_worker() -> None:
    settings = load_settings({"WORKER_CONFIG": str(ROOT / "deploy/compose/worker.toml")})
    assert settings.spread_limit_for("EURUSD") == 1.5
    assert settings.spread_limit_for("AUDUSD") == settings.max_spread_pips
    assert settings.pip_sizes["XAUUSD"] == 0.1


def test_production_compose_takes_secrets_from_files() -> None:
    data = load_yaml(PRODUCTION)
    worker = data["services"]["worker"]
    env = worker["environment"]
    for name in ("RABBITMQ_URL", "DATABASE_URL", "MT5_BRIDGE_SECRET"):
        assert name not in env
        assert env[f"{name}_FILE"].startswith("/run/secrets/")
    assert all(known_worker_variable(key) for key in env), env
    assert set(worker["secrets"]) == set(data["secrets"])
    assert worker["read_only"] is True
    assert worker["stop_grace_period"]
    assert data["services"]["migrate"]["command"] == ["migrate"]


# --- deploy/Dockerfile --------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_dockerfile_is_multi_stage_on_an_overridable_base() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"]
    final = instructions[len(instructions) - instructions[::-1].index(("FROM", "${BASE_IMAGE}")) :]
    copies = [rest for keyword, rest in final if keyword == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    for tool in ("gcc", "build-essential", "apt-get install", "pip install"):
        assert tool not in runs


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    instructions = dockerfile_instructions()
    args = dict(
        rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest
    )
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users == ["${UID}:${UID}"]
    assert args["UID"].isdigit() and int(args["UID"]) > 0


def test_dockerfile_health_check_entrypoint_and_command() -> None:
    instructions = dict(dockerfile_instructions())
    check = instructions["HEALTHCHECK"]
    assert "/healthz" in check and "urllib.request" in check and "curl" not in check
    assert instructions["ENTRYPOINT"] == '["execution-worker"]'
    assert instructions["CMD"] == '["run"]'
    assert instructions["EXPOSE"] == "9108"
    assert instructions["STOPSIGNAL"] == "SIGTERM"


def test_build_context_leaves_secrets_and_local_state_out() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert lines[lines.index("*")] == "*", "the context must start from nothing"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "schemas", "worker", "deploy/wheelhouse"}


# --- deploy/k8s ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in load_all(K8S / resource):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), resource
            assert doc["metadata"].get("name"), resource
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def deployment(manifests: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return manifests[("Deployment", "execution-worker")]


def test_kustomization_lists_existing_files_and_no_secrets() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["namespace"] == "mt5-execution"
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
        kinds = {doc["kind"] for doc in load_all(K8S / resource)}
        assert "Secret" not in kinds, f"{resource} holds a Secret"
    assert "secret.example.yaml" not in kustomization["resources"]
    assert "hpa.yaml" not in kustomization["resources"]  # KEDA's ScaledObject manages the HPA
    images = {image["name"] for image in kustomization["images"]}
    container_images = {
        c["image"].split(":")[0]
        for c in deployment_containers(load_all(K8S / "deployment.yaml")[0])
    }
    assert container_images <= images


def deployment_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
    return containers


def test_probes_ports_and_command_follow_the_contract(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    env = manifests[("ConfigMap", "execution-worker-env")]["data"]
    (container,) = deployment_containers(deployment(manifests))
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"metrics": int(env["METRICS_PORT"])} == {"metrics": 9108}
    assert container["args"] == ["run"]
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}
    annotations = deployment(manifests)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == env["METRICS_PORT"]


def test_resources_and_security_context(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    spec = deployment(manifests)["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] > 0
    assert spec["automountServiceAccountToken"] is False
    assert spec["terminationGracePeriodSeconds"] >= 45  # drain before SIGKILL
    for container in spec["containers"]:
        resources = container["resources"]
        assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
        assert "/tmp" in mounts  # writable scratch on a read-only root


def test_settings_files_and_secrets_are_mounted_where_the_env_points(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    env = manifests[("ConfigMap", "execution-worker-env")]["data"]
    assert {"MT5_BACKEND", "MT5_SESSIONS", "METRICS_PORT", "LOG_FORMAT"} <= set(env)
    assert env["MT5_BACKEND"] == "bridge"
    for key in env:
        assert known_worker_variable(key), f"the worker reads no {key}"
    for name in ("RABBITMQ_URL", "DATABASE_URL", "MT5_BRIDGE_SECRET"):
        assert name not in env, f"{name} must come from the Secret, as a file"
    spec = deployment(manifests)["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    (container,) = spec["containers"]
    mounts = container["volumeMounts"]
    assert {mount["name"] for mount in mounts} <= set(volumes)

    def source_of(path: str) -> tuple[dict[str, Any], str]:
        for mount in mounts:
            if mount.get("subPath") and path == mount["mountPath"]:
                return volumes[mount["name"]], mount["subPath"]
            if not mount.get("subPath") and path.startswith(mount["mountPath"] + "/"):
                return volumes[mount["name"]], path.removeprefix(mount["mountPath"] + "/")
        raise AssertionError(f"{path} is not mounted")

    secret_example = {doc["metadata"]["name"]: doc for doc in load_all(K8S / "secret.example.yaml")}
    files = manifests[("ConfigMap", "execution-worker-files")]["data"]
    for key, path in env.items():
        if not path.startswith("/"):
            continue
        volume, item = source_of(path)
        if "configMap" in volume:
            assert volume["configMap"]["name"] == "execution-worker-files"
            assert item in files, f"{key}: {item} not in the ConfigMap"
        else:
            secret = secret_example[volume["secret"]["secretName"]]
            assert item in secret["stringData"], f"{key}: {item} not in the Secret's keys"


def test_configmap_worker_settings_load(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    files = manifests[("ConfigMap", "execution-worker-files")]["data"]
    path = tmp_path / "worker.toml"
    path.write_text(files["worker.toml"], encoding="utf-8")
    settings = load_settings({"WORKER_CONFIG": str(path)})
    assert settings.margin_cushion == 1.5
    assert settings.spread_limit_for("XAUUSD") == 5.0
    sessions = tmp_path / "sessions.toml"
    sessions.write_text(files["sessions.toml"], encoding="utf-8")
    specs = bridge_specs(str(sessions), MT5_BRIDGE_SECRET="not-a-real-secret")
    assert len(specs) == 2
    assert all(spec.backend == "bridge" and spec.tls_ca for spec in specs)
    # every CA path a session names is inside the mounted bridge-ca Secret
    spec = deployment(manifests)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    ca_mount = next(m for m in container["volumeMounts"] if m["name"] == "bridge-ca")
    ca_secret = {doc["metadata"]["name"]: doc for doc in load_all(K8S / "secret.example.yaml")}[
        "execution-worker-bridge-ca"
    ]
    for item in specs:
        assert item.tls_ca is not None
        assert item.tls_ca.startswith(ca_mount["mountPath"] + "/")
        assert item.tls_ca.rsplit("/", 1)[1] in ca_secret["stringData"]


def test_disruption_budget_and_autoscalers_target_the_workers(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    labels = deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    pdb = manifests[("PodDisruptionBudget", "execution-worker")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] >= 1
    scaled = manifests[("ScaledObject", "execution-worker")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "execution-worker"
    assert scaled["minReplicaCount"] > pdb["minAvailable"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == "execution.requests"
    assert trigger["metadata"]["mode"] == "QueueLength"
    auth = manifests[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert (ref["name"], ref["key"]) == ("execution-worker-secrets", "rabbitmq_url")
    (hpa,) = load_all(K8S / "hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "execution-worker",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {
        "queue": "execution.requests"
    }


def test_network_policy_allows_only_the_dependencies(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    policy = manifests[("NetworkPolicy", "execution-worker")]["spec"]
    labels = deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    egress_ports = {
        (port["protocol"], port["port"]) for rule in policy["egress"] for port in rule["ports"]
    }
    assert egress_ports == {
        ("TCP", 5672),
        ("TCP", 5671),
        ("TCP", 5432),
        ("TCP", 18812),
        ("UDP", 53),
        ("TCP", 53),
    }
    assert all(rule.get("to") for rule in policy["egress"]), "an egress rule open to all"
    (ingress,) = policy["ingress"]
    assert [port["port"] for port in ingress["ports"]] == [9108]


def test_migration_job_matches_the_deployment() -> None:
    (job,) = load_all(K8S / "migrate-job.yaml")
    (worker,) = deployment_containers(load_all(K8S / "deployment.yaml")[0])
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"]
    assert container["image"] == worker["image"]
    assert container["envFrom"] == worker["envFrom"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert job["metadata"]["generateName"]


def test_check_script_is_valid_bash() -> None:
    script = ROOT / "deploy" / "check-deploy.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # the static half runs the same validators users have
    text = script.read_text(encoding="utf-8")
    assert "kubectl kustomize deploy/k8s" in text
    assert shlex.quote("docker-compose.yml") in text
