"""The bridge server: one terminal, many authenticated clients, calls serialised by a lock.

Each accepted connection gets its own thread, so a client that stalls (during the TLS or
bridge handshake, or mid-frame) only holds its own thread; the handshake has a deadline.
Only the functions in :data:`ALLOWED_FUNCTIONS` can be called; anything else, a bad proof,
a bad MAC or sequence number, or an oversized frame closes the connection, is logged
(peer address and reason, never a secret or the offending payload) and counted in
:attr:`BridgeServer.refusals`.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import socket
import ssl
import threading
from collections import Counter
from typing import Any

from worker.mt5 import api
from worker.mt5.bridge.protocol import (
    ALLOWED_FUNCTIONS,
    CLIENT_TO_SERVER,
    MAX_FRAME_BYTES,
    NONCE_BYTES,
    PROTOCOL_VERSION,
    SERVER_TO_CLIENT,
    PeerClosed,
    ProtocolError,
    SecureChannel,
    Sock,
    client_proof,
    decode_value,
    dumps,
    encode_value,
    hex_field,
    loads,
    new_server_nonce,
    recv_frame,
    send_frame,
    server_proof,
    session_key,
)

_log = logging.getLogger("worker.mt5.bridge.client")
HANDSHAKE_FRAME_BYTES = 4096


class BridgeServer:
    """Serve ``terminal`` on ``host:port`` (port 0 picks a free one; see :attr:`address`)."""

    def __init__(
        self,
        terminal: api.Terminal,
        secret: bytes,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 32,
        handshake_timeout: float = 5.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        if not secret:
            raise ValueError("the bridge secret is empty")
        self.terminal = terminal
        self.lock = threading.Lock()  # the one terminal is not thread-safe
        self.refusals: Counter[str] = Counter()
        self.calls = 0
        self._secret = secret
        self._host = host
        self._port = port
        self._tls = tls
        self._max_connections = max_connections
        self._handshake_timeout = handshake_timeout
        self._max_frame_bytes = max_frame_bytes
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: set[Sock] = set()
        self._state = threading.Lock()
        self._stopping = threading.Event()

    def __repr__(self) -> str:
        return f"BridgeServer({self._host}:{self._port}, tls={self._tls is not None})"

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("server not started")
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> tuple[str, int]:
        listener = socket.create_server((self._host, self._port), reuse_port=False, backlog=64)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="bridge-accept", daemon=True
        )
        self._accept_thread.start()
        _log.info("bridge listening on %s:%d (tls=%s)", *self.address, self._tls is not None)
        return self.address

    def stop(self, timeout: float = 30.0) -> None:
        """Close the listener and every connection; wait for a call in progress to finish
        (its reply is lost: the client sees a TransportError and reconciles)."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._state:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        # a call in progress finishes before the terminal is released
        if self.lock.acquire(timeout=timeout):
            self.lock.release()

    def _refuse(self, peer: str, reason: str, detail: str = "") -> None:
        self.refusals[reason] += 1
        _log.warning(
            "bridge refused %s: %s%s",
            peer,
            reason,
            f" ({detail})" if detail else "",
            extra={"peer": peer, "reason": reason},
        )

    # --- connections -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, addr = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            peer = f"{addr[0]}:{addr[1]}"
            with self._state:
                full = len(self._connections) >= self._max_connections
                if not full:
                    self._connections.add(conn)
            if full:
                self._refuse(peer, "max_connections")
                conn.close()
                continue
            threading.Thread(
                target=self._serve_connection,
                args=(conn, peer),
                name=f"bridge-{peer}",
                daemon=True,
            ).start()

    def _serve_connection(self, raw: socket.socket, peer: str) -> None:
        sock: Sock = raw
        try:
            raw.settimeout(self._handshake_timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(raw, server_side=True)
                with self._state:
                    self._connections.discard(raw)
                    self._connections.add(sock)
            channel = self._handshake(sock)
            sock.settimeout(None)
            _log.debug("bridge client %s authenticated", peer)
            self._serve_calls(channel, peer)
        except PeerClosed:
            pass
        except ProtocolError as exc:
            self._refuse(peer, exc.reason, str(exc))
        except TimeoutError:
            self._refuse(peer, "handshake_timeout")
        except ssl.SSLError as exc:
            self._refuse(peer, "tls", exc.reason or type(exc).__name__)
        except OSError as exc:
            if not self._stopping.is_set():
                _log.info("bridge connection %s closed: %s", peer, type(exc).__name__)
        finally:
            with self._state:
                self._connections.discard(sock)
                self._connections.discard(raw)
            with contextlib.suppress(OSError):
                sock.close()

    def _handshake(self, sock: Sock) -> SecureChannel:
        server_nonce = new_server_nonce()
        hello = {"type": "hello", "v": PROTOCOL_VERSION, "nonce": server_nonce.hex()}
        send_frame(sock, dumps(hello), limit=HANDSHAKE_FRAME_BYTES)
        auth = loads(recv_frame(sock, limit=HANDSHAKE_FRAME_BYTES))
        if auth.get("type") != "auth":
            raise ProtocolError("bad_handshake", "expected auth")
        client_nonce = hex_field(auth, "nonce", NONCE_BYTES)
        proof = hex_field(auth, "mac", 32)
        if not hmac.compare_digest(proof, client_proof(self._secret, server_nonce, client_nonce)):
            raise ProtocolError("bad_auth", "client proof does not verify")
        welcome = {
            "type": "welcome",
            "mac": server_proof(self._secret, server_nonce, client_nonce).hex(),
        }
        send_frame(sock, dumps(welcome), limit=HANDSHAKE_FRAME_BYTES)
        return SecureChannel(
            sock,
            session_key(self._secret, server_nonce, client_nonce),
            outgoing=SERVER_TO_CLIENT,
            incoming=CLIENT_TO_SERVER,
            limit=self._max_frame_bytes,
        )

    # --- calls -----------------------------------------------------------------------

    def _serve_calls(self, channel: SecureChannel, peer: str) -> None:
        while not self._stopping.is_set():
            request = channel.recv()
            request_id = request.get("id")
            name = request.get("fn")
            if not isinstance(request_id, int) or not isinstance(name, str):
                raise ProtocolError("bad_request", "id and fn are required")
            if name not in ALLOWED_FUNCTIONS:
                self._refuse(peer, "not_allowed", f"function {name[:40]!r}")
                channel.send({"id": request_id, "ok": False, "error": "not_allowed"})
                return  # and close the connection
            args = decode_value(request.get("args", []))
            kwargs = decode_value(request.get("kwargs", {"$m": {}}))
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise ProtocolError("bad_request", "args must be a list, kwargs a map")
            channel.send(self._call(request_id, name, args, kwargs, peer))

    def _call(
        self, request_id: int, name: str, args: list[Any], kwargs: dict[str, Any], peer: str
    ) -> dict[str, Any]:
        function = getattr(self.terminal, name)
        with self.lock:
            if self._stopping.is_set():  # never start a call once stop() has begun
                return {"id": request_id, "ok": False, "error": "stopping"}
            self.calls += 1
            try:
                result = function(*args, **kwargs)
            except Exception as exc:  # the terminal's own failure, reported to the caller
                _log.warning("bridge call %s from %s raised %s", name, peer, type(exc).__name__)
                return {
                    "id": request_id,
                    "ok": False,
                    "error": "terminal_error",
                    "detail": f"{type(exc).__name__}: {exc}"[:300],
                }
            # read last_error under the same lock: another client's call would overwrite it
            error = self.terminal.last_error()
        try:
            encoded = encode_value(result)
        except TypeError as exc:
            return {"id": request_id, "ok": False, "error": "unencodable", "detail": str(exc)}
        return {"id": request_id, "ok": True, "result": encoded, "last_error": list(error)}
