"""The PNG of ``execution-worker report --plot F.png`` (matplotlib, the ``plot`` extra).

Six panels: implementation shortfall per symbol and latency per symbol (distributions,
box plots, their markers explained on the figure), both over time (per time bucket: median
shortfall per symbol, latency p50/p95; the buckets fit the span the executions cover, from
seconds to days, so a short range draws lines, not single dots), the rejections by reason,
and the slippage cost per symbol in the account currency. The title compares the most recent
part of the window with the part before it (the last 7 days when the executions span two
weeks or more, else the last third of their span), in words. A range without executions
draws one honest sentence instead of empty axes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from worker.tools.report import Measured, percentile

BUCKETS = (
    timedelta(seconds=1),
    timedelta(seconds=5),
    timedelta(seconds=15),
    timedelta(seconds=30),
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=15),
    timedelta(hours=1),
    timedelta(hours=6),
    timedelta(days=1),
)
MAX_BUCKETS = 40
BOX_LEGEND = (
    "box: p25-p75   line: median   triangle: mean   whiskers: 1.5 x IQR   circles: outliers"
)
STAGE_COLOURS = {"queue wait": "#9e9e9e", "worker": "#1f77b4", "broker": "#ff7f0e"}


def bucket_size(since: datetime, until: datetime) -> timedelta:
    """The smallest bucket that cuts ``since .. until`` into at most MAX_BUCKETS."""
    span = until - since
    for size in BUCKETS:
        if span / size <= MAX_BUCKETS:
            return size
    return BUCKETS[-1]


def data_extent(
    measured: Sequence[Measured], since: datetime, until: datetime
) -> tuple[datetime, datetime]:
    """Where the executions are: first .. last arrival (within the window); the time
    panels use it, so that an hour of which one minute traded is not one dot per symbol."""
    times = [m.row["received_at"] for m in measured]
    if not times:
        return since, until
    first, last = max(min(times), since), min(max(times), until)
    return first, max(last, first + BUCKETS[0])


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

    def text(label: str, values: tuple[float | None, float | None, int]) -> str:
        shortfall, latency, count = values
        pips = "no fill" if shortfall is None else f"{shortfall:.2f} pips"
        ms = "-" if latency is None else f"{latency:.0f} ms"
        return f"{label} ({count} executions): median shortfall {pips}, p95 receive->fill {ms}"

    recent_text = text(f"since {split.astimezone(UTC):%Y-%m-%d %H:%M}Z", recent)
    if before[2] == 0:
        return f"{recent_text}; nothing earlier in the range to compare with"
    return f"{recent_text}   vs   {text('before', before)}"


def plot(measured: Sequence[Measured], document: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    since = datetime.fromisoformat(document["since"])
    until = datetime.fromisoformat(document["until"])
    if not measured:
        _empty(plt, since, until, path)
        return
    symbols = sorted({str(m.row.get("symbol")) for m in measured if m.row.get("symbol")})
    first, last = data_extent(measured, since, until)
    fig, axes = plt.subplots(3, 2, figsize=(15, 13), dpi=80)
    fig.suptitle(
        f"Execution quality {since:%Y-%m-%d %H:%M} .. {until:%Y-%m-%d %H:%M} UTC"
        f" — {len(measured)} executions\n{_comparison(measured, recent_split(first, last))}",
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
    ax.text(0.5, -0.16, BOX_LEGEND, transform=ax.transAxes, ha="center", fontsize=8)

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
    ax.text(
        0.5,
        -0.16,
        BOX_LEGEND.replace("   triangle: mean", "").replace("   circles: outliers", ""),
        transform=ax.transAxes,
        ha="center",
        fontsize=8,
    )

    # 3 and 4. over time, over the span the executions cover
    size = bucket_size(first, last)
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
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=s)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(f"Median shortfall per {_size_text(size)} (pips, + = cost)")
    if ax.get_legend_handles_labels()[0]:
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
        if xs:
            ax.plot(xs, ys, style, marker="o", markersize=3, label=f"receive->fill p{q}")
    if ax.get_legend_handles_labels()[0]:
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.legend(fontsize=9)
    ax.set_title(f"Worker + broker latency per {_size_text(size)} (ms, log)")
    ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlim(first - size, last + size)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)

    _rejections_panel(axes[2][0], document)
    _slippage_cost_panel(axes[2][1], measured, symbols, document)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _rejections_panel(ax: Any, document: dict[str, Any]) -> None:
    refused = document["overall"]["rejections"]
    total = document["overall"]["executions"]
    if refused:
        reasons = [item["reason"] for item in reversed(refused)]
        counts = [item["count"] for item in reversed(refused)]
        bars = ax.barh(reasons, counts, color="#d62728")
        for bar, item in zip(bars, reversed(refused), strict=True):
            ax.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                f" {item['count']} ({item['share'] * 100:.1f} %)",
                va="center",
                fontsize=8,
            )
        ax.set_xlim(0, max(counts) * 1.3)
        ax.tick_params(axis="y", labelsize=8)
    else:
        ax.text(0.5, 0.5, f"no rejections among {total} executions", ha="center", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(f"Rejections by reason ({total} executions)")
    ax.grid(axis="x", alpha=0.3)


def _slippage_cost_panel(
    ax: Any, measured: Sequence[Measured], symbols: Sequence[str], document: dict[str, Any]
) -> None:
    currency = document["account_currency"]
    costs = []
    for s in symbols:
        values = [
            m.slippage_account
            for m in measured
            if m.row.get("symbol") == s and m.slippage_account is not None
        ]
        costs.append(sum(values) if values else None)
    shown = [(s, c) for s, c in zip(symbols, costs, strict=True) if c is not None]
    if shown:
        colours = ["#d62728" if c > 0 else "#2ca02c" for _, c in shown]
        bars = ax.bar([s for s, _ in shown], [c for _, c in shown], color=colours)
        for bar, (_, cost) in zip(bars, shown, strict=True):
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                bar.get_height(),
                f"{cost:,.2f}",
                ha="center",
                va="bottom" if cost >= 0 else "top",
                fontsize=8,
            )
        ax.axhline(0, color="black", linewidth=0.8)
    else:
        ax.text(0.5, 0.5, f"no fill convertible to {currency}", ha="center", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    money = document["overall"]["slippage_cost_account"]
    note = (
        f"; {money['unconverted_fills']} fills not convertible"
        if money["unconverted_fills"]
        else ""
    )
    ax.set_title(
        f"Slippage cost per symbol ({currency}; red = cost, green = price improvement{note})"
    )
    ax.set_ylabel(currency)
    ax.grid(axis="y", alpha=0.3)


def _empty(plt: Any, since: datetime, until: datetime, path: str) -> None:
    """A range without executions: one sentence, no empty axes."""
    fig = plt.figure(figsize=(10, 3), dpi=80)
    fig.text(
        0.5,
        0.5,
        f"No executions received between {since:%Y-%m-%d %H:%M} and {until:%Y-%m-%d %H:%M}"
        " UTC\n(widen --since/--until, or check DATABASE_URL)",
        ha="center",
        va="center",
        fontsize=14,
    )
    fig.savefig(path)
    plt.close(fig)


def _plain_log_ticks(ax: Any) -> None:
    """1, 10, 100 (and 20, 50 between) instead of 10^0 and 2x10^1."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def _size_text(size: timedelta) -> str:
    if size < timedelta(minutes=1):
        return f"{int(size.total_seconds())} s"
    minutes = int(size.total_seconds() // 60)
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 24 * 60:
        return f"{minutes // 60} h"
    return f"{minutes // (24 * 60)} d"
