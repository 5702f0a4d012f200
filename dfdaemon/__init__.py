"""Python peer daemon for Dragonfly's v2 P2P protocol."""

__version__ = "0.1.0"
