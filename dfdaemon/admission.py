"""Admission control: bounded work in progress, and a quick refusal instead of a slow timeout past the limit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Busy(Exception):
    """Too much is already in progress (RESOURCE_EXHAUSTED); the caller should retry later or elsewhere."""


class Admission:
    """At most ``slots`` requests at work and ``capacity`` admitted (working or waiting); more are refused at once."""

    def __init__(self, what: str, slots: int, capacity: int) -> None:
        self.what = what
        self.capacity = capacity
        self._slots = asyncio.Semaphore(slots)
        self._admitted = 0

    async def enter(self) -> Callable[[], None]:
        """Wait for a slot; returns the function that frees it (idempotent, so a done-callback may call it)."""
        if self._admitted >= self.capacity:
            raise Busy(f"{self.what}: {self.capacity} requests already in progress, try again later")
        self._admitted += 1
        try:
            await self._slots.acquire()
        except BaseException:
            self._admitted -= 1
            raise
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._slots.release()
                self._admitted -= 1

        return release
