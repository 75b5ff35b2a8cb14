"""``execution-worker bench``: the worker against the floor of durable work, on real services.

Every figure comes from ONE invocation, so that the noise of a shared machine hits the worker
and the floor alike. The bench isolates itself: a vhost of its own (``rabbitmqctl add_vhost``,
or ``--vhost-url``) and a database of its own, dropped at the end. The worker runs as
``execution-worker run`` in a child process (in-process simulated sessions, never closed,
netting account, ample balance); the floor (worker/tools/bench/floor.py) in another. The bench
process is only the client: it publishes RPM approvals and times their confirmations.

1. overhead: publish -> confirmation, one message at a time, worker (1 session) and floor
   (1 consumer) running side by side and taking turns message by message; then at 100
   msg/s offered with ``prefetch`` in flight, in alternating rounds, each latency timed from
   the message's intended send time (no coordinated omission);
2. throughput: a backlog drained by the worker (n sessions, latency 0) and by the floor
   (n consumers, each with prefetch 1: the same messages in flight) for n = ``prefetch``, 4,
   8 and 16, all in alternating rounds, with the CPU per message of the worker or floor
   process and of PostgreSQL's backends (worker/tools/bench/cpu.py); and the worker's
   ``prefetch`` sessions split over two processes. Beside the worker on the friendly
   simulator, at ``prefetch`` in flight and in the same rounds (offered rate and drains), the
   worker on the simulator's default hardened server (``hardened``);
3. scaling: worker throughput with 1, 2, 4, 8 sessions at 20 ms ``order_send`` latency, in
   two rounds of 1, 2, 4, 8;
4. memory: worker RSS after 1k and after 50k messages. The simulated terminals run in their
   own processes here (``sim-terminal`` behind the bridge, as a real terminal would), so the
   worker's RSS does not include the simulated broker's ever-growing deal history.

One job per module: ``counts`` (the sizes of a full and a quick run, the rounds),
``isolation`` (the vhost and the database), ``client`` (the publisher and the confirmation
observer), ``children`` (the child processes and the simulator's settings), ``rig`` (what
the phases share, and starting their processes), ``latency`` (phase 1, and the offered-rate
runs), ``drains`` (timing a drained backlog), ``throughput`` (phase 2), ``scaling`` (3),
``memory`` (4), ``report`` (figures, goals, table, plot), ``cpu`` (CPU sampling), ``floor``
(the floor consumer). This one runs the phases and writes the results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika.exceptions
import psycopg

from worker.amqp.topology import REQUESTS_QUEUE
from worker.config import Settings, load_settings, mask_url
from worker.tools.bench import report as bench_report
from worker.tools.bench.counts import FULL, QUICK, BenchError, Counts
from worker.tools.bench.isolation import isolated_database, isolated_vhost
from worker.tools.bench.latency import overhead
from worker.tools.bench.memory import memory
from worker.tools.bench.rig import Bench
from worker.tools.bench.scaling import scaling
from worker.tools.bench.throughput import throughput
from worker.tools.paths import check_plot_path

RESULTS_DIR = "bench-results"


def run(
    settings: Settings, counts: Counts, vhost_url: str | None, progress: bench_report.Progress
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Every phase, in the bench's own vhost and database; (results, latency samples)."""
    admin_amqp = settings.rabbitmq_url.get_secret_value()
    admin_db = settings.database_url.get_secret_value()
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="ew-bench-"))
    keep_logs = True
    try:
        with (
            isolated_vhost(admin_amqp, vhost_url) as amqp_url,
            isolated_database(admin_db) as database_url,
        ):
            progress.say(f"bench: broker {mask_url(amqp_url)}, database {mask_url(database_url)}")
            bench = Bench(settings, amqp_url, database_url, counts, workdir, progress)
            try:
                if vhost_url and bench.publisher.messages(REQUESTS_QUEUE):
                    raise BenchError(f"{REQUESTS_QUEUE} in --vhost-url is not empty")
                results: dict[str, Any] = {}
                results.update(overhead(bench))
                results.update(throughput(bench))
                results.update(scaling(bench))
                results.update(memory(bench))
                results["statuses"] = dict(bench.arrivals.statuses)
                results["machine"] = bench_report.machine(
                    database_url, bench.publisher.server_version
                )
            finally:
                bench.close()
        keep_logs = False
    except (pika.exceptions.AMQPError, psycopg.Error) as exc:
        raise BenchError(f"{type(exc).__name__}: {exc}") from None
    finally:
        if keep_logs:
            progress.say(f"bench: logs of the child processes kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["goals_met"] = bench_report.goals_met(results)
    results["counts"] = asdict(counts)
    results["quick"] = counts is QUICK
    results["duration_s"] = round(time.perf_counter() - started, 1)
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return results, bench.samples


def default_json_path() -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(RESULTS_DIR) / f"bench-{stamp}.json"


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    bench_report.check_extras(plot=bool(args.plot))
    if args.plot:
        check_plot_path(args.plot)
    counts = QUICK if args.quick else FULL
    progress = bench_report.Progress()
    try:
        results, samples = run(settings, counts, args.vhost_url, progress)
    except BenchError as exc:
        print(f"execution-worker bench: {exc}", file=sys.stderr)
        return 1
    path = Path(args.json_path) if args.json_path else default_json_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(bench_report.table(results), file=sys.stderr)
    print(f"bench: results in {path}", file=sys.stderr)
    if args.plot:
        problem = bench_report.plot(results, samples, args.plot)
        if problem:
            print(f"bench: no plot: {problem}", file=sys.stderr)
        else:
            print(f"bench: plot in {args.plot}", file=sys.stderr)
    return 0
