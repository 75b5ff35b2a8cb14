"""Deterministic identities derived from the RPM's idempotency key.

A redelivered approval must map to the same execution id, the same confirmation
``message_id`` and the same broker comment token, so that the terminal's history can tell
"already sent" from "never sent" (DOMAIN.md section 3).
"""

from __future__ import annotations

import re
import uuid

EXECUTION_NAMESPACE = uuid.UUID("6f1d3b52-8d0e-5b8e-9a55-0c7e4f2a9d11")
COMMENT_PREFIX = "xw"
# MT5 accepts at most 26 ASCII characters in a comment; ours are 2 + 20 = 22.
COMMENT_TOKEN_HEX_CHARS = 20
COMMENT_TOKEN_PATTERN = re.compile(r"^xw[0-9a-f]{20}$")


def execution_id_for(idempotency_key: str) -> uuid.UUID:
    """The execution id of an idempotency key (uuid5, stable across processes)."""
    return uuid.uuid5(EXECUTION_NAMESPACE, idempotency_key)


def comment_token_for(execution_id: uuid.UUID) -> str:
    """The MT5 order comment that marks the order of this execution (22 chars, [a-z0-9])."""
    return COMMENT_PREFIX + execution_id.hex[:COMMENT_TOKEN_HEX_CHARS]
