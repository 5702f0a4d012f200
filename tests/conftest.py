"""Fixtures shared across test modules: a controllable clock and a storage on a real directory (storage and GC
tests), and the processes the RPC fuzz modules (``tests/test_fuzz_*.py``) run against."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from dfdaemon.storage import Storage
from tests.fuzz_rpc_support import CASES, Env, fuzz_environment, guarded
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


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """An origin, the scheduler stub and a daemon, fresh for each fuzz module: no module sees another's state."""
    with fuzz_environment(tmp_path_factory.mktemp("fuzz-rpc")) as env:
        yield env


@pytest.fixture
def fuzz_guard(fuzz_env: Env) -> Iterator[None]:
    """Around each fuzz test: both processes still serve, and nothing changed on disk where it must not."""
    with guarded(fuzz_env):
        yield


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On a pytest-xdist worker, hand this worker's fuzz counts to the controller, which prints them."""
    worker_output = getattr(session.config, "workeroutput", None)
    if worker_output is not None:
        worker_output["fuzz_cases"] = dict(CASES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """On the pytest-xdist controller: add up what each worker counted."""
    CASES.update(getattr(node, "workeroutput", {}).get("fuzz_cases", {}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many calls each RPC received from the fuzz tests of this session (nothing when none ran)."""
    if not CASES:
        return
    width = max(len(path) for path in CASES)
    terminalreporter.section("fuzz cases per RPC")
    for path in sorted(CASES):
        terminalreporter.write_line(f"{path:<{width}}  {CASES[path]:>6}")
    terminalreporter.write_line(f"{'total':<{width}}  {sum(CASES.values()):>6}")
