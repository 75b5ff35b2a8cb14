"""Which MT5 sessions a worker process uses (``MT5_SESSIONS``), and their lock keys.

``MT5_SESSIONS`` is either a count or the path of a TOML file:

- a count N with ``MT5_BACKEND=sim``: N in-process simulated sessions ``sim-0``..``sim-N-1``
  (configured by the simulator TOML file named by ``SIM_CONFIG``, if set)
  (each private to this process).
- a count N with ``MT5_BACKEND=bridge``: N bridge sessions ``bridge-0``.. at
  ``MT5_BRIDGE_ADDRESS``, which is either a comma-separated list of exactly N ``host:port``
  addresses, or ONE address: then the sessions use N consecutive ports from it
  (``host:P``, ``host:P+1``, ...: one bridge per terminal, the usual layout of a host
  running N terminals). The secret is ``MT5_BRIDGE_SECRET``; ``MT5_BRIDGE_TLS_CA`` (a CA
  file) turns TLS on, ``MT5_BRIDGE_TLS_CERT`` / ``MT5_BRIDGE_TLS_KEY`` (this deployment's
  client certificate and key) make it mutual, as bridges off loopback require, and
  ``MT5_BRIDGE_TLS_CRL`` refuses revoked bridge certificates (docs/TLS.md).
- a count with ``MT5_BACKEND=native``: must be 1 (the module holds one terminal per
  process); ``MT5_PATH``, ``MT5_LOGIN``, ``MT5_SERVER`` and ``MT5_PASSWORD`` /
  ``MT5_PASSWORD_FILE`` describe it.
- a file::

      [[sessions]]
      id = "icm-1"
      backend = "bridge"                 # sim | native | bridge
      address = "10.0.0.5:18812"
      login = 5012345                    # optional; checked against the remote account
      server = "ICMarkets-Demo"
      secret_env = "ICM1_BRIDGE_SECRET"  # or secret_file; default MT5_BRIDGE_SECRET
      tls_ca = "/etc/worker/bridge-ca.pem"
      tls_cert = "/etc/worker/client.pem"  # mutual TLS: this deployment's certificate
      tls_key = "/etc/worker/client.key"   # (default MT5_BRIDGE_TLS_CERT / _KEY)
      tls_crl = "/etc/worker/crl.pem"      # optional (default MT5_BRIDGE_TLS_CRL)
      tls_server_name = "mt5-win-01"       # optional: the name to verify, if not the host

  Native sessions take ``path``, ``login``, ``server`` and ``password_env`` /
  ``password_file``; sim sessions may take ``sim_config`` (a simulator TOML file).
  Any session may name its account's ``broker_profile`` (written by ``execution-worker
  probe``; ``BROKER_PROFILE`` in the environment for a worker with one account).
  Secrets are never written in this file, only where to find them.

A session has ONE identity (``SessionSpec.identity``): what makes it the same broker
account on every worker, a bridge's address (and login), a native account's server and
login. An in-process sim is private, so its identity includes a per-process token. The
lock key (``SessionSpec.lock_key``, a stable 32-bit hash of it) makes a session exclusive
across processes, and an execution row records the identity itself (``session_key``), so
any process that has the account resumes the row, whatever its sessions file calls it. The
configured ``id`` is only this process's name for the session (logs, metrics, the
confirmation's ``session_id``). Processes sharing a bridge must agree on its address and
login, not on its id.

Accounts: every session belongs to one broker account, named by the session's optional
``account = "alias"`` key, else ``"<server>:<login>"`` (both keys set), else unnamed. Several
sessions of one account (terminals logged in to the same server and login) share its
positions and work its approvals in parallel. Approvals name their account in
``decision.account`` (docs/OPERATIONS.md, "Accounts"). One account may stay unnamed (count
forms, or no login/server); with several accounts every session must have a name, and two
sessions of the same server and login must not carry different names (nor one name two
different server/login pairs).
"""

from __future__ import annotations

import hashlib
import os
import tomllib
import uuid
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from worker.config import ConfigError, Settings

Backend = Literal["sim", "native", "bridge"]
_PROCESS_TOKEN = uuid.uuid4().hex  # makes in-process sim sessions private to this process
_ACCOUNT = r"^[^\x00-\x1f\x7f]+$"  # schemas.rpm.ACCOUNT_PATTERN: what an approval can name


class SessionSpec(BaseModel):
    """One session's configuration (secrets resolved, never shown in reprs)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    backend: Backend
    address: str | None = None
    login: int | None = None
    server: str | None = None
    path: str | None = None
    password: SecretStr | None = None
    secret: SecretStr | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_crl: str | None = None
    tls_server_name: str | None = None
    sim_config: str | None = None
    # the account's broker profile (``execution-worker probe``): worker/mt5/profile/use.py
    broker_profile: str | None = None
    # the account's name: the sessions file's ``account`` alias, else "<server>:<login>"
    account: str | None = Field(default=None, min_length=1, max_length=128, pattern=_ACCOUNT)

    @model_validator(mode="before")
    @classmethod
    def _account_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("account"):
            server, login = data.get("server"), data.get("login")
            if server and login is not None:
                return {**data, "account": f"{server}:{login}"}
        return data

    @cached_property  # read on every claim, fence and write of a message
    def identity(self) -> str:
        """What makes this session the same terminal/account in every process."""
        if self.backend == "bridge":
            return f"bridge:{(self.address or '').lower()}:{self.login or ''}"
        if self.backend == "native":
            return f"native:{self.server or ''}:{self.login or ''}"
        return f"sim:{_PROCESS_TOKEN}:{self.id}"

    @cached_property
    def lock_key(self) -> int:
        """Signed 32-bit key for ``pg_try_advisory_lock(1, key)``."""
        digest = hashlib.blake2b(self.identity.encode("utf-8"), digest_size=4).digest()
        return int.from_bytes(digest, "big", signed=True)


class _FileSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    backend: Backend
    address: str | None = None
    login: int | None = None
    server: str | None = None
    path: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    secret_env: str | None = None
    secret_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_crl: str | None = None
    tls_server_name: str | None = None
    sim_config: str | None = None
    account: str | None = None
    broker_profile: str | None = None


def _read_file_secret(kind: str, session_id: str, file_name: str) -> str:
    try:
        value = Path(file_name).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"session {session_id}: cannot read {kind} file {file_name}: {exc.strerror}"
        ) from None
    if not value:
        raise ConfigError(f"session {session_id}: {kind} file {file_name} is empty")
    return value


def _resolve_secret(
    kind: str,
    session_id: str,
    env_name: str | None,
    file_name: str | None,
    environ: Mapping[str, str],
) -> SecretStr | None:
    if env_name and file_name:
        raise ConfigError(f"session {session_id}: give {kind}_env or {kind}_file, not both")
    if file_name:
        return SecretStr(_read_file_secret(kind, session_id, file_name))
    if env_name:
        value = environ.get(env_name)
        if not value:
            raise ConfigError(f"session {session_id}: environment variable {env_name} is unset")
        return SecretStr(value)
    return None


def _env_secret(environ: Mapping[str, str], name: str) -> SecretStr | None:
    file_name = environ.get(f"{name}_FILE")
    if file_name:
        return SecretStr(_read_file_secret(name.lower(), "native-0", file_name))
    value = environ.get(name)
    return SecretStr(value) if value else None


def _from_count(count: int, settings: Settings, environ: Mapping[str, str]) -> list[SessionSpec]:
    profile = environ.get("BROKER_PROFILE") or None
    return [
        spec.model_copy(update={"broker_profile": profile})
        for spec in _count_specs(count, settings, environ)
    ]


def _count_specs(count: int, settings: Settings, environ: Mapping[str, str]) -> list[SessionSpec]:
    if count < 1:
        raise ConfigError("MT5_SESSIONS must be at least 1")
    if settings.mt5_backend == "sim":
        return [
            SessionSpec(id=f"sim-{i}", backend="sim", sim_config=settings.sim_config)
            for i in range(count)
        ]
    if settings.mt5_backend == "native":
        if count != 1:
            raise ConfigError(
                "MT5_BACKEND=native allows one session per process (MT5_SESSIONS=1); "
                "use bridges for more"
            )
        login = environ.get("MT5_LOGIN")
        try:
            login_number = int(login) if login else None
        except ValueError:
            raise ConfigError("MT5_LOGIN must be an integer account number") from None
        return [
            SessionSpec(
                id="native-0",
                backend="native",
                path=environ.get("MT5_PATH") or None,
                login=login_number,
                server=environ.get("MT5_SERVER") or None,
                password=_env_secret(environ, "MT5_PASSWORD"),
            )
        ]
    if not settings.mt5_bridge_address:
        raise ConfigError("MT5_BACKEND=bridge needs MT5_BRIDGE_ADDRESS (host:port)")
    if settings.mt5_bridge_secret is None:
        raise ConfigError("MT5_BACKEND=bridge needs MT5_BRIDGE_SECRET")
    addresses = _bridge_addresses(settings.mt5_bridge_address, count)
    tls = _check_tls("MT5_BRIDGE_TLS", _env_tls(environ))
    return [
        SessionSpec(
            id=f"bridge-{i}",
            backend="bridge",
            address=address,
            secret=settings.mt5_bridge_secret,
            **tls,
        )
        for i, address in enumerate(addresses)
    ]


def _env_tls(environ: Mapping[str, str]) -> dict[str, str | None]:
    return {
        f"tls_{part}": environ.get(f"MT5_BRIDGE_TLS_{part.upper()}") or None
        for part in ("ca", "cert", "key", "crl")
    }


def _check_tls(where: str, tls: dict[str, str | None]) -> dict[str, str | None]:
    """Consistent TLS settings of a bridge session (files are read at connection time)."""
    if (tls.get("tls_cert") is None) != (tls.get("tls_key") is None):
        raise ConfigError(f"{where}: a client certificate needs its key (cert and key together)")
    if tls.get("tls_ca") is None and any(
        tls.get(name) for name in ("tls_cert", "tls_crl", "tls_server_name")
    ):
        raise ConfigError(
            f"{where}: TLS settings need the CA that signed the bridge's certificate (tls_ca)"
        )
    return tls


def _bridge_addresses(value: str, count: int) -> list[str]:
    from worker.mt5.bridge.client import parse_address

    listed = [part.strip() for part in value.split(",") if part.strip()]
    try:
        parsed = [parse_address(address) for address in listed]
    except ValueError as exc:
        raise ConfigError(f"MT5_BRIDGE_ADDRESS: {exc}") from None
    if len(parsed) == 1 and count > 1:
        host, port = parsed[0]
        if port + count - 1 > 65535:
            raise ConfigError("MT5_BRIDGE_ADDRESS: consecutive ports run past 65535")
        parsed = [(host, port + i) for i in range(count)]
    if len(parsed) != count:
        raise ConfigError(
            f"MT5_SESSIONS={count} but MT5_BRIDGE_ADDRESS lists {len(parsed)} addresses"
        )
    return [f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in parsed]


def _from_file(path: str, settings: Settings, environ: Mapping[str, str]) -> list[SessionSpec]:
    try:
        with Path(path).open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"MT5_SESSIONS: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"MT5_SESSIONS: {path} is not valid TOML: {exc}") from None
    tables = data.get("sessions")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"MT5_SESSIONS: {path} has no [[sessions]] tables")
    specs = [_spec_from_table(table, i, settings, environ) for i, table in enumerate(tables)]
    return specs


def _spec_from_table(
    table: Any, index: int, settings: Settings, environ: Mapping[str, str]
) -> SessionSpec:
    if not isinstance(table, dict):
        raise ConfigError(f"MT5_SESSIONS: session #{index + 1} is not a table")
    if "password" in table or "secret" in table:
        raise ConfigError(
            f"MT5_SESSIONS: session #{index + 1}: secrets do not belong in the sessions file; "
            "use password_env/password_file or secret_env/secret_file"
        )
    try:
        entry = _FileSession.model_validate(table)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "session"
        raise ConfigError(f"MT5_SESSIONS: session #{index + 1}: {field}: {first['msg']}") from None
    password = _resolve_secret(
        "password", entry.id, entry.password_env, entry.password_file, environ
    )
    secret = _resolve_secret("secret", entry.id, entry.secret_env, entry.secret_file, environ)
    if entry.backend == "bridge":
        if not entry.address:
            raise ConfigError(f"session {entry.id}: a bridge session needs an address")
        secret = secret or settings.mt5_bridge_secret
        if secret is None:
            raise ConfigError(
                f"session {entry.id}: no bridge secret (secret_env, secret_file or "
                "MT5_BRIDGE_SECRET)"
            )
        _check_tls(f"session {entry.id}", _file_tls(entry, environ))
        entry = entry.model_copy(update=_file_tls(entry, environ))
    values = entry.model_dump(
        exclude={"password_env", "password_file", "secret_env", "secret_file"}
    )
    try:
        return SessionSpec(**values, password=password, secret=secret)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"MT5_SESSIONS: session {entry.id!r}: {first['msg']}") from None


def _file_tls(entry: _FileSession, environ: Mapping[str, str]) -> dict[str, str | None]:
    """A session's TLS files; a client certificate and CRL not named in the file come from
    ``MT5_BRIDGE_TLS_CERT`` / ``_KEY`` / ``_CRL`` (one certificate per deployment) when the
    session uses TLS."""
    tls: dict[str, str | None] = {
        "tls_ca": entry.tls_ca,
        "tls_cert": entry.tls_cert,
        "tls_key": entry.tls_key,
        "tls_crl": entry.tls_crl,
        "tls_server_name": entry.tls_server_name,
    }
    if entry.tls_ca is not None and entry.tls_cert is None and entry.tls_key is None:
        env = _env_tls(environ)
        tls["tls_cert"], tls["tls_key"] = env["tls_cert"], env["tls_key"]
    if entry.tls_ca is not None and entry.tls_crl is None:
        tls["tls_crl"] = _env_tls(environ)["tls_crl"]
    return tls


def _check(specs: list[SessionSpec]) -> list[SessionSpec]:
    seen: set[str] = set()
    for spec in specs:
        if spec.id in seen:
            raise ConfigError(f"MT5_SESSIONS: duplicate session id {spec.id!r}")
        seen.add(spec.id)
    natives = [spec.id for spec in specs if spec.backend == "native"]
    if len(natives) > 1:
        raise ConfigError(
            "MT5_SESSIONS: at most one native session per process (the MetaTrader5 module "
            f"holds one terminal); got {', '.join(natives)}; reach the others through bridges"
        )
    identities: dict[str, str] = {}
    for spec in specs:
        other = identities.setdefault(spec.identity, spec.id)
        if other != spec.id:
            raise ConfigError(f"MT5_SESSIONS: sessions {other} and {spec.id} are the same terminal")
    _check_accounts(specs)
    return specs


def _check_accounts(specs: list[SessionSpec]) -> None:
    """One name per account and one account per name; names needed once there are two."""
    by_login: dict[tuple[str, int], SessionSpec] = {}
    by_name: dict[str, SessionSpec] = {}
    for spec in specs:
        if spec.server is not None and spec.login is not None:
            other = by_login.setdefault((spec.server, spec.login), spec)
            if other.account != spec.account:
                raise ConfigError(
                    f"MT5_SESSIONS: sessions {other.id} and {spec.id} are logged in to the same "
                    f"account ({spec.server}:{spec.login}) under two names"
                )
        if spec.account is None:
            continue
        named = by_name.setdefault(spec.account, spec)
        if (named.server, named.login) != (spec.server, spec.login) and None not in (
            named.server,
            named.login,
            spec.server,
            spec.login,
        ):
            raise ConfigError(
                f"MT5_SESSIONS: sessions {named.id} and {spec.id} name account "
                f"{spec.account!r} but log in to different accounts"
            )
    names = {spec.account for spec in specs}
    if len(names) > 1 and None in names:
        unnamed = ", ".join(spec.id for spec in specs if spec.account is None)
        raise ConfigError(
            f"MT5_SESSIONS: with several accounts every session needs one (login and server, "
            f"or account); {unnamed} has none"
        )


def broker_profiles(
    specs: Sequence[SessionSpec], environ: Mapping[str, str] | None = None
) -> dict[str | None, str]:
    """The broker profile of each account: its sessions' ``broker_profile`` (all the same
    where given), else ``BROKER_PROFILE`` when the worker has one account."""
    env = os.environ if environ is None else environ
    found: dict[str | None, str] = {}
    for spec in specs:
        if spec.broker_profile is None:
            continue
        other = found.setdefault(spec.account, spec.broker_profile)
        if other != spec.broker_profile:
            raise ConfigError(
                f"MT5_SESSIONS: account {spec.account!r} names two broker profiles "
                f"({other}, {spec.broker_profile})"
            )
    accounts = accounts_of(specs)
    default = env.get("BROKER_PROFILE") or None
    if default is not None and not found:
        if len(accounts) > 1:
            raise ConfigError(
                "BROKER_PROFILE names one profile but several accounts are configured: give "
                "each account's sessions a broker_profile in the sessions file"
            )
        found[accounts[0]] = default
    return found


def accounts_of(specs: Sequence[SessionSpec]) -> tuple[str | None, ...]:
    """The accounts of these sessions, in order of first appearance (None: one unnamed)."""
    return tuple(dict.fromkeys(spec.account for spec in specs))


def load_session_specs(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> list[SessionSpec]:
    """The sessions of this process, from ``settings.mt5_sessions``. Raises ConfigError."""
    env = os.environ if environ is None else environ
    value = settings.mt5_sessions.strip()
    if value.isdigit():
        return _check(_from_count(int(value), settings, env))
    if not Path(value).is_file():
        raise ConfigError("MT5_SESSIONS must be a count or the path of a sessions TOML file")
    return _check(_from_file(value, settings, env))
