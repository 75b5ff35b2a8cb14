"""Ports for test servers that stop and start again on the same port.

A port the kernel handed out with ``bind(0)`` lies in the ephemeral range, which it also uses
for the local end of outgoing connections: once the server stops, any new connection on the
machine may take that port, and the restart fails with EADDRINUSE. Ports below the ephemeral
range are never handed out that way, so a stopped server can have its port back.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_FALLBACK_EPHEMERAL_START = 32768
_LOWEST = 10_000


def _ephemeral_start() -> int:
    try:
        low, _high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low)
    except (OSError, ValueError):
        return _FALLBACK_EPHEMERAL_START


def restartable_port(host: str = "127.0.0.1") -> int:
    """A free port below the ephemeral range (checked by binding it once)."""
    high = _ephemeral_start() - 1
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randint(_LOWEST, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {_LOWEST} and {high}")
