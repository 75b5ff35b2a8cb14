"""The real ``MetaTrader5`` package over the ``_core`` double, importable as ``MetaTrader5``.

:func:`metatrader5` (for tests) returns the module, importing the wheel's real
``__init__.py`` once per process with :mod:`tests.native.core_double` registered as
``MetaTrader5._core``; after that ``import MetaTrader5`` (and so ``NativeTerminal()``) finds
it. :func:`over` binds a terminal (a :class:`SimTerminal`) behind the module.

Skip rule: the tests that need the wheel are skipped only when no package index answered
(pip's log shows connection, DNS, proxy or TLS failures). Under ``CI=true`` that is a
failure too, because CI runs where the index is reachable and a silent skip would drop the
native backend from CI unnoticed. Any other trouble (the index answered but pip failed, the
wheel lacks ``MetaTrader5/__init__.py``, the import fails) is always a failure.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import in_ci
from tests.native import core_double
from tests.native.wheel import IndexUnreachable, real_wheel, unpack_init
from worker.mt5 import api

NAME = "MetaTrader5"
_module: ModuleType | None = None
_wheel: Path | None = None
_failure: str | None = None
_skip: str | None = None  # remembered: pip is asked once per test session


def load(init: Path) -> ModuleType:
    """Execute the real ``__init__.py`` as package ``MetaTrader5`` over the double."""
    loaded = sys.modules.get(NAME)
    if loaded is not None:
        if getattr(loaded, "__file__", None) != str(init):
            raise RuntimeError(f"another {NAME} module is already imported: {loaded!r}")
        return loaded
    # no search locations: the wheel's compiled _core is never looked for
    spec = importlib.util.spec_from_file_location(NAME, init, submodule_search_locations=[])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"{NAME}._core"] = core_double
    sys.modules[NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[NAME], sys.modules[f"{NAME}._core"]
        raise
    return module


def metatrader5() -> ModuleType:
    """The real package over the double, or skip/fail by the rule above."""
    global _failure, _module, _skip, _wheel
    if _module is not None:
        return _module
    if _failure is not None:
        pytest.fail(_failure, pytrace=False)
    if _skip is not None:
        pytest.skip(_skip)
    try:
        _wheel = real_wheel()
        _module = load(unpack_init(_wheel))
        return _module
    except IndexUnreachable as exc:
        message = f"real {NAME} wheel unavailable: {exc}"
        if in_ci():
            _failure = f"{message}\n(CI=true: the native backend must run in CI)"
            pytest.fail(_failure, pytrace=False)
        _skip = message
        pytest.skip(message)
    except Exception as exc:  # WheelError, a broken cache, an __init__.py that fails
        _failure = f"real {NAME} wheel could not be used: {exc}"
        pytest.fail(_failure, pytrace=False)


def wheel() -> Path:
    """The wheel behind :func:`metatrader5` (skips or fails by the same rule)."""
    metatrader5()
    assert _wheel is not None
    return _wheel


def over(terminal: api.Terminal | None) -> ModuleType:
    """The module with ``terminal`` behind it (None: as if no terminal were running)."""
    module = metatrader5()
    core_double.bind(terminal)
    return module
