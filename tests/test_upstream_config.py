"""A ``dfdaemon.yaml`` written for upstream's Rust dfdaemon starts this daemon.

Keys upstream reads and this daemon does not act on are named in one warning line; keys neither knows are refused
with the closest known name; upstream's older key names are read as their current ones.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dfdaemon.config import ConfigError, parse_config
from dfdaemon.config_upstream import RENAMED_KEYS, UPSTREAM_KEYS
from tests.support import merge, run_module, running_daemon

# Every key of the Rust dfdaemon's configuration (dragonfly-client-config/src/dfdaemon.rs, client v1.5.1), each set
# to upstream's default or to the example value of its documentation, in upstream's own units.
UPSTREAM_EXAMPLE = """
host:
  idc: ""
  location: ""
  hostname: example-node
  ip: 10.0.0.7
  schedulerClusterID: 1
server:
  pluginDir: /var/lib/dragonfly/plugins/dfdaemon/
  cacheDir: /var/cache/dragonfly/dfdaemon/
  adaptiveRateLimit:
    bucketCount: 50
    bucketInterval: 200ms
    cpuThreshold: 80
    memoryThreshold: 80
    shedCooldown: 5s
    collectInterval: 3s
download:
  server:
    socketPath: /var/run/dragonfly/dfdaemon.sock
    requestRateLimit: 4000
    requestBufferSize: 1000
  protocol: tcp
  bandwidthLimit: 50GB
  backToSourceBandwidthLimit: 50GB
  pieceTimeout: 360s
  collectedPieceTimeout: 360s
  concurrentPieceCount: 16
upload:
  server:
    port: 4000
    ip: 0.0.0.0
    requestRateLimit: 4000
    requestBufferSize: 1000
    caCert: ""
    cert: ""
    key: ""
  client:
    caCert: ""
    cert: ""
    key: ""
  disableShared: false
  bandwidthLimit: 50GB
manager:
  addr: http://dragonfly-manager:65003
  caCert: ""
  cert: ""
  key: ""
scheduler:
  announceInterval: 5m
  scheduleTimeout: 3h
  maxScheduleCount: 5
  caCert: ""
  cert: ""
  key: ""
seedPeer:
  enable: false
  type: normal
dynconfig:
  refreshInterval: 1m
storage:
  server:
    ip: 0.0.0.0
    tcpPort: 4005
    tcpFastopen: false
    quicPort: 4006
  dir: /var/lib/dragonfly/
  keep: true
  writePieceTimeout: 360s
  writeBufferSize: 4194304
  readBufferSize: 4194304
  cacheCapacity: 64mib
backend:
  requestHeader:
    X-Example: example
  maxRetries: 1
  enableCacheTemporaryRedirect: true
  cacheTemporaryRedirectTTL: 600s
  putConcurrentChunkCount: 16
  putChunkSize: 8mib
  putTimeout: 900s
  enableHickoryDNS: false
gc:
  interval: 900s
  policy:
    taskTTL: 720h
    persistentTaskTTL: 24h
    persistentCacheTaskTTL: 24h
    pageCacheIdleTimeout: 1h
    diskThreshold: 10GiB
    diskHighThresholdPercent: 90
    diskLowThresholdPercent: 70
proxy:
  server:
    port: 4001
    ip: 0.0.0.0
    requestRateLimit: 4000
    caCert: ""
    caKey: ""
    basicAuth:
      username: ""
      password: ""
  rules:
    - regex: blobs/sha256.*
      useTLS: false
      filteredQueryParams: []
  registryMirror:
    addr: https://index.docker.io
    cert: ""
    enableTaskIDBasedBlobDigest: false
  disableBackToSource: false
  prefetch: false
  prefetchBandwidthLimit: 5GB
  readBufferSize: 4194304
security:
  enable: false
network:
  enableIPv6: false
health:
  server:
    ip: 0.0.0.0
    port: 4003
metrics:
  server:
    ip: 0.0.0.0
    port: 4002
stats:
  server:
    ip: 0.0.0.0
    port: 4004
tracing:
  protocol: grpc
  endpoint: ""
  path: /v1/traces
  headers:
    X-Tenant: example
"""


def _dotted(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in ("backend.requestHeader", "tracing.headers"):
            keys |= _dotted(value, f"{path}.")
        else:
            keys.add(path)
    return keys


def _example() -> dict[str, Any]:
    data = yaml.safe_load(UPSTREAM_EXAMPLE)
    assert isinstance(data, dict)
    return data


def test_the_example_covers_every_upstream_key() -> None:
    """The copy below is only a proof if it holds every key of the table, and nothing the table lacks."""
    assert _dotted(_example()) == set(UPSTREAM_KEYS)


def test_the_example_starts_the_daemon_with_one_warning_line(tmp_path: Path) -> None:
    # What any deployment of the example changes on a test machine: paths, loopback, free ports, no manager.
    node = tmp_path / "node"
    local = {
        "host": {"ip": "127.0.0.1"},
        "manager": {"addr": None},
        "download": {"server": {"socketPath": str(node / "dfdaemon.sock")}},
        "upload": {"server": {"ip": "127.0.0.1", "port": 0}},
        "storage": {"dir": str(node / "storage"), "server": {"ip": "127.0.0.1", "tcpPort": 0}},
        "metrics": {"server": {"ip": "127.0.0.1", "port": 0}},
        "proxy": {"server": {"ip": "127.0.0.1", "port": 0}},
        "tracing": {"protocol": ""},
    }
    with running_daemon(node, merge(_example(), local)) as daemon:
        log = daemon.log()
        assert daemon.socket_path.is_relative_to(tmp_path)  # never the machine's real /var/run or /var/lib
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, log
    assert "does not act on" in warnings[0]
    named = set(warnings[0].split("(ignored): ", 1)[1].split(", "))
    assert {"scheduler.caCert", "storage.cacheCapacity"} <= named
    acted_on = {"gc", "gc.policy.taskTTL", "download.pieceTimeout", "storage.dir", "manager", "dynconfig", "seedPeer"}
    acted_on |= {"download.bandwidthLimit", "download.backToSourceBandwidthLimit", "upload.bandwidthLimit"}
    acted_on |= {"proxy.prefetchBandwidthLimit"}
    assert acted_on.isdisjoint(named)


def test_the_example_values_are_read_in_upstreams_units() -> None:
    config = parse_config(_example())
    assert config.gc.policy.task_ttl == 720 * 3600
    assert config.gc.policy.disk_threshold == 10 * 1024**3
    assert config.download.piece_timeout == 360
    assert config.scheduler.schedule_timeout == 3 * 3600


def test_a_typo_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "dfdaemon.yaml"
    path.write_text(yaml.safe_dump(merge(_example(), {"gc": {"policy": {"diskHighTresholdPercent": 90}}})))
    result = run_module("dfdaemon.cli.daemon", "--config", str(path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert (
        "unknown key 'gc.policy.diskHighTresholdPercent'; did you mean 'gc.policy.diskHighThresholdPercent'?"
        in (lines[0])
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"seedPeer": {"enabel": True}}, "unknown key 'seedPeer.enabel'; did you mean 'seedPeer.enable'?"),
        ({"dynconfg": {}}, "unknown key 'dynconfg'; did you mean 'dynconfig'?"),
        ({"upload": {"bandwidthLimit": "fast"}}, "upload.bandwidthLimit: invalid size 'fast'"),
        ({"dynconfig": {"refreshInterval": "soon"}}, "dynconfig.refreshInterval: invalid duration 'soon'"),
        (
            {"gc": {"policy": {"distThreshold": "1GB", "diskThreshold": "2GB"}}},
            "gc.policy.distThreshold is upstream's older name for gc.policy.diskThreshold",
        ),
    ],
)
def test_bad_upstream_keys_are_one_line_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_renamed_disk_thresholds_are_acted_on() -> None:
    policy = {"distThreshold": "50GB", "distHighThresholdPercent": 70, "distLowThresholdPercent": 30}
    config = parse_config({"gc": {"policy": policy}})
    assert config.gc.policy.disk_threshold == 50_000_000_000
    assert (config.gc.policy.disk_high_threshold_percent, config.gc.policy.disk_low_threshold_percent) == (70, 30)
    assert config.warnings() == []


def test_rate_limits_before_1_2_8_are_ignored_as_upstream_ignores_them() -> None:
    """Client 1.2.8 renamed ``rateLimit`` to ``bandwidthLimit`` without an alias: the old keys limit nothing."""
    config = parse_config({"download": {"rateLimit": "10GiB"}, "upload": {"rateLimit": "1GiB"}})
    (line,) = config.warnings()
    assert re.search(r"\(ignored\): download\.rateLimit, upload\.rateLimit$", line)
    assert config.upload.bandwidth_limit == config.download.bandwidth_limit == 50_000_000_000
    assert set(RENAMED_KEYS.values()) <= set(UPSTREAM_KEYS)


def test_nulls_mean_upstreams_defaults() -> None:
    config = parse_config({"host": {"ip": None}, "upload": {"server": {"ip": None}}, "manager": None, "stats": None})
    assert config.host.ip == ""
    assert config.upload.server.ip == "0.0.0.0"
    assert config.manager.addr == ""  # no manager: scheduler.addrs or back to source
    assert config.warnings() == ["upstream dfdaemon keys this daemon does not act on (ignored): stats"]
