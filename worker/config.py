"""Settings from the environment (and an optional TOML file), validated; secrets never printed.

Environment names of the external contract (docs/CONTRACT.md): RABBITMQ_URL, DATABASE_URL,
MT5_BACKEND, MT5_SESSIONS, MT5_BRIDGE_ADDRESS, MT5_BRIDGE_SECRET, METRICS_PORT, LOG_FORMAT.
Every other setting has an environment name equal to its field name in upper case
(``APPROVAL_TTL_SECONDS``...), ``NAME_FILE`` for a value kept in a file, and may also come
from the TOML file named by ``WORKER_CONFIG`` (the environment wins). Per-symbol tables (pip
sizes, spread limits, broker symbol names) live in that file. Reading them is
pydantic-settings' job (worker/settings_sources.py); this module only declares and checks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.identity import MAX_DEPLOYMENT_MAGIC
from worker.errors import WorkerError

DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
MASK = "***"
# Metals, indices and crypto have no digits rule for pips (DOMAIN.md 2): configured here.
# query parameters that carry secrets (sslpassword=..., ssl_options={'password': ...})
_SECRET_QUERY = re.compile(
    r"((?:pass\w*|secret\w*)['\"]?\s*(?:=|%3D|:|%3A)\s*['\"]?)[^&'\",}]*", re.I
)
# SERVER_TIMEZONE: a standard offset from UTC and an optional DST rule (worker/mt5/gateway/clock.py)
SERVER_TIMEZONE_PATTERN = r"(?:UTC|GMT)(?:([+-])(\d{1,2})(?::(00|15|30|45))?)?(?:/(US|EU)-DST)?"
DEFAULT_PIP_SIZES = {"XAUUSD": 0.1, "XAGUSD": 0.01, "US500": 1.0, "BTCUSD": 1.0}


# a comma that starts the next URL of a list (a RabbitMQ cluster's nodes)
_NEXT_URL = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs, errors and --help); a list
    of URLs (a RabbitMQ cluster) or a libpq multi-host URL part by part."""
    several = _NEXT_URL.split(url)
    if len(several) > 1:
        return ",".join(mask_url(part) for part in several)
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if parts.query:
        parts = parts._replace(query=_SECRET_QUERY.sub(rf"\1{MASK}", parts.query))
    if parts.password is None:
        return urlunsplit(parts)
    host = parts.netloc.rpartition("@")[2]  # libpq multi-host: every host:port as written
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


class ConfigError(WorkerError):
    """A setting is invalid; the message is one line, safe to print."""


# A handler's longest path after its claim: order_send and its retries, the database
# commits and the confirmation's publish; generous, since the drain only ends early.
HANDLER_MARGIN_SECONDS = 30.0


def drain_default_seconds(order_timeout: float, claim_timeout: float, grace: float) -> float:
    """The default SIGTERM drain: the longest a handler holds a delivery (claim a session,
    watch a placed order for ``order_timeout``, the reconcile grace, then commit and publish).
    Defaults: 5 + 60 + 5 + 30 = 100 s; the orchestrators' grace periods must be longer."""
    return claim_timeout + order_timeout + grace + HANDLER_MARGIN_SECONDS


class Settings(BaseModel):
    """All worker settings. Secrets are ``SecretStr``; ``public()`` is what may be shown."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rabbitmq_url: SecretStr = SecretStr(DEFAULT_RABBITMQ_URL)
    database_url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    mt5_backend: Literal["sim", "native", "bridge"] = "sim"
    mt5_sessions: str = Field(
        default="1", description="a count of simulated sessions, or a sessions file (TOML)"
    )
    sim_config: str | None = Field(
        default=None, description="simulator TOML file for MT5_SESSIONS=N in-process sims"
    )
    mt5_bridge_address: str | None = None
    mt5_bridge_secret: SecretStr | None = None
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # validation (pipeline stage 1)
    approval_ttl_seconds: float = Field(default=30.0, gt=0)
    max_tick_age_seconds: float = Field(default=10.0, gt=0)
    max_spread_pips: float = Field(default=3.0, gt=0)
    max_slippage_pips: float = Field(default=2.0, gt=0)
    slippage_policy: Literal["flag", "close"] = "flag"
    margin_cushion: float = Field(default=1.5, ge=1.0)
    fill_ratio_filled: float = Field(default=0.99, gt=0, le=1)
    fill_ratio_partial: float = Field(default=0.90, gt=0, le=1)
    volume_over_max: Literal["split", "reject"] = "split"
    hedging_close_opposite: bool = True

    # broker
    magic: int = Field(
        default=26112501,
        ge=1,
        # the largest deployment part is the probe's (worker/tools/probe/magic.py): a worker
        # using it would take the probe's orders for its own, and the probe the worker's
        lt=MAX_DEPLOYMENT_MAGIC,
        description="the deployment part of every order's magic (schemas/identity.py)",
    )
    order_timeout_seconds: float = Field(default=60.0, gt=0)
    max_send_attempts: int = Field(default=3, ge=1, le=10)
    reconcile_grace_seconds: float = Field(default=5.0, ge=0)
    unknown_reconcile_hours: float = Field(
        default=24.0,
        gt=0,
        description="how long an unknown outcome (provisional confirmation) is reconciled"
        " in the background before it is final",
    )
    unknown_reconcile_first_seconds: float = Field(
        default=15.0, gt=0, description="first backoff of the background reconcile (doubles)"
    )
    unknown_reconcile_max_seconds: float = Field(
        default=900.0, gt=0, description="longest backoff of the background reconcile"
    )
    server_utc_offset_seconds: int | None = None
    server_timezone: str | None = Field(
        default=None,
        pattern=f"^{SERVER_TIMEZONE_PATTERN}$",
        description="the trade server's zone, e.g. GMT+2/US-DST (GMT+2, +3 during US DST); "
        "instead of SERVER_UTC_OFFSET_SECONDS; unset: learned from ticks",
    )

    # per-symbol tables (from the TOML file)
    pip_sizes: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_PIP_SIZES),
        description="pip size per broker symbol where the digits rule does not apply",
    )
    spread_limits_pips: dict[str, float] = Field(default_factory=dict)
    slippage_limits_pips: dict[str, float] = Field(default_factory=dict)
    symbol_map: dict[str, str] = Field(default_factory=dict)

    # runtime
    prefetch: int | None = Field(default=None, ge=1)
    # deliveries beyond the handlers': approvals that wait, unacked, on the settler (their
    # orders are out, their fills not shown yet) while the sessions take the next ones
    settling_prefetch: int = Field(default=64, ge=0, le=10_000)
    claim_timeout_seconds: float = Field(default=5.0, gt=0)
    session_linger_seconds: float = Field(
        default=0.5,
        ge=0,
        description="a released session keeps its lock this long for this process's next message",
    )
    delivery_limit: int = Field(
        default=20, ge=1, description="deliveries before dead-lettering (requeues count too)"
    )
    delivery_last_chances: int = Field(
        default=2,
        ge=1,
        description="on this many last deliveries before the limit, an approval that would"
        " be requeued is answered (REJECTED row + confirmation) or dead-lettered with a reason",
    )
    drain_timeout_seconds: float = Field(
        default=0.0,
        ge=0,
        description="SIGTERM drain; default: the longest handler (drain_default_seconds)",
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    parse_timeout_seconds: float = Field(default=1.0, gt=0)
    db_pool_size: int = Field(default=10, ge=1)
    group_commit: bool = Field(
        default=False,
        description="intents and finals in flight together share one transaction (pays where"
        " commits are slow: a remote database, network storage); see worker/store/group.py",
    )

    @field_validator("mt5_sessions")
    @classmethod
    def _at_least_one_session(cls, value: str) -> str:
        if value.strip().lstrip("+-").isdigit() and int(value) < 1:
            raise ValueError("a count of sessions must be at least 1 (or name a sessions file)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_server_clock(self) -> Settings:
        if self.server_utc_offset_seconds is not None and self.server_timezone is not None:
            raise ValueError("set SERVER_UTC_OFFSET_SECONDS or SERVER_TIMEZONE, not both")
        return self

    @model_validator(mode="before")
    @classmethod
    def _drain_outlasts_a_handler(cls, data: Any) -> Any:
        """Unless set, the drain waits as long as one handler can hold a delivery: a shorter
        drain turns a slow order into a recovery case on every rollout."""
        if not isinstance(data, dict) or data.get("drain_timeout_seconds") not in (None, ""):
            return data
        try:
            drain = drain_default_seconds(
                float(data.get("order_timeout_seconds", 60.0)),
                float(data.get("claim_timeout_seconds", 5.0)),
                float(data.get("reconcile_grace_seconds", 5.0)),
            )
        except (TypeError, ValueError):
            return data  # the field's own validation names the bad value
        return {**data, "drain_timeout_seconds": drain}

    def public(self) -> dict[str, Any]:
        """The settings as they may be printed: URLs masked, secrets hidden."""
        shown: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name.endswith("_url") and isinstance(value, SecretStr):
                shown[name] = mask_url(value.get_secret_value())
            elif isinstance(value, SecretStr):
                shown[name] = MASK
            else:
                shown[name] = value
        return shown

    def __repr__(self) -> str:
        return f"Settings({self.public()!r})"

    __str__ = __repr__

    def spread_limit_for(self, symbol: str) -> float:
        return self.spread_limits_pips.get(symbol, self.max_spread_pips)

    def slippage_limit_for(self, symbol: str) -> float:
        return self.slippage_limits_pips.get(symbol, self.max_slippage_pips)

    def broker_symbol_for(self, symbol: str) -> str:
        return self.symbol_map.get(symbol, symbol)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from the environment (``NAME``, ``NAME_FILE``) and the TOML file named
    by ``WORKER_CONFIG``, with pydantic-settings (worker/settings_sources.py). Raises
    ``ConfigError`` (one line; never the offending value: it may be a secret)."""
    from pydantic_settings import SettingsError

    from worker.settings_sources import read_settings

    try:
        return read_settings(environ)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "settings"
        raise ConfigError(f"invalid setting {field.upper()}: {first['msg']}") from None
    except SettingsError as exc:
        cause = exc.__cause__
        field = str(exc).split('"')[1] if '"' in str(exc) else "settings"
        reason = type(cause).__name__ if cause is not None else "cannot be parsed"
        raise ConfigError(f"invalid setting {field.upper()}: {reason}") from None
