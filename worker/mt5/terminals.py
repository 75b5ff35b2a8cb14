"""Opening and checking MT5 terminals per backend (simulator, native module, bridge)."""

from __future__ import annotations

from worker.config import ConfigError
from worker.errors import WorkerError
from worker.mt5 import api
from worker.mt5.sessions import SessionSpec


class SessionOpenError(WorkerError):
    """A terminal could not be opened or initialized (message safe to log)."""


def _new_terminal(spec: SessionSpec) -> api.Terminal:
    if spec.backend == "bridge":
        from worker.mt5.bridge.client import BridgeTerminal

        if spec.address is None or spec.secret is None:
            raise SessionOpenError(f"session {spec.id}: bridge needs an address and a secret")
        return BridgeTerminal(
            spec.address,
            spec.secret,
            tls_ca=spec.tls_ca,
            tls_cert=spec.tls_cert,
            tls_key=spec.tls_key,
            tls_crl=spec.tls_crl,
            tls_server_name=spec.tls_server_name,
        )
    if spec.backend == "native":
        from worker.mt5.native import NativeTerminal

        try:
            native: api.Terminal = NativeTerminal()
        except RuntimeError as exc:  # no MetaTrader5 module: a configuration error
            raise ConfigError(f"session {spec.id}: {exc}") from None
        return native
    from worker.mt5.sim.terminal import SimConfig, SimTerminal

    try:
        config = SimConfig.from_toml(spec.sim_config) if spec.sim_config else None
    except (OSError, ValueError) as exc:  # TOMLDecodeError is a ValueError
        raise ConfigError(f"session {spec.id}: sim_config {spec.sim_config}: {exc}") from None
    sim: api.Terminal = SimTerminal(config)
    return sim


def connect_terminal(terminal: api.Terminal, spec: SessionSpec) -> None:
    """(Re-)initialize ``terminal`` with the spec's account; raises SessionOpenError."""
    password = spec.password.get_secret_value() if spec.password is not None else None
    try:
        ok = terminal.initialize(spec.path, login=spec.login, password=password, server=spec.server)
    except api.TransportError as exc:
        raise SessionOpenError(f"session {spec.id}: {exc}") from None
    if not ok:
        code, message = terminal.last_error()
        raise SessionOpenError(f"session {spec.id}: initialize failed: {code} {message}")


def open_terminal(spec: SessionSpec) -> api.Terminal:
    """A connected terminal for ``spec`` (sim in process, native module, or bridge client)."""
    terminal = _new_terminal(spec)
    connect_terminal(terminal, spec)
    return terminal


def check_terminal(terminal: api.Terminal) -> str | None:
    """None when the terminal is connected, else why not (one line, no secrets)."""
    try:
        info = terminal.terminal_info()
        code, message = terminal.last_error()
    except api.TransportError as exc:
        return str(exc)
    if info is None:
        return f"terminal_info failed: {code} {message}"
    if not info.connected:
        return "terminal not connected to its trade server"
    if code in api.CONNECTION_LOST_ERRORS:
        return f"connection lost: {code} {message}"
    return None
