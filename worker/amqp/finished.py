"""One log line per finished execution, like Celery's "succeeded" line:
``execution 3f0c9a1e FILLED EURUSD 1.86 lots in 14 ms`` (logger ``worker.executions``, INFO;
on with ``LOG_FORMAT=console``, in JSON only with ``LOG_LEVEL=DEBUG``: it runs on the IO
thread, and costs nothing when off).

Written when the broker confirmed the confirmation and the request is acked; the status and
symbol come from the routing key, the lots from the confirmation, the time from the
delivery's arrival."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from worker.execution.outcome import Publish

log = logging.getLogger("worker.executions")


def log_finished(publish: Publish, received_at: datetime, *, redelivered: bool) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    _, _, rest = publish.routing_key.partition(".")
    status, _, symbol = rest.partition(".")
    try:
        lots = json.loads(publish.payload).get("executed_lots")
    except (ValueError, AttributeError):
        lots = None
    ms = (datetime.now(UTC) - received_at).total_seconds() * 1000.0
    log.info(
        "execution %s %s %s %s lots in %.0f ms%s",
        str(publish.execution_id)[:8],
        status.upper() or "?",
        symbol or "-",
        "-" if not isinstance(lots, int | float) else f"{lots:g}",
        ms,
        " (redelivered)" if redelivered else "",
    )
