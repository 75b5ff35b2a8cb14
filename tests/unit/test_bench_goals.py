"""The bench's goals judged from its figures: the work-per-message goals are ratios to the
floor in the same run (issue 29), beside the earlier absolute ones."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from worker.tools.bench import report as bench_report

# the figures of a full run on this project's 2-core machine (2026-12-07, before issue 29's cuts)
RUN: dict[str, Any] = {
    "overhead_ms": {"p50": 3.721, "p99": 7.33},
    "floor_ms": {"p50": 2.121, "p99": 4.656},
    "throughput_ratio": 0.513,
    "throughput_inflight_ratio": {"4": 0.513, "8": 0.526, "16": 0.455},
    "cpu_ms_per_message": {
        "worker": 1.4922,
        "floor": 0.5143,
        "postgres_worker": 0.8803,
        "postgres_floor": 0.3143,
    },
    "scaling": {"1": 41.1, "2": 79.5, "4": 158.6, "8": 282.2},
    "rss_mb": {"1k": 67.9, "50k": 69.2},
    "hardened": {"ratio_to_friendly": 0.753, "p50_delta_ms": 0.255},
}


def test_every_goal_is_judged_and_named() -> None:
    met = bench_report.goals_met(RUN)
    assert set(met) == set(bench_report.GOALS)


def test_that_run_missed_the_ratio_goals_but_scaled() -> None:
    met = bench_report.goals_met(RUN)
    assert not met["cpu_ratio"]  # 2.90x the floor
    assert not met["postgres_ratio"]  # 2.80x
    assert not met["throughput_4"]  # 0.51x
    assert met["scaling_6_5"]  # 6.87x


@pytest.mark.parametrize(
    ("goal", "path", "value", "expected"),
    [
        ("cpu_ratio", ("cpu_ms_per_message", "worker"), 1.0286, True),  # exactly 2x
        ("cpu_ratio", ("cpu_ms_per_message", "worker"), 1.03, False),
        ("postgres_ratio", ("cpu_ms_per_message", "postgres_worker"), 0.6286, True),
        ("postgres_ratio", ("cpu_ms_per_message", "postgres_worker"), 0.63, False),
        ("throughput_4", ("throughput_inflight_ratio", "4"), 0.6, True),
        ("throughput_4", ("throughput_inflight_ratio", "4"), 0.599, False),
        ("scaling_6_5", ("scaling", "8"), 267.2, True),
        ("scaling_6_5", ("scaling", "8"), 267.0, False),
    ],
)
def test_ratio_goal_thresholds(
    goal: str, path: tuple[str, str], value: float, expected: bool
) -> None:
    run = copy.deepcopy(RUN)
    run[path[0]][path[1]] = value
    assert bench_report.goals_met(run)[goal] is expected
