"""Database epochs without a database: when an approval is suspect, what readiness says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker.store.epoch import Epochs, Replication


def test_no_switch_no_suspect() -> None:
    assert not Epochs(30.0).suspect(datetime.now(UTC))


def test_decided_before_the_switch_plus_margin_is_suspect() -> None:
    now = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
    epochs = Epochs(30.0, clock=lambda: now.timestamp())
    epochs._switched_quietly(now.timestamp())
    assert epochs.suspect(now - timedelta(seconds=5))
    assert epochs.suspect(now + timedelta(seconds=29))  # clocks and detection: the margin
    assert not epochs.suspect(now + timedelta(seconds=31))
    assert epochs.suspect(None)  # no decision time: cannot rule it out
    # the RPM's naive timestamps are UTC
    assert epochs.suspect((now - timedelta(seconds=5)).replace(tzinfo=None))


def test_synchronous_needs_names_and_a_waiting_level() -> None:
    assert Replication("standby", "on").synchronous
    assert Replication("ANY 1 (a, b)", "remote_apply").synchronous
    assert not Replication("", "on").synchronous
    assert not Replication("standby", "local").synchronous
    assert not Replication("standby", "off").synchronous


def test_describe_before_any_connection() -> None:
    about = Epochs().describe()
    assert about["timeline"] is None and about["synchronous_standby"] is None


def test_switched_within_counts_on_the_epochs_clock() -> None:
    now = [1000.0]
    epochs = Epochs(clock=lambda: now[0])
    assert not epochs.switched_within(5.0)
    epochs._switched_quietly(now[0])
    assert epochs.switched_within(5.0)
    now[0] += 5.0
    assert not epochs.switched_within(5.0)
