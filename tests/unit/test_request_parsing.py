from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas import (
    DecisionStatus,
    ExecutionRequest,
    InvalidMessage,
    MessageProperties,
    comment_token_for,
    execution_id_for,
    parse_request,
)
from tests import samples

NOW = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)
PROPS = MessageProperties(content_type="application/json")


def parse(raw: bytes, props: MessageProperties = PROPS, **kw: Any) -> ExecutionRequest:
    return parse_request(raw, props, received_at=NOW, **kw)


def invalid(raw: bytes, props: MessageProperties = PROPS, **kw: Any) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as info:
        parse(raw, props, **kw)
    return info.value


def test_full_rpm_output_is_parsed() -> None:
    message = samples.rpm_output()
    request = parse(samples.body(message))
    assert request.shape == "rpm_output"
    assert request.status is DecisionStatus.APPROVED
    assert request.idempotency_key == message["decision"]["order_id"]
    assert request.execution_id == execution_id_for(message["decision"]["order_id"])
    assert request.trade is not None and request.trade.position_units == 95_000.0
    assert request.trade.direction == 1 and request.symbol == "EURUSD"
    assert request.decided_at.tzinfo is not None
    assert not request.kill_switch and not request.trading_halted


def test_bare_decision_is_parsed() -> None:
    request = parse(samples.body(samples.decision(status="ADJUSTED")))
    assert request.shape == "decision"
    assert request.status is DecisionStatus.ADJUSTED


def test_rejected_decision_carries_no_trade() -> None:
    request = parse(samples.body(samples.rpm_output(samples.decision(status="REJECTED"))))
    assert request.status is DecisionStatus.REJECTED and request.trade is None


def test_kill_switch_and_halt_are_read() -> None:
    message = samples.rpm_output(samples.decision(kill_switch=True), halted=True)
    request = parse(samples.body(message))
    assert request.kill_switch and request.kill_switch_reason == "daily drawdown limit"
    assert request.trading_halted and request.halt_reason == "daily loss"


def test_naive_timestamp_is_utc_and_aware_is_converted() -> None:
    trade = samples.approved_trade(timestamp="2026-11-25T10:00:00.123456")
    request = parse(samples.body(samples.decision(trade=trade)))
    assert request.decided_at == datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC)
    trade = samples.approved_trade(timestamp="2026-11-25T12:00:00+02:00")
    request = parse(samples.body(samples.decision(trade=trade)))
    assert request.decided_at == datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    assert request.decided_at.utcoffset() == timedelta(0)
    assert request.decided_at.tzinfo is UTC


def test_unknown_extra_fields_are_tolerated_and_kept() -> None:
    message = samples.rpm_output()
    message["brand_new_field"] = {"x": 1}
    message["decision"]["approved_trade"]["kelly_fraction"] = 0.2
    request = parse(samples.body(message))
    assert request.trade is not None
    assert request.trade.model_extra == {
        key: value
        for key, value in message["decision"]["approved_trade"].items()
        if key not in type(request.trade).model_fields
    }


def test_message_id_is_the_key_when_order_id_is_null() -> None:
    raw = samples.body(samples.decision(order_id=None))
    request = parse(raw, MessageProperties(message_id="amqp-42"))
    assert request.idempotency_key == "amqp-42" and request.rpm_order_id is None


def test_order_id_wins_over_message_id() -> None:
    message = samples.decision(order_id="rpm-1")
    request = parse(samples.body(message), MessageProperties(message_id="other"))
    assert request.idempotency_key == "rpm-1"


def test_reply_to_and_correlation_id_come_from_properties() -> None:
    props = MessageProperties(reply_to="replies", correlation_id="c-1")
    request = parse(samples.body(samples.decision(order_id="rpm-2")), props)
    assert request.reply_to == "replies" and request.correlation_id == "c-1"


def test_comment_token_is_a_valid_mt5_comment() -> None:
    token = comment_token_for(execution_id_for("rpm-1"))
    assert len(token) <= 26 and token.isascii() and token.isalnum()
    assert token == comment_token_for(execution_id_for("rpm-1"))
    assert token != comment_token_for(execution_id_for("rpm-2"))


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "empty_body"),
        (b"\xff\xfe\x00garbage", "not_utf8"),
        (b"{not json", "not_json"),
        (b"[1, 2, 3]", "not_an_object"),
        (b'{"hello": 1}', "unknown_shape"),
        (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
    ],
)
def test_undecodable_bodies_are_typed_errors(raw: bytes, code: str) -> None:
    error = invalid(raw)
    assert error.code == code and error.field == "body"
    assert error.idempotency_key is None


def test_undecodable_body_keeps_the_message_id_as_key() -> None:
    error = invalid(b"{not json", MessageProperties(message_id="m-9"))
    assert error.idempotency_key == "m-9"
    assert error.execution_id == execution_id_for("m-9")


def _with_trade(**changes: Any) -> bytes:
    message = samples.rpm_output()
    message["decision"]["order_id"] = "rpm-bad"
    message["decision"]["approved_trade"].update(changes)
    return samples.body(message)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"position_units": -5.0}, "decision.approved_trade.position_units"),
        ({"position_units": 0}, "decision.approved_trade.position_units"),
        ({"position_units": "many"}, "decision.approved_trade.position_units"),
        ({"direction": 0}, "decision.approved_trade.direction"),
        ({"direction": 2}, "decision.approved_trade.direction"),
        ({"symbol": ""}, "decision.approved_trade.symbol"),
        ({"symbol": "EURUSD "}, "decision.approved_trade.symbol"),
        ({"symbol": "EURUSD\u00a0"}, "decision.approved_trade.symbol"),
        ({"symbol": 42}, "decision.approved_trade.symbol"),
        ({"timestamp": "yesterday"}, "decision.approved_trade.timestamp"),
    ],
)
def test_bad_fields_name_the_field_and_keep_the_key(changes: dict[str, Any], field: str) -> None:
    error = invalid(_with_trade(**changes))
    assert error.field == field, error
    assert error.idempotency_key == "rpm-bad"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(constant: str) -> None:
    text = json.dumps(samples.decision(order_id="rpm-n")).replace("95000.0", constant)
    error = invalid(text.encode())
    assert error.code == "not_json" and constant.lstrip("-") in error.detail


def test_duplicate_keys_are_refused() -> None:
    error = invalid(b'{"status": "APPROVED", "status": "REJECTED"}')
    assert error.code == "not_json" and "duplicate key 'status'" in error.detail


def test_wrong_types_are_named() -> None:
    message = samples.decision(order_id="rpm-t")
    message["kill_switch_triggered"] = "maybe"
    error = invalid(samples.body(message))
    assert error.field == "decision.kill_switch_triggered"


def test_missing_key_without_message_id_cannot_be_executed() -> None:
    error = invalid(samples.body(samples.decision(order_id=None)))
    assert error.code == "missing_idempotency_key" and error.idempotency_key is None


def test_missing_key_with_message_id_uses_it() -> None:
    request = parse(
        samples.body(samples.decision(order_id=None)), MessageProperties(message_id="x")
    )
    assert request.idempotency_key == "x"


def test_approval_without_a_trade_is_invalid() -> None:
    message = samples.decision(order_id="rpm-e")
    message["approved_trade"] = None
    error = invalid(samples.body(message))
    assert error.field == "decision.approved_trade" and error.idempotency_key == "rpm-e"


def test_missing_required_trade_field_is_named() -> None:
    message = samples.decision(order_id="rpm-m")
    del message["approved_trade"]["position_units"]
    error = invalid(samples.body(message))
    assert error.field == "decision.approved_trade.position_units"


def test_approval_without_any_timestamp_is_invalid() -> None:
    message = samples.decision(order_id="rpm-ts")
    del message["approved_trade"]["timestamp"]
    error = invalid(samples.body(message))
    assert error.code == "missing_field" and "timestamp" in error.field


def test_ten_megabyte_body_is_refused_before_parsing() -> None:
    raw = b'{"status": "APPROVED", "pad": "' + b"x" * 10_000_000 + b'"}'
    error = invalid(raw, MessageProperties(message_id="big"), max_body_bytes=1_048_576)
    assert error.code == "body_too_large" and error.idempotency_key == "big"


@pytest.mark.parametrize(
    ("props", "field"),
    [
        (MessageProperties(content_type="text/plain"), "content_type"),
        (MessageProperties(content_encoding="gzip"), "content_encoding"),
    ],
)
def test_wrong_content_type_or_encoding(props: MessageProperties, field: str) -> None:
    error = invalid(samples.body(samples.decision()), props)
    assert error.field == field


def test_huge_integer_is_a_typed_error() -> None:
    text = json.dumps(samples.decision(order_id="rpm-h")).replace("95000.0", "9" * 5000)
    error = invalid(text.encode())
    assert error.code in ("not_json", "invalid_field")


def test_overflowing_number_literal_is_not_finite() -> None:
    text = _with_trade(position_units=12345.0).decode().replace("12345.0", "1e400")
    error = invalid(text.encode())
    assert error.field == "decision.approved_trade.position_units"
    assert "finite" in error.detail


def test_out_of_range_aware_timestamp_is_a_field_error() -> None:
    trade = samples.approved_trade(timestamp="9999-12-31T23:59:59-05:00")
    error = invalid(samples.body(samples.decision(order_id="rpm-far", trade=trade)))
    assert error.idempotency_key == "rpm-far"
    assert "timestamp" in error.field


def test_nul_characters_are_refused_before_they_reach_the_database() -> None:
    message = samples.decision(order_id="rpm-nul")
    message["kill_switch_reason"] = "a\u0000b"
    error = invalid(samples.body(message), MessageProperties(message_id="m-nul"))
    assert error.code == "nul_character" and error.idempotency_key == "rpm-nul"
    message["order_id"] = "rpm\u0000nul"  # a key with NUL is no key
    error = invalid(samples.body(message), MessageProperties(message_id="bad\x00id"))
    assert error.code == "missing_idempotency_key" and error.idempotency_key is None
