"""The bridge's wire format: value codec, frames, handshake proofs and the MAC'd channel."""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import socket
import struct
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pytest

from worker.mt5 import api
from worker.mt5.bridge.client import parse_address
from worker.mt5.bridge.protocol import (
    ALLOWED_FUNCTIONS,
    CLIENT_TO_SERVER,
    RESULT_TYPES,
    SERVER_TO_CLIENT,
    FrameTooLarge,
    ProtocolError,
    SecureChannel,
    client_proof,
    decode_value,
    encode_value,
    new_server_nonce,
    recv_frame,
    send_frame,
    server_proof,
    session_key,
)


def _deal(**changes: Any) -> api.TradeDeal:
    deal = api.TradeDeal(
        ticket=7, order=6, time=1_700_000_000, time_msc=1_700_000_000_123, type=0, entry=0,
        magic=26112501, position_id=6, reason=3, volume=0.95, price=1.08512, commission=-0.5,
        swap=0.0, profit=0.0, fee=0.0, symbol="EURUSD", comment="xw0123456789abcdef0123",
        external_id="",
    )  # fmt: skip
    return deal._replace(**changes)


def _roundtrip(value: object) -> object:
    return decode_value(json.loads(json.dumps(encode_value(value))))


def test_named_tuples_survive_with_their_type_and_fields() -> None:
    deal = _deal()
    request = api.TradeRequest(
        1, 5, 0, "EURUSD", 0.1, 1.1, 0.0, 0.0, 0.0, 20, 0, 0, 0, 0, "x", 0, 0
    )
    result = api.OrderSendResult(10009, 7, 6, 0.1, 1.1, 1.0999, 1.1001, "done", 3, 0, request)
    decoded = _roundtrip((deal, result))
    assert decoded == (deal, result)
    assert isinstance(decoded, tuple)
    assert type(decoded[0]) is api.TradeDeal
    assert type(decoded[1].request) is api.TradeRequest


def test_datetimes_maps_and_floats_are_explicit() -> None:
    value = {
        "date_from": datetime(2026, 11, 25, 10, 0, 0, 123456),
        "aware": datetime(2026, 11, 25, 10, 0, tzinfo=UTC),
        "price": 0.1 + 0.2,
        "items": [1, "a", None, True],
        "pair": (1, 2),
    }
    decoded = _roundtrip(value)
    assert decoded == value
    assert isinstance(decoded, dict)
    assert decoded["aware"].tzinfo is not None
    assert decoded["date_from"].tzinfo is None
    assert isinstance(decoded["pair"], tuple)
    assert isinstance(decoded["items"], list)


def test_a_foreign_tuple_of_an_allowed_name_is_projected_onto_the_api_fields() -> None:
    class Tick(NamedTuple):  # the MetaTrader5 module's own result types are wider
        time: int
        bid: float
        ask: float
        last: float
        volume: int
        time_msc: int
        flags: int
        volume_real: float
        extra: int

    decoded = _roundtrip(Tick(1, 1.1, 1.2, 0.0, 0, 1000, 6, 0.0, 99))
    assert decoded == api.Tick(1, 1.1, 1.2, 0.0, 0, 1000, 6, 0.0)
    assert type(decoded) is api.Tick


@pytest.mark.parametrize("value", [object(), b"raw", {1: "x"}, {1.5}, api.TransportError("x")])
def test_values_outside_the_codec_are_not_encoded(value: object) -> None:
    with pytest.raises(TypeError):
        encode_value(value)


def test_a_named_tuple_that_is_not_allow_listed_is_not_encoded() -> None:
    class Secret(NamedTuple):
        password: str

    with pytest.raises(TypeError, match="not allow-listed"):
        encode_value(Secret("x"))


@pytest.mark.parametrize(
    "data",
    [
        {"$nt": "Popen", "v": {"args": "sh"}},
        {"$nt": "TradeDeal", "v": {"ticket": 1}},
        {"$nt": "__class__", "v": {}},
        {"$dt": "not a date"},
        {"$unknown": 1},
        {"plain": "object"},
        {"$t": "not a list"},
    ],
)
def test_unknown_or_malformed_encodings_are_refused(data: object) -> None:
    with pytest.raises(ProtocolError):
        decode_value(data)


def test_a_record_is_rebuilt_by_its_field_names_in_any_order() -> None:
    deal = _deal()
    fields = encode_value(deal)["v"]
    reversed_fields = dict(reversed(list(fields.items())))
    assert decode_value({"$nt": "TradeDeal", "v": reversed_fields}) == deal


def test_a_record_with_as_many_fields_but_one_unknown_is_refused() -> None:
    fields = dict(encode_value(_deal())["v"])
    fields["password"] = fields.pop("comment")
    with pytest.raises(ProtocolError, match="do not match"):
        decode_value({"$nt": "TradeDeal", "v": fields})


def test_a_record_decodes_the_tagged_values_of_its_fields() -> None:
    request = api.TradeRequest(
        1, 5, 0, "EURUSD", 0.1, 1.1, 0.0, 0.0, 0.0, 20, 0, 0, 0, 0, "x", 0, 0
    )
    result = api.OrderSendResult(10009, 7, 6, 0.1, 1.1, 1.0999, 1.1001, "done", 3, 0, request)
    fields = json.loads(json.dumps(encode_value(result)))["v"]
    assert isinstance(fields["request"], dict)  # still tagged on the wire
    decoded = decode_value({"$nt": "OrderSendResult", "v": fields})
    assert decoded == result
    assert type(decoded.request) is api.TradeRequest


def test_the_allow_list_is_exactly_the_terminal_protocol_minus_its_lifecycle() -> None:
    protocol = {
        name
        for name, member in inspect.getmembers(api.Terminal)
        if not name.startswith("_") and inspect.isfunction(member)
    }
    assert protocol - ALLOWED_FUNCTIONS == {"initialize", "login", "shutdown"}
    assert protocol >= ALLOWED_FUNCTIONS
    assert {"eval", "exec", "__class__", "__getattribute__", "shutdown"}.isdisjoint(
        ALLOWED_FUNCTIONS
    )
    assert set(RESULT_TYPES) == {
        "TerminalInfo", "AccountInfo", "SymbolInfo", "Tick", "TradeRequest", "OrderSendResult",
        "OrderCheckResult", "TradeOrder", "TradePosition", "TradeDeal",
    }  # fmt: skip


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    left.settimeout(5)
    right.settimeout(5)
    yield left, right
    left.close()
    right.close()


def test_frames_round_trip_and_oversized_ones_are_refused_before_reading(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair
    send_frame(left, b"hello")
    assert recv_frame(right) == b"hello"
    with pytest.raises(FrameTooLarge):
        send_frame(left, b"x" * 101, limit=100)
    left.sendall(struct.pack(">I", 1 << 30))  # announces 1 GiB, sends nothing more
    with pytest.raises(FrameTooLarge):
        recv_frame(right, limit=1 << 20)


def test_proofs_depend_on_secret_direction_and_both_nonces() -> None:
    ns, nc = new_server_nonce(), b"c" * 32
    proof = client_proof(b"secret", ns, nc)
    assert proof == client_proof(b"secret", ns, nc)
    assert proof != client_proof(b"other", ns, nc)
    assert proof != client_proof(b"secret", new_server_nonce(), nc)
    assert proof != client_proof(b"secret", ns, b"d" * 32)
    assert proof != server_proof(b"secret", ns, nc)
    assert session_key(b"secret", ns, nc) not in (proof, server_proof(b"secret", ns, nc))


def test_server_nonces_never_repeat() -> None:
    nonces = {new_server_nonce() for _ in range(2000)}
    assert len(nonces) == 2000


def _channels(
    pair: tuple[socket.socket, socket.socket], key: bytes = b"k" * 32
) -> tuple[SecureChannel, SecureChannel]:
    left, right = pair
    client = SecureChannel(
        left, key, outgoing=CLIENT_TO_SERVER, incoming=SERVER_TO_CLIENT, limit=1 << 20
    )
    server = SecureChannel(
        right, key, outgoing=SERVER_TO_CLIENT, incoming=CLIENT_TO_SERVER, limit=1 << 20
    )
    return client, server


def test_channel_carries_sequenced_frames(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = _channels(pair)
    client.send({"id": 1, "fn": "terminal_info"})
    client.send({"id": 2, "fn": "account_info"})
    assert server.recv() == {"id": 1, "fn": "terminal_info"}
    assert server.recv() == {"id": 2, "fn": "account_info"}
    server.send({"id": 1, "ok": True})
    assert client.recv() == {"id": 1, "ok": True}


def test_a_frame_is_seq_then_the_mac_of_direction_seq_and_payload(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The frame layout a peer of another release checks: the MAC is HMAC-SHA256 under the
    session key of direction | seq | payload, computed here independently."""
    _left, right = pair
    key = b"k" * 32
    client, _ = _channels(pair, key)
    for number in range(2):
        client.send({"id": number, "fn": "terminal_info"})
        (size,) = struct.unpack(">I", right.recv(4))
        body = right.recv(size)
        seq, tag, payload = body[:8], body[8:40], body[40:]
        assert struct.unpack(">Q", seq) == (number,)
        expected = hmac.new(key, CLIENT_TO_SERVER + seq + payload, hashlib.sha256).digest()
        assert tag == expected
        assert json.loads(payload) == {"id": number, "fn": "terminal_info"}


def test_a_replayed_frame_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    client, server = _channels(pair)
    client.send({"id": 1, "fn": "order_send"})
    recorded = right.recv(65536)  # what an observer on the wire saw
    left.sendall(recorded)
    assert server.recv() == {"id": 1, "fn": "order_send"}
    left.sendall(recorded)  # the same frame again
    with pytest.raises(ProtocolError) as refused:
        server.recv()
    assert refused.value.reason == "bad_sequence"


def test_a_tampered_frame_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    left, _right = pair
    _, server = _channels(pair)
    payload = b'{"id":1,"fn":"eval"}'
    forged = struct.pack(">Q", 0) + b"\0" * 32 + payload
    send_frame(left, forged)
    with pytest.raises(ProtocolError) as refused:
        server.recv()
    assert refused.value.reason == "bad_mac"


def test_a_reflected_frame_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    # a frame the server sent, sent back to it, carries the wrong direction
    left, _right = pair
    client, server = _channels(pair)
    server.send({"id": 1, "ok": True})
    reflected = left.recv(65536)
    left.sendall(reflected)
    with pytest.raises(ProtocolError) as refused:
        server.recv()
    assert refused.value.reason == "bad_mac"
    del client


def test_a_frame_under_another_session_key_is_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair
    client = SecureChannel(
        left, b"a" * 32, outgoing=CLIENT_TO_SERVER, incoming=SERVER_TO_CLIENT, limit=1 << 20
    )
    server = SecureChannel(
        right, b"b" * 32, outgoing=SERVER_TO_CLIENT, incoming=CLIENT_TO_SERVER, limit=1 << 20
    )
    client.send({"id": 1, "fn": "terminal_info"})
    with pytest.raises(ProtocolError):
        server.recv()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:18812", ("127.0.0.1", 18812)),
        ("sim-terminal", ("sim-terminal", 18812)),
        ("[::1]:9000", ("::1", 9000)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", ":80", "host:notaport", "host:0", "host:70000"])
def test_parse_address_refuses_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)
