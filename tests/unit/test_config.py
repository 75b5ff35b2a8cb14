from __future__ import annotations

import pytest

from worker.config import ConfigError, load_settings, mask_url


def test_defaults_follow_the_contract() -> None:
    settings = load_settings({})
    assert settings.rabbitmq_url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert settings.database_url.get_secret_value().startswith("postgresql://postgres@")
    assert settings.mt5_backend == "sim" and settings.metrics_port == 9108
    assert settings.log_format == "json" and settings.approval_ttl_seconds == 30.0


def test_passwords_are_masked_when_printed() -> None:
    settings = load_settings(
        {
            "RABBITMQ_URL": "amqp://user:hunter2@mq:5672/%2F",
            "DATABASE_URL": "postgresql://app:s3cr3t@db/exec",
            "MT5_BRIDGE_SECRET": "bridge-pw",
        }
    )
    for text in (repr(settings), str(settings), str(settings.public())):
        assert "hunter2" not in text and "s3cr3t" not in text and "bridge-pw" not in text
    assert "amqp://user:***@mq:5672/%2F" in repr(settings)


def test_secret_from_file(tmp_path: pytest.TempPathFactory) -> None:
    secret = tmp_path / "secret"  # type: ignore[operator]
    secret.write_text("from-file\n")
    settings = load_settings({"MT5_BRIDGE_SECRET_FILE": str(secret)})
    assert settings.mt5_bridge_secret is not None
    assert settings.mt5_bridge_secret.get_secret_value() == "from-file"


def test_invalid_setting_is_one_clear_line_without_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"METRICS_PORT": "hunter2"})
    assert "METRICS_PORT" in str(info.value) and "hunter2" not in str(info.value)
    with pytest.raises(ConfigError):
        load_settings({"MT5_BACKEND": "wine"})


def test_toml_file_supplies_per_symbol_tables(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "worker.toml"  # type: ignore[operator]
    path.write_text(
        'approval_ttl_seconds = 5\n[pip_sizes]\nXAUUSD = 0.1\n[symbol_map]\nEURUSD = "EURUSD.a"\n'
    )
    settings = load_settings({"WORKER_CONFIG": str(path), "APPROVAL_TTL_SECONDS": "7"})
    assert settings.approval_ttl_seconds == 7.0
    assert settings.pip_sizes == {"XAUUSD": 0.1}
    assert settings.broker_symbol_for("EURUSD") == "EURUSD.a"
    assert settings.broker_symbol_for("GBPUSD") == "GBPUSD"


def test_mask_url_leaves_passwordless_urls_alone() -> None:
    assert mask_url("postgresql://postgres@127.0.0.1/x") == "postgresql://postgres@127.0.0.1/x"
    assert mask_url("amqps://u:p@h/v") == "amqps://u:***@h/v"


def test_mask_url_masks_secret_query_parameters() -> None:
    masked = mask_url("postgresql://u:pw@h/db?sslmode=verify-full&sslpassword=topsecret")
    assert masked == "postgresql://u:***@h/db?sslmode=verify-full&sslpassword=***"
    masked = mask_url("amqps://u@h/%2F?ssl_options={'keyfile':'k','password':'xyz'}")
    assert "xyz" not in masked and "'keyfile':'k'" in masked


def test_sources_and_their_precedence(tmp_path: pytest.TempPathFactory) -> None:
    """NAME_FILE > NAME > the WORKER_CONFIG file > the default; empty means unset; the
    per-symbol tables come from the file only (pydantic-settings, worker/settings_sources.py)."""
    secret = tmp_path / "url"  # type: ignore[operator]
    secret.write_text("amqp://u:from-file@mq/%2F\n")
    config = tmp_path / "worker.toml"  # type: ignore[operator]
    config.write_text("order_timeout_seconds = 20\nmax_spread_pips = 4.5\n")
    settings = load_settings(
        {
            "RABBITMQ_URL": "amqp://u:from-env@mq/%2F",
            "RABBITMQ_URL_FILE": str(secret),
            "WORKER_CONFIG": str(config),
            "MAX_SPREAD_PIPS": "",  # empty: unset, the file's value stands
            "SYMBOL_MAP": '{"EURUSD": "X"}',  # a table from the environment: ignored
            "claim_timeout_seconds": "2",  # names match in any case
        }
    )
    assert settings.rabbitmq_url.get_secret_value() == "amqp://u:from-file@mq/%2F"
    assert settings.max_spread_pips == 4.5 and settings.order_timeout_seconds == 20.0
    assert settings.symbol_map == {} and settings.claim_timeout_seconds == 2.0
    # the drain outlasts a handler, from the values of every source: 2 + 20 + 5 + 30
    assert settings.drain_timeout_seconds == 57.0


def test_a_bad_config_file_is_one_line(tmp_path: pytest.TempPathFactory) -> None:
    missing = tmp_path / "missing.toml"  # type: ignore[operator]
    with pytest.raises(ConfigError, match="WORKER_CONFIG: cannot read"):
        load_settings({"WORKER_CONFIG": str(missing)})
    broken = tmp_path / "broken.toml"  # type: ignore[operator]
    broken.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({"WORKER_CONFIG": str(broken)})
    unknown = tmp_path / "unknown.toml"  # type: ignore[operator]
    unknown.write_text("aproval_ttl_seconds = 5\n")
    with pytest.raises(ConfigError, match="APROVAL_TTL_SECONDS"):
        load_settings({"WORKER_CONFIG": str(unknown)})
    with pytest.raises(ConfigError, match="MT5_BRIDGE_SECRET_FILE: cannot read"):
        load_settings({"MT5_BRIDGE_SECRET_FILE": str(missing)})


def test_the_probes_magic_is_refused_as_a_deployment_magic() -> None:
    """The probe's orders carry the largest deployment part (worker/tools/probe/magic.py):
    a worker with that MAGIC would count them as its own."""
    from schemas.identity import MAX_DEPLOYMENT_MAGIC
    from worker.tools.probe.magic import PROBE_TAG

    assert PROBE_TAG == MAX_DEPLOYMENT_MAGIC
    with pytest.raises(ConfigError, match="MAGIC"):
        load_settings({"MAGIC": str(PROBE_TAG)})
    assert load_settings({"MAGIC": str(PROBE_TAG - 1)}).magic == PROBE_TAG - 1
