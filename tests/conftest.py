"""Fixtures shared by the storage and GC tests: a controllable clock and a storage on a real directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dfdaemon.storage import Storage
from tests.storage_support import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def storage(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Storage]:
    store = Storage(tmp_path / "cache", clock=clock)
    await store.open()
    yield store
    await store.close()
