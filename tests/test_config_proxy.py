"""The `proxy:` section of the configuration file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_config import full

from litefs.config import ConfigError, HTTPConfig, ProxyConfig, load, parse

PROXY: dict[str, Any] = {"addr": ":8080", "target": "localhost:8081", "db": "app.db"}


def with_proxy(**changes: Any) -> str:
    return full(("proxy", {**PROXY, **changes}))


def test_no_proxy_section_means_no_proxy() -> None:
    assert parse(full()).proxy is None


def test_proxy_defaults() -> None:
    proxy = parse(with_proxy()).proxy
    assert proxy == ProxyConfig(
        listen=HTTPConfig(addr=":8080", host="", port=8080),
        target="http://localhost:8081",
        db="app.db",
        advertise_url="http://node1:8080",
        passthrough=(),
        always_forward=(),
        max_lag=10.0,
        primary_redirect_timeout=5.0,
        read_header_timeout=30.0,
        idle_timeout=60.0,
    )


def test_proxy_every_setting() -> None:
    proxy = parse(
        with_proxy(
            addr="127.0.0.1:8080",
            target="http://app.internal:3000",
            db="dir/app.db",
            **{
                "advertise-url": "http://10.0.0.1:8080/",
                "passthrough": ["/static/*", "*.png"],
                "always-forward": ["/login"],
                "max-lag": "2s",
                "primary-redirect-timeout": "500ms",
                "read-header-timeout": "1m",
                "idle-timeout": "90s",
            },
        )
    ).proxy
    assert proxy is not None
    assert proxy.listen.host == "127.0.0.1"
    assert proxy.target == "http://app.internal:3000"
    assert proxy.db == "dir/app.db"
    assert proxy.advertise_url == "http://10.0.0.1:8080"
    assert proxy.passthrough == ("/static/*", "*.png")
    assert proxy.always_forward == ("/login",)
    assert (proxy.max_lag, proxy.primary_redirect_timeout) == (2.0, 0.5)
    assert (proxy.read_header_timeout, proxy.idle_timeout) == (60.0, 90.0)


def test_a_proxy_bound_to_one_host_advertises_that_host() -> None:
    proxy = parse(with_proxy(addr="10.1.2.3:8080")).proxy
    assert proxy is not None and proxy.advertise_url == "http://10.1.2.3:8080"


@pytest.mark.parametrize(
    ("changes", "key", "fragment"),
    [
        ({"addr": None}, "proxy.addr", "is required"),
        ({"addr": ":20202"}, "proxy.addr", "same port as http.addr"),
        ({"addr": "8080"}, "proxy.addr", "host:port"),
        ({"target": None}, "proxy.target", "is required"),
        ({"target": "localhost"}, "proxy.target", "host:port"),
        ({"target": "ftp://x:1"}, "proxy.target", "http:// or https://"),
        ({"db": None}, "proxy.db", "is required"),
        ({"db": "/abs.db"}, "proxy.db", "database name"),
        ({"db": "a/../b.db"}, "proxy.db", "database name"),
        ({"passthrough": "/static/*"}, "proxy.passthrough", "not a single string"),
        ({"always-forward": [1]}, "proxy.always-forward[0]", "path pattern"),
        ({"max-lag": "0s"}, "proxy.max-lag", "greater than zero"),
        ({"primary-redirect-timeout": "5"}, "proxy.primary-redirect-timeout", "no unit"),
        ({"idle_timeout": "5s"}, "proxy.idle_timeout", "did you mean proxy.idle-timeout?"),
        ({"advertise-url": "node1:8080"}, "proxy.advertise-url", "http:// or https://"),
    ],
)
def test_broken_proxy_settings_are_one_line_naming_the_key(
    changes: dict[str, Any], key: str, fragment: str
) -> None:
    proxy = {k: v for k, v in {**PROXY, **changes}.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        parse(full(("proxy", proxy)), "litefs.yml")
    assert caught.value.key == key
    assert fragment in caught.value.reason
    assert "\n" not in str(caught.value)


def test_proxy_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(full(("proxy", ":8080")), "litefs.yml")
    assert caught.value.key == "proxy"


def test_the_proxy_example_configuration_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "proxy" / "litefs.yml"
    for name, value in {
        "ROOT": "/tmp/example",
        "NODE": "node2",
        "CANDIDATE": "false",
        "HTTP_PORT": "20202",
        "PROXY_PORT": "8082",
        "APP_PORT": "9002",
    }.items():
        monkeypatch.setenv(name, value)
    proxy = load(example).proxy
    assert proxy is not None
    assert proxy.advertise_url == "http://127.0.0.1:8082"
    assert proxy.target == "http://127.0.0.1:9002"
