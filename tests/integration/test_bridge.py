"""The bridge over real TCP against the simulated terminal: equality, refusals, TLS, loris."""

from __future__ import annotations

import json
import logging
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.integration.test_bridge_helpers import (
    FIXED_NOW,
    address_of,
    market_order,
    new_secret,
    open_config,
    served,
)
from tests.ports import restartable_port
from worker.mt5 import api
from worker.mt5.bridge.client import (
    BridgeConnection,
    BridgeRemoteError,
    BridgeServer,
    BridgeTerminal,
)
from worker.mt5.bridge.protocol import (
    CLIENT_TO_SERVER,
    SERVER_TO_CLIENT,
    SecureChannel,
    client_proof,
    dumps,
    loads,
    new_client_nonce,
    recv_frame,
    send_frame,
    session_key,
)
from worker.mt5.sim.terminal import SimTerminal

SECRET = new_secret()


# The bridge must answer what the terminal answers: comparing two reads needs both to
# answer (no random None), and on a fixed clock a lagging deal would never show.
STEADY = "[faults]\nquery_none_rate = 0.0\ndeal_lag_ms = 0.0\ndeal_lag_jitter_ms = 0.0\n"


@pytest.fixture
def sim() -> SimTerminal:
    terminal = SimTerminal(open_config(STEADY), clock=lambda: FIXED_NOW)
    assert terminal.initialize()
    return terminal


@pytest.fixture
def server(sim: SimTerminal) -> Iterator[BridgeServer]:
    with served(sim, SECRET, handshake_timeout=1.0, max_connections=8) as bridge:
        yield bridge


@pytest.fixture
def client(server: BridgeServer) -> Iterator[BridgeTerminal]:
    terminal = BridgeTerminal(address_of(server), SECRET, timeout=5)
    assert terminal.initialize()
    yield terminal
    terminal.shutdown()


def _connect(server: BridgeServer) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=5)
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    """Read whatever the server still sends until it closes (True) or 5 s pass (False)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_bridge_results_equal_the_in_process_terminal(
    sim: SimTerminal, client: BridgeTerminal
) -> None:
    token = "xw00112233445566778899"
    assert client.terminal_info() == sim.terminal_info()
    assert client.account_info() == sim.account_info()
    assert client.symbols_get() == sim.symbols_get()
    assert client.symbols_get("*JPY*") == sim.symbols_get("*JPY*")
    assert client.symbol_info("EURUSD") == sim.symbol_info("EURUSD")
    assert client.symbol_info_tick("USDJPY") == sim.symbol_info_tick("USDJPY")
    assert client.symbol_select("US500", True) is True
    assert client.order_calc_margin(api.ORDER_TYPE_BUY, "EURUSD", 1.0, 1.1) == (
        sim.order_calc_margin(api.ORDER_TYPE_BUY, "EURUSD", 1.0, 1.1)
    )
    request = market_order(client, token)
    assert client.order_check(request) == sim.order_check(request)

    result = client.order_send(request)
    assert type(result) is api.OrderSendResult
    assert result.retcode == api.TRADE_RETCODE_DONE
    assert type(result.request) is api.TradeRequest
    assert result.request.comment == token

    since = datetime.fromtimestamp(FIXED_NOW) - timedelta(hours=1)  # naive, as MT5 takes
    until = datetime.fromtimestamp(FIXED_NOW) + timedelta(hours=6)
    deals = client.history_deals_get(since, until)
    assert deals == sim.history_deals_get(since, until)
    assert deals is not None and [d.comment for d in deals] == [token[:16]]  # cut by the server
    assert client.history_deals_get(ticket=result.order) == sim.history_deals_get(
        ticket=result.order
    )
    assert client.history_orders_get(int(since.timestamp()), int(until.timestamp())) == (
        sim.history_orders_get(int(since.timestamp()), int(until.timestamp()))
    )
    assert client.positions_get(symbol="EURUSD") == sim.positions_get(symbol="EURUSD")
    assert client.orders_get() == sim.orders_get()


def test_failures_and_last_error_come_through_the_bridge(
    sim: SimTerminal, client: BridgeTerminal
) -> None:
    assert client.symbol_info("NOPE") is None
    assert sim.symbol_info("NOPE") is None
    assert client.last_error() == sim.last_error()
    assert client.last_error()[0] != api.RES_S_OK
    # the error travels with the reply: another client's later call does not overwrite it
    client.history_deals_get()  # no window: invalid params
    remote_error = client.last_error()
    assert sim.terminal_info() is not None
    assert client.last_error() == remote_error
    assert client.login(1) is False
    assert client.last_error()[0] == api.RES_E_UNSUPPORTED


def test_initialize_refuses_a_bridge_logged_in_to_another_account(server: BridgeServer) -> None:
    terminal = BridgeTerminal(address_of(server), SECRET)
    account = server.terminal.account_info()
    assert account is not None
    assert terminal.initialize(login=account.login, server=account.server)
    assert not terminal.initialize(login=account.login + 1)
    assert terminal.last_error()[0] == api.RES_E_AUTH_FAILED


def test_wrong_secret_is_refused_and_logged(
    server: BridgeServer, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "not-" + SECRET
    terminal = BridgeTerminal(address_of(server), wrong)
    with caplog.at_level(logging.WARNING, logger="worker.mt5.bridge.client"):
        assert terminal.initialize() is False
        with pytest.raises(api.TransportError):
            terminal.terminal_info()
    assert server.refusals["bad_auth"] == 2
    assert "bad_auth" in caplog.text
    assert SECRET not in caplog.text and wrong not in caplog.text
    assert wrong not in repr(terminal) and wrong not in str(terminal.last_error())


def test_client_refuses_a_server_that_does_not_know_the_secret(sim: SimTerminal) -> None:
    # mutual: an impostor server cannot prove the secret, so the client never sends a call
    with served(sim, "impostor-" + SECRET) as impostor:
        terminal = BridgeTerminal(address_of(impostor), SECRET)
        assert terminal.initialize() is False
        assert impostor.refusals["bad_auth"] == 1  # and the impostor saw a useless proof
        assert impostor.calls == 0


def test_a_replayed_handshake_is_refused(
    server: BridgeServer, caplog: pytest.LogCaptureFixture
) -> None:
    # record a genuine handshake ...
    sock = _connect(server)
    hello = loads(recv_frame(sock))
    client_nonce = new_client_nonce()
    proof = client_proof(SECRET.encode(), bytes.fromhex(hello["nonce"]), client_nonce)
    recorded_auth = dumps({"type": "auth", "nonce": client_nonce.hex(), "mac": proof.hex()})
    send_frame(sock, recorded_auth)
    assert loads(recv_frame(sock))["type"] == "welcome"
    sock.close()
    # ... and play it back on a new connection: the server's nonce is new
    replay = _connect(server)
    replay_hello = loads(recv_frame(replay))
    assert replay_hello["nonce"] != hello["nonce"]
    with caplog.at_level(logging.WARNING, logger="worker.mt5.bridge.client"):
        send_frame(replay, recorded_auth)
        assert _closed_by_peer(replay)
    replay.close()
    assert server.refusals["bad_auth"] == 1
    assert "bad_auth" in caplog.text


@pytest.mark.parametrize("name", ["__class__", "eval", "shutdown", "initialize", "_lock"])
def test_functions_outside_the_allow_list_are_refused(
    server: BridgeServer, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    connection = BridgeConnection(address_of(server), SECRET)
    with caplog.at_level(logging.WARNING, logger="worker.mt5.bridge.client"):
        with pytest.raises(BridgeRemoteError, match="not_allowed"):
            connection.call(name, ("1+1",))
        assert not connection.connected  # refused: the server closed the connection
    assert server.refusals["not_allowed"] == 1
    assert "not_allowed" in caplog.text
    assert server.calls == 0
    # the terminal is untouched and still served to well-behaved clients
    result, _ = connection.call("terminal_info")
    assert type(result) is api.TerminalInfo and result.connected


def test_an_oversized_frame_is_refused_and_logged(
    server: BridgeServer, caplog: pytest.LogCaptureFixture
) -> None:
    connection = BridgeConnection(address_of(server), SECRET)
    connection.connect()
    channel = connection._channel
    assert channel is not None
    with caplog.at_level(logging.WARNING, logger="worker.mt5.bridge.client"):
        channel.sock.sendall(struct.pack(">I", 2 << 20))  # announces 2 MiB
        assert _closed_by_peer(channel.sock)  # closed without reading the body
    assert server.refusals["oversized_frame"] == 1
    assert "oversized_frame" in caplog.text
    # an oversized frame before authentication is refused as well
    raw = _connect(server)
    recv_frame(raw)
    raw.sendall(struct.pack(">I", 1 << 20))
    assert _closed_by_peer(raw)
    raw.close()
    assert server.refusals["oversized_frame"] == 2


def test_an_oversized_reply_is_a_transport_error_for_the_client(server: BridgeServer) -> None:
    small = BridgeTerminal(address_of(server), SECRET, max_frame_bytes=2048)
    assert small.initialize()  # small replies pass
    with pytest.raises(api.TransportError, match="oversized"):
        small.symbols_get()
    assert small.terminal_info() is not None  # and the client reconnects on the next call


def test_injected_frames_are_refused(server: BridgeServer) -> None:
    """After the handshake, a frame with a wrong MAC (an injected call) closes the link."""
    sock = _connect(server)
    hello = loads(recv_frame(sock))
    server_nonce = bytes.fromhex(hello["nonce"])
    client_nonce = new_client_nonce()
    proof = client_proof(SECRET.encode(), server_nonce, client_nonce)
    send_frame(sock, dumps({"type": "auth", "nonce": client_nonce.hex(), "mac": proof.hex()}))
    recv_frame(sock)
    wrong_key = session_key(b"guess", server_nonce, client_nonce)
    forged = SecureChannel(
        sock, wrong_key, outgoing=CLIENT_TO_SERVER, incoming=SERVER_TO_CLIENT, limit=1 << 20
    )
    forged.send({"id": 1, "fn": "order_send", "args": [], "kwargs": {"$m": {}}})
    assert _closed_by_peer(sock)
    sock.close()
    assert server.refusals["bad_mac"] == 1
    assert server.calls == 0


def test_slow_loris_connections_do_not_block_other_clients(
    server: BridgeServer, caplog: pytest.LogCaptureFixture
) -> None:
    silent = _connect(server)  # never answers the hello
    dribbling = _connect(server)
    recv_frame(dribbling)
    dribbling.sendall(b"\x00\x00")  # half a length prefix, then nothing
    # while both hold their connections, another client is served
    terminal = BridgeTerminal(address_of(server), SECRET, timeout=5)
    assert terminal.initialize()
    assert terminal.account_info() is not None
    # the stalled ones are cut at the handshake deadline, and logged
    with caplog.at_level(logging.WARNING, logger="worker.mt5.bridge.client"):
        assert _closed_by_peer(silent)
        assert _closed_by_peer(dribbling)
    silent.close()
    dribbling.close()
    assert server.refusals["handshake_timeout"] == 2
    assert "handshake_timeout" in caplog.text
    assert terminal.terminal_info() is not None


def test_connections_beyond_the_maximum_are_refused(sim: SimTerminal) -> None:
    with served(sim, SECRET, max_connections=2) as server:
        first, second = (
            BridgeTerminal(address_of(server), SECRET),
            BridgeTerminal(address_of(server), SECRET),
        )
        assert first.initialize() and second.initialize()
        third = BridgeTerminal(address_of(server), SECRET)
        assert third.initialize() is False
        assert server.refusals["max_connections"] == 1
        first.shutdown()
        assert _eventually(lambda: third.initialize())


def _eventually(check: object, attempts: int = 200) -> bool:
    assert callable(check)
    event = threading.Event()
    for _ in range(attempts):
        if check():
            return True
        event.wait(0.01)
    return False


def test_a_stopped_server_is_a_transport_error_and_the_client_reconnects(
    sim: SimTerminal,
) -> None:
    with served(sim, SECRET, port=restartable_port()) as first:
        host, port = first.address
        terminal = BridgeTerminal(f"{host}:{port}", SECRET, connect_timeout=1)
        assert terminal.initialize()
    with pytest.raises(api.TransportError):
        terminal.account_info()
    with pytest.raises(api.TransportError, match="connect"):
        terminal.account_info()
    again = BridgeServer(sim, SECRET.encode(), host=host, port=port)
    again.start()
    try:
        assert terminal.account_info() == sim.account_info()
    finally:
        again.stop()


def test_calls_from_many_clients_are_serialised_on_the_one_terminal(
    server: BridgeServer, sim: SimTerminal
) -> None:
    errors: list[BaseException] = []

    def trade(index: int) -> None:
        terminal = BridgeTerminal(address_of(server), SECRET)
        try:
            for n in range(5):
                result = terminal.order_send(market_order(terminal, f"xw{index:02d}{n:018d}"))
                assert result is not None and result.retcode == api.TRADE_RETCODE_DONE
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=trade, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    deals = sim.history_deals_get(0, int(FIXED_NOW) + 86400)
    assert deals is not None and len(deals) == 20
    assert len({deal.ticket for deal in deals}) == 20


# --- TLS -------------------------------------------------------------------------------


def _make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def test_tls_when_a_certificate_is_configured(sim: SimTerminal, tmp_path: Path) -> None:
    import ssl

    cert, key = _make_cert(tmp_path, "bridge")
    other_ca, _ = _make_cert(tmp_path, "other")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with served(sim, SECRET, tls=context) as server:
        trusted = BridgeTerminal(address_of(server), SECRET, tls_ca=str(cert))
        assert trusted.initialize()
        assert trusted.account_info() == sim.account_info()
        assert server.refusals == {}
        untrusted = BridgeTerminal(address_of(server), SECRET, tls_ca=str(other_ca))
        assert untrusted.initialize() is False
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.last_error()[1]
        plain = BridgeTerminal(address_of(server), SECRET, connect_timeout=2, timeout=2)
        assert plain.initialize() is False
        assert _eventually(lambda: server.refusals["tls"] == 2)


def test_results_are_json_frames_never_pickle(server: BridgeServer) -> None:
    connection = BridgeConnection(address_of(server), SECRET)
    connection.connect()
    channel = connection._channel
    assert channel is not None
    channel.send({"id": 1, "fn": "account_info", "args": [], "kwargs": {"$m": {}}})
    body = recv_frame(channel.sock)
    payload = json.loads(body[40:])
    assert payload["ok"] is True
    assert payload["result"]["$nt"] == "AccountInfo"
    assert payload["result"]["v"]["currency"] == "USD"
