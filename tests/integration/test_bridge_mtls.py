"""Mutual TLS on a real ``sim-terminal`` process (the same server code as ``bridge-serve``).

Certificates come from deploy/windows/make-bridge-certs.sh; the ones it must not produce
(expired, foreign CA) from the ``cryptography`` package (tests/integration/bridge_pki.py).
Every refusal is checked at the client (no session), in the bridge's /metrics (by cause and
reason) and in the terminal (no call reached it).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.bridge_pki import Material, Pair, build
from tests.integration.test_bridge_helpers import (
    ROOT,
    SimProcess,
    answered,
    cli_env,
    eventually,
    market_order,
    new_secret,
    start_sim_terminal,
)
from tests.integration.tls_proxy import RecordProxy, flip_last_byte
from worker.config import load_settings
from worker.mt5 import api
from worker.mt5.bridge.client import BridgeTerminal
from worker.mt5.sessions import load_session_specs
from worker.mt5.terminals import open_terminal

SECRET = new_secret()
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Material:
    return build(tmp_path_factory.mktemp("bridge-mtls"))


@pytest.fixture(scope="module")
def bridge(pki: Material, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    tmp = tmp_path_factory.mktemp("bridge-mtls-sim")
    args = [
        *pki.bridge_args("CN=worker-prod", "CN=worker-revoked", "CN=localhost"),
        "--metrics-port", "0",
    ]  # fmt: skip
    process = start_sim_terminal(tmp, tmp / "state.db", SECRET, args=args)
    yield process
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    assert SECRET not in process.log_text()


def client(
    bridge: SimProcess, pki: Material, pair: Pair | None, *, ca: Path | None = None, **kw: str
) -> BridgeTerminal:
    return BridgeTerminal(
        bridge.address,
        kw.get("secret", SECRET),
        tls_ca=str(ca or pki.ca),
        tls_cert=str(pair.cert) if pair else None,
        tls_key=str(pair.key) if pair else None,
        timeout=10,
        connect_timeout=5,
    )


def scrape(bridge: SimProcess) -> Samples:
    assert bridge.metrics_address is not None
    with urllib.request.urlopen(f"http://{bridge.metrics_address}/metrics", timeout=5) as reply:
        text = reply.read().decode("utf-8")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def refusals(samples: Samples, cause: str, reason: str) -> float:
    return value(samples, "mt5_bridge_refusals_total", cause=cause, reason=reason)


def calls(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "mt5_bridge_calls_total")


# --- who gets in -------------------------------------------------------------------------


def test_a_listed_client_with_a_valid_certificate_is_served_and_counted(
    bridge: SimProcess, pki: Material
) -> None:
    before = scrape(bridge)
    terminal = client(bridge, pki, pki.client)
    assert terminal.initialize(), terminal.last_error()
    assert terminal.account_info() is not None
    assert eventually(lambda: value(scrape(bridge), "mt5_bridge_connected_clients") == 1)
    terminal.shutdown()
    assert eventually(lambda: value(scrape(bridge), "mt5_bridge_connected_clients") == 0)
    after = scrape(bridge)
    name = "mt5_bridge_calls_total"
    ok = {"outcome": "ok"}
    assert value(after, name, function="account_info", **ok) == (
        value(before, name, function="account_info", **ok) + 1
    )
    latency = "mt5_bridge_call_duration_seconds_count"
    assert value(after, latency, function="account_info") == (
        value(before, latency, function="account_info") + 1
    )
    assert sum(v for (n, _), v in after.items() if n == "mt5_bridge_refusals_total") == sum(
        v for (n, _), v in before.items() if n == "mt5_bridge_refusals_total"
    )


CASES = {
    # case: (the client's certificate: a Material attribute or None, cause, reason, client sees)
    "no certificate": (None, "certificate", "no_certificate", "CERTIFICATE_REQUIRED"),
    "another CA": ("foreign", "certificate", "unknown_ca", "UNKNOWN_CA"),
    "another CA under our CA's name": ("forged", "certificate", "unknown_ca", "DECRYPT_ERROR"),
    "expired": ("expired", "certificate", "expired", "CERTIFICATE_EXPIRED"),
    "revoked": ("revoked", "certificate", "revoked", "CERTIFICATE_REVOKED"),
    "valid, not on the allow-list": (
        "other", "allow_list", "client_not_allowed", "client_not_allowed",
    ),
    # a bridge's server certificate (serverAuth only), even with its CN listed
    "server certificate as client": (
        "server", "certificate", "bad_purpose", "UNSUPPORTED_CERTIFICATE",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_refused_clients_get_no_session_and_are_counted_by_cause(
    bridge: SimProcess, pki: Material, case: str
) -> None:
    attribute, cause, reason, seen = CASES[case]
    pair = getattr(pki, attribute) if attribute else None
    before = scrape(bridge)
    terminal = client(bridge, pki, pair)
    assert terminal.initialize() is False
    assert seen in terminal.last_error()[1]
    if pair is None:
        assert "requires a client certificate" in terminal.last_error()[1]
    with pytest.raises(api.TransportError):
        terminal.account_info()  # and the next call, reconnecting, is refused again
    assert eventually(
        lambda: refusals(scrape(bridge), cause, reason) == refusals(before, cause, reason) + 2
    )
    after = scrape(bridge)
    assert calls(after) == calls(before)  # nothing reached the terminal
    assert value(after, "mt5_bridge_connected_clients") == 0
    assert reason in bridge.log_text()


def test_the_secret_stays_a_second_factor_behind_mutual_tls(
    bridge: SimProcess, pki: Material
) -> None:
    before = scrape(bridge)
    terminal = client(bridge, pki, pki.client, secret="not-" + SECRET)
    assert terminal.initialize() is False
    assert eventually(
        lambda: (
            refusals(scrape(bridge), "handshake", "bad_auth")
            == refusals(before, "handshake", "bad_auth") + 1
        )
    )
    assert calls(scrape(bridge)) == calls(before)


def test_a_client_refuses_a_bridge_from_another_ca(bridge: SimProcess, pki: Material) -> None:
    before = scrape(bridge)
    terminal = client(bridge, pki, pki.client, ca=pki.foreign_ca)
    assert terminal.initialize() is False
    assert "CERTIFICATE_VERIFY_FAILED" in terminal.last_error()[1]
    # the bridge sees the client's alert: a failed handshake, not a certificate of its own
    assert eventually(
        lambda: (
            refusals(scrape(bridge), "handshake", "tls") == refusals(before, "handshake", "tls") + 1
        )
    )


def test_a_plain_tcp_client_is_refused_at_the_handshake(bridge: SimProcess) -> None:
    before = scrape(bridge)
    plain = BridgeTerminal(bridge.address, SECRET, timeout=3, connect_timeout=3)
    assert plain.initialize() is False
    assert "mutual TLS" in plain.last_error()[1]  # the worker's log says what to configure
    assert eventually(
        lambda: (
            refusals(scrape(bridge), "handshake", "tls") == refusals(before, "handshake", "tls") + 1
        )
    )


def test_sessions_from_the_environment_reach_the_bridge_over_mutual_tls(
    bridge: SimProcess, pki: Material
) -> None:
    environ = {
        "MT5_BACKEND": "bridge",
        "MT5_BRIDGE_ADDRESS": bridge.address,
        "MT5_BRIDGE_SECRET": SECRET,
        "MT5_BRIDGE_TLS_CA": str(pki.ca),
        "MT5_BRIDGE_TLS_CERT": str(pki.client.cert),
        "MT5_BRIDGE_TLS_KEY": str(pki.client.key),
        "MT5_BRIDGE_TLS_CRL": str(pki.crl),
    }
    [spec] = load_session_specs(load_settings(environ), environ)
    terminal = open_terminal(spec)
    try:
        assert terminal.account_info() is not None
    finally:
        terminal.shutdown()


# --- what TLS does to a record that is altered or played again ---------------------------


@pytest.fixture
def proxied(bridge: SimProcess, pki: Material) -> Iterator[tuple[RecordProxy, BridgeTerminal]]:
    host, port = bridge.address.rsplit(":", 1)
    proxy = RecordProxy((host, int(port)))
    terminal = BridgeTerminal(
        proxy.address,
        SECRET,
        tls_ca=str(pki.ca),
        tls_cert=str(pki.client.cert),
        tls_key=str(pki.client.key),
        timeout=10,
    )
    assert terminal.initialize(), terminal.last_error()
    yield proxy, terminal
    terminal.shutdown()
    proxy.close()


def test_a_tampered_record_breaks_the_connection(
    bridge: SimProcess, proxied: tuple[RecordProxy, BridgeTerminal]
) -> None:
    proxy, terminal = proxied
    before = scrape(bridge)
    proxy.tamper_next(flip_last_byte)
    with pytest.raises(api.TransportError):
        terminal.account_info()
    assert proxy.closed_by_server.wait(10)
    assert eventually(
        lambda: (
            refusals(scrape(bridge), "frame", "bad_record")
            == refusals(before, "frame", "bad_record") + 1
        )
    )
    assert value(
        scrape(bridge), "mt5_bridge_calls_total", function="account_info", outcome="ok"
    ) == (value(before, "mt5_bridge_calls_total", function="account_info", outcome="ok"))
    assert terminal.account_info() is not None  # a new connection, untouched, works


def test_a_replayed_order_record_is_refused_and_trades_once(
    bridge: SimProcess, pki: Material, proxied: tuple[RecordProxy, BridgeTerminal]
) -> None:
    proxy, terminal = proxied
    token = "xw" + new_secret()[:20]
    request = market_order(terminal, token)
    sent_before = len(proxy.records)
    result = terminal.order_send(request)
    assert result is not None and result.retcode == api.TRADE_RETCODE_DONE
    [order_record] = proxy.records[sent_before:]  # the encrypted order_send request
    recorded_stream = bytes(proxy.stream)
    before = scrape(bridge)

    proxy.inject(order_record)  # the same record again, on the same connection
    assert proxy.closed_by_server.wait(10)
    assert eventually(
        lambda: (
            refusals(scrape(bridge), "frame", "bad_record")
            == refusals(before, "frame", "bad_record") + 1
        )
    )
    with pytest.raises(api.TransportError):
        terminal.account_info()  # the connection is gone

    # the whole recorded connection played to a new one fails at the TLS handshake
    host, port = bridge.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(recorded_stream)
        with pytest.raises((ConnectionResetError, TimeoutError)):
            while raw.recv(65536):
                pass
            raise ConnectionResetError  # closed cleanly by the bridge: the same outcome
    assert eventually(
        lambda: (
            refusals(scrape(bridge), "handshake", "tls") == refusals(before, "handshake", "tls") + 1
        )
    )

    sent = "mt5_bridge_calls_total"
    assert value(scrape(bridge), sent, function="order_send", outcome="ok") == value(
        before, sent, function="order_send", outcome="ok"
    )
    deals = answered(lambda: terminal.history_deals_get(ticket=result.order))  # reconnects
    assert deals is not None and [deal.comment for deal in deals] == [token[:16]]  # cut
    positions = answered(lambda: terminal.positions_get(symbol="EURUSD"))
    mine = [p for p in positions or () if p.comment == token[:16]]
    assert len(mine) == 1


# --- start-up ----------------------------------------------------------------------------


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=ROOT, env=cli_env(SECRET, **env), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("command", ["sim-terminal", "bridge-serve"])
@pytest.mark.parametrize("tls", ["none", "server-only", "no allow-list"])
def test_a_non_loopback_address_without_mutual_tls_is_refused_at_start_up(
    pki: Material, tmp_path: Path, command: str, tls: str
) -> None:
    args = {
        "none": [],
        "server-only": ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)],
        "no allow-list": [
            "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
            "--tls-client-ca", str(pki.ca),
        ],
    }[tls]  # fmt: skip
    state = tmp_path / "state.db"
    extra = ["--state", str(state)] if command == "sim-terminal" else []
    done = _cli(command, "--host", "0.0.0.0", "--port", "0", *extra, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert ("mutual TLS" in line) or ("--tls-allow" in line), line
    assert not state.exists()
    assert SECRET not in done.stderr


def test_only_the_simulator_may_be_told_to_serve_a_private_network_without_tls(
    tmp_path: Path,
) -> None:
    refused = _cli(
        "bridge-serve", "--host", "0.0.0.0", "--port", "0", MT5_BRIDGE_INSECURE_NETWORK="1"
    )
    assert refused.returncode == 2 and "mutual TLS" in refused.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "sim-terminal", "--host", "0.0.0.0", "--port", "0",
         "--state", str(tmp_path / "s.db")],
        cwd=ROOT, env=cli_env(SECRET, MT5_BRIDGE_INSECURE_NETWORK="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 0.0.0.0:"), line
        port = int(line.rsplit(":", 1)[1])
        terminal = BridgeTerminal(f"127.0.0.1:{port}", SECRET)
        assert terminal.initialize()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_mutual_tls_off_loopback_starts_and_serves(pki: Material, tmp_path: Path) -> None:
    process = start_sim_terminal(
        tmp_path, tmp_path / "state.db", SECRET, args=["--host", "0.0.0.0", *pki.bridge_args()]
    )
    try:
        assert process.address.startswith("0.0.0.0:")
        terminal = BridgeTerminal(
            f"127.0.0.1:{process.port}", SECRET, tls_ca=str(pki.ca),
            tls_cert=str(pki.client.cert), tls_key=str(pki.client.key),
        )  # fmt: skip
        assert terminal.initialize(), terminal.last_error()
        assert terminal.terminal_info() is not None
    finally:
        process.signal(signal.SIGTERM)
        assert process.wait() == 0


def test_a_wrong_secret_on_loopback_gets_no_tls_hint(tmp_path: Path) -> None:
    process = start_sim_terminal(tmp_path, tmp_path / "state.db", SECRET)
    try:
        terminal = BridgeTerminal(process.address, "not-" + SECRET)
        assert terminal.initialize() is False
        assert "mutual TLS" not in terminal.last_error()[1]  # the hello came: TLS is not it
    finally:
        process.kill()
