"""``execution-worker config``: effective settings, their sources, secrets masked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker import cli


def test_config_prints_every_setting_with_its_source_and_masks_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("bridge-s3cret\n")
    config = tmp_path / "worker.toml"
    config.write_text("approval_ttl_seconds = 12.5\n")
    for name in ("RABBITMQ_URL", "MT5_BRIDGE_SECRET", "APPROVAL_TTL_SECONDS", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RABBITMQ_URL", "amqp://u:pa55word@mq:5672/%2F")
    monkeypatch.setenv("MT5_BRIDGE_SECRET_FILE", str(secret_file))
    monkeypatch.setenv("WORKER_CONFIG", str(config))
    assert cli.main(["config", "--json"]) == 0
    out = capsys.readouterr().out
    assert "pa55word" not in out and "bridge-s3cret" not in out
    shown = json.loads(out)
    assert shown["settings"]["rabbitmq_url"] == "amqp://u:***@mq:5672/%2F"
    assert shown["settings"]["mt5_bridge_secret"] == "***"
    assert shown["settings"]["approval_ttl_seconds"] == 12.5
    assert shown["sources"]["rabbitmq_url"] == "env"
    assert shown["sources"]["mt5_bridge_secret"] == "env"
    assert shown["sources"]["approval_ttl_seconds"] == "file"
    assert shown["sources"]["database_url"] == "default"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("execution-worker ")


def test_help_shows_every_option_with_its_environment_variable_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["retention", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "--months-ahead" in shown and "EXECUTION_WORKER_RETENTION_MONTHS_AHEAD" in shown
    assert "default: 3" in shown
    assert cli.main(["bridge-serve", "--help"]) == 0
    assert "MT5_LOGIN" in capsys.readouterr().out


def test_an_option_comes_from_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXECUTION_WORKER_TRAIL_STATUS", "FILED")
    assert cli.main(["trail", "--since", "1h"]) == 2  # the typo is refused, from the env too
    assert "FILED" in capsys.readouterr().err
