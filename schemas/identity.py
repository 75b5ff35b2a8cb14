"""Deterministic identities derived from the RPM's idempotency key.

A redelivered approval must map to the same execution id, the same confirmation
``message_id`` and the same broker comment token, so that the terminal's history can tell
"already sent" from "never sent" (DOMAIN.md section 3).
"""

from __future__ import annotations

import hashlib
import re
import uuid

EXECUTION_NAMESPACE = uuid.UUID("6f1d3b52-8d0e-5b8e-9a55-0c7e4f2a9d11")
COMMENT_PREFIX = "xw"
# MT5 accepts at most 26 ASCII characters in a comment; ours are 2 + 20 = 22.
COMMENT_TOKEN_HEX_CHARS = 20
COMMENT_TOKEN_PATTERN = re.compile(r"^xw[0-9a-f]{20}$")
# uuid5 hashes the namespace's bytes and then the name: the namespace part is hashed once.
_NAMESPACE_SHA1 = hashlib.sha1(EXECUTION_NAMESPACE.bytes, usedforsecurity=False)


def execution_id_for(idempotency_key: str) -> uuid.UUID:
    """The execution id of an idempotency key (``uuid.uuid5(EXECUTION_NAMESPACE, key)``,
    stable across processes)."""
    digest = _NAMESPACE_SHA1.copy()
    digest.update(idempotency_key.encode("utf-8"))
    return uuid.UUID(bytes=digest.digest()[:16], version=5)


def comment_token_for(execution_id: uuid.UUID) -> str:
    """The MT5 order comment that marks the order of this execution (22 chars, [a-z0-9])."""
    return COMMENT_PREFIX + execution_id.hex[:COMMENT_TOKEN_HEX_CHARS]


# --- the order magic: deployment part and execution part (see worker/mt5/gateway/identity.py)
# PostgreSQL keeps the magic as a signed bigint: magic < 2**63, so 25 + 38 bits.
EXECUTION_MAGIC_BITS = 38
DEPLOYMENT_MAGIC_BITS = 63 - EXECUTION_MAGIC_BITS
MAX_DEPLOYMENT_MAGIC = (1 << DEPLOYMENT_MAGIC_BITS) - 1
_EXECUTION_MASK = (1 << EXECUTION_MAGIC_BITS) - 1


def check_deployment_magic(deployment_magic: int) -> int:
    """The configured magic, if it fits the deployment part (1 .. 2**25 - 1), else ValueError.

    0 is refused: it is the magic of orders placed by hand.
    """
    if not 1 <= deployment_magic <= MAX_DEPLOYMENT_MAGIC:
        raise ValueError(
            f"magic must be between 1 and {MAX_DEPLOYMENT_MAGIC} (it fills the top "
            f"{DEPLOYMENT_MAGIC_BITS} bits of every order's 63-bit magic)"
        )
    return deployment_magic


def order_magic_for(execution_id: uuid.UUID, deployment_magic: int) -> int:
    """The magic of this execution's orders: ``deployment << 38 | 38 bits of the id``.

    The 38 bits are the id's lowest ones, which the comment token does not carry (it holds
    the first 80), so a cut comment and the magic are independent evidence.
    """
    check_deployment_magic(deployment_magic)
    return (deployment_magic << EXECUTION_MAGIC_BITS) | (execution_id.int & _EXECUTION_MASK)


def deployment_of(magic: int) -> int:
    """The deployment part of an order magic; a legacy magic (< 2**38) is all deployment."""
    return magic >> EXECUTION_MAGIC_BITS if magic > _EXECUTION_MASK else magic


def is_legacy_magic(magic: int) -> bool:
    """A magic written before the execution part existed (the bare deployment magic)."""
    return 0 <= magic <= _EXECUTION_MASK
