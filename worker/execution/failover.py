"""After a database failover: ask the broker by magic before the first send of an approval.

With asynchronous replication a promoted standby may lack the newest commits of the old
primary, intents included (DOMAIN.md 3.5): an approval whose order went out just before
the switch then has no row, and its redelivery looks new. The defence reuses the
reconcile-by-magic path of unknown outcomes instead of a mechanism of its own:

1. an approval decided before the switch (``Epochs.suspect``: give or take the approval
   TTL) is looked for on the broker's books before a session is claimed for it: orders,
   deals and positions carrying the execution's magic (``Gateway.reconcile``, the comment
   token as a hint), on every session of this process that could have served it, each
   claimed in turn and released (never two at once: handlers doing this cannot deadlock);
2. found on a session: that session is claimed for the approval, which is validated and
   its intent committed as usual, and nothing is sent: the caller hands the in-flight row
   to the settler, which settles it from the broker's history exactly as for a worker
   killed between its intent and its reply;
3. a session it cannot ask (busy past the claim timeout, a failed query): nothing is
   written and the delivery is requeued, so the question is asked again later;
4. found nowhere, until the reconcile grace has passed since the switch: requeued and
   asked again. An order sent just before the switch may still be invisible: its reply
   unknown and its execution late, or its deals lagging (DOMAIN.md, section 2). The grace is the
   bound the worker already trusts for an unknown outcome to show, and it counts from when
   this process noticed the switch, which is after the last send to the old primary;
5. found nowhere after that: the approval was never executed; it is sent as usual.

Limits: sessions of other processes are not asked (an approval executed there before the
switch and redelivered here is not seen: run one process per account set, or a synchronous
standby); with a synchronous standby (``synchronous_standby_names``, ``synchronous_commit``
on) no commit is lost and this check only costs one history query per session and approval
in the window, plus the grace for approvals the broker has nothing of.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from schemas.request import ExecutionRequest
from worker.execution.audit import Run
from worker.execution.outcome import Requeue
from worker.mt5 import api
from worker.mt5.gateway import Gateway, GatewayRejection
from worker.pool.leases import ClaimTimeout

if TYPE_CHECKING:
    from worker.execution.pipeline import Pipeline

log = logging.getLogger(__name__)

PADDING = timedelta(minutes=5)  # as inquiry.RECONCILE_PADDING: the history window's margin


def find_before_claim(
    pipeline: Pipeline, request: ExecutionRequest, run: Run
) -> str | Requeue | None:
    """The id of the session whose account shows the approval's orders (claim it, commit
    the intent, send nothing); None: send as usual; Requeue: a session could not be asked."""
    if not pipeline.store.epochs.suspect(request.decided_at):
        return None
    trade = request.trade
    assert trade is not None  # checks.refusal guarantees an approved trade
    broker_symbol = pipeline.settings.broker_symbol_for(trade.symbol)
    for session_id in _candidates(pipeline, request):
        try:
            lease = pipeline.sessions.claim(
                pipeline.settings.claim_timeout_seconds, session_id=session_id
            )
        except ClaimTimeout:
            return Requeue(f"after a database switch: session {session_id} could not be asked")
        with lease:
            found = _ask(lease.session.gateway, request, broker_symbol, run)
        if found is None:
            return Requeue("after a database switch: the broker could not be asked")
        if found:
            log.warning(
                "approval decided before a database switch is on the broker's books"
                " (session %s): its lost row is settled from the broker, no second order",
                session_id,
            )
            return session_id
    return _grace_left(pipeline)


def _grace_left(pipeline: Pipeline) -> Requeue | None:
    """Requeue while the reconcile grace since the switch runs (point 4 above)."""
    grace = pipeline.settings.reconcile_grace_seconds
    if not pipeline.store.epochs.switched_within(grace):
        return None
    return Requeue(
        f"after a database switch: nothing on the broker's books yet; asked again until"
        f" {grace:g} s after the switch"
    )


def _candidates(pipeline: Pipeline, request: ExecutionRequest) -> list[str]:
    """This process's sessions that could have served the approval (its account's)."""
    listed = getattr(pipeline.sessions, "session_specs", None)
    if listed is None:
        return []
    return [
        spec.id for spec in listed() if request.account is None or spec.account == request.account
    ]


def _ask(gateway: Gateway, request: ExecutionRequest, broker_symbol: str, run: Run) -> bool | None:
    """Whether the broker shows the execution's orders (None: it could not be asked)."""
    try:
        identity = gateway.identity_for(request.execution_id)
        since = request.received_at - PADDING
        return gateway.reconcile(identity, broker_symbol, since).found
    except (GatewayRejection, api.TransportError) as failed:
        log.warning("after a database switch, a broker query failed: %s", failed)
        return None
    finally:
        run.broker_calls("reconcile", gateway.drain_calls())
