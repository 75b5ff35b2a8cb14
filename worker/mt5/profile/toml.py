"""A broker profile as TOML: read with ``tomllib``, written by a small writer of our own.

The writer knows the profile's shapes only (scalars, lists of strings, string maps, tables of
tables) and writes each field's description as a comment above it, so the file documents
itself. Absent (None) fields are left out.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from worker.errors import WorkerError
from worker.mt5.profile.model import BrokerProfile

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
HEADER = (
    "# Broker profile written by `execution-worker probe` (worker/mt5/profile/model.py).\n"
    "# Replay it with `execution-worker sim-terminal --profile PATH` (or SIM_CONFIG=PATH);\n"
    "# the worker reads it per account (BROKER_PROFILE, or broker_profile in MT5_SESSIONS).\n"
)


class ProfileError(WorkerError, ValueError):
    """A profile file that cannot be read or does not fit the schema (one line; a
    ValueError too, as the simulator's configuration errors are)."""


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ProfileError("a profile holds finite numbers only")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string with ASCII escapes is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise ProfileError(f"cannot write {type(value).__name__} to a profile")


def _scalars(model: BaseModel) -> list[str]:
    lines: list[str] = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if value is None or isinstance(value, BaseModel | dict):
            continue
        if info.description:
            lines.append(f"# {info.description}")
        lines.append(f"{_key(name)} = {_value(value)}")
    return lines


def dumps_profile(profile: BrokerProfile) -> str:
    out = [HEADER.rstrip("\n"), *_scalars(profile)]
    for name in ("probe", "account", "clock", "behaviour"):
        section = getattr(profile, name)
        if section is not None:
            out += ["", f"[{name}]", *_scalars(section)]
    out += ["", "[symbol_map]"]
    out += [f"{_key(k)} = {_value(v)}" for k, v in sorted(profile.symbol_map.items())]
    for symbol, spec in sorted(profile.symbols.items()):
        out += ["", f"[symbols.{_key(symbol)}]", *_scalars(spec)]
    return "\n".join(out) + "\n"


def loads_profile(text: str) -> BrokerProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"not valid TOML: {exc}") from None
    return profile_from_mapping(data)


def profile_from_mapping(data: dict[str, Any]) -> BrokerProfile:
    try:
        return BrokerProfile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "profile"
        raise ProfileError(f"{where}: {first['msg']}") from None


def load_profile(path: str | Path) -> BrokerProfile:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return loads_profile(text)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from None


def is_profile(data: dict[str, Any]) -> bool:
    """Whether a parsed TOML document is a broker profile (it has the probe's tables)."""
    return isinstance(data.get("probe"), dict) and isinstance(data.get("account"), dict)


def write_profile(profile: BrokerProfile, path: str | Path) -> None:
    """Write atomically (a temporary file renamed over the target)."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(dumps_profile(profile), encoding="utf-8")
    temporary.replace(target)
