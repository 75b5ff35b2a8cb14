"""Certificates for the bridge's mutual-TLS tests (no tests here).

The deployment's own material comes from deploy/windows/make-bridge-certs.sh (``make``);
what the script must never produce (an expired certificate, one from a foreign CA) is made
here with the ``cryptography`` package.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "windows" / "make-bridge-certs.sh"


def make(*args: str) -> subprocess.CompletedProcess[str]:
    """Run make-bridge-certs.sh with ``args``."""
    return subprocess.run(
        ["bash", str(SCRIPT), *args], check=True, capture_output=True, text=True, timeout=60
    )


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, cert: Path, key: Path) -> Authority:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        return cls(x509.load_pem_x509_certificate(cert.read_bytes()), private)

    @classmethod
    def new(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    def write(self, directory: Path, name: str) -> Path:
        path = directory / f"{name}.pem"
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def issue_client(
        self,
        directory: Path,
        name: str,
        *,
        valid_from: datetime | None = None,
        valid_until: datetime | None = None,
        ip: str | None = None,
    ) -> Pair:
        """A client certificate ``CN=name`` (clientAuth); expired when ``valid_until`` is past."""
        now = datetime.now(UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from or now - timedelta(days=1))
            .not_valid_after(valid_until or now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if ip is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                critical=False,
            )
        certificate = builder.sign(self.key, hashes.SHA256())
        pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
        pair.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        pair.key.chmod(0o600)
        return pair


@dataclass(frozen=True)
class Material:
    """One deployment's PKI, from the script, plus the certificates it must refuse."""

    ca: Path
    crl: Path
    server: Pair  # the bridge, CN=localhost, SANs localhost and 127.0.0.1
    client: Pair  # CN=worker-prod, on the allow-list
    other: Pair  # CN=worker-other, valid, NOT on the allow-list
    revoked: Pair  # CN=worker-revoked, on the allow-list, revoked in crl.pem
    expired: Pair  # CN=worker-prod from our CA, expired yesterday
    foreign: Pair  # CN=worker-prod from another CA
    foreign_ca: Path
    forged: Pair  # CN=worker-prod from another CA that took our CA's name

    def bridge_args(self, *allowed: str) -> list[str]:
        """``sim-terminal``/``bridge-serve`` options for mutual TLS with this material."""
        args = [
            "--tls-cert", str(self.server.cert), "--tls-key", str(self.server.key),
            "--tls-client-ca", str(self.ca), "--tls-crl", str(self.crl),
        ]  # fmt: skip
        for name in allowed or ("CN=worker-prod", "CN=worker-revoked"):
            args += ["--tls-allow", name]
        return args


def build(directory: Path) -> Material:
    out = directory / "pki"
    make("server", str(out), "localhost", "127.0.0.1")
    for name in ("worker-prod", "worker-other", "worker-revoked"):
        make("client", str(out), name)
    clients = out / "clients"
    make("revoke", str(out), str(clients / "worker-revoked.pem"))
    ours = Authority.load(out / "ca.pem", out / "ca.key")
    now = datetime.now(UTC)
    expired_dir = directory / "expired"
    expired_dir.mkdir()
    expired = ours.issue_client(
        expired_dir,
        "worker-prod",
        valid_from=now - timedelta(days=30),
        valid_until=now - timedelta(days=1),
    )
    foreign_dir = directory / "foreign"
    foreign_dir.mkdir()
    foreign_ca = Authority.new("another-ca")
    forged_dir = directory / "forged"
    forged_dir.mkdir()
    forged_ca = Authority.new("mt5-bridge-ca")  # our CA's name, another key
    return Material(
        ca=out / "ca.pem",
        crl=out / "crl.pem",
        server=Pair(out / "localhost.pem", out / "localhost.key"),
        client=Pair(clients / "worker-prod.pem", clients / "worker-prod.key"),
        other=Pair(clients / "worker-other.pem", clients / "worker-other.key"),
        revoked=Pair(clients / "worker-revoked.pem", clients / "worker-revoked.key"),
        expired=expired,
        foreign=foreign_ca.issue_client(foreign_dir, "worker-prod"),
        foreign_ca=foreign_ca.write(foreign_dir, "ca"),
        forged=forged_ca.issue_client(forged_dir, "worker-prod"),
    )
