"""The ``execution-worker`` command.

Each subcommand's arguments are declared here; its implementation lives in the module that
owns the work and is imported only when the subcommand runs, so ``--help`` stays fast and
works on every platform.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.config import ConfigError
from worker.errors import ExitCode

Configure = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    handler: str  # "module:function" taking the parsed args, returning an exit code
    configure: Configure


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def _run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--processes", type=int, default=1, help="worker processes to supervise (default 1)"
    )


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=12, help="approvals to publish")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for all")


def _publish_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", help="a JSON file: one message, or a list of messages")
    source.add_argument("--stdin", action="store_true", help="read JSON lines from stdin")
    source.add_argument("--samples", type=int, help="generate N sample approvals")
    parser.add_argument("--symbols", default="EURUSD,GBPUSD,USDJPY,XAUUSD")
    parser.add_argument("--reply-to", help="reply_to queue for the confirmations")
    parser.add_argument("--seed", type=int, default=7)


def _reconcile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON lines")


def _sim_terminal_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18812)
    parser.add_argument("--state", required=True, help="file holding the broker state")
    parser.add_argument("--dump", action="store_true", help="print every deal as JSON lines")
    parser.add_argument("--config", help="TOML file of simulator settings and fault knobs")
    parser.add_argument("--profile", help="replay a broker profile written by `probe`")
    _bridge_security_args(parser)


def _bridge_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18812)
    parser.add_argument("--terminal-path", help="path of terminal64.exe (or MT5_PATH)")
    parser.add_argument("--login", help="account number (or MT5_LOGIN)")
    parser.add_argument("--server", help="trade server name (or MT5_SERVER)")
    _bridge_security_args(parser)


def _bridge_security_args(parser: argparse.ArgumentParser) -> None:
    """TLS and metrics of a bridge (docs/TLS.md); off loopback mutual TLS is required."""
    parser.add_argument("--tls-cert", help="the bridge's certificate (PEM)")
    parser.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    parser.add_argument(
        "--tls-client-ca", help="require client certificates signed by this CA (mutual TLS 1.3)"
    )
    parser.add_argument(
        "--tls-allow",
        action="append",
        metavar="NAME",
        help="a client certificate name to accept: CN=..., DNS:..., URI:... (repeatable)",
    )
    parser.add_argument("--tls-crl", help="refuse client certificates revoked in this CRL (PEM)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    parser.add_argument("--metrics-host", help="address of --metrics-port (default: --host)")


def _schema_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", help="output directory (default: schemas/json)")


def _bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_path", help="write the results as JSON here")
    parser.add_argument("--plot", help="write a PNG plot here")
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke test)")
    parser.add_argument(
        "--vhost-url", help="an empty vhost of the bench's own (when rabbitmqctl is unavailable)"
    )


def _retention_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--older-than",
        metavar="AGE",
        help="retire monthly partitions that end before now minus AGE (e.g. 90d, 13w)",
    )
    parser.add_argument("--archive", metavar="DIR", help="COPY each one to DIR/<name>.csv.gz")
    parser.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    parser.add_argument(
        "--months-ahead", type=int, default=3, help="create partitions this many months ahead"
    )


def _trail_args(parser: argparse.ArgumentParser) -> None:
    from worker.tools.report_time import time_argument

    parser.add_argument("key", nargs="?", help="the RPM order id, idempotency key or execution id")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--since", type=time_argument, help="instead of KEY: executions received since T"
    )
    parser.add_argument("--until", type=time_argument, help="... and before T (default now)")
    parser.add_argument("--status", help="with --since: only this state (e.g. REJECTED)")
    parser.add_argument("--symbol", help="with --since: only this symbol")
    parser.add_argument(
        "--account", help="with --since: only this account (its name, or its login number)"
    )
    parser.add_argument("--limit", type=int, default=200, help="with --since: at most N rows")


def _report_args(parser: argparse.ArgumentParser) -> None:
    from worker.tools.report_time import time_argument

    parser.add_argument(
        "--since",
        type=time_argument,
        required=True,
        help="executions received since T: ISO 8601 (UTC if no offset) or an age: 24h, 7d",
    )
    parser.add_argument("--until", type=time_argument, help="... and before T (default now)")
    parser.add_argument("--by", choices=("symbol", "session", "account", "hour"))
    parser.add_argument("--json", help="write the whole report as JSON to this file")
    parser.add_argument("--plot", help="write a PNG (needs the plot extra: matplotlib)")
    parser.add_argument(
        "--account-currency",
        default="USD",
        help="the account currency shortfall is converted to (default USD)",
    )


def _dead_letters_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="list the dead letters (nothing is removed)")
    listing.add_argument("--json", action="store_true", help="print JSON lines")
    show = sub.add_parser("show", help="one dead letter: headers, properties, body preview")
    show.add_argument("id", help="an ID from `list` (the message_id, else a hash)")
    replay = sub.add_parser("replay", help="republish to execution.requests (same message_id)")
    target = replay.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", help="an ID from `list`")
    target.add_argument("--all", action="store_true", help="every dead letter (see --reason)")
    replay.add_argument("--reason", help="with --all: only dead letters with this reason")
    purge = sub.add_parser("purge", help="remove one dead letter for good (audited)")
    purge.add_argument("id", help="an ID from `list`")
    for child in (replay, purge):
        child.add_argument("--actor", help="who is acting, for the audit (default: $USER@host)")
    for child in (listing, show, replay, purge):
        child.add_argument(
            "--limit", type=int, default=10_000, help="look at most at N messages (default 10000)"
        )


COMMANDS: tuple[Command, ...] = (
    Command("run", "consume execution.requests and execute", "worker.supervisor:main", _run_args),
    Command(
        "demo",
        "run the whole path against the simulated terminal",
        "worker.tools.demo:main",
        _demo_args,
    ),
    Command(
        "publish",
        "publish RPM approvals to execution.requests",
        "worker.tools.publish:main",
        _publish_args,
    ),
    Command(
        "migrate",
        "apply the database migrations",
        "worker.store.migrate:migrate_main",
        _no_arguments,
    ),
    Command(
        "reconcile",
        "resolve in-flight executions against the terminals",
        "worker.tools.reconcile:main",
        _reconcile_args,
    ),
    Command(
        "sim-terminal",
        "serve a simulated terminal with persistent broker state",
        "worker.mt5.bridge.serve:sim_terminal_main",
        _sim_terminal_args,
    ),
    Command(
        "bridge-serve",
        "serve the native MetaTrader5 terminal over the bridge",
        "worker.mt5.bridge.serve:bridge_serve_main",
        _bridge_serve_args,
    ),
    Command(
        "schema-export",
        "write the JSON Schemas of the wire models",
        "worker.cli:schema_export_main",
        _schema_export_args,
    ),
    Command(
        "bench",
        "measure overhead, throughput, scaling and memory",
        "worker.tools.bench.runner:main",
        _bench_args,
    ),
    Command(
        "trail",
        "show the audit timeline of one execution, or the executions of a time range",
        "worker.tools.trail:main",
        _trail_args,
    ),
    Command(
        "report",
        "execution quality (TCA) of a time range from the audit store",
        "worker.tools.report:main",
        _report_args,
    ),
    Command(
        "dead-letters",
        "list, show, replay or purge execution.requests.dead",
        "worker.tools.dead_letters:main",
        _dead_letters_args,
    ),
    Command(
        "retention",
        "create partitions ahead; detach, archive and drop months older than a cutoff",
        "worker.tools.retention:main",
        _retention_args,
    ),
    Command(
        "probe",
        "measure a broker account (trades only on demo/contest) and write its profile",
        "worker.tools.probe.main:main",
        lambda parser: importlib.import_module("worker.tools.probe.args").configure(parser),
    ),
)


def schema_export_main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from schemas.export import SCHEMA_DIR, export

    for path in export(Path(args.dir) if args.dir else SCHEMA_DIR):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="execution-worker",
        description="Exactly-once execution of RPM approvals on MetaTrader 5.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.configure(child)
        child.set_defaults(handler=command.handler)
    return parser


def _resolve(handler: str) -> Callable[[argparse.Namespace], int] | None:
    module_name, function_name = handler.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    function: Callable[[argparse.Namespace], int] | None = getattr(module, function_name, None)
    return function


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    function = _resolve(args.handler)
    if function is None:
        print(f"execution-worker {args.command}: not implemented yet", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        return function(args)
    except ConfigError as exc:
        print(f"execution-worker: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
