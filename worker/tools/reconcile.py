"""``execution-worker reconcile``: settle every in-flight execution against the terminals."""

from __future__ import annotations

import argparse
import json

from worker.config import load_settings
from worker.execution.outcome import Publish


def main(args: argparse.Namespace) -> int:
    from worker.explain import require_database
    from worker.service import Service

    settings = load_settings()
    require_database(settings.database_url.get_secret_value())
    service = Service.start(settings, recover=False)
    unresolved = 0
    try:
        settings = service.settings
        wait = settings.order_timeout_seconds + settings.reconcile_grace_seconds + 5.0
        for row, outcome in service.recover(wait_seconds=wait):
            settled = isinstance(outcome, Publish)
            unresolved += 0 if settled else 1
            record = {
                "execution_id": str(row.execution_id),
                "idempotency_key": row.get("idempotency_key"),
                "symbol": row.get("symbol"),
                "state_before": row.state,
                "result": json.loads(outcome.payload) if isinstance(outcome, Publish) else None,
                "unresolved_reason": None if settled else getattr(outcome, "reason", None),
            }
            if args.json:
                print(json.dumps(record))
            else:
                status = record["result"]["status"] if record["result"] else "UNRESOLVED"
                print(f"{record['execution_id']}  {row.state:>10} -> {status}")
        if not args.json:
            print(f"reconcile: done, {unresolved} unresolved")
    finally:
        service.close()
    return 1 if unresolved else 0
