"""shared/transport.py without a server: client settings, tokens in plaintext, certificate reloads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
import pytest

from shared import transport
from shared.config import ConfigError
from shared.transport import CertificateFiles, ClientSecurity, client_security, is_local_target, open_channel
from tools import certs


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    certs.ensure(directory, ("localhost", "127.0.0.1"), ("executor",))
    return directory


def client_env(pki: Path, **extra: str) -> dict[str, str]:
    return {
        "API_TLS_CA": str(pki / "ca.pem"),
        "API_TLS_CLIENT_CERT": str(pki / "client-executor.pem"),
        "API_TLS_CLIENT_KEY": str(pki / "client-executor-key.pem"),
        "API_TOKEN": "atk_secret",
        "API_TLS_SERVER_NAME": "api",
        **extra,
    }


def test_no_variables_mean_plaintext_without_a_token() -> None:
    security = client_security({})
    assert security == ClientSecurity()
    assert not security.tls


def test_every_variable_is_read(pki: Path) -> None:
    security = client_security(client_env(pki))
    assert security == ClientSecurity(
        ca=str(pki / "ca.pem"),
        cert=str(pki / "client-executor.pem"),
        key=str(pki / "client-executor-key.pem"),
        token="atk_secret",
        server_name="api",
    )
    assert security.tls
    assert "atk_secret" not in repr(security)  # a logged configuration does not leak the token


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("API_TLS_CLIENT_KEY", "API_TLS_CLIENT_CERT and API_TLS_CLIENT_KEY go together"),
        ("API_TLS_CLIENT_CERT", "API_TLS_CLIENT_CERT and API_TLS_CLIENT_KEY go together"),
        ("API_TLS_CA", "API_TLS_CLIENT_CERT needs API_TLS_CA"),
    ],
)
def test_settings_that_do_not_fit_together_are_refused(pki: Path, drop: str, message: str) -> None:
    env = client_env(pki)
    del env[drop]
    with pytest.raises(ConfigError, match=message):
        client_security(env)


def test_a_server_name_without_tls_is_refused() -> None:
    with pytest.raises(ConfigError, match="API_TLS_SERVER_NAME needs API_TLS_CA"):
        client_security({"API_TLS_SERVER_NAME": "api"})


def test_unreadable_or_non_pem_files_are_named(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"API_TLS_CA: cannot read '/nonexistent/ca.pem': No such file"):
        client_security({"API_TLS_CA": "/nonexistent/ca.pem"})
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match=r"API_TLS_CLIENT_KEY: .* is not a PEM file"):
        client_security(client_env(pki, API_TLS_CLIENT_KEY=str(junk)))


@pytest.mark.parametrize("token", ["two words", "t\u00e9l\u00e9", "tab\there"])
def test_a_token_that_cannot_be_a_header_is_refused(token: str) -> None:
    with pytest.raises(ConfigError, match="API_TOKEN must be printable ASCII"):
        client_security({"API_TOKEN": token})


@pytest.mark.parametrize(
    ("target", "local"),
    [
        ("127.0.0.1:50051", True),
        ("localhost:50051", True),
        ("LOCALHOST", True),
        ("[::1]:50051", True),
        ("::1", True),
        ("dns:///localhost:50051", True),
        ("ipv4:127.0.0.2:1", True),
        ("unix:/tmp/api.sock", True),
        ("api:50051", False),
        ("10.0.0.5:50051", False),
        ("dns:///api.example.com:443", False),
        ("[2001:db8::1]:50051", False),
    ],
)
def test_local_targets(target: str, local: bool) -> None:
    assert is_local_target(target) is local


async def test_a_token_in_plaintext_to_another_host_is_sent_with_one_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport, "_warned_plaintext", set())
    caplog.set_level(logging.WARNING, logger="shared.transport")
    token = ClientSecurity(token="atk_secret")
    for target in ("api.example.com:50051", "api.example.com:50051", "127.0.0.1:50051"):
        await open_channel(target, token).close()
    await open_channel("10.1.2.3:50051", ClientSecurity()).close()  # no token: nothing to warn about
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert warnings[0].startswith("API_TOKEN is sent in plaintext to api.example.com:50051")
    assert "atk_secret" not in warnings[0]


def test_open_channel_reads_the_environment_when_not_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TLS_CA", "/nonexistent/ca.pem")
    with pytest.raises(ConfigError, match="API_TLS_CA"):
        open_channel("127.0.0.1:1")


# --- the server's certificate files ---------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, pki: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "api.pem", tmp_path / "api-key.pem"
    cert.write_bytes((pki / "api.pem").read_bytes())
    key.write_bytes((pki / "api-key.pem").read_bytes())
    return cert, key


def rotate(cert_path: Path, key_path: Path) -> None:
    """A new certificate (another CA's) written over the served files."""
    ca = certs.make_ca("rotated CA")
    certs.write_pair(cert_path, key_path, *certs.make_server_cert(*ca, ["localhost"]))


def test_unchanged_files_are_not_read_again(served: tuple[Path, Path]) -> None:
    files = CertificateFiles(str(served[0]), str(served[1]))
    assert isinstance(files.initial(), grpc.ServerCertificateConfiguration)
    assert files.fetch() is None
    # Touched with the same contents: looked at, but nothing new for gRPC.
    os.utime(served[0], ns=(1, 1))
    assert files.fetch() is None
    assert files.reloads == 0


def test_changed_files_give_a_new_configuration(served: tuple[Path, Path]) -> None:
    files = CertificateFiles(*map(str, served))
    files.initial()
    rotate(*served)
    assert isinstance(files.fetch(), grpc.ServerCertificateConfiguration)
    assert files.fetch() is None
    assert files.reloads == 1


def test_a_bad_file_keeps_the_previous_certificate_and_is_logged_once(
    served: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shared.transport")
    cert, key = served
    files = CertificateFiles(str(cert), str(key))
    files.initial()
    good_key = key.read_bytes()
    rotate(cert, key)
    key.write_bytes(good_key)  # half a rotation: the new certificate, the old key
    for _ in range(3):
        assert files.fetch() is None
    (record,) = caplog.records
    assert "keeping the previous certificate" in record.getMessage()
    assert "is not the key of the certificate" in record.getMessage()
    cert.write_text("garbage")
    assert files.fetch() is None
    cert.unlink()
    assert files.fetch() is None  # a missing file neither raises nor reloads
    assert len(caplog.records) == 3
    rotate(cert, key)  # the rotation completes
    assert files.fetch() is not None
    assert files.reloads == 1


def test_fetch_never_raises(served: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    files = CertificateFiles(*map(str, served))
    files.initial()
    rotate(*served)

    def broken(*_: object) -> None:
        raise RuntimeError("surprise")

    monkeypatch.setattr(transport, "_load_material", broken)
    assert files.fetch() is None


def test_unusable_files_at_start_are_a_configuration_error(served: tuple[Path, Path], pki: Path) -> None:
    cert, _key = served
    with pytest.raises(ConfigError, match="is not the key of the certificate"):
        CertificateFiles(str(cert), str(pki / "client-executor-key.pem")).initial()
    with pytest.raises(ConfigError, match=r"API_TLS_CLIENT_CA .*: not PEM certificates"):
        CertificateFiles(str(served[0]), str(served[1]), client_ca=str(pki / "ca-key.pem")).initial()
    expired_ca = certs.make_ca("old CA")
    certs.write_pair(cert, _key, *certs.make_server_cert(*expired_ca, ["localhost"], days=-1))
    with pytest.raises(ConfigError, match="expired at"):
        CertificateFiles(*map(str, served)).initial()
