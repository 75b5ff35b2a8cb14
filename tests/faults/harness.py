"""One fault scenario's world: a vhost, a database, N simulated terminals, workers, a checker.

The checker proves the promise on what the outside world can see:
- RabbitMQ: every published approval has at least one confirmation on a queue bound to
  ``execution.confirmations`` with ``#``, and all confirmations of one approval are
  byte-identical (same ``message_id`` = execution id);
- PostgreSQL: exactly one terminal row per approval in ``execution.executions``;
- the terminals' own books (``sim-terminal --dump``): per execution, found by its order
  magic (``order_magic_for``; the server may cut or blank comments), exactly one broker
  order for a filled approval and none for one that was refused, and no order at all whose
  magic is not one of ours; and a FILLED/PARTIALLY_FILLED confirmation's lots and VWAP equal
  those of the broker's deals of that order.

Corrections: an approval may have several confirmations, one per ``version`` (message id
``<id>`` then ``<id>:vN``); the checker judges the newest one it received. With
``check(latest=True)`` it also requires versions 1..N without gaps, each body naming its own
version, every version before the newest provisional, and the newest received version to be
the row's ``confirmation_version`` and the newest outbox row (``wait_caught_up`` first).
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg

from schemas.identity import execution_id_for, order_magic_for
from tests import samples
from tests.faults.processes import SimTerminalProcess, WorkerProcess, base_env, wait_for
from worker.amqp.nodes import connection_parameters
from worker.amqp.topology import (
    CONFIRMATIONS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_QUEUE,
    REQUESTS_QUEUE,
    dead_queue_arguments,
    requests_queue_arguments,
)
from worker.config import load_settings

OBSERVER_QUEUE = "fault.observer"
FILLED_STATES = frozenset({"FILLED", "PARTIALLY_FILLED"})
NO_ORDER_STATES = frozenset({"REJECTED", "FAILED"})
TERMINAL_STATES = frozenset(
    {"FILLED", "PARTIALLY_FILLED", "REJECTED", "EXPIRED", "CANCELLED", "FAILED"}
)
# answered provisionally (an unknown outcome the broker shows nothing of): the confirmation
# says FAILED/REJECTED with provisional=true; a correction would be a new version
PROVISIONAL_STATE = "UNKNOWN"
# rows not settled for good: in flight, or answered provisionally and still reconciled
UNSETTLED_STATES = ("RECEIVED", "VALIDATED", "SUBMITTING", "SUBMITTED", PROVISIONAL_STATE)
SYMBOLS = ("EURUSD", "USDJPY", "GBPUSD")

SIM_TOML = """
seed = {seed}
[account]
balance = 1000000000.0
margin_mode = 0  # netting: one approval is one order and one deal

[symbols.EURUSD]
closed_weekly = []
[symbols.GBPUSD]
closed_weekly = []
[symbols.USDJPY]
closed_weekly = []

[faults]
fault_seed = {seed}
{faults}
"""

IN_FLIGHT_REASON = "IN_FLIGHT"  # worker/execution/last_chance.py: the recovery answers it


def sim_toml(seed: int, faults: str = "") -> str:
    return SIM_TOML.format(seed=seed, faults=faults)


@dataclass
class Tally:
    """One scenario's numbers, as the results table shows them."""

    scenario: str
    runs: int = 1
    messages: int = 0
    orders: int = 0
    duplicates: int = 0
    lost: int = 0
    notes: str = ""
    by_state: dict[str, int] = field(default_factory=dict)


class Side:
    """The test's own RabbitMQ connection: topology, publishing, the confirmation observer."""

    def __init__(self, url: str, delivery_limit: int, *, quorum_observer: bool = False) -> None:
        self.url = url
        self.delivery_limit = delivery_limit
        self.received: dict[str, list[bytes]] = defaultdict(list)
        self.routing: dict[str, str] = {}
        self._connection: Any = None
        self._channel: Any = None
        self._open()
        channel: Any = self._channel
        channel.exchange_declare(DEAD_LETTER_EXCHANGE, "fanout", durable=True)
        channel.queue_declare(DEAD_QUEUE, durable=True, arguments=dead_queue_arguments())
        channel.queue_bind(DEAD_QUEUE, DEAD_LETTER_EXCHANGE, routing_key="#")
        channel.queue_declare(
            REQUESTS_QUEUE, durable=True, arguments=requests_queue_arguments(delivery_limit)
        )
        channel.exchange_declare(CONFIRMATIONS_EXCHANGE, "topic", durable=True)
        # in a cluster the observer is a quorum queue too: a classic one dies with its node
        observer = {"x-queue-type": "quorum"} if quorum_observer else None
        channel.queue_declare(OBSERVER_QUEUE, durable=True, arguments=observer)
        channel.queue_bind(OBSERVER_QUEUE, CONFIRMATIONS_EXCHANGE, "#")

    def _open(self) -> None:
        every = connection_parameters(self.url, shuffle=True)  # a cluster: any live node
        for params in every:
            params.connection_attempts = 1
            params.socket_timeout = 5
        self._connection = pika.BlockingConnection(every)
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()

    def _reopen_on_failure(self, action: Callable[[], Any], seconds: float = 90.0) -> Any:
        """Run ``action``; when the broker connection is gone, reconnect and run it again."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                return action()
            except (pika.exceptions.AMQPError, OSError):
                if time.monotonic() > deadline:
                    raise
                self.close()
                time.sleep(0.5)
                with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                    self._open()

    def publish(self, documents: list[dict[str, Any]]) -> list[str]:
        """Publish (persistent, mandatory, confirmed) and return the idempotency keys."""
        keys: list[str] = []
        for document in documents:
            key = document["decision"]["order_id"]
            body = samples.body(document)
            properties = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=key,
                correlation_id=key,
            )
            self._reopen_on_failure(partial(self._publish_one, body, properties))
            keys.append(key)
        return keys

    def _publish_one(self, body: bytes, properties: pika.BasicProperties) -> None:
        self._channel.basic_publish("", REQUESTS_QUEUE, body, properties, mandatory=True)

    def collect(self) -> dict[str, list[bytes]]:
        """Move every confirmation waiting in the observer queue into ``received``."""

        def drain() -> None:
            while True:
                method, properties, body = self._channel.basic_get(OBSERVER_QUEUE, auto_ack=True)
                if method is None:
                    return
                key = str(properties.message_id)
                self.received[key].append(body)
                self.routing[key] = method.routing_key

        self._reopen_on_failure(drain)
        return self.received

    def confirmed_keys(self) -> set[str]:
        """Execution ids (message ids) with at least one confirmation so far."""
        return set(self.collect())

    def dead_letters(self) -> list[tuple[str | None, str | None]]:
        """Take what the dead-letter queue holds: (message_id, x-rejection-reason) each."""

        def drain() -> list[tuple[str | None, str | None]]:
            got: list[tuple[str | None, str | None]] = []
            while True:
                method, properties, _ = self._channel.basic_get(DEAD_QUEUE, auto_ack=True)
                if method is None:
                    return got
                headers = properties.headers or {}
                reason = headers.get("x-rejection-reason")
                got.append((properties.message_id, str(reason) if reason else None))

        found: list[tuple[str | None, str | None]] = self._reopen_on_failure(drain)
        return found

    def dead_lettered(self) -> int:
        def count() -> int:
            method = self._channel.queue_declare(DEAD_QUEUE, passive=True).method
            return int(method.message_count)

        value: int = self._reopen_on_failure(count)
        return value

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._connection is not None and self._connection.is_open:
                self._connection.close()
        self._connection = None


def approvals(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """``count`` approvals of small random size, mixed symbols and sides."""
    documents = []
    for _ in range(count):
        symbol = rng.choice(SYMBOLS)
        units = rng.choice((10_000.0, 20_000.0, 30_000.0, 50_000.0))
        trade = samples.approved_trade(symbol, rng.choice((1, -1)), units)
        order_id = uuid.UUID(int=rng.getrandbits(128)).hex
        documents.append(samples.rpm_output(samples.decision(order_id=order_id, trade=trade)))
    return documents


class FaultEnv:
    """Terminals, worker settings, the broker side and the checker of one scenario."""

    def __init__(
        self,
        rabbitmq_url: str,
        database_url: str,
        directory: Path,
        terminal_configs: list[str],
        *,
        delivery_limit: int = 5,
        settings: dict[str, str] | None = None,
        quorum_observer: bool = False,
    ) -> None:
        self.quorum_observer = quorum_observer
        self.rabbitmq_url = rabbitmq_url
        self.database_url = database_url
        self.directory = directory
        self.secret = secrets.token_urlsafe(24)
        self.delivery_limit = delivery_limit
        self.settings = settings or {}
        self.terminals: list[SimTerminalProcess] = []
        for index, text in enumerate(terminal_configs):
            config = directory / f"sim-{index}.toml"
            config.write_text(text)
            self.terminals.append(
                SimTerminalProcess(directory, f"terminal-{index}", config, self.secret)
            )
        self.workers: list[WorkerProcess] = []
        self.side: Side | None = None

    def start(self) -> FaultEnv:
        for terminal in self.terminals:
            terminal.start()
        self.side = Side(
            self.rabbitmq_url, self.delivery_limit, quorum_observer=self.quorum_observer
        )
        return self

    def close(self) -> None:
        for worker in self.workers:
            worker.kill_group()
        for terminal in self.terminals:
            terminal.stop()
        if self.side is not None:
            self.side.close()

    # --- workers ------------------------------------------------------------------------

    def worker_env(self, kill_point: str | None = None, kill_at: int = 1) -> dict[str, str]:
        env = base_env()
        env.update(
            {
                "RABBITMQ_URL": self.rabbitmq_url,
                "DATABASE_URL": self.database_url,
                "MT5_BACKEND": "bridge",
                "MT5_SESSIONS": str(len(self.terminals)),
                "MT5_BRIDGE_ADDRESS": ",".join(t.address for t in self.terminals),
                "MT5_BRIDGE_SECRET": self.secret,
                "METRICS_PORT": "0",
                "LOG_FORMAT": "json",
                "DELIVERY_LIMIT": str(self.delivery_limit),
                # the approvals of a long scenario must not expire while workers are killed
                "APPROVAL_TTL_SECONDS": "900",
                "RECONCILE_GRACE_SECONDS": "1",
                "DRAIN_TIMEOUT_SECONDS": "20",
                # a provisional answer (an unknown outcome that showed nothing within the
                # grace) is corrected by the background recheck: seconds here, not minutes
                "UNKNOWN_RECONCILE_FIRST_SECONDS": "0.5",
                "UNKNOWN_RECONCILE_MAX_SECONDS": "2",
            }
        )
        env.update(self.settings)
        if kill_point is not None:
            env["FAULT_KILL_POINT"] = kill_point
            env["FAULT_KILL_AT"] = str(kill_at)
        return env

    def start_worker(
        self, kill_point: str | None = None, kill_at: int = 1, processes: int = 1
    ) -> WorkerProcess:
        log = self.directory / f"worker-{len(self.workers)}.log"
        worker = WorkerProcess(self.worker_env(kill_point, kill_at), log, processes)
        self.workers.append(worker)
        return worker

    # --- observing ------------------------------------------------------------------------

    @property
    def broker_side(self) -> Side:
        assert self.side is not None, "start() first"
        return self.side

    def publish(self, documents: list[dict[str, Any]]) -> list[str]:
        return self.broker_side.publish(documents)

    def wait_confirmed(
        self, keys: list[str], seconds: float, worker: WorkerProcess | None = None
    ) -> None:
        """Until every key has a confirmation; fail early if ``worker`` died."""
        wanted = {str(execution_id_for(key)) for key in keys}

        def done() -> bool:
            if worker is not None and not worker.alive():
                raise AssertionError(
                    f"worker exited {worker.process.returncode} before all were confirmed:\n"
                    f"{worker.tail()}"
                )
            return wanted <= self.broker_side.confirmed_keys()

        try:
            wait_for(done, f"{len(wanted)} confirmations", seconds, interval=0.25)
        except AssertionError as exc:
            missing = len(wanted - self.broker_side.confirmed_keys())
            tail = worker.tail() if worker is not None else ""
            raise AssertionError(f"{exc}; {missing} missing\n{tail}") from None

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            return conn.execute(sql, params).fetchall()

    def rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """idempotency key -> its rows (state, broker_order, executed_lots, submitted_at)."""
        found: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        for key, *rest in self.query(
            "SELECT idempotency_key, state, broker_order, executed_lots, submitted_at,"
            " completed_at FROM execution.executions"
        ):
            found[key].append(tuple(rest))
        return found

    def deals(self) -> list[dict[str, Any]]:
        return [deal for terminal in self.terminals for deal in terminal.deals()]

    def confirmation_versions(self) -> dict[str, tuple[int, int]]:
        """idempotency key -> (its row's ``confirmation_version``, its newest outbox version)."""
        found: dict[str, tuple[int, int]] = {}
        for key, row_version, outbox_version in self.query(
            "SELECT e.idempotency_key, e.confirmation_version, max(o.version)"
            " FROM execution.executions e LEFT JOIN execution.outbox o USING (execution_id)"
            " GROUP BY e.idempotency_key, e.confirmation_version"
        ):
            found[key] = (int(row_version), int(outbox_version or 0))
        return found

    def behind(self, keys: list[str]) -> list[str]:
        """What has not caught up yet (empty: everything has): orders a terminal still holds
        to execute late, rows in flight or provisional, unpublished outbox rows, approvals
        whose newest confirmation received is older than their row's version."""
        reasons: list[str] = []
        late = sum(terminal.late_pending() for terminal in self.terminals)
        if late:
            reasons.append(f"{late} late orders not executed yet")
        rows = self.rows()
        books = {int(deal["magic"]) for deal in self.deals()}

        def unsettled_row(key: str, state: str) -> bool:
            # a provisional answer stands for an order whose outcome is unknown; with nothing
            # of it on the broker's books (a worker killed between its intent and its send)
            # it is the broker's truth until its window ends, and nothing is behind
            if state == PROVISIONAL_STATE:
                return self.magic_of(key) in books
            return state in UNSETTLED_STATES

        unsettled = [k for k in keys if any(unsettled_row(k, r[0]) for r in rows.get(k, []))]
        if unsettled:
            reasons.append(f"{len(unsettled)} rows in flight, or provisional with orders shown")
        [(unpublished,)] = self.query(
            "SELECT count(*) FROM execution.outbox WHERE published_at IS NULL"
        )
        if unpublished:
            reasons.append(f"{unpublished} outbox rows unpublished")
        received = self.broker_side.collect()
        versions = self.confirmation_versions()
        stale = [
            key
            for key in keys
            if key in versions
            and max(_versions(received, str(execution_id_for(key))), default=0) < versions[key][0]
        ]
        if stale:
            reasons.append(f"{len(stale)} approvals without their newest confirmation")
        return reasons

    def wait_caught_up(
        self, keys: list[str], seconds: float, worker: WorkerProcess | None = None
    ) -> None:
        """Until nothing is ``behind``: late orders executed, background reconciles and
        settling done, every newest confirmation published and received."""
        deadline = time.monotonic() + seconds
        while reasons := self.behind(keys):
            if worker is not None and not worker.alive():
                raise AssertionError(
                    f"worker exited {worker.process.returncode} before catching up"
                    f" ({'; '.join(reasons)}):\n{worker.tail()}"
                )
            if time.monotonic() > deadline:
                tail = worker.tail() if worker is not None else ""
                raise AssertionError(
                    f"not caught up after {seconds:.0f} s: {'; '.join(reasons)}\n{tail}"
                )
            time.sleep(0.5)

    def bitten(self) -> tuple[int, int]:
        """From the audit trail: (order_send calls with an unknown outcome: no reply or
        10011/10012/10031, failed broker queries): proof that the faults happened."""
        [(unknown,)] = self.query(
            "SELECT count(*) FROM execution.execution_events WHERE kind = 'broker_call'"
            " AND function = 'order_send' AND (retcode IS NULL OR retcode IN (10011, 10012, 10031))"
        )
        [(failed,)] = self.query(
            "SELECT count(*) FROM execution.execution_events e,"
            " jsonb_array_elements(e.detail -> 'calls') AS c"
            " WHERE e.kind = 'broker_queries' AND c ? 'error'"
        )
        return int(unknown), int(failed)

    @property
    def deployment_magic(self) -> int:
        return int(self.settings.get("MAGIC") or load_settings({}).magic)

    def magic_of(self, key: str) -> int:
        """The order magic of an approval's execution: how the broker's books name it."""
        return order_magic_for(execution_id_for(key), self.deployment_magic)

    # --- the promise ----------------------------------------------------------------------

    def check(
        self,
        scenario: str,
        keys: list[str],
        *,
        dead_letters_with_reason: bool = False,
        latest: bool = False,
        rows_lost_to_failover: set[str] | frozenset[str] = frozenset(),
        answered_again: set[str] | frozenset[str] = frozenset(),
        **extra: Any,
    ) -> Tally:
        """Assert the promise for every published key; return the scenario's numbers.

        ``latest``: the versions of each approval's confirmations are checked too (see the
        module docstring); the newest one received is judged in every case.

        An execution's deals (by magic) against its first deal's direction are the slippage close of
        SLIPPAGE_POLICY=close (same magic and comment): one closing order per approval at
        most, counted apart from the opening order. ``dead_letters_with_reason``: a key
        dead-lettered by the worker with an ``x-rejection-reason`` (and no row) is
        accounted for; a dead letter without a reason is always a problem. A copy
        dead-lettered ``IN_FLIGHT`` (its row was being settled when its last delivery came)
        is accounted for once its row is final and its confirmation arrived: the recovery
        sweep answered it, which is what that reason promises.
        ``rows_lost_to_failover``: keys whose rows an asynchronous failover lost after their
        confirmation went out; without a row, each still needs its confirmation, one broker
        order at most, and a FILLED confirmation that matches that order's deals.
        ``answered_again``: keys whose confirmations may differ in their timings, not in
        status, lots, price and deals (confirmed before a failover lost the row, answered
        again from the broker's books after it).
        """
        side = self.broker_side
        received = side.collect()
        rows = self.rows()
        orders_by_magic: dict[int, set[tuple[str, int]]] = defaultdict(set)
        closes_by_magic: dict[int, set[tuple[str, int]]] = defaultdict(set)
        deals_by_magic: dict[int, list[dict[str, Any]]] = defaultdict(list)
        opening_type: dict[int, int] = {}
        every = [(t.name, d) for t in self.terminals for d in t.deals()]
        for name, deal in sorted(every, key=lambda item: int(item[1]["ticket"])):
            magic = int(deal["magic"])
            opening = opening_type.setdefault(magic, int(deal["type"]))
            if int(deal["type"]) != opening:
                closes_by_magic[magic].add((name, int(deal["order"])))
                continue
            orders_by_magic[magic].add((name, int(deal["order"])))
            deals_by_magic[magic].append(deal)
        dead_reasons: dict[str, str | None] = {}
        for message_id, reason in side.dead_letters():
            dead_reasons[str(message_id)] = reason
        tally = Tally(scenario, messages=len(keys), **extra)
        problems: list[str] = []
        magics = set()
        states: dict[str, int] = defaultdict(int)
        on_record = self.confirmation_versions() if latest else {}
        answered_keys: set[str] = set()
        for key in keys:
            execution_id = execution_id_for(key)
            magic = self.magic_of(key)
            magics.add(magic)
            orders = orders_by_magic.get(magic, set())
            tally.orders += len(orders)
            tally.duplicates += max(0, len(orders) - 1)
            closes = closes_by_magic.get(magic, set())
            tally.duplicates += max(0, len(closes) - 1)
            key_rows = rows.get(key, [])
            if not key_rows and dead_letters_with_reason and dead_reasons.get(key):
                states[f"dead-lettered ({dead_reasons[key]})"] += 1
                if orders:
                    problems.append(f"{key}: dead-lettered but the broker has orders {orders}")
                continue
            versions = _versions(received, str(execution_id))
            if not key_rows and key in rows_lost_to_failover and versions:
                body = json.loads(versions[max(versions)][0])
                states[f"{body['status']} (row lost)"] += 1
                if body["status"] in FILLED_STATES and len(orders) == 1:
                    ((_, order),) = orders
                    problems += _fill_problems(
                        key,
                        body["status"],
                        body,
                        order,
                        body["executed_lots"],
                        orders,
                        deals_by_magic.get(magic, []),
                    )
                elif body["status"] in FILLED_STATES or orders:
                    problems.append(f"{key}: {body['status']} (row lost), orders {orders}")
                continue
            answered = TERMINAL_STATES | {PROVISIONAL_STATE}
            if len(key_rows) != 1 or key_rows[0][0] not in answered or not versions:
                tally.lost += 1
                problems.append(f"{key}: rows {key_rows}, {len(versions)} confirmation(s)")
                continue
            state, broker_order, executed_lots, *_ = key_rows[0]
            states[state] += 1
            answered_keys.add(key)
            for version, copies in versions.items():
                if len(set(copies)) != 1 and key in answered_again:
                    # answered once before an asynchronous failover lost its row, and once
                    # after from the broker's books: the same fill, told twice
                    if len({_essentials(copy) for copy in copies}) != 1:
                        problems.append(f"{key}: v{version}: answered again differently")
                elif len(set(copies)) != 1:
                    problems.append(f"{key}: v{version}: {len(set(copies))} different bodies")
            if latest:
                problems += _version_problems(key, str(execution_id), versions, on_record)
            body = json.loads(versions[max(versions)][0])
            said = PROVISIONAL_STATE if body.get("provisional") else body["status"]
            if said != state or body["idempotency_key"] != key:
                problems.append(f"{key}: confirmation says {body['status']}, row says {state}")
            # closed at once: the confirmation lists every deal, ours and the close's
            if state == "CANCELLED" and closes and orders and len(body["broker_deals"]) < 2:
                problems.append(f"{key}: CANCELLED listing {body['broker_deals']}")
            if state in FILLED_STATES:
                problems += _fill_problems(
                    key,
                    state,
                    body,
                    broker_order,
                    executed_lots,
                    orders,
                    deals_by_magic.get(magic, []),
                )
            elif (state in NO_ORDER_STATES or state == PROVISIONAL_STATE) and orders:
                problems.append(f"{key}: {state} but the broker has orders {orders}")
        strays = {m: o for m, o in orders_by_magic.items() if m not in magics}
        if strays:
            tally.duplicates += sum(len(o) for o in strays.values())
            problems.append(f"orders with the magic of no published approval: {strays}")
        published = set(keys)
        for message_id, reason in dead_reasons.items():
            if not reason:
                problems.append(f"{message_id}: dead-lettered with no reason")
            elif reason == IN_FLIGHT_REASON and message_id in answered_keys:
                states["dead-lettered IN_FLIGHT, answered by the recovery"] += 1
            elif not dead_letters_with_reason or message_id not in published:
                problems.append(f"{message_id}: dead-lettered ({reason})")
        tally.by_state = dict(sorted(states.items()))
        assert not problems, (
            f"{scenario}: {tally.duplicates} duplicated, {tally.lost} lost of {len(keys)}"
            f" ({tally.orders} orders); {len(problems)} problems: " + "; ".join(problems[:20])
        )
        return tally


def _essentials(body: bytes) -> tuple[Any, ...]:
    """What a confirmation says of the trade, whoever derived it and when."""
    document = json.loads(body)
    return tuple(
        json.dumps(document.get(name), sort_keys=True)
        for name in ("idempotency_key", "status", "executed_lots", "fill_price", "broker_deals")
    )


def _fill_problems(
    key: str,
    state: str,
    body: dict[str, Any],
    broker_order: int | None,
    executed_lots: Any,
    orders: set[tuple[str, int]],
    deals: list[dict[str, Any]],
) -> list[str]:
    """A filled approval: one broker order, and the row's and the confirmation's lots and
    VWAP are those of that order's deals on the broker's books."""
    if len(orders) != 1:
        return [f"{key}: {state} with {len(orders)} broker orders"]
    ((_, order),) = orders
    if broker_order != order:
        return [f"{key}: row order {broker_order} != broker's {order}"]
    lots = sum(float(deal["volume"]) for deal in deals)
    vwap = sum(float(deal["volume"]) * float(deal["price"]) for deal in deals) / lots
    problems = []
    if abs(lots - float(executed_lots)) > 1e-6 or abs(lots - body["executed_lots"]) > 1e-6:
        problems.append(
            f"{key}: row {executed_lots} / confirmation {body['executed_lots']} lots, broker {lots}"
        )
    if body["fill_price"] is None or abs(vwap - body["fill_price"]) > 1e-9 * max(1.0, vwap):
        problems.append(f"{key}: confirmation fill price {body['fill_price']}, broker {vwap}")
    if sorted(body["broker_deals"]) != sorted(int(deal["ticket"]) for deal in deals):
        problems.append(f"{key}: confirmation deals {body['broker_deals']} != broker's {deals}")
    return problems


def _version_problems(
    key: str,
    execution_id: str,
    versions: dict[int, list[bytes]],
    on_record: dict[str, tuple[int, int]],
) -> list[str]:
    """Versions 1..N without gaps, each body naming its execution and version, every one
    before the newest provisional, and the newest being the row's and the outbox's."""
    newest = max(versions)
    problems = []
    if sorted(versions) != list(range(1, newest + 1)):
        problems.append(f"{key}: confirmation versions {sorted(versions)}")
    for version, copies in sorted(versions.items()):
        body = json.loads(copies[0])
        if body.get("version", 1) != version or body.get("execution_id") != execution_id:
            problems.append(
                f"{key}: message v{version} carries version {body.get('version')}"
                f" of {body.get('execution_id')}"
            )
        if version < newest and not body.get("provisional"):
            problems.append(f"{key}: v{version} was final yet v{newest} followed")
    row_version, outbox_version = on_record.get(key, (0, 0))
    if not newest == row_version == outbox_version:
        problems.append(
            f"{key}: newest confirmation received v{newest}, row at v{row_version},"
            f" outbox at v{outbox_version}"
        )
    return problems


def _versions(received: dict[str, list[bytes]], execution_id: str) -> dict[int, list[bytes]]:
    """The confirmations of one execution by version (message_id ``<id>`` or ``<id>:vN``)."""
    found: dict[int, list[bytes]] = {}
    for message_id, copies in received.items():
        if message_id == execution_id:
            found.setdefault(1, []).extend(copies)
        elif message_id.startswith(execution_id + ":v"):
            found.setdefault(int(message_id.rsplit(":v", 1)[1]), []).extend(copies)
    return found


@contextlib.contextmanager
def fault_env(
    rabbitmq_url: str, database_url: str, directory: Path, configs: list[str], **kwargs: Any
) -> Iterator[FaultEnv]:
    env = FaultEnv(rabbitmq_url, database_url, directory, configs, **kwargs)
    try:
        yield env.start()
    finally:
        env.close()
