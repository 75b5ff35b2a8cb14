"""Shared fixtures: RabbitMQ and PostgreSQL, isolated vhosts and databases.

Backend, chosen once per session:
- "container": a Docker engine answers. ONE RabbitMQ and ONE PostgreSQL container are started
  for the session (testcontainers; images from RABBITMQ_IMAGE / POSTGRES_IMAGE), on first use.
- "local": no engine. The machine's services from RABBITMQ_URL / DATABASE_URL are used, with a
  warning in the pytest header and summary. With CI=true this is an error instead.
A container that cannot be started (e.g. its image cannot be pulled) also falls back to local,
loudly, except under CI=true.

Every test session gets its own database and vhost (``database_url``, ``rabbitmq_url``);
``new_database()`` / ``new_vhost()`` make more for tests that need a pristine one.
``rabbitmq_broker`` / ``postgres_server`` give the admin URLs and stop/kill/start/pause
controls for fault tests (on the local backend the controls skip the test: those services
are shared). In the container backend a ``rabbitmqctl`` shim that runs in the broker container
is put first on PATH, so helpers that shell out to ``rabbitmqctl`` reach the session's broker;
new code should prefer ``rabbitmq_broker.ctl(...)``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from tests.containers import (
    DEFAULT_POSTGRES_IMAGE,
    DEFAULT_RABBITMQ_IMAGE,
    Broker,
    ContainerBroker,
    ContainerPostgres,
    ContainerService,
    LocalBroker,
    LocalPostgres,
    Service,
    docker_engine_problem,
    mask,
)

ENV_DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ENV_RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
RABBITMQ_IMAGE = os.environ.get("RABBITMQ_IMAGE", DEFAULT_RABBITMQ_IMAGE)
POSTGRES_IMAGE = os.environ.get("POSTGRES_IMAGE", DEFAULT_POSTGRES_IMAGE)
SHIM_PREFIX = "ew-test-bin-"
HINT = (
    "to run the services in containers: `bash deploy/images/build-local.sh` then "
    "RABBITMQ_IMAGE=local/rabbitmq:3.10 POSTGRES_IMAGE=local/postgres:15 "
    "TESTCONTAINERS_RYUK_DISABLED=true"
)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


class Backends:
    """The session's backend choice and the services started under it.

    The first fixture that needs a service boots both containers side by side (most tests
    that use one use the other); each accessor then waits for its own.
    """

    def __init__(self) -> None:
        # A child pytest started by a test inherits its parent's shim: not this session's broker.
        os.environ["PATH"] = os.pathsep.join(
            entry
            for entry in os.environ.get("PATH", "").split(os.pathsep)
            if not Path(entry).name.startswith(SHIM_PREFIX)
        )
        self.engine_problem = docker_engine_problem()
        self.warnings: list[str] = []
        self.started: list[ContainerService] = []
        self._boots: dict[str, Future[ContainerService]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._shim_dir: Path | None = None
        if self.engine_problem is not None:
            self.warnings.append(f"{self.engine_problem}: using the machine's services")

    @property
    def mode(self) -> str:
        return "local" if self.engine_problem else "container"

    def _boot_all(self) -> None:
        if self._boots:
            return
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="boot")
        for service in (ContainerBroker(RABBITMQ_IMAGE), ContainerPostgres(POSTGRES_IMAGE)):
            self._boots[service.what] = self._pool.submit(self._boot, service)

    def _boot(self, service: ContainerService) -> ContainerService:
        try:
            service.boot()
        except BaseException:
            with contextlib.suppress(Exception):
                service.close()
            raise
        self.started.append(service)
        return service

    def _container(self, what: str, image: str) -> ContainerService | None:
        """The booted container, or None (with a warning) when it could not start."""
        if self.engine_problem is not None:
            return None
        self._boot_all()
        try:
            return self._boots[what].result()
        except Exception as exc:
            why = f"{what} container ({image}) did not start: {type(exc).__name__}: {exc}"
            if in_ci():
                raise RuntimeError(f"CI=true requires containers; {why}") from exc
            self.warnings.append(f"{why[:300]}; using the machine's {what}")
            return None

    def broker(self) -> Broker:
        container = self._container("rabbitmq", RABBITMQ_IMAGE)
        if isinstance(container, ContainerBroker):
            self._shim_rabbitmqctl(container)
            return container
        return LocalBroker(ENV_RABBITMQ_URL, self.engine_problem or "its container did not start")

    def postgres(self) -> Service:
        container = self._container("postgres", POSTGRES_IMAGE)
        if isinstance(container, ContainerPostgres):
            return container
        return LocalPostgres(ENV_DATABASE_URL, self.engine_problem or "its container did not start")

    def _shim_rabbitmqctl(self, broker: ContainerBroker) -> None:
        if self._shim_dir is not None:
            return
        self._shim_dir = Path(tempfile.mkdtemp(prefix=SHIM_PREFIX))
        if broker.install_ctl_shim(self._shim_dir):
            os.environ["PATH"] = f"{self._shim_dir}{os.pathsep}{os.environ.get('PATH', '')}"

    def close(self) -> None:
        if self._shim_dir is not None:
            shutil.rmtree(self._shim_dir, ignore_errors=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for service in self.started:
            with contextlib.suppress(Exception):
                service.close()
        self.started.clear()


_BACKENDS: Backends | None = None


def backends() -> Backends:
    assert _BACKENDS is not None, "pytest_configure did not run"
    return _BACKENDS


def pytest_configure(config: pytest.Config) -> None:
    global _BACKENDS
    _BACKENDS = Backends()
    if in_ci() and _BACKENDS.engine_problem is not None:
        raise pytest.UsageError(
            f"CI=true: the test services must run in containers, but {_BACKENDS.engine_problem}. "
            "Run `bash deploy/images/build-local.sh` first."
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    if _BACKENDS is not None:
        _BACKENDS.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    chosen = backends()
    if chosen.mode == "container":
        return [f"services: containers (RabbitMQ {RABBITMQ_IMAGE}, PostgreSQL {POSTGRES_IMAGE})"]
    return [
        f"services: WARNING {chosen.engine_problem}",
        f"services: WARNING falling back to RABBITMQ_URL={mask(ENV_RABBITMQ_URL)} "
        f"DATABASE_URL={mask(ENV_DATABASE_URL)}; {HINT}",
    ]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    chosen = backends()
    if not chosen.warnings:
        return
    terminalreporter.write_sep("=", "test services: fallback to the machine's own", yellow=True)
    for line in chosen.warnings:
        terminalreporter.write_line(f"WARNING {line}", yellow=True)
    terminalreporter.write_line(HINT, yellow=True)


@pytest.fixture(scope="session")
def rabbitmq_broker() -> Broker:
    """The session's RabbitMQ: ``admin_url``, ``url(vhost)``, ``ctl(*rabbitmqctl args)``,
    and stop/kill/start/pause/unpause/unavailable_for(seconds) for fault tests."""
    return backends().broker()


@pytest.fixture(scope="session")
def postgres_server() -> Service:
    """The session's PostgreSQL: ``admin_url``, ``url(database)`` and the same controls."""
    return backends().postgres()


@pytest.fixture(scope="session")
def new_database(postgres_server: Service) -> Iterator[Callable[[], str]]:
    created: list[str] = []
    admin_url = postgres_server.admin_url

    def make() -> str:
        name = f"ew_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return postgres_server.url(name)

    yield make
    if postgres_server.backend != "local":
        return  # the container goes, and its databases with it
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def new_vhost(rabbitmq_broker: Broker) -> Iterator[Callable[[], str]]:
    created: list[str] = []

    def make() -> str:
        name = f"ew_test_{uuid.uuid4().hex[:12]}"
        rabbitmq_broker.add_vhost(name)
        created.append(name)
        return rabbitmq_broker.url(name)

    yield make
    if rabbitmq_broker.backend != "local":
        return
    for name in created:
        with contextlib.suppress(Exception):
            rabbitmq_broker.delete_vhost(name)


@pytest.fixture(scope="session")
def database_url(new_database: Callable[[], str]) -> str:
    """A database of this test session's own (empty, not migrated)."""
    return new_database()


@pytest.fixture(scope="session")
def rabbitmq_url(new_vhost: Callable[[], str]) -> str:
    """A RabbitMQ vhost of this test session's own."""
    return new_vhost()


@pytest.fixture(autouse=True)
def _services_running_after_test() -> Iterator[None]:
    """A fault test that fails half-way must not leave a service down for the next tests."""
    yield
    if _BACKENDS is not None:
        for service in _BACKENDS.started:
            service.ensure_running()
