"""The deployment files: compose stack, .env.example, container image, Kubernetes manifests.

Structural checks that fail when a file drifts from the external contract (docs/CONTRACT.md) or from
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
from urllib.parse import urlsplit

import pytest
import yaml

from worker.config import Settings, load_settings
from worker.mt5.sessions import SessionSpec, load_session_specs

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
ROLES_SQL = ROOT / "deploy" / "sql" / "roles.sql"
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
    "db-roles": "POSTGRES_IMAGE",
    "db-grants": "POSTGRES_IMAGE",
    "worker-1": "WORKER_IMAGE",
    "worker-2": "WORKER_IMAGE",
    "prometheus": "PROMETHEUS_IMAGE",
    "grafana": "GRAFANA_IMAGE",
}
SECRET_VARIABLES = {
    "RABBITMQ_PASSWORD",
    "POSTGRES_PASSWORD",
    "POSTGRES_OWNER_PASSWORD",
    "POSTGRES_WORKER_PASSWORD",
    "MT5_BRIDGE_SECRET",
    "GRAFANA_ADMIN_PASSWORD",
}
# read by load_settings / load_session_specs themselves, not Settings fields
EXTRA_WORKER_ENV = {"WORKER_CONFIG", "MT5_BRIDGE_TLS_CA"}
ONE_SHOTS = {"db-roles", "migrate", "db-grants"}
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
        if name in ONE_SHOTS:
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
        assert depends["db-grants"] == {"condition": "service_completed_successfully"}
    # roles before the migration (the owner logs in), grants after it (UPDATE on new tables)
    services = compose["services"]
    assert services["db-roles"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    done = {"condition": "service_completed_successfully"}
    assert services["migrate"]["depends_on"] == {"db-roles": done}
    assert services["db-grants"]["depends_on"] == {"migrate": done}
    grafana = compose["services"]["grafana"]["depends_on"]
    assert grafana["prometheus"] == {"condition": "service_healthy"}


def test_worker_environment_is_the_contract(compose: dict[str, Any]) -> None:
    for name in ("worker-1", "worker-2"):
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


def roles_sql_default(variable: str) -> str:
    match = re.search(rf"\\set {variable} (\w+)", ROLES_SQL.read_text(encoding="utf-8"))
    assert match, variable
    return match.group(1)


def url_user(url: str) -> str:
    match = re.match(r"^postgresql://([^:@]+):", url)
    assert match, url
    return match.group(1)


def test_compose_separates_the_owner_and_worker_roles(compose: dict[str, Any]) -> None:
    owner, worker = roles_sql_default("owner_role"), roles_sql_default("worker_role")
    services = compose["services"]
    for name in ("worker-1", "worker-2"):
        url = services[name]["environment"]["DATABASE_URL"]
        assert url_user(url) == worker
        assert "${POSTGRES_WORKER_PASSWORD:?" in url
    migrate = services["migrate"]["environment"]
    assert set(migrate) == {"DATABASE_URL", "LOG_FORMAT"}  # no broker, no bridge secret
    assert url_user(migrate["DATABASE_URL"]) == owner
    assert "${POSTGRES_OWNER_PASSWORD:?" in migrate["DATABASE_URL"]
    for name in ("db-roles", "db-grants"):
        service = services[name]
        assert "./deploy/sql/roles.sql:/etc/execution-worker/roles.sql:ro" in service["volumes"]
        command = " ".join(service["entrypoint"] + service["command"])
        assert "-f /etc/execution-worker/roles.sql" in command
        assert "owner_password=" in command and "worker_password=" in command
        env = service["environment"]
        assert env["OWNER_PASSWORD"].startswith("${POSTGRES_OWNER_PASSWORD:?")
        assert env["WORKER_PASSWORD"].startswith("${POSTGRES_WORKER_PASSWORD:?")
        assert env["PGUSER"] == "${POSTGRES_USER:-execution}"  # the administrator
        assert service["restart"] == "no"


def drain_of(worker_toml: str, env: dict[str, str] | None = None) -> float:
    """The drain the workers get from this config file (and environment)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as handle:
        handle.write(worker_toml)
    settings = load_settings({"WORKER_CONFIG": handle.name, **(env or {})})
    Path(handle.name).unlink()
    handler = (
        settings.claim_timeout_seconds
        + settings.order_timeout_seconds
        + settings.reconcile_grace_seconds
    )
    assert settings.drain_timeout_seconds >= handler, "the drain is shorter than a handler"
    return settings.drain_timeout_seconds


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_compose_waits_longer_than_the_drain(compose: dict[str, Any]) -> None:
    toml = (ROOT / "deploy" / "compose" / "worker.toml").read_text(encoding="utf-8")
    for name in ("worker-1", "worker-2"):
        service = compose["services"][name]
        env = {k: str(v) for k, v in service["environment"].items() if k.startswith("DRAIN")}
        drain = drain_of(toml, env)
        assert seconds(service["stop_grace_period"]) > drain + 10, name
    production = load_yaml(PRODUCTION)["services"]["worker"]
    assert "DRAIN_TIMEOUT_SECONDS" not in production["environment"]
    assert seconds(production["stop_grace_period"]) > drain_of("") + 10


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
    ha = ROOT / "deploy" / "compose" / "ha.yml"  # the HA profile's own secrets
    used |= {m.group(1) for m in INTERPOLATION.finditer(ha.read_text(encoding="utf-8"))}
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
    assert [spec.backend for spec in specs] == ["bridge", "bridge", "bridge"]
    # two terminals of one account (an alias), and an account named by server and login
    assert [spec.account for spec in specs] == ["fund-a", "fund-a", "Broker-Demo:5012346"]
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
    migrate = data["services"]["migrate"]
    # the owner's URL for migrate only; the workers' secrets for the workers only
    assert set(worker["secrets"]) | set(migrate["secrets"]) == set(data["secrets"])
    assert migrate["secrets"] == ["database_owner_url"]
    assert "database_owner_url" not in worker["secrets"]
    assert migrate["environment"]["DATABASE_URL_FILE"] == "/run/secrets/database_owner_url"
    assert not {"RABBITMQ_URL_FILE", "MT5_BRIDGE_SECRET_FILE"} & set(migrate["environment"])
    for service in (worker, migrate):
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
    assert worker["stop_grace_period"]
    assert migrate["command"] == ["migrate"]


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
    kustomization = load_yaml(BASE / "kustomization.yaml")
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in load_all(BASE / resource):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), resource
            assert doc["metadata"].get("name"), resource
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def deployment(manifests: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return manifests[("Deployment", "execution-worker")]


def component_images(path: Path) -> dict[str, dict[str, str]]:
    component = load_yaml(path / "kustomization.yaml")
    assert component["kind"] == "Component"
    return {image["name"]: image for image in component["images"]}


def test_kustomization_lists_existing_files_and_no_secrets() -> None:
    assert load_yaml(K8S / "kustomization.yaml")["resources"] == ["base"]
    kustomization = load_yaml(BASE / "kustomization.yaml")
    assert kustomization["namespace"] == "mt5-execution"
    for resource in kustomization["resources"]:
        assert (BASE / resource).is_file(), resource
        kinds = {doc["kind"] for doc in load_all(BASE / resource)}
        assert "Secret" not in kinds, f"{resource} holds a Secret"
    assert "secret.example.yaml" not in kustomization["resources"]
    assert "hpa.yaml" not in kustomization["resources"]  # KEDA's ScaledObject manages the HPA
    # the image comes from the shared component, for the workers and the migrate Job alike
    assert kustomization["components"] == ["../image"]
    assert load_yaml(K8S / "migrate" / "kustomization.yaml")["components"] == ["../image"]
    images = component_images(K8S / "image")
    job = load_all(K8S / "migrate" / "job.yaml")[0]
    for doc in (load_all(BASE / "deployment.yaml")[0], job):
        for container in deployment_containers(doc):
            assert container["image"] in images, "an image the kustomization does not set"
            assert ":" not in container["image"], "the tag belongs in image/kustomization.yaml"
    (image,) = images.values()
    assert image["newTag"]


K8S_SCHEMA_VERSION = "1.31.0"  # unhealthyPodEvictionPolicy is GA from 1.31


def rendered(directory: str) -> list[dict[str, Any]]:
    import shutil

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (deploy/check-deploy.sh renders them where it is)")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (directory, done.stderr)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.mark.parametrize("directory", ["", "migrate", "overlays/production"])
def test_rendered_manifests_match_the_kubernetes_schemas(directory: str) -> None:
    validation = pytest.importorskip("kubernetes_validate.utils")
    objects = rendered(directory)
    checked = 0
    for doc in objects:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: deploy/check-deploy.sh validates it where KEDA's CRDs are at hand
        validation.validate(doc, K8S_SCHEMA_VERSION, strict=True)
        checked += 1
    assert checked
    for path in ("base/hpa.yaml", "secret.example.yaml"):
        for doc in load_all(K8S / path):
            validation.validate(doc, K8S_SCHEMA_VERSION, strict=True)


def test_production_overlay_pins_images_by_digest() -> None:
    production = K8S / "overlays" / "production"
    assert load_yaml(production / "kustomization.yaml")["resources"] == ["../../base"]
    assert load_yaml(production / "kustomization.yaml")["components"] == ["image"]
    migrate = load_yaml(production / "migrate" / "kustomization.yaml")
    assert migrate["resources"] == ["../../../migrate"] and migrate["components"] == ["../image"]
    images = component_images(production / "image")
    assert set(images) == set(component_images(K8S / "image"))
    for image in images.values():
        assert "newTag" not in image, "production runs a digest, never a movable tag"
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", image["digest"]), image
    text = (production / "image" / "kustomization.yaml").read_text(encoding="utf-8")
    # the all-zero digest is a placeholder, and says so where it stands
    assert "sha256:" + "0" * 64 + "  # PLACEHOLDER" in text


def test_every_kustomization_renders(tmp_path: Path) -> None:
    import shutil

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (deploy/check-deploy.sh renders them where it is)")
    for directory in ("", "migrate", "overlays/production", "overlays/production/migrate"):
        done = subprocess.run(
            [kubectl, "kustomize", str(K8S / directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (directory, done.stderr)
        images = re.findall(r"image: (\S+)", done.stdout)
        assert images, directory
        if directory.startswith("overlays/production"):
            assert all("@sha256:" in image for image in images), images
        else:
            assert all(image.endswith(":0.1.0") for image in images), images


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
    assert spec["automountServiceAccountToken"] is False
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


def test_the_kubelet_waits_longer_than_the_drain(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    env = dict(manifests[("ConfigMap", "execution-worker-env")]["data"])
    files = manifests[("ConfigMap", "execution-worker-files")]["data"]
    drain = drain_of(files["worker.toml"], {k: v for k, v in env.items() if k.startswith("DRAIN")})
    spec = deployment(manifests)["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > drain + 10  # drain, then exit, before SIGKILL


def test_keda_owns_the_replica_count(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert "replicas" not in deployment(manifests)["spec"]
    scaled = manifests[("ScaledObject", "execution-worker")]
    text = (BASE / "keda-scaledobject.yaml").read_text(encoding="utf-8")
    assert "autoscaling.keda.sh/paused-replicas" in text  # the documented emergency stop
    assert "autoscaling.keda.sh/paused-replicas" not in scaled["metadata"].get("annotations", {})
    doc = (ROOT / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    assert 'autoscaling.keda.sh/paused-replicas="0"' in doc


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
    # pods NotReady because every terminal is down must not block node drains
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    scaled = manifests[("ScaledObject", "execution-worker")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "execution-worker"
    assert scaled["minReplicaCount"] > pdb["minAvailable"]
    sessions = manifests[("ConfigMap", "execution-worker-files")]["data"]["sessions.toml"]
    session_count = sessions.count("[[sessions]]")
    assert scaled["minReplicaCount"] <= scaled["maxReplicaCount"] <= session_count
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == "execution.requests"
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert trigger["metadata"]["protocol"] == "amqp"
    auth = manifests[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    refs = {ref["parameter"]: (ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"]}
    # its own read-only monitoring user, never the workers' (which can publish, i.e. trade);
    # TLS with the private CA in the TriggerAuthentication (KEDA ignores URL ssl options)
    assert set(refs) == {"host", "tls", "ca"}
    assert {name for name, _ in refs.values()} == {"execution-worker-keda-rabbitmq"}
    secrets = {doc["metadata"]["name"]: doc for doc in load_all(K8S / "secret.example.yaml")}
    keda = secrets["execution-worker-keda-rabbitmq"]["stringData"]
    assert {key for _, key in refs.values()} <= set(keda)
    assert keda["tls"] == "enable" and keda["host"].startswith("amqps://")
    assert "BEGIN CERTIFICATE" in keda["ca"]
    worker_user = urlsplit(secrets["execution-worker-secrets"]["stringData"]["rabbitmq_url"])
    assert urlsplit(keda["host"]).username != worker_user.username
    assert urlsplit(keda["host"]).path == worker_user.path  # the same vhost
    (hpa,) = load_all(BASE / "hpa.yaml")
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"] <= session_count
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


def test_migration_job_runs_as_the_owner_apart_from_the_workers(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    job = load_all(K8S / "migrate" / "job.yaml")[0]
    (worker,) = deployment_containers(deployment(manifests))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"]
    assert container["image"] == worker["image"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # its own labels: nothing that selects the workers selects the migrate pod
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert job["metadata"]["labels"] == pod_labels  # `kubectl wait job -l ...` finds the Job
    selectors = [
        deployment(manifests)["spec"]["selector"]["matchLabels"],
        manifests[("Service", "execution-worker-metrics")]["spec"]["selector"],
        manifests[("PodDisruptionBudget", "execution-worker")]["spec"]["selector"]["matchLabels"],
        manifests[("NetworkPolicy", "execution-worker")]["spec"]["podSelector"]["matchLabels"],
    ]
    for selector in selectors:
        assert not selector.items() <= pod_labels.items(), selector
    (policy,) = load_all(K8S / "migrate" / "networkpolicy.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ports = {(p["protocol"], p["port"]) for r in policy["spec"]["egress"] for p in r["ports"]}
    assert ports == {("TCP", 5432), ("UDP", 53), ("TCP", 53)}
    assert "ingress" not in policy["spec"]
    # the owner's Secret only, and no worker settings (no broker, no bridge secret)
    assert "envFrom" not in container
    env = {item["name"]: item["value"] for item in container["env"]}
    assert set(env) == {"DATABASE_URL_FILE", "LOG_FORMAT"}
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    mount = next(
        m
        for m in container["volumeMounts"]
        if env["DATABASE_URL_FILE"].startswith(m["mountPath"] + "/")
    )
    secret_name = volumes[mount["name"]]["secret"]["secretName"]
    assert secret_name == "execution-worker-migrate-secrets"
    secrets = {doc["metadata"]["name"]: doc for doc in load_all(K8S / "secret.example.yaml")}
    owner_url = secrets[secret_name]["stringData"]["database_url"]
    worker_url = secrets["execution-worker-secrets"]["stringData"]["database_url"]
    assert url_user(owner_url) == roles_sql_default("owner_role")
    assert url_user(worker_url) == roles_sql_default("worker_role")


def test_readme_waits_for_a_job_that_exists() -> None:
    job = load_all(K8S / "migrate" / "job.yaml")[0]
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    waits = re.findall(r"kubectl[^\n]* wait [^\n]*", readme)
    assert waits
    for command in waits:
        if " job" not in command:
            continue
        target = re.search(r"job/(\S+)", command)
        selector = re.search(r"job -l (\S+)=(\S+)", command)
        if target:
            assert target.group(1) == job["metadata"]["name"], command
        else:
            assert selector, command
            assert job["metadata"]["labels"].get(selector.group(1)) == selector.group(2)


def test_check_script_is_valid_bash() -> None:
    script = ROOT / "deploy" / "check-deploy.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # the static half runs the same validators users have
    text = script.read_text(encoding="utf-8")
    for directory in ("deploy/k8s", "deploy/k8s/migrate", "deploy/k8s/overlays/production"):
        assert f" {directory} " in text or f" {directory}\n" in text or f" {directory};" in text
    assert "kubectl kustomize" in text
    assert "stack_privileges" in text and "stack_drain" in text
    assert shlex.quote("docker-compose.yml") in text
