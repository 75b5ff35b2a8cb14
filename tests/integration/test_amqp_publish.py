"""``execution-worker publish`` against the real RabbitMQ (an isolated vhost per test)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from schemas.request import parse_request
from tests.integration.test_amqp_support import broker, ready_count, reset_vhost
from worker import cli
from worker.amqp.runtime import to_message_properties
from worker.amqp.topology import REQUESTS_QUEUE, requests_queue_arguments
from worker.config import Settings
from worker.errors import ExitCode
from worker.tools.publish import (
    OutgoingMessage,
    PublishError,
    publish_messages,
    sample_approvals,
)


@pytest.fixture(scope="module")
def module_vhost(new_vhost: Callable[[], str]) -> str:
    return new_vhost()


@pytest.fixture
def vhost_url(module_vhost: str, monkeypatch: pytest.MonkeyPatch) -> str:
    reset_vhost(module_vhost)
    monkeypatch.setenv("RABBITMQ_URL", module_vhost)
    return module_vhost


def test_samples_are_confirmed_persistent_and_parse_as_approvals(
    vhost_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["publish", "--samples", "12", "--symbols", "EURUSD,USDJPY,XAUUSD"])
    assert code == 0
    assert "12 of 12 confirmed" in capsys.readouterr().out
    with broker(vhost_url) as side:
        got = side.take(REQUESTS_QUEUE, 12)
    symbols = []
    for message in got:
        assert message.properties.delivery_mode == 2
        assert message.properties.content_type == "application/json"
        request = parse_request(
            message.body,
            to_message_properties(message.properties),
            received_at=datetime.now(UTC),
        )
        assert request.trade is not None and request.trade.position_units > 0
        assert message.properties.message_id == request.rpm_order_id
        symbols.append(request.symbol)
    assert symbols == ["EURUSD", "USDJPY", "XAUUSD"] * 4


def test_a_file_of_messages_gets_stable_ids_so_republishing_is_one_execution(
    vhost_url: str, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    documents = sample_approvals(2, ["GBPUSD"], seed=1)
    documents[1]["decision"]["order_id"] = None  # no order id: the id is a hash of the body
    path = f"{tmp_path}/approvals.json"
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(documents, handle)
    for _ in range(2):
        assert cli.main(["publish", "--file", path, "--reply-to", "rpm.replies"]) == 0
    with broker(vhost_url) as side:
        got = side.take(REQUESTS_QUEUE, 4)
    ids = [m.properties.message_id for m in got]
    assert ids[:2] == ids[2:]
    assert ids[0] == documents[0]["decision"]["order_id"]
    assert ids[1].startswith("sha256-")
    assert {m.properties.reply_to for m in got} == {"rpm.replies"}
    assert "2 of 2 confirmed" in capsys.readouterr().out


def test_json_lines_from_stdin(vhost_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = "\n".join(json.dumps(d) for d in sample_approvals(3, ["EURUSD"], seed=2))
    monkeypatch.setattr("sys.stdin", io.StringIO(lines + "\n\n"))
    assert cli.main(["publish", "--stdin"]) == 0
    assert ready_count(vhost_url, REQUESTS_QUEUE) == 3


def test_many_in_flight_are_all_confirmed(vhost_url: str) -> None:
    messages = [OutgoingMessage(b"{}", f"m-{i}") for i in range(2500)]
    report = publish_messages(vhost_url, messages, delivery_limit=5)
    assert (report.confirmed, report.total, report.timed_out) == (2500, 2500, False)
    assert ready_count(vhost_url, REQUESTS_QUEUE) == 2500


def test_a_mismatched_queue_is_reported_not_a_traceback(
    vhost_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with broker(vhost_url) as side:
        side.channel.queue_declare(
            REQUESTS_QUEUE, durable=True, arguments=requests_queue_arguments(9)
        )
    assert cli.main(["publish", "--samples", "1"]) == ExitCode.TOPOLOGY_MISMATCH
    error = capsys.readouterr().err
    declared = Settings().delivery_limit  # the default the CLI declares
    assert "x-delivery-limit" in error and f"declares {declared}" in error and "has 9" in error


def test_an_unreachable_broker_is_one_line_without_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RABBITMQ_URL", "amqp://guest:s3cret-pw@127.0.0.1:1/%2F")
    assert cli.main(["publish", "--samples", "1"]) == ExitCode.BROKER_UNREACHABLE
    error = capsys.readouterr().err
    assert "s3cret-pw" not in error
    assert "guest:***@127.0.0.1:1" in error
    with pytest.raises(PublishError):
        publish_messages("amqp://guest:x@127.0.0.1:1/%2F", [], delivery_limit=5)
