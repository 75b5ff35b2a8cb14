"""deploy/windows/make-bridge-certs.sh makes certificates the bridge and its clients accept.

A bridge served with the script's server certificate (loaded the way bridge-serve loads
--tls-cert/--tls-key) is reached over TLS on loopback by a client that trusts only the
script's CA, under each name the certificate lists; a client trusting another CA is refused.
"""

from __future__ import annotations

import os
import secrets
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from worker.mt5.bridge.client import BridgeServer, BridgeTerminal
from worker.mt5.sim.terminal import SimTerminal

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "windows" / "make-bridge-certs.sh"


def make(out: Path, name: str, *sans: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), str(out), name, *sans],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make(out, "localhost", "127.0.0.1")
    return out


@pytest.fixture(scope="module")
def secret() -> str:
    return secrets.token_hex(16)


@pytest.fixture(scope="module")
def server(certs: Path, secret: str) -> Iterator[BridgeServer]:
    terminal = SimTerminal()
    assert terminal.initialize()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(certs / "localhost.pem"), str(certs / "localhost.key"))
    bridge = BridgeServer(terminal, secret.encode(), host="127.0.0.1", port=0, tls=context)
    bridge.start()
    try:
        yield bridge
    finally:
        bridge.stop(timeout=5)
        terminal.shutdown()


def test_keys_are_private_and_the_ca_is_reused(certs: Path) -> None:
    for key in ("ca.key", "localhost.key"):
        assert stat.S_IMODE(os.stat(certs / key).st_mode) == 0o600
    ca_before = (certs / "ca.pem").read_bytes()
    make(certs, "second-host")
    assert (certs / "ca.pem").read_bytes() == ca_before
    assert "BEGIN PRIVATE KEY" not in (certs / "localhost.pem").read_text()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_clients_trusting_the_ca_reach_the_bridge_under_each_name(
    server: BridgeServer, certs: Path, secret: str, host: str
) -> None:
    _, port = server.address
    client = BridgeTerminal(f"{host}:{port}", secret, tls_ca=str(certs / "ca.pem"), timeout=5)
    try:
        assert client.initialize(), client.last_error()
        assert client.account_info() is not None
    finally:
        client.shutdown()


def test_a_client_trusting_another_ca_is_refused(
    server: BridgeServer, secret: str, tmp_path: Path
) -> None:
    make(tmp_path, "localhost", "127.0.0.1")  # same names, a different CA
    _, port = server.address
    client = BridgeTerminal(f"127.0.0.1:{port}", secret, tls_ca=str(tmp_path / "ca.pem"), timeout=5)
    assert client.initialize() is False
    assert "CERTIFICATE_VERIFY_FAILED" in client.last_error()[1]


def test_usage_without_arguments() -> None:
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert "OUT_DIR NAME" in result.stderr


# --- mutual TLS: client certificates and the CRL -----------------------------------------


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _crl(out: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((out / "crl.pem").read_bytes())


def test_client_and_server_certificates_are_for_their_role_only(tmp_path: Path) -> None:
    make(tmp_path, "mt5-win-01", "10.0.0.5")
    subprocess.run(["bash", str(SCRIPT), "client", str(tmp_path), "worker-prod"], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    client = _load(tmp_path / "clients" / "worker-prod.pem")
    server = _load(tmp_path / "mt5-win-01.pem")
    usage = x509.ExtendedKeyUsage
    assert list(client.extensions.get_extension_for_class(usage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert list(server.extensions.get_extension_for_class(usage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert client.subject.rfc4514_string() == "CN=worker-prod"
    assert client.issuer == server.issuer == _load(tmp_path / "ca.pem").subject
    assert stat.S_IMODE(os.stat(tmp_path / "clients" / "worker-prod.key").st_mode) == 0o600
    assert _crl(tmp_path).next_update_utc is not None  # an empty CRL from day one
    assert list(_crl(tmp_path)) == []


def test_revoke_lists_the_certificate_in_a_newly_signed_crl(tmp_path: Path) -> None:
    run = lambda *a: subprocess.run(  # noqa: E731
        ["bash", str(SCRIPT), *a], capture_output=True, text=True, timeout=60
    )
    assert run("client", str(tmp_path), "worker-old").returncode == 0
    assert run("client", str(tmp_path), "worker-new").returncode == 0
    first = _crl(tmp_path)
    old = _load(tmp_path / "clients" / "worker-old.pem")
    done = run("revoke", str(tmp_path), str(tmp_path / "clients" / "worker-old.pem"))
    assert done.returncode == 0, done.stderr
    revoked = _crl(tmp_path)
    assert [entry.serial_number for entry in revoked] == [old.serial_number]
    assert revoked.is_signature_valid(_load(tmp_path / "ca.pem").public_key())  # type: ignore[arg-type]
    number = x509.CRLNumber
    assert (
        revoked.extensions.get_extension_for_class(number).value.crl_number
        > first.extensions.get_extension_for_class(number).value.crl_number
    )
    # again: idempotent; `crl` re-signs with the same entries and a later number
    assert (
        run("revoke", str(tmp_path), str(tmp_path / "clients" / "worker-old.pem")).returncode == 0
    )
    assert run("crl", str(tmp_path)).returncode == 0
    assert [entry.serial_number for entry in _crl(tmp_path)] == [old.serial_number]
    # a certificate of another CA is not ours to revoke
    other = tmp_path / "other"
    make(other, "elsewhere")
    refused = run("revoke", str(tmp_path), str(other / "elsewhere.pem"))
    assert refused.returncode == 1 and "not issued by" in refused.stderr
    assert run("crl", str(tmp_path / "nothing-here")).returncode == 1


def test_usage_lists_the_subcommands() -> None:
    result = subprocess.run(
        ["bash", str(SCRIPT), "client"], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 2
    for form in ("client OUT_DIR NAME", "revoke OUT_DIR CERT.pem", "crl OUT_DIR"):
        assert form in result.stderr


def test_renewal_keeps_the_replaced_certificate_for_revocation(tmp_path: Path) -> None:
    make(tmp_path, "mt5-win-01")
    first = _load(tmp_path / "mt5-win-01.pem")
    make(tmp_path, "mt5-win-01")
    assert _load(tmp_path / "mt5-win-01.previous.pem") == first
    assert _load(tmp_path / "mt5-win-01.pem").serial_number != first.serial_number
    subprocess.run(
        ["bash", str(SCRIPT), "revoke", str(tmp_path), str(tmp_path / "mt5-win-01.previous.pem")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert [entry.serial_number for entry in _crl(tmp_path)] == [first.serial_number]
