"""After a database switch the fence refuses a lease whose lock lives on the old primary.

A real primary/standby pair (tests/clusters.py). The standby is promoted while the old
primary keeps running (a split brain, the worst case: the old lock connection still
answers, its lock is still "held" there). Once the worker has seen the new primary's
epoch, the lease taken on the old one must refuse to send, and its connection must not be
reused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.clusters import PostgresPair
from tests.conftest import POSTGRES_IMAGE
from tests.faults.test_failover import _images_or_skip
from tests.integration.test_bridge_helpers import OPEN_MARKETS_TOML
from worker.mt5 import api
from worker.mt5.sessions import SessionSpec
from worker.pool.leases import ClaimTimeout, LeaseLost
from worker.pool.pool import SessionPool
from worker.store.store import Store


def _factory(terminal: api.Terminal, spec: SessionSpec) -> tuple[str, api.Terminal]:
    return (spec.id, terminal)


@pytest.fixture
def pair() -> Iterator[PostgresPair]:
    _images_or_skip()
    made = PostgresPair(POSTGRES_IMAGE, synchronous=False)
    try:
        yield made
    finally:
        made.close()


def test_a_lease_locked_on_the_old_primary_is_refused_after_the_switch(
    pair: PostgresPair, tmp_path: Path
) -> None:
    config = tmp_path / "sim.toml"
    config.write_text(OPEN_MARKETS_TOML, encoding="utf-8")
    store = Store.open(pair.url, max_size=4)
    try:
        store.migrate()
        assert store.epochs.describe()["timeline"] == 1
        pool = SessionPool(
            [SessionSpec(id="sim-0", backend="sim", sim_config=str(config))],
            store.pool,
            _factory,
            connection_current=store.epochs.is_current,
        )
        try:
            lease = pool.claim(5.0)
            lease.fence()  # proved on the only primary there is
            pair.promote()  # the old primary still runs: its lock connection still answers
            new_primary = f"postgresql://postgres@127.0.0.1:{pair.ports[1]}/postgres"
            with psycopg.connect(new_primary, autocommit=True) as conn:
                store.epochs.observe(conn)  # a connection of the pool lands on the new one
            assert store.epochs.describe()["timeline"] == 2
            with pytest.raises(LeaseLost, match="earlier database primary"):
                lease.fence()
            lease.release(broken=True)
            # the old primary, first in the URL and still up, is never used again: the
            # pool's new connections to it are refused, so no lease can be taken there
            with pytest.raises(ClaimTimeout):
                pool.claim(2.0)
            with pytest.raises(psycopg.OperationalError), store.connection() as conn:
                conn.execute("SELECT 1")
        finally:
            pool.close()
    finally:
        store.close()
