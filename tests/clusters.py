"""A 3-node RabbitMQ cluster and a PostgreSQL primary/standby pair, in containers.

Built from the same images as the container suite (``RABBITMQ_IMAGE``, ``POSTGRES_IMAGE``;
on these machines ``local/rabbitmq:3.10`` and ``local/postgres:15`` from
``deploy/images/build-local.sh``), on a user-defined Docker network so that the nodes
reach each other by host name. Each node's service port is published on a host port
chosen at creation, so a node that is killed and started again keeps its URL.

- RabbitMQ: nodes ``rabbit@<prefix>-rN`` share an Erlang cookie; nodes 2 and 3 run
  ``rabbitmqctl stop_app; join_cluster rabbit@<prefix>-r1; start_app`` (RabbitMQ docs,
  "Clustering Guide", "Creating a Cluster"). A killed node that starts again rejoins by
  itself (its membership is on its disk).
- PostgreSQL: the primary trusts replication connections; the standby is made with
  ``pg_basebackup -R`` (it writes ``standby.signal`` and ``primary_conninfo``) and named by
  ``application_name``; a synchronous pair then sets ``synchronous_standby_names`` on the
  primary only (``ALTER SYSTEM`` after the base backup: ``postgresql.auto.conf`` is not
  replicated, so a promoted standby does not wait for a standby it does not have).
  Promotion is ``pg_ctl promote`` (PostgreSQL docs, "Failover", 27.3).

Containers and networks are named ``ew-test-ha-*`` (``docker rm -f`` them after a killed run).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from typing import Any

import docker  # type: ignore[import-untyped]
import psycopg

from tests.containers import NAME_PREFIX, free_port

READY_TIMEOUT_S = 120.0
PGDATA = "/var/lib/postgresql/data"


def _wait(what: str, probe: Any, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if probe():
                return
        except Exception as exc:  # not up yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready after {timeout:.0f} s") from exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.5)


class _Network:
    def __init__(self, kind: str) -> None:
        self.client = docker.from_env(timeout=120)
        self.prefix = f"{NAME_PREFIX}ha-{kind}-{secrets.token_hex(3)}"
        self.network = self.client.networks.create(self.prefix, driver="bridge")
        self.containers: list[Any] = []

    def run(self, image: str, name: str, port: int, host_port: int, **kwargs: Any) -> Any:
        container = self.client.containers.run(
            image,
            name=f"{self.prefix}-{name}",
            hostname=f"{self.prefix}-{name}",
            network=self.prefix,
            ports={f"{port}/tcp": ("127.0.0.1", host_port)},
            detach=True,
            **kwargs,
        )
        self.containers.append(container)
        return container

    def exec(self, container: Any, *command: str, user: str = "") -> str:
        result = container.exec_run(list(command), user=user)
        output = result.output.decode(errors="replace")
        if result.exit_code != 0:
            raise RuntimeError(f"{command[0]} failed ({result.exit_code}): {output[-500:]}")
        return str(output)

    def close(self) -> None:
        for container in self.containers:
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)
        with contextlib.suppress(Exception):
            self.network.remove()
        self.client.close()


class RabbitCluster:
    """Three RabbitMQ nodes, clustered; ``url`` names them all (comma-separated)."""

    def __init__(self, image: str, size: int = 3) -> None:
        self._net = _Network("rmq")
        self.ports = [free_port() for _ in range(size)]
        self.names = [f"{self._net.prefix}-r{i + 1}" for i in range(size)]
        cookie = secrets.token_hex(16)
        # the cookie file is written once (a restarted node keeps it: mode 400)
        script = (
            'c="$HOME/.erlang.cookie"; [ -f "$c" ] || { printf %s "$COOKIE" > "$c";'
            ' chmod 400 "$c"; }; exec /usr/lib/rabbitmq/bin/rabbitmq-server'
        )
        self.nodes = [
            self._net.run(
                image,
                f"r{i + 1}",
                5672,
                port,
                entrypoint=["sh", "-c", script],
                environment={"RABBITMQ_NODENAME": f"rabbit@{name}", "COOKIE": cookie},
            )
            for i, (name, port) in enumerate(zip(self.names, self.ports, strict=True))
        ]
        for index in range(size):
            self.wait_node(index)
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", f"rabbit@{self.names[0]}")
            self.ctl(node, "start_app")

    def ctl(self, node: Any, *args: str) -> str:
        return self._net.exec(node, "rabbitmqctl", "-q", *args)

    def wait_node(self, index: int) -> None:
        node = self.nodes[index]
        _wait(
            f"rabbitmq node {index + 1}",
            lambda: self._net.exec(node, "rabbitmqctl", "-q", "await_startup") is not None,
        )

    @property
    def url(self) -> str:
        return ",".join(f"amqp://guest:guest@127.0.0.1:{port}/%2F" for port in self.ports)

    def node_url(self, index: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.ports[index]}/%2F"

    def running(self) -> list[int]:
        found = []
        for index, node in enumerate(self.nodes):
            node.reload()
            if node.status == "running":
                found.append(index)
        return found

    def leader_of(self, queue: str) -> int:
        """The index of the node that leads the quorum queue ``queue``."""
        import json

        asker = self.nodes[self.running()[0]]
        listed = json.loads(
            self.ctl(asker, "list_queues", "name", "leader", "--formatter", "json") or "[]"
        )
        leader = next(q["leader"] for q in listed if q["name"] == queue)
        return self.names.index(str(leader).split("@", 1)[1])

    def kill(self, index: int) -> None:
        self.nodes[index].kill()
        self.nodes[index].wait(timeout=60)

    def stop(self, index: int) -> None:
        """A clean stop (SIGTERM: the node leaves, its connections are closed)."""
        self.nodes[index].stop(timeout=60)

    def start(self, index: int) -> None:
        self.nodes[index].start()
        self.wait_node(index)

    def close(self) -> None:
        self._net.close()


class PostgresPair:
    """A primary and a streaming standby; ``url`` is libpq multi-host, read-write only."""

    def __init__(self, image: str, *, synchronous: bool) -> None:
        self._net = _Network("pg")
        self.synchronous = synchronous
        self.ports = [free_port(), free_port()]
        self.names = [f"{self._net.prefix}-p1", f"{self._net.prefix}-p2"]
        self.primary = self._net.run(
            image, "p1", 5432, self.ports[0], environment={"POSTGRES_HOST_AUTH_METHOD": "trust"}
        )
        _wait("postgres primary", lambda: self._query(0, "SELECT 1"))
        self._net.exec(
            self.primary,
            "sh",
            "-c",
            f'echo "host replication all all trust" >> {PGDATA}/pg_hba.conf',
        )
        self._query(0, "SELECT pg_reload_conf()")
        standby_name = "standby"
        script = (
            f"mkdir -p {PGDATA} && chown postgres:postgres {PGDATA} && chmod 700 {PGDATA}"
            f" && runuser -u postgres -- pg_basebackup -h {self.names[0]} -U postgres"
            f" -D {PGDATA} -R -X stream -c fast"
            f" && echo \"primary_conninfo = 'host={self.names[0]} user=postgres"
            f" application_name={standby_name}'\" >> {PGDATA}/postgresql.auto.conf"
            " && exec /usr/local/bin/docker-entrypoint.sh"
        )
        self.standby = self._net.run(
            image, "p2", 5432, self.ports[1], entrypoint=["sh", "-c", script]
        )
        _wait("postgres standby", lambda: self._query(1, "SELECT pg_is_in_recovery()")[0][0])
        if synchronous:
            self._query(0, f"ALTER SYSTEM SET synchronous_standby_names = '{standby_name}'")
            self._query(0, "SELECT pg_reload_conf()")
        _wait(
            "replication", lambda: self.replication_state() == ("sync" if synchronous else "async")
        )

    def _query(self, index: int, sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.ports[index]}/postgres",
            autocommit=True,
            connect_timeout=3,
        ) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return (
            f"postgresql://postgres@{hosts}/postgres"
            "?target_session_attrs=read-write&connect_timeout=3"
        )

    def replication_state(self) -> str | None:
        rows = self._query(0, "SELECT sync_state FROM pg_stat_replication")
        return str(rows[0][0]) if rows else None

    def caught_up(self) -> bool:
        """The standby has replayed everything the primary wrote."""
        [(written,)] = self._query(0, "SELECT pg_current_wal_lsn()::text")
        [(replayed,)] = self._query(1, f"SELECT pg_last_wal_replay_lsn() >= '{written}'::pg_lsn")
        return bool(replayed)

    def detach_standby(self) -> None:
        """Stop the standby's WAL receiver (an empty ``primary_conninfo``, reloadable since
        PostgreSQL 13): the primary goes on committing (asynchronous) without it, so these
        commits are lost if it is promoted. ``docker pause`` would not do: the kernel keeps
        receiving WAL into the frozen walreceiver's socket buffer, replayed after unpause."""
        self._query(1, "ALTER SYSTEM SET primary_conninfo = ''")
        self._query(1, "SELECT pg_reload_conf()")
        _wait("standby detached", lambda: self.replication_state() is None)

    def stop_primary(self) -> None:
        """A fast shutdown (SIGINT: clients are disconnected, then the server exits)."""
        self.primary.kill(signal="SIGINT")
        self.primary.wait(timeout=60)

    def kill_primary(self) -> None:
        self.primary.kill()
        self.primary.wait(timeout=60)

    def promote(self) -> None:
        self._net.exec(self.standby, "pg_ctl", "promote", "-D", PGDATA, "-w", user="postgres")
        _wait("promoted standby", lambda: not self._query(1, "SELECT pg_is_in_recovery()")[0][0])

    def timeline(self, index: int) -> int:
        [(name,)] = self._query(index, "SELECT pg_walfile_name(pg_current_wal_lsn())")
        return int(str(name)[:8], 16)

    def close(self) -> None:
        self._net.close()
