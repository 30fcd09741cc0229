"""``python -m tools.certs``: the local CA, the api's certificate and client certificates."""

from __future__ import annotations

import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tools import certs

HOSTS = ("localhost", "127.0.0.1", "api")
FILES = [
    "ca.pem",
    "ca-key.pem",
    "api.pem",
    "api-key.pem",
    "client-executor.pem",
    "client-executor-key.pem",
    "client-operator.pem",
    "client-operator-key.pem",
]


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def days_valid(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - datetime.now(UTC)) / timedelta(days=1)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    certs.ensure(directory, HOSTS)
    return directory


def test_it_writes_a_ca_a_server_certificate_and_one_per_client(pki: Path) -> None:
    assert sorted(p.name for p in pki.iterdir()) == sorted(FILES)
    ca = load(pki / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.subject == ca.issuer
    assert 3640 < days_valid(ca) <= 3650
    for name in ("api.pem", "client-executor.pem", "client-operator.pem"):
        cert = load(pki / name)
        cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert 360 < days_valid(cert) <= 365


def test_the_server_certificate_names_every_host_as_dns_or_ip(pki: Path) -> None:
    cert = load(pki / "api.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "api"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_client_certificates_carry_their_name_and_client_auth(pki: Path) -> None:
    for name in ("executor", "operator"):
        cert = load(pki / f"client-{name}.pem")
        assert common_name(cert) == name
        assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_keys_are_private_and_match_their_certificates(pki: Path) -> None:
    for cert_name in ("ca.pem", "api.pem", "client-executor.pem", "client-operator.pem"):
        key_path = pki / cert_name.replace(".pem", "-key.pem")
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600, key_path
        assert stat.S_IMODE((pki / cert_name).stat().st_mode) == 0o644
        assert certs.load_pair(pki / cert_name, key_path) is not None


def test_a_second_run_keeps_every_valid_file(pki: Path) -> None:
    before = contents(pki)
    report = certs.ensure(pki, HOSTS)
    assert {action for action, _ in report} == {"kept"}
    assert contents(pki) == before


def test_force_makes_everything_anew(pki: Path) -> None:
    before = contents(pki)
    report = certs.ensure(pki, HOSTS, force=True)
    assert {action for action, _ in report} == {"wrote"}
    after = contents(pki)
    assert all(after[name] != before[name] for name in FILES)


def test_a_new_host_remakes_only_the_server_certificate(pki: Path) -> None:
    before = contents(pki)
    report = {path.name: action for action, path in certs.ensure(pki, (*HOSTS, "api.example.com"))}
    assert report["api.pem"] == "wrote" and report["ca.pem"] == "kept" and report["client-executor.pem"] == "kept"
    after = contents(pki)
    assert after["api.pem"] != before["api.pem"] and after["ca.pem"] == before["ca.pem"]
    san = load(pki / "api.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "api.example.com" in san.get_values_for_type(x509.DNSName)


def test_missing_expiring_or_foreign_files_are_remade(pki: Path) -> None:
    (pki / "client-operator-key.pem").unlink()
    ca_cert, ca_key = certs.load_pair(pki / "ca.pem", pki / "ca-key.pem") or pytest.fail("no CA")
    certs.write_pair(
        pki / "client-executor.pem",
        pki / "client-executor-key.pem",
        *certs.make_client_cert(ca_cert, ca_key, "executor", days=10),
    )
    other_ca = certs.make_ca("another CA")
    certs.write_pair(pki / "api.pem", pki / "api-key.pem", *certs.make_server_cert(*other_ca, HOSTS))
    report = {path.name: action for action, path in certs.ensure(pki, HOSTS)}
    assert report["client-operator.pem"] == "wrote"  # key gone
    assert report["client-executor.pem"] == "wrote"  # expires within 30 days
    assert report["api.pem"] == "wrote"  # signed by another CA
    assert report["ca.pem"] == "kept"
    assert days_valid(load(pki / "client-executor.pem")) > 300
    load(pki / "api.pem").verify_directly_issued_by(ca_cert)


def test_a_new_ca_remakes_every_certificate(pki: Path) -> None:
    (pki / "ca-key.pem").write_text("not a key")
    report = certs.ensure(pki, HOSTS)
    assert {action for action, _ in report} == {"wrote"}
    ca = load(pki / "ca.pem")
    load(pki / "client-operator.pem").verify_directly_issued_by(ca)


def test_the_command_prints_what_it_wrote_and_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert certs.main([str(out), "--hosts", "localhost,127.0.0.1,api", "--clients", "executor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wrote {out / 'ca.pem'}"
    assert len(lines) == 6 and all(line.startswith("wrote ") for line in lines)
    assert certs.main([str(out), "--hosts", "localhost,127.0.0.1,api", "--clients", "executor"]) == 0
    assert all(line.startswith("kept  ") for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("args", [["--hosts", ""], ["--clients", "../evil"]])
def test_the_command_refuses_bad_arguments(tmp_path: Path, args: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        certs.main([str(tmp_path / "x"), *args])
    assert info.value.code == 2
    assert not (tmp_path / "x").exists()
