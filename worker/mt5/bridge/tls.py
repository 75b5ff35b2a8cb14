"""TLS of the terminal bridge: contexts, the client allow-list, and what a TLS failure means.

Off loopback the bridge runs mutual TLS 1.3 (``server_context`` with a client CA): the server
requires a client certificate signed by that CA (``CERT_REQUIRED``) and then accepts only the
clients whose certificate names are on its :class:`ClientAllowList`; the worker verifies the
bridge's certificate against its configured CA and host name and presents its own
(``client_context``). A CRL file, when given, is checked for the peer's certificate on both
sides (OpenSSL refuses every certificate once the CRL's ``nextUpdate`` has passed: it fails
closed, so re-sign the CRL before then).

Loopback may run without TLS (the shared-secret handshake of :mod:`.protocol` authenticates
both sides there, and stays on as a second factor behind mutual TLS).
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from worker.errors import WorkerError

LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})

# OpenSSL X509_V_ERR_* codes -> refusal reasons (bounded set, see metrics.REASONS)
_VERIFY_REASONS: Final[Mapping[int, str]] = {
    2: "unknown_ca",  # unable to get issuer certificate
    7: "unknown_ca",  # signature failure: another CA under our CA's name
    9: "not_yet_valid",
    10: "expired",
    12: "crl_expired",
    18: "unknown_ca",  # self-signed leaf
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",
    23: "revoked",
    26: "bad_purpose",  # e.g. a server certificate presented as a client certificate
}


class InsecureBridgeAddress(WorkerError, ValueError):
    """A bridge would listen off loopback without mutual TLS."""


def is_loopback(host: str) -> bool:
    """True only for names and addresses that cannot be reached from another machine."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # any other host name: assume it resolves off the machine


def check_listen_address(host: str, *, mutual_tls: bool, insecure_network: bool = False) -> None:
    """Raise :class:`InsecureBridgeAddress` for a non-loopback listener without mutual TLS."""
    if mutual_tls or insecure_network or is_loopback(host):
        return
    raise InsecureBridgeAddress(
        f"refusing to serve the bridge on {host or '*'} without mutual TLS: off loopback give "
        "--tls-cert, --tls-key, --tls-client-ca and at least one --tls-allow "
        "(docs/TLS.md), or listen on 127.0.0.1"
    )


# --- contexts --------------------------------------------------------------------------


def _load_crl(context: ssl.SSLContext, crl: str | None) -> None:
    if crl is None:
        return
    # a PEM file may hold CRLs; OpenSSL's file lookup loads them next to the CA
    context.load_verify_locations(cafile=crl)
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def server_context(
    cert: str, key: str | None, *, client_ca: str | None = None, crl: str | None = None
) -> ssl.SSLContext:
    """The bridge's context: mutual TLS 1.3 with ``client_ca``, else server-only TLS
    (accepted on loopback only, for deployments that have not migrated yet)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if client_ca is None:
        if crl is not None:
            raise ValueError("a CRL needs a client CA (--tls-client-ca)")
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=client_ca)
    _load_crl(context, crl)
    return context


def client_context(
    ca: str, *, cert: str | None = None, key: str | None = None, crl: str | None = None
) -> ssl.SSLContext:
    """The worker's context: verifies the bridge against ``ca`` (and its host name), presents
    ``cert`` when given. TLS 1.3 only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    elif key is not None:
        raise ValueError("a TLS key needs its certificate")
    _load_crl(context, crl)
    return context


def is_mutual(context: ssl.SSLContext | None) -> bool:
    return context is not None and context.verify_mode == ssl.CERT_REQUIRED


# --- allow-list ------------------------------------------------------------------------

_SAN_PREFIX: Final = {"DNS": "DNS", "URI": "URI", "email": "email", "IP Address": "IP"}


def certificate_names(peercert: Mapping[str, Any]) -> list[str]:
    """``CN=...`` of the subject and ``DNS:``/``URI:``/``email:``/``IP:`` of each SAN, from
    :meth:`ssl.SSLSocket.getpeercert`."""
    names: list[str] = []
    for rdn in peercert.get("subject", ()):
        for attribute, value in rdn:
            if attribute == "commonName":
                names.append(f"CN={value}")
    for kind, value in peercert.get("subjectAltName", ()):
        prefix = _SAN_PREFIX.get(kind)
        if prefix is not None:
            names.append(f"{prefix}:{value}")
    return names


@dataclass(frozen=True)
class ClientAllowList:
    """Client certificate names a bridge accepts.

    An entry ``CN=worker-prod``, ``DNS:worker.example``, ``URI:spiffe://...``, ``email:...``
    or ``IP:10.0.0.1`` matches exactly that name of the certificate; a bare entry
    (``worker-prod``) matches the subject CN or a DNS name. DNS names and CNs compare
    case-insensitively.
    """

    entries: tuple[str, ...]

    def __post_init__(self) -> None:
        cleaned = tuple(entry.strip() for entry in self.entries if entry.strip())
        if not cleaned:
            raise ValueError("the client allow-list is empty")
        object.__setattr__(self, "entries", cleaned)

    @classmethod
    def of(cls, entries: Iterable[str]) -> ClientAllowList:
        return cls(tuple(entries))

    def _wanted(self) -> set[str]:
        wanted: set[str] = set()
        for entry in self.entries:
            if entry.startswith("CN=") or ":" in entry:
                wanted.add(_key(entry))
            else:
                wanted.update({_key(f"CN={entry}"), _key(f"DNS:{entry}")})
        return wanted

    def match(self, peercert: Mapping[str, Any] | None) -> str | None:
        """The first certificate name on the list, or None."""
        if not peercert:
            return None
        wanted = self._wanted()
        for name in certificate_names(peercert):
            if _key(name) in wanted:
                return name
        return None


def _key(name: str) -> str:
    if name.startswith("CN="):
        kind, value = "CN", name[3:]
    else:
        kind, _, value = name.partition(":")
    return f"{kind}:{value.lower()}" if kind in ("CN", "DNS") else f"{kind}:{value}"


# --- failures --------------------------------------------------------------------------


def refusal_reason(exc: ssl.SSLError, *, handshake_done: bool) -> str:
    """A bounded reason for a TLS failure seen by the server."""
    if handshake_done:
        return "bad_record"  # a tampered, replayed or truncated record after the handshake
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "bad_certificate")
    reason = (getattr(exc, "reason", None) or "").upper()
    if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
        return "no_certificate"
    if "CERTIFICATE" in reason and "ALERT" not in reason:
        return "bad_certificate"
    return "tls"  # not TLS at all, no common version or cipher, the client refused us
