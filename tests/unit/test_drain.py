"""The SIGTERM drain outlasts the longest handler unless it is set explicitly."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import ConfigError, Settings, load_settings


def handler_bound(settings: Settings) -> float:
    """How long one handler may hold a delivery: claim, watch a placed order, grace."""
    return (
        settings.claim_timeout_seconds
        + settings.order_timeout_seconds
        + settings.reconcile_grace_seconds
    )


def test_the_default_drain_outlasts_a_slow_order() -> None:
    settings = load_settings({})
    assert settings.drain_timeout_seconds > handler_bound(settings)
    assert settings.drain_timeout_seconds > 60 + 5 + 5  # the old 30 s did not


@pytest.mark.parametrize(
    "environ",
    [
        {"ORDER_TIMEOUT_SECONDS": "180"},
        {"CLAIM_TIMEOUT_SECONDS": "40", "RECONCILE_GRACE_SECONDS": "20"},
        {"ORDER_TIMEOUT_SECONDS": "5", "CLAIM_TIMEOUT_SECONDS": "1"},
    ],
)
def test_the_default_drain_follows_the_handler_settings(environ: dict[str, str]) -> None:
    settings = load_settings(environ)
    assert settings.drain_timeout_seconds > handler_bound(settings)


def test_the_default_drain_follows_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text("order_timeout_seconds = 240.0\n", encoding="utf-8")
    settings = load_settings({"WORKER_CONFIG": str(path)})
    assert settings.drain_timeout_seconds > 240.0


def test_an_explicit_drain_is_kept() -> None:
    assert load_settings({"DRAIN_TIMEOUT_SECONDS": "20"}).drain_timeout_seconds == 20.0
    assert Settings(drain_timeout_seconds=7.5).drain_timeout_seconds == 7.5


def test_a_bad_timeout_still_names_its_setting() -> None:
    with pytest.raises(ConfigError, match="ORDER_TIMEOUT_SECONDS"):
        load_settings({"ORDER_TIMEOUT_SECONDS": "soon"})
