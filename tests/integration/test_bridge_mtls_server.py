"""A mutual-TLS bridge server in this process: the CRL on both sides (a worker refuses a
revoked bridge certificate; an expired CRL fails closed, every client refused as
``crl_expired``), and the limits that stay behind TLS (handshake deadline, frame size)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.integration.bridge_pki import Authority, Material, build, make
from tests.integration.test_bridge_helpers import address_of, eventually, new_secret, served
from worker.mt5.bridge.client import BridgeConnection, BridgeServer, BridgeTerminal
from worker.mt5.bridge.tls import ClientAllowList, client_context, server_context
from worker.mt5.sim.terminal import SimTerminal

SECRET = new_secret()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Material:
    return build(tmp_path_factory.mktemp("crl"))


@pytest.fixture
def sim() -> SimTerminal:
    terminal = SimTerminal()
    assert terminal.initialize()
    return terminal


def _client(address: str, pki: Material, *, crl: Path | None) -> BridgeTerminal:
    return BridgeTerminal(
        address, SECRET, tls_ca=str(pki.ca), tls_cert=str(pki.client.cert),
        tls_key=str(pki.client.key), tls_crl=str(crl) if crl else None, timeout=5,
    )  # fmt: skip


def test_a_worker_with_the_crl_refuses_a_revoked_bridge_certificate(
    pki: Material, sim: SimTerminal
) -> None:
    out = pki.ca.parent
    make("server", str(out), "stolen-host", "127.0.0.1")
    make("revoke", str(out), str(out / "stolen-host.pem"))
    context = server_context(
        str(out / "stolen-host.pem"), str(out / "stolen-host.key"), client_ca=str(pki.ca)
    )
    allow = ClientAllowList.of(["CN=worker-prod"])
    with served(sim, SECRET, tls=context, allowed_clients=allow) as bridge:
        checked = _client(address_of(bridge), pki, crl=pki.crl)
        assert checked.initialize() is False
        assert "certificate revoked" in checked.last_error()[1]
        assert bridge.calls == 0
        # the CRL is what refused it: without one the same bridge is trusted
        unchecked = _client(address_of(bridge), pki, crl=None)
        assert unchecked.initialize(), unchecked.last_error()


def test_an_expired_crl_refuses_every_client(
    pki: Material, sim: SimTerminal, tmp_path: Path
) -> None:
    ca = Authority.load(pki.ca, pki.ca.parent / "ca.key")
    now = datetime.now(UTC)
    stale = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now - timedelta(days=40))
        .next_update(now - timedelta(days=10))
        .sign(ca.key, hashes.SHA256())
    )
    crl = tmp_path / "stale-crl.pem"
    crl.write_bytes(stale.public_bytes(serialization.Encoding.PEM))
    context = server_context(
        str(pki.server.cert), str(pki.server.key), client_ca=str(pki.ca), crl=str(crl)
    )
    allow = ClientAllowList.of(["CN=worker-prod"])
    with served(sim, SECRET, tls=context, allowed_clients=allow) as bridge:
        terminal = _client(address_of(bridge), pki, crl=None)
        assert terminal.initialize() is False
        # counted by the server's thread, maybe just after the client saw the alert
        assert eventually(lambda: bridge.refusals["crl_expired"] == 1)
        assert bridge.metrics.refusal_count("certificate") == 1
        assert bridge.calls == 0


@pytest.fixture
def mutual(pki: Material, sim: SimTerminal) -> Iterator[BridgeServer]:
    context = server_context(
        str(pki.server.cert), str(pki.server.key), client_ca=str(pki.ca), crl=str(pki.crl)
    )
    allow = ClientAllowList.of(["CN=worker-prod"])
    with served(sim, SECRET, tls=context, allowed_clients=allow, handshake_timeout=1.0) as bridge:
        yield bridge


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_slow_clients_are_cut_at_the_handshake_deadline(
    mutual: BridgeServer, pki: Material
) -> None:
    silent = socket.create_connection(mutual.address, timeout=10)  # never sends a ClientHello
    assert _closed_by_peer(silent)
    silent.close()
    assert eventually(lambda: mutual.refusals["handshake_timeout"] == 1)
    # through TLS and the allow-list, then silent during the secret handshake
    context = client_context(str(pki.ca), cert=str(pki.client.cert), key=str(pki.client.key))
    with (
        socket.create_connection(mutual.address, timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert _closed_by_peer(tls)
    assert eventually(lambda: mutual.refusals["handshake_timeout"] == 2)
    assert mutual.metrics.refusal_count("handshake") == 2
    assert _client(address_of(mutual), pki, crl=pki.crl).initialize()  # others are served


def test_an_oversized_frame_behind_tls_is_refused(mutual: BridgeServer, pki: Material) -> None:
    connection = BridgeConnection(
        address_of(mutual), SECRET, tls_ca=str(pki.ca), tls_cert=str(pki.client.cert),
        tls_key=str(pki.client.key),
    )  # fmt: skip
    connection.connect()
    channel = connection._channel
    assert channel is not None
    channel.sock.sendall(struct.pack(">I", 2 << 20))  # announces 2 MiB
    assert _closed_by_peer(channel.sock)  # type: ignore[arg-type]
    assert eventually(lambda: mutual.refusals["oversized_frame"] == 1)
    assert mutual.metrics.refusal_count("frame") == 1
    assert mutual.calls == 0
