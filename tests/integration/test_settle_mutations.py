"""What a broker view that says too little must never settle (mutations a review showed
the suite let through).

- The last delivery before the queue's limit of a key whose row is UNKNOWN gets the
  recorded provisional answer, not a dead letter as if the execution were in flight.
- After the broker showed our order once, a reconcile answer that shows nothing of the
  execution (history lag, a flapping view) is no proof that nothing filled.
- A failed deals query by order ticket is never "no deals": the execution is not settled
  as unfilled on it.

The last two enter through ``Pipeline.resume`` of an in-flight row (the recovery sweep's
entry, which hands it to the settler), the terminal being the simulator with a thin wrapper
that scripts what each view of the account's history shows.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from schemas.identity import execution_id_for
from tests.integration.pipeline_env import PipelineEnv, approval, pipeline_env
from worker.execution.outcome import DeadLetter, Publish, Settling
from worker.mt5 import api
from worker.mt5.sim.terminal import FaultConfig, SimAccount, SimConfig, SimTerminal
from worker.store.store import ExecutionRow

# hardened, but without the server's own random query failures and deal lag: the wrapper
# below decides what each query shows
STEADY = SimConfig(
    account=SimAccount(balance=10_000_000.0),
    faults=FaultConfig(query_none_rate=0.0, deal_lag_ms=0.0, deal_lag_jitter_ms=0.0),
)
IN_FLIGHT = ("SUBMITTING", "SUBMITTED")


def _execution_id(message: dict[str, Any]) -> str:
    return str(execution_id_for(message["decision"]["order_id"]))


def _payload(outcome: Any) -> dict[str, Any]:
    assert isinstance(outcome, Publish), outcome
    document: dict[str, Any] = json.loads(outcome.payload)
    return document


def _load(env: PipelineEnv, execution_id: str) -> ExecutionRow:
    with env.store.connection() as conn:
        row = env.store.load(conn, uuid.UUID(execution_id))
    assert row is not None
    return row


# --- the last delivery of a key answered provisionally ------------------------------------


@pytest.fixture
def near_limit(new_database: Callable[[], str]) -> Iterator[PipelineEnv]:
    with pipeline_env(
        new_database(),
        STEADY,
        max_send_attempts=1,
        claim_timeout_seconds=0.2,
        delivery_limit=5,
        delivery_last_chances=2,
    ) as built:
        yield built


def test_the_last_delivery_of_an_unknown_execution_gets_its_provisional_answer(
    near_limit: PipelineEnv,
) -> None:
    env = near_limit
    message = approval("EURUSD", 1, 100_000.0)
    env.sim.set_faults(scripted=("timeout",))  # 10012, nothing executed (yet)
    provisional = _payload(env.deliver(message))
    assert provisional["provisional"] is True and provisional["version"] == 1
    assert env.row(_execution_id(message))["state"] == "UNKNOWN"

    with env.pool.claim(5.0):  # no session: this delivery would be requeued
        outcome = env.deliver(message, delivery_count=4)  # the last before the limit

    assert not isinstance(outcome, DeadLetter), outcome
    assert _payload(outcome) == provisional  # the answer on record, not IN_FLIGHT
    assert env.row(_execution_id(message))["state"] == "UNKNOWN"


# --- a view that says too little never settles an execution -------------------------------


class ScriptedViews:
    """What the simulated terminal shows, reconcile by reconcile.

    Each reconcile starts with ``orders_get(symbol=...)``; it then takes the next mode of
    ``script`` (the last mode stays once the script is used up). Modes:

    - ``full``: the terminal as it is;
    - ``lagging``: the deals do not show yet (by date range or by order ticket), the
      orders and the position do;
    - ``lost``: nothing of the execution shows (every list empty);
    - ``ticket_fails``: as ``lagging``, but the deals query by order ticket answers None
      (``last_error`` -2, the connection up), every time it is asked;
    - ``fails``: every query answers None.
    """

    FUNCTIONS = ("orders_get", "positions_get", "history_orders_get", "history_deals_get")

    def __init__(self, sim: SimTerminal, mode: str = "full") -> None:
        self.sim = sim
        self.mode = mode
        self.script: list[str] = []
        self.shown: list[str] = []  # the mode of each reconcile, in order
        self.ticket_failures = 0
        self.after_send: str | None = None  # the mode from the next order_send on
        for name in self.FUNCTIONS:
            setattr(sim, name, self._wrapped(name, getattr(sim, name)))
        send = sim.order_send

        def order_send(request: Any) -> Any:
            result = send(request)
            if self.after_send is not None:
                self.mode, self.after_send = self.after_send, None
            return result

        sim.order_send = order_send  # type: ignore[method-assign]

    def play(self, *modes: str) -> None:
        self.script = list(modes)
        self.shown = []

    def _wrapped(self, name: str, read: Callable[..., Any]) -> Callable[..., Any]:
        def query(*args: Any, **kwargs: Any) -> Any:
            if name == "orders_get" and "ticket" not in kwargs:  # a view (window) begins
                if self.script:
                    self.mode = self.script.pop(0)
                self.shown.append(self.mode)
            items = read(*args, **kwargs)
            if items is None or self.mode == "full":
                return items
            by_ticket = "ticket" in kwargs
            if self.mode == "fails" or (
                self.mode == "ticket_fails" and name == "history_deals_get" and by_ticket
            ):
                if self.mode == "ticket_fails":
                    self.ticket_failures += 1
                self.sim._fail(api.RES_E_INVALID_PARAMS, "Terminal: Invalid params")
                return None
            if name == "history_deals_get" or (self.mode == "lost" and not by_ticket):
                return ()
            return items

        return query


@pytest.fixture
def env(new_database: Callable[[], str]) -> Iterator[PipelineEnv]:
    with pipeline_env(new_database(), STEADY) as built:
        yield built


def _executed_in_flight(env: PipelineEnv, views: ScriptedViews) -> tuple[str, ExecutionRow]:
    """An order executed whose reply was lost, the terminal unable to say so at the time:
    the row is left in flight for the recovery sweep (``Pipeline.resume``)."""
    message = approval("EURUSD", 1, 100_000.0)
    env.sim.set_faults(scripted=("lost_reply",))  # executed; order_send answers None
    views.after_send = "fails"
    outcome = env.deliver(message)
    views.mode = "full"
    execution_id = _execution_id(message)
    row = _load(env, execution_id)
    assert row.state in IN_FLIGHT
    assert not isinstance(outcome, Publish), _payload(outcome)
    (deal,) = env.deals(execution_id)  # the order did execute
    assert deal.volume == pytest.approx(1.0)
    return execution_id, row


def _resumed(env: PipelineEnv, row: ExecutionRow) -> Any:
    """The recovery sweep's entry: the row goes to the settler, whose answer is awaited."""
    outcome = env.pipeline.resume(row)
    assert isinstance(outcome, Settling), outcome
    return env.pipeline.settler.wait_for(row.execution_id, 10.0) or outcome


def _not_settled_unfilled(
    env: PipelineEnv, execution_id: str, outcome: Any
) -> dict[str, Any] | None:
    """The execution is FILLED from the broker's deal, or still in flight: never settled
    with nothing filled. Returns the confirmation, if the execution was settled."""
    (deal,) = env.deals(execution_id)
    state = env.row(execution_id)["state"]
    if state in IN_FLIGHT:
        assert not isinstance(outcome, Publish), _payload(outcome)
        return None
    if isinstance(outcome, Publish):
        document = _payload(outcome)
    else:
        with env.store.connection() as conn:
            published = env.store.confirmation_of(conn, uuid.UUID(execution_id))
        assert published is not None, state
        document = json.loads(published.payload)
    settled = (document["status"], document["rejection_reason"], document["executed_lots"])
    assert settled == ("FILLED", None, pytest.approx(deal.volume)), settled
    assert document["broker_deals"] == [deal.ticket]
    assert state == "FILLED"
    return document


def test_a_view_that_loses_the_execution_again_is_not_settled_on(env: PipelineEnv) -> None:
    views = ScriptedViews(env.sim)
    execution_id, row = _executed_in_flight(env, views)
    # the broker shows our order and position, not yet the deal; the next answer shows
    # nothing of the execution at all; then everything
    views.play("lagging", "lost", "full")

    outcome = _resumed(env, row)

    assert "lost" in views.shown  # the flap was met ...
    document = _not_settled_unfilled(env, execution_id, outcome)  # ... and not settled on
    if document is not None:
        assert views.shown[-1] == "full"  # settled from the full view that came after it


def test_a_failed_deals_query_by_ticket_is_not_read_as_no_fills(env: PipelineEnv) -> None:
    views = ScriptedViews(env.sim)
    execution_id, row = _executed_in_flight(env, views)
    # our order and position show, the deal does not by date range, and the deals query
    # by the order's ticket fails (every retry); the next reconcile shows everything
    views.play("ticket_fails", "ticket_fails", "ticket_fails", "full")

    outcome = _resumed(env, row)

    assert views.ticket_failures > 0  # the failing query was met ...
    document = _not_settled_unfilled(env, execution_id, outcome)  # ... and not read as none
    if document is not None:
        assert views.shown[-1] == "full"
