"""A TCP proxy that forwards TLS records one by one, for tampering tests (no tests here).

Client-to-server bytes are cut into records (``type | version (2) | length (2) | body``), so
a test can flip a byte of the next application-data record, replay a recorded one on the
same connection, or replay a whole recorded stream on a new connection. Server-to-client
bytes are copied unchanged.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

APPLICATION_DATA = 23
_HEADER = struct.Struct(">BHH")


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class RecordProxy:
    """Listens on 127.0.0.1; every accepted connection is relayed to ``upstream``."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._mutate: Callable[[bytes], bytes] | None = None
        self._server_side: socket.socket | None = None
        self.stream = bytearray()  # every client-to-server byte of the latest connection
        self.records: list[bytes] = []  # its application-data records, as sent
        self.closed_by_server = threading.Event()
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tamper_next(self, mutate: Callable[[bytes], bytes]) -> None:
        """Apply ``mutate`` to the next client application-data record (once)."""
        with self._lock:
            self._mutate = mutate

    def inject(self, record: bytes) -> None:
        """Send ``record`` to the server on the latest connection, as if the client had."""
        with self._lock:
            assert self._server_side is not None
            self._server_side.sendall(record)

    def close(self) -> None:
        self._stopping = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream, timeout=10)
            server.settimeout(None)
            with self._lock:
                self._server_side = server
                self.stream = bytearray()
                self.records = []
                self.closed_by_server.clear()
            threading.Thread(
                target=self._client_to_server, args=(client, server), daemon=True
            ).start()
            threading.Thread(
                target=self._server_to_client, args=(server, client), daemon=True
            ).start()

    def _client_to_server(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while True:
                header = _recv_exact(client, _HEADER.size)
                if header is None:
                    break
                kind, _, length = _HEADER.unpack(header)
                body = _recv_exact(client, length)
                if body is None:
                    break
                record = header + body
                with self._lock:
                    if kind == APPLICATION_DATA and self._mutate is not None:
                        record, self._mutate = self._mutate(record), None
                    self.stream += record
                    if kind == APPLICATION_DATA:
                        self.records.append(record)
                    server.sendall(record)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_WR)

    def _server_to_client(self, server: socket.socket, client: socket.socket) -> None:
        try:
            while chunk := server.recv(65536):
                client.sendall(chunk)
        except OSError:
            pass
        finally:
            self.closed_by_server.set()
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()


def flip_last_byte(record: bytes) -> bytes:
    """Flip one bit of the record's authentication tag (its last byte)."""
    return record[:-1] + bytes([record[-1] ^ 0x01])
