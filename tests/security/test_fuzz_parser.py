"""The parser alone, under hostile input: it raises ``InvalidMessage`` and nothing else.

Property tests (hypothesis) over arbitrary bytes, arbitrary JSON and mutations of a real
approval, the seeded hostile catalogue of ``tests.security.hostile``, and the limits that
run BEFORE ``json.loads``: body size, nesting depth, value count, the parse budget, and the
clock-skew allowance for decision timestamps.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import ExecutionRequest, InvalidMessage, MessageProperties, parse_request
from schemas.request import MAX_FUTURE_SKEW_SECONDS, ParseLimits
from schemas.rpm import SYMBOL_PATTERN
from tests import samples
from tests.security.hostile import LOOK_ALIKE_SYMBOLS, hostile_messages

PROPS = MessageProperties(content_type="application/json")
FAST = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,  # the same cases on every run: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def parse(body: bytes, props: MessageProperties = PROPS, **kw: Any) -> ExecutionRequest:
    return parse_request(body, props, received_at=datetime.now(UTC), **kw)


def outcome(body: bytes, props: MessageProperties = PROPS) -> ExecutionRequest | InvalidMessage:
    """The request, or the ``InvalidMessage``; any other exception fails the test."""
    try:
        return parse(body, props)
    except InvalidMessage as invalid:
        return invalid


def assert_executable_shape(request: ExecutionRequest) -> None:
    """Whatever the parser lets through has a side, a finite positive size, a real symbol."""
    if request.trade is None:
        return
    assert request.trade.direction in (1, -1) and type(request.trade.direction) is int
    assert math.isfinite(request.trade.position_units) and request.trade.position_units > 0
    assert re.fullmatch(SYMBOL_PATTERN, request.trade.symbol)
    ahead = request.decided_at - datetime.now(UTC)
    assert ahead <= timedelta(seconds=MAX_FUTURE_SKEW_SECONDS)


# --- property tests ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
props_strategy = st.builds(
    MessageProperties,
    message_id=st.none() | st.text(max_size=140),
    correlation_id=st.none() | st.text(max_size=20),
    content_type=st.none()
    | st.sampled_from(["application/json", "text/plain", "application/json; charset=x", ""]),
    content_encoding=st.none() | st.sampled_from(["utf-8", "gzip", "", "UTF8"]),
)


@FAST
@given(body=st.binary(max_size=2048), props=props_strategy)
def test_arbitrary_bytes_never_raise_anything_else(body: bytes, props: MessageProperties) -> None:
    result = outcome(body, props)
    if isinstance(result, ExecutionRequest):
        assert_executable_shape(result)


@FAST
@given(value=json_values, props=props_strategy)
def test_arbitrary_json_never_raises_anything_else(value: Any, props: MessageProperties) -> None:
    result = outcome(json.dumps(value).encode(), props)
    if isinstance(result, ExecutionRequest):
        assert_executable_shape(result)


def _paths(document: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(document, dict):
        for key, value in document.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))


TEMPLATE = samples.rpm_output(samples.decision(order_id="rpm-fuzz"))
PATHS = list(_paths(TEMPLATE))
hostile_values = (
    json_values
    | st.sampled_from([*LOOK_ALIKE_SYMBOLS, True, False, -1, 0, 2, 1e308, -1e308, 5e-324])
    | st.integers(min_value=-(10**40), max_value=10**40)
)


@FAST
@given(
    changes=st.lists(st.tuples(st.sampled_from(PATHS), hostile_values), min_size=1, max_size=4),
    drop=st.lists(st.sampled_from(PATHS), max_size=2),
)
def test_mutated_approvals_never_raise_anything_else(
    changes: list[tuple[tuple[Any, ...], Any]], drop: list[tuple[Any, ...]]
) -> None:
    document = samples.clone(TEMPLATE)
    for path, value in changes:
        _set(document, path, value)
    for path in drop:
        _set(document, path, None, delete=True)
    result = outcome(json.dumps(document).encode())
    if isinstance(result, ExecutionRequest):
        assert_executable_shape(result)
    else:
        assert result.code and result.field


def _set(document: Any, path: tuple[Any, ...], value: Any, *, delete: bool = False) -> None:
    target = document
    for key in path[:-1]:
        if not isinstance(target, dict) or not isinstance(target.get(key), dict):
            return
        target = target[key]
    if delete:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value


def test_the_seeded_hostile_catalogue() -> None:
    """Every catalogue message is refused or, if it parses, is of a kind the pipeline refuses;
    and it ends where the catalogue says (a readable key means a REJECTED confirmation)."""
    messages = hostile_messages(12_000, seed=20261125)
    parsed_kinds = set()
    for message in messages:
        props = MessageProperties(
            message_id=message.message_id,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            headers=message.headers,
        )
        result = outcome(message.body, props)
        if isinstance(result, ExecutionRequest):
            assert_executable_shape(result)
            assert refused_before_any_order(result), (message.kind, result)
            parsed_kinds.add(message.kind)
            assert message.expect != "dead", message.kind
        elif message.expect != "either":
            ends = "confirm" if result.idempotency_key else "dead"
            assert ends == message.expect, (message.kind, result)
    # only kinds that are well-formed JSON the pipeline refuses later may parse
    assert parsed_kinds <= {
        "bad_units",  # 5e-324 units: below volume_min
        "below_volume_min",
        "above_volume_max",
        "unknown_symbol",
        "look_alike_symbol",
        "far_timestamp",  # in the past: stale
        "missing_key",  # key from the message_id; the kill switch refuses it
        "refused_by_rpm",
    }


def refused_before_any_order(request: ExecutionRequest) -> bool:
    """What the pipeline refuses a parsed request for, given the simulator's EURUSD (contract
    100 000, 0.01..100 lots), ``volume_over_max="reject"`` and the 30 s TTL."""
    if request.status.value not in ("APPROVED", "ADJUSTED"):
        return True
    if request.kill_switch or request.trading_halted:
        return True
    if (datetime.now(UTC) - request.decided_at).total_seconds() > 30:
        return True
    trade = request.trade
    assert trade is not None
    if trade.symbol not in ("EURUSD", "GBPUSD", "USDJPY", "XAUUSD", "US500", "BTCUSD"):
        return True
    return trade.symbol == "EURUSD" and not 1_000 <= trade.position_units <= 10_000_000


# --- the limits --------------------------------------------------------------------------


def _message(order_id: str = "rpm-lim", **trade: Any) -> dict[str, Any]:
    return samples.rpm_output(
        samples.decision(order_id=order_id, trade=samples.approved_trade(**trade))
    )


def test_nesting_beyond_the_depth_limit_is_refused_before_json_loads() -> None:
    limits = ParseLimits(max_depth=8)
    document = _message()
    document["risk_metrics"] = {"a": [[[[[[[[1]]]]]]]]}
    with pytest.raises(InvalidMessage) as info:
        parse(json.dumps(document).encode(), limits=limits)
    assert info.value.code == "too_deep" and info.value.idempotency_key is None


def test_brackets_inside_strings_do_not_count() -> None:
    document = _message(regime="[" * 5000 + '\\"{' * 100)
    request = parse(json.dumps(document).encode(), limits=ParseLimits(max_depth=8))
    assert request.trade is not None and request.trade.regime is not None


def test_too_many_values_are_refused_before_json_loads() -> None:
    document = _message()
    document["risk_metrics"] = {"pad": [0] * 2000}
    body = json.dumps(document).encode()
    with pytest.raises(InvalidMessage) as info:
        parse(body, limits=ParseLimits(max_elements=1000))
    assert info.value.code == "too_many_elements"
    assert parse(body, limits=ParseLimits(max_elements=3000)).idempotency_key == "rpm-lim"


def test_the_parse_budget_refuses_a_parse_that_overran_under_the_approvals_own_key() -> None:
    """A budget overrun is refused under decision.order_id, never the AMQP message_id: a later
    copy of the same approval must meet the same key (and so the recorded answer)."""
    ticks = iter(range(0, 100, 2))  # every clock reading is 2 s later than the one before
    props = MessageProperties(content_type="application/json", message_id="amqp-mid-1")
    with pytest.raises(InvalidMessage) as info:
        parse_request(
            samples.body(_message()),
            props,
            received_at=datetime.now(UTC),
            parse_timeout_seconds=1.0,
            clock=lambda: next(ticks),
        )
    assert info.value.code == "parse_timeout"
    assert info.value.idempotency_key == _message()["decision"]["order_id"]
    assert parse_request(
        samples.body(_message()), props, received_at=datetime.now(UTC)
    ).idempotency_key == (info.value.idempotency_key)


def test_size_limit_is_configurable() -> None:
    body = samples.body(_message())
    with pytest.raises(InvalidMessage) as info:
        parse(body, MessageProperties(message_id="m-1"), max_body_bytes=len(body) - 1)
    assert info.value.code == "body_too_large" and info.value.idempotency_key == "m-1"
    assert parse(body, max_body_bytes=len(body)).idempotency_key == "rpm-lim"


@pytest.mark.parametrize(
    ("ahead", "refused"),
    [
        (timedelta(seconds=0), False),
        (timedelta(seconds=MAX_FUTURE_SKEW_SECONDS - 1), False),
        (timedelta(seconds=MAX_FUTURE_SKEW_SECONDS + 1), True),
        (timedelta(days=3650), True),
    ],
)
def test_future_timestamps_beyond_the_clock_skew_are_invalid(
    ahead: timedelta, refused: bool
) -> None:
    now = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    stamp = (now + ahead).replace(tzinfo=None).isoformat()
    body = samples.body(_message(timestamp=stamp))
    if not refused:
        assert parse(body, now=now).decided_at == now + ahead
        return
    with pytest.raises(InvalidMessage) as info:
        parse(body, now=now)
    assert info.value.code == "future_timestamp"
    assert info.value.field == "decision.approved_trade.timestamp"
    assert info.value.idempotency_key == "rpm-lim"  # a REJECTED confirmation, not a dead letter


def test_a_timestamp_that_overflows_utc_is_a_field_error_not_a_crash() -> None:
    with pytest.raises(InvalidMessage) as info:
        parse(samples.body(_message(timestamp="9999-12-31T23:59:59-05:00")))
    assert info.value.code == "invalid_field" and info.value.idempotency_key == "rpm-lim"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("direction", True),
        ("direction", "-1"),
        ("direction", 1.0),
        ("position_units", "95000"),
        ("position_units", True),
        ("position_units", 1e300),  # implausible: it would overflow the lot arithmetic
    ],
)
def test_lax_coercions_of_side_and_size_are_refused(field: str, value: Any) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse(samples.body(_message(**{field: value})))
    assert info.value.field == f"decision.approved_trade.{field}"


def test_a_well_formed_approval_still_parses() -> None:
    request = parse(samples.body(_message(units=95_000)))  # a JSON integer is a number too
    assert request.trade is not None and request.trade.position_units == 95_000
