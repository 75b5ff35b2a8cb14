"""Where the worker's settings come from, with pydantic-settings (worker/config.py).

In order of precedence: ``NAME_FILE`` (a file holding the value: Docker and Kubernetes
secrets), the environment variable ``NAME`` (the field's name in upper case; empty means
unset), the TOML file named by ``WORKER_CONFIG``, the field's default. The per-symbol tables
(``pip_sizes``, ``spread_limits_pips``, ``slippage_limits_pips``, ``symbol_map``) come from
the TOML file only. The environment is a mapping given to :func:`read_settings`
(``os.environ`` by default), so that a test or a tool can pass its own.
"""

from __future__ import annotations

import contextvars
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from worker.config import ConfigError, Settings

CONFIG_FILE_ENV = "WORKER_CONFIG"
FILE_ONLY = frozenset({"pip_sizes", "spread_limits_pips", "slippage_limits_pips", "symbol_map"})
_ENVIRON: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("environ")


class EnvironmentSource(EnvSettingsSource):
    """``NAME`` from the given environment (case-insensitive; empty = unset)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls, case_sensitive=False, env_ignore_empty=True)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            name.lower(): value
            for name, value in self._environ.items()
            if value != "" and name.lower() not in FILE_ONLY
        }


class FileVariablesSource(EnvSettingsSource):
    """``NAME_FILE``: the value is the file's content (stripped); it wins over ``NAME``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls, case_sensitive=False, env_ignore_empty=True)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        found: dict[str, str | None] = {}
        for field in Settings.model_fields:
            variable = f"{field.upper()}_FILE"
            path = self._environ.get(variable)
            if not path or field in FILE_ONLY:
                continue
            try:
                found[field] = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None
        return found


class _FromSources(BaseSettings, Settings):
    """Settings read from the sources above (then copied into a plain :class:`Settings`)."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", case_sensitive=False)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        del env_settings, dotenv_settings, file_secret_settings
        environ = _ENVIRON.get(os.environ)
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            FileVariablesSource(settings_cls, environ),
            EnvironmentSource(settings_cls, environ),
        ]
        config = environ.get(CONFIG_FILE_ENV)
        if config:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_readable(config)))
        return tuple(sources)


def _readable(path: str) -> Path:
    file = Path(path)
    try:
        with file.open("rb") as handle:
            tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{CONFIG_FILE_ENV}: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{CONFIG_FILE_ENV}: {path} is not valid TOML: {exc}") from None
    return file


def read_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The sources' settings as a plain :class:`Settings`; validation errors propagate."""
    token = _ENVIRON.set(os.environ if environ is None else environ)
    try:
        loaded = _FromSources()
    finally:
        _ENVIRON.reset(token)
    values: dict[str, Any] = {name: getattr(loaded, name) for name in Settings.model_fields}
    return Settings.model_validate(values)
