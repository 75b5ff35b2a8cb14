"""A pipeline over a real PostgreSQL and an in-process simulated terminal, for tests."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from schemas.identity import order_magic_for
from schemas.request import MessageProperties
from tests import samples
from tests.simbooks import broker_deals
from worker.config import Settings, load_settings
from worker.execution.outcome import Delivery, Outcome, Publish, Requeue, Settling
from worker.execution.pipeline import Pipeline
from worker.mt5 import api
from worker.mt5.sessions import SessionSpec
from worker.mt5.sim.terminal import SimConfig, SimTerminal
from worker.pool.pool import SessionPool
from worker.service import gateway_factory
from worker.store.store import Store

SETTLE_SECONDS = 10.0  # the settler's answer: order timeout (2 s here) + grace, with room
REDELIVERIES = 5  # after a failed query; 5 % each: 5 in a row is a bug, not bad luck


def always_open(config: SimConfig) -> SimConfig:
    """Tests must not depend on the weekday: no weekly closing unless a test asks for it."""
    symbols = {name: replace(symbol, closed_weekly=()) for name, symbol in config.symbols.items()}
    return replace(config, symbols=symbols)


@dataclass
class PipelineEnv:
    settings: Settings
    store: Store
    sim: SimTerminal
    pool: SessionPool
    pipeline: Pipeline

    def deliver(
        self,
        message: dict[str, Any] | bytes,
        *,
        props: MessageProperties | None = None,
        redelivered: bool | None = None,
        delivery_count: int | None = None,
    ) -> Outcome:
        body = message if isinstance(message, bytes) else json.dumps(message).encode()
        delivery = Delivery(
            body=body,
            properties=props or MessageProperties(content_type="application/json"),
            redelivered=bool(delivery_count) if redelivered is None else redelivered,
            delivery_count=delivery_count,
            received_at=datetime.now(UTC),
        )
        return answered(self.pipeline, self.pipeline.handle(delivery))

    def confirm(self, message: dict[str, Any], **kw: Any) -> dict[str, Any]:
        """Deliver until published. A broker query answering None (``query_none_rate`` of
        the hardened simulator) rightly requeues; RabbitMQ then redelivers, and so do we."""
        outcome = self.deliver(message, **kw)
        for _ in range(REDELIVERIES):
            if not (isinstance(outcome, Requeue) and outcome.reason == "terminal: QueryFailed"):
                break
            outcome = self.deliver(message, **{**kw, "redelivered": True})
        assert isinstance(outcome, Publish), outcome
        document: dict[str, Any] = json.loads(outcome.payload)
        return document

    def settled(self, message: dict[str, Any], attempts: int = 30) -> Outcome:
        """Redeliver, as RabbitMQ does after each requeue, until the outcome is no Requeue:
        on the hardened server an execution stays in flight while its deals lag."""
        outcome = self.deliver(message, redelivered=True)
        for _ in range(attempts):
            if not isinstance(outcome, Requeue):
                break
            time.sleep(0.1)  # the runtime's requeue delay
            outcome = self.deliver(message, redelivered=True)
        return outcome

    def deals(self, execution_id: uuid.UUID | str | None = None) -> list[api.TradeDeal]:
        """The broker's deals from its books (lagging ones too; no query can fail), or those
        of one execution, found by its order magic: a server may cut or blank comments."""
        if execution_id is None:
            return broker_deals(self.sim)
        magic = order_magic_for(uuid.UUID(str(execution_id)), self.settings.magic)
        return broker_deals(self.sim, magic)

    def row(self, execution_id: str) -> dict[str, Any]:
        with self.store.connection() as conn:
            row = self.store.load(conn, uuid.UUID(execution_id))
            assert row is not None
            return dict(row.values)

    def events(self, execution_id: str) -> list[dict[str, Any]]:
        with self.store.connection() as conn:
            return self.store.events_of(conn, uuid.UUID(execution_id))


def answered(pipeline: Pipeline, outcome: Outcome) -> Outcome:
    """As the runtime does: a delivery whose execution waits on the settler is answered by
    the settler's confirmation (the Settling outcome itself if none came in time)."""
    if isinstance(outcome, Settling):
        return pipeline.settler.wait_for(outcome.execution_id, SETTLE_SECONDS) or outcome
    return outcome


@contextmanager
def pipeline_env(
    database_url: str,
    sim_config: SimConfig | None = None,
    *,
    sessions: int = 1,
    sim: SimTerminal | None = None,
    **settings: Any,
) -> Iterator[PipelineEnv]:
    """``sessions`` > 1: that many terminals on the one simulated account; ``sim``: an
    existing simulated terminal (its books), e.g. shared with another env."""
    environ = {"DATABASE_URL": database_url, "MT5_SESSIONS": "1"}
    base = load_settings(environ)
    values = {"reconcile_grace_seconds": 0.05, "order_timeout_seconds": 2.0, **settings}
    config = base.model_copy(update=values)
    store = Store.open(database_url, max_size=6, group_commit=config.group_commit)
    store.migrate()
    if sim is None:
        sim = SimTerminal(always_open(sim_config or SimConfig()))
        assert sim.initialize()
    terminal = sim

    def opener(spec: SessionSpec) -> api.Terminal:
        del spec
        return terminal

    pool = SessionPool(
        [SessionSpec(id=f"sim-{i}", backend="sim") for i in range(sessions)],
        store.pool,
        gateway_factory(config),
        opener=opener,
        linger_seconds=config.session_linger_seconds,  # as the service does
    )
    pipeline = Pipeline(config, store, pool)
    try:
        yield PipelineEnv(config, store, terminal, pool, pipeline)
    finally:
        pipeline.settler.stop()
        pool.close()
        store.close()


def approval(
    symbol: str = "EURUSD", direction: int = 1, units: float = 100_000.0, **decision_fields: Any
) -> dict[str, Any]:
    decision = samples.decision(trade=samples.approved_trade(symbol, direction, units))
    decision.update(decision_fields)
    return samples.rpm_output(decision)
