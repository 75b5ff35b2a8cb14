"""The PNG of ``execution-worker report --plot F.png`` (matplotlib, the ``plot`` extra).

Four panels: implementation shortfall per symbol and latency per symbol (distributions,
box plots), then both over time (per time bucket: median shortfall per symbol, latency
p50/p95). The title compares the most recent part of the window with the part before it
(the last 7 days when the window spans two weeks or more, else its last third), so a
person sees at once whether execution got worse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from worker.tools.report import Measured, percentile

BUCKETS = (
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=15),
    timedelta(hours=1),
    timedelta(hours=6),
    timedelta(days=1),
)
MAX_BUCKETS = 60
STAGE_COLOURS = {"queue wait": "#9e9e9e", "worker": "#1f77b4", "broker": "#ff7f0e"}


def bucket_size(since: datetime, until: datetime) -> timedelta:
    span = until - since
    for size in BUCKETS:
        if span / size <= MAX_BUCKETS:
            return size
    return BUCKETS[-1]


def recent_split(since: datetime, until: datetime) -> datetime:
    span = until - since
    return until - (timedelta(days=7) if span >= timedelta(days=14) else span / 3)


def _floor(moment: datetime, size: timedelta) -> datetime:
    epoch = datetime(2000, 1, 1, tzinfo=UTC)
    return epoch + ((moment - epoch) // size) * size


def _median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def _comparison(measured: Sequence[Measured], split: datetime) -> str:
    def figures(items: Sequence[Measured]) -> tuple[float | None, float | None, int]:
        shortfall = [m.shortfall_pips for m in items if m.shortfall_pips is not None]
        latency = [
            m.worker_ms + m.broker_ms
            for m in items
            if m.worker_ms is not None and m.broker_ms is not None
        ]
        return _median(shortfall), percentile(latency, 95), len(items)

    before = figures([m for m in measured if m.row["received_at"] < split])
    recent = figures([m for m in measured if m.row["received_at"] >= split])

    def text(value: float | None, unit: str) -> str:
        return "-" if value is None else f"{value:.2f} {unit}"

    return (
        f"since {split.astimezone(UTC):%Y-%m-%d %H:%M}Z ({recent[2]} executions): median shortfall"
        f" {text(recent[0], 'pips')}, p95 receive->fill {text(recent[1], 'ms')}"
        f"   |   before ({before[2]}): {text(before[0], 'pips')}, {text(before[1], 'ms')}"
    )


def plot(measured: Sequence[Measured], document: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    since = datetime.fromisoformat(document["since"])
    until = datetime.fromisoformat(document["until"])
    symbols = sorted({str(m.row.get("symbol")) for m in measured if m.row.get("symbol")})
    fig, axes = plt.subplots(2, 2, figsize=(15, 9), dpi=80)
    fig.suptitle(
        f"Execution quality {since:%Y-%m-%d %H:%M} .. {until:%Y-%m-%d %H:%M} UTC"
        f" — {len(measured)} executions\n{_comparison(measured, recent_split(since, until))}",
        fontsize=12,
    )

    # 1. shortfall distribution per symbol
    ax = axes[0][0]
    data = [
        [
            m.shortfall_pips
            for m in measured
            if m.row.get("symbol") == s and m.shortfall_pips is not None
        ]
        for s in symbols
    ]
    shown = [(s, d) for s, d in zip(symbols, data, strict=True) if d]
    if shown:
        ax.boxplot(
            [d for _, d in shown],
            showmeans=True,
            flierprops={"markersize": 3},
        )
        ax.set_xticks(range(1, len(shown) + 1), [f"{s}\n(n={len(d)})" for s, d in shown])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title("Implementation shortfall per symbol (pips, arrival mid -> fill, + = cost)")
    ax.set_ylabel("pips")
    ax.grid(axis="y", alpha=0.3)

    # 2. latency distribution per symbol and stage
    ax = axes[0][1]
    stages: dict[str, Callable[[Measured], float | None]] = {
        "queue wait": lambda m: m.queue_ms,
        "worker": lambda m: m.worker_ms,
        "broker": lambda m: m.broker_ms,
    }
    width = 0.25
    for offset, (stage, read) in enumerate(stages.items()):
        values = [
            [
                max(v, 0.01)
                for m in measured
                if m.row.get("symbol") == s and (v := read(m)) is not None
            ]
            for s in symbols
        ]
        positions = [i + (offset - 1) * width for i, v in enumerate(values) if v]
        kept = [v for v in values if v]
        if kept:
            boxes = ax.boxplot(
                kept,
                positions=positions,
                widths=width * 0.9,
                patch_artist=True,
                showfliers=False,
                manage_ticks=False,
            )
            for box in boxes["boxes"]:
                box.set_facecolor(STAGE_COLOURS[stage])
            ax.plot([], [], color=STAGE_COLOURS[stage], linewidth=8, label=stage)
    ax.set_xticks(range(len(symbols)), symbols)
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 10)  # room for the legend above the boxes
    ax.set_title("Latency per symbol (ms, log): queue wait, worker, broker")
    ax.set_ylabel("ms")
    ax.legend(loc="upper center", ncol=3, fontsize=9)
    ax.grid(axis="y", alpha=0.3)

    # 3 and 4. over time
    size = bucket_size(since, until)
    buckets: dict[datetime, list[Measured]] = {}
    for m in measured:
        buckets.setdefault(_floor(m.row["received_at"], size), []).append(m)
    times = sorted(buckets)
    ax = axes[1][0]
    for s in symbols:
        xs, ys = [], []
        for t in times:
            pips = [
                m.shortfall_pips
                for m in buckets[t]
                if m.row.get("symbol") == s and m.shortfall_pips is not None
            ]
            if pips:
                xs.append(t)
                ys.append(_median(pips))
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=s)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(f"Median shortfall per {_size_text(size)} (pips, + = cost)")
    ax.legend(fontsize=9, ncol=2)
    ax.grid(alpha=0.3)

    ax = axes[1][1]
    for q, style in ((50, "-"), (95, "--")):
        xs, ys = [], []
        for t in times:
            ms = [
                m.worker_ms + m.broker_ms
                for m in buckets[t]
                if m.worker_ms is not None and m.broker_ms is not None
            ]
            if ms:
                xs.append(t)
                ys.append(percentile(ms, q))
        ax.plot(xs, ys, style, marker="o", markersize=3, label=f"receive->fill p{q}")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_title(f"Worker + broker latency per {_size_text(size)} (ms, log)")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlim(since, until)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plain_log_ticks(ax: Any) -> None:
    """1, 10, 100 (and 20, 50 between) instead of 10^0 and 2x10^1."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def _size_text(size: timedelta) -> str:
    minutes = int(size.total_seconds() // 60)
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 24 * 60:
        return f"{minutes // 60} h"
    return f"{minutes // (24 * 60)} d"
