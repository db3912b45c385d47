"""The configuration file, checked in full before anything is mounted.

Two shapes are accepted. The seed shape of LiteFS 0.1 (`mount-dir`, `consul`)
keeps existing deployments running unchanged; the full shape (`fuse`, `data`,
`lease`, ...) is the one to write today. Both become the same `Config`, so
nothing past this module knows which one a file used.

Every mistake is a `ConfigError` whose text is one line naming the file, the
dotted key and what is wrong: the daemon prints it as it is and exits with
status 2, and an operator reading a log should not need a traceback to fix a
typo.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import shlex
import socket
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DEFAULT_HTTP_ADDR = ":20202"
DEFAULT_LEASE_KEY = "litefs/primary"
DEFAULT_RETENTION = 600.0
DEFAULT_RETENTION_MONITOR_INTERVAL = 60.0
DEFAULT_CONSUL_TTL = 10.0
DEFAULT_CONSUL_LOCK_DELAY = 1.0
DEFAULT_ETCD_TTL = 10.0
DEFAULT_PROXY_MAX_LAG = 10.0
DEFAULT_PROXY_PRIMARY_REDIRECT_TIMEOUT = 5.0
DEFAULT_PROXY_READ_HEADER_TIMEOUT = 30.0
DEFAULT_PROXY_IDLE_TIMEOUT = 60.0
DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_WRITE_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_STREAMS = 64
AUTH_TOKEN_ENV = "LITEFS_AUTH_TOKEN"
"""Where the shared secret comes from when `http.auth-token` is not set."""

CONSUL_MIN_TTL = 10.0
CONSUL_MAX_TTL = 24 * 3600.0
CONSUL_MAX_LOCK_DELAY = 60.0
ETCD_MIN_TTL = 2.0

LEASE_TYPES = ("consul", "static", "etcd")
LOG_FORMATS = ("text", "json")

SEARCH_PATH: tuple[str, ...] = ("litefs.yml", "/etc/litefs.yml")
"""Where `load(None)` looks, in order."""

_SEED_KEYS = ("mount-dir", "debug", "http", "consul")
_FULL_KEYS = ("fuse", "data", "http", "lease", "exec", "log", "proxy")
_SEED_SPELLING = {
    "mount-dir": "fuse.dir (and data.dir)",
    "debug": "fuse.debug and log.debug",
    "consul": "lease.type: consul with lease.consul and lease.advertise-url",
}


class ConfigError(Exception):
    """The configuration cannot be used; `str()` is the one line to show the user."""

    def __init__(self, source: str, key: str | None, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        text = ": ".join(part for part in (source, key, reason) if part)
        super().__init__(" ".join(text.splitlines()))


class DurationError(ValueError):
    """A string is not a Go-style duration such as `10s` or `1h30m`."""


@dataclass(frozen=True, slots=True)
class FuseConfig:
    dir: Path
    allow_other: bool
    debug: bool


@dataclass(frozen=True, slots=True)
class DataConfig:
    dir: Path
    retention: float
    retention_monitor_interval: float


@dataclass(frozen=True, slots=True)
class HTTPConfig:
    addr: str
    host: str
    """Empty means every interface; an IPv6 address is given without brackets."""
    port: int
    auth_token: str | None = None
    """When set, /stream and /handoff require it as a bearer token."""
    read_timeout: float = DEFAULT_READ_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    """Seconds a stream may stay unable to send before its replica is dropped."""
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_streams: int = DEFAULT_MAX_STREAMS


_HTTP_KEYS = (
    "addr",
    "auth-token",
    "read-timeout",
    "idle-timeout",
    "write-timeout",
    "max-connections",
    "max-streams",
)
_TOKEN = re.compile("[!-~]+")
"""Visible ASCII: a token travels in an HTTP header."""


@dataclass(frozen=True, slots=True)
class ConsulConfig:
    url: str
    key: str
    ttl: float
    lock_delay: float


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    endpoints: tuple[str, ...]
    key: str
    ttl: float


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    type: str
    advertise_url: str | None
    """Always set once validated: every lease type needs it."""
    hostname: str
    candidate: bool
    consul: ConsulConfig | None
    etcd: EtcdConfig | None


@dataclass(frozen=True, slots=True)
class ExecCommand:
    """One command of `exec`: its argument vector (split as a shell would,
    without running one) and whether it runs only where a primary may be."""

    argv: tuple[str, ...]
    if_candidate: bool = False


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str
    debug: bool


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The HTTP proxy in front of the application (docs/proxy.md)."""

    listen: HTTPConfig
    target: str
    """The application's base URL on this node, such as http://127.0.0.1:8081."""
    db: str
    advertise_url: str
    """How the other nodes' proxies reach this one, to forward writes to it."""
    passthrough: tuple[str, ...]
    always_forward: tuple[str, ...]
    max_lag: float
    primary_redirect_timeout: float
    read_header_timeout: float
    idle_timeout: float


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    fuse: FuseConfig
    data: DataConfig
    http: HTTPConfig
    lease: LeaseConfig
    exec: tuple[ExecCommand, ...]
    """Commands run in order once the node is ready; the last is the
    application. Empty when there is nothing to run."""
    log: LogConfig
    proxy: ProxyConfig | None = None


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a configuration file.

    Without a path the daemon behaves like most Unix services: a file in the
    working directory wins over the system-wide one.
    """
    if path is None:
        for candidate in SEARCH_PATH:
            if os.path.exists(candidate):
                path = candidate
                break
        else:
            looked = " and ".join(SEARCH_PATH)
            raise ConfigError(
                SEARCH_PATH[0], None, f"no configuration file found (looked for {looked})"
            )
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except FileNotFoundError:
        raise ConfigError(source, None, "file not found") from None
    except IsADirectoryError:
        raise ConfigError(source, None, "is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(source, None, "cannot read the file: permission denied") from None
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read the file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            source, None, f"not UTF-8 text (bad byte at offset {exc.start})"
        ) from None
    return parse(text, source)


def parse(text: str, source: str = "<string>") -> Config:
    """Validate configuration text; `source` names it in error messages."""
    document = _parse_yaml(_expand_env(text, source), source)
    if document is None:
        raise ConfigError(source, None, "the file holds no settings")
    if not isinstance(document, dict):
        raise ConfigError(
            source, None, f"the top level must be a mapping of settings, got {_describe(document)}"
        )
    seed_keys = [key for key in document if key in _SEED_SPELLING]
    full_keys = [key for key in document if key in _FULL_KEYS and key != "http"]
    if seed_keys and full_keys:
        key = seed_keys[0]
        raise ConfigError(
            source,
            key,
            f"belongs to the seed (0.1) shape and cannot be mixed with {full_keys[0]!r}; "
            f"write {_SEED_SPELLING[key]} instead",
        )
    if seed_keys:
        return _seed_shape(_Section(source, "", document, _SEED_KEYS))
    suggest = _FULL_KEYS if full_keys else _FULL_KEYS + tuple(_SEED_SPELLING)
    return _full_shape(_Section(source, "", document, _FULL_KEYS, suggest))


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration, the notation LiteFS users already write.

    A bare number is refused because its unit would be a guess; `0` is the
    exception, as in Go, since zero needs no unit.
    """
    if text in ("0", "+0"):
        return 0.0
    match = _DURATION.fullmatch(text)
    if match is None:
        if _NUMBER.fullmatch(text):
            raise DurationError(f"{text!r} has no unit; write it as {text}s, {text}ms, ...")
        raise DurationError(f"{text!r} is not a duration such as 10s, 500ms or 1h30m")
    if match.group(1) == "-":
        raise DurationError(f"must not be negative, got {text}")
    return sum(
        float(number) * _DURATION_UNITS[unit]
        for number, unit in _DURATION_PART.findall(match.group(2))
    )


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_UNIT = "(?:ns|us|µs|μs|ms|s|m|h)"
_DECIMAL = r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)"
_DURATION = re.compile(rf"([+-]?)((?:{_DECIMAL}{_UNIT})+)")
_DURATION_PART = re.compile(rf"({_DECIMAL})({_UNIT})")
_NUMBER = re.compile(rf"[+-]?{_DECIMAL}")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")
_ENV_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{[^}\n]*\}?")


def _expand_env(text: str, source: str) -> str:
    """Expand `${VAR}` before YAML sees the text, so a variable can supply any
    value, booleans and lists included. Comment lines are left alone: a
    documented `${VAR}` in a comment must not make the file unusable."""
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if "$" not in line or line.lstrip().startswith("#"):
            continue
        where = f"line {index + 1}"

        def replace(match: re.Match[str], where: str = where) -> str:
            if match.group(0) == "$$":
                return "$"
            name = match.group(1)
            if name is None:
                raise ConfigError(
                    source,
                    where,
                    f"malformed variable reference {match.group(0)!r}; "
                    "write ${NAME}, or $$ for a literal $",
                )
            try:
                return os.environ[name]
            except KeyError:
                raise ConfigError(
                    source, where, f"environment variable {name} is not set"
                ) from None

        lines[index] = _ENV_REFERENCE.sub(replace, line)
    return "\n".join(lines)


class _Loader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys, which plain YAML lets the
    last one win silently: a setting written twice is almost always a
    mistake whose effect the user did not see."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            ident = (key_node.tag, key_node.value)
            if ident in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(ident)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, source: str) -> object:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "malformed document"
        if mark is None:
            raise ConfigError(source, None, f"not valid YAML: {problem}") from None
        raise ConfigError(
            source, f"line {mark.line + 1}", f"not valid YAML: {problem} (column {mark.column + 1})"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, None, f"not valid YAML: {exc}") from None


def _describe(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 60 else text[:56] + "...'"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _closest(word: str, choices: Sequence[str]) -> str | None:
    normal = word.lower().replace("_", "-")
    for choice in choices:
        if choice == normal:
            return choice
    close = difflib.get_close_matches(normal, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


class _Section:
    """One mapping of the document, named by its dotted path in errors.

    Unknown keys are refused on construction, before any value is read, so a
    misspelt key is reported as such rather than as the missing setting it
    was meant to be.
    """

    def __init__(
        self,
        source: str,
        path: str,
        raw: object,
        known: Sequence[str],
        suggest: Sequence[str] | None = None,
    ) -> None:
        self.source = source
        self.path = path
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(source, path, f"must be a mapping of settings, got {_describe(raw)}")
        self._raw: dict[object, object] = raw
        for key in raw:
            if key in known:
                continue
            name = str(key)
            hint = _closest(name, suggest or known) if isinstance(key, str) else None
            if hint is not None:
                reason = f"unknown key; did you mean {self.key(hint)}?"
            else:
                reason = f"unknown key; expected one of: {', '.join(known)}"
            raise self.error(name, reason)

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), reason)

    def value(self, name: str) -> object:
        """The raw value; an explicit null counts as not set."""
        return self._raw.get(name)

    def section(self, name: str, known: Sequence[str]) -> _Section:
        return _Section(self.source, self.key(name), self.value(name), known)

    def string(self, name: str) -> str | None:
        value = self.value(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {_describe(value)}")
        if not value.strip():
            raise self.error(name, "must not be empty")
        return value

    def required(self, name: str, value: str | None, why: str = "") -> str:
        if value is None:
            raise self.error(name, f"is required{why}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.value(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {_describe(value)}")
        return value

    def choice(self, name: str, choices: Sequence[str], default: str | None) -> str | None:
        value = self.value(name)
        if value is None:
            return default
        if isinstance(value, str) and value in choices:
            return value
        reason = f"must be one of {', '.join(choices)}; got {_describe(value)}"
        hint = _closest(value, choices) if isinstance(value, str) else None
        if hint is not None:
            reason += f" (did you mean {hint}?)"
        raise self.error(name, reason)

    def duration(
        self,
        name: str,
        default: float,
        *,
        minimum: float = 0.0,
        maximum: float | None = None,
        positive: bool = False,
        whole_seconds: bool = False,
    ) -> float:
        value = self.value(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise self.error(name, f"must be a duration such as 10s, got {_describe(value)}")
        text = str(value)
        try:
            seconds = parse_duration(text)
        except DurationError as exc:
            raise self.error(name, str(exc)) from None
        if positive and seconds <= 0:
            raise self.error(name, f"must be greater than zero, got {text}")
        if seconds < minimum:
            raise self.error(name, f"must be at least {_format_seconds(minimum)}, got {text}")
        if maximum is not None and seconds > maximum:
            raise self.error(name, f"must be at most {_format_seconds(maximum)}, got {text}")
        if whole_seconds and seconds != int(seconds):
            raise self.error(name, f"must be a whole number of seconds, got {text}")
        return seconds

    def count(self, name: str, default: int, *, minimum: int = 1) -> int:
        value = self.value(name)
        if value is None:
            return default
        if type(value) is not int:
            raise self.error(name, f"must be a whole number, got {_describe(value)}")
        if value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value}")
        return value

    def path_value(self, name: str, why: str = "") -> Path:
        text = self.required(name, self.string(name), why)
        if "\0" in text:
            raise self.error(name, "must not contain a NUL character")
        return Path(text).resolve()

    def url(self, name: str) -> str | None:
        text = self.string(name)
        return None if text is None else self.check_url(name, text)

    def check_url(self, name: str, text: str) -> str:
        if any(char.isspace() for char in text):
            raise self.error(name, f"must not contain spaces, got {_describe(text)}")
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise self.error(name, f"is not a valid URL ({exc}): {_describe(text)}") from None
        if parts.scheme not in ("http", "https"):
            raise self.error(name, f"must be an http:// or https:// URL, got {_describe(text)}")
        if not parts.hostname:
            raise self.error(name, f"must name a host, got {_describe(text)}")
        if port == 0:
            raise self.error(name, f"port must be between 1 and 65535, got {_describe(text)}")
        if parts.query or parts.fragment:
            raise self.error(name, f"must not have a query or fragment, got {_describe(text)}")
        return text.rstrip("/")

    def listen_address(self, name: str, default: str) -> tuple[str, str, int]:
        if type(self.value(name)) is int:
            raise self.error(
                name, f'must be host:port or :port, such as ":{self.value(name)}"; got a number'
            )
        addr = self.string(name) or default
        host, colon, port_text = addr.rpartition(":")
        if not colon:
            raise self.error(name, f"must be host:port or :port, got {_describe(addr)}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise self.error(name, f"{host!r} is not an IPv6 address") from None
        elif ":" in host:
            raise self.error(
                name, f"an IPv6 host must be in brackets, as in [::1]:20202; got {addr}"
            )
        elif host and not _HOSTNAME.fullmatch(host):
            raise self.error(name, f"{host!r} is not a host name or address")
        if not re.fullmatch("[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
            raise self.error(name, f"port must be between 1 and 65535, got {_describe(addr)}")
        return addr, host, int(port_text)


def _http(section: _Section) -> HTTPConfig:
    addr, host, port = section.listen_address("addr", DEFAULT_HTTP_ADDR)
    max_connections = section.count("max-connections", DEFAULT_MAX_CONNECTIONS)
    max_streams = section.count("max-streams", min(DEFAULT_MAX_STREAMS, max_connections))
    if max_streams > max_connections:
        raise section.error(
            "max-streams",
            f"must not exceed http.max-connections ({max_connections}), got {max_streams}",
        )
    return HTTPConfig(
        addr=addr,
        host=host,
        port=port,
        auth_token=_auth_token(section),
        read_timeout=section.duration("read-timeout", DEFAULT_READ_TIMEOUT, positive=True),
        idle_timeout=section.duration("idle-timeout", DEFAULT_IDLE_TIMEOUT, positive=True),
        write_timeout=section.duration("write-timeout", DEFAULT_WRITE_TIMEOUT, positive=True),
        max_connections=max_connections,
        max_streams=max_streams,
    )


def _auth_token(section: _Section) -> str | None:
    """`http.auth-token`, else the environment variable, else none."""
    token = section.string("auth-token")
    where = section.key("auth-token")
    if token is None:
        token = os.environ.get(AUTH_TOKEN_ENV) or None
        where = f"environment variable {AUTH_TOKEN_ENV}"
    if token is not None and not _TOKEN.fullmatch(token):
        raise ConfigError(
            section.source,
            where,
            "must be visible ASCII characters only (no spaces or control characters)",
        )
    return token


def _format_seconds(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def _consul(section: _Section) -> ConsulConfig:
    url = section.required("url", section.url("url"), ": the address of the Consul agent")
    return ConsulConfig(
        url=url,
        key=section.string("key") or DEFAULT_LEASE_KEY,
        ttl=section.duration(
            "ttl", DEFAULT_CONSUL_TTL, minimum=CONSUL_MIN_TTL, maximum=CONSUL_MAX_TTL
        ),
        lock_delay=section.duration(
            "lock-delay", DEFAULT_CONSUL_LOCK_DELAY, maximum=CONSUL_MAX_LOCK_DELAY
        ),
    )


def _etcd(section: _Section) -> EtcdConfig:
    raw = section.value("endpoints")
    if raw is None:
        raise section.error("endpoints", "is required: the URLs of the etcd cluster")
    if isinstance(raw, str):
        raise section.error("endpoints", "must be a list of URLs, not a single string")
    if not isinstance(raw, list):
        raise section.error("endpoints", f"must be a list of URLs, got {_describe(raw)}")
    if not raw:
        raise section.error("endpoints", "must list at least one URL")
    endpoints = []
    for index, item in enumerate(raw):
        name = f"endpoints[{index}]"
        if not isinstance(item, str):
            raise section.error(name, f"must be a URL string, got {_describe(item)}")
        endpoints.append(section.check_url(name, item))
    return EtcdConfig(
        endpoints=tuple(endpoints),
        key=section.string("key") or DEFAULT_LEASE_KEY,
        ttl=section.duration("ttl", DEFAULT_ETCD_TTL, minimum=ETCD_MIN_TTL, whole_seconds=True),
    )


def _hostname(section: _Section) -> str:
    hostname = section.string("hostname")
    if hostname is None:
        return socket.gethostname()
    if any(char.isspace() for char in hostname):
        raise section.error("hostname", f"must not contain spaces, got {_describe(hostname)}")
    return hostname


def _exec(top: _Section) -> tuple[ExecCommand, ...]:
    raw = top.value("exec")
    if raw is None:
        return ()
    if isinstance(raw, str):
        return (ExecCommand(_command_line(top, "exec", raw)),)
    if not isinstance(raw, list):
        raise top.error(
            "exec", f"must be a command string or a list of commands, got {_describe(raw)}"
        )
    if not raw:
        raise top.error("exec", "must not be an empty list")
    return tuple(_exec_entry(top, f"exec[{index}]", item) for index, item in enumerate(raw))


def _exec_entry(top: _Section, key: str, item: object) -> ExecCommand:
    if not isinstance(item, dict):
        raise top.error(
            key,
            f'must be a mapping such as {{cmd: "myapp -addr :8080", if-candidate: false}}, '
            f"got {_describe(item)}",
        )
    entry = _Section(top.source, key, item, ("cmd", "if-candidate"))
    text = entry.required("cmd", entry.string("cmd"), ": the command line to run")
    return ExecCommand(_command_line(top, f"{key}.cmd", text), entry.boolean("if-candidate", False))


def _command_line(top: _Section, key: str, text: str) -> tuple[str, ...]:
    if not text.strip():
        raise top.error(key, "must not be empty")
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        raise top.error(key, f"cannot be split into arguments: {exc}") from None
    return argv


def _full_shape(top: _Section) -> Config:
    fuse = top.section("fuse", ("dir", "allow-other", "debug"))
    data = top.section("data", ("dir", "retention", "retention-monitor-interval"))
    http = top.section("http", _HTTP_KEYS)
    lease = top.section(
        "lease", ("type", "advertise-url", "hostname", "candidate", "consul", "etcd")
    )
    log = top.section("log", ("format", "debug"))

    fuse_config = FuseConfig(
        dir=fuse.path_value("dir", ": the directory to mount the filesystem on"),
        allow_other=fuse.boolean("allow-other", False),
        debug=fuse.boolean("debug", False),
    )
    data_config = DataConfig(
        dir=data.path_value("dir", ": the directory that holds the real files"),
        retention=data.duration("retention", DEFAULT_RETENTION, positive=True),
        retention_monitor_interval=data.duration(
            "retention-monitor-interval", DEFAULT_RETENTION_MONITOR_INTERVAL, positive=True
        ),
    )
    _check_dirs(top.source, fuse_config.dir, data_config.dir)
    http_config = _http(http)

    lease_type = lease.required(
        "type", lease.choice("type", LEASE_TYPES, None), f": one of {', '.join(LEASE_TYPES)}"
    )
    for backend in ("consul", "etcd"):
        if backend != lease_type and lease.value(backend) is not None:
            raise lease.error(
                backend, f"is only used with lease.type {backend}, but the type is {lease_type}"
            )
    why = (
        ": the URL of the primary node"
        if lease_type == "static"
        else ": the URL other nodes use to reach this node"
    )
    advertise_url = lease.required("advertise-url", lease.url("advertise-url"), why)
    lease_config = LeaseConfig(
        type=lease_type,
        advertise_url=advertise_url,
        hostname=_hostname(lease),
        candidate=lease.boolean("candidate", True),
        consul=_consul(lease.section("consul", ("url", "key", "ttl", "lock-delay")))
        if lease_type == "consul"
        else None,
        etcd=_etcd(lease.section("etcd", ("endpoints", "key", "ttl")))
        if lease_type == "etcd"
        else None,
    )
    return Config(
        source=top.source,
        fuse=fuse_config,
        data=data_config,
        http=http_config,
        lease=lease_config,
        exec=_exec(top),
        log=LogConfig(
            format=log.choice("format", LOG_FORMATS, "text") or "text",
            debug=log.boolean("debug", False),
        ),
        proxy=_proxy(top, advertise_url, http_config),
    )


_PROXY_KEYS = (
    "addr",
    "target",
    "db",
    "advertise-url",
    "passthrough",
    "always-forward",
    "max-lag",
    "primary-redirect-timeout",
    "read-header-timeout",
    "idle-timeout",
)


def _proxy(top: _Section, lease_url: str, http: HTTPConfig) -> ProxyConfig | None:
    if top.value("proxy") is None:
        return None
    section = top.section("proxy", _PROXY_KEYS)
    if section.value("addr") is None:
        raise section.error("addr", "is required: where the proxy listens, such as :8080")
    addr, host, port = section.listen_address("addr", "")
    listen = HTTPConfig(addr=addr, host=host, port=port)
    if listen.port == http.port and (not listen.host or not http.host or listen.host == http.host):
        raise section.error("addr", f"uses the same port as http.addr ({http.addr})")
    target = section.required(
        "target", section.string("target"), ": the application's address, such as localhost:8081"
    )
    if "://" not in target:
        section.listen_address("target", "")  # host:port, checked as one
        target = f"http://{target}"
    target = section.check_url("target", target)
    db = section.required("db", section.string("db"), ": the database whose position is tracked")
    if db.startswith("/") or any(part in ("", ".", "..") for part in db.split("/")):
        raise section.error("db", f"must be a database name in the mount, got {_describe(db)}")
    return ProxyConfig(
        listen=listen,
        target=target,
        db=db,
        advertise_url=section.url("advertise-url") or _proxy_url(listen, lease_url),
        passthrough=_patterns(section, "passthrough"),
        always_forward=_patterns(section, "always-forward"),
        max_lag=section.duration("max-lag", DEFAULT_PROXY_MAX_LAG, positive=True),
        primary_redirect_timeout=section.duration(
            "primary-redirect-timeout", DEFAULT_PROXY_PRIMARY_REDIRECT_TIMEOUT
        ),
        read_header_timeout=section.duration(
            "read-header-timeout", DEFAULT_PROXY_READ_HEADER_TIMEOUT, positive=True
        ),
        idle_timeout=section.duration("idle-timeout", DEFAULT_PROXY_IDLE_TIMEOUT, positive=True),
    )


def _proxy_url(listen: HTTPConfig, lease_url: str) -> str:
    """The proxy's own host when it names one, else the host of the lease's URL."""
    host = listen.host
    if host in ("", "0.0.0.0", "::"):
        host = urlsplit(lease_url).hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{listen.port}"


def _patterns(section: _Section, name: str) -> tuple[str, ...]:
    raw = section.value(name)
    if raw is None:
        return ()
    if isinstance(raw, str):
        raise section.error(name, "must be a list of path patterns, not a single string")
    if not isinstance(raw, list):
        raise section.error(name, f"must be a list of path patterns, got {_describe(raw)}")
    for index, item in enumerate(raw):
        if not isinstance(item, str) or not item.strip():
            raise section.error(
                f"{name}[{index}]", f"must be a path pattern, got {_describe(item)}"
            )
    return tuple(raw)


def _check_dirs(source: str, mount: Path, data: Path) -> None:
    """The daemon must never reach its own files through its own mount, nor
    mount over them."""
    if mount == data:
        raise ConfigError(
            source, "data.dir", f"must not be the same directory as fuse.dir ({data})"
        )
    if data in mount.parents:
        raise ConfigError(source, "fuse.dir", f"{mount} is inside data.dir ({data})")
    if mount in data.parents:
        raise ConfigError(source, "data.dir", f"{data} is inside fuse.dir ({mount})")


def _seed_shape(top: _Section) -> Config:
    """The 0.1 shape: a Consul lease, a candidate node, and the data kept in
    a hidden sibling of the mount dir, as that version did."""
    mount = top.path_value("mount-dir", ": the directory to mount the filesystem on")
    if mount.parent == mount:
        raise top.error("mount-dir", "must not be the root directory")
    debug = top.boolean("debug", False)
    http = top.section("http", _HTTP_KEYS)
    if top.value("consul") is None:
        raise top.error(
            "consul",
            "is required with mount-dir; for a static lease use the full shape "
            "(fuse.dir, data.dir, lease.type: static)",
        )
    consul = top.section("consul", ("url", "advertise-url", "key", "ttl", "lock-delay"))
    consul_config = _consul(consul)
    advertise_url = consul.required(
        "advertise-url", consul.url("advertise-url"), ": the URL other nodes use to reach this node"
    )
    return Config(
        source=top.source,
        fuse=FuseConfig(dir=mount, allow_other=False, debug=debug),
        data=DataConfig(
            dir=mount.parent / f".{mount.name}",
            retention=DEFAULT_RETENTION,
            retention_monitor_interval=DEFAULT_RETENTION_MONITOR_INTERVAL,
        ),
        http=_http(http),
        lease=LeaseConfig(
            type="consul",
            advertise_url=advertise_url,
            hostname=socket.gethostname(),
            candidate=True,
            consul=consul_config,
            etcd=None,
        ),
        exec=(),
        log=LogConfig(format="text", debug=debug),
    )
