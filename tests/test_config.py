"""Configuration: upstream's keys and defaults, our own keys, and one clear line for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dfdaemon.config import Config, ConfigError, load_config, parse_config
from dfdaemon.units import parse_duration, parse_size
from tests.support import daemon_config, run_module, running_daemon


def test_defaults_follow_upstream() -> None:
    config = Config()
    assert config.upload.server.port == 4000
    assert config.download.server.socket_path == "/var/run/dragonfly/dfdaemon.sock"
    assert config.storage.dir == "/var/lib/dragonfly"
    assert config.storage.keep is True
    assert config.gc.interval == 900
    assert config.gc.policy.disk_high_threshold_percent == 80
    assert config.gc.policy.disk_low_threshold_percent == 60
    assert config.gc.policy.disk_threshold == 0
    assert config.metrics.server.port == 4002
    assert config.scheduler.addrs == []
    assert config.proxy.enable is True
    assert (config.proxy.server.ip, config.proxy.server.port) == ("127.0.0.1", 4001)
    assert config.proxy.registry_mirror.addr == "https://index.docker.io"
    assert config.proxy.registry_mirror.enable_task_id_based_blob_digest is False  # blob task ids from the URL
    assert config.runtime.containerd.address == ""
    assert config.runtime.sync_interval == 60
    assert (config.storage.server.ip, config.storage.server.tcp_port) == ("", 4005)
    assert config.download.protocol == "tcp"


def test_vortex_keys() -> None:
    config = parse_config({"storage": {"server": {"ip": "::1", "tcpPort": 0}}, "download": {"protocol": "grpc"}})
    assert (config.storage.server.ip, config.storage.server.tcp_port) == ("::1", 0)
    assert config.download.protocol == "grpc"


def test_camel_case_keys_and_units() -> None:
    config = parse_config(
        {
            "download": {"server": {"socketPath": "/run/x.sock"}, "pieceTimeout": "2m", "concurrentPieceCount": 4},
            "upload": {"server": {"ip": "127.0.0.1", "port": 0}},
            "scheduler": {"addrs": ["127.0.0.1:8002", "10.0.0.1:8002"]},
            "gc": {
                "interval": "30s",
                "policy": {"taskTTL": "2h", "diskThreshold": "50MB", "gracePeriod": 45, "diskHighThresholdPercent": 90},
            },
        }
    )
    assert config.download.server.socket_path == "/run/x.sock"
    assert config.download.piece_timeout == 120
    assert config.download.concurrent_piece_count == 4
    assert config.upload.server.port == 0
    assert config.scheduler.addrs == ["127.0.0.1:8002", "10.0.0.1:8002"]
    assert config.gc.interval == 30
    assert config.gc.policy.task_ttl == 7200
    assert config.gc.policy.disk_threshold == 50_000_000
    assert config.gc.policy.grace_period == 45


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("2h", 7200),
        ("1h30m", 5400),
        ("250ms", 0.25),
        ("1d", 86400),
        ("12", 12),
        (7, 7),
        # Upstream's (humantime) spellings, as its documented dfdaemon.yaml uses them.
        ("300s", 300),
        ("720h", 2_592_000),
        ("5 minutes", 300),
        ("1h 30min", 5400),
        ("2days", 172_800),
        ("1w", 604_800),
        ("10msec", 0.01),
    ],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("50MB", 50_000_000),
        ("4MiB", 4 * 1024 * 1024),
        ("1GiB", 1024**3),
        ("1000", 1000),
        (123, 123),
        ("2 kb", 2000),
        # Upstream's (bytesize) spellings: any case, "Ki"-style short binary units.
        ("4mib", 4 * 1024 * 1024),
        ("50gb", 50_000_000_000),
        ("10Gi", 10 * 1024**3),
        ("1 PB", 1000**5),
    ],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "5 fortnights", "5mo", "m5", "-1", "1h-5m", "1h junk", True])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("bad", ["", "50XB", "MB", "-5", True, 1.5])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"upload": {"server": {"prot": 1}}}, "unknown key 'upload.server.prot'"),
        ({"gc": {"policy": {"taskTtl": "1h"}}}, "unknown key 'gc.policy.taskTtl'; did you mean 'gc.policy.taskTTL'?"),
        ({"upload": {"server": {"port": 70000}}}, "upload.server.port: Input should be less than or equal to 65535"),
        ({"upload": {"server": {"port": -1}}}, "upload.server.port: Input should be greater than or equal to 0"),
        ({"gc": {"interval": "soon"}}, "gc.interval: invalid duration 'soon'"),
        ({"gc": {"policy": {"diskThreshold": "lots"}}}, "gc.policy.diskThreshold: invalid size 'lots'"),
        (
            {"gc": {"policy": {"diskHighThresholdPercent": 50, "diskLowThresholdPercent": 70}}},
            "gc.policy: diskLowThresholdPercent must be lower than diskHighThresholdPercent",
        ),
        ({"scheduler": {"addrs": "127.0.0.1:8002"}}, "scheduler.addrs: Input should be a valid list"),
        ({"proxy": {"registryMirror": {"addr": "index.docker.io"}}}, "proxy.registryMirror: addr: 'index.docker.io'"),
        ({"proxy": {"rulez": []}}, "unknown key 'proxy.rulez'; did you mean 'proxy.rules'?"),
        ({"runtime": {"syncInterval": "0s"}}, "runtime.syncInterval: Input should be greater than 0"),
        ({"runtime": {"pinnedImages": "pause:3.9"}}, "runtime.pinnedImages: Input should be a valid list"),
        (["not", "a", "mapping"], "the top level must be a mapping"),
        ({"storage": {"server": {"ip": "localhost"}}}, "storage.server.ip: 'localhost' is not an IP address"),
        ({"storage": {"server": {"tcpPort": 65536}}}, "storage.server.tcpPort: Input should be less than or equal"),
        ({"download": {"protocol": "quic"}}, "download.protocol: Input should be 'tcp' or 'grpc'"),
        (
            {"proxy": {"server": {"basicAuth": {"username": "puller"}}}},
            "proxy.server.basicAuth: username and password must be given together",
        ),
        (
            {"proxy": {"server": {"basicAuth": {"username": "a:b", "password": "c"}}}},
            "proxy.server.basicAuth: a Basic username cannot contain ':'",
        ),
    ],
)
def test_invalid_config_names_the_key(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "dfdaemon.yaml")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upload:\n  server: [\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_config(path)


def _run_with_config(tmp_path: Path, data: object) -> tuple[int, str]:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run_module("dfdaemon.cli.daemon", "--config", str(path))
    return result.returncode, result.stderr


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"upload": {"server": {"portt": 4000}}}, "unknown key 'upload.server.portt'"),
        ({"upload": {"server": {"port": 99999}}}, "upload.server.port"),
    ],
)
def test_daemon_rejects_bad_config_with_one_line(tmp_path: Path, extra: dict[str, object], expected: str) -> None:
    code, stderr = _run_with_config(tmp_path, daemon_config(tmp_path, extra))
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert expected in lines[0]
    assert lines[0].startswith("dfdaemon: ")


def test_daemon_rejects_unwritable_storage_dir(tmp_path: Path) -> None:
    # Root may write anywhere, so make the directory impossible instead: its parent is a regular file.
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, stderr = _run_with_config(tmp_path, daemon_config(tmp_path, {"storage": {"dir": str(blocker / "storage")}}))
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "storage.dir" in lines[0]
    assert "not writable" in lines[0]


def test_daemon_rejects_missing_config_file(tmp_path: Path) -> None:
    result = run_module("dfdaemon.cli.daemon", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"dfdaemon: cannot read config '{tmp_path / 'absent.yaml'}': No such file or directory"
    ]


def test_daemon_refuses_a_busy_port(tmp_path: Path) -> None:
    with running_daemon(tmp_path / "a") as first:
        code, stderr = _run_with_config(
            tmp_path, daemon_config(tmp_path / "b", {"upload": {"server": {"port": first.upload_port}}})
        )
    assert code != 0
    assert "upload.server: cannot listen on 127.0.0.1:" in stderr
    assert "Traceback" not in stderr


def test_daemon_refuses_a_busy_proxy_port(tmp_path: Path) -> None:
    with running_daemon(tmp_path / "a", {"proxy": {"enable": True}}) as first:
        assert first.proxy_port is not None
        busy = {"proxy": {"enable": True, "server": {"port": first.proxy_port}}}
        code, stderr = _run_with_config(tmp_path, daemon_config(tmp_path / "b", busy))
    assert code == 1
    assert stderr.strip().splitlines()[-1] == (
        f"dfdaemon: proxy.server: cannot listen on 127.0.0.1:{first.proxy_port}: Address already in use"
    )
    assert "Traceback" not in stderr


def test_daemon_refuses_a_socket_in_use(tmp_path: Path) -> None:
    with running_daemon(tmp_path / "a") as first:
        code, stderr = _run_with_config(
            tmp_path, daemon_config(tmp_path / "b", {"download": {"server": {"socketPath": str(first.socket_path)}}})
        )
        assert first.proc.poll() is None
    assert code != 0
    assert "is in use by another process" in stderr
    assert "Traceback" not in stderr


def test_daemon_refuses_a_busy_vortex_port(tmp_path: Path) -> None:
    with running_daemon(tmp_path / "a") as first:
        assert first.vortex_port is not None
        busy = {"storage": {"server": {"tcpPort": first.vortex_port}}}
        code, stderr = _run_with_config(tmp_path, daemon_config(tmp_path / "b", busy))
    assert code == 1
    assert stderr.strip().splitlines()[-1] == (
        f"dfdaemon: storage.server: cannot listen on 127.0.0.1:{first.vortex_port}: Address already in use"
    )
    assert "Traceback" not in stderr


def test_basic_auth_is_on_only_with_credentials() -> None:
    """Both empty, as upstream's documented example has them, is no authentication."""
    assert parse_config({}, "c.yaml").proxy.server.basic_auth is None
    empty = parse_config({"proxy": {"server": {"basicAuth": {"username": "", "password": ""}}}}, "c.yaml")
    assert empty.proxy.server.basic_auth is not None and not empty.proxy.server.basic_auth.enabled
    given = parse_config({"proxy": {"server": {"basicAuth": {"username": "u", "password": "p"}}}}, "c.yaml")
    assert given.proxy.server.basic_auth is not None and given.proxy.server.basic_auth.enabled
