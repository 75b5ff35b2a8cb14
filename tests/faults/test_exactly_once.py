"""Issue 18's interleavings against a real worker process, bridged terminals, RabbitMQ and
PostgreSQL: the slippage close whose reply is lost or whose final commit fails, an unknown
outcome that executes later, a session outage longer than the delivery limit allows, and
hostile safety flags mixed into a stream of approvals.

Time is compressed (small claim timeout, delivery limit, reconcile backoff); each test
says what it stands for. Run one test at a time:
``.venv/bin/pytest -m faults tests/faults/test_exactly_once.py::<test>``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from schemas.identity import execution_id_for
from tests.faults.conftest import MakeEnv
from tests.faults.harness import FaultEnv, Tally, approvals, sim_toml
from tests.security.hostile import refused_by_rpm, wrong_flag_type
from worker.mt5 import api
from worker.mt5.bridge.client import BridgeTerminal
from worker.store.migrate import apply_migrations

pytestmark = pytest.mark.faults

WAIT_SECONDS = 180.0
SLIPPED = "slippage_points = [[50, 1.0]]  # 5 pips on every fill: over the 2 pip limit\n"
# One terminal on a netting account, one execution at a time (no delivery held beyond the
# session's while one waits on the settler): on a netting account every execution moves the
# one position the close names, so overlapping executions of opposite sides could shrink it
# under a close (10038); that is not what these scenarios test (see the closing note of
# issue 26 on closes that name a netting position).
CLOSE = {"SLIPPAGE_POLICY": "close", "SETTLING_PREFETCH": "0"}


def _scripted(*outcomes: str) -> str:
    return "scripted = [" + ", ".join(f'"{outcome}"' for outcome in outcomes) + "]\n"


def _slipping(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Approvals on the market-execution symbols (GBPUSD is instant execution: no slippage)."""
    found: list[dict[str, Any]] = []
    while len(found) < count:
        found += [
            d
            for d in approvals(count, rng)
            if d["decision"]["approved_trade"]["symbol"] != "GBPUSD"
        ]
    return found[:count]


def _wait(condition: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


# --- item 1: the slippage close is never sent twice ---------------------------------------


def test_slippage_close_with_lost_replies(
    make_env: MakeEnv, record: Callable[[Tally], None]
) -> None:
    count = 12
    faults = SLIPPED + _scripted(*(["ok", "lost_reply"] * count))  # every close's reply lost
    env = make_env([sim_toml(81, faults)], settings=CLOSE)
    keys = env.publish(_slipping(count, random.Random(81)))
    worker = env.start_worker()
    env.wait_confirmed(keys, WAIT_SECONDS, worker)
    assert worker.stop() == 0, worker.tail()
    tally = env.check(
        "slippage close, close reply lost",
        keys,
        notes="SLIPPAGE_POLICY=close, 5 pips slippage on every fill, every close's reply lost;"
        " netting account",
    )
    assert tally.by_state == {"CANCELLED": count}, tally.by_state
    record(tally)


def test_slippage_close_with_a_failed_final_commit(
    make_env: MakeEnv, record: Callable[[Tally], None], note: Callable[[str], None]
) -> None:
    count = 12
    env = make_env([sim_toml(82, SLIPPED)], settings=CLOSE)
    failed = _fail_commits_right_after_the_close(env)
    keys = env.publish(_slipping(count, random.Random(82)))
    worker = env.start_worker()
    env.wait_confirmed(keys, WAIT_SECONDS, worker)
    assert worker.stop() == 0, worker.tail()
    injected = failed()
    tally = env.check(
        "slippage close, final commit failed",
        keys,
        notes=f"SLIPPAGE_POLICY=close, 5 pips slippage on every fill; {injected} final"
        " commits refused by a trigger right after the close",
    )
    assert injected > 0
    assert tally.by_state == {"CANCELLED": count}, tally.by_state
    note(
        "slippage close, final commit failed: a trigger refuses a CANCELLED row committed"
        " within 800 ms of its closing stage (the first handling); the redelivery, a requeue"
        " delay later, commits"
    )
    record(tally)


def _fail_commits_right_after_the_close(env: FaultEnv) -> Callable[[], int]:
    """A real commit failure: the database refuses the first handling's final row (it
    comes right after the closing stage); a sequence counts the refusals (sequences are
    not rolled back)."""
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        apply_migrations(conn)
        conn.execute("CREATE SEQUENCE public.refused_commits")
        conn.execute(
            "CREATE FUNCTION public.refuse_commit() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.state = 'CANCELLED' AND OLD.closing_sent_at IS NOT NULL"
            " AND now() - OLD.closing_sent_at < interval '800 milliseconds' THEN"
            " PERFORM nextval('public.refused_commits');"
            " RAISE EXCEPTION 'fault suite: final commit refused'; END IF;"
            " RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse_commit BEFORE UPDATE ON execution.executions"
            " FOR EACH ROW EXECUTE FUNCTION public.refuse_commit()"
        )

    def refused() -> int:
        with psycopg.connect(env.database_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM public.refused_commits"
            ).fetchone()
        return int(row[0]) if row else 0

    return refused


# --- item 3: an unknown outcome that executes later ---------------------------------------


def test_unknown_outcomes_that_execute_later_are_corrected(
    make_env: MakeEnv, record: Callable[[Tally], None]
) -> None:
    count = 8
    env = make_env(
        [sim_toml(83, _scripted(*(["timeout"] * count)))],  # 10012, nothing executed yet
        settings={
            "MAX_SEND_ATTEMPTS": "1",
            "UNKNOWN_RECONCILE_FIRST_SECONDS": "1",
            "UNKNOWN_RECONCILE_MAX_SECONDS": "4",
        },
    )
    keys = env.publish(approvals(count, random.Random(83)))
    worker = env.start_worker()
    env.wait_confirmed(keys, WAIT_SECONDS, worker)  # the provisional answers
    rows = env.query(
        "SELECT execution_id, state, broker_symbol, direction, intended_lots, magic,"
        " comment_token FROM execution.executions"
    )
    assert {row[1] for row in rows} == {"UNKNOWN"}, rows
    # "minutes later" (compressed): the broker executes every one of those orders
    terminal = BridgeTerminal(env.terminals[0].address, env.secret, timeout=30)
    assert terminal.initialize()
    for _, _, symbol, direction, lots, magic, token in rows:
        tick = terminal.symbol_info_tick(symbol)
        assert tick is not None
        buy = direction == 1
        result = terminal.order_send(
            {
                "action": api.TRADE_ACTION_DEAL,
                "symbol": symbol,
                "volume": lots,
                "type": api.ORDER_TYPE_BUY if buy else api.ORDER_TYPE_SELL,
                "price": tick.ask if buy else tick.bid,
                "deviation": 100,
                "magic": magic,
                "comment": token,
                "type_filling": api.ORDER_FILLING_FOK,  # allowed under every execution mode
            }
        )
        assert result is not None and result.retcode == api.TRADE_RETCODE_DONE, result
    terminal.shutdown()
    corrected = {f"{execution_id_for(key)}:v2" for key in keys}
    _wait(lambda: corrected <= env.broker_side.confirmed_keys(), "the corrected versions")
    assert worker.stop() == 0, worker.tail()
    tally = env.check(
        "unknown outcome, executed later",
        keys,
        notes="10012 with nothing executed, one send allowed: provisional FAILED; the orders"
        " executed later (seconds here, minutes in life): version 2 FILLED from the deals",
    )
    assert tally.by_state == {"FILLED": count}, tally.by_state
    record(tally)


# --- item 7: a session outage with approvals in hand --------------------------------------


def _stale(document: dict[str, Any]) -> dict[str, Any]:
    old = (datetime.now(UTC) - timedelta(seconds=1000)).replace(tzinfo=None).isoformat()
    document["decision"]["approved_trade"]["timestamp"] = old
    return document


def test_a_session_outage_with_approvals_in_hand(
    make_env: MakeEnv, record: Callable[[Tally], None]
) -> None:
    """Stands for a 3-minute outage with the defaults (5 s claim, 1 s requeue delay, limit
    20: about 2 minutes to the dead letter): a 0.5 s claim and a delivery limit of 4 take
    each approval to its last deliveries in seconds while the terminal stays down."""
    env = make_env([sim_toml(84)], delivery_limit=4, settings={"CLAIM_TIMEOUT_SECONDS": "0.5"})
    rng = random.Random(84)
    env.terminals[0].kill()  # the outage: the only terminal is gone
    during = env.publish(approvals(16, rng) + [_stale(d) for d in approvals(4, rng)])
    worker = env.start_worker()
    env.wait_confirmed(during, WAIT_SECONDS, worker)  # every approval answered, no session
    env.terminals[0].start()
    after = env.publish(approvals(8, rng))
    env.wait_confirmed(after, WAIT_SECONDS, worker)
    assert worker.stop() == 0, worker.tail()
    keys = during + after
    tally = env.check(
        "session outage with approvals in hand",
        keys,
        notes="the only terminal down while 20 approvals (4 stale) cycle to their last"
        " deliveries; then 8 more once it is back",
    )
    reasons = {
        row[0]
        for row in env.query(
            "SELECT rejection_reason FROM execution.executions WHERE idempotency_key = ANY(%s)",
            during,
        )
    }
    assert reasons <= {"SESSION_UNAVAILABLE", "STALE_APPROVAL"}, reasons
    assert tally.by_state.get("REJECTED", 0) == len(during), tally.by_state
    assert tally.by_state.get("FILLED", 0) == len(after), tally.by_state
    record(tally)


# --- item 6 in a stream: hostile safety flags ---------------------------------------------


def test_mixed_hostile_flags(make_env: MakeEnv, record: Callable[[Tally], None]) -> None:
    rng = random.Random(85)
    env = make_env([sim_toml(85)])
    hostile = [json.loads(wrong_flag_type(rng)[0]) for _ in range(24)]
    hostile += [json.loads(refused_by_rpm(rng)[0]) for _ in range(8)]
    valid = approvals(24, rng)
    documents = valid + hostile
    rng.shuffle(documents)
    keys = env.publish(documents)
    worker = env.start_worker()
    env.wait_confirmed(keys, WAIT_SECONDS, worker)
    assert worker.stop() == 0, worker.tail()
    tally = env.check(
        "mixed hostile flags",
        keys,
        notes="24 approvals mixed with 24 kill switch / halt flags of the wrong JSON type"
        " and 8 refusals by the RPM's own flags",
    )
    refused = {str(d["decision"]["order_id"]) for d in hostile}
    states = dict(
        env.query(
            "SELECT idempotency_key, state FROM execution.executions"
            " WHERE idempotency_key = ANY(%s)",
            sorted(refused),
        )
    )
    assert set(states.values()) == {"REJECTED"}, states
    assert tally.by_state.get("FILLED", 0) + tally.by_state.get("REJECTED", 0) == len(keys)
    record(tally)
