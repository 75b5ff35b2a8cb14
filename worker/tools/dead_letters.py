"""``execution-worker dead-letters list | show ID | replay ID|--all [--reason R] | purge ID``.

Over ``execution.requests.dead`` (browsing without loss: ``worker.tools.dead_letters_queue``):

- ``list``: ID, reason, first seen, deliveries, key and a body preview (masked, bounded);
- ``show ID``: everything about the message(s) with that ID;
- ``replay ID`` / ``replay --all [--reason R]``: republish the original body and properties
  (same ``message_id``, the dead-lettering headers dropped) to ``execution.requests``; the
  worker's idempotency holds: an approval already executed is answered with its recorded
  confirmation, no second order. The dead letter is removed only after the broker confirmed
  the republished copy;
- ``purge ID``: remove for good.

Every replay and purge is recorded in ``execution.operator_actions`` (who, when, what) and
committed BEFORE it is carried out; without the database nothing is done. Exit codes: 0
done, 1 no such ID (or nothing matched), 2 broker or database unreachable, 3 a replay the
broker refused.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
from collections.abc import Sequence
from typing import Any

import pika.exceptions
import psycopg

from worker.amqp.topology import DEAD_QUEUE
from worker.config import load_settings, mask_url
from worker.errors import ExitCode
from worker.explain import describe_broker_error, describe_database_error
from worker.observability.logs import redact, register_settings_secrets
from worker.store.operator_actions import OperatorAction, record_action
from worker.tools.confirm import confirmed
from worker.tools.dead_letters_queue import (
    DeadLetter,
    DeadQueue,
    ReplayRefused,
    dead_queue,
)

LIST_PREVIEW_CHARS = 60
SHOW_PREVIEW_CHARS = 2000
DETAIL_PREVIEW_CHARS = 4000  # kept in the audit row


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _cell(value: Any, width: int) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def render_list(items: Sequence[DeadLetter]) -> str:
    if not items:
        return f"{DEAD_QUEUE}: empty"
    rows = [
        [
            item.id,
            item.reason,
            item.first_seen.isoformat(timespec="seconds") if item.first_seen else "-",
            str(item.delivery_count),
            _cell(redact(item.key) if item.key else None, 36),
            item.preview(LIST_PREVIEW_CHARS),
        ]
        for item in sorted(items, key=lambda i: (i.first_seen is None, i.first_seen, i.id))
    ]
    headers = ["id", "reason", "first seen (UTC)", "deliveries", "key", "body"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"{len(items)} dead letter(s) in {DEAD_QUEUE}")
    return "\n".join(lines)


def render_show(items: Sequence[DeadLetter]) -> str:
    out: list[str] = []
    for item in items:
        summary = item.summary(SHOW_PREVIEW_CHARS)
        headers = {key: value for key, value in item.headers.items() if key != "x-death"}
        summary["headers"] = json.loads(redact(json.dumps(headers, default=str)))
        summary["x-death"] = json.loads(json.dumps(item.headers.get("x-death"), default=str))
        width = max(len(k) for k in summary)
        if out:
            out.append("")
        out += [f"{key.ljust(width)}  {value}" for key, value in summary.items()]
    return redact("\n".join(out))


def _audit(
    conn: psycopg.Connection[Any], actor: str, action: str, item: DeadLetter, extra: dict[str, Any]
) -> int:
    props = item.properties
    return record_action(
        conn,
        OperatorAction(
            actor=actor,
            action=action,
            queue=DEAD_QUEUE,
            dead_letter_id=item.id,
            body_sha256=item.body_sha256(),
            message_id=props.message_id,
            idempotency_key=item.key,
            reason=item.reason,
            detail={
                "details": item.details,
                "first_seen": item.first_seen.isoformat() if item.first_seen else None,
                "delivery_count": item.delivery_count,
                "correlation_id": props.correlation_id,
                "reply_to": props.reply_to,
                "body_bytes": len(item.body),
                "preview": item.preview(DETAIL_PREVIEW_CHARS),
                **extra,
            },
        ),
    )


def _act(
    queue: DeadQueue,
    conn: psycopg.Connection[Any],
    action: str,
    items: Sequence[DeadLetter],
    actor: str,
) -> int:
    refused = 0
    for item in items:
        action_id = _audit(conn, actor, action, item, {})
        try:
            if action == "replay":
                queue.replay(item, action_id)
            else:
                queue.purge(item)
        except ReplayRefused as exc:
            refused += 1
            _audit(conn, actor, f"{action}-failed", item, {"error": str(exc), "of": action_id})
            print(f"{action} {item.id}: {exc} (left in {DEAD_QUEUE})", file=sys.stderr)
            continue
        print(
            f"{action} {item.id} (reason {item.reason}, key {redact(item.key or '-')}):"
            f" done, audit #{action_id}"
        )
    return ExitCode.FAILED if refused else ExitCode.OK


def _selected(queue: DeadQueue, args: argparse.Namespace) -> list[DeadLetter]:
    if getattr(args, "all", False):
        wanted = (args.reason or "").lower()
        return [item for item in queue.held if not wanted or item.reason.lower() == wanted]
    return queue.find(args.id)


def run(args: argparse.Namespace, amqp_url: str, database_url: str) -> int:
    action: str = args.action
    with dead_queue(amqp_url, args.limit) as queue:
        if action == "list":
            if args.json:
                for item in queue.held:
                    print(json.dumps(item.summary(), default=str))
            else:
                print(render_list(queue.held))
            return 0
        items = _selected(queue, args)
        if not items:
            what = "no dead letter" + (f" with ID {args.id!r}" if args.id else " matched")
            print(f"dead-letters {action}: {redact(what)} in {DEAD_QUEUE}", file=sys.stderr)
            return 1
        if action == "show":
            print(render_show(items))
            return 0
        if action == "purge" and not confirmed(
            f"purge {len(items)} dead letter(s) with ID {redact(args.id)!r} for good",
            assume_yes=args.yes,
        ):
            print("dead-letters purge: not confirmed; nothing removed", file=sys.stderr)
            return ExitCode.FAILED
        with psycopg.connect(database_url, connect_timeout=10, autocommit=True) as conn:
            return _act(queue, conn, action, items, args.actor or default_actor())


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    register_settings_secrets(settings)
    amqp_url = settings.rabbitmq_url.get_secret_value()
    database_url = settings.database_url.get_secret_value()
    try:
        return run(args, amqp_url, database_url)
    except pika.exceptions.AMQPConnectionError as exc:
        explained = describe_broker_error(exc, amqp_url)
        print(f"execution-worker dead-letters: {explained.line}", file=sys.stderr)
        return explained.code
    except pika.exceptions.AMQPError as exc:
        print(
            f"execution-worker dead-letters: RabbitMQ {mask_url(amqp_url)}:"
            f" {type(exc).__name__} {redact(str(exc))}",
            file=sys.stderr,
        )
        return ExitCode.BROKER_UNREACHABLE
    except psycopg.Error as exc:
        explained = describe_database_error(exc, database_url)
        print(
            f"execution-worker dead-letters: {explained.line}"
            " (nothing was replayed or purged without its audit row)",
            file=sys.stderr,
        )
        return explained.code
