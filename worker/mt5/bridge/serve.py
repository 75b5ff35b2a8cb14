"""``execution-worker sim-terminal`` and ``execution-worker bridge-serve``.

Both serve one terminal over the bridge until SIGTERM/SIGINT. The bridge secret comes from
``MT5_BRIDGE_SECRET`` (or ``MT5_BRIDGE_SECRET_FILE``); without one they refuse to start.
Once listening they print one line ``listening on HOST:PORT`` to stdout (port 0 picks a
free port, so a supervisor or a test can read the real one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType

from worker.config import ConfigError
from worker.mt5 import api
from worker.mt5.bridge.server import BridgeServer

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


def _tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert:
        if key:
            raise ConfigError("--tls-key needs --tls-cert")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert}: {exc}") from None
    return context


def _configure_logging(environ: Mapping[str, str]) -> None:
    from worker.observability.logs import configure_logging

    log_format = environ.get("LOG_FORMAT", "json")
    configure_logging(
        "console" if log_format == "console" else "json", environ.get("LOG_LEVEL", "INFO")
    )


def _serve_until_signalled(server: BridgeServer, *, watch: threading.Thread | None) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        _log.info("bridge: signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = server.start()
    print(f"listening on {host}:{port}", flush=True)
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


def sim_terminal_main(args: argparse.Namespace) -> int:
    if args.dump:
        return dump_deals(args.state)
    from worker.mt5.sim.terminal import SimConfig, SimTerminal

    environ = os.environ
    secret = _bridge_secret(environ)
    tls = _tls_context(getattr(args, "tls_cert", None), getattr(args, "tls_key", None))
    _configure_logging(environ)
    try:
        config = SimConfig.from_toml(args.config) if args.config else None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--config {args.config}: {exc}") from None
    terminal = SimTerminal(config, state_path=args.state)
    if not terminal.initialize():
        print(f"sim-terminal: initialize failed: {terminal.last_error()}", file=sys.stderr)
        return 1
    server = BridgeServer(terminal, secret, host=args.host, port=args.port, tls=tls)
    # like a real terminal, the simulated one comes back after its connection drops
    watch = threading.Thread(
        target=_watch_terminal,
        args=(server, terminal.initialize),
        name="sim-terminal-watch",
        daemon=True,
    )
    try:
        return _serve_until_signalled(server, watch=watch)
    finally:
        terminal.shutdown()
        terminal.close()  # releases the state file


def bridge_serve_main(args: argparse.Namespace) -> int:
    from worker.mt5.native import NativeTerminal

    environ = os.environ
    secret = _bridge_secret(environ)
    tls = _tls_context(args.tls_cert, args.tls_key)
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
    server = BridgeServer(terminal, secret, host=args.host, port=args.port, tls=tls)
    watch = threading.Thread(
        target=_watch_terminal, args=(server, connect), name="bridge-watch", daemon=True
    )
    try:
        return _serve_until_signalled(server, watch=watch)
    finally:
        with server.lock:
            terminal.shutdown()


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
