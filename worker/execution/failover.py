"""After a database failover: ask the broker by magic before the first send of an approval.

With asynchronous replication a promoted standby may lack the newest commits of the old
primary, intents included (DOMAIN.md 3.5): an approval whose order went out just before
the switch then has no row, and its redelivery looks new. The defence reuses the
reconcile-by-magic path of unknown outcomes instead of a mechanism of its own:

1. the intent is committed on the new primary as usual (the key is ours again, fenced by a
   lock taken on the new primary);
2. if the approval was decided before the switch (``Epochs.suspect``), the broker is asked
   for orders, deals and positions carrying the execution's magic (``inquiry.reconcile``,
   the comment token as a hint);
3. anything found, or a query that failed, makes the execution an unknown outcome of
   every leg: its in-flight row goes to the settler, which settles it from the broker's
   history (exactly as for a worker killed between its intent and its reply). Nothing is
   sent again. Nothing found: the approval was never executed, it is sent.

An order sent before the switch left the terminal seconds before the failover was
noticed (detection and promotion take seconds, the server's history lags by hundreds of
milliseconds), so no grace is waited for. With a synchronous standby
(``synchronous_standby_names``, ``synchronous_commit`` on) no commit is lost and this never
finds anything: it costs one history query per approval in the window.
"""

from __future__ import annotations

import logging
import time

from worker.execution import inquiry
from worker.execution.audit import Run
from worker.execution.plan import Plan
from worker.mt5.gateway import Gateway, GatewayRejection
from worker.store.epoch import Epochs

log = logging.getLogger(__name__)


def sent_before_switch(epochs: Epochs, plan: Plan, gateway: Gateway, run: Run) -> bool:
    """True: the broker shows (or may show) this execution's orders; do not send, settle.

    Called after the intent commit, before the first send; raises the terminal's
    TransportError (the row stays in flight and is settled from the broker later)."""
    if not epochs.suspect(plan.decided_at):
        return False
    try:
        found = inquiry.reconcile(gateway, plan, 0.0, time.sleep)
    except GatewayRejection as failed:
        log.warning(
            "approval decided before a database switch; broker query failed (%s):"
            " settled from the broker's history, not sent",
            failed,
        )
        return True
    finally:
        run.broker_calls("reconcile", gateway.drain_calls())
    if found.found:
        log.warning(
            "approval decided before a database switch is on the broker's books (orders %s):"
            " its lost row is settled from the broker, no second order",
            [order.ticket for order in (*found.history_orders, *found.open_orders)],
        )
        return True
    return False
