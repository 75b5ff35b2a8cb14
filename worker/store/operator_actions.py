"""``execution.operator_actions``: what operators did to dead letters (append-only, 0003).

An action is recorded (and committed) BEFORE it is carried out, so no replay or purge
happens without its row; an action that then fails gets a second row ``<action>-failed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row


@dataclass(frozen=True)
class OperatorAction:
    actor: str
    action: str  # replay | purge | replay-failed | purge-failed
    queue: str
    dead_letter_id: str
    body_sha256: str
    message_id: str | None = None
    idempotency_key: str | None = None
    reason: str | None = None
    detail: dict[str, Any] | None = None


def record_action(conn: psycopg.Connection[Any], action: OperatorAction) -> int:
    """Insert and commit one action; its ``action_id``."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO execution.operator_actions (actor, action, queue, dead_letter_id,"
            " message_id, idempotency_key, reason, body_sha256, detail)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb) RETURNING action_id",
            (
                action.actor,
                action.action,
                action.queue,
                action.dead_letter_id,
                action.message_id,
                action.idempotency_key,
                action.reason,
                action.body_sha256,
                json.dumps(action.detail, default=str) if action.detail is not None else None,
            ),
        ).fetchone()
    assert row is not None
    return int(row[0])


def actions_since(conn: psycopg.Connection[Any], since: datetime) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT * FROM execution.operator_actions WHERE at >= %s ORDER BY action_id",
            (since,),
        )
        return [dict(row) for row in cur.fetchall()]
