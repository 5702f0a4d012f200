"""The registry mirror a container runtime pulls through: blobs over the P2P network, the rest passed on."""

from dfdaemon.proxy.mirror import MirrorServer, RegistryMirror, parse_range, upstream_base

__all__ = ["MirrorServer", "RegistryMirror", "parse_range", "upstream_base"]
