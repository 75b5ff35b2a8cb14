"""The session pool: exclusive, healthy MT5 sessions for worker threads and processes.

``claim(timeout)`` hands out one session as a :class:`Lease`. Exclusivity across processes
comes from a PostgreSQL session-level advisory lock, ``pg_try_advisory_lock(1, key)``, taken
on a connection from the database pool that the lease then holds:

- a process that dies loses its leases at once (its connections close, the locks go);
- the pipeline commits its intent row THROUGH ``lease.conn``: if the lock's connection is
  gone, that commit fails and no order is sent, so a stale holder is fenced off.

With ``linger_seconds`` > 0 a released lease is *parked*: its connection keeps the lock, so
the next claim in this process takes the session without a database round trip. A parked
lease idle longer than ``linger_seconds``, or holding its lock longer than
``max_hold_seconds`` in all, is really released, and after such a long hold this process
leaves the session alone for a few poll intervals, so other processes sharing the session
get their turn.

A claimed session is checked (``terminal_info().connected``, ``last_error``) before it is
handed out. A failing one is re-initialized in the background with exponential backoff
(tenacity), reported as ``down`` after ``max_failures`` failed attempts, and comes back into
rotation once healthy. A session is never handed out while unhealthy.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import tenacity
from psycopg import pq

from worker.mt5 import api
from worker.mt5.sessions import SessionSpec, accounts_of
from worker.mt5.terminals import (
    SessionOpenError,
    check_terminal,
    connect_terminal,
    open_terminal,
)
from worker.pool.leases import (
    LOCK_CLASS,
    ClaimTimeout,
    Lease,
    PoolClosed,
    PoolHealth,
    Session,
    SessionHealth,
    UnknownAccount,
    UnknownSession,
    _Parked,
    _Slot,
)

_log = logging.getLogger("worker.pool")

# the linger thread's wait while nothing is parked (a park wakes it at once)
_LINGER_IDLE_WAIT_SECONDS = 5.0
_LOCK_SQL = "SELECT pg_try_advisory_lock(%s::integer, %s::integer)"
_UNLOCK_SQL = "SELECT pg_advisory_unlock_all()"


# --- the pool ----------------------------------------------------------------------------


class SessionPool:
    """Sessions of this process; thread-safe."""

    def __init__(
        self,
        specs: Sequence[SessionSpec],
        db_pool: Any,
        gateway_factory: Callable[[api.Terminal, SessionSpec], Any],
        *,
        reconnect_backoff: tuple[float, float] = (0.2, 10.0),
        max_failures: int = 3,
        poll_interval: float = 0.02,
        opener: Callable[[SessionSpec], api.Terminal] = open_terminal,
        linger_seconds: float = 0.0,
        max_hold_seconds: float = 5.0,
        connection_current: Callable[[Any], bool] | None = None,
    ) -> None:
        """``connection_current(conn)``: False for a database connection made on an earlier
        primary (``Epochs.is_current``): the fence refuses a lease whose lock lives there."""
        if not specs:
            raise ValueError("a session pool needs at least one session")
        self._db_pool = db_pool  # psycopg_pool.ConnectionPool (untyped module)
        self.connection_current: Callable[[Any], bool] = connection_current or (lambda _c: True)
        self._gateway_factory = gateway_factory
        self._backoff = reconnect_backoff
        self._max_failures = max_failures
        self._poll_interval = poll_interval
        self._opener = opener
        self._linger = linger_seconds
        self._max_hold = max_hold_seconds
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._lease_parked = threading.Event()  # wakes the linger thread from its idle wait
        self._slots: list[_Slot] = [_Slot(spec) for spec in specs]
        self._accounts = accounts_of(specs)  # read on every claim
        _configure_account_labels(self.accounts)
        for slot in self._slots:
            try:
                slot.session = self._build_session(slot.spec, opener(slot.spec))
                slot.healthy = True
            except (SessionOpenError, api.TransportError) as exc:
                self._mark_unhealthy(slot, str(exc))
        if self._linger > 0:
            threading.Thread(
                target=self._expire_parked_loop, name="mt5-lease-linger", daemon=True
            ).start()

    def __repr__(self) -> str:
        return f"SessionPool({[slot.spec.id for slot in self._slots]})"

    @property
    def size(self) -> int:
        return len(self._slots)

    @property
    def accounts(self) -> tuple[str | None, ...]:
        """The configured accounts of this pool's sessions (``(None,)``: one, unnamed)."""
        return self._accounts

    def has_session(self, session_key: str | None) -> bool:
        """Whether a session of that identity (an execution row's ``session_key``) is here."""
        return any(slot.spec.identity == session_key for slot in self._slots)

    def _build_session(self, spec: SessionSpec, terminal: api.Terminal) -> Session:
        login, server = spec.login, spec.server
        account = terminal.account_info()
        if account is not None:
            if (spec.login is not None and account.login != spec.login) or (
                spec.server is not None and account.server != spec.server
            ):
                # never trade one account's approvals on another's terminal
                raise SessionOpenError(
                    f"session {spec.id}: logged in to {account.server}:{account.login}, "
                    f"configured for {spec.server}:{spec.login}"
                )
            login, server = account.login, account.server
        gateway = self._gateway_factory(terminal, spec)
        return Session(spec.id, spec, terminal, gateway, login, server)

    # --- claim / release -------------------------------------------------------------

    def claim(
        self,
        timeout: float,
        *,
        session_key: str | None = None,
        session_id: str | None = None,
        account: str | None = None,
    ) -> Lease:
        """One healthy session for exclusive use, or ClaimTimeout after ``timeout`` s.

        ``session_key`` asks for the session of that identity only (``SessionSpec.identity``,
        what an execution row records: an in-flight execution is settled on the account it
        was sent to, by whichever process has that account, whatever it calls it).
        ``session_id`` asks by this process's configured name (rows from before the key
        existed, tools); the key wins when both are given. UnknownSession if this process
        has no such session. ``account`` asks for a session of that account only (the claim
        waits for that account's sessions, never takes another's); UnknownAccount if none
        has it.
        """
        only: _Slot | None = None
        if session_key is not None:
            only = next((slot for slot in self._slots if slot.spec.identity == session_key), None)
            if only is None:
                raise UnknownSession("no MT5 session of the row's identity in this process")
        elif session_id is not None:
            only = next((slot for slot in self._slots if slot.spec.id == session_id), None)
            if only is None:
                raise UnknownSession(f"no MT5 session {session_id!r} in this process")
        among: list[_Slot] | None = None
        if account is not None:
            among = [slot for slot in self._slots if slot.spec.account == account]
            if not among:
                raise UnknownAccount(f"no MT5 session of account {account!r} in this process")
        started = time.monotonic()
        deadline = started + timeout
        while True:
            if self._closing.is_set():
                raise PoolClosed("the session pool is closed")
            lease = self._try_claim(deadline, only, among)
            if lease is not None:
                _record_claim_wait(time.monotonic() - started, acquired=True, account=account)
                return lease
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _record_claim_wait(time.monotonic() - started, acquired=False, account=account)
                which = f" of account {account}" if account is not None else ""
                raise ClaimTimeout(f"no MT5 session{which} free within {timeout:g} s")
            # local releases notify; other processes' releases are seen by polling
            with self._cond:
                self._cond.wait(min(remaining, self._poll_interval))

    def _candidates(self, only: _Slot | None, among: list[_Slot] | None) -> list[_Slot]:
        now = time.monotonic()
        with self._cond:
            if only is not None:
                free = [only] if only.healthy and not only.in_use else []
            else:
                free = [
                    slot
                    for slot in (self._slots if among is None else among)
                    if slot.healthy and not slot.in_use and slot.yield_until <= now
                ]
        random.shuffle(free)  # spread processes over the sessions
        free.sort(key=lambda slot: slot.parked is None)  # parked first: no round trip
        return free

    def _reserve(self, slot: _Slot) -> tuple[Session, _Parked | None] | None:
        """Mark ``slot`` in use; with the parked lock connection it still has, if any."""
        with self._cond:
            if not slot.healthy or slot.in_use or slot.session is None:
                return None
            slot.in_use = True
            parked, slot.parked = slot.parked, None
            return slot.session, parked

    def _unreserve(self, slot: _Slot, problem: str | None = None) -> None:
        with self._cond:
            if problem is not None:
                self._mark_unhealthy(slot, problem)  # before anyone else can reserve it
            slot.in_use = False
            self._cond.notify_all()

    def _try_claim(
        self, deadline: float, only: _Slot | None, among: list[_Slot] | None = None
    ) -> Lease | None:
        candidates = self._candidates(only, among)
        if not candidates:
            return None
        conn: psycopg.Connection[Any] | None = None
        try:
            for slot in candidates:
                reserved = self._reserve(slot)
                if reserved is None:
                    continue
                session, parked = reserved
                if parked is not None:
                    lease = self._take_parked(slot, session, parked)
                    if lease is not None:
                        return lease
                    if not slot.healthy:
                        continue
                if conn is None:
                    try:
                        conn = self._getconn(deadline)
                    except ClaimTimeout:
                        self._unreserve(slot)
                        raise
                lease = self._lock(slot, session, conn)
                if lease is not None:
                    conn = None  # handed over
                    return lease
            return None
        finally:
            if conn is not None:
                self._db_pool.putconn(conn)

    def _take_parked(self, slot: _Slot, session: Session, parked: _Parked) -> Lease | None:
        """The parked lock connection as a lease (no round trip), or None (slot unreserved)."""
        conn = parked.conn
        usable = (
            not conn.closed
            and not conn.broken
            and conn.info.transaction_status == pq.TransactionStatus.IDLE
            and self.connection_current(conn)  # its lock is not on an old primary
        )
        if not usable:
            self._drop(conn, parked.autocommit_was, unlock=False)
            # stays reserved: the caller locks it again on a fresh connection
            return None
        problem = check_terminal(session.terminal)
        if problem is None:
            return Lease(self, slot, session, conn, parked.autocommit_was, parked.locked_at)
        self._drop(conn, parked.autocommit_was, unlock=True)
        self._unreserve(slot, problem)
        return None

    def _lock(self, slot: _Slot, session: Session, conn: psycopg.Connection[Any]) -> Lease | None:
        """Take ``slot``'s lock on ``conn`` (reserved slot); None (slot unreserved) if not."""
        autocommit_was = conn.autocommit
        try:
            if not autocommit_was:
                conn.autocommit = True
            locked = conn.execute(_LOCK_SQL, (LOCK_CLASS, slot.spec.lock_key)).fetchone()
            if not (locked and locked[0]):
                conn.autocommit = autocommit_was
                self._unreserve(slot)  # held by another process
                return None
            problem = check_terminal(session.terminal)
            if problem is None:
                return Lease(self, slot, session, conn, autocommit_was, time.monotonic())
            conn.execute(_UNLOCK_SQL)
            conn.autocommit = autocommit_was
            self._unreserve(slot, problem)
            return None
        except psycopg.Error as exc:
            conn.close()
            self._unreserve(slot)
            raise ClaimTimeout(f"database error while claiming: {type(exc).__name__}") from None
        except BaseException:
            conn.close()  # it may hold the lock: closing drops it
            self._unreserve(slot)
            raise

    def _getconn(self, deadline: float) -> psycopg.Connection[Any]:
        while True:
            remaining = max(deadline - time.monotonic(), 0.001)
            try:
                conn: psycopg.Connection[Any] = self._db_pool.getconn(timeout=remaining)
            except Exception as exc:  # psycopg_pool.PoolTimeout, PoolClosed, connection errors
                raise ClaimTimeout(f"no database connection: {type(exc).__name__}") from None
            if self.connection_current(conn):
                return conn
            # made on an earlier primary (still reachable): closed, the pool replaces it
            conn.close()
            self._db_pool.putconn(conn)

    def _release(
        self,
        slot: _Slot,
        conn: psycopg.Connection[Any],
        *,
        broken: bool,
        autocommit: bool,
        locked_at: float,
    ) -> None:
        now = time.monotonic()
        if (
            not broken
            and self._linger > 0
            and not self._closing.is_set()
            and now - locked_at < self._max_hold
            and not conn.closed
            and not conn.broken
            and conn.info.transaction_status == pq.TransactionStatus.IDLE
        ):
            with self._cond:
                slot.parked = _Parked(conn, autocommit, locked_at, now)
                slot.in_use = False
                self._cond.notify_all()
            self._lease_parked.set()
            return
        if self._linger > 0 and now - locked_at >= self._max_hold:
            slot.yield_until = now + 3 * self._poll_interval  # others poll this often
        try:
            self._drop(conn, autocommit, unlock=not broken)
        finally:
            self._unreserve(slot)

    def _drop(self, conn: psycopg.Connection[Any], autocommit: bool, *, unlock: bool) -> None:
        """Unlock (unless ``unlock`` is False or the connection is gone) and return ``conn``."""
        broken = not unlock
        if unlock and not conn.closed and not conn.broken:
            try:
                if conn.info.transaction_status != pq.TransactionStatus.IDLE:
                    conn.rollback()
                conn.execute(_UNLOCK_SQL)
                conn.autocommit = autocommit
            except psycopg.Error:
                broken = True
        if broken or conn.closed or conn.broken:
            conn.close()  # closing the session drops its locks too
        self._db_pool.putconn(conn)

    def _expire_parked_loop(self) -> None:
        """Wake when the oldest parked lease has lingered its time, not on a fixed tick: an
        idle pool has nothing parked, and this thread then sleeps until a lease is parked."""
        while not self._closing.is_set():
            with self._cond:
                parked_at = [
                    slot.parked.parked_at
                    for slot in self._slots
                    if slot.parked is not None and not slot.in_use
                ]
            if parked_at:
                delay = min(parked_at) + self._linger - time.monotonic()
                if self._closing.wait(max(delay, 0.0)):
                    return
                self._release_parked(older_than=self._linger)
            else:
                # a lease parked after the look above has set the event: no lost wake-up
                self._lease_parked.wait(_LINGER_IDLE_WAIT_SECONDS)
                self._lease_parked.clear()

    def _release_parked(self, older_than: float) -> None:
        """Really release parked leases idle for ``older_than`` seconds (0: all of them)."""
        now = time.monotonic()
        expired: list[_Parked] = []
        with self._cond:
            for slot in self._slots:
                parked = slot.parked
                if parked is not None and not slot.in_use and now - parked.parked_at >= older_than:
                    slot.parked = None
                    expired.append(parked)
        for parked in expired:
            try:
                self._drop(parked.conn, parked.autocommit_was, unlock=True)
            except Exception:  # a pool being closed; the connection goes with it
                _log.debug("releasing a parked lease failed", exc_info=True)

    # --- health and recovery -----------------------------------------------------------

    def _mark_unhealthy(self, slot: _Slot, problem: str) -> None:
        with self._cond:
            slot.healthy = False
            slot.last_error = problem
            if slot.recovery is not None or self._closing.is_set():
                return
            _log.warning("mt5 session %s unhealthy: %s", slot.spec.id, problem)
            slot.recovery = threading.Thread(
                target=self._recover, args=(slot,), name=f"mt5-recover-{slot.spec.id}", daemon=True
            )
            slot.recovery.start()

    def _reconnect_once(self, slot: _Slot) -> bool:
        _record_reconnect()
        try:
            if slot.session is None:
                session = self._build_session(slot.spec, self._opener(slot.spec))
            else:
                # the same terminal object: an in-process sim keeps its broker state
                terminal = slot.session.terminal
                terminal.shutdown()
                connect_terminal(terminal, slot.spec)
                session = slot.session
            problem = check_terminal(session.terminal)
        except (SessionOpenError, api.TransportError) as exc:
            problem = str(exc)
        except Exception as exc:  # a backend bug must not kill the recovery thread
            problem = f"{type(exc).__name__}: {exc}"
        with self._cond:
            if problem is None:
                slot.session = session
                slot.healthy = True
                slot.recovery = None  # with healthy, atomically: a new failure starts anew
                slot.failures = 0
                slot.last_error = None
                self._cond.notify_all()
                return True
            slot.failures += 1
            slot.last_error = problem
            failures = slot.failures
        if failures == self._max_failures:
            _log.error(
                "mt5 session %s taken out of rotation after %d failed reconnects: %s",
                slot.spec.id,
                failures,
                problem,
            )
        return False

    def _sleep(self, seconds: float) -> None:
        self._closing.wait(seconds)  # close() cuts a backoff short

    def _recover(self, slot: _Slot) -> None:
        first, cap = self._backoff
        retrying = tenacity.Retrying(
            wait=tenacity.wait_exponential(multiplier=first, min=first, max=cap),
            retry=tenacity.retry_if_result(lambda ok: not ok and not self._closing.is_set()),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            recovered = retrying(self._reconnect_once, slot)
        finally:
            with self._cond:
                if slot.recovery is threading.current_thread():
                    slot.recovery = None
        if recovered:
            _log.info("mt5 session %s back in rotation", slot.spec.id)

    def session_specs(self) -> list[SessionSpec]:
        """Every session of this process, in its configured order."""
        return [slot.spec for slot in self._slots]

    def gateways(self) -> list[tuple[str, Any]]:
        """(session id, gateway) of every session opened so far (for readiness reports)."""
        with self._cond:
            return [(slot.spec.id, slot.session.gateway) for slot in self._slots if slot.session]

    def health(self) -> PoolHealth:
        with self._cond:
            closed = self._closing.is_set()
            sessions = tuple(
                SessionHealth(
                    id=slot.spec.id,
                    backend=slot.spec.backend,
                    state=slot.state(closed, self._max_failures),
                    failures=slot.failures,
                    last_error=slot.last_error,
                    login=slot.session.login if slot.session else slot.spec.login,
                    server=slot.session.server if slot.session else slot.spec.server,
                )
                for slot in self._slots
            )
        in_use = sum(1 for s in sessions if s.state == "in_use")
        unhealthy = sum(1 for s in sessions if s.state in ("reconnecting", "down"))
        return PoolHealth(len(sessions), in_use, unhealthy, sessions)

    def close(self, timeout: float = 5.0) -> None:
        """Stop recovery and shut the terminals down (release leases first)."""
        self._closing.set()
        self._lease_parked.set()
        self._release_parked(older_than=0.0)
        with self._cond:
            self._cond.notify_all()
            threads = [slot.recovery for slot in self._slots if slot.recovery is not None]
        for thread in threads:
            thread.join(timeout)
        for slot in self._slots:
            if slot.in_use:
                _log.warning("mt5 session %s closed while leased", slot.spec.id)
            if slot.session is not None:
                try:
                    slot.session.terminal.shutdown()
                except Exception:  # closing must go on for the other sessions
                    _log.warning("mt5 session %s: shutdown failed", slot.spec.id, exc_info=True)


def _record_claim_wait(seconds: float, *, acquired: bool, account: str | None) -> None:
    from worker.observability import metrics

    metrics.record_claim_wait(seconds, acquired=acquired, account=account)


def _configure_account_labels(accounts: tuple[str | None, ...]) -> None:
    from worker.observability import metrics

    metrics.configure_accounts(accounts)


def _record_reconnect() -> None:
    from worker.observability import metrics

    metrics.record_reconnect("mt5")
