"""Getting the wheel, and the skip rule: skip only when no package index answers."""

from __future__ import annotations

import socket
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.native import package, wheel
from tests.native.wheel import IndexUnreachable, WheelError


def _closed_port() -> int:
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _fake_wheel(folder: Path, init: bytes) -> Path:
    path = folder / "metatrader5-0.0.1-cp311-cp311-win_amd64.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("MetaTrader5/__init__.py", init)
    return path


def test_an_index_that_does_not_answer_is_told_apart(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/simple"
    with pytest.raises(IndexUnreachable, match="no package index answered"):
        wheel.download(tmp_path, index_url=url, isolated=True, timeout=5)
    assert not list(tmp_path.glob("*.whl"))


def test_an_index_that_answers_without_the_wheel_is_an_error(tmp_path: Path) -> None:
    index = tmp_path / "simple"
    index.mkdir()
    (index / "index.html").write_text("<html><body></body></html>")
    with pytest.raises(WheelError, match="pip download MetaTrader5 failed"):
        wheel.download(tmp_path / "cache", index_url=index.as_uri(), isolated=True)


def test_a_cached_wheel_is_used_without_asking_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = _fake_wheel(tmp_path, b"X = 1\nfrom ._core import *\n")

    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the index was asked although a wheel is cached")

    monkeypatch.setattr(wheel, "download", no_download)
    assert wheel.real_wheel(tmp_path) == cached
    init = wheel.unpack_init(cached)
    assert init.read_bytes().startswith(b"X = 1") and init.is_relative_to(tmp_path)
    assert wheel.unpack_init(cached) == init


def test_a_wheel_without_the_expected_init_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WheelError, match="no longer imports from"):
        wheel.unpack_init(_fake_wheel(tmp_path, b"X = 1\n"))
    broken = tmp_path / "broken" / "metatrader5-0-cp311-cp311-win_amd64.whl"
    broken.parent.mkdir()
    broken.write_bytes(b"not a zip")
    with pytest.raises(WheelError):
        wheel.unpack_init(broken)


@pytest.fixture
def unloaded(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``package.metatrader5`` as if nothing were loaded yet (restored afterwards)."""
    monkeypatch.setattr(package, "_module", None)
    monkeypatch.setattr(package, "_failure", None)
    monkeypatch.setattr(package, "_skip", None)
    yield


def _wheel_raises(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    def fail(folder: Path | None = None) -> Path:
        raise error

    monkeypatch.setattr(package, "real_wheel", fail)


@pytest.mark.usefixtures("unloaded")
def test_no_index_skips_outside_ci_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    _wheel_raises(monkeypatch, IndexUnreachable("no package index answered: refused"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no package index answered"):
        package.metatrader5()
    monkeypatch.setattr(package, "_skip", None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must run in CI"):
        package.metatrader5()


@pytest.mark.usefixtures("unloaded")
def test_any_other_wheel_trouble_fails_even_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    _wheel_raises(monkeypatch, WheelError("pip download MetaTrader5 failed (rc 1)"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.fail.Exception, match="could not be used"):
        package.metatrader5()
    with pytest.raises(pytest.fail.Exception, match="could not be used"):
        package.metatrader5()  # remembered: not retried by every test
