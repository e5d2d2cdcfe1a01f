"""The one LLMux configuration: LiteLLM's config.yaml plus an `llmux:` section.

Everything else (Envoy's bootstrap and clusters, the ext_proc's routing table) is derived
from the `Config` this module builds, so nothing is kept twice. Parsing is strict about the
fields LLMux uses and names the field and the problem; unknown LiteLLM settings are reported
as warnings, never silently treated as honoured.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

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


@dataclass(frozen=True, slots=True)
class Config:
    deployments: tuple[Deployment, ...]
    settings: Settings
    master_key: str | None = field(repr=False)
    routing_strategy: str
    num_retries: int
    drop_params: bool
    warnings: tuple[str, ...] = ()

    @property
    def model_names(self) -> list[str]:
        return list(dict.fromkeys(d.model_name for d in self.deployments))

    @property
    def upstreams(self) -> list[Upstream]:
        """One per Envoy cluster: deployments on one host and port share it, whatever their
        base paths (the path is set per request)."""
        by_cluster = {d.upstream.cluster: d.upstream for d in self.deployments if d.upstream}
        return list(by_cluster.values())


SUPPORTED_ROUTING = {"simple-shuffle"}
PRICE_KEYS = {
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "output_cost_per_reasoning_token",
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
    if path is None:
        text = resources.files("llmux_extproc").joinpath("default_config.yaml").read_text()
        return parse_config(text, "<embedded default>")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_config(text, str(path))


def file_stamp(path: str | os.PathLike[str] | None) -> tuple[float, int] | None:
    """What reload watchers compare to notice an edit (None: no file, or unreadable)."""
    if path is None:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (st.st_mtime, st.st_size)


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

    strategy = _str(
        router.get("routing_strategy", "simple-shuffle"), "router_settings.routing_strategy"
    )
    if strategy not in SUPPORTED_ROUTING:
        warnings.append(
            f"router_settings.routing_strategy: {strategy!r} is not supported yet; "
            "using 'simple-shuffle'"
        )
        strategy = "simple-shuffle"
    num_retries = _int(router.get("num_retries", litellm.get("num_retries", 0)), "num_retries")
    for key in ("fallbacks", "context_window_fallbacks", "redis_host", "cache_responses"):
        if key in router:
            warnings.append(f"router_settings.{key}: not supported yet, ignored")

    master_key = general.get("master_key")
    if master_key is not None:
        master_key = _resolve_secret(master_key, "general_settings.master_key", env)
        if not master_key:
            raise ConfigError("general_settings.master_key: is empty")

    settings = _parse_settings(_mapping(raw.get("llmux"), "llmux"))
    model_list = raw.get("model_list") or []
    if not isinstance(model_list, list):
        raise ConfigError("model_list: must be a list")
    drop_params = bool(litellm.get("drop_params", False))
    deployments = tuple(
        _parse_deployment(i, item, env, drop_params) for i, item in enumerate(model_list)
    )
    ids = [d.id for d in deployments]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ConfigError(f"model_list: duplicate model_info.id {sorted(dup)}")

    return Config(
        deployments=deployments,
        settings=settings,
        master_key=master_key,
        routing_strategy=strategy,
        num_retries=num_retries,
        drop_params=drop_params,
        warnings=tuple(warnings),
    )


def _parse_deployment(index: int, item: Any, env: dict[str, str], drop_params: bool) -> Deployment:
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

    api_base = params.pop("api_base", None) or spec.default_api_base
    if not api_base and spec.derive_api_base:
        api_base = spec.derive_api_base(params, env)
    upstream = None
    if spec.needs_upstream:
        if not api_base:
            raise ConfigError(f"{where}.litellm_params.api_base: required for {provider!r}")
        api_base = _resolve_secret(api_base, f"{where}.litellm_params.api_base", env)
        upstream = _parse_upstream(api_base, f"{where}.litellm_params.api_base")

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

    dep_drop_params = bool(params.pop("drop_params", drop_params))
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
    )


def _parse_upstream(api_base: str, where: str) -> Upstream:
    parts = urlsplit(api_base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: expected an http(s) URL, got {api_base!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ConfigError(f"{where}: bad port in {api_base!r}") from exc
    return Upstream(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def _parse_settings(raw: dict[str, Any]) -> Settings:
    known = {
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
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"llmux: unknown setting(s) {unknown}; known: {sorted(known)}")
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
        access_log=_str(raw.get("access_log", "stdout"), "llmux.access_log"),
        reload_poll_s=_positive(raw.get("reload_poll_interval", 1.0), "llmux.reload_poll_interval"),
    )


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
