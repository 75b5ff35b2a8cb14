"""The runtime's settings and counters, shared by its parts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from worker.config import Settings


@dataclass(frozen=True)
class RuntimeOptions:
    prefetch: int  # handler threads
    settling_prefetch: int = 0  # more unacked deliveries: those waiting on the settler
    delivery_limit: int = 20
    drain_timeout_seconds: float = 30.0
    requeue_delay_seconds: float = 1.0
    sweep_interval_seconds: float = 10.0
    sweep_limit: int = 500
    outbox_backoff_seconds: float = 10.0  # a refused confirmation waits 10 s, 20 s, 40 s...
    outbox_backoff_max_seconds: float = 300.0  # ... at most 5 min (parked requests wait too)
    reconnect_min_delay_seconds: float = 0.5
    reconnect_max_delay_seconds: float = 30.0
    metrics_refresh_seconds: float = 5.0  # the callback gauges, refreshed on the heartbeat
    connection_name: str = field(default_factory=lambda: f"execution-worker pid={os.getpid()}")

    @classmethod
    def from_settings(cls, settings: Settings, sessions: int) -> RuntimeOptions:
        """prefetch = the sessions of this process, unless ``PREFETCH`` overrides it; the
        channel's prefetch adds ``SETTLING_PREFETCH`` for the deliveries parked on the
        settler (they hold no handler and no session)."""
        return cls(
            prefetch=settings.prefetch or max(1, sessions),
            settling_prefetch=settings.settling_prefetch,
            delivery_limit=settings.delivery_limit,
            drain_timeout_seconds=settings.drain_timeout_seconds,
        )

    @property
    def channel_prefetch(self) -> int:
        return self.prefetch + self.settling_prefetch


@dataclass
class RuntimeStats:
    """Counters, updated on the IO thread (read them after ``run`` returns, or for display)."""

    consumed: int = 0
    acked: int = 0
    ack_frames: int = 0  # basic_ack frames sent (one multiple ack settles several)
    confirmations_published: int = 0
    dead_lettered: int = 0
    requeued: int = 0
    requeued_to_back: int = 0  # published again at the back of the queue (account busy)
    handler_errors: int = 0
    returned: int = 0
    unrouted: int = 0  # returned confirmations the worker moved to the unrouted queue
    nacked: int = 0
    reply_returned: int = 0
    stale_results: int = 0
    outbox_republished: int = 0
    sweeps: int = 0  # outbox sweeps whose publishes all have their outcome
    connections: int = 0
    consumer_cancels: int = 0  # Basic.Cancel from the broker
