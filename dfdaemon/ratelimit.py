"""Bandwidth limits: one token bucket per direction, shared by every transfer that moves bytes that way.

Upstream (``leaky_bucket``) starts each bucket full, holds at most one second's worth and refills it at the
limit; here the refill is continuous rather than once a second, which gives the same average and a smoother
flow. A transfer takes its bytes before it sends them (uploads, pieces from parents) or as they arrive (back to
source). A request larger than the bucket (a 4 MiB piece under a 1 MB/s limit) is not refused and cannot
deadlock: it takes what it needs at once, leaving the bucket in debt, and waits until the debt would be paid.
Later callers see the debt and wait behind it, so the order of service is the order of arrival and the long-run
rate is the limit, without a lock or a polling loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from dfdaemon.config import DEFAULT_BANDWIDTH_LIMIT, DEFAULT_PREFETCH_BANDWIDTH_LIMIT

# A limit at or above this (bytes per second; upstream's defaults are 50 GB/s and 10 GB/s) is more than one
# process moves: it gets no bucket at all.
UNBOUNDED = 10_000_000_000

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class TokenBucket:
    """Bytes per second with a burst of one second's worth; ``acquire`` returns at once while tokens last."""

    def __init__(self, rate: int, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        if rate <= 0:
            raise ValueError(f"a bandwidth limit must be positive, not {rate}")
        self.rate = rate
        self.capacity = float(rate)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._stamp = clock()

    @property
    def tokens(self) -> float:
        """Tokens available now; negative while callers wait for a debt to be paid."""
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, count: int) -> None:
        """Take ``count`` bytes' worth, waiting as long as the bucket needs to earn any shortfall.

        A cancelled wait gives its tokens back, so an abandoned transfer does not slow the ones behind it for
        long (they keep the wait they were given; only later callers gain).
        """
        if count <= 0:
            return
        self._refill()
        self._tokens -= count
        if self._tokens >= 0:
            return
        try:
            await self._sleep(-self._tokens / self.rate)
        except asyncio.CancelledError:
            self._refill()
            self._tokens = min(self.capacity, self._tokens + count)
            raise


def limiter(rate: int) -> TokenBucket | None:
    """A bucket for ``rate`` bytes per second; None for a rate no transfer here comes near (upstream's defaults),
    so that the default costs the data path nothing."""
    return None if rate >= UNBOUNDED else TokenBucket(rate)


@dataclass(frozen=True)
class Bandwidth:
    """The daemon's buckets (upstream's ``upload.bandwidthLimit``, ``download.bandwidthLimit``,
    ``download.backToSourceBandwidthLimit``, ``proxy.prefetchBandwidthLimit``); None where nothing limits."""

    upload: TokenBucket | None
    download: TokenBucket | None
    back_to_source: TokenBucket | None
    prefetch: TokenBucket | None

    @classmethod
    def of(
        cls,
        *,
        upload: int = DEFAULT_BANDWIDTH_LIMIT,
        download: int = DEFAULT_BANDWIDTH_LIMIT,
        back_to_source: int = DEFAULT_BANDWIDTH_LIMIT,
        prefetch: int = DEFAULT_PREFETCH_BANDWIDTH_LIMIT,
    ) -> Bandwidth:
        """Buckets for these limits in bytes per second (upstream's defaults unless given)."""
        return cls(limiter(upload), limiter(download), limiter(back_to_source), limiter(prefetch))

    @property
    def source(self) -> tuple[TokenBucket, ...]:
        """What bytes from the origin take from: the back-to-source and the download limits, as upstream counts."""
        return tuple(bucket for bucket in (self.back_to_source, self.download) if bucket is not None)
