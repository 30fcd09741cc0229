"""The file-age health check used by the executor's compose health check."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from shared.transport import ClientSecurity
from tools.healthcheck import file_fresh, health_security, main


def test_recently_touched_file_is_fresh(tmp_path: Path) -> None:
    path = tmp_path / "alive"
    path.touch()
    assert file_fresh(str(path), max_age=30)


def test_file_touched_long_ago_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "alive"
    path.touch()
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    assert not file_fresh(str(path), max_age=30)


def test_missing_file_is_unhealthy(tmp_path: Path) -> None:
    assert not file_fresh(str(tmp_path / "never-written"), max_age=30)


def test_health_checks_send_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKEN", "atk_secret")
    assert health_security() == ClientSecurity()
    assert health_security(ClientSecurity(ca="/ca.pem", token="t")) == ClientSecurity(ca="/ca.pem")


def test_tls_flags_are_checked_like_the_variables(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--ca", "/nonexistent/ca.pem", "127.0.0.1:1"]) == 2
    assert "configuration error: API_TLS_CA: cannot read '/nonexistent/ca.pem'" in capsys.readouterr().err
