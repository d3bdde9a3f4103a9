"""Configuration: one tree of frozen attrs classes, validated, with layered sources.

Precedence, lowest to highest: defaults, the TOML file (``--config``), environment
variables ``WSGATE_SECTION__NAME`` and CLI flags. A wrong value is refused with
a message that names the setting (``server.port: must be between 0 and 65535``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import attrs

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]

SECRET = {"secret": True}


def _check(predicate: Callable[[Any], bool], message: str) -> Validator:
    def validate(_instance: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and not predicate(value):
            raise ValueError(message)

    return validate


def _positive() -> Validator:
    return _check(lambda v: v > 0, "must be greater than 0")


def _non_negative() -> Validator:
    return _check(lambda v: v >= 0, "must be 0 or more")


def _between(low: float, high: float) -> Validator:
    return _check(lambda v: low <= v <= high, f"must be between {low:g} and {high:g}")


def _one_of(*choices: str) -> Validator:
    return _check(lambda v: v in choices, "must be one of " + ", ".join(choices))


Environment = Literal["development", "production"]
Policy = Literal["strict", "tolerant", "local", "demo"]

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")


@attrs.frozen
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8765, validator=_between(0, 65535))
    path: str = attrs.field(default="/ws", validator=_check(lambda v: v.startswith("/"), "must start with /"))
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive())
    max_header_bytes: int = attrs.field(default=16384, validator=_between(1024, 1024 * 1024))
    max_headers: int = attrs.field(default=64, validator=_between(8, 1000))
    message_rate: float = attrs.field(default=50.0, validator=_positive())
    message_burst: int = attrs.field(default=100, validator=_positive())
    max_message_bytes: int = attrs.field(default=65536, validator=_between(128, 16 * 1024 * 1024))
    max_fragments: int = attrs.field(default=1024, validator=_between(1, 1_000_000))
    send_queue_messages: int = attrs.field(default=256, validator=_positive())
    send_queue_bytes: int = attrs.field(default=1024 * 1024, validator=_between(1024, 1024**3))
    slow_consumer_timeout: float = attrs.field(default=10.0, validator=_positive())
    max_runs_per_session: int = attrs.field(default=4, validator=_positive())
    max_json_depth: int = attrs.field(default=16, validator=_between(2, 256))
    close_timeout: float = attrs.field(default=5.0, validator=_positive())
    heartbeat_interval: float = attrs.field(default=20.0, validator=_non_negative())
    heartbeat_timeout: float = attrs.field(default=20.0, validator=_positive())
    idle_timeout: float = attrs.field(default=0.0, validator=_non_negative())
    handshake_rate: float = attrs.field(default=20.0, validator=_positive())
    handshake_burst: int = attrs.field(default=40, validator=_positive())
    max_pending_handshakes: int = attrs.field(default=1000, validator=_between(1, 1_000_000))
    max_pending_handshakes_per_address: int = attrs.field(default=32, validator=_between(1, 1_000_000))
    drain_timeout: float = attrs.field(default=30.0, validator=_positive())
    drain_reconnect_jitter: float = attrs.field(default=5.0, validator=_non_negative())
    max_connections: int = attrs.field(default=10000, validator=_positive())
    max_connections_per_user: int = attrs.field(default=10, validator=_positive())
    gc_threshold: int = attrs.field(default=10_000, validator=_between(0, 10_000_000))
    #: Worker processes sharing the port (SO_REUSEPORT), each a full gateway; more than one
    #: needs ``cluster.redis_url``.
    workers: int = attrs.field(default=1, validator=_between(1, 64))
    #: permessage-deflate (RFC 7692), when the client offers it: the server's window (9-15
    #: bits: 2^bits bytes of history) and whether it keeps its context across messages.
    deflate: bool = True
    deflate_window_bits: int = attrs.field(default=12, validator=_between(9, 15))
    deflate_context_takeover: bool = False
    #: Bind with SO_REUSEPORT, so that other processes may listen on the same port: the next
    #: process binds while this one drains (and workers share it).
    reuse_port: bool = True


@attrs.frozen
class KeySettings:
    """One verification key and the algorithms it may be used with."""

    kind: str = attrs.field(default="hmac", validator=_one_of("hmac", "public"))
    secret: str | None = attrs.field(default=None, metadata=SECRET, repr=False)
    secret_file: str | None = None
    pem_file: str | None = None
    pem: str | None = None
    algorithms: tuple[str, ...] = ()
    kid: str | None = None


@attrs.frozen
class AuthSettings:
    keys: tuple[KeySettings, ...] = ()
    hmac_secret: str | None = attrs.field(default=None, metadata=SECRET, repr=False)
    issuer: str | None = None
    audience: str | None = None
    leeway: float = attrs.field(default=10.0, validator=_between(0, 300))
    max_token_bytes: int = attrs.field(default=8192, validator=_between(256, 65536))
    required_claims: tuple[str, ...] = ("exp", "sub")
    token_types: tuple[str, ...] = ("JWT", "at+jwt")
    tenant_claim: str = "tenant"
    header: bool = True
    subprotocol: bool = True
    cookie: bool = False
    cookie_name: str = "wsgate_token"
    query_param: bool = False
    allowed_origins: tuple[str, ...] = ()
    policy: str = attrs.field(default="tolerant", validator=_one_of("strict", "tolerant", "local", "demo"))
    introspection_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = attrs.field(default=None, metadata=SECRET, repr=False)
    client_auth: str = attrs.field(
        default="basic", validator=_one_of("basic", "post", "bearer", "client_credentials", "none")
    )
    token_url: str | None = None
    token_scope: str | None = None
    call_timeout: float = attrs.field(default=1.0, validator=_positive())
    deadline: float = attrs.field(default=2.0, validator=_positive())
    retries: int = attrs.field(default=2, validator=_between(0, 10))
    backoff_base: float = attrs.field(default=0.1, validator=_positive())
    backoff_max: float = attrs.field(default=1.0, validator=_positive())
    cache_ttl: float = attrs.field(default=10.0, validator=_non_negative())
    negative_cache_ttl: float = attrs.field(default=5.0, validator=_non_negative())
    cache_size: int = attrs.field(default=10000, validator=_positive())
    jwks_url: str | None = None
    discovery: bool = False
    jwks_refresh_interval: float = attrs.field(default=300.0, validator=_positive())
    jwks_min_refetch_interval: float = attrs.field(default=5.0, validator=_positive())
    anonymous_ttl: float = attrs.field(default=3600.0, validator=_positive())
    refresh_ahead: float | None = attrs.field(default=None, validator=_between(0, 3600))
    expiry_grace: float = attrs.field(default=0.0, validator=_between(0, 300))
    revalidate_interval: float = attrs.field(default=60.0, validator=_between(1, 86400))
    refresh_limit: int = attrs.field(default=10, validator=_between(1, 10000))
    refresh_window: float = attrs.field(default=60.0, validator=_positive())
    first_message: bool = False
    first_message_timeout: float = attrs.field(default=5.0, validator=_between(0.1, 300))


@attrs.frozen
class BreakerSettings:
    """The circuit breaker in front of the auth service (see docs/configuration.md)."""

    window: int = attrs.field(default=20, validator=_between(1, 10000))
    min_calls: int = attrs.field(default=10, validator=_between(1, 10000))
    failure_rate: float = attrs.field(default=0.5, validator=_between(0.01, 1))
    #: None: 90 % of the call's deadline (``auth.call_timeout``), so that a provider that is
    #: slow but answers in time (PBKDF2 on every call) does not open the breaker.
    slow_call_duration: float | None = attrs.field(default=None, validator=_positive())
    slow_call_rate: float = attrs.field(default=1.0, validator=_between(0.01, 1))
    open_wait: float = attrs.field(default=5.0, validator=_positive())
    half_open_calls: int = attrs.field(default=3, validator=_between(1, 1000))
    max_concurrent_calls: int = attrs.field(default=20, validator=_between(1, 10000))

    def for_calls(self, call_timeout: float) -> dict[str, Any]:
        """The pure breaker's configuration for calls with deadline ``call_timeout``."""
        fields = attrs.asdict(self)
        if fields["slow_call_duration"] is None:
            fields["slow_call_duration"] = 0.9 * call_timeout
        return fields


@attrs.frozen
class AdminSettings:
    """The admin listener (server push, revocation, health); off unless a port is set."""

    host: str = "127.0.0.1"
    port: int | None = attrs.field(default=None, validator=_between(0, 65535))
    api_key: str | None = attrs.field(default=None, metadata=SECRET, repr=False)


@attrs.frozen
class DevSettings:
    """Dev mode: on when asked for, or when no key is configured outside production."""

    enabled: bool | None = None
    #: None: the per-user default (``$XDG_DATA_HOME/wsgate/dev.key``), whatever the working directory.
    key_file: str | None = None
    issuer: str = "wsgate-dev"
    audience: str = "wsgate"


BUILTIN_APPS = ("demo", "echo", "noop")
UPSTREAM_ALGORITHMS = ("HS256", "RS256", "ES256")


def _app_reference(value: str) -> bool:
    module, colon, attr = value.partition(":")
    return value in BUILTIN_APPS or bool(
        colon and all(part.isidentifier() for part in module.split(".")) and attr.isidentifier()
    )


@attrs.frozen
class AgentSettings:
    """What serves the runs: a built-in app, an agent imported in process, or an agent
    service over HTTP (``upstream_url``)."""

    app: str = attrs.field(
        default="demo",
        validator=_check(_app_reference, "must be demo, echo, noop or a module:attribute reference"),
    )
    step_delay: float = attrs.field(default=0.05, validator=_between(0, 60))
    upstream_url: str | None = None
    upstream_events: str = attrs.field(default="wsgate", validator=_one_of("wsgate", "ag-ui"))
    upstream_secret: str | None = attrs.field(default=None, repr=False, metadata=SECRET)
    upstream_key_file: str | None = None
    upstream_algorithm: str = attrs.field(default="HS256", validator=_one_of(*UPSTREAM_ALGORITHMS))
    upstream_issuer: str = "wsgate"
    upstream_audience: str = "wsgate-upstream"
    upstream_token_ttl: float = attrs.field(default=300.0, validator=_between(1, 300))
    forward_client_token: bool = False
    passthrough_events: tuple[str, ...] = ()
    connect_timeout: float = attrs.field(default=5.0, validator=_positive())
    first_event_timeout: float = attrs.field(default=30.0, validator=_positive())
    idle_timeout: float = attrs.field(default=60.0, validator=_positive())
    run_timeout: float = attrs.field(default=600.0, validator=_positive())
    retries: int = attrs.field(default=2, validator=_between(0, 10))
    backoff_base: float = attrs.field(default=0.2, validator=_positive())
    backoff_max: float = attrs.field(default=2.0, validator=_positive())
    max_event_bytes: int = attrs.field(default=1024 * 1024, validator=_between(1024, 64 * 1024 * 1024))
    max_connections: int = attrs.field(default=100, validator=_positive())


@attrs.frozen
class ClusterSettings:
    """Several gateway nodes as one: pushes and revocations through Redis."""

    redis_url: str | None = attrs.field(default=None, repr=False, metadata=SECRET)
    call_timeout: float = attrs.field(default=1.0, validator=_positive())
    reconnect_max: float = attrs.field(default=5.0, validator=_positive())
    #: How long a node's hold on a user's place outlives the node (renewed every third of it).
    lease_ttl: float = attrs.field(default=30.0, validator=_between(1, 3600))


@attrs.frozen
class ResumeSettings:
    """Sessions that outlive their connection: how long a detached one waits to be resumed,
    and how much of what it sent it keeps to replay (``docs/protocol.md``, "Resuming")."""

    #: Seconds a detached session (and its runs) waits for its client; 0 turns resuming off.
    window: float = attrs.field(default=120.0, validator=_between(0, 86400))
    max_events: int = attrs.field(default=1000, validator=_between(1, 1_000_000))
    max_bytes: int = attrs.field(default=1024 * 1024, validator=_between(1024, 1024**3))


@attrs.frozen
class LogSettings:
    level: str = attrs.field(default="info", validator=_one_of("debug", "info", "warning", "error"))
    format: str = attrs.field(default="text", validator=_one_of("text", "json"))


@attrs.frozen
class Settings:
    environment: str = attrs.field(default="development", validator=_one_of("development", "production"))
    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    breaker: BreakerSettings = BreakerSettings()
    admin: AdminSettings = AdminSettings()
    dev: DevSettings = DevSettings()
    agent: AgentSettings = AgentSettings()
    cluster: ClusterSettings = ClusterSettings()
    resume: ResumeSettings = ResumeSettings()
    log: LogSettings = LogSettings()

    @property
    def introspects(self) -> bool:
        """Whether an auth service is asked about tokens: a URL is set, or discovery may
        find one and the gateway has credentials to present to it."""
        auth = self.auth
        if auth.introspection_url:
            return True
        return auth.discovery and (auth.client_auth == "none" or auth.client_secret is not None)

    @property
    def has_keys(self) -> bool:
        auth = self.auth
        return bool(auth.keys or auth.hmac_secret or auth.jwks_url or (auth.discovery and auth.issuer))

    @property
    def dev_mode(self) -> bool:
        if self.dev.enabled is not None:
            return self.dev.enabled
        return self.environment != "production" and not self.has_keys

    def problems(self) -> list[str]:
        """Cross-setting problems (each names its setting); empty when consistent."""
        found: list[str] = []
        if self.environment == "production" and self.dev_mode:
            found.append("dev.enabled: dev mode is refused when environment is production")
        auth = self.auth
        if not self.dev_mode and not self.has_keys:
            found.append(
                "auth.keys: no verification key configured "
                "(set auth.hmac_secret, auth.keys, auth.jwks_url or auth.discovery with auth.issuer)"
            )
        if self.environment == "production" and auth.policy == "demo":
            found.append("auth.policy: demo is refused when environment is production")
        if auth.discovery and not auth.issuer:
            found.append("auth.discovery: needs auth.issuer")
        if auth.discovery and auth.jwks_url:
            found.append("auth.jwks_url: set either auth.jwks_url or auth.discovery, not both")
        if auth.call_timeout > auth.deadline:
            found.append("auth.call_timeout: must not exceed auth.deadline")
        if self.introspects and auth.deadline >= self.server.handshake_timeout:
            found.append("auth.deadline: must be shorter than server.handshake_timeout")
        if auth.client_auth != "none" and auth.introspection_url and not auth.client_secret:
            found.append(f"auth.client_secret: needed for client_auth = {auth.client_auth}")
        if (
            auth.client_auth in ("basic", "post", "client_credentials")
            and self.introspects
            and not auth.client_id
        ):
            found.append(f"auth.client_id: needed for client_auth = {auth.client_auth}")
        if auth.client_auth == "client_credentials" and not (auth.token_url or auth.discovery):
            found.append("auth.token_url: needed for client_auth = client_credentials (or auth.discovery)")
        for name in ("introspection_url", "jwks_url", "token_url"):
            url = getattr(auth, name)
            if url and not url.startswith(("http://", "https://")):
                found.append(f"auth.{name}: must be an http:// or https:// URL")
        if auth.discovery and auth.issuer and not auth.issuer.startswith(("http://", "https://")):
            found.append("auth.issuer: must be an http:// or https:// URL for discovery")
        if self.admin.port is not None and not self.admin.api_key:
            found.append("admin.api_key: needed when admin.port is set")
        if self.admin.api_key is not None and len(self.admin.api_key) < 16:
            found.append("admin.api_key: must be at least 16 characters")
        if self.breaker.min_calls > self.breaker.window:
            found.append("breaker.min_calls: must not exceed breaker.window")
        if self.auth.hmac_secret is not None and len(self.auth.hmac_secret.encode()) < 32:
            found.append("auth.hmac_secret: must be at least 32 bytes")
        if self.auth.cookie and not self.auth.allowed_origins:
            found.append(
                "auth.allowed_origins: required when auth.cookie is on (cookies ride along cross-site)"
            )
        if not (self.auth.header or self.auth.subprotocol or self.auth.first_message or self.auth.cookie):
            found.append("auth.header: at least one token source must be enabled")
        found.extend(_agent_problems(self.agent))
        if self.server.workers > 1 and self.cluster.redis_url is None:
            found.append(
                f"server.workers: {self.server.workers} workers need cluster.redis_url"
                " (workers cannot see each other's connections without a broker)"
            )
        url = self.cluster.redis_url
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            found.append("cluster.redis_url: must be a redis://, rediss:// or unix:// URL")
        for i, key in enumerate(self.auth.keys):
            found.extend(f"auth.keys[{i}].{p}" for p in _key_problems(key))
        return found


def _agent_problems(agent: AgentSettings) -> list[str]:
    found: list[str] = []
    if agent.upstream_url is None:
        return found
    if not agent.upstream_url.startswith(("http://", "https://")):
        found.append("agent.upstream_url: must be an http:// or https:// URL")
    if agent.app != "demo":
        found.append(f"agent.app: {agent.app} and agent.upstream_url both say what serves runs; set one")
    hmac = agent.upstream_algorithm == "HS256"
    if hmac and agent.upstream_secret is None:
        found.append("agent.upstream_secret: needed to sign the gateway's tokens to the upstream (HS256)")
    if hmac and agent.upstream_secret is not None and len(agent.upstream_secret.encode()) < 32:
        found.append("agent.upstream_secret: must be at least 32 bytes")
    if not hmac and agent.upstream_key_file is None:
        found.append(f"agent.upstream_key_file: needed for upstream_algorithm = {agent.upstream_algorithm}")
    if agent.first_event_timeout > agent.run_timeout:
        found.append("agent.first_event_timeout: must not exceed agent.run_timeout")
    return found


def _key_problems(key: KeySettings) -> list[str]:
    found = []
    if key.kind == "hmac":
        if (key.secret is None) == (key.secret_file is None):
            found.append("secret: set exactly one of secret and secret_file")
        if any(a not in HMAC_ALGORITHMS for a in key.algorithms):
            found.append("algorithms: an hmac key allows only " + ", ".join(HMAC_ALGORITHMS))
    else:
        if (key.pem is None) == (key.pem_file is None):
            found.append("pem: set exactly one of pem and pem_file")
        if not key.algorithms:
            found.append("algorithms: a public key needs its algorithm allow-list")
        if any(a.upper().startswith("HS") or a.lower() == "none" for a in key.algorithms):
            found.append("algorithms: a public key may not be used with HMAC or none")
    return found
