"""Parsing the addresses of the cluster's services, shared by the configuration and the clients."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def split_address(address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``IP:PORT`` or ``[IPv6]:PORT`` as a parsed address and port; anything else is a ``ValueError``."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"scheduler address {address!r} is not IP:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host), int(port_text)
    except ValueError:
        raise ValueError(f"scheduler address {address!r} does not start with an IP address") from None


def manager_target(addr: str) -> tuple[str, bool]:
    """The gRPC target of ``manager.addr`` (``http://host:port`` as upstream writes it, or bare ``host:port``) and
    whether it wants TLS (``https``)."""
    url = urlsplit(addr if "://" in addr else f"http://{addr}")
    if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/") or url.query:
        raise ValueError(f"{addr!r} is not a manager address (use http://HOST:PORT)")
    try:
        port = url.port
    except ValueError:
        raise ValueError(f"{addr!r} has an invalid port") from None
    if port is None:
        raise ValueError(f"{addr!r} names no port (the manager's gRPC port is usually 65003)")
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    return f"{host}:{port}", url.scheme == "https"


def detect_ip() -> str:
    """Pick the IP of the default route's interface without sending anything."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: connect() on UDP sends no packet
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"
