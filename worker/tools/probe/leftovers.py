"""What an interrupted probe left open: found by the probe's magic range, closed, verified.

A probe killed between an open and its close leaves a position; the next run closes every
position whose magic is in the probe's range (any run) before it trades, and again at the
end of its own run whatever happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from worker.mt5 import api
from worker.mt5.profile.use import worker_fillings
from worker.tools.probe.magic import is_probe_magic
from worker.tools.probe.orders import close_request, done
from worker.tools.probe.queries import Queries
from worker.tools.probe.trades import ProbeTradeError, verify_closed


def probe_positions(queries: Queries) -> list[api.TradePosition]:
    return [p for p in queries.positions() if is_probe_magic(p.magic)]


def _close(terminal: api.Terminal, position: api.TradePosition) -> bool:
    info = terminal.symbol_info(position.symbol)
    tick = terminal.symbol_info_tick(position.symbol)
    if info is None or tick is None:
        return False
    price = tick.ask if position.type == api.POSITION_TYPE_SELL else tick.bid
    for filling in worker_fillings(info.trade_exemode, info.filling_mode) or (0,):
        result = terminal.order_send(close_request(position, price, filling, "xprobe-close"))
        if done(result):
            return True
        if result is None or result.retcode != api.TRADE_RETCODE_INVALID_FILL:
            return False
    return False


def close_leftovers(
    terminal: api.Terminal,
    queries: Queries,
    *,
    sleep: Callable[[float], None] = time.sleep,
    wait_seconds: float = 10.0,
) -> int:
    """Close every open position of any probe run; returns how many. Raises
    ProbeTradeError when one cannot be closed (the operator must look)."""
    closed = 0
    for position in probe_positions(queries):
        terminal.symbol_select(position.symbol, True)
        if not _close(terminal, position):
            code, message = terminal.last_error()
            raise ProbeTradeError(
                f"could not close the probe's position {position.ticket} on {position.symbol} "
                f"({code} {message}): close it by hand"
            )
        verify_closed(queries, position.ticket, sleep, wait_seconds)
        closed += 1
    return closed
