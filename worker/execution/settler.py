"""The settler: executions whose fills the broker's history has not shown yet, finished off
their terminal session.

A handling sends its orders and lets go of its session at once: a reply that names its deal
is the fill (checked here later against the deals), and anything else the server took (a
reply with ``deal`` 0, a placed order) or an unknown outcome is left here, on the row
(``settling``) and in memory. One thread per worker process works in rounds: per account,
it borrows any free session of that account for ONE window of the account's history (open
orders, history orders, deals: three queries, however many executions wait on it), lets it
go, and decides each execution from that window with :func:`settle.progress`:

- settled: every order final and its deals visible -> the final row and confirmation;
- an order still working past the order timeout -> cancelled (its final state settles it);
- deals still missing past the order timeout, or an unknown outcome that shows nothing
  within the reconcile grace -> a provisional answer (UNKNOWN), which the background recheck
  corrects when the broker shows the truth. Nothing is ever sent again for an order whose
  outcome may have reached the server;
- a final row settled from replies -> its deals checked; a contradiction publishes a
  corrected version (counted, alerted on).

Each confirmation committed here is announced by the store to its watchers (the AMQP runtime
publishes it at once and acks the delivery parked on it; else the outbox sweep does). Rows
a killed worker left are found by a scan of the database (``settling`` set, untouched for a
while) and settled the same way. Two
settlers on one row are harmless: finals are conditional updates (the first wins, the other
answers the recorded confirmation), and the slippage close's stage is a test-and-set.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg

from schemas.confirmation import ExecutionConfirmation
from schemas.enums import ExecutionStatus, RejectionReason
from worker.execution import inquiry, settle
from worker.execution.audit import Run, save_events
from worker.execution.outcome import Outcome, Publish
from worker.execution.plan import Plan, plan_from_row
from worker.execution.settle import Awaited, Fill, Found, Settled, Unaccounted, Waiting
from worker.mt5 import api
from worker.mt5.gateway import Gateway, GatewayRejection, HistoryWindow
from worker.observability import metrics
from worker.observability.logs import log_context
from worker.pool.leases import ClaimTimeout, Lease, LeaseLost, PoolClosed
from worker.store.store import ExecutionRow, StoreError

if TYPE_CHECKING:
    from worker.execution.pipeline import Pipeline

log = logging.getLogger(__name__)

FIRST_LOOK_SECONDS = 0.1  # a waiting execution is looked at again after this ...
# ... every round for this long after its send (the deals of most servers show within it: a
# drain's last fills wait on them, and one window per round serves every execution) ...
STEADY_LOOK_SECONDS = 1.0
MAX_LOOK_SECONDS = 0.5  # ... then doubling up to this
FIRST_CHECK_SECONDS = 1.0  # a reply-settled fill's deals are first looked for after this
# a round takes every execution due within this much: rounds are batched, each borrows a
# session (exclusive, across processes too) that handlers would otherwise have
ROUND_BATCH_SECONDS = 0.1
MAX_CHECK_SECONDS = 5.0
# checks fall due on a grid of this: the fills of a second are checked in one round (one
# window) instead of one round per ROUND_BATCH_SECONDS, the windows being most of their cost
CHECK_GRID_SECONDS = 1.0
CHECK_WINDOW_SECONDS = 600.0  # then a fill whose deals never showed is left unverified
SCAN_SECONDS = 5.0  # the database is scanned for rows nobody here settles this often
CLAIM_SECONDS = 0.5  # how long a round waits for a session of an account (then later)
RECENT_REMEMBERED = 4096


@dataclass
class Waiter:
    """One execution waiting on the broker's history."""

    plan: Plan
    awaited: Awaited
    account: str | None
    session_key: str | None
    carried: dict[str, Any] = field(default_factory=dict)  # retcode, timings, final state...
    due: float = 0.0
    delay: float = FIRST_LOOK_SECONDS
    looks: int = 0

    @property
    def looked_twice(self) -> bool:
        return self.looks >= 2

    @property
    def execution_id(self) -> UUID:
        return self.plan.execution_id

    @classmethod
    def of_row(cls, row: ExecutionRow, deployment_magic: int, now: float) -> Waiter:
        plan = plan_from_row(row, deployment_magic)
        document = row.get("settling") or {}
        # this process's deadlines count from now: the grace and the order timeout of a
        # handling that died are not this one's to have spent
        awaited = replace(Awaited.from_json(document, legs=len(plan.legs), since=now), since=now)
        carried = {
            name: row.get(name)
            for name in ("retcode", "broker_comment", "filling_mode", "state", "submitted_at")
        }
        carried["timings"] = document.get("timings") or {}
        return cls(plan, awaited, row.get("account"), row.get("session_key"), carried)

    def __post_init__(self) -> None:
        if self.awaited.verify and self.delay == FIRST_LOOK_SECONDS:
            self.delay = FIRST_CHECK_SECONDS  # its deals lag the reply: look a little later

    def schedule(self, now: float) -> None:
        """Fall due after the current delay (a check: on the check grid)."""
        due = now + self.delay
        if self.awaited.verify:
            due = math.ceil(due / CHECK_GRID_SECONDS) * CHECK_GRID_SECONDS
        self.due = due

    def later(self, now: float) -> None:
        """Look again after a backoff."""
        self.schedule(now)
        self.looks += 1
        if self.awaited.verify:
            self.delay = min(self.delay * 2, MAX_CHECK_SECONDS)
        elif now >= self.awaited.since + STEADY_LOOK_SECONDS:
            self.delay = min(self.delay * 2, MAX_LOOK_SECONDS)


class Settler:
    """Finishes waiting executions in rounds, one history window per account and round."""

    def __init__(self, pipeline: Pipeline, *, clock: Callable[[], float] = time.time) -> None:
        self._pipeline = pipeline
        self._settings = pipeline.settings
        self._store = pipeline.store
        self._sessions = pipeline.sessions
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting: dict[UUID, Waiter] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_scan = 0.0
        # when the thread means to run its next round (inf while it runs one: a hand-over
        # then wakes it again, as the round may have missed it)
        self._next_round = math.inf
        self._round_lock = threading.Lock()  # one round at a time (the thread, wait_for)
        self._published = threading.Condition()
        self._recent: OrderedDict[UUID, Publish] = OrderedDict()  # for wait_for

    # --- wiring ---------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:  # handler threads hand work over at the same moment: one thread
            if self._thread is not None or self._stopping.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="settler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def add(self, waiter: Waiter) -> bool:
        """Take an execution over. False: this process has no session of its account."""
        if not self._can_settle(waiter):
            return False
        with self._lock:  # a hand-over again (a redelivery) starts it anew
            waiter.schedule(self._clock())  # the history lags the reply
            self._waiting[waiter.execution_id] = waiter
            # the thread is woken only if its next round comes too late for this one: a
            # round per hand-over went through every waiting execution (hundreds) each time
            wake = waiter.due < self._next_round - ROUND_BATCH_SECONDS / 2
        self.start()  # whoever hands it work gets it settled, wired by a service or not
        if wake:
            self._wake.set()
        return True

    @property
    def running(self) -> bool:
        """Its thread is alive (it starts with the first hand-over)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def _can_settle(self, waiter: Waiter) -> bool:
        if waiter.account is not None and waiter.account in self._sessions.accounts:
            return True
        return self._sessions.has_session(waiter.session_key)

    # --- the rounds -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            if self._store.closed:  # the process is closing: its successor takes over
                self._stopping.set()
                break
            try:
                if self._clock() >= self._next_scan:
                    self._next_scan = self._clock() + SCAN_SECONDS
                    self.scan()
                pause = self.round()
            except Exception:
                log.exception("settler round failed; trying again")
                pause = MAX_LOOK_SECONDS
            pause = min(pause, SCAN_SECONDS)
            with self._lock:
                self._next_round = self._clock() + pause
            self._wake.wait(pause)
            self._wake.clear()
            with self._lock:
                self._next_round = math.inf

    def scan(self) -> int:
        """Take over the rows nobody settles (a killed worker's): ``settling`` set and
        untouched for longer than this process would leave its own."""
        idle = self._settings.order_timeout_seconds + self._settings.reconcile_grace_seconds
        try:
            with self._store.connection() as conn:
                rows = self._store.settling(conn, idle_seconds=idle + SCAN_SECONDS)
        except (psycopg.Error, StoreError) as exc:
            log.warning("settler: cannot scan the database: %s", type(exc).__name__)
            return 0
        taken = 0
        now = self._clock()
        for row in rows:
            with self._lock:
                if row.execution_id in self._waiting:
                    continue
            if self.add(Waiter.of_row(row, self._settings.magic, now)):
                taken += 1
        if taken:
            log.warning("settler: took over %d execution(s) left by another worker", taken)
        return taken

    def round(self) -> float:
        """Look at every waiting execution that is due; the seconds until the next is."""
        with self._round_lock:
            return self._round()

    def _round(self) -> float:
        now = self._clock()
        with self._lock:
            due = [w for w in self._waiting.values() if w.due <= now + ROUND_BATCH_SECONDS]
        by_account: dict[tuple[str | None, str | None], list[Waiter]] = {}
        for waiter in due:
            key = (waiter.account, None if waiter.account else waiter.session_key)
            by_account.setdefault(key, []).append(waiter)
        for (account, session_key), waiters in by_account.items():
            self._round_for(account, session_key, waiters)
        with self._lock:
            pending = [w.due for w in self._waiting.values()]
        soonest = min(pending, default=now + SCAN_SECONDS)
        return max(soonest - self._clock(), ROUND_BATCH_SECONDS / 2)

    def _round_for(
        self, account: str | None, session_key: str | None, waiters: list[Waiter]
    ) -> None:
        now = self._clock()
        try:
            lease = self._sessions.claim(CLAIM_SECONDS, account=account, session_key=session_key)
        except PoolClosed:
            self._stopping.set()  # the process is closing: its successor takes over
            return
        except ClaimTimeout:
            for waiter in waiters:
                waiter.later(now)
            return
        checked: list[UUID] = []
        with lease:
            gateway: Gateway = lease.session.gateway
            # every order waited on was sent after its approval was received here
            since = min(w.plan.submitted_at or w.plan.received_at for w in waiters)
            try:
                window = gateway.window(since, waiters[0].plan.broker_symbol)
            except (GatewayRejection, api.TransportError) as exc:
                gateway.drain_calls()
                log.debug("settler: the history cannot be read now: %s", exc)
                for waiter in waiters:
                    waiter.later(now)
                return
            calls = gateway.drain_calls()
            for waiter in waiters:
                with log_context(execution_id=waiter.execution_id, symbol=waiter.plan.symbol):
                    try:
                        done = self._advance(waiter, window, lease, calls)
                    except (LeaseLost, api.TransportError, psycopg.Error, StoreError) as exc:
                        log.warning("settler: not settled yet: %s", type(exc).__name__)
                        done = None
                    except Exception:
                        log.exception("settler: unexpected error; trying again")
                        done = None
                if done == "checked":
                    self._forget(waiter)
                    checked.append(waiter.execution_id)
                elif isinstance(done, Publish):
                    self._forget(waiter)
                    self._publish(done)
                else:  # not yet, or nothing committed (a requeue-like answer): look again
                    waiter.later(self._clock())
            if checked:
                try:
                    self._store.checked(lease.conn, checked)
                except (psycopg.Error, StoreError) as exc:  # checked again after a restart
                    log.warning("settler: checks not recorded: %s", type(exc).__name__)

    def _forget(self, waiter: Waiter) -> None:
        with self._lock:
            if self._waiting.get(waiter.execution_id) is waiter:
                del self._waiting[waiter.execution_id]

    def wait_for(self, execution_id: UUID, timeout: float) -> Publish | None:
        """The confirmation committed here for the execution (tools, tests), waited for up to
        ``timeout`` s; without the settler's thread, the caller's thread runs the rounds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._published:
                if execution_id in self._recent:
                    return self._recent[execution_id]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if self._thread is not None:
                    self._published.wait(min(remaining, MAX_LOOK_SECONDS))
                    continue
            time.sleep(min(self.round(), remaining, MAX_LOOK_SECONDS))

    def _publish(self, publish: Publish) -> None:
        with self._published:
            self._recent[publish.execution_id] = publish
            while len(self._recent) > RECENT_REMEMBERED:
                self._recent.popitem(last=False)
            self._published.notify_all()
        try:
            self._store.announce(publish)
        except Exception:
            log.exception("settler: a confirmation watcher failed")

    # --- one execution --------------------------------------------------------------------

    def _advance(
        self, waiter: Waiter, window: HistoryWindow, lease: Lease, calls: list[Any]
    ) -> Outcome | str | None:
        """Publish: committed; "checked": nothing left to check; None: look again later."""
        plan, awaited = waiter.plan, waiter.awaited
        found = Found.of(window.of(plan.identity, plan.broker_symbol))
        if awaited.verify:
            return self._check(waiter, found, lease)
        awaited = waiter.awaited = settle.seen(awaited, found, plan.side)
        state = settle.progress(awaited, found, plan.side, plan.requested_price)
        now = self._clock()
        overdue = now >= awaited.since + self._settings.order_timeout_seconds
        run = self._run_of(waiter, calls)
        if isinstance(state, Waiting) and not state.open_orders and waiter.looked_twice:
            # the window may miss deals its orders show (history lag): ask by ticket
            missing = settle.uncovered(found, state.fills, plan.side)
            if missing:
                found = replace(
                    found,
                    deals=(
                        *found.deals,
                        *inquiry.deals_of_orders(lease.session.gateway, missing, run),
                    ),
                )
                state = settle.progress(awaited, found, plan.side, plan.requested_price)
        if isinstance(state, Settled):
            return self._settled(waiter, state, found, lease, run, overdue)
        if isinstance(state, Waiting):
            if not overdue:
                return None
            if state.open_orders:
                self._cancel(waiter, state.open_orders, lease, run)
                return None
            return self._give_up(waiter, lease, run, state.fills, "deals")
        assert isinstance(state, Unaccounted)
        if now < awaited.since + self._settings.reconcile_grace_seconds:
            return None
        return self._give_up(waiter, lease, run, state.fills, "order")

    def _settled(
        self, waiter: Waiter, state: Settled, found: Found, lease: Lease, run: Run, overdue: bool
    ) -> Outcome | None:
        plan = waiter.plan
        closed = settle.closing_state(plan.closing_sent, plan.side, found)
        if closed is None:  # our slippage close is on record but does not show (all) yet
            if not overdue:
                return None
            return self._give_up(waiter, lease, run, state.fills, "the slippage close")
        metrics.record_settled_off_session(provisional=False)
        run.note("settle", deals=[d for f in state.fills for d in f.deals], off_session=True)
        return self._pipeline.conclude(
            plan, lease, run, state.fills, timed_out=state.timed_out, closed=closed
        )

    def _run_of(self, waiter: Waiter, calls: list[Any]) -> Run:
        """The handling's bookkeeping carried over (for the confirmation and the audit)."""
        carried = waiter.carried
        run = Run(self._clock, self._clock())
        run.attempts = waiter.plan.attempts
        run.submitted_at = carried.get("submitted_at") or waiter.plan.submitted_at
        run.retcode = carried.get("retcode")
        run.broker_comment = carried.get("broker_comment")
        run.filling_mode = carried.get("filling_mode")
        run.timings_ms.update(carried.get("timings") or {})
        run.timings_ms["settle"] = round(max(self._clock() - waiter.awaited.since, 0.0) * 1000.0, 3)
        run.broker_calls("settle", calls)
        return run

    def _cancel(self, waiter: Waiter, tickets: tuple[int, ...], lease: Lease, run: Run) -> None:
        """The order timeout: cancel what still works (its final state then settles it).
        A cancel is no order: sent again it fails harmlessly."""
        gateway: Gateway = lease.session.gateway
        for ticket in tickets:
            reply = gateway.cancel(ticket, fence=lease.fence)
            run.note("monitor", cancelled=ticket, retcode=reply.retcode)
        run.broker_calls("monitor", gateway.drain_calls())
        save_events(self._store, lease.conn, waiter.execution_id, run)

    def _give_up(
        self, waiter: Waiter, lease: Lease, run: Run, fills: list[Fill], missing: str
    ) -> Outcome:
        """No proof either way within the time allowed: a provisional answer, corrected by
        the background recheck when the broker shows the truth (never a second order)."""
        plan, awaited = waiter.plan, waiter.awaited
        waited = self._clock() - awaited.since
        details = {
            "order": f"an order's outcome is unknown and the broker showed nothing of it"
            f" in {waited:.1f} s",
            "deals": f"the broker shows our order but not its deals after {waited:.1f} s",
            "the slippage close": f"the slippage close does not show after {waited:.1f} s",
        }[missing]
        metrics.record_settled_off_session(provisional=True)
        run.note("settle", provisional=True, missing=missing)
        document = awaited.to_json()
        return self._pipeline.conclude(
            plan,
            lease,
            run,
            fills,
            reason=RejectionReason.UNKNOWN_OUTCOME,
            details=details,
            status=None if fills else ExecutionStatus.FAILED,
            provisional=True,
            settling=document,
        )

    def _check(self, waiter: Waiter, found: Found, lease: Lease) -> Outcome | str | None:
        """A final row settled from its replies: do the deals agree?"""
        plan, awaited = waiter.plan, waiter.awaited
        state = settle.progress(awaited.by_deals_alone(), found, plan.side, plan.requested_price)
        if not isinstance(state, Settled):
            if self._clock() < awaited.since + CHECK_WINDOW_SECONDS:
                return None
            metrics.record_deal_check("unverified")
            log.warning("settler: the deals of a reply-settled fill never showed")
            return "checked"
        if not settle.disagrees(state.fills, awaited.known):
            metrics.record_deal_check("agreed")
            return "checked"
        metrics.record_deal_check("corrected")
        published = self._store.confirmation_of(lease.conn, plan.execution_id)
        if published is None:
            raise StoreError(f"execution {plan.execution_id} has no outbox row")
        previous = ExecutionConfirmation.model_validate_json(published.payload)
        log.error(
            "settler: the deals contradict the reply this execution was settled from"
            " (reply deals %s, broker deals %s): publishing a corrected version",
            [d for f in awaited.known for d in f.deals],
            [d for f in state.fills for d in f.deals],
        )
        run = self._run_of(waiter, [])
        run.note("check", corrected=True, deals=[d for f in state.fills for d in f.deals])
        return self._pipeline.conclude(
            plan,
            lease,
            run,
            state.fills,
            timed_out=state.timed_out,
            version=previous.version + 1,
            correction=(
                f"version {previous.version} was settled from the broker's reply; the"
                " account's deals say otherwise"
            ),
            corrects=previous.status.value,
        )
