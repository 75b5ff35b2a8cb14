"""Fetch the real ``MetaTrader5`` Windows wheel from the package index, cached, and unpack it.

Only the wheel's pure-Python ``MetaTrader5/__init__.py`` is used (constants, ``Buy``/``Sell``/
``Close`` helpers, ``from ._core import *``); the compiled ``_core`` is never loaded.

Cache: ``$MT5_WHEEL_CACHE``, else ``$XDG_CACHE_HOME/execution-worker/metatrader5``, else
``~/.cache/execution-worker/metatrader5`` (outside the repository). A cached wheel is used as
it is, without asking the index again; delete the folder to fetch the newest one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "MetaTrader5"
INIT_MEMBER = "MetaTrader5/__init__.py"
_CORE_MEMBER = r"MetaTrader5/_core\.[^/]*\.pyd"

# What pip logs when it cannot reach an index at all (urllib3 retry warnings, resolver and
# socket errors). A failure without any of these means an index answered: the package, the
# wheel or pip itself is the problem, and that must not be hidden behind a skip.
_NO_ANSWER = re.compile(
    r"NewConnectionError|ConnectTimeoutError|ReadTimeoutError|ProxyError|SSLError"
    r"|Failed to establish a new connection|Temporary failure in name resolution"
    r"|Name or service not known|No address associated with hostname|Network is unreachable"
    r"|Connection refused|connection error",
    re.IGNORECASE,
)


class IndexUnreachable(Exception):
    """No package index answered (no network, no proxy, DNS failure): the only skip reason."""


class WheelError(Exception):
    """An index answered but the wheel could not be had or unpacked: a real failure."""


def cache_dir() -> Path:
    explicit = os.environ.get("MT5_WHEEL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "execution-worker" / "metatrader5"


def _cached_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob("metatrader5-*-win_amd64.whl"))
    return wheels[-1] if wheels else None


def download(
    folder: Path, *, index_url: str | None = None, isolated: bool = False, timeout: int = 15
) -> Path:
    """``pip download --platform win_amd64 --only-binary=:all: --no-deps MetaTrader5``.

    ``isolated``: without the machine's pip configuration (its extra indexes, find-links).
    """
    env = dict(os.environ)
    if isolated:
        env = {key: value for key, value in env.items() if not key.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as staging:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--platform",
            "win_amd64",
            "--only-binary=:all:",
            "--no-deps",
            # one retry, so that an unreachable index leaves its urllib3 warning in the log
            "--retries",
            "1",
            "--timeout",
            str(timeout),
            "--dest",
            staging,
        ]
        if index_url is not None:
            command += ["--index-url", index_url]
        command.append(PACKAGE)
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        log = (done.stdout + done.stderr).strip()
        wheels = sorted(Path(staging).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = "\n".join(log.splitlines()[-6:])
            if _NO_ANSWER.search(log):
                raise IndexUnreachable(f"no package index answered for {PACKAGE}:\n{tail}")
            raise WheelError(f"pip download {PACKAGE} failed (rc {done.returncode}):\n{tail}")
        target = folder / wheels[0].name.lower()
        os.replace(wheels[0], target)  # atomic: concurrent test runs share the cache
        return target


def unpack_init(wheel: Path) -> Path:
    """The wheel's ``MetaTrader5/__init__.py``, extracted once beside the wheel."""
    target = wheel.with_suffix("") / INIT_MEMBER
    if target.is_file():
        return target
    try:
        with zipfile.ZipFile(wheel) as archive:
            source = archive.read(INIT_MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise WheelError(f"{wheel.name}: no readable {INIT_MEMBER}: {exc}") from exc
    if b"from ._core import *" not in source:
        raise WheelError(f"{wheel.name}: {INIT_MEMBER} no longer imports from ._core")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{os.getpid()}.partial")
    partial.write_bytes(source)
    os.replace(partial, target)
    return target


def real_wheel(folder: Path | None = None) -> Path:
    """The cached wheel, downloaded first if need be; raises IndexUnreachable or WheelError."""
    folder = folder or cache_dir()
    wheel = _cached_wheel(folder) if folder.is_dir() else None
    return wheel or download(folder)


def binding_strings(wheel: Path) -> list[str]:
    """The printable strings (4+ characters) of the compiled ``_core``, in file order: its
    function signatures, error messages and result field names, to check the double by."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            [member] = [n for n in archive.namelist() if re.fullmatch(_CORE_MEMBER, n)]
            binary = archive.read(member)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise WheelError(f"{wheel.name}: no readable compiled _core: {exc}") from exc
    return [run.decode("ascii") for run in re.findall(rb"[\x20-\x7e]{4,}", binary)]
