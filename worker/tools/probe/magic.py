"""The probe's magic range: its orders are recognisable whatever a run was called.

``magic = PROBE_TAG << 38 | run << 8 | sequence``. ``PROBE_TAG`` is the largest deployment
part a worker's magic can have (``MAX_DEPLOYMENT_MAGIC``, schemas/identity.py): a worker
deployment must not use it as its ``MAGIC``. Its top bit is bit 62, so every probe order
also tests whether the server keeps a 63-bit magic whole.
"""

from __future__ import annotations

import secrets

from schemas.identity import EXECUTION_MAGIC_BITS, MAX_DEPLOYMENT_MAGIC

PROBE_TAG = MAX_DEPLOYMENT_MAGIC
_RUN_BITS = EXECUTION_MAGIC_BITS - 8
COMMENT_PREFIX = "xprobe"
COMMENT_CHARS = 26  # the most the binding accepts


def new_run() -> int:
    return secrets.randbits(_RUN_BITS)


def probe_magic(run: int, sequence: int) -> int:
    return PROBE_TAG << EXECUTION_MAGIC_BITS | (run % (1 << _RUN_BITS)) << 8 | sequence % 256


def is_probe_magic(magic: int) -> bool:
    return magic >> EXECUTION_MAGIC_BITS == PROBE_TAG


def probe_comment(run: int, sequence: int) -> str:
    """26 characters, every one distinct by position: a cut shows exactly where."""
    body = f"{COMMENT_PREFIX}{run:010x}{sequence:04d}abcdef"
    return body[:COMMENT_CHARS].ljust(COMMENT_CHARS, "z")
