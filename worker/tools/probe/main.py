"""``execution-worker probe --account ALIAS [--symbols ...] --out PROFILE.toml``.

The probe opens the first session of the account (``MT5_BACKEND``, ``MT5_SESSIONS``: the
worker's own settings, any backend), measures it (:mod:`.run`), writes the profile and
prints the summary. Exit codes: 0 written; 2 settings, unknown account or a refused real
account; 1 the probe failed (the profile is not written; whatever it opened was closed, or
the message says which position to close by hand).
"""

from __future__ import annotations

import argparse
import sys

from worker.config import ConfigError, load_settings
from worker.errors import ExitCode, WorkerError
from worker.mt5.profile.toml import write_profile
from worker.mt5.sessions import SessionSpec, load_session_specs
from worker.mt5.terminals import SessionOpenError, open_terminal
from worker.tools.probe.run import DEFAULT_CANONICALS, ProbeOptions, probe
from worker.tools.probe.safety import RealAccountRefused
from worker.tools.probe.summary import summary


def _session(specs: list[SessionSpec], alias: str | None) -> SessionSpec:
    if alias is None:
        if len({spec.account for spec in specs}) > 1:
            raise ConfigError("several accounts are configured: name one with --account")
        return specs[0]
    for spec in specs:
        if alias in (spec.account, spec.id):
            return spec
    known = ", ".join(sorted({spec.account or spec.id for spec in specs}))
    raise ConfigError(f"--account {alias}: no such account or session (configured: {known})")


def _canonicals(text: str | None, mapped: dict[str, str]) -> list[str]:
    names = [part.strip() for part in (text or "").split(",") if part.strip()]
    return list(dict.fromkeys(names or [*DEFAULT_CANONICALS, *mapped]))


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    spec = _session(load_session_specs(settings), args.account)
    options = ProbeOptions(
        canonicals=_canonicals(args.symbols, settings.symbol_map),
        round_trips=args.round_trips,
        trade_symbol=args.trade_symbol,
        reads_only=args.reads_only,
        allow_real=args.allow_real,
        confirm=input,
        backend=spec.backend,
        account_alias=spec.account or args.account,
        wait_seconds=args.wait_seconds,
    )
    try:
        terminal = open_terminal(spec)
    except SessionOpenError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    try:
        result = probe(terminal, options)
    except RealAccountRefused as exc:
        print(f"probe: refused: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except WorkerError as exc:
        print(f"probe: failed: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    finally:
        terminal.shutdown()
    write_profile(result.profile, args.out)
    print(f"wrote {args.out}")
    for line in summary(result.profile, result.naming):
        print(line)
    return ExitCode.OK
