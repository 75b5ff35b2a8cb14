from __future__ import annotations

import socket

from tests.ports import _ephemeral_start, restartable_port


def test_a_restartable_port_lies_below_the_ephemeral_range_and_is_free() -> None:
    port = restartable_port()
    assert 10_000 <= port < _ephemeral_start()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
