"""How the gateway recognises our orders, deals and positions on the trade server.

Servers keep ``magic`` (``ulong`` in MqlTradeRequest, ``long`` as ORDER_MAGIC) on orders,
deals and positions, but cut comments (the MQL5 reference's ``history_deals_get`` example
shows 16 characters kept), and some rewrite or blank them. So:

**The rule**

1. Every order of an execution carries ``magic = deployment << 38 | execution bits``:
   ``deployment`` is the configured ``MAGIC`` (1 .. 2**25-1, checked at config load), the
   execution bits are the lowest 38 bits of the execution id
   (``schemas.identity.order_magic_for``); the whole stays below 2**63 (PostgreSQL bigint).
   The comment is the execution's token (``xw`` + the first 20 hex digits of the id).
2. An order, deal or position is **ours** (this deployment's: hedging closes, exposure)
   iff its magic's deployment part equals the configured magic (``magic >> 38``), or its
   magic is the bare configured magic (orders sent before this scheme).
3. It belongs to **one execution** iff it is on the execution's broker symbol, its magic
   equals the execution's magic exactly, and its comment does not name another execution.
   The comment is a hint, compared by prefix: the server's comment "names this execution"
   when it is the token, a prefix of it at least 12 characters long (``xw`` + 10 hex), or
   starts with the token; it "names another execution" when it starts with ``xw`` + 10 hex
   digits and is none of these; anything else (empty, cut short, rewritten) names nothing
   and the magic decides. A comment that names another execution vetoes a magic match
   (two executions sharing 38 bits of id); a comment never matches without the magic.
4. Legacy rows (in flight from before this scheme) keep their identity: the row's stored
   magic is the bare deployment magic (< 2**38), and its orders match iff the magic is
   equal AND the comment names the execution (exact token or a prefix of >= 12
   characters); an empty or rewritten comment cannot identify a legacy order.

The identity used to reconcile comes from the row (its stored magic and token), so a row
sent under either scheme is found by the rule it was sent under.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Literal

from schemas.identity import (
    comment_token_for,
    deployment_of,
    is_legacy_magic,
    order_magic_for,
)

MIN_COMMENT_PREFIX = 12  # "xw" + 10 hex digits = 40 bits of the id
_NAMES_AN_EXECUTION = re.compile(r"^xw[0-9a-f]{10}")

CommentRelation = Literal["same", "other", "unknown"]


@dataclass(frozen=True)
class OrderIdentity:
    """What marks one execution's orders on the server: the magic and the comment token."""

    magic: int
    comment_token: str

    @classmethod
    def for_execution(cls, execution_id: uuid.UUID, deployment_magic: int) -> OrderIdentity:
        return cls(order_magic_for(execution_id, deployment_magic), comment_token_for(execution_id))

    @property
    def legacy(self) -> bool:
        """Sent before the execution part existed: magic is the bare deployment magic."""
        return is_legacy_magic(self.magic)

    def matches(self, magic: int, comment: str) -> bool:
        """Rule 3 (and 4 for legacy identities) for one order, deal or position."""
        if magic != self.magic:
            return False
        relation = comment_relation(comment, self.comment_token)
        if self.legacy:
            return relation == "same"
        return relation != "other"


def comment_relation(comment: str, token: str) -> CommentRelation:
    """Whether a server's comment names this execution, another one, or nothing."""
    seen = comment.strip()
    if seen and (
        seen == token
        or (len(seen) >= MIN_COMMENT_PREFIX and token.startswith(seen))
        or seen.startswith(token)
    ):
        return "same"
    if _NAMES_AN_EXECUTION.match(seen):
        return "other"
    return "unknown"


def is_deployment_magic(magic: int, deployment_magic: int) -> bool:
    """Rule 2: an order of this deployment (either scheme)."""
    return magic == deployment_magic or deployment_of(magic) == deployment_magic
