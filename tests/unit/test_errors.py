"""One exception base for the worker and one table of exit codes (issue 16)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import worker
from worker.errors import FATAL, ExitCode, WorkerError

# The simulator's imitation of the MetaTrader5 binding's own failure: raised and caught
# inside the simulator, standing for an error that is not the worker's.
NOT_THE_WORKERS = {"worker.mt5.sim.binding.CallFailed"}


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for module_info in pkgutil.walk_packages(worker.__path__, "worker."):
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                found[f"{module.__name__}.{name}"] = value
    return found


def test_every_exception_the_worker_defines_derives_from_worker_error() -> None:
    classes = _exception_classes()
    assert len(classes) >= 20  # the walk really found the worker's exceptions
    outside = {
        name
        for name, kind in classes.items()
        if not issubclass(kind, WorkerError) and name not in NOT_THE_WORKERS
    }
    assert not outside


def test_exit_codes_are_one_table_with_distinct_values() -> None:
    values = [code.value for code in ExitCode]
    assert len(values) == len(set(values))
    assert set(ExitCode) >= FATAL
    assert ExitCode.OK == 0 and ExitCode.CONFIG == 2 and ExitCode.ACCESS_REFUSED == 77
