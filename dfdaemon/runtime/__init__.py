"""The container runtime side of the daemon: which images the node's containers use."""
