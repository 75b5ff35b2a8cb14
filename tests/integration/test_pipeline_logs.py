"""Every line logged while handling a delivery carries the execution, the RPM order, the
symbol and the session (issue 18, item 14)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from schemas.identity import execution_id_for
from tests.integration.pipeline_env import PipelineEnv, approval, pipeline_env
from worker.execution.outcome import Requeue
from worker.mt5.sim.terminal import SimAccount, SimConfig
from worker.observability.logs import ContextFilter

RICH = SimConfig(account=SimAccount(balance=10_000_000.0))


@pytest.fixture
def env(new_database: Callable[[], str]) -> Iterator[PipelineEnv]:
    with pipeline_env(new_database(), RICH) as built:
        yield built


@pytest.fixture
def context_caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog whose records carry the log context, as the worker's own handler does."""
    caplog.handler.addFilter(ContextFilter())
    caplog.set_level(logging.INFO, logger="worker")
    return caplog


def _drop_database_connections(env: PipelineEnv) -> None:
    """Kill every other backend of the test database: the session lease's connection too."""
    url = env.settings.database_url.get_secret_value()
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


def test_a_database_requeue_after_the_claim_logs_the_execution_and_session(
    env: PipelineEnv, context_caplog: pytest.LogCaptureFixture
) -> None:
    real_account_info = env.sim.account_info

    def account_info_then_database_lost() -> Any:
        # during validation, under the lease: the database goes away before the intent
        _drop_database_connections(env)
        return real_account_info()

    env.sim.account_info = account_info_then_database_lost  # type: ignore[method-assign]
    message = approval("EURUSD", 1, 100_000.0)
    outcome = env.deliver(message)
    env.sim.account_info = real_account_info  # type: ignore[method-assign]

    assert isinstance(outcome, Requeue) and outcome.reason.startswith("database:")
    assert env.deals() == []  # the intent never committed: nothing was sent
    (line,) = [r for r in context_caplog.records if "database unavailable" in r.getMessage()]
    context: dict[str, str] = dict(line.context)  # type: ignore[attr-defined]
    order_id = message["decision"]["order_id"]
    assert context == {
        "execution_id": str(execution_id_for(order_id)),
        "order_id": order_id,
        "symbol": "EURUSD",
        "session": "sim-0",
    }
