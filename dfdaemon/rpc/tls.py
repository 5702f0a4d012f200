"""Mutual TLS credentials for the upload server and for connections to other peers."""

from __future__ import annotations

from pathlib import Path

import grpc

from dfdaemon.config import TLSConfig


class TLSError(Exception):
    """TLS material that cannot be used; the message names the file."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSError(f"cannot read {what} {path!r}: {exc.strerror}") from None


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """Present ``cert``/``key`` and require a client certificate signed by ``caCert``."""
    return grpc.ssl_server_credentials(
        [(_read(tls.key, "key"), _read(tls.cert, "certificate"))],
        root_certificates=_read(tls.ca_cert, "CA certificate"),
        require_client_auth=True,
    )


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    """Verify the server against ``caCert`` and present ``cert``/``key`` as this peer's identity."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_cert, "CA certificate"),
        private_key=_read(tls.key, "key"),
        certificate_chain=_read(tls.cert, "certificate"),
    )
