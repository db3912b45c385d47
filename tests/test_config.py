"""The configuration loader: both shapes, defaults, and one-line errors."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from litefs import config
from litefs.config import ConfigError, DurationError, load, parse, parse_duration

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "litefs.yml"

VALID_FULL: dict[str, Any] = {
    "fuse": {"dir": "/srv/litefs/mnt"},
    "data": {"dir": "/srv/litefs/data"},
    "lease": {
        "type": "consul",
        "advertise-url": "http://node1:20202",
        "consul": {"url": "http://127.0.0.1:8500"},
    },
}

VALID_SEED: dict[str, Any] = {
    "mount-dir": "/srv/mnt",
    "consul": {"url": "http://127.0.0.1:8500", "advertise-url": "http://node1:20202"},
}

DELETE = object()


def edit(base: dict[str, Any], *changes: tuple[str, Any]) -> str:
    """Dump `base` as YAML after setting (or, with DELETE, removing) dotted keys."""
    doc = copy.deepcopy(base)
    for dotted, value in changes:
        *parents, last = dotted.split(".")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return yaml.safe_dump(doc, sort_keys=False)


def full(*changes: tuple[str, Any]) -> str:
    return edit(VALID_FULL, *changes)


def etcd(*changes: tuple[str, Any]) -> str:
    return full(
        ("lease.type", "etcd"),
        ("lease.consul", DELETE),
        ("lease.etcd.endpoints", ["http://10.0.0.1:2379", "https://10.0.0.2:2379"]),
        *changes,
    )


def seed(*changes: tuple[str, Any]) -> str:
    return edit(VALID_SEED, *changes)


BROKEN = [
    # The file itself.
    ("yaml-syntax", "fuse:\n  dir: /a\n bad: [\n", "line 3", "not valid YAML"),
    ("yaml-tab-indent", "fuse:\n\tdir: /a\n", "line 2", "not valid YAML"),
    ("empty-file", "# nothing here\n", None, "holds no settings"),
    ("top-level-list", "- fuse\n- data\n", None, "top level must be a mapping"),
    ("top-level-scalar", "just words\n", None, "top level must be a mapping"),
    ("duplicate-key", "fuse: {dir: /a}\nfuse: {dir: /b}\n", "line 2", "duplicate key 'fuse'"),
    ("env-unset", "fuse:\n  dir: /a\n  debug: ${LITEFS_TEST_UNSET}\n", "line 3", "is not set"),
    ("env-malformed", "fuse:\n  dir: ${1WRONG}\n", "line 2", "malformed variable reference"),
    ("env-unclosed", "fuse:\n  dir: ${HOME\n", "line 2", "malformed variable reference"),
    # Keys.
    ("unknown-top-close", full(("fuse_dir", "/a")), "fuse_dir", "did you mean fuse?"),
    (
        "unknown-nested-close",
        full(("fuse.allow_other", True)),
        "fuse.allow_other",
        "did you mean fuse.allow-other?",
    ),
    (
        "unknown-no-suggestion",
        full(("lease.colour", "blue")),
        "lease.colour",
        "expected one of: type, advertise-url",
    ),
    ("unknown-seed-key", seed(("consul.token", "x")), "consul.token", "unknown key"),
    ("unknown-suggests-seed", "mount_dir: /a\n", "mount_dir", "did you mean mount-dir?"),
    (
        "mixed-shapes",
        full(("consul", {"url": "http://c:8500"})),
        "consul",
        "cannot be mixed with 'fuse'",
    ),
    ("mixed-mount-dir", full(("mount-dir", "/a")), "mount-dir", "write fuse.dir"),
    (
        "backend-mismatch",
        full(("lease.etcd", {"endpoints": ["http://e:2379"]})),
        "lease.etcd",
        "only used with lease.type etcd",
    ),
    # Required values.
    ("seed-without-consul", "mount-dir: /srv/mnt\n", "consul", "full shape"),
    ("seed-without-mount-dir", seed(("mount-dir", DELETE)), "mount-dir", "is required"),
    ("seed-without-consul-url", seed(("consul.url", DELETE)), "consul.url", "is required"),
    (
        "seed-without-advertise",
        seed(("consul.advertise-url", DELETE)),
        "consul.advertise-url",
        "is required",
    ),
    ("missing-fuse-dir", full(("fuse", DELETE)), "fuse.dir", "is required"),
    ("missing-data-dir", full(("data.dir", DELETE)), "data.dir", "is required"),
    ("missing-lease-type", full(("lease.type", DELETE)), "lease.type", "is required"),
    (
        "static-without-advertise",
        full(("lease.type", "static"), ("lease.consul", DELETE), ("lease.advertise-url", DELETE)),
        "lease.advertise-url",
        "URL of the primary",
    ),
    (
        "consul-without-advertise",
        full(("lease.advertise-url", DELETE)),
        "lease.advertise-url",
        "is required",
    ),
    ("consul-without-url", full(("lease.consul.url", DELETE)), "lease.consul.url", "is required"),
    (
        "etcd-without-endpoints",
        etcd(("lease.etcd.endpoints", DELETE)),
        "lease.etcd.endpoints",
        "is required",
    ),
    ("empty-string", full(("fuse.dir", "  ")), "fuse.dir", "must not be empty"),
    # Types.
    ("dir-not-string", full(("fuse.dir", 5)), "fuse.dir", "must be a string, got 5"),
    (
        "bool-as-string",
        full(("fuse.allow-other", "yes")),
        "fuse.allow-other",
        "must be true or false, got 'yes'",
    ),
    ("candidate-not-bool", full(("lease.candidate", 1)), "lease.candidate", "true or false"),
    ("section-not-mapping", full(("fuse", "/srv/mnt")), "fuse", "must be a mapping"),
    (
        "duration-not-scalar",
        full(("data.retention", ["10s"])),
        "data.retention",
        "must be a duration",
    ),
    (
        "endpoints-as-string",
        etcd(("lease.etcd.endpoints", "http://e:2379")),
        "lease.etcd.endpoints",
        "not a single string",
    ),
    ("exec-mapping", full(("exec", {"cmd": "x"})), "exec", "command string or a list of commands"),
    ("exec-item-not-string", full(("exec", [{"cmd": "m"}, 3])), "exec[1]", "must be a mapping"),
    ("exec-argv-list", full(("exec", ["myapp", "-v"])), "exec[0]", "must be a mapping"),
    ("exec-entry-no-cmd", full(("exec", [{"if-candidate": True}])), "exec[0].cmd", "required"),
    (
        "exec-entry-typo",
        full(("exec", [{"cmd": "m", "if_candidate": True}])),
        "exec[0].if_candidate",
        "did you mean exec[0].if-candidate",
    ),
    (
        "exec-entry-flag",
        full(("exec", [{"cmd": "m", "if-candidate": "yes"}])),
        "exec[0].if-candidate",
        "true or false",
    ),
    ("exec-bad-quoting", full(("exec", "myapp 'unclosed")), "exec", "cannot be split"),
    ("exec-empty-list", full(("exec", [])), "exec", "empty list"),
    # Durations.
    ("duration-bare-number", full(("data.retention", 10)), "data.retention", "has no unit"),
    (
        "duration-negative",
        full(("data.retention", "-1m")),
        "data.retention",
        "must not be negative",
    ),
    (
        "duration-malformed",
        full(("data.retention", "10 sec")),
        "data.retention",
        "is not a duration",
    ),
    ("retention-zero", full(("data.retention", "0s")), "data.retention", "greater than zero"),
    (
        "monitor-interval-zero",
        full(("data.retention-monitor-interval", "0")),
        "data.retention-monitor-interval",
        "greater than zero",
    ),
    (
        "consul-ttl-too-short",
        full(("lease.consul.ttl", "5s")),
        "lease.consul.ttl",
        "must be at least 10s, got 5s",
    ),
    (
        "consul-ttl-too-long",
        full(("lease.consul.ttl", "25h")),
        "lease.consul.ttl",
        "must be at most 24h, got 25h",
    ),
    (
        "consul-lock-delay-too-long",
        full(("lease.consul.lock-delay", "61s")),
        "lease.consul.lock-delay",
        "must be at most 1m, got 61s",
    ),
    ("etcd-ttl-too-short", etcd(("lease.etcd.ttl", "1s")), "lease.etcd.ttl", "must be at least 2s"),
    (
        "etcd-ttl-fraction",
        etcd(("lease.etcd.ttl", "2500ms")),
        "lease.etcd.ttl",
        "whole number of seconds",
    ),
    ("seed-ttl-too-short", seed(("consul.ttl", "9s")), "consul.ttl", "at least 10s"),
    # Addresses and URLs.
    ("addr-port-zero", full(("http.addr", ":0")), "http.addr", "between 1 and 65535"),
    (
        "addr-port-too-big",
        full(("http.addr", "localhost:70000")),
        "http.addr",
        "between 1 and 65535",
    ),
    ("addr-port-not-number", full(("http.addr", ":http")), "http.addr", "between 1 and 65535"),
    ("addr-bare-port-number", full(("http.addr", 20202)), "http.addr", 'such as ":20202"'),
    ("addr-without-port", full(("http.addr", "localhost")), "http.addr", "host:port"),
    ("addr-bare-ipv6", full(("http.addr", "::1:20202")), "http.addr", "in brackets"),
    (
        "addr-bad-host",
        full(("http.addr", "my host:20202")),
        "http.addr",
        "not a host name or address",
    ),
    (
        "url-no-scheme",
        full(("lease.advertise-url", "node1:20202")),
        "lease.advertise-url",
        "http:// or https://",
    ),
    (
        "url-wrong-scheme",
        full(("lease.consul.url", "tcp://127.0.0.1:8500")),
        "lease.consul.url",
        "http:// or https://",
    ),
    (
        "url-no-host",
        full(("lease.advertise-url", "http://")),
        "lease.advertise-url",
        "must name a host",
    ),
    (
        "url-bad-port",
        full(("lease.advertise-url", "http://node1:99999")),
        "lease.advertise-url",
        "not a valid URL",
    ),
    (
        "url-query",
        full(("lease.advertise-url", "http://node1:20202/?x=1")),
        "lease.advertise-url",
        "query or fragment",
    ),
    (
        "etcd-endpoint-scheme",
        etcd(("lease.etcd.endpoints", ["http://e1:2379", "ftp://e2"])),
        "lease.etcd.endpoints[1]",
        "http:// or https://",
    ),
    (
        "etcd-endpoints-empty",
        etcd(("lease.etcd.endpoints", [])),
        "lease.etcd.endpoints",
        "at least one URL",
    ),
    # Enums and other impossible values.
    (
        "lease-type-typo",
        full(("lease.type", "consol")),
        "lease.type",
        "must be one of consul, static, etcd; got 'consol' (did you mean consul?)",
    ),
    ("log-format", full(("log.format", "xml")), "log.format", "must be one of text, json"),
    ("hostname-space", full(("lease.hostname", "node 1")), "lease.hostname", "spaces"),
    ("seed-root-mount", seed(("mount-dir", "/")), "mount-dir", "root directory"),
    # Directories.
    ("mount-is-data", full(("data.dir", "/srv/litefs/mnt")), "data.dir", "same directory"),
    (
        "mount-inside-data",
        full(("fuse.dir", "/srv/litefs/data/mnt")),
        "fuse.dir",
        "inside data.dir",
    ),
    (
        "data-inside-mount",
        full(("data.dir", "/srv/litefs/mnt/.data")),
        "data.dir",
        "inside fuse.dir",
    ),
    (
        "data-inside-mount-via-dotdot",
        full(("data.dir", "/srv/litefs/x/../mnt/d")),
        "data.dir",
        "inside fuse.dir",
    ),
    # The HTTP server's limits and secret.
    (
        "token-with-space",
        full(("http.auth-token", "two words")),
        "http.auth-token",
        "visible ASCII",
    ),
    ("token-not-string", full(("http.auth-token", 12345)), "http.auth-token", "must be a string"),
    (
        "max-connections-zero",
        full(("http.max-connections", 0)),
        "http.max-connections",
        "at least 1",
    ),
    (
        "max-streams-text",
        full(("http.max-streams", "many")),
        "http.max-streams",
        "must be a whole number",
    ),
    (
        "max-streams-over-connections",
        full(("http.max-connections", 10), ("http.max-streams", 20)),
        "http.max-streams",
        "must not exceed http.max-connections (10)",
    ),
    (
        "read-timeout-zero",
        full(("http.read-timeout", "0s")),
        "http.read-timeout",
        "greater than zero",
    ),
    ("idle-timeout-junk", full(("http.idle-timeout", "soon")), "http.idle-timeout", "duration"),
    ("seed-http-unknown", seed(("http.auth_token", "x")), "http.auth_token", "did you mean"),
]


@pytest.fixture(autouse=True)
def no_token_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.AUTH_TOKEN_ENV, raising=False)


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [pytest.param(text, key, fragment, id=name) for name, text, key, fragment in BROKEN],
)
def test_broken_configuration_is_one_line_naming_the_key(
    text: str, key: str | None, fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LITEFS_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError) as caught:
        parse(text, "litefs.yml")
    error = caught.value
    assert error.source == "litefs.yml"
    assert error.key == key
    assert fragment in error.reason
    message = str(error)
    assert "\n" not in message
    prefix = f"litefs.yml: {key}: " if key else "litefs.yml: "
    assert message == prefix + error.reason


def test_the_broken_table_is_large_and_ids_are_distinct() -> None:
    names = [name for name, *_ in BROKEN]
    assert len(names) == len(set(names)) >= 25
    assert len({text for _, text, *_ in BROKEN}) == len(BROKEN)


def test_unset_variable_error_names_it_and_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_URL", raising=False)
    with pytest.raises(ConfigError) as caught:
        parse("lease:\n  advertise-url: ${NODE_URL}\n", "/etc/litefs.yml")
    assert str(caught.value) == "/etc/litefs.yml: line 2: environment variable NODE_URL is not set"


def test_full_shape_defaults() -> None:
    cfg = parse(full(), "litefs.yml")
    assert cfg.source == "litefs.yml"
    assert cfg.fuse == config.FuseConfig(
        dir=Path("/srv/litefs/mnt").resolve(), allow_other=False, debug=False
    )
    assert cfg.data == config.DataConfig(
        dir=Path("/srv/litefs/data").resolve(), retention=600.0, retention_monitor_interval=60.0
    )
    assert cfg.http == config.HTTPConfig(addr=":20202", host="", port=20202)
    assert cfg.lease == config.LeaseConfig(
        type="consul",
        advertise_url="http://node1:20202",
        hostname=socket.gethostname(),
        candidate=True,
        consul=config.ConsulConfig(
            url="http://127.0.0.1:8500", key="litefs/primary", ttl=10.0, lock_delay=1.0
        ),
        etcd=None,
    )
    assert cfg.exec == ()
    assert cfg.log == config.LogConfig(format="text", debug=False)


def test_full_shape_every_setting() -> None:
    text = """
fuse:
  dir: /srv/mnt
  allow-other: true
  debug: true
data:
  dir: /srv/data
  retention: 1h30m
  retention-monitor-interval: 30s
http:
  addr: "[::1]:8080"
lease:
  type: etcd
  advertise-url: https://node2.internal:20202/
  hostname: node2
  candidate: false
  etcd:
    endpoints: [http://e1:2379, https://e2:2379]
    key: apps/db/primary
    ttl: 15s
exec:
  - cmd: myapp migrate
    if-candidate: true
  - cmd: myapp --port "80 80"
log:
  format: json
  debug: true
"""
    cfg = parse(text)
    assert cfg.source == "<string>"
    assert cfg.fuse == config.FuseConfig(Path("/srv/mnt").resolve(), True, True)
    assert cfg.data == config.DataConfig(Path("/srv/data").resolve(), 5400.0, 30.0)
    assert cfg.http == config.HTTPConfig(addr="[::1]:8080", host="::1", port=8080)
    assert cfg.lease == config.LeaseConfig(
        type="etcd",
        advertise_url="https://node2.internal:20202",
        hostname="node2",
        candidate=False,
        consul=None,
        etcd=config.EtcdConfig(
            endpoints=("http://e1:2379", "https://e2:2379"), key="apps/db/primary", ttl=15.0
        ),
    )
    assert cfg.exec == (
        config.ExecCommand(("myapp", "migrate"), if_candidate=True),
        config.ExecCommand(("myapp", "--port", "80 80"), if_candidate=False),
    )
    assert cfg.log == config.LogConfig(format="json", debug=True)


def test_static_lease_names_the_primary() -> None:
    cfg = parse(
        full(
            ("lease.type", "static"),
            ("lease.consul", DELETE),
            ("lease.hostname", "primary-1"),
            ("lease.advertise-url", "http://primary-1:20202"),
            ("lease.candidate", False),
        )
    )
    assert cfg.lease.type == "static"
    assert cfg.lease.hostname == "primary-1"
    assert cfg.lease.advertise_url == "http://primary-1:20202"
    assert cfg.lease.candidate is False
    assert cfg.lease.consul is None and cfg.lease.etcd is None


def test_etcd_defaults() -> None:
    lease = parse(etcd()).lease
    assert lease.etcd == config.EtcdConfig(
        endpoints=("http://10.0.0.1:2379", "https://10.0.0.2:2379"), key="litefs/primary", ttl=10.0
    )
    assert lease.consul is None


def test_exec_as_a_command_string() -> None:
    assert parse(full(("exec", "myapp -addr ':8080'"))).exec == (
        config.ExecCommand(("myapp", "-addr", ":8080")),
    )


def test_listen_address_with_host() -> None:
    assert parse(full(("http.addr", "0.0.0.0:20203"))).http == config.HTTPConfig(
        addr="0.0.0.0:20203", host="0.0.0.0", port=20203
    )


def test_http_limits_and_token_are_read() -> None:
    cfg = parse(
        full(
            ("http.auth-token", "tok-123"),
            ("http.read-timeout", "3s"),
            ("http.idle-timeout", "1m"),
            ("http.write-timeout", "500ms"),
            ("http.max-connections", 100),
            ("http.max-streams", 10),
        )
    )
    assert cfg.http == config.HTTPConfig(
        addr=":20202",
        host="",
        port=20202,
        auth_token="tok-123",
        read_timeout=3.0,
        idle_timeout=60.0,
        write_timeout=0.5,
        max_connections=100,
        max_streams=10,
    )


def test_http_defaults_need_no_token() -> None:
    http = parse(full()).http
    assert http.auth_token is None
    assert (http.max_connections, http.max_streams) == (1024, 64)
    assert (http.read_timeout, http.idle_timeout, http.write_timeout) == (10.0, 60.0, 30.0)


def test_token_comes_from_the_environment_when_the_file_sets_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(config.AUTH_TOKEN_ENV, "from-env")
    assert parse(full()).http.auth_token == "from-env"
    assert parse(full(("http.auth-token", "from-file"))).http.auth_token == "from-file"
    assert parse(seed()).http.auth_token == "from-env"


def test_token_from_the_environment_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.AUTH_TOKEN_ENV, "bad token")
    with pytest.raises(ConfigError, match="environment variable LITEFS_AUTH_TOKEN: must be"):
        parse(full())


def test_seed_shape_defaults() -> None:
    cfg = parse(seed(), "litefs.yml")
    assert cfg.fuse == config.FuseConfig(Path("/srv/mnt").resolve(), False, False)
    assert cfg.data.dir == Path("/srv/mnt").resolve().parent / ".mnt"
    assert cfg.data.retention == 600.0
    assert cfg.data.retention_monitor_interval == 60.0
    assert cfg.http == config.HTTPConfig(addr=":20202", host="", port=20202)
    assert cfg.lease == config.LeaseConfig(
        type="consul",
        advertise_url="http://node1:20202",
        hostname=socket.gethostname(),
        candidate=True,
        consul=config.ConsulConfig(
            url="http://127.0.0.1:8500", key="litefs/primary", ttl=10.0, lock_delay=1.0
        ),
        etcd=None,
    )
    assert cfg.exec == ()
    assert cfg.log == config.LogConfig(format="text", debug=False)


def test_seed_shape_every_setting() -> None:
    text = """
mount-dir: /path/to/mnt
debug: true
http:
  addr: ":30303"
consul:
  url: "http://consul:8500"
  advertise-url: "http://node1:30303"
  key: "litefs/app"
  ttl: 30s
  lock-delay: 5s
"""
    cfg = parse(text)
    assert cfg.fuse.dir == Path("/path/to/mnt").resolve()
    assert cfg.data.dir == Path("/path/to/mnt").resolve().parent / ".mnt"
    assert cfg.fuse.debug and cfg.log.debug
    assert cfg.http.port == 30303
    assert cfg.lease.consul == config.ConsulConfig("http://consul:8500", "litefs/app", 30.0, 5.0)
    assert cfg.lease.advertise_url == "http://node1:30303"


def test_seed_data_dir_is_the_dot_sibling_of_a_relative_mount_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse(seed(("mount-dir", "mnt")))
    assert cfg.fuse.dir == tmp_path.resolve() / "mnt"
    assert cfg.data.dir == tmp_path.resolve() / ".mnt"


def test_relative_paths_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "run").mkdir()
    config_file = tmp_path / "etc" / "litefs.yml"
    config_file.write_text(full(("fuse.dir", "mnt"), ("data.dir", "./data")))
    monkeypatch.chdir(tmp_path / "run")
    cfg = load(config_file)
    assert cfg.fuse.dir == (tmp_path / "run" / "mnt").resolve()
    assert cfg.data.dir == (tmp_path / "run" / "data").resolve()
    assert cfg.fuse.dir.is_absolute() and cfg.data.dir.is_absolute()


def test_env_expansion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE", "node7")
    monkeypatch.setenv("IS_PRIMARY", "false")
    monkeypatch.setenv("EMPTY", "")
    monkeypatch.delenv("LITEFS_TEST_UNSET", raising=False)
    text = """
# A comment may mention ${LITEFS_TEST_UNSET} without it being set.
fuse: {dir: /srv/mnt${EMPTY}}
data: {dir: /srv/data}
lease:
  type: consul
  hostname: ${NODE}
  advertise-url: "http://${NODE}:20202"
  candidate: ${IS_PRIMARY}
  consul: {url: "http://127.0.0.1:8500", key: "price$$/${NODE}"}
exec: "echo $$HOME $PATH"
"""
    cfg = parse(text)
    assert cfg.fuse.dir == Path("/srv/mnt").resolve()
    assert cfg.lease.hostname == "node7"
    assert cfg.lease.advertise_url == "http://node7:20202"
    assert cfg.lease.candidate is False
    assert cfg.lease.consul is not None
    assert cfg.lease.consul.key == "price$/node7"
    assert cfg.exec == (config.ExecCommand(("echo", "$HOME", "$PATH")),)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("10s", 10.0, id="seconds"),
        pytest.param("1m", 60.0, id="minutes"),
        pytest.param("500ms", 0.5, id="milliseconds"),
        pytest.param("1h30m", 5400.0, id="compound"),
        pytest.param("1.5s", 1.5, id="fraction"),
        pytest.param(".5s", 0.5, id="leading-dot"),
        pytest.param("2h45m30.5s", 9930.5, id="three-parts"),
        pytest.param("250us", 0.00025, id="microseconds"),
        pytest.param("250µs", 0.00025, id="micro-sign"),
        pytest.param("100ns", 1e-7, id="nanoseconds"),
        pytest.param("+3s", 3.0, id="plus-sign"),
        pytest.param("0", 0.0, id="bare-zero"),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "10", "1.5", "-5s", "s", "10 s", "10sec", "1d", "1h-30m", "ms5", "1.2.3s"]
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


def test_durations_are_float_seconds() -> None:
    cfg = parse(full(("data.retention", "1.5s"), ("lease.consul.lock-delay", "0")))
    assert cfg.data.retention == 1.5
    assert cfg.lease.consul is not None and cfg.lease.consul.lock_delay == 0.0


def test_load_prefers_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "etc" / "litefs.yml"
    system.parent.mkdir()
    system.write_text(full(("http.addr", ":1111")))
    monkeypatch.setattr(config, "SEARCH_PATH", ("litefs.yml", str(system)))
    work = tmp_path / "work"
    work.mkdir()
    (work / "litefs.yml").write_text(full(("http.addr", ":2222")))
    monkeypatch.chdir(work)
    cfg = load(None)
    assert cfg.http.port == 2222
    assert cfg.source == "litefs.yml"


def test_load_falls_back_to_the_system_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "etc" / "litefs.yml"
    system.parent.mkdir()
    system.write_text(full(("http.addr", ":1111")))
    monkeypatch.setattr(config, "SEARCH_PATH", ("litefs.yml", str(system)))
    monkeypatch.chdir(tmp_path)
    cfg = load(None)
    assert cfg.http.port == 1111
    assert cfg.source == str(system)


def test_load_without_any_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "etc" / "litefs.yml")
    monkeypatch.setattr(config, "SEARCH_PATH", ("litefs.yml", missing))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no configuration file found") as caught:
        load(None)
    assert missing in str(caught.value)
    assert "\n" not in str(caught.value)


def test_default_search_path() -> None:
    assert config.SEARCH_PATH == ("litefs.yml", "/etc/litefs.yml")


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yml"
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == f"{path}: file not found"


def test_load_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "litefs.yml"
    path.write_text(full())
    path.chmod(0)
    with pytest.raises(ConfigError, match="permission denied"):
        load(path)


def test_load_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "litefs.yml"
    path.write_bytes(b"fuse:\n  dir: /a\xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(str(path))


def test_load_reports_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "litefs.yml").write_text(full(("lease.consul.ttl", "5s")))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load("litefs.yml")
    assert str(caught.value) == "litefs.yml: lease.consul.ttl: must be at least 10s, got 5s"


def test_example_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITEFS_HOSTNAME", "node1")
    monkeypatch.setenv("LITEFS_CANDIDATE", "true")
    cfg = load(EXAMPLE)
    assert cfg.lease.hostname == "node1"
    assert cfg.lease.advertise_url == "http://node1:20202"
    assert cfg.lease.candidate is True
    # The README mounts /var/lib/litefs, and keeps data in its dot-sibling.
    assert cfg.fuse.dir == Path("/var/lib/litefs").resolve()
    assert cfg.data.dir == Path("/var/lib/.litefs").resolve()
    assert [command.if_candidate for command in cfg.exec] == [True, False]


def test_example_file_mentions_every_full_shape_setting() -> None:
    text = EXAMPLE.read_text()
    for key in (
        "allow-other:",
        "retention:",
        "retention-monitor-interval:",
        "addr:",
        "auth-token:",
        "read-timeout:",
        "idle-timeout:",
        "write-timeout:",
        "max-connections:",
        "max-streams:",
        "advertise-url:",
        "hostname:",
        "candidate:",
        "lock-delay:",
        "endpoints:",
        "ttl:",
        "exec:",
        "format:",
    ):
        assert key in text, key


def test_config_is_frozen() -> None:
    cfg = parse(full())
    with pytest.raises(AttributeError):
        cfg.http.port = 1  # type: ignore[misc]
