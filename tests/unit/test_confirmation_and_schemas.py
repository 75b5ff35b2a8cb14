from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime

import pytest

from schemas import ExecutionConfirmation, ExecutionStatus, RejectionReason
from schemas.export import EXPORTED, SCHEMA_DIR, render
from schemas.identity import EXECUTION_NAMESPACE, execution_id_for


def _confirmation(**changes: object) -> ExecutionConfirmation:
    fields: dict[str, object] = {
        "execution_id": uuid.uuid5(uuid.NAMESPACE_URL, "x"),
        "order_id": "rpm-1",
        "idempotency_key": "rpm-1",
        "status": ExecutionStatus.FILLED,
        "symbol": "EURUSD",
        "received_at": datetime(2026, 11, 25, 10, 0, tzinfo=UTC),
        "completed_at": datetime(2026, 11, 25, 10, 0, 1, tzinfo=UTC),
    }
    fields.update(changes)
    return ExecutionConfirmation.model_validate(fields)


def test_routing_key_is_status_lower_case_and_symbol() -> None:
    assert _confirmation().routing_key() == "confirmation.filled.EURUSD"
    rejected = _confirmation(
        status=ExecutionStatus.PARTIALLY_FILLED, rejection_reason=RejectionReason.INSUFFICIENT_FILL
    )
    assert rejected.routing_key() == "confirmation.partially_filled.EURUSD"
    assert _confirmation(symbol=None).routing_key() == "confirmation.filled.UNKNOWN"


def test_json_is_stable_and_round_trips() -> None:
    first = _confirmation(timings_ms={"submit": 1.5, "validate": 0.2})
    again = ExecutionConfirmation.model_validate_json(first.to_json_bytes())
    assert again == first
    assert again.to_json_bytes() == first.to_json_bytes()
    document = json.loads(first.to_json_bytes())
    assert document["schema_version"] == "1" and document["status"] == "FILLED"
    assert document["received_at"].endswith("Z")


def test_committed_json_schemas_match_the_models() -> None:
    for file_name, model in EXPORTED.items():
        committed = (SCHEMA_DIR / file_name).read_text(encoding="utf-8")
        assert committed == render(model), (
            f"{file_name} is stale: run execution-worker schema-export"
        )


def test_a_first_answer_keeps_the_bare_execution_id_as_message_id() -> None:
    confirmation = _confirmation()
    assert confirmation.version == 1 and confirmation.provisional is False
    assert confirmation.message_id() == str(confirmation.execution_id)


def test_a_correction_is_a_new_version_with_its_own_message_id() -> None:
    corrected = _confirmation(version=2, correction="version 1 was provisional")
    assert corrected.message_id() == f"{corrected.execution_id}:v2"
    document = json.loads(corrected.to_json_bytes())
    assert (document["version"], document["correction"]) == (2, "version 1 was provisional")


def test_execution_id_is_uuid5_of_the_key_in_the_execution_namespace() -> None:
    rng = random.Random(5)
    keys = ["", "p-abc-1", "é€😀", "x" * 1000]
    keys += [
        "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(1, 40))) for _ in range(2000)
    ]
    for key in keys:
        expected = uuid.uuid5(EXECUTION_NAMESPACE, key)
        assert execution_id_for(key) == expected and str(execution_id_for(key)) == str(expected)
        assert execution_id_for(key).version == 5
    with pytest.raises(UnicodeEncodeError):  # as uuid5: a lone surrogate cannot be hashed
        execution_id_for("\ud800")


def test_confirmation_bytes_are_model_dump_json_in_utf8() -> None:
    now = datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC)
    samples = [
        ExecutionConfirmation(
            execution_id=uuid.uuid4(),
            idempotency_key="k-é€",
            status=ExecutionStatus.REJECTED,
            rejection_reason=RejectionReason.INVALID_REQUEST,
            rejection_details='quote " \\ \n \u2028 😀',
            received_at=now,
            completed_at=now,
        ),
        ExecutionConfirmation(
            execution_id=uuid.uuid4(),
            order_id="o-1",
            idempotency_key="o-1",
            status=ExecutionStatus.FILLED,
            symbol="EURUSD",
            direction=-1,
            executed_lots=0.1,
            fill_price=1.0849999999999999,
            broker_deals=[2**40, 7],
            timings_ms={"total": 3.25},
            received_at=now,
            submitted_at=now,
            completed_at=now,
            version=2,
            provisional=True,
            correction="c",
        ),
    ]
    for confirmation in samples:
        assert confirmation.to_json_bytes() == confirmation.model_dump_json().encode("utf-8")
