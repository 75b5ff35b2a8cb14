"""The ``_core`` double checked against the compiled binding's own strings in the wheel."""

from __future__ import annotations

import re

import pytest

from tests.native import core_double
from tests.native.package import wheel
from tests.native.wheel import binding_strings

# The binding's types in the order its field-name table introduces their fields.
TABLE_ORDER = (
    "TradePosition",
    "TradeOrder",
    "TradeDeal",
    "TradeRequest",
    "OrderSendResult",
    "OrderCheckResult",
    "Tick",
    "TerminalInfo",
    "SymbolInfo",
    "AccountInfo",
)


@pytest.fixture(scope="module")
def strings() -> list[str]:
    return binding_strings(wheel())


def test_result_fields_match_the_bindings_name_table(strings: list[str]) -> None:
    # the binding keeps one table of field names, each name once, in the order the
    # structures first use it; short names ("sl", "tp", "bid", "ask") are below 4 characters
    start, end = strings.index("ticket"), strings.index("volume_dbl")
    introduced: list[str] = []
    for kind in TABLE_ORDER:
        for field in core_double.TYPES[kind]._fields:
            if len(field) >= 4 and field not in introduced:
                introduced.append(field)
    assert introduced == strings[start:end]
    for kind in TABLE_ORDER:
        assert kind in strings


def test_the_double_exports_exactly_the_bindings_functions(strings: list[str]) -> None:
    signatures = {m.group(1) for s in strings if (m := re.fullmatch(r"([a-z_]+)\(.*\)", s))}
    assert signatures == set(core_double.__all__)
    assert 'positions_get([symbol="SYMBOL"],[ticket=TICKET],[group="GROUP"])' in strings


@pytest.mark.parametrize(
    "message",
    [
        'Invalid "volume" argument',
        'Invalid "magic" argument',
        'Invalid "login" argument',
        'Invalid "ticket" argument',
        "Invalid number of arguments",
        "Invalid 1st unnamed argument",
        "Unnamed arguments not allowed",
        "No IPC connection",
        "Terminal: Not found",
    ],
)
def test_refusal_messages_are_the_bindings(strings: list[str], message: str) -> None:
    assert message in strings
