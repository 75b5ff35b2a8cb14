"""``execution-worker sim-terminal`` and ``execution-worker bridge-serve``.

Both serve one terminal over the bridge until SIGTERM/SIGINT. The bridge secret comes from
``MT5_BRIDGE_SECRET`` (or ``MT5_BRIDGE_SECRET_FILE``); without one they refuse to start.
Off loopback they also refuse to start without mutual TLS (``--tls-cert``, ``--tls-key``,
``--tls-client-ca``, ``--tls-allow``; ``--tls-crl`` optional): see docs/TLS.md.
Once listening they print one line ``listening on HOST:PORT`` to stdout (port 0 picks a
free port, so a supervisor or a test can read the real one), then, with ``--metrics-port``,
a line ``metrics on HOST:PORT``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from worker.config import ConfigError
from worker.mt5 import api
from worker.mt5.bridge.metrics import BridgeMetrics
from worker.mt5.bridge.server import BridgeServer
from worker.mt5.bridge.tls import ClientAllowList, check_listen_address, server_context

if TYPE_CHECKING:
    from worker.mt5.sim.config import SimConfig

_log = logging.getLogger("worker.mt5.bridge.client")

DUMP_FIELDS = (
    "ticket",
    "order",
    "position_id",
    "symbol",
    "type",
    "volume",
    "price",
    "comment",
    "magic",
    "time_msc",
)
WATCH_INTERVAL_SECONDS = 5.0


def read_secret(environ: Mapping[str, str], name: str) -> str | None:
    """``NAME`` or the content of the file named by ``NAME_FILE`` (stripped); never logged."""
    file_name = environ.get(f"{name}_FILE")
    if file_name:
        try:
            value = Path(file_name).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE: cannot read {file_name}: {exc.strerror}") from None
    else:
        value = environ.get(name, "")
    return value or None


def _bridge_secret(environ: Mapping[str, str]) -> bytes:
    secret = read_secret(environ, "MT5_BRIDGE_SECRET")
    if secret is None:
        raise ConfigError(
            "MT5_BRIDGE_SECRET (or MT5_BRIDGE_SECRET_FILE) is required to serve a terminal"
        )
    from worker.observability.logs import register_secret

    register_secret(secret)
    return secret.encode("utf-8")


class ServeSecurity:
    """The TLS context and client allow-list of one bridge, from its command line."""

    def __init__(self, args: argparse.Namespace, *, insecure_network: bool = False) -> None:
        cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
        client_ca = getattr(args, "tls_client_ca", None)
        crl = getattr(args, "tls_crl", None)
        allow = [entry for entry in getattr(args, "tls_allow", None) or [] if entry.strip()]
        if not cert and (key or client_ca or crl or allow):
            raise ConfigError(
                "--tls-key, --tls-client-ca, --tls-crl and --tls-allow need --tls-cert"
            )
        if client_ca and not allow:
            raise ConfigError(
                "--tls-client-ca needs at least one --tls-allow NAME (the client certificates "
                "this bridge accepts: CN=..., DNS:..., URI:...)"
            )
        if allow and not client_ca:
            raise ConfigError(
                "--tls-allow needs --tls-client-ca (the CA of the client certificates)"
            )
        try:
            check_listen_address(
                args.host, mutual_tls=bool(cert and client_ca), insecure_network=insecure_network
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.context: ssl.SSLContext | None = None
        self.allowed: ClientAllowList | None = ClientAllowList.of(allow) if allow else None
        if cert:
            try:
                self.context = server_context(cert, key, client_ca=client_ca, crl=crl)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"cannot load the bridge's TLS files: {exc}") from None


def _metrics(args: argparse.Namespace) -> BridgeMetrics:
    metrics = BridgeMetrics()
    port = getattr(args, "metrics_port", None)
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError("--metrics-port must be 0..65535")
    return metrics


def _serve_metrics(args: argparse.Namespace, metrics: BridgeMetrics) -> None:
    port = getattr(args, "metrics_port", None)
    if port is None:
        return
    host = getattr(args, "metrics_host", None) or args.host
    try:
        bound_host, bound_port = metrics.serve(host, port)
    except OSError as exc:
        raise ConfigError(f"--metrics-port {port}: {exc.strerror or exc}") from None
    print(f"metrics on {bound_host}:{bound_port}", flush=True)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _configure_logging(environ: Mapping[str, str]) -> None:
    from worker.observability.logs import configure_logging

    log_format = environ.get("LOG_FORMAT", "json") or "json"
    if log_format not in ("json", "console"):
        raise ConfigError("invalid setting LOG_FORMAT: give json or console")
    level = (environ.get("LOG_LEVEL") or "INFO").strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"invalid setting LOG_LEVEL: give one of {', '.join(LOG_LEVELS)}")
    configure_logging("console" if log_format == "console" else "json", level)


def _serve_until_signalled(
    server: BridgeServer, args: argparse.Namespace, *, watch: threading.Thread | None
) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        _log.info("bridge: signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        host, port = server.start()
    except OSError as exc:
        raise ConfigError(
            f"--host {args.host} --port {args.port}: {exc.strerror or exc} (another process,"
            " an earlier sim-terminal?); stop it or choose another --port"
        ) from None
    print(f"listening on {host}:{port}", flush=True)
    _serve_metrics(args, server.metrics)
    if watch is not None:
        watch.start()
    while not stop.wait(1.0):
        pass
    server.stop()
    return 0


def dump_deals(state_path: str) -> int:
    from worker.mt5.sim.terminal import iter_deals

    if not Path(state_path).exists():
        raise ConfigError(f"--state {state_path}: no such file")
    out = sys.stdout
    for deal in iter_deals(state_path):
        out.write(json.dumps({name: deal.get(name) for name in DUMP_FIELDS}) + "\n")
    out.flush()
    return 0


def _bad_state(path: str, exc: sqlite3.Error) -> ConfigError:
    return ConfigError(
        f"--state {path}: not a simulator state file ({exc}); give a new path (it is created)"
        " or the file an earlier sim-terminal wrote"
    )


def sim_terminal_main(args: argparse.Namespace) -> int:
    try:
        return _sim_terminal(args)
    except sqlite3.Error as exc:
        raise _bad_state(args.state, exc) from None


def _sim_terminal(args: argparse.Namespace) -> int:
    if args.dump:
        return dump_deals(args.state)
    from worker.mt5.sim.terminal import SimConfig, SimTerminal

    environ = os.environ
    secret = _bridge_secret(environ)
    # the simulator may serve a private container network without TLS (the compose stack);
    # bridge-serve, which holds a real account, has no such switch
    insecure = environ.get("MT5_BRIDGE_INSECURE_NETWORK", "") == "1"
    security = ServeSecurity(args, insecure_network=insecure)
    metrics = _metrics(args)
    _configure_logging(environ)
    try:
        config = SimConfig.from_toml(args.config) if args.config else None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--config {args.config}: {exc}") from None
    if getattr(args, "profile", None):
        config = _replayed(args.profile, config)
    terminal = SimTerminal(config, state_path=args.state)
    if not terminal.initialize():
        print(f"sim-terminal: initialize failed: {terminal.last_error()}", file=sys.stderr)
        return 1
    server = _server(terminal, secret, args, security, metrics, insecure_network=insecure)
    # like a real terminal, the simulated one comes back after its connection drops
    watch = threading.Thread(
        target=_watch_terminal,
        args=(server, terminal.initialize),
        name="sim-terminal-watch",
        daemon=True,
    )
    try:
        return _serve_until_signalled(server, args, watch=watch)
    finally:
        terminal.shutdown()
        terminal.close()  # releases the state file


def _replayed(path: str, base: SimConfig | None) -> SimConfig:
    """The simulator as the broker profile at ``path`` found its server (on ``base``)."""
    from worker.mt5.profile.toml import ProfileError, load_profile
    from worker.mt5.sim.replay import replay, replay_notes

    try:
        profile = load_profile(path)
    except ProfileError as exc:
        raise ConfigError(f"--profile: {exc}") from None
    for note in replay_notes(profile, base):
        _log.warning("sim-terminal --profile: %s", note)
    return replay(profile, base)


def bridge_serve_main(args: argparse.Namespace) -> int:
    from worker.mt5.native import NativeTerminal

    environ = os.environ
    secret = _bridge_secret(environ)
    security = ServeSecurity(args)
    metrics = _metrics(args)
    _configure_logging(environ)
    path = args.terminal_path or environ.get("MT5_PATH") or None
    login_text = getattr(args, "login", None) or environ.get("MT5_LOGIN")
    server_name = getattr(args, "server", None) or environ.get("MT5_SERVER") or None
    try:
        login = int(login_text) if login_text else None
    except ValueError:
        raise ConfigError("MT5_LOGIN must be an integer account number") from None
    password = read_secret(environ, "MT5_PASSWORD")
    if password is not None:
        from worker.observability.logs import register_secret

        register_secret(password)
    try:
        terminal: api.Terminal = NativeTerminal()
    except RuntimeError as exc:  # no MetaTrader5 module on this platform
        raise ConfigError(str(exc)) from None

    def connect() -> bool:
        return terminal.initialize(path, login=login, password=password, server=server_name)

    if not connect():
        code, message = terminal.last_error()
        print(f"bridge-serve: initialize failed: {code} {message}", file=sys.stderr)
        return 1
    server = _server(terminal, secret, args, security, metrics)
    watch = threading.Thread(
        target=_watch_terminal, args=(server, connect), name="bridge-watch", daemon=True
    )
    try:
        return _serve_until_signalled(server, args, watch=watch)
    finally:
        with server.lock:
            terminal.shutdown()


def _server(
    terminal: api.Terminal,
    secret: bytes,
    args: argparse.Namespace,
    security: ServeSecurity,
    metrics: BridgeMetrics,
    *,
    insecure_network: bool = False,
) -> BridgeServer:
    return BridgeServer(
        terminal,
        secret,
        host=args.host,
        port=args.port,
        tls=security.context,
        allowed_clients=security.allowed,
        metrics=metrics,
        insecure_network=insecure_network,
    )


def _watch_terminal(server: BridgeServer, connect: Callable[[], bool]) -> None:
    """Re-initialize the terminal when it reports itself disconnected."""
    while True:
        time.sleep(WATCH_INTERVAL_SECONDS)
        with server.lock:
            info = server.terminal.terminal_info()
            if info is not None and info.connected:
                continue
            _log.warning("bridge: terminal disconnected, initializing again")
            server.terminal.shutdown()
            if not connect():
                _log.warning("bridge: initialize failed: %s", server.terminal.last_error()[0])
