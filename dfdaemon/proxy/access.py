"""Who may read a cached blob: the registry says, and the mirror remembers its yes for a short while.

A blob is cached once for every client of the node, but a private repository's blob is not for every client. Before
the mirror serves a blob (from the cache, or from a download another client may have started), it asks the registry
(a ``HEAD`` of the blob with the client's own ``Authorization``); a yes is remembered per registry, repository and
credential for ``ttl`` seconds, so a pull of many layers costs one question per repository. Only a hash of the
credential is kept.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

# How long a registry's yes holds, and how many are kept (the oldest go first).
ACCESS_TTL = 60.0
ACCESS_LIMIT = 4096


class AccessMemory:
    """The registry's recent yeses: (registry, repository, credential hash) -> when the yes lapses."""

    def __init__(
        self, ttl: float = ACCESS_TTL, limit: int = ACCESS_LIMIT, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.limit = limit
        self.clock = clock
        self._until: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    @staticmethod
    def key(registry: str, repository: str, authorization: str | None) -> tuple[str, str, str]:
        credential = hashlib.sha256((authorization or "").encode("utf-8", "surrogateescape")).hexdigest()
        return registry, repository, credential

    def allowed(self, key: tuple[str, str, str]) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until <= self.clock():
            del self._until[key]
            return False
        return True

    def remember(self, key: tuple[str, str, str]) -> None:
        self._until.pop(key, None)
        self._until[key] = self.clock() + self.ttl
        while len(self._until) > self.limit:
            self._until.popitem(last=False)
