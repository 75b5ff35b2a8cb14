"""Account routing (issue 20 part 1): account names of sessions, the routing rule, the
approval's ``decision.account`` field, bounded metric labels, back-of-queue properties."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pika
import pytest

from schemas import InvalidMessage, MessageProperties, parse_request
from schemas.enums import RejectionReason
from tests import samples
from worker.amqp.deliveries import ACCOUNT_WAITS_HEADER, back_of_queue_properties
from worker.config import ConfigError, load_settings
from worker.execution.checks import Routed, route
from worker.mt5.sessions import SessionSpec, accounts_of, load_session_specs
from worker.observability import metrics

PROPS = MessageProperties(content_type="application/json")


def _load(tmp_path: Path, text: str) -> list[SessionSpec]:
    path = tmp_path / "sessions.toml"
    path.write_text(text, encoding="utf-8")
    return load_session_specs(load_settings({"MT5_SESSIONS": str(path)}), {})


def _sim(session_id: str, **keys: str | int) -> str:
    lines = [f'id = "{session_id}"', 'backend = "sim"']
    lines += [f"{k} = {v!r}" if isinstance(v, int) else f'{k} = "{v}"' for k, v in keys.items()]
    return "[[sessions]]\n" + "\n".join(lines) + "\n"


# --- the account of a session ----------------------------------------------------------------


def test_an_account_is_its_alias_else_server_and_login_else_unnamed() -> None:
    assert SessionSpec(id="a", backend="sim", server="B-Demo", login=7).account == "B-Demo:7"
    aliased = SessionSpec(id="a", backend="sim", server="B-Demo", login=7, account="fund-1")
    assert aliased.account == "fund-1"
    assert SessionSpec(id="a", backend="sim", login=7).account is None
    assert SessionSpec(id="a", backend="sim").account is None


def test_terminals_of_one_account_are_sessions_of_that_account(tmp_path: Path) -> None:
    specs = _load(
        tmp_path,
        _sim("a1", server="B-Demo", login=1)
        + _sim("a2", server="B-Demo", login=1)
        + _sim("b1", account="fund-b", server="B-Demo", login=2)
        + _sim("b2", account="fund-b"),
    )
    assert [spec.account for spec in specs] == ["B-Demo:1", "B-Demo:1", "fund-b", "fund-b"]
    assert accounts_of(specs) == ("B-Demo:1", "fund-b")


def test_one_unnamed_account_needs_no_configuration() -> None:
    specs = load_session_specs(load_settings({"MT5_SESSIONS": "3"}), {})
    assert accounts_of(specs) == (None,)


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        (
            _sim("a", server="S", login=1) + _sim("b"),
            "with several accounts every session needs one",
        ),
        (
            _sim("a", server="S", login=1, account="x")
            + _sim("b", server="S", login=1, account="y"),
            "same account (S:1) under two names",
        ),
        (
            _sim("a", server="S", login=1, account="x") + _sim("b", server="S", login=1),
            "under two names",
        ),
        (
            _sim("a", server="S", login=1, account="x")
            + _sim("b", server="S", login=2, account="x"),
            "log in to different accounts",
        ),
    ],
)
def test_ambiguous_accounts_are_refused_at_start(tmp_path: Path, tables: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _load(tmp_path, tables)


# --- routing ---------------------------------------------------------------------------------


def test_one_account_takes_approvals_naming_none_or_it() -> None:
    assert route(None, ("S:1",)) == Routed("S:1")
    assert route("S:1", ("S:1",)) == Routed("S:1")
    assert route(None, (None,)) == Routed(None)


def test_a_name_that_is_not_configured_is_never_guessed() -> None:
    refused = route("S:2", ("S:1",))
    assert not isinstance(refused, Routed) and refused[0] is RejectionReason.ACCOUNT_UNKNOWN
    assert "S:1" in refused[1]
    unnamed = route("S:1", (None,))  # the one account has no name to compare with
    assert not isinstance(unnamed, Routed) and unnamed[0] is RejectionReason.ACCOUNT_UNKNOWN
    assert route("s:1", ("S:1", "S:2")) == (
        RejectionReason.ACCOUNT_UNKNOWN,
        "account 's:1' is not configured; configured: S:1, S:2",
    )


def test_several_accounts_need_the_approval_to_name_one() -> None:
    assert route("S:2", ("S:1", "S:2")) == Routed("S:2")
    refused = route(None, ("S:1", "S:2"))
    assert not isinstance(refused, Routed) and refused[0] is RejectionReason.ACCOUNT_REQUIRED


# --- the approval's field ----------------------------------------------------------------------


def _parse(account: object) -> str | None:
    message = samples.rpm_output()
    message["decision"]["account"] = account
    request = parse_request(samples.body(message), PROPS, received_at=datetime.now(UTC))
    return request.account


def test_decision_account_is_read_strictly() -> None:
    assert _parse("Broker-Demo:5012345") == "Broker-Demo:5012345"
    assert _parse(None) is None
    for bad in (5012345, "", "a\nb", "x" * 129, ["S:1"]):
        with pytest.raises(InvalidMessage) as info:
            _parse(bad)
        assert info.value.field == "decision.account"
        assert info.value.idempotency_key is not None  # refused with a confirmation


# --- metric labels ---------------------------------------------------------------------------


def test_the_account_label_is_bounded_by_the_configured_accounts() -> None:
    metrics.configure_accounts(("S:1", None, "fund-b"))
    try:
        assert [metrics.account_label(a) for a in ("S:1", "fund-b", None, "S:9")] == [
            "S:1",
            "fund-b",
            "none",
            "other",
        ]
    finally:
        metrics.configure_accounts(())


# --- back of the queue -------------------------------------------------------------------------


def test_a_copy_for_the_back_of_the_queue_keeps_the_message_and_counts_its_waits() -> None:
    original = pika.BasicProperties(
        message_id="m-1",
        correlation_id="c-1",
        reply_to="replies",
        content_type="application/json",
        headers={"x-delivery-count": 3, "trace": "t", ACCOUNT_WAITS_HEADER: 2},
        user_id="guest",
    )
    copy = back_of_queue_properties(original)
    assert (copy.message_id, copy.correlation_id, copy.reply_to) == ("m-1", "c-1", "replies")
    assert copy.delivery_mode == 2 and copy.user_id is None
    assert copy.headers == {"trace": "t", ACCOUNT_WAITS_HEADER: 3}
    first = back_of_queue_properties(pika.BasicProperties(message_id="m-2"))
    assert first.headers == {ACCOUNT_WAITS_HEADER: 1}
