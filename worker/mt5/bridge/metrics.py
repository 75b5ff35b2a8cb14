"""Prometheus metrics of one bridge process (``bridge-serve`` / ``sim-terminal``).

Each server owns a registry of its own (not the worker's process-wide one), served by
``--metrics-port``. Labels are bounded: ``cause`` and ``reason`` come from :data:`REASONS`
(anything else is ``other``), ``function`` from the call allow-list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from worker.mt5.bridge.protocol import ALLOWED_FUNCTIONS

# reason -> cause. Causes: handshake (TLS or secret handshake failed, timed out, not TLS),
# certificate (missing, unknown CA, expired, revoked...), allow_list (a valid certificate not
# on this bridge's list), frame (bad, oversized, tampered or replayed data after the
# handshake), function (a call outside the allow-list), capacity (too many connections).
REASONS: Final[Mapping[str, str]] = {
    "tls": "handshake",
    "handshake_timeout": "handshake",
    "bad_handshake": "handshake",
    "bad_auth": "handshake",
    "no_certificate": "certificate",
    "unknown_ca": "certificate",
    "expired": "certificate",
    "not_yet_valid": "certificate",
    "revoked": "certificate",
    "crl_expired": "certificate",
    "bad_purpose": "certificate",
    "bad_certificate": "certificate",
    "client_not_allowed": "allow_list",
    "oversized_frame": "frame",
    "bad_frame": "frame",
    "bad_value": "frame",
    "bad_request": "frame",
    "bad_mac": "frame",
    "bad_sequence": "frame",
    "bad_record": "frame",
    "not_allowed": "function",
    "max_connections": "capacity",
}
CAUSES: Final = ("handshake", "certificate", "allow_list", "frame", "function", "capacity")
OUTCOMES: Final = ("ok", "terminal_error", "unencodable", "stopping")
LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)


def cause_of(reason: str) -> str:
    return REASONS.get(reason, "frame")


class BridgeMetrics:
    """Refusals by cause, calls and latency by function, connected clients."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.refusals = Counter(
            "mt5_bridge_refusals",
            "Connections or calls the bridge refused, by cause and reason",
            ["cause", "reason"],
            registry=self.registry,
        )
        self.calls = Counter(
            "mt5_bridge_calls",
            "Terminal calls served, by function and outcome",
            ["function", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mt5_bridge_call_duration_seconds",
            "Time the terminal took to answer a call, by function",
            ["function"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.clients = Gauge(
            "mt5_bridge_connected_clients",
            "Connections that passed TLS, the allow-list and the handshake, now open",
            registry=self.registry,
        )
        # every series exists from the start, so increase() sees the first refusal
        for reason, cause in REASONS.items():
            self.refusals.labels(cause, reason)
        self.refusals.labels("frame", "other")
        for function in ALLOWED_FUNCTIONS:
            self.latency.labels(function)
            self.calls.labels(function, "ok")

    def refused(self, reason: str) -> str:
        """Count a refusal; returns its cause."""
        known = reason if reason in REASONS else "other"
        cause = cause_of(known)
        self.refusals.labels(cause, known).inc()
        return cause

    def called(self, function: str, outcome: str, seconds: float | None) -> None:
        if function not in ALLOWED_FUNCTIONS:
            return
        self.calls.labels(function, outcome if outcome in OUTCOMES else "other").inc()
        if seconds is not None:
            self.latency.labels(function).observe(seconds)

    def refusal_count(self, cause: str) -> float:
        """The total of one cause (tests and logs)."""
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == "mt5_bridge_refusals_total" and sample.labels["cause"] == cause:
                    total += sample.value
        return total

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` on ``host:port`` (0 picks a free port); returns the address."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        address = server.server_address
        return str(address[0]), int(address[1])


def metric_names() -> list[str]:
    """Every series name a bridge exports (for rule and dashboard checks)."""
    return [
        "mt5_bridge_refusals_total",
        "mt5_bridge_calls_total",
        "mt5_bridge_call_duration_seconds",
        "mt5_bridge_connected_clients",
    ]
