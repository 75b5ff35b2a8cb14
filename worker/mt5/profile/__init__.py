"""Broker profiles: what ``execution-worker probe`` measured on one account's trade server.

:mod:`.model` is the typed schema (units in the field names), :mod:`.toml` reads and writes
it, :mod:`.use` is what the worker takes from it (server clock rule, symbol mapping,
filling modes) and the contradictions with its settings that stop it from starting. The
simulator replays a profile with :mod:`worker.mt5.sim.replay`.
"""

from worker.mt5.profile.model import (
    AccountProfile,
    BehaviourProfile,
    BrokerProfile,
    ClockProfile,
    ProbeRun,
    SymbolProfile,
)
from worker.mt5.profile.toml import dumps_profile, load_profile, loads_profile

__all__ = [
    "AccountProfile",
    "BehaviourProfile",
    "BrokerProfile",
    "ClockProfile",
    "ProbeRun",
    "SymbolProfile",
    "dumps_profile",
    "load_profile",
    "loads_profile",
]
