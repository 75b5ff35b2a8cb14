"""Account routing on real PostgreSQL (and RabbitMQ, through the runtime): two accounts with
two terminals each (tests/integration/accounts_env.py).

- an approval executes only on the account it names, on one of that account's sessions;
- naming no account, or an unknown one, is refused with its own reason, before any session;
- terminals of one account share its positions: a hedging close finds a position opened
  through the account's other terminal;
- a busy account (its order_send held shut) does not stop the other: through the AMQP
  runtime, the other account's approvals complete while the busy one's still wait.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from schemas.identity import execution_id_for
from tests.integration.accounts_env import (
    ALPHA,
    ALPHA_SESSIONS,
    BETA,
    BETA_SESSIONS,
    AccountsEnv,
    accounts_env,
    named,
)
from tests.integration.pipeline_env import approval, pipeline_env
from tests.integration.test_amqp_support import Broker, Running, ready_count, wait_until
from tests.simbooks import broker_deals
from worker.amqp.runtime import AmqpRuntime, RuntimeOptions
from worker.amqp.topology import DEAD_QUEUE
from worker.cli import main as cli_main
from worker.execution.outcome import Publish, Requeue
from worker.mt5 import api
from worker.mt5.sessions import SessionSpec
from worker.pool.leases import ClaimTimeout, UnknownAccount
from worker.pool.pool import SessionPool
from worker.service import gateway_factory
from worker.store.reports import RangeFilter, executions_in_range


@pytest.fixture
def env(new_database: Callable[[], str]) -> Iterator[AccountsEnv]:
    with accounts_env(new_database(), claim_timeout_seconds=0.3) as made:
        yield made


def _confirmation(outcome: Any) -> dict[str, Any]:
    assert isinstance(outcome, Publish), outcome
    document: dict[str, Any] = json.loads(outcome.payload)
    return document


def _executions(account: str, status: str, reason: str) -> float:
    labels = {"account": account, "status": status, "reason": reason}
    return REGISTRY.get_sample_value("execution_worker_executions_total", labels) or 0.0


def test_an_approval_executes_only_on_the_account_it_names(env: AccountsEnv) -> None:
    filled_alpha = _executions(ALPHA, "filled", "none")
    sent: dict[str, list[dict[str, Any]]] = {ALPHA: [], BETA: []}
    for account in (ALPHA, BETA, BETA, ALPHA, BETA):
        sent[account].append(_confirmation(env.deliver(named(account))))

    for account, sessions, terminal, other in (
        (ALPHA, ALPHA_SESSIONS, env.alpha, env.beta),
        (BETA, BETA_SESSIONS, env.beta, env.alpha),
    ):
        for confirmation in sent[account]:
            assert confirmation["status"] == "FILLED"
            assert confirmation["account"] == account
            assert confirmation["session_id"] in sessions
            token = env.magic_of(confirmation["execution_id"])
            assert env.magics(terminal).count(token) == 1  # one deal, on its own account
            assert token not in env.magics(other)
            row = env.row(confirmation["execution_id"])
            assert (row["account"], row["session_id"]) == (account, confirmation["session_id"])
    assert sent[ALPHA][0]["account_login"] == 1001 and sent[BETA][0]["account_login"] == 2002
    assert _executions(ALPHA, "filled", "none") == filled_alpha + 2

    # trail --account: by the account's name, or by its login
    with env.store.connection() as conn:
        rows_beta = executions_in_range(conn, _range(account=BETA))
        rows_login = executions_in_range(conn, _range(account="1001"))
    assert {row["account"] for row in rows_beta} == {BETA} and len(rows_beta) == 3
    assert {row["account"] for row in rows_login} == {ALPHA} and len(rows_login) == 2


def _range(**filters: Any) -> RangeFilter:
    now = datetime.now(UTC)
    return RangeFilter(since=now - timedelta(hours=1), until=now + timedelta(hours=1), **filters)


@pytest.mark.parametrize(
    ("account", "reason", "label"),
    [(None, "ACCOUNT_REQUIRED", "none"), ("Gamma-Demo:3", "ACCOUNT_UNKNOWN", "other")],
)
def test_naming_no_account_or_an_unknown_one_is_refused_never_guessed(
    env: AccountsEnv, account: str | None, reason: str, label: str
) -> None:
    counted = _executions(label, "rejected", reason)
    confirmation = _confirmation(env.deliver(named(account)))
    assert (confirmation["status"], confirmation["rejection_reason"]) == ("REJECTED", reason)
    assert confirmation["account"] == account and confirmation["session_id"] is None
    assert env.magics(env.alpha) == [] and env.magics(env.beta) == []
    row = env.row(confirmation["execution_id"])
    assert (row["state"], row["rejection_reason"], row["account"]) == ("REJECTED", reason, account)
    assert _executions(label, "rejected", reason) == counted + 1


def test_one_account_needs_no_name_and_refuses_another(new_database: Callable[[], str]) -> None:
    with pipeline_env(new_database()) as single:
        assert single.confirm(approval())["status"] == "FILLED"
        message = approval()
        message["decision"]["account"] = "Alpha-Demo:1001"
        refused = single.confirm(message)  # the one account has no name to check it against
        assert refused["rejection_reason"] == "ACCOUNT_UNKNOWN"


def _positions(terminal: Any) -> tuple[Any, ...]:
    """The terminal's EURUSD positions; a None (the hardened server fails some queries) is
    asked again, never read as "none open"."""
    for _ in range(20):
        positions = terminal.positions_get(symbol="EURUSD")
        if positions is not None:
            return tuple(positions)
    raise AssertionError("positions_get kept failing")


def test_terminals_of_one_account_share_its_positions(env: AccountsEnv) -> None:
    """Hedging account: a sell through alpha-2 closes the buy opened through alpha-1."""
    with env.pool.claim(5.0, session_id="alpha-2"):
        bought = _confirmation(env.deliver(named(ALPHA, units=100_000.0)))
    assert bought["session_id"] == "alpha-1"
    (position,) = _positions(env.alpha)
    assert position.type == api.POSITION_TYPE_BUY
    with env.pool.claim(5.0, session_id="alpha-1"):
        sold = _confirmation(env.deliver(named(ALPHA, direction=-1, units=100_000.0)))
    assert (sold["session_id"], sold["status"]) == ("alpha-2", "FILLED")
    assert _positions(env.alpha) == ()  # closed, not hedged
    closing = [d for d in broker_deals(env.alpha.sim) if d.order == sold["broker_order"]]
    # the position's identifier (its ticket may differ on the hardened server)
    assert [deal.position_id for deal in closing] == [position.identifier]


def test_a_busy_account_waits_for_its_own_sessions(env: AccountsEnv) -> None:
    """Both alpha sessions held: an alpha approval goes to the back of the queue (beta's
    free sessions are never used for it); one already past its TTL is refused instead."""
    with env.pool.claim(5.0, session_id="alpha-1"), env.pool.claim(5.0, session_id="alpha-2"):
        waiting = env.deliver(named(ALPHA))
        assert waiting == Requeue(f"no MT5 session of account {ALPHA} available", to_back=True)
        stale = named(ALPHA)
        old = datetime.now(UTC) - timedelta(seconds=env.settings.approval_ttl_seconds + 5)
        stale["decision"]["approved_trade"]["timestamp"] = old.replace(tzinfo=None).isoformat()
        refused = _confirmation(env.deliver(stale))
        assert refused["rejection_reason"] == "STALE_APPROVAL"
        assert _confirmation(env.deliver(named(BETA)))["status"] == "FILLED"
    assert env.magics(env.alpha) == [] and len(env.magics(env.beta)) == 1


def test_one_account_busy_does_not_stop_the_other_through_the_runtime(
    new_vhost: Callable[[], str], new_database: Callable[[], str]
) -> None:
    url = new_vhost()
    with accounts_env(new_database(), claim_timeout_seconds=0.3) as env:
        options = RuntimeOptions(
            prefetch=env.pool.size,  # 4: as the service sets it, one per session
            # waiting for a busy account must not count as failing: a nack-requeue would
            # dead-letter alpha's waiting approvals after two trips
            delivery_limit=2,
            requeue_delay_seconds=0.1,
            sweep_interval_seconds=1.0,
        )
        runtime = AmqpRuntime(url, env.pipeline.handle, env.store, options)
        running = Running(runtime).start()
        side = Broker(url)
        side.bind_confirmations("observer")
        try:
            env.alpha.open.clear()  # alpha's broker answers no order_send: alpha is busy
            alpha_ids = [_publish(side, named(ALPHA)) for _ in range(6)]
            beta_ids = [_publish(side, named(BETA)) for _ in range(4)]
            refused_ids = [_publish(side, named(None)), _publish(side, named("Gamma-Demo:3"))]

            got = _take(side, set(beta_ids) | set(refused_ids))
            # beta's approvals, queued behind six of alpha's, are done; alpha's still wait
            assert all(got[key]["status"] == "FILLED" for key in beta_ids)
            assert [got[key]["rejection_reason"] for key in refused_ids] == [
                "ACCOUNT_REQUIRED",
                "ACCOUNT_UNKNOWN",
            ]
            # one order held on each alpha terminal (reached while beta's went through)
            wait_until(lambda: env.alpha.waiting == 2, "an order held on each alpha terminal")
            assert env.magics(env.alpha) == []
            assert runtime.stats.requeued_to_back > 0  # waiting alpha approvals went back
            early = {m.properties.message_id for m in side.drain("observer")}
            assert not early & set(alpha_ids)  # nothing of alpha's confirmed yet

            env.alpha.open.set()
            got.update(_take(side, set(alpha_ids)))
            assert ready_count(url, DEAD_QUEUE) == 0
        finally:
            env.alpha.open.set()
            side.close()
            running.stop()
        for keys, account, sessions in (
            (alpha_ids, ALPHA, ALPHA_SESSIONS),
            (beta_ids, BETA, BETA_SESSIONS),
        ):
            for key in keys:
                assert got[key]["status"] == "FILLED"
                assert (got[key]["account"], got[key]["session_id"] in sessions) == (account, True)
        alpha_deals = env.magics(env.alpha)
        beta_deals = env.magics(env.beta)
        for key in alpha_ids:
            token = env.magic_of(key)
            assert alpha_deals.count(token) == 1 and token not in beta_deals  # once, on alpha
        for key in beta_ids:
            token = env.magic_of(key)
            assert beta_deals.count(token) == 1 and token not in alpha_deals


def _publish(side: Broker, message: dict[str, Any]) -> str:
    order_id = message["decision"]["order_id"]
    side.publish(json.dumps(message).encode(), message_id=order_id)
    return str(execution_id_for(order_id))


def _take(side: Broker, keys: set[str]) -> dict[str, dict[str, Any]]:
    """One confirmation per key (copies from the outbox sweep are skipped)."""
    got: dict[str, dict[str, Any]] = {}
    wanted = set(keys)

    def more() -> bool:
        for message in side.drain("observer"):
            key = message.properties.message_id
            if key in wanted:
                wanted.discard(key)
                got[key] = json.loads(message.body)
        return not wanted

    wait_until(more, f"{len(keys)} confirmations", seconds=60.0)
    return got


def test_trail_shows_and_filters_by_account(
    env: AccountsEnv, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    alpha = _confirmation(env.deliver(named(ALPHA)))
    beta = _confirmation(env.deliver(named(BETA)))
    monkeypatch.setenv("DATABASE_URL", env.settings.database_url.get_secret_value())
    monkeypatch.delenv("WORKER_CONFIG", raising=False)

    assert cli_main(["trail", beta["execution_id"]]) == 0
    out = capsys.readouterr().out
    assert f"session {beta['session_id']}  account {BETA}  login 2002" in out

    assert cli_main(["trail", "--since", "1h", "--account", BETA]) == 0
    listed = capsys.readouterr().out
    assert beta["session_id"] in listed and alpha["session_id"] not in listed
    assert cli_main(["trail", "--since", "1h", "--account", "1001", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [row["execution_id"] for row in document["executions"]] == [alpha["execution_id"]]


def test_a_claim_names_a_configured_account_and_a_terminal_must_be_logged_in_to_it(
    env: AccountsEnv,
) -> None:
    with pytest.raises(UnknownAccount):
        env.pool.claim(0.1, account="Gamma-Demo:3")
    with env.pool.claim(1.0, account=BETA) as lease:
        assert lease.session.id in BETA_SESSIONS
    # a session configured for one login whose terminal reports another is never used
    wrong = SessionSpec(id="wrong", backend="sim", login=2002, server="Beta-Demo")
    pool = SessionPool(
        [wrong], env.store.pool, gateway_factory(env.settings), opener=lambda _spec: env.alpha.sim
    )
    try:
        (health,) = pool.health().sessions
        assert health.state != "idle" and "logged in to Alpha-Demo:1001" in (
            health.last_error or ""
        )
        with pytest.raises(ClaimTimeout):
            pool.claim(0.2, account="Beta-Demo:2002")
    finally:
        pool.close()
