"""The token bucket behind the bandwidth limits, on a fake clock: every wait is computed, none is measured."""

from __future__ import annotations

import asyncio
import random

import pytest

from dfdaemon.config import ConfigError, parse_config
from dfdaemon.daemon import bandwidth
from dfdaemon.download.parents import collect_from_parents
from dfdaemon.download.peering import FetchedPiece, Parent
from dfdaemon.ratelimit import UNBOUNDED, Bandwidth, TokenBucket, limiter
from dfdaemon.storage import Storage
from tests.storage_support import read_all
from tests.test_parents import CONTENT, SIZE, SPANS, TASK_ID, A, FakeParents, Reports, task_info

MIB = 1024 * 1024


class FakeTime:
    """A clock that moves only when a sleeper sleeps (``advance``) or the test says so; records every sleep."""

    def __init__(self, *, advance: bool = True) -> None:
        self.now = 1000.0
        self.advance = advance
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.advance:
            self.now += seconds


def bucket(rate: int, time: FakeTime) -> TokenBucket:
    return TokenBucket(rate, clock=time.clock, sleep=time.sleep)


async def test_a_full_bucket_serves_one_seconds_worth_at_once_then_waits_for_the_rest() -> None:
    time = FakeTime()
    limiter = bucket(1000, time)
    await limiter.acquire(600)
    await limiter.acquire(400)
    assert time.sleeps == []
    await limiter.acquire(250)
    assert time.sleeps == [pytest.approx(0.25)]


async def test_a_request_larger_than_the_bucket_goes_into_debt_instead_of_waiting_forever() -> None:
    time = FakeTime()
    limiter = bucket(MIB, time)  # 1 MiB/s, a 4 MiB piece
    await limiter.acquire(4 * MIB)
    assert time.sleeps == [pytest.approx(3.0)]  # one second's worth was there; three more are earned
    await limiter.acquire(MIB)
    assert time.sleeps[-1] == pytest.approx(1.0)


async def test_idle_time_fills_the_bucket_to_one_seconds_worth_and_no_more() -> None:
    time = FakeTime()
    limiter = bucket(1000, time)
    await limiter.acquire(1000)
    time.now += 3600
    assert limiter.tokens == 1000
    await limiter.acquire(1500)
    assert time.sleeps == [pytest.approx(0.5)]


async def test_concurrent_callers_wait_in_arrival_order_for_their_share() -> None:
    time = FakeTime(advance=False)
    limiter = bucket(100, time)
    await asyncio.gather(*(limiter.acquire(100) for _ in range(5)))
    assert time.sleeps == [pytest.approx(1.0), pytest.approx(2.0), pytest.approx(3.0), pytest.approx(4.0)]


async def test_the_long_run_rate_is_the_limit_plus_one_burst() -> None:
    time = FakeTime()
    limiter = bucket(10 * MIB, time)
    started = time.now
    rng = random.Random(7)
    sizes = [rng.randint(1, 8 * MIB) for _ in range(500)]
    for size in sizes:
        await limiter.acquire(size)
    assert time.now - started == pytest.approx((sum(sizes) - 10 * MIB) / (10 * MIB))


async def test_a_cancelled_wait_gives_its_tokens_back() -> None:
    time = FakeTime()
    released = asyncio.Event()

    async def blocking_sleep(seconds: float) -> None:
        time.sleeps.append(seconds)
        await released.wait()

    limiter = TokenBucket(1000, clock=time.clock, sleep=blocking_sleep)
    await limiter.acquire(1000)
    waiter = asyncio.create_task(limiter.acquire(3000))
    await asyncio.sleep(0)
    assert limiter.tokens == -3000
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.tokens == 0


async def test_nothing_to_take_never_waits() -> None:
    time = FakeTime()
    limiter = bucket(1, time)
    await limiter.acquire(1)
    await limiter.acquire(0)
    assert time.sleeps == []


def test_bytes_from_the_origin_count_against_back_to_source_and_download() -> None:
    time = FakeTime()
    upload, download, back_to_source, prefetch = (bucket(1000, time) for _ in range(4))
    assert Bandwidth(upload, download, back_to_source, prefetch).source == (back_to_source, download)
    assert Bandwidth(upload, None, back_to_source, prefetch).source == (back_to_source,)
    assert Bandwidth(upload, None, None, prefetch).source == ()


class CountingParents(FakeParents):
    """Parents that note, at each request, how many tokens the bucket had left."""

    def __init__(self, limiter: TokenBucket) -> None:
        super().__init__({A.peer_id: {span.number for span in SPANS}})
        self.limiter = limiter
        self.tokens_when_asked: list[float] = []

    async def download_piece(self, parent: Parent, task_id: str, number: int) -> FetchedPiece:
        self.tokens_when_asked.append(self.limiter.tokens)
        return await super().download_piece(parent, task_id, number)


async def test_pieces_from_parents_are_paid_for_before_they_are_asked(storage: Storage) -> None:
    time = FakeTime(advance=False)
    limiter = bucket(SIZE // 2, time)
    client = CountingParents(limiter)
    reports = Reports()
    async with storage.download(TASK_ID, task_info()) as writer:
        await collect_from_parents(
            TASK_ID,
            SPANS,
            [A],
            client,
            writer,
            concurrency=1,
            piece_timeout=30.0,
            on_piece=reports.on_piece,
            on_failure=reports.on_failure,
            bandwidth=limiter,
        )
        await writer.finish()
    assert await read_all(storage, TASK_ID) == CONTENT
    # One worker: the tokens left when piece k is asked are the bucket less pieces 0..k, its own included.
    taken = [sum(span.length for span in SPANS[: k + 1]) for k in range(len(SPANS))]
    assert client.tokens_when_asked == [SIZE // 2 - n for n in taken]
    assert len(time.sleeps) == sum(1 for n in taken if n > SIZE // 2)


def test_a_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        TokenBucket(0)


def test_the_config_keys_build_the_buckets_in_upstreams_units() -> None:
    config = parse_config(
        {
            "upload": {"bandwidthLimit": "10MiB"},
            "download": {"bandwidthLimit": "20MB", "backToSourceBandwidthLimit": "5MB"},
            "proxy": {"prefetchBandwidthLimit": "1MB"},
        }
    )
    limits = bandwidth(config)
    rates = [limit.rate if limit else None for limit in (limits.upload, limits.download, limits.back_to_source)]
    assert rates == [10 * MIB, 20_000_000, 5_000_000]
    assert limits.prefetch is not None and limits.prefetch.rate == 1_000_000
    assert config.warnings() == []


def test_upstreams_defaults_cost_the_data_path_nothing() -> None:
    """50 GB/s and 10 GB/s never bind here: no bucket at all, so the hooks skip even the call."""
    config = parse_config({})
    assert (config.upload.bandwidth_limit, config.download.bandwidth_limit) == (50_000_000_000,) * 2
    assert config.download.back_to_source_bandwidth_limit == 50_000_000_000
    assert config.proxy.prefetch_bandwidth_limit == 10_000_000_000
    assert bandwidth(config) == Bandwidth(None, None, None, None)
    assert limiter(UNBOUNDED - 1) is not None


@pytest.mark.parametrize("value", [0, "0MB", "-1"])
def test_a_zero_or_negative_limit_is_a_one_line_error(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"upload": {"bandwidthLimit": value}})
    assert "bandwidthLimit" in str(caught.value)
    assert "\n" not in str(caught.value)
