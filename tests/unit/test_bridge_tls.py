"""The bridge's TLS rules: loopback detection, the start-up refusal, the client allow-list,
TLS failures mapped to bounded refusal causes, and the worker's TLS session settings."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path
from typing import Any

import pytest

from worker.config import ConfigError, load_settings
from worker.mt5.bridge.metrics import CAUSES, REASONS, BridgeMetrics, cause_of
from worker.mt5.bridge.serve import ServeSecurity
from worker.mt5.bridge.tls import (
    ClientAllowList,
    InsecureBridgeAddress,
    certificate_names,
    check_listen_address,
    is_loopback,
    refusal_reason,
)
from worker.mt5.sessions import load_session_specs


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("bridge-host", False),
        ("localhost.evil.example", False),
    ],
)
def test_loopback_is_only_what_other_machines_cannot_reach(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_off_loopback_needs_mutual_tls() -> None:
    check_listen_address("127.0.0.1", mutual_tls=False)
    check_listen_address("0.0.0.0", mutual_tls=True)
    check_listen_address("0.0.0.0", mutual_tls=False, insecure_network=True)
    with pytest.raises(InsecureBridgeAddress, match="without mutual TLS"):
        check_listen_address("0.0.0.0", mutual_tls=False)
    with pytest.raises(InsecureBridgeAddress, match=r"\*"):
        check_listen_address("", mutual_tls=False)


def _cert(cn: str, *sans: tuple[str, str]) -> dict[str, Any]:
    return {
        "subject": ((("organizationName", "Desk"),), (("commonName", cn),)),
        "subjectAltName": sans,
    }


def test_certificate_names() -> None:
    cert = _cert(
        "worker-prod", ("DNS", "w.example"), ("URI", "spiffe://desk/w"), ("IP Address", "10.0.0.1")
    )
    assert certificate_names(cert) == [
        "CN=worker-prod", "DNS:w.example", "URI:spiffe://desk/w", "IP:10.0.0.1",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "cert", "matched"),
    [
        ("CN=worker-prod", _cert("worker-prod"), "CN=worker-prod"),
        ("CN=Worker-Prod", _cert("worker-prod"), "CN=worker-prod"),
        ("worker-prod", _cert("worker-prod"), "CN=worker-prod"),
        ("worker-prod", _cert("x", ("DNS", "worker-prod")), "DNS:worker-prod"),
        ("DNS:w.example", _cert("x", ("DNS", "W.example")), "DNS:W.example"),
        ("URI:spiffe://desk/w", _cert("x", ("URI", "spiffe://desk/w")), "URI:spiffe://desk/w"),
        ("URI:spiffe://desk/W", _cert("x", ("URI", "spiffe://desk/w")), None),  # exact
        ("CN=worker-prod", _cert("worker-prod-2"), None),  # no prefix match
        ("CN=worker-prod", _cert("x", ("DNS", "worker-prod")), None),  # CN= is the CN only
        ("DNS:worker-prod", _cert("worker-prod"), None),
        ("IP:10.0.0.1", _cert("x", ("IP Address", "10.0.0.1")), "IP:10.0.0.1"),
    ],
)
def test_the_allow_list_matches_exact_names(
    entry: str, cert: dict[str, Any], matched: str | None
) -> None:
    assert ClientAllowList.of([entry]).match(cert) == matched


def test_an_empty_allow_list_or_certificate_opens_nothing() -> None:
    with pytest.raises(ValueError, match="empty"):
        ClientAllowList.of([" ", ""])
    allow = ClientAllowList.of(["CN=worker-prod"])
    assert allow.match(None) is None
    assert allow.match({}) is None


def _verify_error(code: int) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_code = code
    return error


def test_tls_failures_map_to_bounded_reasons_and_causes() -> None:
    assert refusal_reason(_verify_error(10), handshake_done=False) == "expired"
    assert refusal_reason(_verify_error(20), handshake_done=False) == "unknown_ca"
    assert refusal_reason(_verify_error(23), handshake_done=False) == "revoked"
    assert refusal_reason(_verify_error(999), handshake_done=False) == "bad_certificate"
    no_cert = ssl.SSLError(1, "peer did not return a certificate")
    no_cert.reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert refusal_reason(no_cert, handshake_done=False) == "no_certificate"
    assert refusal_reason(ssl.SSLError(1, "wrong version"), handshake_done=False) == "tls"
    assert refusal_reason(ssl.SSLError(1, "bad record mac"), handshake_done=True) == "bad_record"
    assert set(REASONS.values()) == set(CAUSES)
    assert cause_of("client_not_allowed") == "allow_list"
    assert cause_of("oversized_frame") == "frame"


def test_metrics_count_unknown_reasons_as_other() -> None:
    metrics = BridgeMetrics()
    assert metrics.refused("expired") == "certificate"
    assert metrics.refused("something new") == "frame"
    assert metrics.refusal_count("certificate") == 1
    assert metrics.refusals.labels("frame", "other")._value.get() == 1
    metrics.called("__class__", "ok", 0.1)  # not a bridge function: not a label
    names = {s.labels.get("function") for m in metrics.registry.collect() for s in m.samples}
    assert "__class__" not in names


def _args(**options: Any) -> argparse.Namespace:
    base: dict[str, Any] = {
        "host": "127.0.0.1", "tls_cert": None, "tls_key": None, "tls_client_ca": None,
        "tls_crl": None, "tls_allow": None,
    }  # fmt: skip
    base.update(options)
    return argparse.Namespace(**base)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tls_key": "k.pem"}, "need --tls-cert"),
        ({"tls_allow": ["CN=w"]}, "need --tls-cert"),
        ({"tls_cert": "c.pem", "tls_client_ca": "ca.pem"}, "--tls-allow"),
        ({"tls_cert": "c.pem", "tls_allow": ["CN=w"]}, "--tls-client-ca"),
        ({"host": "0.0.0.0"}, "without mutual TLS"),
        ({"host": "0.0.0.0", "tls_cert": "c.pem", "tls_key": "k.pem"}, "without mutual TLS"),
        ({"tls_cert": "/nonexistent.pem"}, "cannot load the bridge's TLS files"),
    ],
)
def test_bridge_command_line_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServeSecurity(_args(**options))


def test_loopback_without_tls_needs_no_files() -> None:
    security = ServeSecurity(_args())
    assert security.context is None and security.allowed is None


BRIDGE_ENV = {
    "MT5_BACKEND": "bridge",
    "MT5_BRIDGE_ADDRESS": "10.0.0.5:18812",
    "MT5_BRIDGE_SECRET": "s",
}


def test_sessions_from_the_environment_carry_the_client_certificate() -> None:
    environ = {
        **BRIDGE_ENV,
        "MT5_BRIDGE_TLS_CA": "/tls/ca.pem",
        "MT5_BRIDGE_TLS_CERT": "/tls/client.pem",
        "MT5_BRIDGE_TLS_KEY": "/tls/client.key",
        "MT5_BRIDGE_TLS_CRL": "/tls/crl.pem",
    }
    [spec] = load_session_specs(load_settings(environ), environ)
    assert (spec.tls_ca, spec.tls_cert, spec.tls_key, spec.tls_crl) == (
        "/tls/ca.pem", "/tls/client.pem", "/tls/client.key", "/tls/crl.pem",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"MT5_BRIDGE_TLS_CA": "/ca.pem", "MT5_BRIDGE_TLS_CERT": "/c.pem"}, "together"),
        ({"MT5_BRIDGE_TLS_CA": "/ca.pem", "MT5_BRIDGE_TLS_KEY": "/c.key"}, "together"),
        ({"MT5_BRIDGE_TLS_CERT": "/c.pem", "MT5_BRIDGE_TLS_KEY": "/c.key"}, "tls_ca"),
        ({"MT5_BRIDGE_TLS_CRL": "/crl.pem"}, "tls_ca"),
    ],
)
def test_inconsistent_tls_settings_are_refused(extra: dict[str, str], message: str) -> None:
    environ = {**BRIDGE_ENV, **extra}
    with pytest.raises(ConfigError, match=message):
        load_session_specs(load_settings(environ), environ)


def test_a_sessions_file_names_tls_files_per_session_or_takes_the_deployment_s(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sessions.toml"
    path.write_text(
        """
[[sessions]]
id = "icm-1"
backend = "bridge"
address = "mt5-win-01:18812"
tls_ca = "/tls/ca.pem"
tls_cert = "/tls/icm.pem"
tls_key = "/tls/icm.key"
tls_server_name = "mt5-win-01.internal"

[[sessions]]
id = "icm-2"
backend = "bridge"
address = "mt5-win-02:18812"
tls_ca = "/tls/ca.pem"

[[sessions]]
id = "legacy"
backend = "bridge"
address = "127.0.0.1:18813"
""",
        encoding="utf-8",
    )
    environ = {
        "MT5_BACKEND": "bridge",
        "MT5_SESSIONS": str(path),
        "MT5_BRIDGE_SECRET": "s",
        "MT5_BRIDGE_TLS_CERT": "/tls/deployment.pem",
        "MT5_BRIDGE_TLS_KEY": "/tls/deployment.key",
        "MT5_BRIDGE_TLS_CRL": "/tls/crl.pem",
    }
    one, two, legacy = load_session_specs(load_settings(environ), environ)
    assert (one.tls_cert, one.tls_key, one.tls_server_name) == (
        "/tls/icm.pem", "/tls/icm.key", "mt5-win-01.internal",
    )  # fmt: skip
    assert (two.tls_cert, two.tls_key, two.tls_crl) == (
        "/tls/deployment.pem", "/tls/deployment.key", "/tls/crl.pem",
    )  # fmt: skip
    # a session without TLS stays without (loopback bridges; off loopback they now refuse it)
    assert (legacy.tls_ca, legacy.tls_cert) == (None, None)


def test_the_windows_installer_starts_bridge_serve_with_mutual_tls() -> None:
    import re

    from worker.cli import command_options

    script = (Path(__file__).resolve().parents[2] / "deploy/windows/install-bridge.ps1").read_text(
        encoding="utf-8"
    )
    passed = set(re.findall(r"'(--[a-z][a-z-]+)'", script))
    known = command_options("bridge-serve")
    assert passed <= known, passed - known
    assert {"--tls-cert", "--tls-key", "--tls-client-ca", "--tls-allow", "--tls-crl"} <= passed
    assert {"--metrics-port", "--metrics-host"} <= passed
