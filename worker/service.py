"""The composition root: settings -> store, session pool, gateways, pipeline.

``Service.start`` migrates the database, opens the pools, settles what a previous run left
in flight (reconcile against the terminals), and hands the runtime a handler and an outbox.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.config import Settings
from worker.execution.outcome import Handler, Outbox, Outcome, Publish, Settling
from worker.execution.pipeline import Pipeline
from worker.mt5.api import Terminal
from worker.mt5.gateway import Gateway
from worker.mt5.gateway.clock import TimezoneRule
from worker.mt5.profile.use import AccountProfiles, check_profiles
from worker.mt5.sessions import SessionSpec, accounts_of, broker_profiles, load_session_specs
from worker.observability import metrics
from worker.pool.pool import SessionPool
from worker.store.store import ExecutionRow, Store

log = logging.getLogger(__name__)
RECOVERY_INTERVAL_SECONDS = 60.0
# how often the background reconciler looks for UNKNOWN rows that are due (each row has its
# own backoff in the database: next_reconcile_at)
UNKNOWN_POLL_SECONDS = 5.0


def gateway_factory(
    settings: Settings, profiles: AccountProfiles | None = None
) -> Callable[[Terminal, SessionSpec], Gateway]:
    """Gateways with the settings' server clock, else the account's broker profile's rule."""

    def build(terminal: Terminal, spec: SessionSpec) -> Gateway:
        timezone: str | TimezoneRule | None = settings.server_timezone
        if timezone is None and settings.server_utc_offset_seconds is None and profiles:
            timezone = profiles.timezone_for(spec.account)
        return Gateway(
            terminal,
            magic=settings.magic,
            pip_sizes=settings.pip_sizes,
            max_tick_age_seconds=settings.max_tick_age_seconds,
            server_utc_offset_seconds=settings.server_utc_offset_seconds,
            server_timezone=timezone,
            max_attempts=settings.max_send_attempts,
        )

    return build


def with_broker_profiles(
    settings: Settings, specs: list[SessionSpec]
) -> tuple[Settings, AccountProfiles]:
    """Settings completed by the accounts' broker profiles (symbol mapping); raises
    ConfigError when a profile contradicts them (worker/mt5/profile/use.py)."""
    profiles = check_profiles(settings, broker_profiles(specs), accounts_of(specs))
    for warning in profiles.warnings:
        log.warning("broker profile: %s", warning)
    if not profiles.by_account:
        return settings, profiles
    completed = settings.model_copy(update={"symbol_map": profiles.symbol_map(settings)})
    return completed, profiles


@dataclass
class Service:
    settings: Settings
    store: Store
    pool: SessionPool
    pipeline: Pipeline
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)

    @classmethod
    def start(cls, settings: Settings, *, recover: bool = True) -> Service:
        specs = load_session_specs(settings)
        settings, profiles = with_broker_profiles(settings, specs)
        store = Store.open(
            settings.database_url.get_secret_value(),
            max_size=max(settings.db_pool_size, 2 * len(specs) + 4),
            group_commit=settings.group_commit,
            # approvals decided up to a TTL after a database switch are checked at the broker
            switch_margin_seconds=settings.approval_ttl_seconds,
        )
        try:
            store.migrate()
            pool = SessionPool(
                specs,
                store.pool,
                gateway_factory(settings, profiles),
                linger_seconds=settings.session_linger_seconds,
                connection_current=store.epochs.is_current,
            )
        except Exception:
            store.close()
            raise
        service = cls(settings, store, pool, Pipeline(settings, store, pool))
        service.register_metrics()
        service.pipeline.settler.start()  # handlers hand it the executions that wait
        if recover:
            service.recover()
            service._start_sweeper()
        return service

    def _start_sweeper(self) -> None:
        """Settle rows abandoned mid-way while running (e.g. their delivery was dead-lettered
        by the queue's delivery limit while the terminal was down), not only at start-up."""
        idle = self.settings.order_timeout_seconds + 4 * self.settings.claim_timeout_seconds + 60

        def sweep() -> None:
            while not self._stopping.wait(RECOVERY_INTERVAL_SECONDS):
                try:
                    self.recover(idle_seconds=idle)
                except Exception:
                    log.exception("recovery sweep failed; retrying later")

        threading.Thread(target=sweep, name="recovery-sweep", daemon=True).start()

        def reconcile_unknown() -> None:
            while not self._stopping.wait(UNKNOWN_POLL_SECONDS):
                try:
                    self.recheck_unknown()
                except Exception:
                    log.exception("background reconcile failed; retrying later")

        threading.Thread(target=reconcile_unknown, name="unknown-reconcile", daemon=True).start()

    def register_metrics(self) -> None:
        """Gauges read from state at scrape time: the session pool and the outbox backlog."""

        def pool_state() -> metrics.PoolState:
            health = self.pool.health()
            unhealthy = tuple((s.id, s.state in ("reconnecting", "down")) for s in health.sessions)
            return metrics.PoolState(health.size, health.in_use, health.unhealthy, unhealthy)

        def outbox_state() -> metrics.OutboxState:
            return metrics.OutboxState(*self.store.outbox_backlog())

        metrics.register_pool_state(pool_state)
        metrics.register_outbox_state(outbox_state)
        metrics.register_in_flight_state(lambda: metrics.InFlightState(*self.store.in_flight_age()))

    @property
    def handler(self) -> Handler:
        return self.pipeline.handle

    @property
    def outbox(self) -> Outbox:
        return self.store

    @property
    def sessions(self) -> int:
        return self.settings.prefetch or self.pool.health().size

    def recover(
        self, *, idle_seconds: float = 0.0, wait_seconds: float = 0.0
    ) -> list[tuple[ExecutionRow, Outcome]]:
        """Hand the in-flight rows left by an earlier run (or abandoned: ``idle_seconds``)
        to the settler, and the rows it still had (a killed worker's) too; with
        ``wait_seconds``, wait that long for each one's confirmation (``reconcile``).

        A row whose execution is still being worked on is skipped: ``Pipeline.resume``
        cannot take its session's lease and answers Requeue.
        """
        with self.store.connection() as conn:
            rows = self.store.in_flight(conn, idle_seconds=idle_seconds)
            if wait_seconds:
                rows += self.store.settling(conn, idle_seconds=idle_seconds)
        settler = self.pipeline.settler
        results = []
        for row in rows:
            outcome = self.pipeline.resume(row)
            if isinstance(outcome, Settling) and wait_seconds:
                outcome = settler.wait_for(row.execution_id, wait_seconds) or outcome
            kind = (
                "settled"
                if isinstance(outcome, Publish)
                else "handed to the settler"
                if isinstance(outcome, Settling)
                else "still in flight"
            )
            metrics.record_recovery(settled=isinstance(outcome, Publish))
            log.warning("recovery: execution %s %s", row.execution_id, kind)
            results.append((row, outcome))
        return results

    def recheck_unknown(self) -> list[tuple[ExecutionRow, Outcome]]:
        """Ask the broker again about the UNKNOWN rows that are due (provisional answers):
        a fill that appeared, or the end of the window, commits a corrected confirmation in
        the outbox (published by its sweep); otherwise the row backs off."""
        with self.store.connection() as conn:
            rows = self.store.unknown_due(conn)
        results = []
        for row in rows:
            if self._stopping.is_set():
                break
            outcome = self.pipeline.recheck(row)
            if isinstance(outcome, Publish):
                log.warning("background reconcile: execution %s corrected", row.execution_id)
            results.append((row, outcome))
        return results

    def readiness(self) -> dict[str, bool]:
        """Database, sessions, and each trading-permission level last seen by any session
        (terminal Algo Trading, trade API, account trading, expert trading: DOMAIN.md 6)."""
        health = self.pool.health()
        ready = {"database": self.store.ping(), "sessions": health.size - health.unhealthy > 0}
        for _session, gateway in self.pool.gateways():
            for level, allowed in getattr(gateway, "permissions", {}).items():
                ready[f"trading_{level}"] = ready.get(f"trading_{level}", False) or allowed
        return ready

    def close(self) -> None:
        self._stopping.set()
        self.pipeline.settler.stop()
        self.pool.close()
        self.store.close()
