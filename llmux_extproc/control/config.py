"""The one LLMux configuration: LiteLLM's config.yaml plus an `llmux:` section.

Everything else (Envoy's bootstrap and clusters, the ext_proc's routing table) is derived
from the `Config` this module builds, so nothing is kept twice. Parsing is strict about the
fields LLMux uses and names the field and the problem; unknown LiteLLM settings are reported
as warnings, never silently treated as honoured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import yaml

from llmux_extproc.observability.logs import parse_log_levels
from llmux_extproc.observability.tracing_settings import TracingSettings, parse_tracing
from llmux_extproc.providers.registry import PROVIDERS, ProviderSpec


class ConfigError(ValueError):
    """A configuration problem; the message names the field."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """One upstream endpoint; Envoy gets a cluster per distinct upstream."""

    scheme: str
    host: str
    port: int
    base_path: str

    # Derived once: read on every request.
    tls: bool = field(init=False)
    cluster: str = field(init=False)
    authority: str = field(init=False)

    def __post_init__(self) -> None:
        tls = self.scheme == "https"
        default = 443 if tls else 80
        object.__setattr__(self, "tls", tls)
        object.__setattr__(
            self, "cluster", f"llm_{self.host.replace(':', '_')}_{self.port}{'_tls' if tls else ''}"
        )
        authority = self.host if self.port == default else f"{self.host}:{self.port}"
        object.__setattr__(self, "authority", authority)


@dataclass(frozen=True, slots=True)
class Deployment:
    model_name: str
    id: str
    provider: str
    model: str
    upstream: Upstream | None  # None for providers answered inside LLMux (mock)
    api_key: str | None = field(repr=False)
    rpm: int | None
    tpm: int | None
    weight: float
    timeout_s: float | None
    params: dict[str, Any]  # remaining litellm_params, for adapters (api_version, region, ...)
    model_info: dict[str, Any]
    drop_params: bool = False  # drop what the provider cannot honour instead of answering 400
    max_parallel_requests: int | None = None

    @property
    def spec(self) -> ProviderSpec:
        return PROVIDERS[self.provider]


@dataclass(frozen=True, slots=True)
class Listen:
    """`host:port` or `unix:/path`."""

    host: str | None
    port: int | None
    path: str | None

    @classmethod
    def parse(cls, value: str, where: str) -> Listen:
        if value.startswith("unix:"):
            path = value[len("unix:") :]
            if not path:
                raise ConfigError(f"{where}: unix socket path is empty")
            return cls(None, None, path)
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{where}: expected 'host:port' or 'unix:/path', got {value!r}")
        return cls(host.strip("[]") or "0.0.0.0", int(port), None)

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    """The `llmux:` section: how the gateway itself runs."""

    listen: Listen
    admin: Listen
    metrics: Listen
    workers: int
    runtime_dir: str | None
    request_timeout_s: float
    stream_idle_timeout_s: float
    stream_accounting: str  # "envoy" or "processor", for streams already in OpenAI's format
    connect_timeout_s: float
    max_request_body_bytes: int
    max_response_body_bytes: int
    access_log: str  # "stdout", "off" or a file path
    reload_poll_s: float
    drain_timeout_s: float = 60.0  # SIGTERM: how long in-flight requests may run on
    # The seed's circuit breaker per deployment (policy.health.BreakerSettings): opens when
    # more than failure_rate of at least min_requests attempts in window failed, stays open
    # for open_time, then lets half_open_probes probes through.
    breaker: dict[str, float] = field(default_factory=dict)
    # OpenTelemetry traces (observability/tracing_settings.py); Envoy takes them at start.
    tracing: TracingSettings = field(default_factory=TracingSettings)
    # llmux.log_level: (component, level) pairs, "default" first (observability/logs.py).
    log_levels: tuple[tuple[str, str], ...] = ()
    # /metrics on the public listener: "auth" (the master key, when one is set), "open"
    # (anyone, LiteLLM's default) or "off" (only at `metrics`). Spend by team and model is
    # not for every caller to read.
    listener_metrics: str = "auth"
    # Spend log rows a worker holds while PostgreSQL is unreachable; more are dropped.
    spend_log_queue: int = 50_000
    # Slow and idle clients, and overload (README, Limits and overload). The whole request
    # (headers and body) must arrive within client_body_timeout (408); a connection without
    # a request in flight is closed after connection_idle_timeout; Envoy accepts at most
    # max_connections client connections; at most max_streams_per_worker ext_proc streams
    # per worker are open at once, and a request past that gets 503 with retry-after.
    client_body_timeout_s: float = 60.0
    connection_idle_timeout_s: float = 120.0
    max_connections: int = 12000
    # 512: in overload runs Envoy crashed with no cap (6 of 7) or 1,000 (2 of 4), never
    # with 512 (3 runs) or 300 (5); 512 still lets 512 clients stream at once without a
    # refusal (closed loop), and at 0.1-0.15 ms of worker CPU a message, 512 translated
    # streams of ~20 chunks a second would keep a worker busy anyway (docs/architecture.md).
    max_streams_per_worker: int = 512


# LiteLLM's retry_policy classes, and the statuses each stands for. A class set to 0 is
# not retried (nor falls back); LiteLLM's per-class counts become one route-wide count in
# Envoy (the largest), which the README states.
RETRY_CLASSES: dict[str, tuple[int, ...]] = {
    "AuthenticationErrorRetries": (401, 403),
    "TimeoutErrorRetries": (408,),
    "RateLimitErrorRetries": (429,),
    "InternalServerErrorRetries": (500, 502, 503, 504, 529),
    "BadRequestErrorRetries": (400,),
    "ContentPolicyViolationErrorRetries": (),  # classified from the error body
    "NotFoundErrorRetries": (404,),
}


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """LiteLLM's `router_settings` that LLMux honours (names and defaults as LiteLLM's)."""

    routing_strategy: str = "simple-shuffle"
    routing_strategy_args: dict[str, Any] = field(default_factory=dict)
    num_retries: int = 0
    retry_policy: dict[str, int] = field(default_factory=dict)
    timeout_s: float | None = None  # per attempt, non-streamed
    stream_timeout_s: float | None = None  # per attempt, streamed: until the answer starts
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    context_window_fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    content_policy_fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    default_fallbacks: tuple[str, ...] = ()
    allowed_fails: int = 3
    allowed_fails_policy: dict[str, int] = field(default_factory=dict)
    cooldown_time_s: float = 5.0
    disable_cooldowns: bool = False

    def retriable_statuses(self) -> frozenset[int]:
        """Provider statuses another attempt may fix (LiteLLM retries and falls back on
        these; other 4xx are the client's own fault)."""
        statuses = {401, 403, 404, 408, 429, 500, 502, 503, 504, 529}
        for name, codes in RETRY_CLASSES.items():
            if self.retry_policy.get(name) == 0:
                statuses -= set(codes)
            elif self.retry_policy.get(name):
                statuses |= set(codes)
        return frozenset(statuses)

    def fallback_groups(self, group: str) -> tuple[tuple[str, str], ...]:
        """(kind, group) in the order attempts reach them after the group's own: general
        fallbacks, default fallbacks, then the context-window and content-policy ones."""
        out: list[tuple[str, str]] = []
        for kind, names in (
            ("fallback", self.fallbacks.get(group, ())),
            ("fallback", () if group in self.fallbacks else self.default_fallbacks),
            ("context_window", self.context_window_fallbacks.get(group, ())),
            ("content_policy", self.content_policy_fallbacks.get(group, ())),
        ):
            for name in names:
                if name != group and name not in (g for _, g in out):
                    out.append((kind, name))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Config:
    deployments: tuple[Deployment, ...]
    settings: Settings
    master_key: str | None = field(repr=False)
    router: RouterSettings
    drop_params: bool
    warnings: tuple[str, ...] = ()
    # LiteLLM's general_settings.database_url, else DATABASE_URL: virtual keys and teams
    # (docs/architecture.md, Keys, limits and budgets). None: the master key alone.
    database_url: str | None = field(default=None, repr=False)
    # general_settings.user_api_key_cache_ttl: how often each worker re-reads its cached
    # keys, the bound on a change whose notification was lost.
    key_cache_ttl_s: float = 10.0
    # Rate limits and budgets shared by replicas (policy/redis_limits.py); None: each
    # replica's own (its workers share a file).
    redis_url: str | None = field(default=None, repr=False)
    # Apply LLMux's migrations at `llmux run` start (LiteLLM: disable_prisma_schema_update,
    # DISABLE_SCHEMA_UPDATE turn it off).
    schema_update: bool = True
    # LiteLLM's Prometheus callback (`litellm_settings.callbacks: ["prometheus"]`): also
    # export LiteLLM's metric names and labels (observability/metrics.py).
    litellm_metrics: bool = False
    # LiteLLM's litellm_settings.turn_off_message_logging, inverted, and off unless that is
    # explicitly false: whether log lines may carry what providers say about a request
    # (their error messages echo prompts). Redaction applies either way.
    message_logging: bool = False

    @property
    def routing_strategy(self) -> str:
        return self.router.routing_strategy

    @property
    def num_retries(self) -> int:
        return self.router.num_retries

    @property
    def model_names(self) -> list[str]:
        return list(dict.fromkeys(d.model_name for d in self.deployments))

    def group(self, name: str) -> list[Deployment]:
        return [d for d in self.deployments if d.model_name == name]

    @property
    def upstreams(self) -> list[Upstream]:
        """One per Envoy cluster: deployments on one host and port share it, whatever their
        base paths (the path is set per request)."""
        by_cluster = {d.upstream.cluster: d.upstream for d in self.deployments if d.upstream}
        return list(by_cluster.values())


SUPPORTED_ROUTING = {
    "simple-shuffle",
    "least-busy",
    "latency-based-routing",
    "usage-based-routing",
    "usage-based-routing-v2",
    "cost-based-routing",
}
# router_settings keys LiteLLM has and LLMux does not honour yet: each is a warning naming
# it, never silently ignored. (Unknown keys are warned about too.)
UNSUPPORTED_ROUTER_KEYS = {
    "cache_responses",
    "enable_pre_call_checks",
    "model_group_alias",
    "retry_after",
    "provider_budget_config",
    "enable_tag_filtering",
}
ROUTER_KEYS = {
    "routing_strategy",
    "routing_strategy_args",
    "num_retries",
    "retry_policy",
    "timeout",
    "stream_timeout",
    "fallbacks",
    "context_window_fallbacks",
    "content_policy_fallbacks",
    "default_fallbacks",
    "allowed_fails",
    "allowed_fails_policy",
    "cooldown_time",
    "disable_cooldowns",
    # Shared rate limits and budgets (redis_url below).
    "redis_host",
    "redis_port",
    "redis_password",
    "redis_url",
}
PRICE_KEYS = {
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "output_cost_per_reasoning_token",
}
VERTEX_ALIASES = {
    "vertex_ai_project": "vertex_project",
    "vertex_ai_location": "vertex_location",
    "vertex_ai_credentials": "vertex_credentials",
}
# general_settings and litellm_settings keys LLMux reads; any other key LiteLLM users
# write there (alerting, callbacks, caching, ...) is a warning naming it.
GENERAL_KEYS = {
    "master_key",
    "database_url",
    "user_api_key_cache_ttl",
    "disable_prisma_schema_update",
}
# Router settings LiteLLM also reads from litellm_settings (setting() in _parse_router).
LITELLM_ROUTER_KEYS = {
    "num_retries",
    "timeout",
    "request_timeout",
    "stream_timeout",
    "fallbacks",
    "context_window_fallbacks",
    "content_policy_fallbacks",
    "default_fallbacks",
    "allowed_fails",
    "cooldown_time",
    "disable_cooldowns",
}
CALLBACK_KEYS = ("callbacks", "success_callback", "failure_callback")
# Callback names LLMux honours; any other name in those lists is a warning naming it.
# "otel" turns tracing on (LiteLLM's way of asking for OpenTelemetry).
SUPPORTED_CALLBACKS = {"prometheus", "otel"}
LITELLM_KEYS = {
    "drop_params",
    # Secrets and privacy (README): /metrics on the listener, provider messages in the log.
    "require_auth_for_metrics_endpoint",
    "turn_off_message_logging",
    *CALLBACK_KEYS,
    *LITELLM_ROUTER_KEYS,
}
# The `llmux:` section (docs/configuration.md lists each; a test holds them to it).
LLMUX_KEYS = {
    "listen",
    "admin",
    "metrics",
    "workers",
    "runtime_dir",
    "request_timeout",
    "stream_idle_timeout",
    "stream_accounting",
    "connect_timeout",
    "max_request_body_bytes",
    "max_response_body_bytes",
    "access_log",
    "reload_poll_interval",
    "drain_timeout",
    "circuit_breaker",
    "tracing",
    "log_level",
    "listener_metrics",
    "spend_log_queue",
    # Slow and idle clients and overload (LIMIT_KEYS).
    "client_body_timeout",
    "connection_idle_timeout",
    "max_connections",
    "max_streams_per_worker",
}
KNOWN_SECTIONS = {
    "model_list",
    "router_settings",
    "general_settings",
    "litellm_settings",
    "environment_variables",
    "llmux",
}


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate a config file; None loads the embedded default."""
    return read_config(path)[1]


def read_config(path: str | os.PathLike[str] | None = None) -> tuple[str, Config]:
    """The file's text, read once, and the Config parsed from exactly that text: what
    `llmux run` validates is what it hands its workers (the runtime directory's snapshot),
    whatever the file holds by then."""
    if path is None:
        text = resources.files("llmux_extproc").joinpath("default_config.yaml").read_text()
        return text, parse_config(text, "<embedded default>")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return text, parse_config(text, str(path))


def file_stamp(path: str | os.PathLike[str] | None) -> tuple[int, int, int] | None:
    """What reload watchers compare to notice an edit (None: no file, or unreadable). The
    inode too: a file replaced by rename within one mtime tick and of the same size (the
    supervisor's snapshots) is still a new file."""
    if path is None:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    warnings = [f"{key}: unknown section, ignored" for key in raw if key not in KNOWN_SECTIONS]

    env_vars = _mapping(raw.get("environment_variables"), "environment_variables")
    # As in LiteLLM, the section fills the process environment (without overriding it), so
    # provider code reading standard variables (AWS_REGION, VERTEXAI_LOCATION) sees them.
    for key, value in env_vars.items():
        os.environ.setdefault(str(key), str(value))
    env = dict(os.environ)

    general = _mapping(raw.get("general_settings"), "general_settings")
    router = _mapping(raw.get("router_settings"), "router_settings")
    litellm = _mapping(raw.get("litellm_settings"), "litellm_settings")

    for section, table, known in (
        ("general_settings", general, GENERAL_KEYS),
        ("litellm_settings", litellm, LITELLM_KEYS),
    ):
        warnings.extend(
            f"{section}.{key}: not supported by LLMux, ignored"
            for key in sorted(set(table) - known)
        )
    for key in CALLBACK_KEYS:
        names = litellm.get(key) or []
        warnings.extend(
            f"litellm_settings.{key}: {name!r} not supported by LLMux, ignored"
            for name in ([names] if isinstance(names, str) else names)
            if name not in SUPPORTED_CALLBACKS
        )
    router_settings = _parse_router(router, litellm, warnings)

    master_key = general.get("master_key")
    if master_key is not None:
        master_key = _resolve_secret(master_key, "general_settings.master_key", env)
        if not master_key:
            raise ConfigError("general_settings.master_key: is empty")

    database_url = general.get("database_url")
    if database_url is not None:
        database_url = _resolve_secret(database_url, "general_settings.database_url", env)
    else:
        database_url = env.get("DATABASE_URL") or None
    if database_url is not None and master_key is None:
        warnings.append(
            "general_settings.database_url: virtual keys need general_settings.master_key; "
            "without it every request is let through and the management API is off"
        )
    redis_url = _redis_url(router, env)
    ttl = general.get("user_api_key_cache_ttl", 10.0)
    key_cache_ttl = _positive(ttl, "general_settings.user_api_key_cache_ttl")
    schema_update = not bool(general.get("disable_prisma_schema_update", False)) and env.get(
        "DISABLE_SCHEMA_UPDATE", ""
    ).lower() not in ("1", "true", "yes")

    llmux_raw = _mapping(raw.get("llmux"), "llmux")
    settings = _parse_settings(llmux_raw)
    settings = _listener_metrics(settings, raw.get("llmux") or {}, litellm)
    settings = _with_observability(settings, llmux_raw, litellm, env, warnings)
    message_logging = litellm.get("turn_off_message_logging", True) is False
    model_list = raw.get("model_list") or []
    if not isinstance(model_list, list):
        raise ConfigError("model_list: must be a list")
    drop_params = bool(litellm.get("drop_params", False))
    deployments = tuple(
        _parse_deployment(i, item, env, drop_params, warnings) for i, item in enumerate(model_list)
    )
    ids = [d.id for d in deployments]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ConfigError(f"model_list: duplicate model_info.id {sorted(dup)}")
    names = {d.model_name for d in deployments}
    for where, table in (
        ("fallbacks", router_settings.fallbacks),
        ("context_window_fallbacks", router_settings.context_window_fallbacks),
        ("content_policy_fallbacks", router_settings.content_policy_fallbacks),
        ("default_fallbacks", {"*": router_settings.default_fallbacks}),
    ):
        for group, targets in table.items():
            for name in (group, *targets):
                if name != "*" and name not in names:
                    raise ConfigError(
                        f"router_settings.{where}: {name!r} is not a model_name in model_list"
                    )

    return Config(
        deployments=deployments,
        settings=settings,
        master_key=master_key,
        router=router_settings,
        drop_params=drop_params,
        warnings=tuple(warnings),
        database_url=database_url,
        key_cache_ttl_s=key_cache_ttl,
        schema_update=schema_update,
        litellm_metrics=prometheus_callback(litellm),
        message_logging=message_logging,
        redis_url=redis_url,
    )


LISTENER_METRICS = ("auth", "open", "off")


def _listener_metrics(settings: Settings, raw: dict[str, Any], litellm: dict[str, Any]) -> Settings:
    """llmux.listener_metrics, else LiteLLM's require_auth_for_metrics_endpoint (false:
    open), else "auth"."""
    if "listener_metrics" in raw:
        given = raw["listener_metrics"]
        # YAML 1.1 reads a bare `off` as false.
        value = _choice(
            "off" if given is False else given, "llmux.listener_metrics", LISTENER_METRICS
        )
    elif litellm.get("require_auth_for_metrics_endpoint") is False:
        value = "open"
    else:
        value = "auth"
    return dataclasses.replace(settings, listener_metrics=value)


def prometheus_callback(litellm: dict[str, Any]) -> bool:
    """Whether litellm_settings asks for LiteLLM's Prometheus metrics, in any of the lists
    LiteLLM reads callbacks from."""
    for key in CALLBACK_KEYS:
        names = litellm.get(key) or []
        if isinstance(names, str):
            names = [names]
        if isinstance(names, list) and "prometheus" in names:
            return True
    return False


def _redis_url(router: dict[str, Any], env: dict[str, str]) -> str | None:
    """LiteLLM's Redis settings: router_settings.redis_url, else redis_host/redis_port/
    redis_password, else REDIS_URL, else REDIS_HOST/REDIS_PORT/REDIS_PASSWORD."""
    w = "router_settings"
    url = router.get("redis_url")
    if url is not None:
        return _resolve_secret(url, f"{w}.redis_url", env)
    host = router.get("redis_host")
    port: Any = router.get("redis_port")
    password = router.get("redis_password")
    if host is not None:
        host = _resolve_secret(host, f"{w}.redis_host", env)
        if port is not None:
            port = _resolve_secret(str(port), f"{w}.redis_port", env)
        if password is not None:
            password = _resolve_secret(password, f"{w}.redis_password", env)
    elif env.get("REDIS_URL"):
        return env["REDIS_URL"]
    else:
        host, port, password = (
            env.get("REDIS_HOST"),
            env.get("REDIS_PORT"),
            env.get("REDIS_PASSWORD"),
        )
    if not host:
        return None
    try:
        number = int(port or 6379)
    except ValueError:
        raise ConfigError(f"{w}.redis_port: expected a port number, got {port!r}") from None
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{number}/0"


def _parse_deployment(
    index: int, item: Any, env: dict[str, str], drop_params: bool, warnings: list[str]
) -> Deployment:
    where = f"model_list[{index}]"
    item = _mapping(item, where)
    model_name = _str(item.get("model_name"), f"{where}.model_name")
    params = dict(_mapping(item.get("litellm_params"), f"{where}.litellm_params"))
    model_info = dict(_mapping(item.get("model_info"), f"{where}.model_info"))
    model_field = f"{where}.litellm_params.model"
    full_model = _str(params.pop("model", None), model_field)
    provider, sep, model = full_model.partition("/")
    if not sep or not model:
        raise ConfigError(f"{model_field}: expected 'provider/model', got {full_model!r}")
    spec = PROVIDERS.get(provider)
    if spec is None:
        supported = ", ".join(sorted(PROVIDERS))
        raise ConfigError(
            f"{model_field}: provider {provider!r} is not supported (supported: {supported})"
        )

    # LiteLLM's names for the same thing: base_url is completion()'s alias of api_base;
    # Vertex takes vertex_ai_project/_location/_credentials as well.
    base_url = params.pop("base_url", None)
    for alias, name in VERTEX_ALIASES.items():
        if alias in params:
            value = params.pop(alias)
            params.setdefault(name, value)
    params_where = f"{where}.litellm_params"
    api_base, base_where = params.pop("api_base", None), f"{params_where}.api_base"
    if not api_base and base_url:
        api_base, base_where = base_url, f"{params_where}.base_url"
    for var in () if api_base else spec.api_base_env:
        if env.get(var):
            api_base, base_where = env[var], f"{params_where}.api_base (from ${var})"
            break
    api_base = api_base or spec.default_api_base
    if not api_base and spec.derive_api_base:
        api_base = spec.derive_api_base(params, env)
        # aws_bedrock_runtime_endpoint, a region, a location: the message shows the value.
        base_where = f"{params_where} (the endpoint derived from them)"
    upstream = None
    if spec.needs_upstream:
        if not api_base:
            raise ConfigError(f"{params_where}.api_base: required for {provider!r}")
        api_base = _resolve_secret(api_base, base_where, env)
        upstream = _parse_upstream(api_base, base_where)

    api_key = params.pop("api_key", None)
    if api_key is not None:
        api_key = _resolve_secret(api_key, f"{where}.litellm_params.api_key", env)
    elif spec.api_key_env:
        api_key = env.get(spec.api_key_env)

    for key, value in params.items():  # LiteLLM resolves os.environ/ in any parameter
        if isinstance(value, str) and value.startswith("os.environ/"):
            params[key] = _resolve_secret(value, f"{where}.litellm_params.{key}", env)

    rpm = _opt_int(params.pop("rpm", None), f"{where}.litellm_params.rpm")
    tpm = _opt_int(params.pop("tpm", None), f"{where}.litellm_params.tpm")
    weight = params.pop("weight", 1)
    if not isinstance(weight, int | float) or weight <= 0:
        raise ConfigError(f"{where}.litellm_params.weight: must be a positive number")
    timeout = params.pop("timeout", None)
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise ConfigError(f"{where}.litellm_params.timeout: must be a positive number of seconds")

    for key in PRICE_KEYS & params.keys():
        value = params[key]
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}.litellm_params.{key}: must be a non-negative number")

    max_parallel = _opt_int(
        params.pop("max_parallel_requests", None), f"{where}.litellm_params.max_parallel_requests"
    )
    dep_drop_params = bool(params.pop("drop_params", drop_params))
    if spec.params is not None:
        for key in sorted(params.keys() - spec.params - PRICE_KEYS):
            warnings.append(
                f"{where}.litellm_params.{key}: not used by LLMux for provider {provider!r};"
                " ignored"
            )
    dep_id = model_info.get("id")
    if dep_id is None:
        # Stable across reloads, so metrics and logs keep one name per deployment.
        digest = hashlib.sha256(f"{model_name}|{full_model}|{api_base}".encode()).hexdigest()
        dep_id = digest[:12]
    return Deployment(
        model_name=model_name,
        id=str(dep_id),
        provider=provider,
        model=model,
        upstream=upstream,
        api_key=api_key,
        rpm=rpm,
        tpm=tpm,
        weight=float(weight),
        timeout_s=float(timeout) if timeout is not None else None,
        params=params,
        model_info=model_info,
        drop_params=dep_drop_params,
        max_parallel_requests=max_parallel,
    )


def _parse_router(
    router: dict[str, Any], litellm: dict[str, Any], warnings: list[str]
) -> RouterSettings:
    w = "router_settings"
    for key in router:
        if key in UNSUPPORTED_ROUTER_KEYS:
            warnings.append(f"{w}.{key}: not supported yet, ignored")
        elif key not in ROUTER_KEYS:
            warnings.append(f"{w}.{key}: unknown setting, ignored")
    strategy = _str(router.get("routing_strategy", "simple-shuffle"), f"{w}.routing_strategy")
    if strategy not in SUPPORTED_ROUTING:
        warnings.append(
            f"{w}.routing_strategy: {strategy!r} is not supported; using 'simple-shuffle'"
        )
        strategy = "simple-shuffle"

    def setting(key: str, default: Any) -> Any:
        # LiteLLM reads several of these from litellm_settings as well.
        return router.get(key, litellm.get(key, default))

    retry_policy = _mapping(router.get("retry_policy"), f"{w}.retry_policy")
    for key, value in retry_policy.items():
        if key not in RETRY_CLASSES:
            warnings.append(f"{w}.retry_policy.{key}: unknown error class, ignored")
        _int(value, f"{w}.retry_policy.{key}")
    allowed_fails_policy = _mapping(router.get("allowed_fails_policy"), f"{w}.allowed_fails_policy")
    for key, value in allowed_fails_policy.items():
        _int(value, f"{w}.allowed_fails_policy.{key}")
    timeout = setting("timeout", setting("request_timeout", None))
    stream_timeout = setting("stream_timeout", None)
    return RouterSettings(
        routing_strategy=strategy,
        routing_strategy_args=dict(
            _mapping(router.get("routing_strategy_args"), f"{w}.routing_strategy_args")
        ),
        num_retries=_int(setting("num_retries", 0), f"{w}.num_retries"),
        retry_policy={k: v for k, v in retry_policy.items() if k in RETRY_CLASSES},
        timeout_s=None if timeout is None else _positive(timeout, f"{w}.timeout"),
        stream_timeout_s=None
        if stream_timeout is None
        else _positive(stream_timeout, f"{w}.stream_timeout"),
        fallbacks=_fallbacks(setting("fallbacks", None), f"{w}.fallbacks"),
        context_window_fallbacks=_fallbacks(
            setting("context_window_fallbacks", None), f"{w}.context_window_fallbacks"
        ),
        content_policy_fallbacks=_fallbacks(
            setting("content_policy_fallbacks", None), f"{w}.content_policy_fallbacks"
        ),
        default_fallbacks=tuple(
            _str(v, f"{w}.default_fallbacks[{i}]")
            for i, v in enumerate(
                _list(setting("default_fallbacks", None), f"{w}.default_fallbacks")
            )
        ),
        allowed_fails=_int(setting("allowed_fails", 3), f"{w}.allowed_fails"),
        allowed_fails_policy=dict(allowed_fails_policy),
        cooldown_time_s=_non_negative(setting("cooldown_time", 5.0), f"{w}.cooldown_time"),
        disable_cooldowns=bool(setting("disable_cooldowns", False)),
    )


def _fallbacks(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    """LiteLLM's shape: a list of one-key mappings, `[{"gpt-4o": ["claude", "llama"]}]`."""
    out: dict[str, tuple[str, ...]] = {}
    for i, item in enumerate(_list(value, where)):
        entry = _mapping(item, f"{where}[{i}]")
        for group, targets in entry.items():
            if isinstance(targets, str):
                targets = [targets]
            names = _list(targets, f"{where}[{i}].{group}")
            out[str(group)] = tuple(_str(t, f"{where}[{i}].{group}") for t in names)
    return out


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: must be a list, got {type(value).__name__}")
    return value


def _non_negative(value: Any, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{where}: must be a non-negative number, got {value!r}")
    return float(value)


def _parse_upstream(api_base: str, where: str) -> Upstream:
    try:
        parts = urlsplit(api_base)
    except ValueError as exc:  # a bracketed host that is no IPv6 address
        raise ConfigError(f"{where}: expected an http(s) URL, got {api_base!r}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: expected an http(s) URL, got {api_base!r}")
    try:
        port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ConfigError(f"{where}: bad port in {api_base!r}") from exc
    if port == 0:
        raise ConfigError(f"{where}: bad port in {api_base!r}")
    _check_host(parts.hostname, api_base, where)
    return Upstream(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def _check_host(host: str, api_base: str, where: str) -> None:
    """An IP address, or a name DNS can have. A dotted-number host that is no IPv4 address
    (10.0.0.256) would otherwise become a name Envoy looks up forever: every request
    `no healthy upstream`."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ConfigError(f"{where}: {host!r} in {api_base!r} is not an IPv6 address") from exc
        return
    if all(part.isdigit() for part in host.split(".")):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as exc:
            raise ConfigError(f"{where}: {host!r} in {api_base!r} is not an IPv4 address") from exc
        return
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"{where}: {host!r} in {api_base!r} is not a valid host name")
    if labels[-1].isdigit():
        # RFC 1123: a top-level label is never all digits, so 1.2.3.4x.5 is no name either.
        raise ConfigError(f"{where}: {host!r} in {api_base!r} is neither an IP address nor a name")


def _parse_settings(raw: dict[str, Any]) -> Settings:
    unknown = sorted(set(raw) - LLMUX_KEYS)
    if unknown:
        raise ConfigError(f"llmux: unknown setting(s) {unknown}; known: {sorted(LLMUX_KEYS)}")
    workers = _int(raw.get("workers", 1), "llmux.workers")
    if not 1 <= workers <= 64:
        raise ConfigError("llmux.workers: must be between 1 and 64")
    runtime_dir = raw.get("runtime_dir")
    return Settings(
        listen=Listen.parse(
            _str(raw.get("listen", "0.0.0.0:4000"), "llmux.listen"), "llmux.listen"
        ),
        admin=Listen.parse(_str(raw.get("admin", "127.0.0.1:9901"), "llmux.admin"), "llmux.admin"),
        metrics=Listen.parse(
            _str(raw.get("metrics", "127.0.0.1:9464"), "llmux.metrics"), "llmux.metrics"
        ),
        workers=workers,
        runtime_dir=_str(runtime_dir, "llmux.runtime_dir") if runtime_dir is not None else None,
        request_timeout_s=_positive(raw.get("request_timeout", 600), "llmux.request_timeout"),
        stream_idle_timeout_s=_positive(
            raw.get("stream_idle_timeout", 60), "llmux.stream_idle_timeout"
        ),
        stream_accounting=_choice(
            raw.get("stream_accounting", "envoy"), "llmux.stream_accounting", ("envoy", "processor")
        ),
        connect_timeout_s=_positive(raw.get("connect_timeout", 10), "llmux.connect_timeout"),
        max_request_body_bytes=_int(
            raw.get("max_request_body_bytes", 32 * 1024 * 1024), "llmux.max_request_body_bytes"
        ),
        max_response_body_bytes=_int(
            raw.get("max_response_body_bytes", 32 * 1024 * 1024), "llmux.max_response_body_bytes"
        ),
        access_log=_access_log(raw.get("access_log", "stdout")),
        reload_poll_s=_positive(raw.get("reload_poll_interval", 1.0), "llmux.reload_poll_interval"),
        drain_timeout_s=_positive(raw.get("drain_timeout", 60), "llmux.drain_timeout"),
        breaker=_breaker(_mapping(raw.get("circuit_breaker"), "llmux.circuit_breaker")),
        spend_log_queue=_spend_log_queue(raw.get("spend_log_queue", 50_000)),
        **_limits(raw),
    )


def _with_observability(
    settings: Settings,
    llmux: dict[str, Any],
    litellm: dict[str, Any],
    env: dict[str, str],
    warnings: list[str],
) -> Settings:
    """llmux.tracing (or LiteLLM's callbacks: ["otel"]) and llmux.log_level."""
    callbacks: list[Any] = []  # names other than otel and prometheus are warned about above
    for key in CALLBACK_KEYS:
        value = litellm.get(key) or []
        callbacks += value if isinstance(value, list) else [value]
    try:
        tracing = parse_tracing(
            _mapping(llmux.get("tracing"), "llmux.tracing"), callbacks, env, warnings
        )
        levels = parse_log_levels(llmux.get("log_level"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return replace(settings, tracing=tracing, log_levels=levels)


def _spend_log_queue(value: Any) -> int:
    size = _int(value, "llmux.spend_log_queue")
    if size < 1:
        raise ConfigError("llmux.spend_log_queue: must be at least 1 (rows per worker)")
    return size


# llmux: keys for slow and idle clients and overload -> Settings fields.
LIMIT_KEYS = {
    "client_body_timeout": "client_body_timeout_s",
    "connection_idle_timeout": "connection_idle_timeout_s",
    "max_connections": "max_connections",
    "max_streams_per_worker": "max_streams_per_worker",
}


def _limits(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, name in LIMIT_KEYS.items():
        if key not in raw:
            continue
        where = f"llmux.{key}"
        if key in ("max_connections", "max_streams_per_worker"):
            value = _int(raw[key], where)
            if value < 1:
                raise ConfigError(f"{where}: must be at least 1, got {value}")
            out[name] = value
        else:
            out[name] = _positive(raw[key], where)
    return out


def _access_log(value: Any) -> str:
    # YAML 1.1 reads a bare `off` (as the README writes it) as false.
    if value is False:
        return "off"
    if value is True:
        raise ConfigError(
            "llmux.access_log: write stdout, off or a file path (YAML reads on/true as true)"
        )
    return _str(value, "llmux.access_log")


BREAKER_KEYS = {
    "failure_rate": "failure_rate",
    "min_requests": "min_requests",
    "window": "window_s",
    "open_time": "open_s",
    "half_open_probes": "half_open_probes",
}


def _breaker(raw: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in raw.items():
        if key not in BREAKER_KEYS:
            raise ConfigError(
                f"llmux.circuit_breaker.{key}: unknown; known: {sorted(BREAKER_KEYS)}"
            )
        out[BREAKER_KEYS[key]] = _positive(value, f"llmux.circuit_breaker.{key}")
    return out


def _resolve_secret(value: Any, where: str, env: dict[str, str]) -> str:
    text = _str(value, where)
    if text.startswith("os.environ/"):
        name = text[len("os.environ/") :]
        if name not in env:
            raise ConfigError(f"{where}: environment variable {name!r} is not set")
        return env[name]
    return text


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(value).__name__}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: must be a non-empty string, got {value!r}")
    return str(value)


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: must be one of {list(choices)}, got {value!r}")
    return str(value)


def _int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{where}: must be a non-negative integer, got {value!r}")
    return value


def _opt_int(value: Any, where: str) -> int | None:
    return None if value is None else _int(value, where)


def _positive(value: Any, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where}: must be a positive number, got {value!r}")
    return float(value)
