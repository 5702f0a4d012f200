"""Cluster membership keys: manager.addr, dynconfig, host.schedulerClusterID, upload.bandwidthLimit."""

from __future__ import annotations

import pytest
from siphashc import siphash

from dfdaemon.cluster.addresses import manager_target
from dfdaemon.cluster.ring import node_hash
from dfdaemon.config import ConfigError, parse_config


def test_cluster_keys_parse_as_upstream_writes_them() -> None:
    config = parse_config(
        {
            "manager": {"addr": "http://manager:65003"},
            "dynconfig": {"refreshInterval": "5m"},
            "host": {"schedulerClusterID": 4, "idc": "a", "location": "cn|hz"},
            "upload": {"bandwidthLimit": "2GB"},
        }
    )
    assert config.manager.addr == "http://manager:65003"
    assert config.dynconfig.refresh_interval == 300
    assert config.host.scheduler_cluster_id == 4
    assert config.upload.bandwidth_limit == 2_000_000_000


def test_cluster_defaults() -> None:
    config = parse_config({})
    assert (config.manager.addr, config.dynconfig.refresh_interval) == ("", 60)
    assert (config.host.scheduler_cluster_id, config.upload.bandwidth_limit) == (0, 50_000_000_000)


@pytest.mark.parametrize(
    ("addr", "target"),
    [
        ("http://manager:65003", ("manager:65003", False)),
        ("https://10.0.0.9:65003/", ("10.0.0.9:65003", True)),
        ("http://[fd00::9]:65003", ("[fd00::9]:65003", False)),
        ("manager:65003", ("manager:65003", False)),
    ],
)
def test_manager_targets(addr: str, target: tuple[str, bool]) -> None:
    assert manager_target(addr) == target


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        ("ftp://manager:65003", "config: manager.addr: 'ftp://manager:65003' is not a manager address"),
        ("http://manager", "config: manager.addr: 'http://manager' names no port"),
        ("http://manager:x", "config: manager.addr: 'http://manager:x' has an invalid port"),
        ("http://manager:65003/api", "config: manager.addr: 'http://manager:65003/api' is not a manager address"),
    ],
)
def test_bad_manager_addr_is_one_line_naming_the_key(addr: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"manager": {"addr": addr}})
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("interval", ["0s", "-1s"])
def test_refresh_interval_must_be_positive(interval: str) -> None:
    with pytest.raises(ConfigError, match=r"^config: dynconfig\.refreshInterval: "):
        parse_config({"dynconfig": {"refreshInterval": interval}})


def test_a_named_static_scheduler_hashes_its_text() -> None:
    """Names occur only in static scheduler.addrs (the manager lists IPs); such a node hashes the address text."""
    assert node_hash("scheduler:8002") == siphash(bytes(16), b"scheduler:8002")
