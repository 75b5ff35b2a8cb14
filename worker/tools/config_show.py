"""``execution-worker config``: the effective settings, where each comes from, secrets masked."""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.config import Settings, load_settings


def sources(environ: Mapping[str, str]) -> dict[str, str]:
    """Each setting's origin: ``env`` (NAME or NAME_FILE), ``file`` (WORKER_CONFIG), ``default``."""
    in_file: set[str] = set()
    config = environ.get("WORKER_CONFIG")
    if config:
        with Path(config).open("rb") as handle:  # load_settings read it already
            in_file = set(tomllib.load(handle))
    found = {}
    for name in Settings.model_fields:
        upper = name.upper()
        if environ.get(upper) or environ.get(f"{upper}_FILE"):
            found[name] = "env"
        elif name in in_file:
            found[name] = "file"
        else:
            found[name] = "default"
    return found


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    shown = settings.public()
    origin = sources(os.environ)
    if args.json:
        print(json.dumps({"settings": shown, "sources": origin}, indent=2, default=str))
        return 0
    width = max(len(name) for name in shown)
    for name, value in shown.items():
        print(f"{name.upper():<{width}}  {_shown(value)}  ({origin[name]})")
    return 0
