"""Two simulated broker accounts with two terminals each, over a real PostgreSQL.

Account ``Alpha-Demo:1001`` (named by server and login) and account ``beta`` (an alias for
``Beta-Demo:2002``). Each account is ONE simulated trade server; its two sessions are two
terminals logged in to it, so they see the same positions, orders and deals, as terminals of
one real account do. Alpha's ``order_send`` can be held shut (:class:`Gate`): a busy account,
deterministically, without timing.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from schemas.identity import order_magic_for
from schemas.request import MessageProperties
from tests.integration.pipeline_env import always_open, answered, approval
from tests.simbooks import broker_deals
from worker.config import Settings, load_settings
from worker.execution.outcome import Delivery, Outcome
from worker.execution.pipeline import Pipeline
from worker.mt5 import api
from worker.mt5.sessions import SessionSpec
from worker.mt5.sim.terminal import SimAccount, SimConfig, SimTerminal
from worker.pool.pool import SessionPool
from worker.service import gateway_factory
from worker.store.store import Store

ALPHA = "Alpha-Demo:1001"
BETA = "beta"
ALPHA_SESSIONS = ("alpha-1", "alpha-2")
BETA_SESSIONS = ("beta-1", "beta-2")


class Gate:
    """A simulated terminal whose ``order_send`` waits while the gate is shut (a slow
    broker); every other call goes straight to the simulator."""

    def __init__(self, terminal: SimTerminal) -> None:
        self.sim = terminal
        self.open = threading.Event()
        self.open.set()
        self._lock = threading.Lock()
        self.waiting = 0  # order_send calls held at the gate right now

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sim, name)

    def order_send(self, request: dict[str, Any]) -> api.OrderSendResult | None:
        with self._lock:
            self.waiting += 1
        try:
            self.open.wait(60.0)
        finally:
            with self._lock:
                self.waiting -= 1
        return self.sim.order_send(request)


def _sim(login: int, server: str) -> SimTerminal:
    config = always_open(SimConfig(account=replace(SimAccount(), login=login, server=server)))
    sim = SimTerminal(config)
    assert sim.initialize()
    return sim


def specs() -> list[SessionSpec]:
    alpha = [
        SessionSpec(id=i, backend="sim", login=1001, server="Alpha-Demo") for i in ALPHA_SESSIONS
    ]
    beta = [
        SessionSpec(id=i, backend="sim", login=2002, server="Beta-Demo", account=BETA)
        for i in BETA_SESSIONS
    ]
    return [*alpha, *beta]


@dataclass
class AccountsEnv:
    settings: Settings
    store: Store
    alpha: Gate
    beta: SimTerminal
    pool: SessionPool
    pipeline: Pipeline

    def deliver(self, message: dict[str, Any]) -> Outcome:
        delivery = Delivery(
            body=json.dumps(message).encode(),
            properties=MessageProperties(content_type="application/json"),
            redelivered=False,
            delivery_count=None,
            received_at=datetime.now(UTC),
        )
        return answered(self.pipeline, self.pipeline.handle(delivery))

    def magics(self, terminal: SimTerminal | Gate) -> list[int]:
        """The magic of every deal on that account's trade server, from its books (lagging
        deals too; comments are cut by the hardened server, the magic names the execution)."""
        sim = terminal.sim if isinstance(terminal, Gate) else terminal
        return [deal.magic for deal in broker_deals(sim)]

    def magic_of(self, execution_id: str) -> int:
        return order_magic_for(uuid.UUID(execution_id), self.settings.magic)

    def row(self, execution_id: str) -> dict[str, Any]:
        with self.store.connection() as conn:
            row = self.store.load(conn, uuid.UUID(execution_id))
            assert row is not None
            return dict(row.values)


@contextmanager
def accounts_env(database_url: str, **settings: Any) -> Iterator[AccountsEnv]:
    base = load_settings({"DATABASE_URL": database_url, "MT5_SESSIONS": "1"})
    values = {"reconcile_grace_seconds": 0.05, "order_timeout_seconds": 2.0, **settings}
    config = base.model_copy(update=values)
    store = Store.open(database_url, max_size=10)
    store.migrate()
    alpha = Gate(_sim(1001, "Alpha-Demo"))
    beta = _sim(2002, "Beta-Demo")

    def opener(spec: SessionSpec) -> api.Terminal:
        terminal: Any = alpha if spec.account == ALPHA else beta
        return terminal  # type: ignore[no-any-return]

    pool = SessionPool(
        specs(),
        store.pool,
        gateway_factory(config),
        opener=opener,
        linger_seconds=config.session_linger_seconds,
    )
    try:
        yield AccountsEnv(config, store, alpha, beta, pool, Pipeline(config, store, pool))
    finally:
        alpha.open.set()
        pool.close()
        store.close()


def named(
    account: str | None, symbol: str = "EURUSD", direction: int = 1, units: float = 10_000.0
) -> dict[str, Any]:
    """An approval naming ``account`` (None: naming none)."""
    message = approval(symbol, direction, units)
    if account is not None:
        message["decision"]["account"] = account
    return message
