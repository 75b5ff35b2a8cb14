"""MT5_SESSIONS: counts per backend, the sessions file, secrets, lock keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import ConfigError, Settings, load_settings
from worker.mt5.sessions import SessionSpec, load_session_specs


def _settings(**env: str) -> Settings:
    return load_settings(env)


def test_a_count_of_sim_sessions() -> None:
    specs = load_session_specs(_settings(MT5_SESSIONS="3"), {})
    assert [spec.id for spec in specs] == ["sim-0", "sim-1", "sim-2"]
    assert {spec.backend for spec in specs} == {"sim"}
    assert len({spec.lock_key for spec in specs}) == 3


def test_a_count_of_bridges_on_consecutive_ports() -> None:
    settings = _settings(
        MT5_BACKEND="bridge",
        MT5_SESSIONS="3",
        MT5_BRIDGE_ADDRESS="terminals:18812",
        MT5_BRIDGE_SECRET="s3cret-value",
    )
    specs = load_session_specs(settings, {"MT5_BRIDGE_TLS_CA": "/etc/ca.pem"})
    assert {spec.tls_ca for spec in specs} == {"/etc/ca.pem"}
    assert [spec.address for spec in specs] == [
        "terminals:18812",
        "terminals:18813",
        "terminals:18814",
    ]
    assert [spec.id for spec in specs] == ["bridge-0", "bridge-1", "bridge-2"]
    assert all(spec.secret and spec.secret.get_secret_value() == "s3cret-value" for spec in specs)
    assert "s3cret-value" not in repr(specs)


def test_a_count_of_bridges_from_a_list_of_addresses() -> None:
    settings = _settings(
        MT5_BACKEND="bridge",
        MT5_SESSIONS="2",
        MT5_BRIDGE_ADDRESS="10.0.0.5:18812, 10.0.0.6:18812",
        MT5_BRIDGE_SECRET="s3cret",
    )
    assert [spec.address for spec in load_session_specs(settings, {})] == [
        "10.0.0.5:18812",
        "10.0.0.6:18812",
    ]
    with pytest.raises(ConfigError, match="lists 2 addresses"):
        load_session_specs(settings.model_copy(update={"mt5_sessions": "3"}), {})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MT5_BACKEND": "bridge", "MT5_BRIDGE_SECRET": "x"}, "MT5_BRIDGE_ADDRESS"),
        ({"MT5_BACKEND": "bridge", "MT5_BRIDGE_ADDRESS": "h:1"}, "MT5_BRIDGE_SECRET"),
        ({"MT5_BACKEND": "native", "MT5_SESSIONS": "2"}, "one session per process"),
        ({"MT5_SESSIONS": "0"}, "at least 1"),
        ({"MT5_SESSIONS": "/nonexistent/sessions.toml"}, "count or the path"),
    ],
)
def test_invalid_counts_are_clear_config_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_session_specs(_settings(**env), {})


def test_a_native_session_from_the_environment() -> None:
    settings = _settings(MT5_BACKEND="native")
    environ = {"MT5_LOGIN": "5012345", "MT5_SERVER": "Broker-Demo", "MT5_PASSWORD": "pw-123"}
    (spec,) = load_session_specs(settings, environ)
    assert (spec.backend, spec.login, spec.server) == ("native", 5012345, "Broker-Demo")
    assert spec.password is not None and spec.password.get_secret_value() == "pw-123"
    assert "pw-123" not in repr(spec) and "pw-123" not in str(spec)


def _sessions_file(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "sessions.toml"
    path.write_text(text, encoding="utf-8")
    return _settings(MT5_SESSIONS=str(path), MT5_BRIDGE_SECRET="shared-secret")


def test_a_sessions_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "icm2.secret"
    secret_file.write_text("file-secret\n", encoding="utf-8")
    settings = _sessions_file(
        tmp_path,
        f"""
        [[sessions]]
        id = "icm-1"
        backend = "bridge"
        address = "10.0.0.5:18812"
        login = 5012345
        server = "ICMarkets-Demo"
        secret_env = "ICM1_SECRET"
        tls_ca = "/etc/worker/ca.pem"

        [[sessions]]
        id = "icm-2"
        backend = "bridge"
        address = "10.0.0.6:18812"
        secret_file = "{secret_file}"
        account = "icm-second"

        [[sessions]]
        id = "shared"
        backend = "bridge"
        address = "10.0.0.7"
        account = "shared"

        [[sessions]]
        id = "local"
        backend = "native"
        login = 777
        password_env = "LOCAL_PASSWORD"
        account = "local"

        [[sessions]]
        id = "paper"
        backend = "sim"
        account = "paper"
        """,
    )
    specs = load_session_specs(settings, {"ICM1_SECRET": "env-secret", "LOCAL_PASSWORD": "pw"})
    by_id = {spec.id: spec for spec in specs}
    assert list(by_id) == ["icm-1", "icm-2", "shared", "local", "paper"]
    icm1 = by_id["icm-1"]
    assert (icm1.login, icm1.server, icm1.tls_ca) == (
        5012345,
        "ICMarkets-Demo",
        "/etc/worker/ca.pem",
    )

    def secret_of(spec: SessionSpec) -> str | None:
        return spec.secret.get_secret_value() if spec.secret else None

    assert secret_of(icm1) == "env-secret"
    assert secret_of(by_id["icm-2"]) == "file-secret"
    assert secret_of(by_id["shared"]) == "shared-secret"
    local = by_id["local"].password
    assert local is not None and local.get_secret_value() == "pw"
    for value in ("env-secret", "file-secret", "shared-secret", "pw"):
        assert f"'{value}'" not in repr(specs)
    # each session's account: its alias, else "<server>:<login>"
    assert [spec.account for spec in specs] == [
        "ICMarkets-Demo:5012345",
        "icm-second",
        "shared",
        "local",
        "paper",
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '[[sessions]]\nid="a"\nbackend="native"\n[[sessions]]\nid="b"\nbackend="native"\n',
            "at most one native session",
        ),
        ('[[sessions]]\nid="a"\nbackend="sim"\n[[sessions]]\nid="a"\nbackend="sim"\n', "duplicate"),
        ('[[sessions]]\nid="a"\nbackend="bridge"\n', "needs an address"),
        ('[[sessions]]\nid="a"\nbackend="sim"\npassword="hunter2"\n', "do not belong"),
        ('[[sessions]]\nid="a"\nbackend="ftp"\n', "backend"),
        ('[[sessions]]\nid="a"\nbackend="sim"\ncolour="red"\n', "colour"),
        ('[[sessions]]\nid="a"\nbackend="bridge"\naddress="h:1"\nsecret_env="UNSET"\n', "UNSET"),
        (
            '[[sessions]]\nid="a"\nbackend="bridge"\naddress="H:1"\n'
            '[[sessions]]\nid="b"\nbackend="bridge"\naddress="h:1"\n',
            "same terminal",
        ),
        ("sessions = 3\n", "no \\[\\[sessions\\]\\]"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_invalid_sessions_files(tmp_path: Path, body: str, message: str) -> None:
    settings = _sessions_file(tmp_path, body)
    with pytest.raises(ConfigError, match=message) as error:
        load_session_specs(settings, {})
    assert "hunter2" not in str(error.value)


def test_lock_keys_name_the_account_not_the_process() -> None:
    a = SessionSpec(id="a", backend="bridge", address="10.0.0.5:18812", login=1)
    same = SessionSpec(id="other-name", backend="bridge", address="10.0.0.5:18812", login=1)
    other = SessionSpec(id="a", backend="bridge", address="10.0.0.5:18812", login=2)
    assert a.lock_key == same.lock_key  # what every worker process computes
    assert a.lock_key != other.lock_key
    assert -(2**31) <= a.lock_key < 2**31
    native = SessionSpec(id="n", backend="native", login=1, server="S")
    assert native.lock_key == SessionSpec(id="m", backend="native", login=1, server="S").lock_key
    # an in-process sim is private to its process: its key is not derived from the id alone
    sim = SessionSpec(id="sim-0", backend="sim")
    assert sim.identity != "sim:sim-0" and sim.identity.endswith(":sim-0")
