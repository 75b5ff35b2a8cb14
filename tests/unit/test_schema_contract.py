"""The published JSON Schemas describe exactly what the worker accepts and emits.

An independent validator (the ``jsonschema`` package, with format checking on) judges every
sample and hostile body: accepted by the worker <=> valid by the schema. What JSON Schema
cannot say is left out by name: checks relative to the clock (future-dated stamps), of the
raw bytes (size, nesting and value bounds, duplicate keys, NUL, encoding), of the AMQP
properties (content type, the message_id key), and of the calendar (a 30th of February, a
stamp whose UTC conversion leaves the representable range: the schema's pattern admits them).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from schemas import InvalidMessage, MessageProperties, parse_request
from schemas.confirmation import ExecutionConfirmation
from schemas.enums import ExecutionStatus, RejectionReason
from schemas.export import SCHEMA_DIR
from tests import samples
from tests.security.hostile import hostile_messages

# Refusals JSON Schema cannot express, by InvalidMessage code.
NOT_EXPRESSIBLE = frozenset(
    {
        "future_timestamp",  # relative to the receiving clock
        "body_too_large",
        "too_deep",
        "too_many_elements",
        "nul_character",
        "unsupported_content_type",
        "unsupported_encoding",
        "missing_idempotency_key",  # the AMQP message_id may carry the key
        "parse_timeout",
        "calendar",
    }
)
NOT_A_DOCUMENT = frozenset({"not_utf8", "not_json", "empty_body"})
PROPS = MessageProperties(content_type="application/json", message_id="schema-contract")


def test_format_checking_is_really_on() -> None:
    """Without its optional packages jsonschema skips ``format``: the checks here would pass."""
    assert "date-time" in FormatChecker().checkers


def _validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / name).read_text())
    return Draft202012Validator(schema, format_checker=FormatChecker())


RPM_OUTPUT = _validator("rpm_output.schema.json")
DECISION = _validator("trade_decision.schema.json")
CONFIRMATION = _validator("execution_confirmation.schema.json")


def _schema_accepts(document: Any) -> bool:
    if not isinstance(document, dict):
        return False
    validator = RPM_OUTPUT if "decision" in document else DECISION
    return validator.is_valid(document)


CALENDAR_DETAILS = ("outside expected range", "out of range")


def _worker_verdict(body: bytes) -> str | None:
    """None when the worker accepts the body, else the refusal code ("calendar" for dates
    that match the timestamp pattern but do not exist)."""
    try:
        parse_request(body, PROPS, received_at=datetime.now(UTC))
    except InvalidMessage as exc:
        if exc.field.endswith("timestamp") and any(d in exc.detail for d in CALENDAR_DETAILS):
            return "calendar"
        return exc.code
    return None


def _bodies() -> list[tuple[str, bytes]]:
    bodies = [
        ("sample rpm_output", samples.body(samples.rpm_output())),
        ("sample decision", samples.body(samples.decision())),
        ("sample adjusted", samples.body(samples.rpm_output(samples.decision(status="ADJUSTED")))),
        ("sample rejected", samples.body(samples.rpm_output(samples.decision(status="REJECTED")))),
        (
            "sample kill switch",
            samples.body(samples.rpm_output(samples.decision(kill_switch=True))),
        ),
        ("sample halted", samples.body(samples.rpm_output(halted=True))),
    ]
    bodies += [(f"hostile {h.kind}", h.body) for h in hostile_messages(600, seed=20261201)]
    return bodies


def test_every_sample_and_hostile_body_is_judged_alike_by_the_worker_and_the_schema() -> None:
    disagreements: list[str] = []
    judged = 0
    for label, body in _bodies():
        verdict = _worker_verdict(body)
        if verdict in NOT_EXPRESSIBLE or verdict in NOT_A_DOCUMENT:
            continue
        try:
            document = json.loads(body)
        except ValueError:
            continue
        judged += 1
        if (verdict is None) != _schema_accepts(document):
            disagreements.append(f"{label}: worker {verdict or 'accepts'}, schema disagrees")
    assert judged > 300
    assert not disagreements, "\n".join(disagreements[:20])


def test_the_rpms_naive_timestamps_are_valid_by_the_published_schema() -> None:
    message = samples.rpm_output()
    stamp = message["decision"]["approved_trade"]["timestamp"]
    assert "+" not in stamp and not stamp.endswith("Z")  # naive, as the RPM writes it
    assert RPM_OUTPUT.is_valid(message)
    assert _worker_verdict(samples.body(message)) is None


@pytest.mark.parametrize("flag", ["kill_switch_triggered", "trading_halted"])
@pytest.mark.parametrize("value", ["false", 0, "0", None, [], {}])
def test_a_safety_flag_of_the_wrong_type_is_refused_by_both(flag: str, value: Any) -> None:
    message = samples.rpm_output()
    if flag == "kill_switch_triggered":
        message["decision"][flag] = value
    else:
        message["portfolio_state"][flag] = value
    assert _worker_verdict(samples.body(message)) == "invalid_field"
    assert not RPM_OUTPUT.is_valid(message)


@pytest.mark.parametrize("status", list(ExecutionStatus))
def test_confirmations_of_every_status_are_valid_by_the_published_schema(
    status: ExecutionStatus,
) -> None:
    now = datetime.now(UTC)
    filled = status in (ExecutionStatus.FILLED, ExecutionStatus.PARTIALLY_FILLED)
    for reason in [None] if filled else [None, *RejectionReason]:
        confirmation = ExecutionConfirmation(
            execution_id=uuid.uuid4(),
            order_id="rpm-1" if reason is None else None,
            idempotency_key="rpm-1",
            status=status,
            rejection_reason=reason,
            rejection_details=None if reason is None else "why",
            symbol="EURUSD",
            broker_symbol="EURUSD.a",
            direction=-1,
            intended_units=95_000.0,
            executed_units=95_000.0 if filled else 0.0,
            intended_lots=0.95,
            executed_lots=0.95 if filled else 0.0,
            requested_price=1.08512,
            fill_price=1.08515 if filled else None,
            slippage_pips=-0.3 if filled else None,
            broker_order=7 if filled else None,
            broker_deals=[8, 9] if filled else [],
            timings_ms={"submit": 1.5},
            received_at=now.replace(microsecond=0),
            submitted_at=now if filled else None,
            completed_at=now,
        )
        document = json.loads(confirmation.to_json_bytes())
        errors = [e.message for e in CONFIRMATION.iter_errors(document)]
        assert not errors, errors


def test_a_naive_timestamp_is_utc_on_a_host_that_is_not_on_utc() -> None:
    """A naive RPM stamp read as local time would make every approval look hours old."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        message = samples.rpm_output()
        stamp = message["decision"]["approved_trade"]["timestamp"]
        request = parse_request(samples.body(message), PROPS, received_at=datetime.now(UTC))
        assert request.decided_at == datetime.fromisoformat(stamp).replace(tzinfo=UTC)
    finally:
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()
