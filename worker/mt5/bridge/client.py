"""Authenticated, allow-listed RPC to a terminal in another process or on another host.

The ``MetaTrader5`` module holds one terminal per process, so further sessions are reached
through a bridge: a server process owns ONE terminal (:class:`BridgeServer`, see
:mod:`worker.mt5.bridge.server`) and :class:`BridgeTerminal` implements the
:class:`~worker.mt5.api.Terminal` protocol over TCP. The wire format and the handshake are
in :mod:`worker.mt5.bridge.protocol`. With ``tls_ca`` the client runs TLS 1.3, verifies the
bridge's certificate against that CA and the address's host name (or ``tls_server_name``),
and with ``tls_cert``/``tls_key`` presents its own certificate (mutual TLS, required by
bridges off loopback). The TLS files are read at each (re)connection, so replacing them
rotates the certificate without restarting the worker. The shared secret is checked in
every mode (the only factor on loopback without TLS, a second one behind mutual TLS).

Client failures (refused, reset, timeout, bad frame, remote exception) raise
:class:`~worker.mt5.api.TransportError`; during ``order_send`` that is an UNKNOWN outcome
(reconcile, never resend blind). The client reconnects on the next call.

``initialize``/``login``/``shutdown`` are local: the terminal's lifecycle and credentials
belong to the server process, so no password ever crosses the bridge. ``last_error`` is the
error the server read right after this client's previous call (under the terminal lock),
so concurrent clients do not see each other's errors.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import socket
import ssl
import threading
from typing import Any

from pydantic import SecretStr

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
    new_client_nonce,
    recv_frame,
    send_frame,
    server_proof,
    session_key,
)
from worker.mt5.bridge.server import HANDSHAKE_FRAME_BYTES, BridgeServer
from worker.mt5.bridge.tls import client_context
from worker.mt5.calls import given, result_fits

__all__ = [
    "BridgeConnection",
    "BridgeRemoteError",
    "BridgeServer",
    "BridgeTerminal",
    "parse_address",
]

DEFAULT_PORT = 18812


class BridgeRemoteError(api.TransportError):
    """The server answered with an error (refused function, terminal exception)."""


def parse_address(address: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host:port``, ``host`` or ``[v6]:port`` -> (host, port); ``ValueError`` if malformed."""
    text = address.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"bridge address {address!r} has no host")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"bridge address {address!r} has an invalid port") from None
    if not 0 < port < 65536:
        raise ValueError(f"bridge address {address!r} has an invalid port")
    return host, port


def _secret_bytes(secret: str | bytes | SecretStr) -> bytes:
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not raw:
        raise ValueError("the bridge secret is empty")
    return raw


class BridgeConnection:
    """One authenticated connection: ``call(name, args, kwargs) -> (result, last_error)``.

    Not thread-safe (BridgeTerminal serialises). Any failure closes the connection and
    raises TransportError; the caller decides whether to reconnect.
    """

    def __init__(
        self,
        address: str,
        secret: str | bytes | SecretStr,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        tls_ca: str | None = None,
        tls_server_name: str | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_crl: str | None = None,
    ) -> None:
        self.address = address
        self._host, self._port = parse_address(address)
        self._secret = _secret_bytes(secret)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        if tls_ca is None and (tls_cert or tls_key or tls_crl):
            raise ValueError("a client certificate or CRL needs tls_ca (the bridges' CA)")
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key go together")
        self._tls_files = (tls_ca, tls_cert, tls_key, tls_crl)
        self._tls = tls_ca is not None
        self._server_name = tls_server_name or self._host
        self._max_frame_bytes = max_frame_bytes
        self._channel: SecureChannel | None = None
        self._hello_seen = False
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        mode = "mutual" if self._tls_files[1] else "server" if self._tls else "none"
        return f"BridgeConnection({self.address!r}, tls={mode})"

    def _tls_context(self) -> ssl.SSLContext | None:
        ca, cert, key, crl = self._tls_files
        if ca is None:
            return None
        try:
            return client_context(ca, cert=cert, key=key, crl=crl)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise self._fail("TLS files", exc) from exc

    @property
    def connected(self) -> bool:
        return self._channel is not None

    def _fail(self, what: str, exc: BaseException | str) -> api.TransportError:
        self.close()
        reason = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
        return api.TransportError(f"bridge {self.address}: {what}: {reason}")

    def connect(self) -> None:
        self.close()
        tls = self._tls_context()
        try:
            raw = socket.create_connection((self._host, self._port), self._connect_timeout)
        except OSError as exc:
            raise self._fail("connect", exc) from exc
        sock: Sock = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(raw, server_hostname=self._server_name)
            self._channel = self._handshake(sock)
            sock.settimeout(self._timeout)
        except (OSError, ProtocolError) as exc:
            with contextlib.suppress(OSError):
                sock.close()
            with contextlib.suppress(OSError):
                raw.close()
            reason = str(exc) or type(exc).__name__
            raise self._fail("handshake", reason + self._hint(exc, tls is not None)) from exc

    def _hint(self, exc: BaseException, tls: bool) -> str:
        """What an operator most likely has to configure, for the usual refusals."""
        silent = isinstance(exc, PeerClosed | ConnectionResetError | TimeoutError)
        if not tls and silent and not self._hello_seen:
            return (
                " (no hello from the bridge: bridges off loopback speak mutual TLS only; "
                "configure tls_ca, tls_cert and tls_key)"
            )
        if isinstance(exc, ssl.SSLError) and "CERTIFICATE_REQUIRED" in str(exc):
            return " (this bridge requires a client certificate: tls_cert and tls_key)"
        return ""

    def _handshake(self, sock: Sock) -> SecureChannel:
        self._hello_seen = False
        hello = loads(recv_frame(sock, limit=HANDSHAKE_FRAME_BYTES))
        self._hello_seen = True
        if hello.get("type") == "refused":
            reason = str(hello.get("reason", ""))[:40]
            raise ProtocolError("refused", f"the bridge refused this client ({reason})")
        if hello.get("type") != "hello" or hello.get("v") != PROTOCOL_VERSION:
            raise ProtocolError("bad_handshake", "unexpected hello")
        server_nonce = hex_field(hello, "nonce", NONCE_BYTES)
        client_nonce = new_client_nonce()
        proof = client_proof(self._secret, server_nonce, client_nonce)
        auth = {"type": "auth", "nonce": client_nonce.hex(), "mac": proof.hex()}
        send_frame(sock, dumps(auth), limit=HANDSHAKE_FRAME_BYTES)
        welcome = loads(recv_frame(sock, limit=HANDSHAKE_FRAME_BYTES))
        expected = server_proof(self._secret, server_nonce, client_nonce)
        if welcome.get("type") != "welcome" or not hmac.compare_digest(
            hex_field(welcome, "mac", 32), expected
        ):
            raise ProtocolError("bad_auth", "server proof does not verify")
        return SecureChannel(
            sock,
            session_key(self._secret, server_nonce, client_nonce),
            outgoing=CLIENT_TO_SERVER,
            incoming=SERVER_TO_CLIENT,
            limit=self._max_frame_bytes,
        )

    def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(OSError):
                channel.sock.close()

    def call(
        self, name: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> tuple[Any, tuple[int, str]]:
        """Call ``name`` remotely; connects first if needed. Raises TransportError."""
        if self._channel is None:
            self.connect()
        channel = self._channel
        assert channel is not None
        request_id = next(self._ids)
        try:
            request = {
                "id": request_id,
                "fn": name,
                "args": encode_value(list(args)),
                "kwargs": encode_value(kwargs or {}),
            }
        except TypeError as exc:
            raise api.TransportError(f"bridge {self.address}: {name}: {exc}") from exc
        try:
            channel.send(request)
            response = channel.recv()
        except (OSError, ProtocolError) as exc:
            raise self._fail(name, exc) from exc
        if response.get("id") != request_id:
            raise self._fail(name, "response id does not match the request")
        if not response.get("ok"):
            error = str(response.get("error", "error"))
            detail = str(response.get("detail", ""))
            if error == "not_allowed":
                self.close()
            raise BridgeRemoteError(f"bridge {self.address}: {name}: {error} {detail}".rstrip())
        try:
            result = decode_value(response.get("result"))
            code, message = response.get("last_error", [api.RES_S_OK, "Success"])
            return result, (int(code), str(message))
        except (ProtocolError, TypeError, ValueError) as exc:
            raise self._fail(name, exc) from exc


class BridgeTerminal:
    """A :class:`~worker.mt5.api.Terminal` served by a bridge at ``address`` (host:port).

    Thread-safe (one call at a time); the session pool gives it to one user at a time.
    """

    def __init__(
        self,
        address: str,
        secret: str | bytes | SecretStr,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        tls_ca: str | None = None,
        tls_server_name: str | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_crl: str | None = None,
    ) -> None:
        self.address = address
        self._connection = BridgeConnection(
            address,
            secret,
            timeout=timeout,
            connect_timeout=connect_timeout,
            tls_ca=tls_ca,
            tls_server_name=tls_server_name,
            max_frame_bytes=max_frame_bytes,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_crl=tls_crl,
        )
        self._lock = threading.Lock()
        self._last_error: tuple[int, str] = (api.RES_S_OK, "Success")

    def __repr__(self) -> str:
        return f"BridgeTerminal({self.address!r})"

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        assert name in ALLOWED_FUNCTIONS
        with self._lock:
            try:
                result, self._last_error = self._connection.call(name, args, given(name, kwargs))
                if not result_fits(name, result):  # the call table's result kind, or None
                    self._connection.close()
                    raise BridgeRemoteError(f"bridge {self.address}: {name}: unexpected result")
            except api.TransportError as exc:
                self._last_error = (api.RES_E_INTERNAL_FAIL, str(exc))
                raise
            return result

    # --- lifecycle (local) -----------------------------------------------------------

    def initialize(
        self,
        path: str | None = None,
        *,
        login: int | None = None,
        password: str | None = None,
        server: str | None = None,
        timeout: int | None = None,
    ) -> bool:
        """Connect and authenticate; True when the remote terminal is connected.

        ``path`` and ``password`` are ignored (the server owns them). ``login`` and
        ``server``, when given, must match the remote account: a bridge address pointing at
        another account is refused rather than traded on.
        """
        del path, password, timeout
        with self._lock:
            try:
                self._connection.connect()
            except api.TransportError as exc:
                self._last_error = (api.RES_E_INTERNAL_FAIL_CONNECT, str(exc))
                return False
        info = self.terminal_info()
        if info is None or not info.connected:
            return False
        if login is not None or server is not None:
            account = self.account_info()
            if account is None:
                return False
            if (login is not None and account.login != login) or (
                server is not None and account.server != server
            ):
                self._last_error = (
                    api.RES_E_AUTH_FAILED,
                    "the bridge terminal is logged in to another account",
                )
                return False
        return True

    def login(
        self,
        login: int,
        *,
        password: str | None = None,
        server: str | None = None,
        timeout: int | None = None,
    ) -> bool:
        del login, password, server, timeout
        self._last_error = (api.RES_E_UNSUPPORTED, "login is not available over the bridge")
        return False

    def shutdown(self) -> None:
        with self._lock:
            self._connection.close()

    def last_error(self) -> tuple[int, str]:
        return self._last_error

    # --- remote calls ----------------------------------------------------------------

    def terminal_info(self) -> api.TerminalInfo | None:
        result: api.TerminalInfo | None = self._call("terminal_info")
        return result

    def account_info(self) -> api.AccountInfo | None:
        result: api.AccountInfo | None = self._call("account_info")
        return result

    def symbols_get(self, group: str | None = None) -> tuple[api.SymbolInfo, ...] | None:
        result: tuple[api.SymbolInfo, ...] | None = self._call("symbols_get", group=group)
        return result

    def symbol_info(self, symbol: str) -> api.SymbolInfo | None:
        result: api.SymbolInfo | None = self._call("symbol_info", symbol)
        return result

    def symbol_info_tick(self, symbol: str) -> api.Tick | None:
        result: api.Tick | None = self._call("symbol_info_tick", symbol)
        return result

    def symbol_select(self, symbol: str, enable: bool = True) -> bool:
        return bool(self._call("symbol_select", symbol, enable))

    def order_calc_margin(
        self, action: int, symbol: str, volume: float, price: float
    ) -> float | None:
        result: float | None = self._call("order_calc_margin", action, symbol, volume, price)
        return result

    def order_check(self, request: dict[str, Any]) -> api.OrderCheckResult | None:
        result: api.OrderCheckResult | None = self._call("order_check", request)
        return result

    def order_send(self, request: dict[str, Any]) -> api.OrderSendResult | None:
        result: api.OrderSendResult | None = self._call("order_send", request)
        return result

    def orders_get(
        self, symbol: str | None = None, group: str | None = None, ticket: int | None = None
    ) -> tuple[api.TradeOrder, ...] | None:
        result: tuple[api.TradeOrder, ...] | None = self._call(
            "orders_get", symbol=symbol, group=group, ticket=ticket
        )
        return result

    def positions_get(
        self, symbol: str | None = None, group: str | None = None, ticket: int | None = None
    ) -> tuple[api.TradePosition, ...] | None:
        result: tuple[api.TradePosition, ...] | None = self._call(
            "positions_get", symbol=symbol, group=group, ticket=ticket
        )
        return result

    def history_orders_get(
        self,
        date_from: api.DateLike | None = None,
        date_to: api.DateLike | None = None,
        group: str | None = None,
        ticket: int | None = None,
        position: int | None = None,
    ) -> tuple[api.TradeOrder, ...] | None:
        result: tuple[api.TradeOrder, ...] | None = self._call(
            "history_orders_get",
            date_from=date_from,
            date_to=date_to,
            group=group,
            ticket=ticket,
            position=position,
        )
        return result

    def history_deals_get(
        self,
        date_from: api.DateLike | None = None,
        date_to: api.DateLike | None = None,
        group: str | None = None,
        ticket: int | None = None,
        position: int | None = None,
    ) -> tuple[api.TradeDeal, ...] | None:
        result: tuple[api.TradeDeal, ...] | None = self._call(
            "history_deals_get",
            date_from=date_from,
            date_to=date_to,
            group=group,
            ticket=ticket,
            position=position,
        )
        return result
