"""A local certificate authority and the certificates the api and its clients need.

``python -m tools.certs DIR [--hosts localhost,127.0.0.1,api] [--clients executor,operator] [--force]``

writes into DIR:

- ``ca.pem`` / ``ca-key.pem``: the CA (10 years), what clients trust (``API_TLS_CA``) and, for
  mutual TLS, what the api checks client certificates against (``API_TLS_CLIENT_CA``);
- ``api.pem`` / ``api-key.pem``: the api's certificate (1 year; serverAuth), one subject
  alternative name per host, DNS or IP (``API_TLS_CERT`` / ``API_TLS_KEY``);
- ``client-NAME.pem`` / ``client-NAME-key.pem`` per client: common name NAME, clientAuth
  (``API_TLS_CLIENT_CERT`` / ``API_TLS_CLIENT_KEY``).

It is idempotent: a file that is still valid (parses, signed by this CA, not expiring within 30
days, the api's covering every host asked for) is kept; ``--force`` makes everything anew. A CA
that cannot sign (``ca-key.pem`` missing or not its key) is replaced, and with it every
certificate: clients must then be given the new ``ca.pem``.
Keys are ECDSA P-256, written 0600; every file is replaced atomically, so that an api watching
its certificate never reads half a file. It prints what it wrote and what it kept.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 365
RENEW_BEFORE = timedelta(days=30)
"""A certificate expiring sooner than this is made anew by a run without --force."""
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_CLIENTS = ("executor", "operator")

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its key, and the files they are in."""

    cert: x509.Certificate
    key: Key
    cert_path: Path
    key_path: Path


def new_key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "automation (local)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(subject: x509.Name, issuer: x509.Name, key: Key, days: int) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    not_after = now + timedelta(days=days)
    # A little clock skew between containers is fine (and days < 0, for tests, is already expired).
    not_before = min(now - timedelta(minutes=5), not_after - timedelta(days=1))
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def make_ca(common_name: str = "automation local CA", days: int = CA_DAYS) -> tuple[x509.Certificate, Key]:
    """A self-signed CA certificate and its key."""
    key = new_key()
    cert = (
        _builder(_name(common_name), _name(common_name), key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: Key,
    common_name: str,
    usage: x509.ObjectIdentifier,
    days: int,
    sans: Sequence[x509.GeneralName] = (),
) -> tuple[x509.Certificate, Key]:
    key = new_key()
    builder = (
        _builder(_name(common_name), ca_cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Each host as a subject alternative name: an IP address when it parses as one, else DNS."""
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def make_server_cert(
    ca_cert: x509.Certificate, ca_key: Key, hosts: Sequence[str], days: int = LEAF_DAYS
) -> tuple[x509.Certificate, Key]:
    """The api's certificate: serverAuth, a SAN per host, common name the first host."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host")
    return _leaf(ca_cert, ca_key, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, days, host_names(hosts))


def make_client_cert(
    ca_cert: x509.Certificate, ca_key: Key, name: str, days: int = LEAF_DAYS
) -> tuple[x509.Certificate, Key]:
    """A client certificate: clientAuth, common name ``name`` (the principal's name)."""
    return _leaf(ca_cert, ca_key, name, ExtendedKeyUsageOID.CLIENT_AUTH, days)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Writes ``data`` to ``path`` all at once (a temporary file renamed over it), with ``mode``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate, key: Key) -> None:
    """The key first, then the certificate: a reader that sees the new certificate finds its key."""
    write_atomic(key_path, key_pem(key), 0o600)
    write_atomic(cert_path, cert_pem(cert))


def load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, Key] | None:
    """The certificate and key in these files, or None when missing, unreadable or not a pair."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    return cert, key


def _fresh(cert: x509.Certificate) -> bool:
    now = datetime.now(UTC)
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now > RENEW_BEFORE


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _covers(cert: x509.Certificate, hosts: Sequence[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = set(san)
    return all(name in have for name in host_names(hosts))


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def client_paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"client-{name}.pem", directory / f"client-{name}-key.pem"


def ensure(
    directory: Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    clients: Sequence[str] = DEFAULT_CLIENTS,
    *,
    force: bool = False,
) -> list[tuple[str, Path]]:
    """Makes whatever is missing or no longer valid in ``directory``; returns (``wrote`` or
    ``kept``, path) for every certificate and key, in order."""
    directory.mkdir(parents=True, exist_ok=True)
    report: list[tuple[str, Path]] = []

    def note(action: str, *paths: Path) -> None:
        report.extend((action, p) for p in paths)

    ca_paths = (directory / "ca.pem", directory / "ca-key.pem")
    ca = None if force else load_pair(*ca_paths)
    if ca is not None and not (_fresh(ca[0]) and _is_ca(ca[0])):
        ca = None
    renewed_ca = ca is None
    if ca is None:
        ca = make_ca()
        write_pair(*ca_paths, *ca)
        note("wrote", *ca_paths)
    else:
        note("kept", *ca_paths)
    ca_cert, ca_key = ca

    def keep(cert_path: Path, key_path: Path, common_name: str | None, need_hosts: Sequence[str]) -> bool:
        if renewed_ca:
            return False
        found = load_pair(cert_path, key_path)
        if found is None:
            return False
        cert = found[0]
        return (
            _fresh(cert)
            and _signed_by(cert, ca_cert)
            and (common_name is None or _common_name(cert) == common_name)
            and (not need_hosts or _covers(cert, need_hosts))
        )

    api_paths = (directory / "api.pem", directory / "api-key.pem")
    if keep(*api_paths, None, hosts):
        note("kept", *api_paths)
    else:
        write_pair(*api_paths, *make_server_cert(ca_cert, ca_key, hosts))
        note("wrote", *api_paths)
    for name in clients:
        paths = client_paths(directory, name)
        if keep(*paths, name, ()):
            note("kept", *paths)
        else:
            write_pair(*paths, *make_client_cert(ca_cert, ca_key, name))
            note("wrote", *paths)
    return report


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.certs", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument(
        "--hosts", default=",".join(DEFAULT_HOSTS), help="names and IPs of the api, comma-separated (SANs)"
    )
    parser.add_argument(
        "--clients", default=",".join(DEFAULT_CLIENTS), help="client certificates to make, by common name"
    )
    parser.add_argument("--force", action="store_true", help="make everything anew, even valid files")
    ns = parser.parse_args(argv)
    hosts, clients = _names(ns.hosts), _names(ns.clients)
    if not hosts:
        parser.error("--hosts needs at least one host")
    bad = [c for c in clients if not c.replace("-", "").replace("_", "").replace(".", "").isalnum()]
    if bad:
        parser.error(f"client names are letters, digits, '-', '_' and '.': {', '.join(bad)}")
    try:
        report = ensure(ns.directory, hosts, clients, force=ns.force)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for action, path in report:
        print(f"{action:5} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
