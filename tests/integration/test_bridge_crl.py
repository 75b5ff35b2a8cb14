"""The CRL on both sides of the bridge: workers refuse a revoked bridge certificate, and an
expired CRL fails closed (every client refused, counted as ``crl_expired``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.integration.bridge_pki import Authority, Material, build, make
from tests.integration.test_bridge_helpers import address_of, eventually, new_secret, served
from worker.mt5.bridge.client import BridgeTerminal
from worker.mt5.bridge.tls import ClientAllowList, server_context
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
