"""A daylight-saving switch of the server clock while the worker runs (issue 17, item 4).

The hardened simulator's server clock follows US DST (``dst_clock``); ``clock_shift_seconds``
forces a switch at once, as a broker's server does at 06:00/07:00 UTC on the switch dates.
One pipeline keeps running across the switch: its gateways learned the old offset, and a
fresh tick must never be refused as stale (STALE_TICK) after the offset moves either way.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration.pipeline_env import PipelineEnv, approval, pipeline_env
from worker.mt5.sim.terminal import SimAccount, SimConfig

RICH = SimConfig(account=SimAccount(balance=10_000_000.0))
HOUR = 3600


def _all_filled(env: PipelineEnv, count: int) -> list[dict[str, object]]:
    confirmations = []
    for index in range(count):
        symbol = ("EURUSD", "USDJPY")[index % 2]
        confirmation = env.confirm(approval(symbol, 1 if index % 2 else -1, 10_000.0))
        assert confirmation["status"] == "FILLED", confirmation["rejection_reason"]
        assert confirmation["rejection_reason"] is None
        confirmations.append(confirmation)
    return confirmations


@pytest.mark.parametrize(
    "shifts",
    [
        pytest.param((-HOUR, 0), id="autumn-then-spring"),  # +2 -> +1 -> +2
        pytest.param((HOUR, 0), id="spring-then-autumn"),  # +2 -> +3 -> +2
    ],
)
def test_a_dst_switch_while_running_refuses_no_fresh_tick(
    new_database: Callable[[], str], shifts: tuple[int, ...]
) -> None:
    with pipeline_env(new_database(), RICH) as env:
        assert env.sim.faults.dst_clock, "the default simulator follows DST"
        offsets = [env.sim.server_offset_seconds]
        _all_filled(env, 3)  # the gateway learns the offset before the switch
        for shift in shifts:
            env.sim.set_faults(clock_shift_seconds=shift)
            offsets.append(env.sim.server_offset_seconds)
            _all_filled(env, 3)  # right after the switch, and on
        assert offsets[1] == offsets[0] + shifts[0] and offsets[2] == offsets[0] + shifts[1]
        assert len(env.deals()) == 3 * (1 + len(shifts))  # one order per approval
