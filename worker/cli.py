"""The ``execution-worker`` command (click).

Each command's options are declared here; its implementation lives in the module that owns
the work and is imported only when the command runs, so ``--help`` stays fast and works on
every platform. The implementation receives the parsed options as an ``argparse.Namespace``
(attribute per option) and returns an exit code of :class:`worker.errors.ExitCode`.

Every option can also come from the environment: ``EXECUTION_WORKER_<COMMAND>_<OPTION>``
(``EXECUTION_WORKER_RUN_PROCESSES=2``), shown with its default in ``--help``; a few carry
the names of the contract instead (``MT5_LOGIN``...). A failure ends with ONE line and the
exit code of errors.py's table (worker/explain.py); ``--debug`` prints the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import click

from worker.errors import ExitCode, WorkerError

ENV_PREFIX = "EXECUTION_WORKER"
# an execution row's states: in flight, then the confirmation statuses (schemas/enums.py)
TRAIL_STATES = (
    "RECEIVED",
    "VALIDATED",
    "SUBMITTING",
    "SUBMITTED",
    "UNKNOWN",
    "FILLED",
    "PARTIALLY_FILLED",
    "REJECTED",
    "EXPIRED",
    "CANCELLED",
    "FAILED",
)
CONTEXT = {
    "auto_envvar_prefix": ENV_PREFIX,
    "show_default": True,
    "help_option_names": ["-h", "--help"],
    "max_content_width": 100,
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mt5-execution-worker")
    except PackageNotFoundError:
        return "unknown (not installed)"


def option(*declarations: str, **settings: Any) -> Callable[[Any], Any]:
    """``click.option`` that shows its environment variable in ``--help``."""
    settings.setdefault("show_envvar", True)
    return click.option(*declarations, **settings)


class TimeType(click.ParamType[datetime]):
    """ISO 8601 (UTC without an offset) or an age before now: 90m, 24h, 7d, now."""

    name = "TIME"

    def convert(self, value: Any, param: Any, ctx: Any) -> datetime:
        if isinstance(value, datetime):
            return value
        from worker.tools.report_time import parse_time

        try:
            return parse_time(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


TIME = TimeType()


# ----------------------------------------------------------------------------- running


class Failed(WorkerError):
    """Carries a command's exit code out of click (``standalone_mode=False``)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


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


def _invoke(command: str, handler: str, **values: Any) -> int:
    """Run ``handler`` with the options as a Namespace; one line and a code on failure."""
    ctx = click.get_current_context()
    debug = bool((ctx.find_root().params or {}).get("debug"))
    args = argparse.Namespace(command=command, debug=debug, **values)
    function = _resolve(handler)
    if function is None:
        click.echo(f"execution-worker {command}: not implemented yet", err=True)
        return ExitCode.CONFIG
    try:
        return function(args)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return ExitCode.PIPE_CLOSED
    except Exception as exc:
        if debug:
            raise
        from worker.explain import explain

        explained = explain(exc)
        print(f"execution-worker {command}: {explained.line}", file=sys.stderr)
        return explained.code


def _quiet_stdout() -> None:
    """The reader of stdout went away (``| head``): point stdout at /dev/null so that the
    interpreter's last flush does not fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def _one_of(names: Sequence[str], values: dict[str, Any], *, required: bool) -> None:
    given = [name for name in names if values.get(name) not in (None, False, ())]
    shown = " | ".join(f"--{name.replace('_', '-')}" if name != "id" else "ID" for name in names)
    if len(given) > 1:
        raise click.UsageError(f"give one of {shown}, not several")
    if required and not given:
        raise click.UsageError(f"give one of {shown}")


def _run(command: str, handler: str, **values: Any) -> None:
    code = _invoke(command, handler, **values)
    if code:
        raise Failed(code)


# ----------------------------------------------------------------------------- commands


@click.group(
    context_settings=CONTEXT,
    help="Exactly-once execution of RPM approvals on MetaTrader 5.",
    epilog="Exit codes: docs/OPERATIONS.md 2.11 (worker/errors.py). A failure prints one line;"
    " --debug prints its traceback.",
)
@click.version_option(
    _version(), "--version", prog_name="execution-worker", message="%(prog)s %(version)s"
)
@option("--debug", is_flag=True, help="print the traceback of a failure instead of one line")
def group(debug: bool) -> None:
    del debug


@group.command(help="consume execution.requests and execute")
@option("--processes", type=click.IntRange(min=1), default=1, help="worker processes to supervise")
def run(**values: Any) -> None:
    _run("run", "worker.supervisor:main", **values)


@group.command(
    help="run the whole path against the simulated terminal, in a vhost and a database of its"
    " own (created and removed)"
)
@option("--count", type=int, default=12, help="approvals to publish")
@option("--timeout", type=float, default=60.0, help="seconds to wait for all")
@option(
    "--vhost-url",
    help="an empty vhost reserved for the demo (default: one of its own, created and deleted"
    " with rabbitmqctl or the management API)",
)
@option(
    "--in-place",
    is_flag=True,
    help="use the vhost of RABBITMQ_URL and the database of DATABASE_URL as they are"
    " (consumes their execution.requests)",
)
def demo(**values: Any) -> None:
    _one_of(("vhost_url", "in_place"), values, required=False)
    _run("demo", "worker.tools.demo:main", **values)


@group.command(help="publish RPM approvals to execution.requests")
@option("--file", help="a JSON file: one message, or a list of messages")
@option("--stdin", is_flag=True, help="read JSON lines from stdin")
@option("--samples", type=click.IntRange(min=1), help="generate N sample approvals")
@option("--symbols", default="EURUSD,GBPUSD,USDJPY,XAUUSD", help="symbols of --samples")
@option("--reply-to", help="reply_to queue for the confirmations")
@option(
    "--account",
    help="name this account (decision.account) in every approval that names none"
    " (docs/OPERATIONS.md 2.8b)",
)
@option("--seed", type=int, default=7, help="random seed of --samples")
def publish(**values: Any) -> None:
    _one_of(("file", "stdin", "samples"), values, required=True)
    _run("publish", "worker.tools.publish:main", **values)


@group.command(help="apply the database migrations")
def migrate(**values: Any) -> None:
    _run("migrate", "worker.store.migrate:migrate_main", **values)


@group.command(help="resolve in-flight executions against the terminals")
@option("--json", is_flag=True, help="print JSON lines")
def reconcile(**values: Any) -> None:
    _run("reconcile", "worker.tools.reconcile:main", **values)


@group.command(help="print the effective settings and where each comes from (secrets masked)")
@option("--json", is_flag=True, help="print JSON instead of lines")
def config(**values: Any) -> None:
    _run("config", "worker.tools.config_show:main", **values)


def _bridge_security(function: Callable[..., Any]) -> Callable[..., Any]:
    """TLS and metrics of a bridge (docs/TLS.md); off loopback mutual TLS is required."""
    decorators = [
        option("--tls-cert", help="the bridge's certificate (PEM)"),
        option("--tls-key", help="private key of --tls-cert (PEM)"),
        option(
            "--tls-client-ca",
            help="require client certificates signed by this CA (mutual TLS 1.3)",
        ),
        option(
            "--tls-allow",
            multiple=True,
            metavar="NAME",
            help="a client certificate name to accept: CN=..., DNS:..., URI:... (repeatable)",
        ),
        option("--tls-crl", help="refuse client certificates revoked in this CRL (PEM)"),
        option(
            "--metrics-port",
            type=click.IntRange(0, 65535),
            help="serve Prometheus /metrics on this port",
        ),
        option("--metrics-host", help="address of --metrics-port (default: --host)"),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


@group.command("sim-terminal", help="serve a simulated terminal with persistent broker state")
@option("--host", default="127.0.0.1", help="listen address")
@option("--port", type=click.IntRange(0, 65535), default=18812, help="listen port (0: any)")
@option("--state", required=True, help="file holding the broker state")
@option("--dump", is_flag=True, help="print every deal as JSON lines")
@option("--config", help="TOML file of simulator settings and fault knobs")
@option("--profile", help="replay a broker profile written by `probe`")
@_bridge_security
def sim_terminal(**values: Any) -> None:
    _run("sim-terminal", "worker.mt5.bridge.serve:sim_terminal_main", **values)


@group.command("bridge-serve", help="serve the native MetaTrader5 terminal over the bridge")
@option("--host", default="127.0.0.1", help="listen address")
@option("--port", type=click.IntRange(0, 65535), default=18812, help="listen port")
@option("--terminal-path", envvar="MT5_PATH", help="path of terminal64.exe")
@option("--login", envvar="MT5_LOGIN", help="account number")
@option("--server", envvar="MT5_SERVER", help="trade server name")
@_bridge_security
def bridge_serve(**values: Any) -> None:
    _run("bridge-serve", "worker.mt5.bridge.serve:bridge_serve_main", **values)


@group.command("schema-export", help="write the JSON Schemas of the wire models")
@option("--dir", help="output directory (default: schemas/json)")
def schema_export(**values: Any) -> None:
    _run("schema-export", "worker.cli:schema_export_main", **values)


@group.command(help="measure overhead, throughput, scaling and memory")
@option("--json", "json_path", help="write the results as JSON here")
@option("--plot", help="write a PNG plot here (needs the plot extra)")
@option("--quick", is_flag=True, help="tiny counts (smoke test)")
@option("--vhost-url", help="an empty vhost of the bench's own (when rabbitmqctl is unavailable)")
def bench(**values: Any) -> None:
    _run("bench", "worker.tools.bench.runner:main", **values)


@group.command(
    help="show the audit timeline of one execution (KEY), or the executions of a time range"
    " (--since)"
)
@click.argument("key", required=False)
@option("--json", is_flag=True, help="print JSON instead of a table")
@option("--since", type=TIME, help="instead of KEY: executions received since T")
@option("--until", type=TIME, help="... and before T (default now)")
@option(
    "--status",
    type=click.Choice(TRAIL_STATES, case_sensitive=False),
    help="with --since: only this state",
)
@option("--symbol", help="with --since: only this symbol")
@option("--account", help="with --since: only this account (its name, or its login number)")
@option("--limit", type=click.IntRange(min=1), default=200, help="with --since: at most N rows")
def trail(**values: Any) -> None:
    if values.get("status"):
        values["status"] = str(values["status"]).upper()
    _run("trail", "worker.tools.trail:main", **values)


@group.command(help="execution quality (TCA) of a time range from the audit store")
@option(
    "--since",
    type=TIME,
    required=True,
    help="executions received since T: ISO 8601 (UTC if no offset) or an age: 24h, 7d",
)
@option("--until", type=TIME, help="... and before T (default now)")
@option("--by", type=click.Choice(("symbol", "session", "account", "hour")), help="group by")
@option("--json", help="write the whole report as JSON to this file")
@option("--plot", help="write a PNG (needs the plot extra: matplotlib)")
@option(
    "--account-currency",
    default="USD",
    help="the account currency shortfall and slippage are converted to",
)
def report(**values: Any) -> None:
    _run("report", "worker.tools.report:main", **values)


@group.command(help="create partitions ahead; detach, archive and drop months older than a cutoff")
@option(
    "--older-than",
    metavar="AGE",
    help="retire monthly partitions that end before now minus AGE (e.g. 90d, 13w)",
)
@option("--archive", metavar="DIR", help="COPY each one to DIR/<name>.csv.gz")
@option("--dry-run", is_flag=True, help="show the plan, change nothing")
@option("--yes", is_flag=True, help="retire without asking for confirmation (scripts)")
@option(
    "--months-ahead",
    type=click.IntRange(min=0),
    default=3,
    help="create partitions this many months ahead",
)
def retention(**values: Any) -> None:
    _run("retention", "worker.tools.retention:main", **values)


@group.command(help="measure a broker account (trades only on demo/contest) and write its profile")
@option(
    "--account",
    metavar="ALIAS",
    help="the account to probe: its name in MT5_SESSIONS (or a session id); optional with one"
    " account",
)
@option(
    "--symbols",
    help="canonical (RPM) names to map and read, comma-separated (default"
    " EURUSD,GBPUSD,USDJPY,XAUUSD and the [symbol_map] names)",
)
@option("--out", required=True, metavar="PROFILE.toml", help="profile to write")
@option(
    "--round-trips",
    type=click.IntRange(min=0),
    default=10,
    help="open/close round trips of the minimum volume (0: like --reads-only)",
)
@option("--trade-symbol", help="trade this symbol (default: the first open one)")
@option("--reads-only", is_flag=True, help="read, never trade")
@option(
    "--allow-real",
    is_flag=True,
    help="allow round trips on a REAL account (asks for the account number, typed)",
)
@option(
    "--wait-seconds",
    type=float,
    default=10.0,
    help="how long to wait for a deal or a position to show",
)
def probe(**values: Any) -> None:
    _run("probe", "worker.tools.probe.main:main", **values)


@group.group("dead-letters", help="list, show, replay or purge execution.requests.dead")
def dead_letters() -> None:
    pass


_limit = option(
    "--limit", type=click.IntRange(min=1), default=10_000, help="look at most at N messages"
)
_actor = option("--actor", help="who is acting, for the audit (default: $USER@host)")


def _dead_letters(action: str, **values: Any) -> None:
    defaults = {"json": False, "id": None, "all": False, "reason": None, "actor": None}
    _run(
        "dead-letters",
        "worker.tools.dead_letters:main",
        **{**defaults, "yes": False, **values, "action": action},
    )


@dead_letters.command("list", help="list the dead letters (nothing is removed)")
@option("--json", is_flag=True, help="print JSON lines")
@_limit
def dead_letters_list(**values: Any) -> None:
    _dead_letters("list", **values)


@dead_letters.command("show", help="one dead letter: headers, properties, body preview")
@click.argument("id")
@_limit
def dead_letters_show(**values: Any) -> None:
    _dead_letters("show", **values)


@dead_letters.command("replay", help="republish to execution.requests (same message_id)")
@click.argument("id", required=False)
@option("--all", is_flag=True, help="every dead letter (see --reason)")
@option("--reason", help="with --all: only dead letters with this reason")
@_actor
@_limit
def dead_letters_replay(**values: Any) -> None:
    _one_of(("id", "all"), values, required=True)
    _dead_letters("replay", **values)


@dead_letters.command("purge", help="remove one dead letter for good (audited; asks first)")
@click.argument("id")
@option("--yes", is_flag=True, help="do not ask for confirmation (scripts)")
@_actor
@_limit
def dead_letters_purge(**values: Any) -> None:
    _dead_letters("purge", **values)


def schema_export_main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from schemas.export import SCHEMA_DIR, export

    for path in export(Path(args.dir) if args.dir else SCHEMA_DIR):
        print(path)
    return 0


def command_options(*path: str) -> set[str]:
    """The option strings of a command (``command_options("bridge-serve")``)."""
    command: click.Command = group
    for name in path:
        assert isinstance(command, click.Group)
        found = command.commands[name]
        command = found
    return {
        text
        for param in command.params
        if isinstance(param, click.Option)
        for text in (*param.opts, *param.secondary_opts)
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``execution-worker`` with ``argv`` (default: the command line); the exit code."""
    try:
        result = group.main(
            args=list(sys.argv[1:] if argv is None else argv),
            prog_name="execution-worker",
            standalone_mode=False,
        )
    except Failed as failed:
        return failed.code
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:  # no command: the help
        print(exc.format_message(), file=sys.stderr)
        return ExitCode.CONFIG
    except click.UsageError as exc:  # one line, like every other mistake
        where = exc.ctx.command_path if exc.ctx is not None else "execution-worker"
        message = " ".join(exc.format_message().split())
        print(f"{where}: {message} (see {where} --help)", file=sys.stderr)
        return ExitCode.CONFIG
    except click.ClickException as exc:
        print(f"execution-worker: {' '.join(exc.format_message().split())}", file=sys.stderr)
        return ExitCode.CONFIG
    except click.exceptions.Abort:
        return ExitCode.INTERRUPTED
    return result if isinstance(result, int) else ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
