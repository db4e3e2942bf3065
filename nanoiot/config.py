"""One typed configuration, validated once at start with every error reported together.

Every option can also come from an environment variable ``NANOIOT_<NAME>`` (dashes become underscores), so that
containers and systemd units need no command line.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from nanoiot.errors import ConfigError
from nanoiot.rpc.model import SubmitStrategy


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("must be between 0 and 65535")
    return port


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be a positive whole number")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be zero or more")
    return number


def _bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _seconds(value: str | float) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError("must be a positive number of seconds")
    return number


def _node_id(value: str) -> str:
    """The name other nodes and every log line know this node by: one token, so it reads well in both."""
    if len(value) > 200:
        raise ValueError("must be at most 200 characters")
    if any(char.isspace() for char in value):
        raise ValueError("must not contain whitespace")
    return value


def _strategy(value: str) -> SubmitStrategy:
    try:
        return SubmitStrategy(value.strip().upper())
    except ValueError:
        names = ", ".join(s.value for s in SubmitStrategy)
        raise ValueError(f"must be one of {names}") from None


def _one_of(*choices: str) -> Callable[[str], str]:
    """A parser of a word from ``choices`` (any case, spaces around ignored)."""

    def parse(value: str) -> str:
        lowered = value.strip().lower()
        if lowered not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return lowered

    return parse


_log_level = _one_of("debug", "info", "warn", "error", "critical")
_log_format = _one_of("text", "json")


def _rpc_methods(value: str) -> str:
    """Only the syntax here; the service imports the callables (and reports what it cannot import)."""
    from nanoiot.commands.server_methods import parse_method_specs

    parse_method_specs(value)
    return value.strip()


def _rule_chain_file(value: str) -> str:
    """A rule chain export file (``--rule-chain``), loaded and validated now: every problem on one line."""
    path = value.strip()
    if not path:
        return ""
    from nanoiot.rules.chain import ChainProblems, load_chain_file

    try:
        load_chain_file(path)
    except ChainProblems as exc:
        problems = getattr(exc, "problems", None) or [exc]
        raise ValueError("; ".join(_problem_line(p) for p in problems)) from None
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror or exc}") from None
    return path


def _login_rates(value: str) -> str:
    from nanoiot.limits import parse_rates

    try:
        parse_rates(value)
    except ValueError as exc:
        raise ValueError(f"{exc} (expected capacity:seconds[,capacity:seconds...], e.g. 5:60)") from None
    return value.strip()


def _seconds_or_zero(value: str | float) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError("must be 0 or a positive number of seconds")
    return number


def _problem_line(problem: Any) -> str:
    index, name = getattr(problem, "index", None), getattr(problem, "name", None)
    where = " ".join(part for part in (f"node {index}" if index is not None else "", repr(name) if name else "")
                     if part)
    message = " ".join(str(getattr(problem, "message", problem)).split())  # one line, whatever it holds
    return f"{where}: {message}" if where else message


def _database(value: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(value)  # raises ArgumentError on garbage
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError("only sqlite and postgresql URLs are supported")
    if url.drivername in ("postgresql", "postgres"):
        # SQLAlchemy 2.1 defaults to psycopg 3; NanoIoT ships psycopg2.
        return url.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return value


@dataclass(frozen=True)
class Option:
    """One option: its flag, default, parser and help text (the twistd plugin and the docs read these)."""

    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    #: A twistd flag (``--demo``, no value) rather than a parameter; only for booleans that default to off.
    flag: bool = False


OPTIONS: tuple[Option, ...] = (
    Option("host", "0.0.0.0", str, "interface to listen on"),
    Option("http-port", 8080, _port, "REST API and HTTP device API port"),
    Option("mqtt-port", 1883, _port, "MQTT port"),
    Option("coap-port", 5683, _port, "CoAP (UDP) port"),
    Option("database", "sqlite:///nanoiot.db", _database, "SQLAlchemy URL (sqlite:///file.db or postgresql://...)"),
    Option("db-retry-after", 5.0, _seconds,
           "seconds clients are told to wait (Retry-After of the 503) while the database is unreachable"),
    Option("db-probe-interval", 1.0, _seconds, "seconds between checks of an unreachable database"),
    Option("sqlite-cache-mb", 64, _positive, "SQLite's page cache, MiB (memory used only as pages are read)"),
    Option("demo", False, _bool, "create demo accounts and devices on an empty database", flag=True),
    Option("cluster", False, _bool, "run as one node of a cluster sharing --database (PostgreSQL only)", flag=True),
    Option("node-id", "", _node_id, "this node's name in the cluster; default host name:HTTP port"),
    Option("heartbeat-interval", 2.0, _seconds, "seconds between a cluster node's heartbeats"),
    Option("dead-after", 10.0, _seconds,
           "seconds without a heartbeat before a node is taken for dead (more than twice --heartbeat-interval)"),
    Option("route-timeout", 10000, _positive,
           "ms a routed call that is not a command (delete, inspect, release) waits for the other node"),
    Option("cluster-link-host", "127.0.0.1", str,
           "interface of this node's direct links to the other nodes (they dial it after its announcement on the "
           "database's NOTIFY bus); empty: every message between nodes goes through PostgreSQL NOTIFY"),
    Option("reuse-port", False, _bool,
           "share the MQTT, HTTP and CoAP ports with other processes (SO_REUSEPORT)", flag=True),
    Option("jwt-key", "", str, "JWT signing key; generated and stored in --jwt-key-file when empty"),
    Option("jwt-key-file", "nanoiot.key", str, "where a generated JWT signing key is kept"),
    Option("jwt-expiration", 9000, _positive, "access token lifetime, seconds"),
    Option("jwt-refresh-expiration", 604800, _positive, "refresh token lifetime, seconds"),
    Option("login-rate-limit-per-account", "5:60", _login_rates,
           "login attempts per account, capacity:seconds[,...] (a success resets it; empty: no limit)"),
    Option("login-rate-limit-per-address", "30:60", _login_rates,
           "login attempts per source address, capacity:seconds[,...] (empty: no limit)"),
    Option("rpc-strategy", SubmitStrategy.BURST, _strategy, "submit strategy for device commands"),
    Option("rpc-max-retries", 5, _non_negative, "resends of an unacknowledged command, at most"),
    Option("rpc-ack-timeout", 10000, _positive, "ms to wait for a device's acknowledgement"),
    Option("rpc-response-timeout", 30000, _positive, "ms to wait for an answer (SEQUENTIAL_ON_RESPONSE)"),
    Option("rpc-default-timeout", 10000, _positive, "ms, when a request gives none"),
    Option("rpc-min-timeout", 5000, _non_negative, "ms, the least timeout a request may ask for"),
    Option("rpc-max-pending", 1000, _positive, "commands queued per device, at most"),
    Option("rpc-qos", 1, int, "MQTT QoS of commands (0 or 1)"),
    Option("rpc-max-persistent-per-device", 1000, _positive, "active persistent commands per device, at most"),
    Option("rpc-max-persistent-per-tenant", 1_000_000, _positive, "active persistent commands per tenant, at most"),
    Option("rpc-bulk-max-devices", 100_000, _positive, "devices one bulk RPC (POST /api/rpc/bulk) may target, at most"),
    Option("rpc-ttl", 604800, _non_negative, "seconds a finished persistent command is kept (0: forever)"),
    Option("rpc-ttl-interval", 3600, _positive, "seconds between clean-ups of finished persistent commands"),
    Option("rpc-methods", "", _rpc_methods, "extra server methods devices may call: [name=]module:callable,..."),
    Option("rule-chain", "", _rule_chain_file,
           "a rule chain export file (ThingsBoard's JSON): the root chain of tenants that have none stored"),
    Option("rules-bypass", False, _bool,
           "skip rule chains: commands go straight to devices, device calls only to server methods", flag=True),
    Option("rules-max-inflight", 10000, _positive, "rule-engine messages a tenant may have in flight (then dropped)"),
    Option("device-call-timeout", 60000, _positive,
           "ms a device-to-server call waits for a rule chain's answer (then {\"error\":\"timeout\"})"),
    Option("max-payload-size", 16 * 1024 * 1024, _positive, "REST request body limit, bytes"),
    Option("http-poll-timeout", 60000, _positive, "ms an HTTP device's long poll waits when it gives no timeout"),
    Option("http-max-poll-timeout", 300000, _positive, "ms an HTTP device's long poll waits at most"),
    Option("tenant-rest-rate-limit", "", _login_rates,
           "REST requests per tenant (not SYS_ADMIN), capacity:seconds[,...] like ThingsBoard's "
           "tenantServerRestLimitsConfiguration, e.g. 100:1,3000:60 (empty: no limit); over it 429"),
    Option("customer-rest-rate-limit", "", _login_rates,
           "REST requests per customer (its users), like customerServerRestLimitsConfiguration (empty: no limit)"),
    Option("device-rpc-rate-limit", "", _login_rates,
           "REST and WebSocket commands per target device, capacity:seconds[,...] (empty: no limit); over it 429"),
    Option("http-device-rate-limit", "", _login_rates,
           "requests per device on the HTTP device API, capacity:seconds[,...] (empty: no limit); over it 429"),
    Option("http-max-payload-size", 65536, _positive, "HTTP device API (/api/v1/...) request body limit, bytes"),
    Option("http-header-timeout", 10.0, _seconds,
           "seconds a client has to send a request's line and headers (from its first byte or the connection)"),
    Option("http-body-timeout", 30.0, _seconds,
           "seconds a client has to send a request's body, plus one per --http-body-min-rate bytes received"),
    Option("http-body-min-rate", 500, _non_negative,
           "bytes of body that earn a client one more second of --http-body-timeout (0: a fixed deadline)"),
    Option("http-idle-timeout", 60.0, _seconds, "seconds a kept-alive HTTP connection may wait for its next request"),
    Option("http-max-connections-per-address", 30000, _non_negative,
           "open HTTP connections per client address, at most (0: no limit); more are closed at once"),
    Option("http-max-requests-per-device", 16, _positive,
           "long polls and calls an HTTP device may have open at once (then 429)"),
    Option("mqtt-max-packet-size", 256 * 1024, _positive, "largest MQTT packet accepted, bytes"),
    Option("mqtt-connect-timeout", 10, _positive, "seconds a new MQTT connection has to send CONNECT"),
    Option("mqtt-max-inflight-in", 100, _positive,
           "device messages per MQTT connection handed to its actor and not yet handled (unacknowledged QoS 1 "
           "publishes); past it the socket is not read until the actor catches up"),
    Option("mqtt-max-queued-bytes", 1024 * 1024, _positive,
           "bytes of device messages per MQTT connection handed to its actor and not yet handled, at most"),
    Option("mqtt-device-rate-limit", "", _login_rates,
           "MQTT messages per device, capacity:seconds[,...] like ThingsBoard's transport device limits "
           "(empty: no limit)"),
    Option("mqtt-tenant-rate-limit", "", _login_rates,
           "MQTT messages per tenant, all its devices together, capacity:seconds[,...] (empty: no limit)"),
    Option("mqtt-rate-limit-action", "throttle", _one_of("throttle", "close"),
           "what a device over an MQTT rate limit gets: throttle (its socket is not read until it may send "
           "again) or close"),
    Option("mqtt-max-connections-per-address", 30000, _non_negative,
           "open MQTT connections per source address, at most (0: no limit); more are closed at once"),
    Option("mqtt-max-sessions-per-device", 10, _non_negative,
           "open MQTT connections per device, at most (0: no limit; a reconnect briefly overlaps the old one)"),
    Option("mqtt-write-timeout", 120.0, _seconds_or_zero,
           "seconds an MQTT device may leave what we write unread (a full write buffer; reading it stops "
           "meanwhile) before it is closed (0: never)"),
    Option("coap-device-rate-limit", "", _login_rates,
           "CoAP requests per device, capacity:seconds[,...] (empty: no limit); over it 4.29 with Max-Age"),
    Option("device-idle-timeout", 60, _positive, "seconds before an idle device actor is passivated"),
    Option("gc-freeze", True, _bool, "move long-lived objects out of Python's full GC as the fleet grows"),
    Option("log-level", "info", _log_level, "debug, info, warn, error"),
    Option("metrics", True, _bool, "serve Prometheus metrics at /metrics on the HTTP port: on or off"),
    Option("metrics-token", "", str, "bearer token GET /metrics requires (empty: none, as Kubernetes scrapes)"),
    Option("log-format", "text", _log_format, "text or json"),
    Option("log-rotate-length", 1_000_000, _non_negative,
           "bytes after which --logfile is rotated (0: only on SIGUSR1), as twistd's own log"),
    Option("log-max-rotated", 10, _non_negative, "rotated log files kept (0: all)"),
    Option("shutdown-grace", 5.0, _seconds,
           "seconds a stopping server lets waiting REST callers finish before answering them 503"),
    Option("shutdown-timeout", 15.0, _seconds, "seconds a stopping server takes at most before it exits anyway"),
    Option("https-port", 0, _port, "HTTPS port (REST, device API, WebSocket over TLS; 0: off); needs --tls-cert"),
    Option("mqtts-port", 0, _port, "MQTT over TLS port, usually 8883 (0: off); needs --tls-cert"),
    Option("tls-cert", "", str, "PEM file with the server certificate (and its chain) for --https-port/--mqtts-port"),
    Option("tls-key", "", str, "PEM file with the certificate's private key (default: --tls-cert)"),
    Option("tls-chain", "", str, "PEM file with the intermediate certificates sent after --tls-cert (optional)"),
    Option("ws-max-buffer", 1024 * 1024, _positive,
           "bytes a WebSocket client may leave unread before it is closed as too slow (4008)"),
    Option("ws-max-subscriptions", 1000, _positive, "device subscriptions per WebSocket, at most"),
    Option("ws-max-inflight", 1000, _positive, "commands in flight per WebSocket, at most (then 429)"),
)


def _attr(name: str) -> str:
    return name.replace("-", "_")


def _cluster_problems(values: Mapping[str, Any]) -> list[str]:
    """Checks across options; an option that did not parse is already reported, so it is skipped here."""
    problems: list[str] = []
    database = values.get("database")
    if values.get("cluster") and isinstance(database, str) and database.startswith("sqlite"):
        problems.append(f"--cluster needs a PostgreSQL --database ({database} cannot be shared by several processes)")
    interval, dead_after = values.get("heartbeat_interval"), values.get("dead_after")
    if isinstance(interval, float) and isinstance(dead_after, float) and dead_after <= 2 * interval:
        problems.append(f"--dead-after={dead_after:g} must be more than twice --heartbeat-interval={interval:g}: "
                        "one late heartbeat must not make a node dead")
    return problems


def _tls_problems(values: Mapping[str, Any]) -> list[str]:
    """A TLS port needs a readable certificate and key, checked at start rather than at the first handshake."""
    if not (values.get("https_port") or values.get("mqtts_port")):
        return []
    cert, key = values.get("tls_cert") or "", values.get("tls_key") or values.get("tls_cert") or ""
    if not cert:
        return ["--https-port/--mqtts-port need --tls-cert (a PEM certificate file)"]
    problems = []
    chain = values.get("tls_chain") or ""
    for option, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-chain", chain)):
        if not path:
            continue
        try:
            with open(path, "rb") as handle:
                handle.read(1)
        except OSError as exc:
            problems.append(f"{option}={path!r}: cannot read it: {exc.strerror or exc}")
    return problems


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    http_port: int = 8080
    mqtt_port: int = 1883
    coap_port: int = 5683
    database: str = "sqlite:///nanoiot.db"
    db_retry_after: float = 5.0
    db_probe_interval: float = 1.0
    sqlite_cache_mb: int = 64
    demo: bool = False
    cluster: bool = False
    node_id: str = ""
    heartbeat_interval: float = 2.0
    dead_after: float = 10.0
    route_timeout: int = 10000
    cluster_link_host: str = "127.0.0.1"
    reuse_port: bool = False
    jwt_key: str = ""
    jwt_key_file: str = "nanoiot.key"
    jwt_expiration: int = 9000
    jwt_refresh_expiration: int = 604800
    login_rate_limit_per_account: str = "5:60"
    login_rate_limit_per_address: str = "30:60"
    rpc_strategy: SubmitStrategy = SubmitStrategy.BURST
    rpc_max_retries: int = 5
    rpc_ack_timeout: int = 10000
    rpc_response_timeout: int = 30000
    rpc_default_timeout: int = 10000
    rpc_min_timeout: int = 5000
    rpc_max_pending: int = 1000
    rpc_qos: int = 1
    rpc_max_persistent_per_device: int = 1000
    rpc_max_persistent_per_tenant: int = 1_000_000
    rpc_bulk_max_devices: int = 100_000
    rpc_ttl: int = 604800
    rpc_ttl_interval: int = 3600
    rpc_methods: str = ""
    rule_chain: str = ""
    rules_bypass: bool = False
    rules_max_inflight: int = 10000
    device_call_timeout: int = 60000
    max_payload_size: int = 16 * 1024 * 1024
    http_poll_timeout: int = 60000
    http_max_poll_timeout: int = 300000
    tenant_rest_rate_limit: str = ""
    customer_rest_rate_limit: str = ""
    device_rpc_rate_limit: str = ""
    http_device_rate_limit: str = ""
    http_max_payload_size: int = 65536
    http_header_timeout: float = 10.0
    http_body_timeout: float = 30.0
    http_body_min_rate: int = 500
    http_idle_timeout: float = 60.0
    http_max_connections_per_address: int = 30000
    http_max_requests_per_device: int = 16
    mqtt_max_packet_size: int = 256 * 1024
    mqtt_connect_timeout: int = 10
    mqtt_max_inflight_in: int = 100
    mqtt_max_queued_bytes: int = 1024 * 1024
    mqtt_device_rate_limit: str = ""
    mqtt_tenant_rate_limit: str = ""
    mqtt_rate_limit_action: str = "throttle"
    mqtt_max_connections_per_address: int = 30000
    mqtt_max_sessions_per_device: int = 10
    mqtt_write_timeout: float = 120.0
    coap_device_rate_limit: str = ""
    device_idle_timeout: int = 60
    gc_freeze: bool = True
    log_level: str = "info"
    metrics: bool = True
    metrics_token: str = ""
    log_format: str = "text"
    log_rotate_length: int = 1_000_000
    log_max_rotated: int = 10
    shutdown_grace: float = 5.0
    shutdown_timeout: float = 15.0
    https_port: int = 0
    mqtts_port: int = 0
    tls_cert: str = ""
    tls_key: str = ""
    tls_chain: str = ""
    ws_max_buffer: int = 1024 * 1024
    ws_max_subscriptions: int = 1000
    ws_max_inflight: int = 1000
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_sources(cls, given: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
        """Build from explicit values (None = not given) over ``NANOIOT_*`` variables over defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []
        for option in OPTIONS:
            raw = given.get(option.name, given.get(_attr(option.name)))
            source = f"--{option.name}"
            if raw is None:
                env_name = "NANOIOT_" + _attr(option.name).upper()
                if env_name in environ:
                    raw, source = environ[env_name], env_name
            if raw is None:
                values[_attr(option.name)] = option.default
                continue
            try:
                values[_attr(option.name)] = option.parse(raw)
            except Exception as exc:  # every parser error becomes one readable line
                problems.append(f"{source}={raw!r}: {exc}")
        if values.get("rpc_qos") not in (0, 1):
            problems.append(f"--rpc-qos={values.get('rpc_qos')!r}: must be 0 or 1")
        problems.extend(_cluster_problems(values))
        problems.extend(_tls_problems(values))
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(**values)

    @property
    def node_name(self) -> str:
        """This node's name in the cluster and in log lines: --node-id, else host name:HTTP port."""
        return self.node_id or f"{socket.gethostname()}:{self.http_port}"

    def replace(self, **changes: Any) -> Config:
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        current.update(changes)
        return Config(**current)
