"""RabbitMQ and PostgreSQL for the test suite: in containers (testcontainers) or the machine's own.

The container services can be stopped, killed, paused and started again by the fault tests.
Each binds its service port to a host port chosen free at start, so a container that is
stopped and started again keeps the same URL (Docker gives an unpinned mapping a new
ephemeral port on every start).

The machine's own services ("local" backend) are shared with other test runs and developers:
they cannot be stopped by a test; their control methods skip the calling test instead.
"""

from __future__ import annotations

import secrets
import shlex
import shutil
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import docker  # type: ignore[import-untyped]
import pika
import pika.exceptions
import psycopg
import pytest
from testcontainers.core.container import DockerContainer

with warnings.catch_warnings():
    # Its readiness probe uses a decorator testcontainers itself deprecates: not ours to fix.
    warnings.simplefilter("ignore", DeprecationWarning)
    from testcontainers.community.postgres import PostgresContainer
    from testcontainers.community.rabbitmq import RabbitMqContainer

DEFAULT_RABBITMQ_IMAGE = "rabbitmq:3.13-management"
DEFAULT_POSTGRES_IMAGE = "postgres:15"
# Containers are named ew-test-*: `docker rm -f $(docker ps -aq --filter name=ew-test-)`
# cleans up after a killed test session when Ryuk is disabled.
NAME_PREFIX = "ew-test-"
READY_TIMEOUT_S = 90.0
MASK = "***"


def mask(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:{MASK}@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def docker_engine_problem() -> str | None:
    """None when a Docker engine answers, else why not (one line, no secrets)."""
    try:
        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # DockerException, requests' errors, a missing socket...
        return f"no Docker engine answers ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port: int = sock.getsockname()[1]
        return port


class Service(Protocol):
    """What the fault tests may do to a service, whichever backend runs it."""

    @property
    def backend(self) -> str: ...
    @property
    def admin_url(self) -> str: ...
    def url(self, name: str) -> str: ...

    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def start(self) -> None: ...
    def pause(self) -> None: ...
    def unpause(self) -> None: ...
    def unavailable_for(self, seconds: float, *, pause: bool = False) -> threading.Thread: ...


class Broker(Service, Protocol):
    def ctl(self, *args: str) -> None: ...
    def add_vhost(self, name: str) -> None: ...
    def delete_vhost(self, name: str) -> None: ...


class ContainerService:
    """One testcontainers container with a pinned host port and lifecycle controls."""

    backend = "container"

    def __init__(self, container: DockerContainer, service_port: int, what: str) -> None:
        self.host_port = free_port()
        self.what = what
        self._container = container
        container.with_bind_ports(service_port, self.host_port)
        container.with_name(f"{NAME_PREFIX}{what}-{secrets.token_hex(4)}")
        self._lock = threading.RLock()
        self._disturbed = False
        self._restorers: list[threading.Thread] = []

    @property
    def host(self) -> str:
        host = self._container.get_container_host_ip()
        return "127.0.0.1" if host == "localhost" else host

    @property
    def container_id(self) -> str:
        return self._container.get_container_id()

    def _docker(self) -> Any:
        return self._container.get_wrapped_container()

    def status(self) -> str:
        wrapped = self._docker()
        wrapped.reload()
        return str(wrapped.status)

    def boot(self) -> None:
        """Create and start the container (first start)."""
        self._container.start()
        self.wait_ready()

    def stop(self) -> None:
        """Clean shutdown; the container and its data stay, the port stays reserved."""
        with self._lock:
            self._disturbed = True
            self._docker().stop(timeout=30)

    def kill(self) -> None:
        """Abrupt death (SIGKILL), like a crashed host."""
        with self._lock:
            self._disturbed = True
            wrapped = self._docker()
            wrapped.kill()
            wrapped.wait(timeout=30)

    def start(self) -> None:
        """Start a stopped container again and wait until the service answers."""
        with self._lock:
            if self.status() != "running":
                self._docker().start()
        self.wait_ready()

    def pause(self) -> None:
        """Freeze the processes: connections hang (no refusal) until unpause()."""
        with self._lock:
            self._disturbed = True
            self._docker().pause()

    def unpause(self) -> None:
        with self._lock:
            if self.status() == "paused":
                self._docker().unpause()

    def unavailable_for(self, seconds: float, *, pause: bool = False) -> threading.Thread:
        """Stop (or pause) now, start (or unpause) after ``seconds`` in a background thread.

        Returns the thread: join() it to know the service is back (and ready, after a stop).
        """
        (self.pause if pause else self.stop)()

        def restore() -> None:
            time.sleep(seconds)
            (self.unpause if pause else self.start)()

        thread = threading.Thread(target=restore, name=f"restore-{self.what}", daemon=True)
        self._restorers.append(thread)
        thread.start()
        return thread

    def ensure_running(self) -> None:
        """After a test: bring the service back if the test left it stopped or paused."""
        if not self._disturbed:
            return
        for thread in self._restorers:
            thread.join()
        self._restorers.clear()
        if self.status() == "paused":
            self.unpause()
        self.start()
        self._disturbed = False

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.probe()
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.what} not ready after {timeout:.0f} s") from exc
                time.sleep(0.25)

    def probe(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Remove the container (and its anonymous volumes)."""
        self._container.stop()

    @property
    def admin_url(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {mask(self.admin_url)}>"


class ContainerBroker(ContainerService):
    """RabbitMQ in a container; vhosts are made with rabbitmqctl through docker exec."""

    def __init__(self, image: str) -> None:
        self.user = "ew"
        self._password = secrets.token_urlsafe(16)
        super().__init__(
            RabbitMqContainer(image=image, username=self.user, password=self._password),
            5672,
            "rabbitmq",
        )

    @property
    def admin_url(self) -> str:
        return f"amqp://{self.user}:{self._password}@{self.host}:{self.host_port}/%2F"

    def url(self, vhost: str) -> str:
        return with_path(self.admin_url, "/" + quote(vhost, safe=""))

    def probe(self) -> None:
        params = pika.URLParameters(self.admin_url)
        params.socket_timeout = 2
        params.blocked_connection_timeout = 2
        params.connection_attempts = 1
        pika.BlockingConnection(params).close()

    def ctl(self, *args: str) -> None:
        result = self._container.exec(["rabbitmqctl", "-q", *args])
        if result.exit_code != 0:
            output = result.output.decode(errors="replace").strip()[-500:]
            raise RuntimeError(f"rabbitmqctl {args[0]} failed ({result.exit_code}): {output}")

    def add_vhost(self, name: str) -> None:
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, self.user, ".*", ".*", ".*")

    def delete_vhost(self, name: str) -> None:
        self.ctl("delete_vhost", name)

    def install_ctl_shim(self, directory: Path) -> bool:
        """Write a ``rabbitmqctl`` into ``directory`` that runs in this container.

        With ``directory`` first on PATH, helpers that call ``rabbitmqctl`` themselves act on
        the session's broker, the one their URLs point at. False without a docker CLI.
        """
        docker_cli = shutil.which("docker")
        if docker_cli is None:
            return False
        shim = directory / "rabbitmqctl"
        shim.write_text(
            f'#!/bin/sh\nexec {shlex.quote(docker_cli)} exec {self.container_id} rabbitmqctl "$@"\n'
        )
        shim.chmod(0o755)
        return True


class ContainerPostgres(ContainerService):
    """PostgreSQL in a container; databases are made with SQL through the admin URL.

    It trusts network clients, like the machines' own PostgreSQL the suite also runs against:
    tests may put any password in a URL (to check it is never shown) and still connect.
    """

    def __init__(self, image: str) -> None:
        self.user = "postgres"
        self._password = secrets.token_urlsafe(16)
        super().__init__(
            PostgresContainer(
                image=image,
                username=self.user,
                password=self._password,
                dbname="postgres",
                driver=None,
            ),
            5432,
            "postgres",
        )
        self._container.with_env("POSTGRES_HOST_AUTH_METHOD", "trust")

    @property
    def admin_url(self) -> str:
        return f"postgresql://{self.user}:{self._password}@{self.host}:{self.host_port}/postgres"

    def url(self, database: str) -> str:
        return with_path(self.admin_url, f"/{database}")

    def probe(self) -> None:
        with psycopg.connect(self.admin_url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")

    def stop(self) -> None:
        # SIGINT is PostgreSQL's fast shutdown; docker stop's SIGTERM is the "smart" one,
        # which waits for every client to disconnect (then Docker's SIGKILL).
        with self._lock:
            self._disturbed = True
            wrapped = self._docker()
            wrapped.kill(signal="SIGINT")
            wrapped.wait(timeout=60)


class LocalService:
    """The machine's own RabbitMQ/PostgreSQL: usable, but not ours to stop."""

    backend = "local"

    def __init__(self, admin_url: str, why: str) -> None:
        self.admin_url = admin_url
        self.why = why

    def _refuse(self) -> None:
        pytest.skip(f"needs the container backend to control the service ({self.why})")

    def stop(self) -> None:
        self._refuse()

    def kill(self) -> None:
        self._refuse()

    def start(self) -> None:
        self._refuse()

    def pause(self) -> None:
        self._refuse()

    def unpause(self) -> None:
        self._refuse()

    def unavailable_for(self, seconds: float, *, pause: bool = False) -> threading.Thread:
        self._refuse()
        raise AssertionError("unreachable")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {mask(self.admin_url)}>"


class LocalBroker(LocalService):
    """The machine's RabbitMQ; vhosts are made with the host's rabbitmqctl."""

    def url(self, vhost: str) -> str:
        return with_path(self.admin_url, "/" + quote(vhost, safe=""))

    @staticmethod
    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)

    def add_vhost(self, name: str) -> None:
        self.ctl("add_vhost", name)
        user = urlsplit(self.admin_url).username or "guest"
        self.ctl("set_permissions", "-p", name, user, ".*", ".*", ".*")

    def delete_vhost(self, name: str) -> None:
        self.ctl("delete_vhost", name)


class LocalPostgres(LocalService):
    def url(self, database: str) -> str:
        return with_path(self.admin_url, f"/{database}")
