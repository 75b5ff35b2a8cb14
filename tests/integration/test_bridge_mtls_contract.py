"""The terminal contract suite (tests/unit/test_terminal_contract.py) over the bridge: a
``sim-terminal`` process serving mutual TLS with the script's certificates, reached by a
worker-side ``BridgeTerminal`` presenting a listed client certificate."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.integration.bridge_pki import Material, build
from tests.integration.test_bridge_helpers import SimProcess, new_secret, start_sim_terminal
from tests.unit.test_terminal_contract import (  # collected here, against this module's fixture
    test_info_results_have_the_real_field_names,
    test_margin,
    test_order_send_and_history_lookups,
    test_symbols_and_select,
    test_ticks,
)
from worker.mt5 import api
from worker.mt5.bridge.client import BridgeTerminal

SECRET = new_secret()
CONTRACT = (
    test_info_results_have_the_real_field_names,
    test_margin,
    test_order_send_and_history_lookups,
    test_symbols_and_select,
    test_ticks,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Material:
    return build(tmp_path_factory.mktemp("contract-pki"))


@pytest.fixture(scope="module")
def bridge(pki: Material, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    tmp = tmp_path_factory.mktemp("contract-sim")
    process = start_sim_terminal(tmp, tmp / "state.db", SECRET, args=pki.bridge_args())
    yield process
    process.signal(signal.SIGTERM)
    assert process.wait() == 0


@pytest.fixture
def terminal(bridge: SimProcess, pki: Material) -> Iterator[api.Terminal]:
    """Overrides the contract module's fixture for the tests imported above."""
    remote = BridgeTerminal(
        bridge.address,
        SECRET,
        tls_ca=str(pki.ca),
        tls_cert=str(pki.client.cert),
        tls_key=str(pki.client.key),
        tls_crl=str(pki.crl),
        timeout=10,
    )
    assert remote.initialize(), remote.last_error()
    yield remote
    remote.shutdown()


def test_the_whole_contract_is_collected_here() -> None:
    import tests.unit.test_terminal_contract as contract

    names = {name for name in dir(contract) if name.startswith("test_")}
    assert names == {test.__name__ for test in CONTRACT}
