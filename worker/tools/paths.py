"""Output paths checked before any work: one line naming the mistake (a ConfigError)."""

from __future__ import annotations

import os
from pathlib import Path

from worker.config import ConfigError


def check_output_path(path: str, option: str) -> Path:
    """``path`` can be written: its directory exists, is a directory and is writable."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ConfigError(f"{option} {path}: is a directory; name a file in it")
    if not parent.exists():
        raise ConfigError(f"{option} {path}: directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{option} {path}: directory {parent} is not writable")
    return target


def check_plot_path(path: str) -> Path:
    """A writable ``.png`` path (the only format the report draws)."""
    if Path(path).suffix.lower() != ".png":
        raise ConfigError(f"--plot {path}: the plot is a PNG; name a .png file")
    return check_output_path(path, "--plot")


def check_directory(path: str, option: str) -> Path:
    """A writable directory (``retention --archive``), created if it is missing."""
    target = Path(path)
    if not target.exists():
        try:
            target.mkdir(parents=True)
        except OSError as exc:
            raise ConfigError(f"{option} {path}: cannot create it: {exc.strerror}") from None
    if not target.is_dir():
        raise ConfigError(f"{option} {path}: is not a directory")
    if not os.access(target, os.W_OK):
        raise ConfigError(f"{option} {path}: is not writable")
    return target
