"""Injected faults of the simulated terminal: latency, dropped connections, scripted and
random outcomes of ``order_send`` (late executions among them), and slippage. Each draws from
its own seeded generator, so a run is reproducible from ``SimConfig.seed`` (or
``FaultConfig.fault_seed``).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections import deque

from worker.mt5 import api
from worker.mt5.sim.config import FaultConfig, SimConfig, SimSymbol

# scripted outcomes that answer with a retcode and execute nothing
SCRIPTED_RETCODES = {
    "requote": api.TRADE_RETCODE_REQUOTE,
    "price_changed": api.TRADE_RETCODE_PRICE_CHANGED,
    "off_quotes": api.TRADE_RETCODE_PRICE_OFF,
    "reject": api.TRADE_RETCODE_REJECT,
    "too_many_requests": api.TRADE_RETCODE_TOO_MANY_REQUESTS,
    "locked": api.TRADE_RETCODE_LOCKED,
    "frozen": api.TRADE_RETCODE_FROZEN,
    "invalid_fill": api.TRADE_RETCODE_INVALID_FILL,
    "error": api.TRADE_RETCODE_ERROR,
    "connection": api.TRADE_RETCODE_CONNECTION,
    "timeout": api.TRADE_RETCODE_TIMEOUT,
}

# what a failed history/position query leaves in last_error() (the connection stays up)
QUERY_ERRORS = (
    (api.RES_E_INTERNAL_FAIL_TIMEOUT, "IPC timeout"),
    (api.RES_E_INVALID_PARAMS, "Terminal: Invalid params"),
)


class FaultInjector:
    """The current ``FaultConfig`` and the generators that draw its faults."""

    def __init__(self, config: SimConfig) -> None:
        self._seed = config.seed
        self._slip_rng = random.Random(config.seed * 1_000_003 + 2)
        # server hardening draws have their own generator: turning them on leaves the
        # sequence of the classic faults (and so existing scenarios) unchanged
        self._server_rng = random.Random(config.seed * 104_729 + 3)
        self._scripted: deque[str] = deque()
        self.config = config.faults
        self.apply(config.faults, reseed=True)

    def apply(self, faults: FaultConfig, *, reseed: bool) -> None:
        if reseed:
            seed = faults.fault_seed
            self._rng = random.Random(self._seed * 7_919 + 1 if seed is None else seed)
            self._scripted = deque(faults.scripted)
        weights = [w for _, w in faults.slippage_points]
        self._slip_values = [p for p, _ in faults.slippage_points]
        self._slip_cumulative = list(itertools.accumulate(weights))
        self.config = faults

    def rescript(self) -> None:
        self._scripted = deque(self.config.scripted)

    def call_delay_ms(self, function: str) -> float:
        faults = self.config
        delay = faults.latency_by_function.get(function, faults.latency_ms)
        if faults.latency_jitter_ms:
            delay += self._rng.uniform(0.0, faults.latency_jitter_ms)
        return delay

    def drops_connection(self) -> bool:
        rate = self.config.disconnect_rate
        return bool(rate) and self._rng.random() < rate

    def next_outcome(self, instant: bool) -> str:
        """The outcome of the next ``order_send`` (one of ``SCRIPTED_OUTCOMES``)."""
        if self._scripted:
            return self._scripted.popleft()
        faults = self.config
        draws = (
            ("too_many_requests", faults.too_many_requests_rate),
            ("reject", faults.reject_rate),
            ("requote", faults.requote_rate if instant else 0.0),
            ("timeout_executed" if faults.timeout_executes else "timeout", faults.timeout_rate),
            ("no_result", faults.no_result_rate),
            ("lost_reply", faults.lost_reply_rate),
            # last, and drawn only when set: the sequence of the faults above is unchanged
            ("timeout_late", faults.late_timeout_rate),
            ("lost_reply_late", faults.late_lost_reply_rate),
        )
        for name, rate in draws:
            if rate and self._rng.random() < rate:
                return name
        return "ok"

    def late_delay_seconds(self) -> float:
        """How long after the call a late order (``timeout_late``/``lost_reply_late``) executes."""
        low, high = self.config.late_execution_seconds
        return self._rng.uniform(low, high)

    def deal_lag_seconds(self) -> float:
        """How long a new deal stays out of ``history_deals_get``."""
        faults = self.config
        lag = faults.deal_lag_ms
        if faults.deal_lag_jitter_ms:
            lag += self._server_rng.uniform(0.0, faults.deal_lag_jitter_ms)
        return lag / 1000.0

    def hides_deal_ticket(self) -> bool:
        """Whether this 10009/10010 reply carries ``deal`` 0."""
        rate = self.config.deal_zero_rate
        return bool(rate) and self._server_rng.random() < rate

    def query_failure(self) -> tuple[int, str] | None:
        """The ``last_error()`` of a history/position query that answers None, or None."""
        rate = self.config.query_none_rate
        if not rate or self._server_rng.random() >= rate:
            return None
        return self._server_rng.choice(QUERY_ERRORS)

    def slipped(self, symbol: SimSymbol, price: float, is_buy: bool) -> float:
        if not self._slip_values:
            return price
        draw = self._slip_rng.random() * self._slip_cumulative[-1]
        points = self._slip_values[
            min(bisect.bisect_right(self._slip_cumulative, draw), len(self._slip_values) - 1)
        ]
        signed = points if is_buy else -points
        return round(price + signed * symbol.point, symbol.digits)
