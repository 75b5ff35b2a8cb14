"""Read-only queries of the audit store for the desk tools (``report``, ``trail --since``).

Nothing here writes: an operator role with SELECT on ``execution`` runs them
(deploy/sql/roles.sql).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

# What the execution-quality report needs of each execution received in the window. ``pip``
# and ``contract_size`` are the symbol's, as the intent recorded them in its request snapshot.
_REPORT_ROWS = """
SELECT execution_id, state, rejection_reason, symbol, direction, session_id, account_login, account,
       intended_lots, executed_lots, requested_price, fill_price, spread_pips, slippage_pips,
       arrival_bid, arrival_ask,
       (request ->> 'pip')::float8 AS pip,
       (request ->> 'contract_size')::float8 AS contract_size,
       decided_at, received_at, submitted_at, completed_at
FROM execution.executions
WHERE received_at >= %(since)s AND received_at < %(until)s
ORDER BY received_at, execution_id
"""


def report_rows(
    conn: psycopg.Connection[Any], since: datetime, until: datetime
) -> list[dict[str, Any]]:
    """Every execution received in ``[since, until)``, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_REPORT_ROWS, {"since": since, "until": until})
        return [dict(row) for row in cur.fetchall()]


@dataclass(frozen=True)
class RangeFilter:
    """``trail --since/--until`` and its filters (None: any)."""

    since: datetime
    until: datetime
    status: str | None = None
    symbol: str | None = None
    account: str | None = None  # an account's name, or a login
    limit: int = 200


def executions_in_range(conn: psycopg.Connection[Any], where: RangeFilter) -> list[dict[str, Any]]:
    """Execution rows received in the range that match the filters, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT * FROM execution.executions"
            " WHERE received_at >= %(since)s AND received_at < %(until)s"
            " AND (%(status)s::text IS NULL OR state = %(status)s)"
            " AND (%(symbol)s::text IS NULL OR symbol = %(symbol)s OR broker_symbol = %(symbol)s)"
            " AND (%(account)s::text IS NULL OR account = %(account)s"
            " OR account_login::text = %(account)s)"
            " ORDER BY received_at, execution_id LIMIT %(limit)s",
            {
                "since": where.since,
                "until": where.until,
                "status": where.status,
                "symbol": where.symbol,
                "account": where.account,
                "limit": where.limit,
            },
        )
        return [dict(row) for row in cur.fetchall()]
