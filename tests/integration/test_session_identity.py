"""One identity per session (issue 18, item 10).

Two worker processes that reach ONE bridge (one terminal, one account) but name it
differently in their sessions files must settle each other's in-flight rows: the row
records the session's identity (``session_key``), and a resume claims by it, not by the
configured ``id``. Here the two "processes" are two pools and two pipelines over one
database, each with its own name for the same bridge address; the simulated terminal
stands in for the terminal behind the bridge.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from schemas.request import MessageProperties
from tests.integration.pipeline_env import always_open, answered, approval
from tests.simbooks import broker_deals
from worker.config import load_settings
from worker.execution.outcome import Delivery, Publish, Requeue, Settling
from worker.execution.pipeline import Pipeline
from worker.mt5 import api
from worker.mt5.sessions import SessionSpec
from worker.mt5.sim.terminal import SimConfig, SimTerminal
from worker.pool.leases import UnknownSession
from worker.pool.pool import SessionPool
from worker.service import gateway_factory
from worker.store.store import Store

BRIDGE = "10.0.0.5:18812"


class Process:
    """One worker "process": its own pool naming the shared bridge ``name``."""

    def __init__(self, store: Store, terminal: api.Terminal, name: str, url: str) -> None:
        settings = load_settings({"DATABASE_URL": url, "MT5_SESSIONS": "1"})
        self.settings = settings.model_copy(
            update={"reconcile_grace_seconds": 0.05, "order_timeout_seconds": 2.0}
        )
        self.spec = SessionSpec(id=name, backend="bridge", address=BRIDGE)
        self.pool = SessionPool(
            [self.spec], store.pool, gateway_factory(self.settings), opener=lambda _: terminal
        )
        self.pipeline = Pipeline(self.settings, store, self.pool)

    def deliver(self, message: dict[str, Any], *, redelivered: bool = False) -> Any:
        return answered(self.pipeline, self.handle(message, redelivered=redelivered))

    def handle(self, message: dict[str, Any], *, redelivered: bool = False) -> Any:
        """The handler's own outcome (a Settling one not waited for)."""
        return self.pipeline.handle(
            Delivery(
                body=json.dumps(message).encode(),
                properties=MessageProperties(content_type="application/json"),
                redelivered=redelivered,
                delivery_count=None,
                received_at=datetime.now(UTC),
            )
        )


@pytest.fixture
def shared(new_database: Callable[[], str]) -> Iterator[tuple[Store, SimTerminal, str]]:
    url = new_database()
    store = Store.open(url, max_size=6)
    store.migrate()
    sim = SimTerminal(always_open(SimConfig()))
    assert sim.initialize()
    try:
        yield store, sim, url
    finally:
        store.close()


class DropsAfterSending:
    """The first process's bridge connection: it drops right after the first order_send
    reached the terminal (the order executed, no reply) and stays down."""

    def __init__(self, terminal: SimTerminal) -> None:
        self._terminal = terminal
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._terminal, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise api.TransportError("bridge connection dropped")
            result = attribute(*args, **kwargs)
            if name == "order_send":
                self.down = True
                raise api.TransportError("bridge connection dropped")
            return result

        return call


def _left_in_flight(first: Process, sim: SimTerminal, message: dict[str, Any]) -> uuid.UUID:
    """``first`` sends the order, then its bridge connection drops: the order is executed,
    the row stays in flight."""
    outcome = first.handle(message)
    # its outcome is unknown: left to the first process's settler, which cannot read either
    assert isinstance(outcome, Requeue | Settling), outcome
    with first.pipeline.store.connection() as conn:
        rows = first.pipeline.store.in_flight(conn) + first.pipeline.store.settling(
            conn, idle_seconds=0.0
        )
    assert len(rows) == 1 and rows[0].state in ("SUBMITTING", "SUBMITTED")
    assert rows[0].get("session_id") == "icm-a"
    assert rows[0].get("session_key") == first.spec.identity
    return rows[0].execution_id


def _deals(sim: SimTerminal) -> list[api.TradeDeal]:
    """The broker's books: lagging deals too, no query that may answer None."""
    return broker_deals(sim)


@pytest.mark.parametrize("path", ["resume", "redelivery"])
def test_another_process_naming_the_bridge_differently_settles_the_row(
    shared: tuple[Store, SimTerminal, str], path: str
) -> None:
    store, sim, url = shared
    first = Process(store, DropsAfterSending(sim), "icm-a", url)
    second = Process(store, sim, "icm-b", url)  # the same bridge, another name
    try:
        message = approval("EURUSD", 1, 100_000.0)
        execution_id = _left_in_flight(first, sim, message)
        assert len(_deals(sim)) == 1
        first.pool.close()  # the first process is gone; only the second can settle it

        if path == "resume":  # the recovery sweep / `execution-worker reconcile`
            with store.connection() as conn:
                row = store.load(conn, execution_id)
            assert row is not None
            outcome = answered(second.pipeline, second.pipeline.resume(row))
        else:  # the broker redelivers the approval to the second process
            outcome = second.deliver(message, redelivered=True)
        assert isinstance(outcome, Publish), outcome
        assert json.loads(outcome.payload)["status"] == "FILLED"
        assert len(_deals(sim)) == 1  # settled from the broker's truth, not sent again
        with store.connection() as conn:
            settled = store.load(conn, execution_id)
        assert settled is not None and settled.state == "FILLED"
        assert settled.get("session_id") == "icm-b"  # the human name of the settler
        assert settled.get("session_key") == second.spec.identity == first.spec.identity
    finally:
        first.pool.close()
        second.pool.close()


def test_a_claim_by_identity_finds_the_session_whatever_its_name(
    shared: tuple[Store, SimTerminal, str],
) -> None:
    store, sim, url = shared
    process = Process(store, sim, "icm-b", url)
    try:
        other = SessionSpec(id="icm-a", backend="bridge", address=BRIDGE)
        with process.pool.claim(1.0, session_key=other.identity) as lease:
            assert lease.session.id == "icm-b"
        elsewhere = SessionSpec(id="icm-b", backend="bridge", address="10.0.0.6:18812")
        with pytest.raises(UnknownSession):  # same name, another terminal: not this one
            process.pool.claim(0.1, session_key=elsewhere.identity)
    finally:
        process.pool.close()
