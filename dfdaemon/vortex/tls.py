"""Mutual TLS for the vortex port, from the same PEM files as the gRPC upload server and client."""

from __future__ import annotations

import ssl

from dfdaemon.config import TLSConfig
from dfdaemon.rpc.tls import TLSError


def _context(purpose: ssl.Purpose, tls: TLSConfig) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(purpose, cafile=tls.ca_cert)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"cannot read CA certificate {tls.ca_cert!r}: {exc.strerror or exc}") from None
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"cannot load certificate {tls.cert!r} with key {tls.key!r}: {exc.strerror or exc}") from None
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """Present ``cert``/``key`` and require a client certificate signed by ``caCert``, as the gRPC port does.

    No TLS 1.3 session tickets: each piece is a new connection with a full handshake anyway, and a ticket arriving
    after the handshake would wake a child that waits for the piece's answer on its event loop."""
    context = _context(ssl.Purpose.CLIENT_AUTH, tls)
    context.num_tickets = 0
    return context


def client_context(tls: TLSConfig) -> ssl.SSLContext:
    """Verify the parent (its certificate must name the IP dialled) and present this peer's certificate."""
    return _context(ssl.Purpose.SERVER_AUTH, tls)
