"""The bridge server: one terminal, many authenticated clients, calls serialised by a lock.

A client gets through three gates, in order: mutual TLS 1.3 (a certificate from the client
CA, unexpired, unrevoked: :mod:`worker.mt5.bridge.tls`), the allow-list of client
certificate names, and the shared-secret handshake of :mod:`worker.mt5.bridge.protocol`
(the only gate on loopback without TLS; a second factor behind mutual TLS). Off loopback the
server refuses to start without mutual TLS.

Each accepted connection gets its own thread, so a client that stalls (during the TLS or
bridge handshake, or mid-frame) only holds its own thread; the handshake has a deadline.
Only the functions in :data:`ALLOWED_FUNCTIONS` can be called; anything else, a failed
gate, a bad MAC or sequence number, a tampered TLS record or an oversized frame closes the
connection, is logged (peer address and reason, never a secret or the offending payload)
and counted in :attr:`BridgeServer.refusals` and :class:`BridgeMetrics` (by cause).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from typing import Any

from worker.mt5 import api
from worker.mt5.bridge.metrics import BridgeMetrics
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
from worker.mt5.bridge.tls import (
    ClientAllowList,
    certificate_names,
    check_listen_address,
    is_mutual,
    refusal_reason,
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
        allowed_clients: ClientAllowList | None = None,
        metrics: BridgeMetrics | None = None,
        insecure_network: bool = False,
    ) -> None:
        """``tls`` with ``verify_mode == CERT_REQUIRED`` (see ``tls.server_context``) is mutual
        TLS and needs ``allowed_clients``; off loopback it is required unless
        ``insecure_network`` (the simulator in a private container network only)."""
        if not secret:
            raise ValueError("the bridge secret is empty")
        mutual = is_mutual(tls)
        if mutual and allowed_clients is None:
            raise ValueError("client certificates need an allow-list of client names")
        if allowed_clients is not None and not mutual:
            raise ValueError("a client allow-list needs TLS with client certificates")
        check_listen_address(host, mutual_tls=mutual, insecure_network=insecure_network)
        self.terminal = terminal
        self.lock = threading.Lock()  # the one terminal is not thread-safe
        self.refusals: Counter[str] = Counter()
        self.calls = 0
        self.metrics = metrics or BridgeMetrics()
        self._allowed = allowed_clients
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
        return f"BridgeServer({self._host}:{self._port}, tls={self._mode})"

    @property
    def _mode(self) -> str:
        return "mutual" if is_mutual(self._tls) else "server" if self._tls else "none"

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
        _log.info("bridge listening on %s:%d (tls=%s)", *self.address, self._mode)
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
        cause = self.metrics.refused(reason)
        _log.warning(
            "bridge refused %s: %s%s",
            peer,
            reason,
            f" ({detail})" if detail else "",
            extra={"peer": peer, "reason": reason, "cause": cause},
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
        tls_done = False
        counted = False
        try:
            raw.settimeout(self._handshake_timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(raw, server_side=True)
                tls_done = True
                with self._state:
                    self._connections.discard(raw)
                    self._connections.add(sock)
                if not self._client_allowed(sock, peer):
                    return
            channel = self._handshake(sock)
            sock.settimeout(None)
            _log.debug("bridge client %s authenticated", peer)
            self.metrics.clients.inc()
            counted = True
            self._serve_calls(channel, peer)
        except PeerClosed:
            pass
        except ProtocolError as exc:
            self._refuse(peer, exc.reason, str(exc))
        except TimeoutError:
            self._refuse(peer, "handshake_timeout")
        except ssl.SSLError as exc:
            if not self._stopping.is_set():
                reason = refusal_reason(exc, handshake_done=tls_done)
                self._refuse(peer, reason, getattr(exc, "reason", None) or type(exc).__name__)
        except OSError as exc:
            if not self._stopping.is_set():
                _log.info("bridge connection %s closed: %s", peer, type(exc).__name__)
        finally:
            if counted:
                self.metrics.clients.dec()
            with self._state:
                self._connections.discard(sock)
                self._connections.discard(raw)
            with contextlib.suppress(OSError):
                sock.close()

    def _client_allowed(self, sock: Sock, peer: str) -> bool:
        if self._allowed is None:
            return True
        certificate = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
        name = self._allowed.match(certificate)
        if name is None:
            names = ", ".join(certificate_names(certificate or {}))
            self._refuse(peer, "client_not_allowed", names[:200])
            # the client has a certificate of our CA: telling it why saves an operator's hour
            with contextlib.suppress(OSError):
                refused = {"type": "refused", "reason": "client_not_allowed"}
                send_frame(sock, dumps(refused), limit=HANDSHAKE_FRAME_BYTES)
            return False
        _log.info("bridge client %s presented %s", peer, name, extra={"peer": peer})
        return True

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
            if name not in ALLOWED_FUNCTIONS:  # refused before any argument is decoded
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
                self.metrics.called(name, "stopping", None)
                return {"id": request_id, "ok": False, "error": "stopping"}
            self.calls += 1
            started = time.perf_counter()
            try:
                result = function(*args, **kwargs)
            except Exception as exc:  # the terminal's own failure, reported to the caller
                self.metrics.called(name, "terminal_error", time.perf_counter() - started)
                _log.warning("bridge call %s from %s raised %s", name, peer, type(exc).__name__)
                return {
                    "id": request_id,
                    "ok": False,
                    "error": "terminal_error",
                    "detail": f"{type(exc).__name__}: {exc}"[:300],
                }
            # read last_error under the same lock: another client's call would overwrite it
            elapsed = time.perf_counter() - started
            error = self.terminal.last_error()
        try:
            encoded = encode_value(result)
        except TypeError as exc:
            self.metrics.called(name, "unencodable", elapsed)
            return {"id": request_id, "ok": False, "error": "unencodable", "detail": str(exc)}
        self.metrics.called(name, "ok", elapsed)
        return {"id": request_id, "ok": True, "result": encoded, "last_error": list(error)}
