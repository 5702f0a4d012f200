"""The registry mirror's pure parts: which registry a request goes to, and which bytes a Range selects."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dfdaemon.proxy import parse_range, upstream_base
from dfdaemon.proxy.access import AccessMemory
from dfdaemon.proxy.cache import IntactFiles, file_state, open_content
from dfdaemon.proxy.mirror import UnsatisfiableRange

DEFAULT = "https://mirror.example.com/"


def test_upstream_is_the_ns_registry_over_https_unless_listed_insecure() -> None:
    assert upstream_base("ghcr.io", DEFAULT, frozenset()) == "https://ghcr.io"
    assert upstream_base("127.0.0.1:5000", DEFAULT, frozenset({"127.0.0.1:5000"})) == "http://127.0.0.1:5000"
    assert upstream_base("Registry.Example.com:443", DEFAULT, frozenset()) == "https://registry.example.com:443"


def test_docker_hub_is_reached_at_its_api_host() -> None:
    assert upstream_base("docker.io", DEFAULT, frozenset()) == "https://registry-1.docker.io"


def test_without_ns_the_configured_registry_is_used() -> None:
    assert upstream_base(None, DEFAULT, frozenset()) == "https://mirror.example.com"
    assert upstream_base("", DEFAULT, frozenset()) == "https://mirror.example.com"


@pytest.mark.parametrize("ns", ["evil.com/path", "a b", "host:99999999", "user@host", "host?x=1", "../x"])
def test_an_ns_that_is_not_a_host_is_refused(ns: str) -> None:
    with pytest.raises(ValueError, match="not a registry host"):
        upstream_base(ns, DEFAULT, frozenset())


@pytest.mark.parametrize("ns", ["4300000000", "1.2.3.4.5", "0x1.256.0.1"])
def test_an_ns_shaped_like_a_host_that_is_no_url_host_is_refused(ns: str) -> None:
    """Numbers a URL parser reads as an out-of-range IPv4 address: refused with the 400 of any bad ns, not a 500."""
    with pytest.raises(ValueError, match="invalid URL"):
        upstream_base(ns, DEFAULT, frozenset())


@pytest.mark.parametrize(
    ("header", "length", "span"),
    [
        (None, 10, None),
        ("bytes=0-", 10, (0, 9)),
        ("bytes=2-5", 10, (2, 5)),
        ("bytes=2-500", 10, (2, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-30", 10, (0, 9)),
        ("bytes=0-1,4-5", 10, None),  # several ranges: the whole blob
        ("items=0-1", 10, None),
        ("bytes=x-1", 10, None),
        ("bytes=5-2", 10, None),  # invalid, so ignored
        ("bytes=\u00b2-", 10, None),  # a digit to str.isdigit, not to int()
        ("bytes=-", 10, None),
    ],
)
def test_range_selects_an_inclusive_span(header: str | None, length: int, span: tuple[int, int] | None) -> None:
    assert parse_range(header, length) == span


@pytest.mark.parametrize(("header", "length"), [("bytes=10-", 10), ("bytes=-0", 10), ("bytes=0-", 0)])
def test_a_range_past_the_end_is_unsatisfiable(header: str, length: int) -> None:
    with pytest.raises(UnsatisfiableRange):
        parse_range(header, length)


@given(st.integers(1, 10_000), st.integers(0, 20_000), st.integers(0, 20_000))
def test_a_satisfiable_range_stays_inside_the_blob(length: int, first: int, last: int) -> None:
    try:
        span = parse_range(f"bytes={first}-{last}", length)
    except UnsatisfiableRange:
        assert first >= length
        return
    if span is None:
        assert last < first
        return
    assert 0 <= span[0] <= span[1] < length
    assert span[0] == first


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_registrys_yes_holds_for_its_credential_and_repository_until_it_lapses() -> None:
    clock = FakeClock()
    memory = AccessMemory(ttl=60.0, clock=clock)
    alice = memory.key("registry:5000", "team/app", "Basic YWxpY2U6cw==")
    memory.remember(alice)
    assert memory.allowed(alice)
    assert not memory.allowed(memory.key("registry:5000", "team/app", None))
    assert not memory.allowed(memory.key("registry:5000", "team/other", "Basic YWxpY2U6cw=="))
    assert not memory.allowed(memory.key("other:5000", "team/app", "Basic YWxpY2U6cw=="))
    assert "YWxpY2U6cw==" not in "".join(alice)  # only a hash of the credential is kept
    clock.now += 59.0
    assert memory.allowed(alice)
    clock.now += 1.0
    assert not memory.allowed(alice)


def test_the_oldest_yes_goes_first_past_the_limit() -> None:
    memory = AccessMemory(limit=2, clock=FakeClock())
    first, second, third = (memory.key("r", "repo", f"Bearer {n}") for n in range(3))
    for key in (first, second, third):
        memory.remember(key)
    assert not memory.allowed(first)
    assert memory.allowed(second) and memory.allowed(third)


def test_a_content_file_is_intact_only_in_the_state_it_was_checked_in(tmp_path: Path) -> None:
    path = tmp_path / "content"
    path.write_bytes(b"a" * 4096)
    intact = IntactFiles()
    content, state = open_content(path)
    content.close()
    assert state == file_state(path)
    assert not intact.intact("task", state)
    intact.remember("task", state)
    assert intact.intact("task", state)
    assert not intact.intact("other", state)
    with path.open("r+b") as f:  # one byte changes in place: same size, same inode
        f.write(b"b")
    assert not intact.intact("task", file_state(path))


def test_the_least_recently_served_intact_file_is_forgotten_first() -> None:
    intact = IntactFiles(limit=2)
    states = [(1, n, 10, 0, 0) for n in range(3)]
    intact.remember("a", states[0])
    intact.remember("b", states[1])
    assert intact.intact("a", states[0])  # served: now the most recent
    intact.remember("c", states[2])
    assert intact.intact("a", states[0]) and intact.intact("c", states[2])
    assert not intact.intact("b", states[1])
