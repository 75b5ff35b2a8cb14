"""Every command answers an operator's mistake or a missing dependency with one line and the
exit code of errors.py's table; no traceback (issue 28).

Each case runs the real ``execution-worker`` in a subprocess against the real RabbitMQ and
PostgreSQL, with one bad input, and asserts the exit code and that the last line on stderr
names the cause (``run`` also logs it as JSON before that line).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from worker.errors import ExitCode

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def cli(
    *argv: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "LOG_FORMAT": "json", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        input=stdin,
        check=False,
    )


def assert_one_line(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code, (done.returncode, done.stderr)
    assert lines, "nothing said on stderr"
    last = lines[-1]
    for word in words:
        assert word in last, (word, last)
    return last


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen(1)
        yield holder.getsockname()[1]


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{host}"))


@pytest.fixture(scope="module")
def env(database_url: str, rabbitmq_url: str) -> dict[str, str]:
    return {"DATABASE_URL": database_url, "RABBITMQ_URL": rabbitmq_url, "METRICS_PORT": "0"}


def test_run_with_its_metrics_port_taken(env: dict[str, str]) -> None:
    with taken_port() as port:
        done = cli("run", env={**env, "METRICS_PORT": str(port)})
    assert_one_line(done, ExitCode.CONFIG, f"METRICS_PORT {port} is in use")


def test_no_sessions_is_fatal_for_the_supervisor_not_a_restart_loop(env: dict[str, str]) -> None:
    done = cli("run", "--processes", "2", env={**env, "MT5_SESSIONS": "0"})
    assert_one_line(done, ExitCode.CONFIG, "MT5_SESSIONS")


def test_an_unknown_log_level(tmp_path: Path, env: dict[str, str]) -> None:
    done = cli("run", env={**env, "LOG_LEVEL": "LOUD"})
    assert_one_line(done, ExitCode.CONFIG, "LOG_LEVEL")
    done = cli(
        "sim-terminal",
        "--state",
        str(tmp_path / "s.state"),
        "--port",
        "0",
        env={**env, "LOG_LEVEL": "LOUD", "MT5_BRIDGE_SECRET": "s3"},
    )
    assert_one_line(done, ExitCode.CONFIG, "LOG_LEVEL")


@pytest.mark.parametrize(
    ("plot", "words"),
    [("/nonexistent/dir/x.png", ("does not exist",)), ("x.txt", ("PNG",))],
    ids=["missing-directory", "not-png"],
)
def test_report_refuses_a_plot_path_before_reading(
    env: dict[str, str], plot: str, words: tuple[str, ...]
) -> None:
    done = cli("report", "--since", "1h", "--plot", plot, env=env)
    assert_one_line(done, ExitCode.CONFIG, "--plot", *words)


def test_a_missing_database_is_named_with_its_cause(env: dict[str, str]) -> None:
    url = with_database(env["DATABASE_URL"], "ew_no_such_db")
    for command in (("reconcile",), ("trail", "some-key"), ("report", "--since", "1h")):
        done = cli(*command, env={**env, "DATABASE_URL": url})
        assert_one_line(
            done, ExitCode.DATABASE_UNREACHABLE, "ew_no_such_db", "does not exist", "DATABASE_URL"
        )


def test_an_unmigrated_database_says_to_migrate(env: dict[str, str]) -> None:
    done = cli("trail", "some-key", env=env)
    assert_one_line(done, ExitCode.DATABASE_UNREACHABLE, "execution-worker migrate")


def test_a_wrong_broker_password_is_access_refused_everywhere(env: dict[str, str]) -> None:
    bad = {**env, "RABBITMQ_URL": with_password(env["RABBITMQ_URL"], "wrong-password")}
    for command in (("publish", "--samples", "1"), ("dead-letters", "list")):
        done = cli(*command, env=bad)
        line = assert_one_line(done, ExitCode.ACCESS_REFUSED, "RabbitMQ", "RABBITMQ_URL")
        assert "wrong-password" not in done.stderr + done.stdout
        assert "***" in line


def test_a_typo_in_a_state_is_refused(env: dict[str, str]) -> None:
    done = cli("trail", "--since", "1h", "--status", "FILED", env=env)
    assert_one_line(done, ExitCode.CONFIG, "--status", "'FILED' is not one of", "--help")


def test_sim_terminal_with_a_malformed_state(tmp_path: Path, env: dict[str, str]) -> None:
    state = tmp_path / "garbage.state"
    state.write_text("this is no simulator state\n" * 100)
    for argv in (("--dump",), ("--port", "0")):
        done = cli(
            "sim-terminal", "--state", str(state), *argv, env={**env, "MT5_BRIDGE_SECRET": "s3"}
        )
        assert_one_line(done, ExitCode.CONFIG, "--state", "not a simulator state file")


def test_sim_terminal_on_a_port_in_use(tmp_path: Path, env: dict[str, str]) -> None:
    with taken_port() as port:
        done = cli(
            "sim-terminal",
            "--state",
            str(tmp_path / "sim.state"),
            "--port",
            str(port),
            env={**env, "MT5_BRIDGE_SECRET": "s3"},
        )
    assert_one_line(done, ExitCode.CONFIG, f"--port {port}", "in use")


def test_a_dump_into_a_closed_pipe_says_nothing(tmp_path: Path) -> None:
    from worker.mt5 import api
    from worker.mt5.sim.terminal import SimTerminal

    state = tmp_path / "sim.state"
    terminal = SimTerminal(state_path=str(state))
    assert terminal.initialize()
    for _ in range(300):
        tick = terminal.symbol_info_tick("EURUSD")
        terminal.order_send(
            {
                "action": api.TRADE_ACTION_DEAL,
                "symbol": "EURUSD",
                "volume": 0.01,
                "type": api.ORDER_TYPE_BUY,
                "price": tick.ask,
                "deviation": 50,
                "type_filling": api.ORDER_FILLING_FOK,
            }
        )
    terminal.shutdown()
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "sim-terminal", "--state", str(state), "--dump"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.readline()  # `| head -1`
    child.stdout.close()
    error = child.stderr.read().decode()
    assert child.wait(60) == ExitCode.PIPE_CLOSED
    assert error == ""


def test_retention_checks_the_archive_directory_before_changing_anything(
    env: dict[str, str],
) -> None:
    done = cli("retention", "--older-than", "90d", "--archive", "/dev/null/x", env=env)
    assert_one_line(done, ExitCode.CONFIG, "--archive /dev/null/x")


def test_retention_without_a_cutoff_says_what_it_did(
    new_database: Callable[[], str], env: dict[str, str]
) -> None:
    url = new_database()
    assert cli("migrate", env={**env, "DATABASE_URL": url}).returncode == 0
    done = cli("retention", env={**env, "DATABASE_URL": url})
    assert done.returncode == ExitCode.OK, done.stderr
    assert "nothing retired" in done.stdout
    assert "months ahead" in done.stdout


def test_purge_asks_first_and_a_script_must_say_yes(env: dict[str, str]) -> None:
    from tests.integration.test_amqp_support import broker
    from worker.amqp.topology import DEAD_QUEUE

    with broker(env["RABBITMQ_URL"]) as side:
        side.channel.queue_declare(DEAD_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        side.publish(b"{}", message_id="purge-me", routing_key=DEAD_QUEUE)
    done = cli("dead-letters", "purge", "purge-me", env=env)
    assert_one_line(done, ExitCode.CONFIG, "confirm with --yes", "nothing changed")
    with broker(env["RABBITMQ_URL"]) as side:
        assert [m.properties.message_id for m in side.drain(DEAD_QUEUE)] == ["purge-me"]


def test_debug_shows_the_traceback(env: dict[str, str]) -> None:
    url = with_database(env["DATABASE_URL"], "ew_no_such_db")
    done = cli("--debug", "trail", "k", env={**env, "DATABASE_URL": url})
    assert done.returncode != 0
    assert "Traceback" in done.stderr


def test_demo_names_a_database_error_as_one(env: dict[str, str]) -> None:
    url = with_database(env["DATABASE_URL"], "ew_no_such_db")
    # --in-place: the broker's vhost as it is (a broker in a container offers no rabbitmqctl
    # to make one), so that the database is what fails
    done = cli("demo", "--in-place", "--timeout", "5", env={**env, "DATABASE_URL": url})
    assert_one_line(done, ExitCode.DATABASE_UNREACHABLE, "ew_no_such_db", "does not exist")


def test_run_with_a_wrong_broker_password_is_access_refused(env: dict[str, str]) -> None:
    bad = {**env, "RABBITMQ_URL": with_password(env["RABBITMQ_URL"], "wrong-password")}
    done = cli("run", env=bad)
    assert_one_line(done, ExitCode.ACCESS_REFUSED, "RabbitMQ refused access")
    assert "wrong-password" not in done.stderr


def test_demo_without_a_way_to_make_its_vhost_says_what_to_do(env: dict[str, str]) -> None:
    no_tools = {
        **env,
        "PATH": str(Path(sys.executable).parent),  # no rabbitmqctl
        "RABBITMQ_MANAGEMENT_URL": "http://127.0.0.1:1",  # nothing listens
    }
    done = cli("demo", env=no_tools)
    assert_one_line(done, ExitCode.CONFIG, "vhost of its own", "--vhost-url", "--in-place")
