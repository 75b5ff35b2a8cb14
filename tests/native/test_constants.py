"""``worker.mt5.api`` constants against the real package's values."""

from __future__ import annotations

from tests.native.package import metatrader5
from worker.mt5 import api

SHARED_AT_LEAST = 86  # constants both define (MetaTrader5 5.0.6231); never fewer


def _ours() -> dict[str, int]:
    return {
        name: value
        for name, value in vars(api).items()
        if name.isupper() and isinstance(value, int) and not isinstance(value, bool)
    }


def test_every_shared_constant_has_the_real_value() -> None:
    real = metatrader5()
    shared = {name: value for name, value in _ours().items() if hasattr(real, name)}
    wrong = {
        name: (value, getattr(real, name))
        for name, value in shared.items()
        if getattr(real, name) != value
    }
    assert not wrong, f"api.py disagrees with MetaTrader5 {real.__version__}: {wrong}"
    assert len(shared) >= SHARED_AT_LEAST, sorted(set(_ours()) - set(shared))


# Names api.py may define although the package does not: the filling-mode bitmask has no
# names in the module (DOMAIN.md section 2), and 10046 (hedging prohibited) is a server
# retcode the package 5.0.6231 does not name. Anything else is probably misspelt, and a
# misspelt name escapes the value check above.
NOT_IN_PACKAGE = frozenset({"TRADE_RETCODE_HEDGE_PROHIBITED"})


def test_names_the_real_package_lacks_are_known() -> None:
    real = metatrader5()
    missing = {
        name
        for name in _ours()
        if not hasattr(real, name) and not name.startswith("SYMBOL_FILLING_")
    }
    assert missing <= NOT_IN_PACKAGE, f"not in MetaTrader5 {real.__version__}: {missing}"
