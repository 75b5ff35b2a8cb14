"""The session pool on real PostgreSQL: exclusive leases, fencing, health, recovery, threads."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from tests.integration.test_bridge_helpers import (
    OPEN_MARKETS_TOML,
    address_of,
    new_secret,
    open_config,
)
from tests.ports import restartable_port
from worker.mt5 import api
from worker.mt5.bridge.client import BridgeServer
from worker.mt5.sessions import SessionSpec
from worker.mt5.sim.terminal import SimTerminal
from worker.pool.leases import ClaimTimeout, LeaseLost, PoolClosed, UnknownSession
from worker.pool.pool import LOCK_CLASS, SessionPool
from worker.store.store import Store


def _factory(terminal: api.Terminal, spec: SessionSpec) -> tuple[str, api.Terminal]:
    return (spec.id, terminal)  # stands for the gateway built on this terminal


@pytest.fixture
def db_pool(database_url: str) -> Iterator[ConnectionPool]:
    pool = ConnectionPool(database_url, min_size=1, max_size=8, open=True)
    yield pool
    pool.close()


@pytest.fixture
def sim_specs(tmp_path: Path) -> list[SessionSpec]:
    config = tmp_path / "sim.toml"
    config.write_text(OPEN_MARKETS_TOML, encoding="utf-8")
    return [SessionSpec(id=f"sim-{i}", backend="sim", sim_config=str(config)) for i in range(3)]


@pytest.fixture
def make_pool(db_pool: ConnectionPool) -> Iterator[Callable[..., SessionPool]]:
    pools: list[SessionPool] = []

    def make(specs: list[SessionSpec], **options: Any) -> SessionPool:
        options.setdefault("reconnect_backoff", (0.02, 0.1))
        pool = SessionPool(specs, db_pool, _factory, **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def _advisory_holders(database_url: str) -> dict[int, int]:
    """objid of every class-1 advisory lock -> pid of the backend holding it."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT objid::bigint, pid FROM pg_locks "
            "WHERE locktype = 'advisory' AND classid = %s AND objsubid = 2 AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (LOCK_CLASS,),
        ).fetchall()
    return {int(objid): int(pid) for objid, pid in rows}


def _eventually_no_holders(database_url: str, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while _advisory_holders(database_url):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _oid(key: int) -> int:
    return key & 0xFFFFFFFF  # pg_locks shows the int4 key as an unsigned oid


def test_claims_are_exclusive_and_hold_an_advisory_lock(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec], database_url: str
) -> None:
    pool = make_pool(sim_specs)
    leases = [pool.claim(timeout=1) for _ in range(3)]
    assert sorted(lease.session.id for lease in leases) == ["sim-0", "sim-1", "sim-2"]
    holders = _advisory_holders(database_url)
    for lease in leases:
        assert holders[_oid(lease.session.spec.lock_key)] == lease.conn.info.backend_pid
        assert lease.session.gateway == (lease.session.id, lease.session.terminal)
        assert lease.session.login == 5_000_001 and lease.session.server == "SimBroker-Demo"
    assert pool.health().in_use == 3
    with pytest.raises(ClaimTimeout):
        pool.claim(timeout=0.2)
    freed = leases.pop(1)
    freed.release()
    assert _oid(freed.session.spec.lock_key) not in _advisory_holders(database_url)
    again = pool.claim(timeout=1)
    assert again.session.id == freed.session.id
    for lease in [*leases, again]:
        lease.release()
    assert _advisory_holders(database_url) == {}
    assert pool.health().in_use == 0


def test_a_session_locked_elsewhere_is_not_handed_out_until_unlocked(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec], database_url: str
) -> None:
    pool = make_pool(sim_specs[:2])
    # another process holding sim-0 is, to PostgreSQL, just another session with the lock
    other = psycopg.connect(database_url, autocommit=True)
    key = sim_specs[0].lock_key
    other.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, key))
    try:
        leases = [pool.claim(timeout=0.5)]
        assert leases[0].session.id == "sim-1"
        with pytest.raises(ClaimTimeout):
            pool.claim(timeout=0.3)
        with pytest.raises(ClaimTimeout):
            pool.claim(timeout=0.2, session_id="sim-0")
        timer = threading.Timer(
            0.2, lambda: other.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, key))
        )
        timer.start()
        leases.append(pool.claim(timeout=5, session_id="sim-0"))
        timer.join()
        assert leases[1].session.id == "sim-0"
        for lease in leases:
            lease.release()
    finally:
        other.close()


def test_claim_by_session_id(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec]
) -> None:
    pool = make_pool(sim_specs)
    with pool.claim(timeout=1, session_id="sim-2") as lease:
        assert lease.session.id == "sim-2"
        with pytest.raises(ClaimTimeout):
            pool.claim(timeout=0.1, session_id="sim-2")
    with pytest.raises(UnknownSession):
        pool.claim(timeout=1, session_id="sim-9")


def test_the_lock_connection_fences_a_stale_holder(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec], database_url: str
) -> None:
    pool = make_pool(sim_specs[:1])
    lease = pool.claim(timeout=1)
    lease.fence_check()
    with lease.conn.transaction():
        lease.conn.execute("CREATE TABLE intents (id int)")
    # the lock's connection dies (network partition, backend killed, failover)
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (lease.conn.info.backend_pid,))
    assert _advisory_holders(database_url) == {}
    with pytest.raises(psycopg.OperationalError), lease.conn.transaction():
        lease.conn.execute("INSERT INTO intents VALUES (1)")  # the intent commit fails
    with pytest.raises(LeaseLost):
        lease.fence_check()
    lease.release()
    with pytest.raises(LeaseLost):
        lease.fence_check()
    with pool.claim(timeout=1) as again:  # the session is available on a fresh connection
        again.fence_check()
        with again.conn.transaction():
            again.conn.execute("INSERT INTO intents VALUES (2)")
    with psycopg.connect(database_url) as check:
        assert check.execute("SELECT id FROM intents").fetchall() == [(2,)]


def test_release_restores_the_connection_and_rolls_back_leftovers(
    make_pool: Callable[..., SessionPool],
    sim_specs: list[SessionSpec],
    db_pool: ConnectionPool,
    database_url: str,
) -> None:
    pool = make_pool(sim_specs[:1])
    lease = pool.claim(timeout=1)
    assert lease.conn.autocommit is True
    conn = lease.conn
    conn.execute("BEGIN")
    conn.execute("SELECT 1")  # an abandoned transaction
    lease.release()
    assert conn.autocommit is False  # the pool's connections are not autocommit
    assert _advisory_holders(database_url) == {}
    lease.release()  # idempotent
    assert pool.health().in_use == 0
    with db_pool.connection() as same:
        assert same.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_release_broken_discards_the_connection(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec], database_url: str
) -> None:
    pool = make_pool(sim_specs[:1])
    lease = pool.claim(timeout=1)
    conn = lease.conn
    lease.release(broken=True)
    assert conn.closed
    # the server frees a closed connection's locks when its backend exits, a moment later
    assert _eventually_no_holders(database_url)
    with pool.claim(timeout=1) as again:
        assert again.conn is not conn


def test_a_disconnected_terminal_is_never_handed_out_and_comes_back(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec]
) -> None:
    pool = make_pool(sim_specs[:2], reconnect_backoff=(0.05, 0.1))
    first = pool.claim(timeout=1)
    terminal = first.session.terminal
    assert isinstance(terminal, SimTerminal)
    first.release()
    terminal.disconnect()  # the terminal lost its connection while idle
    seen: set[str] = set()
    for _ in range(10):
        with pool.claim(timeout=2) as lease:
            info = lease.session.terminal.terminal_info()
            assert info is not None and info.connected
            seen.add(lease.session.id)
    # it was reconnected in the background (same terminal object) and is back in rotation
    deadline = time.monotonic() + 5
    while pool.health().unhealthy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.health().unhealthy == 0
    with pool.claim(timeout=1, session_id=first.session.id) as lease:
        assert lease.session.terminal is terminal


def test_a_failing_bridge_is_taken_out_of_rotation_and_returns_when_healthy(
    make_pool: Callable[..., SessionPool],
    sim_specs: list[SessionSpec],
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = new_secret()
    sim = SimTerminal(open_config())
    assert sim.initialize()
    # it comes back on the same port: one the kernel never gives an outgoing connection
    server = BridgeServer(sim, secret.encode(), port=restartable_port())
    server.start()
    address = address_of(server)
    host, port = server.address
    bridge = SessionSpec(id="remote", backend="bridge", address=address, secret=secret)
    pool = make_pool([bridge, sim_specs[0]], max_failures=2, reconnect_backoff=(0.02, 0.05))
    with pool.claim(timeout=1, session_id="remote") as lease:
        assert lease.session.login == 5_000_001
    server.stop()
    with caplog.at_level(logging.WARNING, logger="worker.pool"):
        for _ in range(5):  # only the healthy local session is handed out
            with pool.claim(timeout=2) as lease:
                assert lease.session.id == "sim-0"
        # the reconnect thread counts the failure under the pool's lock, then logs it after:
        # wait for both (generously: a loaded machine delays that thread, nothing else)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            _state(pool, "remote") != "down" or "out of rotation" not in caplog.text
        ):
            time.sleep(0.02)
    assert _state(pool, "remote") == "down"
    health = pool.health()
    assert health.unhealthy == 1 and health.size == 2
    remote = next(s for s in health.sessions if s.id == "remote")
    assert remote.failures >= 2 and remote.last_error and "connect" in remote.last_error
    assert "out of rotation" in caplog.text and secret not in caplog.text
    assert secret not in repr(health)
    with pytest.raises(ClaimTimeout):
        pool.claim(timeout=0.2, session_id="remote")
    # the terminal's bridge comes back: so does the session
    again = BridgeServer(sim, secret.encode(), host=host, port=port)
    again.start()
    try:
        with pool.claim(timeout=10, session_id="remote") as lease:
            assert lease.session.terminal.account_info() == sim.account_info()
        assert _state(pool, "remote") == "idle"
    finally:
        again.stop()


def _state(pool: SessionPool, session_id: str) -> str:
    return next(s.state for s in pool.health().sessions if s.id == session_id)


def test_a_session_that_never_opened_is_retried(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec]
) -> None:
    secret = new_secret()
    sim = SimTerminal(open_config())
    assert sim.initialize()
    server = BridgeServer(sim, secret.encode(), port=restartable_port())
    server.start()
    host, port = server.address
    server.stop()  # nothing listens there when the pool starts
    spec = SessionSpec(id="late", backend="bridge", address=f"{host}:{port}", secret=secret)
    pool = make_pool([spec])
    assert pool.health().unhealthy == 1
    with pytest.raises(ClaimTimeout):
        pool.claim(timeout=0.1)
    late = BridgeServer(sim, secret.encode(), host=host, port=port)
    late.start()
    try:
        with pool.claim(timeout=10) as lease:
            assert lease.session.id == "late"
            assert lease.session.login == 5_000_001
    finally:
        late.stop()


def _run_in_threads(work: Callable[[], None], count: int) -> None:
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


def test_threads_never_share_a_session(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec]
) -> None:
    pool = make_pool(sim_specs)
    intervals: dict[str, list[tuple[int, int]]] = defaultdict(list)
    errors: list[BaseException] = []
    record = threading.Lock()

    def work() -> None:
        try:
            for _ in range(15):
                with pool.claim(timeout=10) as lease:
                    start = time.monotonic_ns()
                    assert lease.session.terminal.account_info() is not None
                    end = time.monotonic_ns()
                with record:
                    intervals[lease.session.id].append((start, end))
        except BaseException as exc:
            errors.append(exc)

    _run_in_threads(work, 6)
    assert errors == []
    assert sum(len(spans) for spans in intervals.values()) == 90
    for spans in intervals.values():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start
    assert pool.health().in_use == 0


def test_threads_never_share_a_parked_session(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec], database_url: str
) -> None:
    pool = make_pool(sim_specs[:2], linger_seconds=5.0)
    seen: dict[str, set[int]] = defaultdict(set)
    errors: list[BaseException] = []
    active: dict[str, int] = defaultdict(int)
    record = threading.Lock()

    def work() -> None:
        try:
            for _ in range(20):
                with pool.claim(timeout=10) as lease:
                    with record:
                        active[lease.session.id] += 1
                        assert active[lease.session.id] == 1, "two holders of one session"
                        seen[lease.session.id].add(lease.conn.info.backend_pid)
                    time.sleep(0.001)
                    with record:
                        active[lease.session.id] -= 1
        except BaseException as exc:
            errors.append(exc)

    _run_in_threads(work, 4)
    assert errors == []
    # each session stayed on the one connection that holds its lock
    assert {session: len(pids) for session, pids in seen.items()} == {"sim-0": 1, "sim-1": 1}
    holders = _advisory_holders(database_url)
    assert {holders[_oid(spec.lock_key)] for spec in sim_specs[:2]} == {
        next(iter(pids)) for pids in seen.values()
    }


def test_a_parked_lease_keeps_its_lock_until_it_lingered(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec], database_url: str
) -> None:
    pool = make_pool(sim_specs[:1], linger_seconds=0.3)
    key = _oid(sim_specs[0].lock_key)
    with pool.claim(timeout=1) as lease:
        pid = lease.conn.info.backend_pid
    assert _advisory_holders(database_url) == {key: pid}, "parked: the lock is kept"
    assert pool.health().in_use == 0
    with pool.claim(timeout=1) as again:
        assert again.conn.info.backend_pid == pid, "taken back without a new lock"
    deadline = time.monotonic() + 5
    while _advisory_holders(database_url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _advisory_holders(database_url) == {}, "released once it lingered"
    with pool.claim(timeout=1) as fresh:
        assert _advisory_holders(database_url) == {key: fresh.conn.info.backend_pid}


def test_a_session_held_too_long_is_released_for_other_processes(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec], database_url: str
) -> None:
    # poll_interval 0.5 s: after the long hold this process leaves the session alone 1.5 s
    pool = make_pool(sim_specs[:1], linger_seconds=10.0, max_hold_seconds=0.2, poll_interval=0.5)
    with pool.claim(timeout=1):
        time.sleep(0.3)
    assert _advisory_holders(database_url) == {}, "held past max_hold: unlocked on release"
    with pytest.raises(ClaimTimeout):
        pool.claim(timeout=0.3)  # its turn is given to the other processes
    other = psycopg.connect(database_url, autocommit=True)
    try:
        key = sim_specs[0].lock_key
        taken = other.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, key))
        assert taken.fetchone() == (True,), "another process takes its turn"
        other.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, key))
    finally:
        other.close()
    with pool.claim(timeout=1, session_id="sim-0"):  # asked for by id: no waiting
        pass
    assert len(_advisory_holders(database_url)) == 1, "a fresh hold parks again"


def test_a_parked_lease_whose_connection_died_is_fenced_then_locked_again(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec], database_url: str
) -> None:
    pool = make_pool(sim_specs[:1], linger_seconds=10.0)
    with pool.claim(timeout=1) as lease:
        dead = lease.conn
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (dead.info.backend_pid,))
    other = psycopg.connect(database_url, autocommit=True)  # another process takes it
    try:
        other.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, sim_specs[0].lock_key))
        # handed out without a round trip, the parked lease fails its first statement,
        # as the intent commit would: no order can follow
        with pytest.raises(psycopg.OperationalError), pool.claim(timeout=1) as stale:
            assert stale.conn is dead
            stale.conn.execute("SELECT 1")
        assert dead.closed, "released as broken"
        with pytest.raises(ClaimTimeout):
            pool.claim(timeout=0.3)
    finally:
        other.close()
    with pool.claim(timeout=2) as again:
        assert again.conn is not dead
        again.fence_check()
        holders = _advisory_holders(database_url)
        assert holders == {_oid(sim_specs[0].lock_key): again.conn.info.backend_pid}


def test_close_releases_parked_leases(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec], database_url: str
) -> None:
    pool = make_pool(sim_specs, linger_seconds=10.0)
    for lease in [pool.claim(timeout=1) for _ in range(3)]:
        lease.release()
    assert len(_advisory_holders(database_url)) == 3
    pool.close()
    assert _advisory_holders(database_url) == {}


def test_close_stops_claims(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec]
) -> None:
    pool = make_pool(sim_specs[:1])
    with pool.claim(timeout=1) as lease:
        terminal = lease.session.terminal
    pool.close()
    with pytest.raises(PoolClosed):
        pool.claim(timeout=1)
    assert terminal.terminal_info() is None  # shut down
    assert {s.state for s in pool.health().sessions} == {"closed"}


def test_database_unreachable_is_a_claim_timeout(sim_specs: list[SessionSpec]) -> None:
    unreachable = ConnectionPool(
        "postgresql://postgres@127.0.0.1:1/none", min_size=0, max_size=1, open=True
    )
    try:
        pool = SessionPool(sim_specs[:1], unreachable, _factory)
        with pytest.raises(ClaimTimeout):
            pool.claim(timeout=0.5)
        assert pool.health().in_use == 0
        pool.close()
    finally:
        unreachable.close()


def test_the_fence_proves_the_lock_before_a_send_and_refuses_a_lost_one(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec], database_url: str
) -> None:
    """Issue 18.2: a lease whose lock connection died (here while parked) and whose session
    another process has locked since must not send: ``fence()`` is the check before every
    ``order_send``."""
    pool = make_pool(sim_specs[:1], linger_seconds=10.0)
    with pool.claim(timeout=1) as lease:
        lease.fence()  # held: no exception
    stale = pool.claim(timeout=1)  # the parked lease, handed out without a round trip
    try:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (stale.conn.info.backend_pid,))
        other = psycopg.connect(database_url, autocommit=True)
        try:
            other.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, sim_specs[0].lock_key))
            with pytest.raises(LeaseLost):
                stale.fence()
        finally:
            other.close()
    finally:
        stale.release(broken=True)


def test_the_fence_refuses_when_the_lock_was_dropped_on_a_live_connection(
    make_pool: Callable[..., SessionPool], sim_specs: list[SessionSpec]
) -> None:
    """The connection still answers but no longer holds the lock (e.g. an unlock by mistake):
    only a look at pg_locks tells, and the fence looks."""
    pool = make_pool(sim_specs[:1])
    with pool.claim(timeout=1) as lease:
        lease.conn.execute("SELECT pg_advisory_unlock_all()")
        with pytest.raises(LeaseLost, match="no longer held"):
            lease.fence()


def test_store_connections_carry_tcp_keepalives(database_url: str) -> None:
    store = Store.open(database_url, max_size=2)
    try:
        with store.connection() as conn:
            parameters = conn.info.get_parameters()
        assert parameters.get("keepalives") == "1"
        assert int(parameters["keepalives_idle"]) <= 30
    finally:
        store.close()
