"""Group commit (issue 19) against a real PostgreSQL: writes queued together share one
transaction; a failing write fails alone; a write that names a session lock commits only while
that lock is held (the fence travels with the statement, whichever connection runs it)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from schemas.identity import comment_token_for
from worker.execution.outcome import Publish
from worker.store.group import GroupCommit
from worker.store.store import TCP_KEEPALIVES, Event, LockHeld, LockNotHeld, Store

pytestmark = pytest.mark.integration

BLOCKER = 4242  # an advisory lock the test holds to keep a batch's leader busy
LOCK_CLASS = 1


@pytest.fixture
def store(new_database: Callable[[], str]) -> Iterator[Store]:
    opened = Store.open(new_database(), max_size=4, group_commit=True)
    opened.migrate()
    yield opened
    opened.close()


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    """Synchronisation, not a timing assertion: the deadline only bounds a broken run."""
    deadline = time.monotonic() + 30.0
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.005)


class _Writers:
    """Threads each committing one statement through the group; results by name."""

    def __init__(self, group: GroupCommit) -> None:
        self.group = group
        self.results: dict[str, Any] = {}
        self.threads: list[threading.Thread] = []

    def start(self, name: str, query: str, params: dict[str, Any] | None = None) -> None:
        def run() -> None:
            try:
                self.results[name] = self.group.execute(query, params or {})
            except Exception as exc:
                self.results[name] = exc

        thread = threading.Thread(target=run, name=name)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(30.0)
            assert not thread.is_alive()


@pytest.fixture
def group_and_admin(
    new_database: Callable[[], str],
) -> Iterator[tuple[GroupCommit, psycopg.Connection[Any]]]:
    url = new_database()
    group = GroupCommit(url, TCP_KEEPALIVES, lanes=1)
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("CREATE TABLE t (n int PRIMARY KEY)")
        yield group, admin
    group.close()


def _leader_blocked(writers: _Writers, admin: psycopg.Connection[Any]) -> None:
    """A first write that waits on a lock the test holds: the writes queued meanwhile are
    taken together by the next leader."""
    admin.execute("SELECT pg_advisory_lock(%s)", (BLOCKER,))
    writers.start("blocker", "SELECT pg_advisory_xact_lock(%(k)s)", {"k": BLOCKER})
    _wait_until(
        lambda: (
            admin.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()
            == (1,)
        ),
        "the first write waits on the test's lock",
    )


def test_writes_queued_together_commit_in_one_transaction(
    group_and_admin: tuple[GroupCommit, psycopg.Connection[Any]],
) -> None:
    group, admin = group_and_admin
    writers = _Writers(group)
    _leader_blocked(writers, admin)
    for n in range(5):
        writers.start(f"w{n}", "INSERT INTO t VALUES (%(n)s) RETURNING txid_current(), n", {"n": n})
    _wait_until(lambda: group.queued == 5, "five writes queued behind the busy leader")
    admin.execute("SELECT pg_advisory_unlock(%s)", (BLOCKER,))
    writers.join()

    rows = [writers.results[f"w{n}"] for n in range(5)]
    assert [row[1] for row in rows] == list(range(5)), "each writer gets its own row"
    assert len({row[0] for row in rows}) == 1, "one transaction for the five writes"
    assert admin.execute("SELECT count(*) FROM t").fetchone() == (5,)
    assert group.stats.sizes[-2:] == [1, 5]


def test_a_failing_write_fails_alone(
    group_and_admin: tuple[GroupCommit, psycopg.Connection[Any]],
) -> None:
    group, admin = group_and_admin
    writers = _Writers(group)
    _leader_blocked(writers, admin)
    writers.start("good-1", "INSERT INTO t VALUES (1) RETURNING n")
    _wait_until(lambda: group.queued == 1, "first write queued")
    writers.start("bad", "SELECT 1 / (n - n) FROM (SELECT 7 AS n) AS s")
    _wait_until(lambda: group.queued == 2, "bad write queued")
    writers.start("good-2", "INSERT INTO t VALUES (2) RETURNING n")
    _wait_until(lambda: group.queued == 3, "three writes queued")
    admin.execute("SELECT pg_advisory_unlock(%s)", (BLOCKER,))
    writers.join()

    assert writers.results["good-1"] == (1,)
    assert writers.results["good-2"] == (2,)
    assert isinstance(writers.results["bad"], psycopg.errors.DivisionByZero)
    assert admin.execute("SELECT n FROM t ORDER BY n").fetchall() == [(1,), (2,)]
    assert group.stats.retried_alone == 3


def test_a_busy_lane_does_not_hold_up_the_others(new_database: Callable[[], str]) -> None:
    """Grouping must not serialise PostgreSQL's work onto one backend: with a batch stuck
    on one lane, a write commits on the other."""
    url = new_database()
    group = GroupCommit(url, TCP_KEEPALIVES, lanes=2)
    try:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("CREATE TABLE t (n int PRIMARY KEY)")
            writers = _Writers(group)
            _leader_blocked(writers, admin)
            assert group.execute("INSERT INTO t VALUES (1) RETURNING n", {}) == (1,)
            assert "blocker" not in writers.results, "the first lane is still busy"
            admin.execute("SELECT pg_advisory_unlock(%s)", (BLOCKER,))
            writers.join()
            assert not isinstance(writers.results["blocker"], Exception)
    finally:
        group.close()


def test_a_lost_connection_is_replaced(
    group_and_admin: tuple[GroupCommit, psycopg.Connection[Any]],
) -> None:
    group, admin = group_and_admin
    (pid,) = group.execute("SELECT pg_backend_pid()", {}) or (None,)
    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        group.execute("INSERT INTO t VALUES (1) RETURNING n", {})
    assert group.execute("INSERT INTO t VALUES (2) RETURNING n", {}) == (2,)
    assert admin.execute("SELECT n FROM t").fetchall() == [(2,)]


# --- the fence in the statement -------------------------------------------------------------


def _intent(execution_id: uuid.UUID) -> dict[str, Any]:
    return {
        "execution_id": execution_id,
        "idempotency_key": f"key-{execution_id}",
        "state": "SUBMITTING",
        "comment_token": comment_token_for(execution_id),
        "received_at": datetime.now(UTC),
        "symbol": "EURUSD",
        "request": {"symbol": "EURUSD"},
    }


def _holder(store: Store, key: int) -> tuple[psycopg.Connection[Any], LockHeld]:
    conn = psycopg.connect(store.pool.conninfo, autocommit=True)
    conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, key))
    return conn, LockHeld(conn.info.backend_pid, LOCK_CLASS, key)


def _state(store: Store, execution_id: uuid.UUID) -> str | None:
    with store.connection() as conn:
        found = store.load(conn, execution_id)
    return found.state if found is not None else None


def test_an_intent_commits_only_while_its_lease_holds_the_lock(store: Store) -> None:
    holder, lock = _holder(store, 77)
    first, second = uuid.uuid4(), uuid.uuid4()
    with store.connection() as conn:
        assert store.insert_intent(conn, _intent(first), [Event("intent")], lock=lock)
        holder.close()  # the lease's connection, and with it the lock, is gone
        with pytest.raises(LockNotHeld):
            store.insert_intent(conn, _intent(second), [Event("intent")], lock=lock)
    assert _state(store, first) == "SUBMITTING"
    assert _state(store, second) is None, "no intent without the lock"


def test_a_lock_held_by_another_backend_is_no_fence_for_this_lease(store: Store) -> None:
    """The lock is held, but not by the lease's backend (another process took the session)."""
    holder, lock = _holder(store, 78)
    holder.close()
    other, _ = _holder(store, 78)
    try:
        execution_id = uuid.uuid4()
        with store.connection() as conn, pytest.raises(LockNotHeld):
            store.insert_intent(conn, _intent(execution_id), [], lock=lock)
        assert _state(store, execution_id) is None
    finally:
        other.close()


def test_without_group_commit_the_lease_connection_is_the_fence(
    new_database: Callable[[], str],
) -> None:
    """Ungrouped, a write runs on the lease's own connection: no pg_locks read is asked for
    (the connection's commit is the fence), so a lock named on it is not looked up."""
    plain = Store.open(new_database(), max_size=2)
    try:
        plain.migrate()
        holder, lock = _holder(plain, 80)
        holder.close()  # a lock no backend holds: a grouped write would refuse it
        execution_id = uuid.uuid4()
        with plain.connection() as conn:
            assert plain.insert_intent(conn, _intent(execution_id), [], lock=lock)
        assert _state(plain, execution_id) == "SUBMITTING"
    finally:
        plain.close()


def test_a_final_commits_only_while_its_lease_holds_the_lock(store: Store) -> None:
    holder, lock = _holder(store, 79)
    execution_id = uuid.uuid4()
    confirmation = Publish(execution_id, "confirmation.filled.EURUSD", b"{}", None, None)
    final = {**_intent(execution_id), "state": "FILLED"}
    with store.connection() as conn:
        assert store.insert_intent(conn, _intent(execution_id), [], lock=lock)
        holder.close()
        with pytest.raises(LockNotHeld):
            store.finish(conn, final, [Event("commit")], confirmation, lock=lock)
        assert store.confirmation_of(conn, execution_id) is None, "no outbox row either"
    assert _state(store, execution_id) == "SUBMITTING", "left in flight for its holder"

    holder, lock = _holder(store, 79)
    try:
        with store.connection() as conn:
            kept = store.finish(conn, final, [Event("commit")], confirmation, lock=lock)
        assert kept is confirmation
        assert _state(store, execution_id) == "FILLED"
    finally:
        holder.close()


# --- the fence must hold once the write holds its row, not only when its statement began ----


def _waiting_on_a_row_lock(admin: psycopg.Connection[Any]) -> bool:
    """One backend waits for another transaction to end (a locked row, a key being
    inserted), not on an advisory lock."""
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND wait_event = 'transactionid'"
    ).fetchone()
    return row == (1,)


def _lose_the_lease(admin: psycopg.Connection[Any], store: Store, lock: LockHeld) -> Any:
    """The lease's backend dies (its session lock goes with it) and another process takes
    the lock: the session now belongs to someone else. Returns that process's connection."""
    admin.execute("SELECT pg_terminate_backend(%s, 10000)", (lock.pid,))
    taker = psycopg.connect(store.pool.conninfo, autocommit=True)
    taker.execute("SELECT pg_advisory_lock(%s, %s)", (lock.lock_class, lock.lock_key))
    return taker


def _in_thread(run: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = run()
        except Exception as exc:
            result["value"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def test_a_final_waiting_on_its_row_does_not_commit_after_its_lease_is_lost(
    store: Store,
) -> None:
    """The fence is read when the statement starts; the UPDATE then waits on the row lock
    another transaction holds. If the lease is lost during that wait, the final must not
    commit when the row is released (READ COMMITTED re-checks the row, not the fence)."""
    holder, lock = _holder(store, 81)
    execution_id = uuid.uuid4()
    confirmation = Publish(execution_id, "confirmation.filled.EURUSD", b"{}", None, None)
    final = {**_intent(execution_id), "state": "FILLED"}
    with store.connection() as conn:
        assert store.insert_intent(conn, _intent(execution_id), [], lock=lock)
    with (
        psycopg.connect(store.pool.conninfo, autocommit=True) as admin,
        psycopg.connect(store.pool.conninfo) as row_locker,
    ):
        row_locker.execute(
            "SELECT 1 FROM execution.executions WHERE execution_id = %s FOR UPDATE",
            (execution_id,),
        )

        def finish() -> Publish:
            with store.connection() as conn:
                return store.finish(conn, final, [Event("commit")], confirmation, lock=lock)

        thread, result = _in_thread(finish)
        _wait_until(lambda: _waiting_on_a_row_lock(admin), "the final waits on the row lock")
        taker = _lose_the_lease(admin, store, lock)
        try:
            row_locker.commit()  # the row is free: the waiting final goes on
            thread.join(30.0)
            assert not thread.is_alive()
        finally:
            taker.close()
            holder.close()
    assert isinstance(result["value"], LockNotHeld), result["value"]
    assert _state(store, execution_id) == "SUBMITTING", "left in flight for the lock's holder"
    with store.connection() as conn:
        assert store.confirmation_of(conn, execution_id) is None, "no outbox row"


def test_an_intent_waiting_on_its_key_does_not_commit_after_its_lease_is_lost(
    store: Store,
) -> None:
    """The same for an intent: its INSERT waits on a rival's uncommitted row of the same
    key; the rival rolls back after the lease was lost: the intent must not commit."""
    holder, lock = _holder(store, 82)
    execution_id = uuid.uuid4()
    with (
        psycopg.connect(store.pool.conninfo, autocommit=True) as admin,
        psycopg.connect(store.pool.conninfo) as rival,
    ):
        rival.execute(
            "INSERT INTO execution.executions"
            " (execution_id, idempotency_key, state, comment_token, received_at, symbol, request)"
            " SELECT execution_id, idempotency_key, state, comment_token, received_at, symbol,"
            " request FROM jsonb_populate_record(NULL::execution.executions, %s::jsonb)",
            (json.dumps(_intent(execution_id), default=str),),
        )

        def intent() -> bool:
            with store.connection() as conn:
                return store.insert_intent(conn, _intent(execution_id), [], lock=lock)

        thread, result = _in_thread(intent)
        _wait_until(lambda: _waiting_on_a_row_lock(admin), "the intent waits on the key")
        taker = _lose_the_lease(admin, store, lock)
        try:
            rival.rollback()  # the key is free: the waiting intent goes on
            thread.join(30.0)
            assert not thread.is_alive()
        finally:
            taker.close()
            holder.close()
    assert isinstance(result["value"], LockNotHeld), result["value"]
    assert _state(store, execution_id) is None, "no intent without the lock"


def test_a_batch_with_a_lost_fence_rolls_back_and_its_good_writes_commit_alone(
    new_database: Callable[[], str],
) -> None:
    """Two finals in one batch: the first waits on its row while its lease is lost. The
    batch's check before COMMIT fails it; retried alone, the other final commits."""
    store = Store.open(new_database(), max_size=4)
    store.group = GroupCommit(store.pool.conninfo, TCP_KEEPALIVES, lanes=1)
    try:
        store.migrate()
        lost_holder, lost_lock = _holder(store, 83)
        kept_holder, kept_lock = _holder(store, 84)
        lost_id, kept_id = uuid.uuid4(), uuid.uuid4()
        with store.connection() as conn:
            assert store.insert_intent(conn, _intent(lost_id), [], lock=lost_lock)
            assert store.insert_intent(conn, _intent(kept_id), [], lock=kept_lock)

        def finish(execution_id: uuid.UUID, lock: LockHeld) -> Callable[[], Publish]:
            confirmation = Publish(execution_id, "confirmation.filled.EURUSD", b"{}", None, None)
            final = {**_intent(execution_id), "state": "FILLED"}

            def run() -> Publish:
                with store.connection() as conn:
                    return store.finish(conn, final, [Event("commit")], confirmation, lock=lock)

            return run

        with (
            psycopg.connect(store.pool.conninfo, autocommit=True) as admin,
            psycopg.connect(store.pool.conninfo) as row_locker,
        ):
            row_locker.execute(
                "SELECT 1 FROM execution.executions WHERE execution_id = %s FOR UPDATE",
                (lost_id,),
            )
            assert store.group is not None
            writers = _Writers(store.group)
            _leader_blocked(writers, admin)
            lost_thread, lost = _in_thread(finish(lost_id, lost_lock))
            _wait_until(lambda: store.group is not None and store.group.queued == 1, "queued")
            kept_thread, kept = _in_thread(finish(kept_id, kept_lock))
            _wait_until(lambda: store.group is not None and store.group.queued == 2, "queued")
            admin.execute("SELECT pg_advisory_unlock(%s)", (BLOCKER,))
            writers.join()
            _wait_until(lambda: _waiting_on_a_row_lock(admin), "the batch waits on the row")
            taker = _lose_the_lease(admin, store, lost_lock)
            try:
                row_locker.commit()
                for thread in (lost_thread, kept_thread):
                    thread.join(30.0)
                    assert not thread.is_alive()
            finally:
                taker.close()
                lost_holder.close()
                kept_holder.close()
        assert isinstance(lost["value"], LockNotHeld), lost["value"]
        assert isinstance(kept["value"], Publish), kept["value"]
        assert _state(store, lost_id) == "SUBMITTING"
        assert _state(store, kept_id) == "FILLED"
        with store.connection() as conn:
            assert store.confirmation_of(conn, lost_id) is None
            assert store.confirmation_of(conn, kept_id) is not None
        assert store.group.stats.sizes[-1] == 2, "the two finals were one batch"
        assert store.group.stats.retried_alone == 2
    finally:
        store.close()
