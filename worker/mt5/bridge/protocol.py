"""Wire format of the terminal bridge: value codec, frames, handshake and frame MACs.

Pure functions and small classes over a socket-like object, shared by the server and the
client in :mod:`worker.mt5.bridge.client`.

Frames are ``length (4 bytes, big endian) | body``; a length above the limit closes the
connection before anything is read. Bodies are UTF-8 JSON during the handshake and
``seq (8) | HMAC-SHA256 (32) | JSON`` afterwards, the MAC covering the direction, the
sequence number and the JSON, under a key derived from both handshake nonces. Values are
encoded explicitly (tagged objects for tuples, maps, datetimes and the named tuples of
:mod:`worker.mt5.api`), never pickled: decoding can only build the allow-listed types.

Handshake (mutual challenge-response, the secret never crosses the wire)::

    server -> client  {"type": "hello", "v": 1, "nonce": Ns}
    client -> server  {"type": "auth", "nonce": Nc, "mac": HMAC(secret, "client" Ns Nc)}
    server -> client  {"type": "welcome", "mac": HMAC(secret, "server" Ns Nc)}

Server nonces are fresh random bytes plus a per-process counter, so a recorded ``auth``
frame never matches a later ``hello``.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import socket
import ssl
import struct
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from worker.errors import WorkerError
from worker.mt5.calls import RECORD_TYPES, REMOTE_CALLS

PROTOCOL_VERSION: Final = 1
MAX_FRAME_BYTES: Final = 1 << 20
NONCE_BYTES: Final = 32
MAC_BYTES: Final = 32
_LENGTH = struct.Struct(">I")
_SEQ = struct.Struct(">Q")

# The only functions a client may call: the remote ones of the call table. The terminal's
# lifecycle (initialize, login, shutdown) belongs to the server process and is not remote.
ALLOWED_FUNCTIONS: Final = REMOTE_CALLS

# Named tuples that may cross the wire, rebuilt by type name (the call table's records).
RESULT_TYPES: Final[Mapping[str, type[tuple[Any, ...]]]] = {
    cls.__name__: cls for cls in RECORD_TYPES
}


class ProtocolError(WorkerError):
    """The peer broke the protocol (bad frame, bad MAC, wrong sequence, unknown type)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class FrameTooLarge(ProtocolError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__("oversized_frame", f"{size} bytes > {limit}")


class PeerClosed(ProtocolError):
    def __init__(self) -> None:
        super().__init__("closed", "peer closed the connection")


# --- value codec -----------------------------------------------------------------------


def encode_value(value: Any) -> Any:
    """A JSON-ready form of ``value``; raises ``TypeError`` for anything not allowed."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime):
        return {"$dt": value.isoformat()}
    if isinstance(value, tuple):
        name = type(value).__name__
        if hasattr(value, "_fields"):
            cls = RESULT_TYPES.get(name)
            if cls is None:
                raise TypeError(f"named tuple {name} is not allow-listed")
            fields: tuple[str, ...] = cls._fields  # type: ignore[attr-defined]
            # A same-named foreign tuple (the MetaTrader5 module's own, wider types) is
            # projected onto the api fields.
            try:
                items = {f: encode_value(getattr(value, f)) for f in fields}
            except AttributeError:
                raise TypeError(f"{name} lacks fields of api.{name}") from None
            return {"$nt": name, "v": items}
        return {"$t": [encode_value(item) for item in value]}
    if isinstance(value, list):
        return [encode_value(item) for item in value]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("map keys must be strings")
        return {"$m": {key: encode_value(item) for key, item in value.items()}}
    raise TypeError(f"cannot encode {type(value).__name__}")


# JSON's scalars as ``json.loads`` builds them (exact types: a set lookup is cheaper than
# isinstance, and the history windows decode thousands of records of them per call)
_JSON_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


def decode_value(data: Any) -> Any:
    """The inverse of :func:`encode_value`; raises ``ProtocolError`` on anything unknown."""
    if type(data) in _JSON_SCALARS or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [decode_value(item) for item in data]
    if isinstance(data, dict) and len(data) in (1, 2):
        if "$dt" in data and len(data) == 1 and isinstance(data["$dt"], str):
            try:
                return datetime.fromisoformat(data["$dt"])
            except ValueError:
                raise ProtocolError("bad_value", "invalid datetime") from None
        if "$t" in data and len(data) == 1 and isinstance(data["$t"], list):
            return tuple(decode_value(item) for item in data["$t"])
        if "$m" in data and len(data) == 1 and isinstance(data["$m"], dict):
            return {str(k): decode_value(v) for k, v in data["$m"].items()}
        if "$nt" in data and isinstance(data.get("v"), dict):
            return _decode_named(data["$nt"], data["v"])
    raise ProtocolError("bad_value", "unknown value encoding")


def _field_sets(cls: type[tuple[Any, ...]]) -> tuple[frozenset[str], frozenset[str]]:
    """(the fields a record must carry, the fields it may carry): those added later with a
    default may be missing (a peer of the previous release)."""
    expected: tuple[str, ...] = cls._fields  # type: ignore[attr-defined]
    defaulted: dict[str, Any] = cls._field_defaults  # type: ignore[attr-defined]
    return frozenset(expected) - frozenset(defaulted), frozenset(expected)


_FIELD_SETS: Final = {name: _field_sets(cls) for name, cls in RESULT_TYPES.items()}


def _decode_named(name: Any, fields: dict[str, Any]) -> tuple[Any, ...]:
    cls = RESULT_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ProtocolError("bad_value", "type is not allow-listed")
    required, allowed = _FIELD_SETS[name]
    if not required <= fields.keys() <= allowed:
        raise ProtocolError("bad_value", f"fields of {name} do not match")
    if len(fields) == len(allowed):  # every field: built in order, no keyword matching
        order: tuple[str, ...] = cls._fields  # type: ignore[attr-defined]
        values = [fields[key] for key in order]
        return cls._make(  # type: ignore[attr-defined,no-any-return]
            [value if type(value) in _JSON_SCALARS else decode_value(value) for value in values]
        )
    return cls(
        **{
            key: value if type(value) in _JSON_SCALARS else decode_value(value)
            for key, value in fields.items()
        }
    )


def dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode("utf-8")


def loads(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("bad_frame", "not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", "not a JSON object")
    return obj


# --- raw frames ------------------------------------------------------------------------

Sock = socket.socket | ssl.SSLSocket


def _recv_exact(sock: Sock, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = sock.recv(min(remaining, 65536))
        if not chunk:
            raise PeerClosed()
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def send_frame(sock: Sock, body: bytes, *, limit: int = MAX_FRAME_BYTES) -> None:
    if len(body) > limit:
        raise FrameTooLarge(len(body), limit)
    sock.sendall(_LENGTH.pack(len(body)) + body)


def recv_frame(sock: Sock, *, limit: int = MAX_FRAME_BYTES) -> bytes:
    (size,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if size > limit:
        raise FrameTooLarge(size, limit)
    return _recv_exact(sock, size)


# --- handshake -------------------------------------------------------------------------

_nonce_counter = itertools.count()


def new_server_nonce() -> bytes:
    """Random bytes plus a process-wide counter: never the same twice in one server."""
    return os.urandom(NONCE_BYTES - 8) + _SEQ.pack(next(_nonce_counter))


def new_client_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def _mac(secret: bytes, label: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(secret, label + b"|" + server_nonce + client_nonce, hashlib.sha256).digest()


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return _mac(secret, b"client", server_nonce, client_nonce)


def server_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return _mac(secret, b"server", server_nonce, client_nonce)


def session_key(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return _mac(secret, b"session", server_nonce, client_nonce)


def hex_field(obj: Mapping[str, Any], name: str, size: int) -> bytes:
    raw = obj.get(name)
    if not isinstance(raw, str) or len(raw) != size * 2:
        raise ProtocolError("bad_handshake", f"missing or malformed {name}")
    try:
        return bytes.fromhex(raw)
    except ValueError:
        raise ProtocolError("bad_handshake", f"malformed {name}") from None


# --- authenticated channel -------------------------------------------------------------

CLIENT_TO_SERVER: Final = b"c2s"
SERVER_TO_CLIENT: Final = b"s2c"


class SecureChannel:
    """Sequenced, MAC-protected JSON frames over an authenticated socket.

    Each direction counts its own frames from 0; a frame whose MAC or sequence number is not
    the expected one (injected, replayed, reordered or reflected) raises ``ProtocolError``.
    """

    def __init__(
        self, sock: Sock, key: bytes, *, outgoing: bytes, incoming: bytes, limit: int
    ) -> None:
        self.sock = sock
        # keyed once: each frame's MAC copies it (re-keying HMAC per frame costs more than the
        # MAC of a small frame) and feeds the parts in turn, never a concatenated copy
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)
        self._outgoing = outgoing
        self._incoming = incoming
        self._limit = limit
        self._send_seq = 0
        self._recv_seq = 0

    def _tag(self, direction: bytes, seq: bytes, payload: bytes) -> bytes:
        """HMAC-SHA256 under the session key of ``direction | seq | payload``."""
        mac = self._keyed.copy()
        mac.update(direction)
        mac.update(seq)
        mac.update(payload)
        return mac.digest()

    def send(self, obj: Mapping[str, Any]) -> None:
        payload = dumps(obj)
        seq = _SEQ.pack(self._send_seq)
        send_frame(
            self.sock, seq + self._tag(self._outgoing, seq, payload) + payload, limit=self._limit
        )
        self._send_seq += 1

    def recv(self) -> dict[str, Any]:
        body = recv_frame(self.sock, limit=self._limit)
        header = _SEQ.size + MAC_BYTES
        if len(body) < header:
            raise ProtocolError("bad_frame", "short frame")
        seq, tag, payload = body[: _SEQ.size], body[_SEQ.size : header], body[header:]
        if not hmac.compare_digest(tag, self._tag(self._incoming, seq, payload)):
            raise ProtocolError("bad_mac", "frame MAC does not verify")
        (number,) = _SEQ.unpack(seq)
        if number != self._recv_seq:
            raise ProtocolError("bad_sequence", f"got {number}, expected {self._recv_seq}")
        self._recv_seq += 1
        return loads(payload)
