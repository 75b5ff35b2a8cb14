"""Run bookkeeping: stage timings (the audit's ``timings_ms`` and the stage histogram)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from worker.execution.audit import Run


def _observed(stage: str) -> float:
    value = REGISTRY.get_sample_value(
        "execution_worker_stage_duration_seconds_count", {"stage": stage}
    )
    return value or 0.0


def test_a_stage_adds_its_time_also_when_it_raises_and_lets_the_error_through() -> None:
    ticks = iter([10.0, 10.5, 20.0, 20.25, 30.0, 30.125])
    run = Run(lambda: next(ticks), 0.0)
    before = _observed("monitor")
    with run.stage("monitor"):
        pass
    with pytest.raises(KeyError), run.stage("monitor"):
        raise KeyError("x")
    assert run.timings_ms == {"monitor": 750.0}
    with run.stage("commit") as entered:
        assert entered is None
    assert run.timings_ms == {"monitor": 750.0, "commit": 125.0}
    assert _observed("monitor") == before + 2
