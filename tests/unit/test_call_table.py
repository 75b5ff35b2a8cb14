"""The call table (worker/mt5/calls.py) is the one description every backend shares."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from tests.native import core_double
from worker.mt5 import api
from worker.mt5.bridge.client import BridgeTerminal
from worker.mt5.bridge.protocol import ALLOWED_FUNCTIONS, RESULT_TYPES, decode_value
from worker.mt5.calls import CALLS, RECORD_TYPES, failed_answer, given, result_fits
from worker.mt5.native import NativeTerminal, converted
from worker.mt5.sim.terminal import SimTerminal

PROTOCOL_CALLS = {
    name
    for name, member in inspect.getmembers(api.Terminal, inspect.isfunction)
    if not name.startswith("_")
}


def _parameters(function: Any) -> list[tuple[str, Any, Any]]:
    signature = inspect.signature(function)
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def test_the_table_names_exactly_the_protocol_calls() -> None:
    assert set(CALLS) == PROTOCOL_CALLS


@pytest.mark.parametrize("backend", [SimTerminal, NativeTerminal, BridgeTerminal])
def test_every_backend_has_every_call_with_the_protocol_signature(backend: type) -> None:
    for name in CALLS:
        ours = getattr(backend, name)
        assert _parameters(ours) == _parameters(getattr(api.Terminal, name)), name


def test_the_binding_has_every_call_but_the_lifecycle_is_local_to_the_bridge() -> None:
    assert set(CALLS) <= set(core_double.__all__)
    assert {name for name, spec in CALLS.items() if spec.remote} == ALLOWED_FUNCTIONS
    assert {"initialize", "login", "shutdown"}.isdisjoint(ALLOWED_FUNCTIONS)
    assert set(RESULT_TYPES) == {kind.__name__ for kind in RECORD_TYPES}


def test_failed_answers_follow_the_result_kind() -> None:
    assert failed_answer("symbol_select") is False
    assert failed_answer("login") is False
    assert failed_answer("positions_get") is None
    sim = SimTerminal()  # not initialized: every call fails with the table's answer
    assert sim.symbol_select("EURUSD") is False
    assert sim.positions_get() is None


def test_unset_filters_are_left_out_and_positional_shapes_kept() -> None:
    assert given("orders_get", {"symbol": None, "ticket": 5}) == {"ticket": 5}
    assert given("history_deals_get", {"date_from": None, "position": 3}) == {"position": 3}


def test_results_are_checked_and_converted_by_kind() -> None:
    deal = api.TradeDeal(*([0] * 15), "EURUSD", "", "")
    assert result_fits("history_deals_get", (deal,))
    assert result_fits("history_deals_get", None)
    assert not result_fits("history_deals_get", (api.Tick(0, 1.0, 1.0, 0.0, 0, 0, 0, 0.0),))
    assert not result_fits("symbol_select", None)
    assert not result_fits("order_calc_margin", "12")
    assert converted("history_deals_get", None) is None
    assert converted("history_deals_get", [deal]) == (deal,)


def test_a_peer_without_the_probes_fields_still_decodes() -> None:
    """Fields added with a default (stops and freeze levels, fifo_close) may be missing from
    a bridge of the previous release; fields without one may not."""
    sim = SimTerminal()
    assert sim.initialize()
    info = sim.symbol_info("EURUSD")
    assert info is not None
    fields = {
        name: value
        for name, value in info._asdict().items()
        if name not in ("trade_stops_level", "trade_freeze_level")
    }
    decoded = decode_value({"$nt": "SymbolInfo", "v": fields})
    assert decoded == info._replace(trade_stops_level=0, trade_freeze_level=0)
    del fields["digits"]
    with pytest.raises(Exception, match="do not match"):
        decode_value({"$nt": "SymbolInfo", "v": fields})
