"""Membership of a Dragonfly cluster: which schedulers exist (the manager), which one owns a task (the ring), and
what this host reports about itself (the machine's figures).

``ring`` and ``host`` are plain Python; ``manager`` is the one module here that speaks gRPC (``manager.v2`` and
``grpc.health.v1``), because finding the schedulers is all it does.
"""
