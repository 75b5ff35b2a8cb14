"""End to end with ``MT5_BACKEND=native``: the pipeline's session opens ``NativeTerminal()``,
which imports ``MetaTrader5`` (the real package over the ``_core`` double and a simulator)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from schemas.identity import order_magic_for
from tests.integration.pipeline_env import PipelineEnv, always_open, approval
from tests.native import core_double
from tests.native.package import over
from tests.simbooks import broker_deals
from worker.config import load_settings
from worker.execution.outcome import Publish, Requeue
from worker.execution.pipeline import Pipeline
from worker.mt5 import api
from worker.mt5.native import NativeTerminal
from worker.mt5.sessions import load_session_specs
from worker.mt5.sim.terminal import SimAccount, SimConfig, SimTerminal
from worker.pool.pool import SessionPool
from worker.service import gateway_factory
from worker.store.store import Store

pytestmark = pytest.mark.integration

ACCOUNT = SimAccount(balance=10_000_000.0, password="native-secret")


@pytest.fixture
def password() -> str:
    return "native-secret"


@pytest.fixture
def env(new_database: Callable[[], str], password: str) -> Iterator[PipelineEnv]:
    database_url = new_database()
    sim = SimTerminal(always_open(SimConfig(account=ACCOUNT)))  # not initialized: the pool does
    over(sim)
    environ = {
        "DATABASE_URL": database_url,
        "MT5_BACKEND": "native",
        "MT5_SESSIONS": "1",
        "MT5_LOGIN": str(ACCOUNT.login),
        "MT5_SERVER": ACCOUNT.server,
        "MT5_PASSWORD": password,
    }
    settings = load_settings(environ).model_copy(
        update={
            "reconcile_grace_seconds": 0.05,
            "order_timeout_seconds": 2.0,
            "claim_timeout_seconds": 2.0,
        }
    )
    specs = load_session_specs(settings, environ)
    assert [(spec.id, spec.backend) for spec in specs] == [("native-0", "native")]
    store = Store.open(database_url, max_size=6)
    store.migrate()
    pool = SessionPool(
        specs,
        store.pool,
        gateway_factory(settings),
        linger_seconds=settings.session_linger_seconds,
        reconnect_backoff=(0.05, 0.5),
    )
    try:
        yield PipelineEnv(settings, store, sim, pool, Pipeline(settings, store, pool))
    finally:
        pool.close()
        store.close()
        core_double.bind(None)


def _deals_of_order(sim: SimTerminal, order: int) -> tuple[api.TradeDeal, ...]:
    """From the simulator's books: its queries fail some answers and show deals late on
    purpose, and a reply that names its deal is confirmed before they show."""
    return tuple(deal for deal in broker_deals(sim) if deal.order == order)


def _recorded_sends(monkeypatch: pytest.MonkeyPatch, mt5: ModuleType) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    real_send = mt5.order_send

    def order_send(request: dict[str, Any]) -> Any:
        sent.append(dict(request))
        return real_send(request)

    monkeypatch.setattr(mt5, "order_send", order_send)
    return sent


def test_approvals_fill_and_confirm_through_the_real_package(
    env: PipelineEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    import MetaTrader5  # the package NativeTerminal() loads: the wheel's own __init__.py

    assert MetaTrader5.order_send.__module__ == core_double.__name__
    sent = _recorded_sends(monkeypatch, MetaTrader5)
    messages = [
        approval("EURUSD", 1, 100_000.0),
        approval("USDJPY", -1, 50_000.0),
        approval("EURUSD", -1, 30_000.0),
    ]
    for message in messages:
        confirmation = env.confirm(message)
        assert confirmation["status"] == "FILLED", confirmation
        assert confirmation["session_id"] == "native-0"
        row = env.row(confirmation["execution_id"])
        assert row["state"] == "FILLED"
        [deal] = _deals_of_order(env.sim, row["broker_order"])
        assert confirmation["broker_deals"] == [deal.ticket]
        assert confirmation["executed_lots"] == deal.volume
        assert confirmation["fill_price"] == deal.price
        execution_id = uuid.UUID(confirmation["execution_id"])
        assert deal.magic == order_magic_for(execution_id, env.settings.magic) == row["magic"]
    assert [request["symbol"] for request in sent] == ["EURUSD", "USDJPY", "EURUSD"]
    assert all(type(request["volume"]) is float for request in sent)
    assert all(type(request["price"]) is float for request in sent)
    # a redelivery answers from the store: no fourth order
    again = env.deliver(messages[0], redelivered=True)
    assert isinstance(again, Publish) and len(sent) == 3


def test_the_session_logs_in_with_the_configured_account(env: PipelineEnv) -> None:
    confirmation = env.confirm(approval("EURUSD", 1, 10_000.0))
    assert confirmation["status"] == "FILLED"
    info = NativeTerminal().account_info()  # the process-wide module the session uses
    assert info is not None and info.login == ACCOUNT.login and info.server == ACCOUNT.server


@pytest.mark.parametrize("password", ["wrong-secret"])
def test_a_refused_login_sends_nothing_and_keeps_the_approval(
    env: PipelineEnv, caplog: pytest.LogCaptureFixture
) -> None:
    outcome = env.deliver(approval("EURUSD", 1, 10_000.0))
    assert isinstance(outcome, Requeue), outcome
    assert env.sim.initialize(login=ACCOUNT.login, password="native-secret")  # look inside
    assert env.sim.history_deals_get(0, 2**31 - 1) == ()
    assert env.sim.orders_get() == ()
    assert "wrong-secret" not in caplog.text
