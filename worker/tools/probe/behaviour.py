"""Round trips -> the profile's behaviour section (pure)."""

from __future__ import annotations

from collections.abc import Sequence

from worker.mt5.profile.model import BehaviourProfile
from worker.tools.probe.stats import comment_kept, percentile, rate
from worker.tools.probe.trades import RoundTrip


def _kept(trips: Sequence[RoundTrip], served: Sequence[str | None]) -> tuple[int, str | None]:
    """Fewest characters kept over the comments seen, and a rewrite if there was one."""
    fewest: int | None = None
    rewrite: str | None = None
    for trip, comment in zip(trips, served, strict=True):
        if comment is None:
            continue
        kept, rewritten = comment_kept(trip.comment_sent, comment)
        fewest = kept if fewest is None else min(fewest, kept)
        rewrite = rewrite if rewritten is None else rewritten
    return (fewest if fewest is not None else 0), rewrite


def summarise(trips: Sequence[RoundTrip], queries: int, none_answers: int) -> BehaviourProfile:
    if not trips:
        raise ValueError("no round trips to summarise")
    replies = [reply for trip in trips for reply in trip.replies]
    latencies = [reply.latency_ms for reply in replies]
    deal_lags = [r.deal_lag_ms for r in replies if r.deal_lag_ms is not None]
    order_lags = [r.order_lag_ms for r in replies if r.order_lag_ms is not None]
    on_orders, rewrite_orders = _kept(trips, [t.comment_order for t in trips])
    on_deals, rewrite_deals = _kept(trips, [t.comment_deal for t in trips])
    positions = [t.comment_position for t in trips]
    on_positions = _kept(trips, positions)[0] if any(p is not None for p in positions) else None
    kept = min(k for k in (on_orders, on_deals, on_positions) if k is not None)
    differs = [t.position_ticket_differs for t in trips if t.position_ticket_differs is not None]
    deal_zero = sum(reply.deal_zero for reply in replies)
    return BehaviourProfile(
        comment_sent_chars=len(trips[0].comment_sent),
        comment_chars_kept=kept,
        comment_chars_kept_orders=on_orders,
        comment_chars_kept_deals=on_deals,
        comment_chars_kept_positions=on_positions,
        comment_rewritten_to=rewrite_deals if rewrite_deals is not None else rewrite_orders,
        magic_63_bit_kept=all(trip.magic_kept for trip in trips),
        replies=len(replies),
        reply_latency_ms_p50=round(percentile(latencies, 0.5), 2),
        reply_latency_ms_p95=round(percentile(latencies, 0.95), 2),
        deal_zero_replies=deal_zero,
        deal_zero_rate=round(rate(deal_zero, len(replies)), 4),
        deal_lag_samples=len(deal_lags),
        deal_lag_ms_min=round(min(deal_lags, default=0.0), 2),
        deal_lag_ms_p50=round(percentile(deal_lags, 0.5), 2),
        deal_lag_ms_p90=round(percentile(deal_lags, 0.9), 2),
        deal_lag_ms_max=round(max(deal_lags, default=0.0), 2),
        history_order_lag_ms_p50=round(percentile(order_lags, 0.5), 2),
        history_order_lag_ms_max=round(max(order_lags, default=0.0), 2),
        history_queries=queries,
        history_none_rate=round(rate(none_answers, queries), 4),
        position_ticket_differs=any(differs) if differs else None,
    )
