"""Two worker processes, three bridged sim-terminal processes, one PostgreSQL.

The worker processes are this module run as a program (``python -m
tests.integration.test_pool_processes hammer|hold ...``): each builds its own SessionPool over
the same three bridge sessions, as ``execution-worker run`` processes would.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import pytest
from psycopg_pool import ConnectionPool

from tests.integration.test_bridge_helpers import (
    ROOT,
    SimProcess,
    cli_env,
    new_secret,
    start_sim_terminal,
)
from worker.mt5 import api
from worker.mt5.sessions import SessionSpec
from worker.pool.pool import SessionPool

CLAIMS_PER_THREAD = 15
THREADS = 3
HOLD_SECONDS = 0.003


def _specs(addresses: list[str], secret: str) -> list[SessionSpec]:
    return [
        SessionSpec(id=f"bridge-{i}", backend="bridge", address=address, secret=secret)
        for i, address in enumerate(addresses)
    ]


def _factory(terminal: api.Terminal, spec: SessionSpec) -> api.Terminal:
    return terminal


def _open_pool(database_url: str, addresses: list[str], secret: str) -> SessionPool:
    db_pool = ConnectionPool(database_url, min_size=1, max_size=THREADS + 2, open=True)
    return SessionPool(_specs(addresses, secret), db_pool, _factory)


# --- the worker process --------------------------------------------------------------------


def _hammer(pool: SessionPool) -> None:
    """Claim, use the terminal, release; print each holding interval (monotonic ns)."""
    lines: list[str] = []
    guard = threading.Lock()

    def work() -> None:
        for _ in range(CLAIMS_PER_THREAD):
            with pool.claim(timeout=30) as lease:
                start = time.monotonic_ns()
                assert lease.session.terminal.account_info() is not None
                time.sleep(HOLD_SECONDS)  # the work done under the lease
                lease.fence_check()
                end = time.monotonic_ns()
            with guard:
                lines.append(json.dumps([lease.session.id, start, end]))

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    print("ready", flush=True)
    sys.stdin.readline()  # both workers start together
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("\n".join(lines), flush=True)


def _hold(pool: SessionPool) -> None:
    leases = [pool.claim(timeout=30) for _ in range(pool.size)]
    print("held " + " ".join(sorted(lease.session.id for lease in leases)), flush=True)
    threading.Event().wait(600)  # until killed


def _child_main(argv: list[str]) -> int:
    mode, database_url, *addresses = argv
    pool = _open_pool(database_url, addresses, os.environ["MT5_BRIDGE_SECRET"])
    (_hammer if mode == "hammer" else _hold)(pool)
    return 0


# --- the tests -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def terminals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], str]]:
    tmp = tmp_path_factory.mktemp("terminals")
    secret = new_secret()
    processes: list[SimProcess] = []
    try:
        for i in range(3):
            processes.append(start_sim_terminal(tmp, tmp / f"t{i}.db", secret, name=f"t{i}"))
        yield [process.address for process in processes], secret
    finally:
        for process in processes:
            process.signal(signal.SIGTERM)
        for process in processes:
            process.wait()


def _worker(
    mode: str, database_url: str, addresses: list[str], secret: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.test_pool_processes", mode, database_url,
         *addresses],
        cwd=ROOT, env=cli_env(secret), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_two_processes_never_hold_one_session_at_once(
    terminals: tuple[list[str], str], database_url: str
) -> None:
    addresses, secret = terminals
    workers = [_worker("hammer", database_url, addresses, secret) for _ in range(2)]
    for worker in workers:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready"
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    intervals: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for index, worker in enumerate(workers):
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        for line in out.splitlines():
            session, start, end = json.loads(line)
            intervals[session].append((start, end, index))
    assert sum(len(spans) for spans in intervals.values()) == 2 * THREADS * CLAIMS_PER_THREAD
    assert sorted(intervals) == ["bridge-0", "bridge-1", "bridge-2"]
    assert {index for spans in intervals.values() for _, _, index in spans} == {0, 1}
    for spans in intervals.values():
        spans.sort()
        for (_, end, _), (start, _, _) in itertools.pairwise(spans):
            assert end <= start  # never two holders of one session


def test_a_killed_process_loses_its_sessions_at_once(
    terminals: tuple[list[str], str], database_url: str
) -> None:
    addresses, secret = terminals
    holder = _worker("hold", database_url, addresses, secret)
    pool = _open_pool(database_url, addresses, secret)
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line.split() == ["held", "bridge-0", "bridge-1", "bridge-2"]
        with pytest.raises(Exception, match="no MT5 session free"):
            pool.claim(timeout=0.2)
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        leases = [pool.claim(timeout=2) for _ in range(3)]
        assert sorted(lease.session.id for lease in leases) == [
            "bridge-0",
            "bridge-1",
            "bridge-2",
        ]
        for lease in leases:
            lease.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
        if holder.stderr is not None:
            holder.stderr.close()
        pool.close()


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
