"""Every Prometheus metric of the worker, defined once, and the helpers that move them.

Call these from the pipeline and the runtime (all are thread-safe, cheap, never raise on a
label value: anything outside the bounded sets below is counted as ``other``)::

    record_received(result: str = "valid", *, redelivered: bool = False) -> None  # or "invalid"
    record_duplicate() -> None                     # a redelivery of an already finished execution
    observe_stage(stage: str, seconds: float) -> None            # or: with stage_timer(stage):
    observe_end_to_end(seconds: float) -> None
    record_outcome(status: str, reason: str | None = None, account: str | None = None) -> None
    record_retcode(code: int | None) -> None                     # None = order_send gave None
    record_retries(count: int = 1) -> None                       # order_send calls repeated
    record_unknown_outcome(session: str | None = None) -> None
    record_slippage(symbol: str, side: str | int, pips: float) -> None
    record_slippage_breach(symbol: str) -> None
    observe_fill_ratio(ratio: float) -> None
    record_claim_wait(seconds: float, *, acquired: bool, account: str | None = None) -> None
    configure_accounts(names: Iterable[str | None]) -> None     # the account label's values
    record_dead_letter(reason: str) -> None
    record_reconnect(target: Target) -> None
    in_flight(delta: int) -> None                                # +1 on delivery, -1 on ack/nack
    record_recovery(*, settled: bool) -> None                    # the recovery sweep, per row
    record_correction(status: str) -> None                      # a provisional answer corrected
    record_ready(ready: bool) -> None                            # /readyz's verdict, per scrape
    register_pool_state(read: Callable[[], PoolState]) -> None
    register_outbox_state(read: Callable[[], OutboxState]) -> None
    register_in_flight_state(read: Callable[[], InFlightState]) -> None
    refresh() -> None        # reads the registered callbacks into their gauges

Pool and outbox gauges are read from their owners' state by the callbacks: ``refresh()``
runs before every scrape of ``/metrics`` (worker.observability.health) and should also run
periodically in each worker process when ``run --processes N`` is used, since the scrape
then happens in another process.

Multi-process: set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory) in the environment
BEFORE ``prometheus_client`` is first imported in the supervisor and its children;
prometheus-client chooses its storage at import time. Gauges declare how processes combine
(``livesum`` for per-process quantities, ``livemax`` for shared state read by every
process). Call ``mark_process_dead(pid)`` in the supervisor when a child exits.

The ``account`` label takes the configured accounts' names only (``configure_accounts``, called
by the service with its sessions' accounts), ``none`` for no account, ``other`` for anything
else (an approval naming an unknown account): bounded by the sessions file.

Labels never carry an order id, an execution id or a secret; docs/METRICS.md lists them all.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, NamedTuple, TypeVar

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client import multiprocess as _multiprocess

from schemas.enums import ExecutionStatus, RejectionReason

PREFIX = "execution_worker_"
OTHER = "other"
NONE = "none"

STAGES = frozenset(
    {"parse", "claim", "validate", "intent", "submit", "monitor", "reconcile", "commit", "publish"}
)
Target = Literal["rabbitmq", "database", "mt5"]
TARGETS: tuple[Target, ...] = ("rabbitmq", "database", "mt5")
SIDES = ("buy", "sell")
RESULTS = ("valid", "invalid")
STATUSES = frozenset(status.value.lower() for status in ExecutionStatus)
REASONS = frozenset(reason.value for reason in RejectionReason)
# Every documented MT5 trade server return code sits in 10004..10046.
RETCODE_RANGE = range(10004, 10047)
MAX_SYMBOLS = 200  # label cardinality guard: later symbols count as "other"
MAX_SESSIONS = 64
MAX_DEAD_LETTER_REASONS = 50
_SYMBOL_SHAPE = re.compile(r"^[A-Za-z0-9._#+-]{1,32}$")
_REASON_SHAPE = re.compile(r"^[A-Z][A-Z0-9_]{0,47}$")

_log = logging.getLogger(__name__)

# The *_created series double the exposition for nothing an operator reads.
disable_created_metrics()  # type: ignore[no-untyped-call]
_M = TypeVar("_M", Counter, Histogram, Gauge)

# --- definitions -------------------------------------------------------------------------

REQUESTS_RECEIVED = Counter(
    PREFIX + "requests_received_total",
    "Deliveries taken from execution.requests, by parse result (valid/invalid).",
    ["result", "redelivered"],
)
DUPLICATES = Counter(
    PREFIX + "duplicates_total",
    "Redelivered approvals whose execution had already finished (confirmation sent again).",
)
EXECUTIONS = Counter(
    PREFIX + "executions_total",
    "Executions finished, by final status, rejection reason (none when filled) and account.",
    ["status", "reason", "account"],
)
STAGE_SECONDS = Histogram(
    PREFIX + "stage_duration_seconds",
    "Time spent in one pipeline stage.",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
END_TO_END_SECONDS = Histogram(
    PREFIX + "end_to_end_seconds",
    "From delivery received to confirmation published (or dead-lettered) and acked.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BROKER_RETCODES = Counter(
    PREFIX + "broker_retcodes_total",
    "order_send return codes (none = the call returned None).",
    ["retcode"],
)
SEND_RETRIES = Counter(
    PREFIX + "send_retries_total",
    "order_send calls repeated after a retryable return code.",
)
UNKNOWN_OUTCOMES = Counter(
    PREFIX + "unknown_outcomes_total",
    "order_send calls whose outcome was unknown and had to be reconciled.",
    ["session"],
)
SLIPPAGE_PIPS = Histogram(
    PREFIX + "slippage_pips",
    "Signed slippage of fills in pips, positive = adverse.",
    ["symbol", "side"],
    buckets=(-5, -2, -1, -0.5, -0.2, 0, 0.2, 0.5, 1, 2, 3, 5, 10),
)
SHORTFALL_PIPS = Histogram(
    PREFIX + "shortfall_pips",
    "Implementation shortfall of fills in pips: arrival mid (the tick of the pre-trade"
    " checks) to fill price, positive = cost: half the spread, the move until the order was"
    " sent, and the slippage.",
    ["symbol"],
    buckets=(-2, -1, -0.5, -0.2, 0, 0.2, 0.5, 1, 1.5, 2, 3, 5, 10, 20),
)
SLIPPAGE_BREACHES = Counter(
    PREFIX + "slippage_breaches_total",
    "Executions whose adverse slippage exceeded the symbol's slippage limit.",
    ["symbol"],
)
FILL_RATIO = Histogram(
    PREFIX + "fill_ratio",
    "Executed volume / intended volume of orders that reached the broker.",
    buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0),
)
SESSIONS = Gauge(
    PREFIX + "sessions",
    "MT5 sessions in the pool.",
    multiprocess_mode="livesum",
)
SESSIONS_IN_USE = Gauge(
    PREFIX + "sessions_in_use",
    "MT5 sessions claimed by an execution right now.",
    multiprocess_mode="livesum",
)
SESSIONS_UNHEALTHY = Gauge(
    PREFIX + "sessions_unhealthy",
    "1 while the MT5 session fails its health check (disconnected, trading disabled...).",
    ["session"],
    multiprocess_mode="livesum",
)
CLAIM_WAIT_SECONDS = Histogram(
    PREFIX + "session_claim_wait_seconds",
    "Time waiting for a free session, by result (acquired or timeout) and account.",
    ["result", "account"],
    buckets=(0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
OUTBOX_BACKLOG = Gauge(
    PREFIX + "outbox_backlog",
    "Committed confirmations not yet confirmed by RabbitMQ.",
    multiprocess_mode="livemax",
)
OUTBOX_OLDEST_AGE = Gauge(
    PREFIX + "outbox_oldest_age_seconds",
    "Age of the oldest unpublished confirmation (0 when none).",
    multiprocess_mode="livemax",
)
DEAD_LETTERED = Counter(
    PREFIX + "dead_lettered_total",
    "Requests the worker sent to execution.requests.dlx, by reason.",
    ["reason"],
)
UNROUTED_CONFIRMATIONS = Counter(
    PREFIX + "confirmations_unrouted_total",
    "Confirmations the broker returned (nothing bound, no alternate exchange) that the worker"
    " moved to execution.confirmations.unrouted.",
)
RECONNECTS = Counter(
    PREFIX + "reconnects_total",
    "Reconnections after a lost connection, by target.",
    ["target"],
)
IN_FLIGHT = Gauge(
    PREFIX + "in_flight_messages",
    "Deliveries received and not yet acked or nacked.",
    multiprocess_mode="livesum",
)
EXECUTIONS_IN_FLIGHT = Gauge(
    PREFIX + "executions_in_flight",
    "Execution rows not yet final in the database (all workers: read from PostgreSQL).",
    multiprocess_mode="livemax",
)
EXECUTIONS_IN_FLIGHT_OLDEST = Gauge(
    PREFIX + "executions_in_flight_oldest_seconds",
    "Time since the oldest non-final execution row was received (0 when none).",
    multiprocess_mode="livemax",
)
CORRECTIONS = Counter(
    PREFIX + "confirmation_corrections_total",
    "Corrected confirmations (a new version) of provisional answers, by the new status.",
    ["status"],
)
DEAL_CHECKS = Counter(
    PREFIX + "deal_checks_total",
    "Fills settled from a reply that named its deal, checked later against the deals:"
    " agreed, corrected (a new version was published) or unverified (no deals in time).",
    ["result"],
)
SETTLING = Counter(
    PREFIX + "settled_off_session_total",
    "Executions the settler finished off their terminal session, by how: final (the"
    " broker's history caught up) or provisional (an unknown outcome past its grace, or"
    " deals missing past the order timeout).",
    ["result"],
)
RECOVERIES = Counter(
    PREFIX + "recoveries_total",
    "In-flight rows the recovery sweep (or reconcile) tried to settle, by result.",
    ["result"],
)
RABBITMQ_NODE = Gauge(
    PREFIX + "rabbitmq_node",
    "1 for the RabbitMQ node (host:port, from RABBITMQ_URL) the worker is connected to,"
    " 0 for the cluster's other nodes.",
    ["node"],
    multiprocess_mode="livemax",
)
DATABASE_TIMELINE = Gauge(
    PREFIX + "database_timeline",
    "The timeline of the PostgreSQL primary the worker writes to (it grows by one at"
    " every promotion of a standby).",
    multiprocess_mode="livemax",
)
DATABASE_SYNCHRONOUS_STANDBY = Gauge(
    PREFIX + "database_synchronous_standby",
    "1 when the primary commits only once a synchronous standby has the commit"
    " (synchronous_standby_names set, synchronous_commit on/remote_write/remote_apply),"
    " else 0: a failover may then lose the newest commits.",
    multiprocess_mode="livemin",
)
DATABASE_SWITCHES = Counter(
    PREFIX + "database_switches_total",
    "Times the worker found its database on a new primary (timeline or system identifier"
    " changed): approvals decided before it are reconciled by magic before any send.",
)
READY = Gauge(
    PREFIX + "ready",
    "1 while /readyz would answer 200 (broker, database, a healthy session), else 0.",
    multiprocess_mode="livemax",
)

# --- label guards ------------------------------------------------------------------------

_symbols: set[str] = set()
_accounts: frozenset[str] = frozenset()
_sessions: set[str] = set()
_dead_letter_reasons: set[str] = set(REASONS)
_guard = threading.Lock()


def _bounded(value: str, seen: set[str], limit: int, shape: re.Pattern[str] = _SYMBOL_SHAPE) -> str:
    if not shape.match(value):
        return OTHER
    if value in seen:
        return value
    with _guard:
        if value in seen:
            return value
        if len(seen) >= limit:
            return OTHER
        seen.add(value)
    return value


def symbol_label(symbol: str) -> str:
    """The symbol as a label value: its shape checked, at most MAX_SYMBOLS distinct values."""
    return _bounded(symbol.upper(), _symbols, MAX_SYMBOLS)


def configure_accounts(names: Iterable[str | None]) -> None:
    """The accounts this process may name in the ``account`` label (its sessions')."""
    global _accounts
    _accounts = frozenset(name for name in names if name is not None)


def account_label(account: str | None) -> str:
    """A configured account's name, ``none`` for no account, else ``other``."""
    if account is None:
        return NONE
    return account if account in _accounts else OTHER


def side_label(side: str | int) -> str:
    """``buy``/``sell`` from ``"buy"``, ``"BUY"``, ``1`` or ``-1``; else ``other``."""
    if isinstance(side, int):
        return {1: "buy", -1: "sell"}.get(side, OTHER)
    lowered = side.lower()
    return lowered if lowered in SIDES else OTHER


def retcode_label(code: int | None) -> str:
    if code is None:
        return NONE
    return str(code) if code in RETCODE_RANGE else OTHER


def _stage_label(stage: str) -> str:
    return stage if stage in STAGES else OTHER


def _finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


# --- helpers the pipeline and runtime call -----------------------------------------------


_children: dict[tuple[int, tuple[str, ...]], object] = {}


def _labelled(metric: _M, *values: str) -> _M:
    """``metric.labels(*values)`` (label names' order), cached: every label set is bounded,
    and ``labels()`` validates and takes a lock on each call of the hot path."""
    key = (id(metric), values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child  # type: ignore[return-value]


def record_received(result: str = "valid", *, redelivered: bool = False) -> None:
    """One delivery; ``result`` is ``valid`` or ``invalid`` (it did not parse)."""
    _labelled(
        REQUESTS_RECEIVED,
        result if result in RESULTS else OTHER,
        "true" if redelivered else "false",
    ).inc()


def record_duplicate() -> None:
    DUPLICATES.inc()


def observe_stage(stage: str, seconds: float) -> None:
    """``stage`` is one of STAGES (anything else is counted as ``other``)."""
    if _finite(seconds) and seconds >= 0:
        _labelled(STAGE_SECONDS, _stage_label(stage)).observe(seconds)


@contextlib.contextmanager
def stage_timer(stage: str) -> Iterator[None]:
    """Time the ``with`` block as one ``stage`` (also when it raises)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        observe_stage(stage, time.perf_counter() - started)


def observe_end_to_end(seconds: float) -> None:
    if _finite(seconds) and seconds >= 0:
        END_TO_END_SECONDS.observe(seconds)


def record_outcome(status: str, reason: str | None = None, account: str | None = None) -> None:
    """One finished execution. ``status`` is an ExecutionStatus (any case)."""
    status_label = status.lower() if status.lower() in STATUSES else OTHER
    if reason is None or reason == "":
        reason_label = NONE
    else:
        reason_label = reason if reason in REASONS else OTHER
    _labelled(EXECUTIONS, status_label, reason_label, account_label(account)).inc()


def record_retcode(code: int | None) -> None:
    _labelled(BROKER_RETCODES, retcode_label(code)).inc()


def record_retries(count: int = 1) -> None:
    """``count`` order_send calls repeated (the retcodes are in broker_retcodes_total)."""
    if count > 0:
        SEND_RETRIES.inc(count)


def record_unknown_outcome(session: str | None = None) -> None:
    label = NONE if session is None else _bounded(session, _sessions, MAX_SESSIONS)
    UNKNOWN_OUTCOMES.labels(session=label).inc()


def record_slippage(symbol: str, side: str | int, pips: float) -> None:
    """A fill's signed slippage in pips (positive = adverse)."""
    if _finite(pips):
        _labelled(SLIPPAGE_PIPS, symbol_label(symbol), side_label(side)).observe(pips)


def record_shortfall(
    symbol: str,
    side: int,
    arrival_bid: float | None,
    arrival_ask: float | None,
    fill_price: float | None,
    pip: float,
) -> None:
    """A fill's implementation shortfall from the arrival mid, in pips (positive = cost);
    nothing when the arrival tick or the fill is unknown (e.g. a row from before 0003)."""
    if arrival_bid is None or arrival_ask is None or fill_price is None or not pip > 0:
        return
    mid = (arrival_bid + arrival_ask) / 2
    pips = (fill_price - mid if int(side) > 0 else mid - fill_price) / pip
    if _finite(pips):
        _labelled(SHORTFALL_PIPS, symbol_label(symbol)).observe(pips)


def record_slippage_breach(symbol: str) -> None:
    """An execution's adverse slippage exceeded the symbol's limit."""
    SLIPPAGE_BREACHES.labels(symbol=symbol_label(symbol)).inc()


def observe_fill_ratio(ratio: float) -> None:
    if _finite(ratio) and ratio >= 0:
        FILL_RATIO.observe(ratio)


def record_claim_wait(seconds: float, *, acquired: bool, account: str | None = None) -> None:
    if _finite(seconds) and seconds >= 0:
        result = "acquired" if acquired else "timeout"
        _labelled(CLAIM_WAIT_SECONDS, result, account_label(account)).observe(seconds)


def record_dead_letter(reason: str) -> None:
    """``reason`` is an upper-case code (a RejectionReason or the runtime's own, such as
    MALFORMED_JSON); at most MAX_DEAD_LETTER_REASONS distinct codes, then ``other``."""
    label = _bounded(
        reason, _dead_letter_reasons, len(REASONS) + MAX_DEAD_LETTER_REASONS, _REASON_SHAPE
    )
    DEAD_LETTERED.labels(reason=label).inc()


def record_unrouted_confirmation() -> None:
    UNROUTED_CONFIRMATIONS.inc()


def record_reconnect(target: Target) -> None:
    RECONNECTS.labels(target=target if target in TARGETS else OTHER).inc()


def in_flight(delta: int) -> None:
    IN_FLIGHT.inc(delta)


def record_correction(status: str) -> None:
    """A provisional (unknown outcome) confirmation corrected by a new version."""
    label = status.lower() if status.lower() in STATUSES else OTHER
    _labelled(CORRECTIONS, label).inc()


def record_deal_check(result: str) -> None:
    """``agreed``, ``corrected`` or ``unverified``: the deals of a reply-settled fill."""
    DEAL_CHECKS.labels(result=result).inc()


def record_settled_off_session(*, provisional: bool) -> None:
    SETTLING.labels(result="provisional" if provisional else "final").inc()


def record_recovery(*, settled: bool) -> None:
    """One in-flight row the recovery sweep tried: ``settled`` or left ``unresolved``."""
    RECOVERIES.labels(result="settled" if settled else "unresolved").inc()


def set_rabbitmq_node(current: str | None, every: Iterable[str]) -> None:
    """The node connected to (None: none right now), among the cluster's nodes."""
    for node in every:
        RABBITMQ_NODE.labels(node=node).set(1 if node == current else 0)


def set_database(timeline: int, synchronous_standby: bool) -> None:
    DATABASE_TIMELINE.set(timeline)
    DATABASE_SYNCHRONOUS_STANDBY.set(1 if synchronous_standby else 0)


def record_database_switch() -> None:
    DATABASE_SWITCHES.inc()


def record_ready(ready: bool) -> None:
    """The readiness verdict, so that an alert sees a worker that is up but not ready."""
    READY.set(1 if ready else 0)


# --- state read through callbacks --------------------------------------------------------


class PoolState(NamedTuple):
    size: int
    in_use: int
    unhealthy: int
    # (session id, unhealthy) per session; empty: the count goes to session="none"
    by_session: tuple[tuple[str, bool], ...] = ()


class InFlightState(NamedTuple):
    rows: int
    oldest_age_seconds: float


class OutboxState(NamedTuple):
    backlog: int
    oldest_age_seconds: float


_pool_reader: Callable[[], PoolState] | None = None
_outbox_reader: Callable[[], OutboxState] | None = None
_in_flight_reader: Callable[[], InFlightState] | None = None


def register_pool_state(read: Callable[[], PoolState]) -> None:
    """The session pool's owner registers how to read its state (replaces any earlier one)."""
    global _pool_reader
    _pool_reader = read


def register_outbox_state(read: Callable[[], OutboxState]) -> None:
    """The outbox's owner registers how to read its backlog (replaces any earlier one)."""
    global _outbox_reader
    _outbox_reader = read


def register_in_flight_state(read: Callable[[], InFlightState]) -> None:
    """The store registers how to read the non-final execution rows (replaces any earlier)."""
    global _in_flight_reader
    _in_flight_reader = read


def clear_state_readers() -> None:
    global _pool_reader, _outbox_reader, _in_flight_reader
    _pool_reader = None
    _outbox_reader = None
    _in_flight_reader = None


def _set_unhealthy(state: PoolState) -> None:
    counts: dict[str, int] = {}
    if state.by_session:
        for session, unhealthy in state.by_session:
            label = _bounded(session, _sessions, MAX_SESSIONS)
            counts[label] = counts.get(label, 0) + int(unhealthy)
    else:
        counts[NONE] = state.unhealthy
    for label, count in counts.items():
        _labelled(SESSIONS_UNHEALTHY, label).set(count)


def refresh() -> None:
    """Read the registered callbacks into their gauges. A failing callback is logged and its
    gauges keep their last value, so a scrape never fails because of it."""
    pool, outbox, rows = _pool_reader, _outbox_reader, _in_flight_reader
    if pool is not None:
        try:
            state = pool()
        except Exception:
            _log.warning("metrics: reading the session pool state failed", exc_info=True)
        else:
            SESSIONS.set(state.size)
            SESSIONS_IN_USE.set(state.in_use)
            _set_unhealthy(state)
    if outbox is not None:
        try:
            backlog = outbox()
        except Exception:
            _log.warning("metrics: reading the outbox backlog failed", exc_info=True)
        else:
            OUTBOX_BACKLOG.set(backlog.backlog)
            OUTBOX_OLDEST_AGE.set(backlog.oldest_age_seconds)
    if rows is not None:
        try:
            flying = rows()
        except Exception:
            _log.warning("metrics: reading the in-flight executions failed", exc_info=True)
        else:
            EXECUTIONS_IN_FLIGHT.set(flying.rows)
            EXECUTIONS_IN_FLIGHT_OLDEST.set(flying.oldest_age_seconds)


# --- multi-process -----------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The multi-process metrics directory if multi-process mode is on, else None."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def mark_process_dead(pid: int) -> None:
    """Drop a dead child's live gauges (supervisor side, after the child exited)."""
    path = multiprocess_dir()
    if path is not None:
        _multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def metric_names() -> list[str]:
    """The exposed family names of every metric above (docs and tests use it)."""
    metrics = (
        REQUESTS_RECEIVED,
        DUPLICATES,
        EXECUTIONS,
        STAGE_SECONDS,
        END_TO_END_SECONDS,
        BROKER_RETCODES,
        SEND_RETRIES,
        UNKNOWN_OUTCOMES,
        SLIPPAGE_PIPS,
        SLIPPAGE_BREACHES,
        FILL_RATIO,
        SESSIONS,
        SESSIONS_IN_USE,
        SESSIONS_UNHEALTHY,
        CLAIM_WAIT_SECONDS,
        OUTBOX_BACKLOG,
        OUTBOX_OLDEST_AGE,
        DEAD_LETTERED,
        RECONNECTS,
        IN_FLIGHT,
        EXECUTIONS_IN_FLIGHT,
        EXECUTIONS_IN_FLIGHT_OLDEST,
        RECOVERIES,
        READY,
    )
    names: list[str] = []
    for metric in metrics:
        for family in metric.describe():
            suffix = "_total" if family.type == "counter" else ""
            names.append(family.name + suffix)
    return names
