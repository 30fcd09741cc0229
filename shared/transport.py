"""How clients reach the api and how the api listens: TLS, mutual TLS, bearer tokens.

The one place that builds channels to the api (``open_channel``) and
the api's server credentials (``server_credentials``). The settings are read from the
environment in ``shared.config`` (``client_security``, ``ApiConfig.tls_*``) and re-exported
here.

Client side: TLS when ``API_TLS_CA`` is set (the api's certificate is checked against it),
with this client's certificate when ``API_TLS_CLIENT_CERT`` / ``API_TLS_CLIENT_KEY`` are set
(mutual TLS), plaintext otherwise. ``API_TOKEN`` is added to every call as
``authorization: Bearer <token>`` by a channel interceptor, so stubs need no per-call metadata.
A token sent in plaintext to another host is allowed (some networks are private) but logged
once as a warning. A client reads its files when it opens a channel: a rotated client
certificate or CA bundle takes effect with the next channel (for the executor, its next start).

Server side: ``server_credentials`` is None without ``API_TLS_CERT`` (the api listens in
plaintext); otherwise TLS, requiring and verifying client certificates when
``API_TLS_CLIENT_CA`` is set. The credentials are *dynamic*: gRPC core asks
``CertificateFiles.fetch`` for the current configuration at every new TLS handshake (on one of
its own threads, also under grpc.aio), which answers None while the files are unchanged (a few
``stat`` calls) and a new configuration once they changed and still make a valid pair. A bad
or half-written file is logged once and the previous certificate stays in use, so rotation is:
write the new key and certificate (atomically, e.g. ``tools.certs``) and new connections use
them; established connections keep theirs until they are recycled (at most
``limits.MAX_CONNECTION_AGE_MS``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shared.config import ApiConfig, ClientSecurity, ConfigError, client_security

log = logging.getLogger("shared.transport")

__all__ = [
    "CertificateFiles",
    "ClientSecurity",
    "client_security",
    "is_local_target",
    "open_channel",
    "server_credentials",
]

Metadata = Sequence[tuple[str, str]]
_warned_plaintext: set[str] = set()


# --- client side -------------------------------------------------------------------------


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path!r}: {exc.strerror}") from None


def channel_credentials(security: ClientSecurity) -> grpc.ChannelCredentials:
    """TLS credentials for ``security`` (which must have a CA): the CA, and the client's own
    certificate when it has one."""
    if not security.ca:
        raise ValueError("channel credentials need a CA (API_TLS_CA)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(security.ca),
        private_key=_read(security.key) if security.key else None,
        certificate_chain=_read(security.cert) if security.cert else None,
    )


def is_local_target(target: str) -> bool:
    """Whether a gRPC target names this machine (loopback address, localhost, a Unix socket)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    rest = target.split("///", 1)[1] if "///" in target else target
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        rest = rest.removeprefix(scheme)
    if rest.startswith("["):
        host = rest[1:].partition("]")[0]
    elif rest.count(":") == 1:
        host = rest.partition(":")[0]
    else:
        host = rest  # a bare name, or an IPv6 address without a port
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _request_metadata(security: ClientSecurity, metadata: Metadata, target: str) -> tuple[tuple[str, str], ...]:
    """What every call of a channel carries: ``metadata``, and the bearer token unless
    ``metadata`` has its own ``authorization``."""
    extra = tuple((k.lower(), v) for k, v in metadata)
    if security.token and not any(k == "authorization" for k, _ in extra):
        if not security.tls and not is_local_target(target) and target not in _warned_plaintext:
            _warned_plaintext.add(target)
            log.warning(
                "API_TOKEN is sent in plaintext to %s: anyone on the way can read and reuse it. "
                "Set API_TLS_CA (and serve the api with TLS) outside a trusted network.",
                target,
            )
        extra += (("authorization", f"Bearer {security.token}"),)
    return extra


def _options(security: ClientSecurity, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    out = list(options)
    if security.server_name:
        out.append(("grpc.ssl_target_name_override", security.server_name))
    return out


def _merged(existing: Any, extra: tuple[tuple[str, str], ...]) -> list[tuple[str, Any]]:
    """A call's own metadata first; ``extra`` keys it already has are not added twice."""
    own = list(existing or ())
    keys = {k for k, _ in own}
    return [*own, *((k, v) for k, v in extra if k not in keys)]


class _AioMetadata:
    """Adds fixed metadata (the bearer token) to calls of a grpc.aio channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=grpc.aio.Metadata(*_merged(details.metadata, self._metadata)))


class _AioUnaryUnary(_AioMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def _aio_interceptors(metadata: tuple[tuple[str, str], ...]) -> list[grpc.aio.ClientInterceptor] | None:
    """One interceptor per kind of call: a grpc.aio channel files an interceptor under the first
    kind it implements only (``if``/``elif`` in grpc/aio/_channel.py), so one object implementing
    all four would leave streaming calls without the token."""
    if not metadata:
        return None
    return [cls(metadata) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]


def open_channel(
    target: str,
    security: ClientSecurity | None = None,
    options: Sequence[tuple[str, Any]] = (),
    *,
    metadata: Metadata = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to the api at ``target``.

    ``security`` None reads it from the environment (``client_security()``); pass
    ``ClientSecurity()`` for plaintext without a token. TLS when it has a CA; ``metadata`` and
    the token (as ``authorization: Bearer``) are sent with every call. ``interceptors`` (the
    tracing ones, ``shared.tracing.client_interceptors()``) run first, around every call.
    """
    security = client_security() if security is None else security
    chain = [*interceptors, *(_aio_interceptors(_request_metadata(security, metadata, target)) or ())] or None
    opts = _options(security, options)
    if security.tls:
        return grpc.aio.secure_channel(target, channel_credentials(security), options=opts, interceptors=chain)
    return grpc.aio.insecure_channel(target, options=opts, interceptors=chain)


# --- server side -------------------------------------------------------------------------

_Stamp = tuple[int, int, int, int] | None


def _stamp(path: str) -> _Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


@dataclass(frozen=True, slots=True)
class _Material:
    cert: bytes
    key: bytes
    client_ca: bytes
    not_after: datetime
    subject: str


def _load_material(cert_path: str, key_path: str, client_ca_path: str) -> _Material:
    """Reads and checks the files; ValueError saying what is wrong."""

    def read(name: str, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ValueError(f"{name} {path!r}: {exc.strerror}") from None

    cert_pem, key_pem = read("API_TLS_CERT", cert_path), read("API_TLS_KEY", key_path)
    ca_pem = read("API_TLS_CLIENT_CA", client_ca_path) if client_ca_path else b""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise ValueError(f"API_TLS_CERT {cert_path!r}: not a PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"API_TLS_KEY {key_path!r}: not an unencrypted PEM private key ({exc})") from None
    leaf = chain[0]
    if key.public_key() != leaf.public_key():
        raise ValueError(f"API_TLS_KEY {key_path!r} is not the key of the certificate in {cert_path!r}")
    if leaf.not_valid_after_utc <= datetime.now(UTC):
        raise ValueError(f"API_TLS_CERT {cert_path!r} expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if client_ca_path:
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise ValueError(f"API_TLS_CLIENT_CA {client_ca_path!r}: not PEM certificates ({exc})") from None
    return _Material(cert_pem, key_pem, ca_pem, leaf.not_valid_after_utc, leaf.subject.rfc4514_string())


class CertificateFiles:
    """The api's certificate, key and client CA, read again when their files change.

    ``fetch`` is what gRPC core calls at every new handshake, on its own threads: it is cheap
    (a ``stat`` per file while nothing changed), thread-safe, and never raises.
    """

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self._paths = (cert, key, client_ca)
        self._lock = threading.Lock()
        self._seen: tuple[_Stamp, ...] = ()
        self._material: _Material | None = None
        self.reloads = 0
        """How many times a changed certificate was handed to gRPC (for tests and logs)."""

    @property
    def mutual(self) -> bool:
        return bool(self._paths[2])

    def _stamps(self) -> tuple[_Stamp, ...]:
        return tuple(_stamp(p) for p in self._paths if p)

    def _configuration(self, material: _Material) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(material.key, material.cert)], root_certificates=material.client_ca or None
        )

    def initial(self) -> grpc.ServerCertificateConfiguration:
        """The configuration to start with; ConfigError when the files cannot be used."""
        with self._lock:
            self._seen = self._stamps()
            try:
                self._material = material = _load_material(*self._paths)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        log.info(
            "TLS certificate %s (valid until %s UTC)%s",
            material.subject,
            f"{material.not_after:%Y-%m-%d}",
            "; client certificates required (mutual TLS)" if self.mutual else "",
        )
        return self._configuration(material)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed into a valid one; None otherwise."""
        try:
            stamps = self._stamps()
            with self._lock:
                if stamps == self._seen:
                    return None
                # Whatever comes of it, these files are looked at once: a bad state is logged
                # once, and the next change (the rest of a rotation, say) is looked at again.
                self._seen = stamps
                try:
                    material = _load_material(*self._paths)
                except ValueError as exc:
                    log.warning("TLS files changed but cannot be used, keeping the previous certificate: %s", exc)
                    return None
                if material == self._material:
                    return None
                self._material = material
                self.reloads += 1
            log.info(
                "TLS certificate reloaded: %s (valid until %s UTC); new connections use it",
                material.subject,
                f"{material.not_after:%Y-%m-%d}",
            )
            return self._configuration(material)
        except Exception:  # called by gRPC core at a handshake: never raise there
            log.exception("TLS certificate reload failed; keeping the previous certificate")
            return None


def server_credentials(config: ApiConfig) -> grpc.ServerCredentials | None:
    """The api's TLS credentials (reloading themselves), or None to listen in plaintext.

    ConfigError when the files cannot be used at start.
    """
    if not config.tls_cert:
        return None
    files = CertificateFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
    # grpc's stub types the fetcher as never returning None, but None is how it says "unchanged".
    fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], files.fetch)
    return grpc.dynamic_ssl_server_credentials(files.initial(), fetch, require_client_authentication=files.mutual)
