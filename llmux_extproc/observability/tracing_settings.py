"""Where traces go: the `llmux.tracing` section, the standard `OTEL_*` variables, and
LiteLLM's `litellm_settings.callbacks: ["otel"]` with its own `OTEL_EXPORTER`,
`OTEL_ENDPOINT` and `OTEL_HEADERS`.

One `TracingSettings` feeds both tracers: Envoy's (`control/envoy_tracing.py`: the
request's span, one per upstream attempt, the attributes LLMux leaves in metadata) and the
workers' (`observability/tracing.py`: authentication, translation, translated answers).
Precedence per setting: the config, else the OTLP variable for traces, else the generic
OTLP variable, else LiteLLM's variable, else the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

PROTOCOLS = ("grpc", "http/protobuf")
# LiteLLM's OTEL_EXPORTER values; `console` has no OTLP counterpart here.
_LITELLM_EXPORTERS = {"otlp_grpc": "grpc", "grpc": "grpc", "otlp_http": "http/protobuf"}
_DEFAULT_ENDPOINT = {"grpc": "http://127.0.0.1:4317", "http/protobuf": "http://127.0.0.1:4318"}
TRACING_KEYS = {
    "enabled",
    "endpoint",
    "protocol",
    "headers",
    "sampling_ratio",
    "service_name",
    "capture_message_content",
    "export_timeout",
}


class TracingConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TracingSettings:
    enabled: bool = False
    protocol: str = "grpc"
    # For grpc: scheme://host:port; for http/protobuf: the full URL spans are POSTed to.
    endpoint: str = _DEFAULT_ENDPOINT["grpc"]
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may hold keys
    sampling_ratio: float = 1.0  # of requests without a sampled client traceparent
    service_name: str = "llmux"
    capture_message_content: bool = False  # prompts and answers as span events
    export_timeout_s: float = 10.0

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.endpoint)
        if parts.port is not None:
            return parts.port
        if parts.scheme == "https":
            return 443
        return 4317 if self.protocol == "grpc" else 4318

    @property
    def tls(self) -> bool:
        return urlsplit(self.endpoint).scheme == "https"


def parse_headers(text: str) -> tuple[tuple[str, str], ...]:
    """`key=value,key2=value2`, values percent-decoded (the OTLP exporter spec's format,
    which LiteLLM's OTEL_HEADERS uses too)."""
    out = []
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TracingConfigError(f"expected key=value, got {item.strip()!r}")
        out.append((key.strip().lower(), unquote(value.strip())))
    return tuple(out)


def _ratio_from_sampler(env: Mapping[str, str]) -> float | None:
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not sampler:
        return None
    if sampler in ("always_on", "parentbased_always_on"):
        return 1.0
    if sampler in ("always_off", "parentbased_always_off"):
        return 0.0
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        try:
            return min(1.0, max(0.0, float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))))
        except ValueError as exc:
            raise TracingConfigError(
                f"OTEL_TRACES_SAMPLER_ARG: not a number: {env['OTEL_TRACES_SAMPLER_ARG']!r}"
            ) from exc
    raise TracingConfigError(f"OTEL_TRACES_SAMPLER: {sampler!r} is not supported")


def parse_tracing(
    raw: Mapping[str, Any],
    callbacks: list[Any],
    env: Mapping[str, str],
    warnings: list[str],
) -> TracingSettings:
    """`raw` is `llmux.tracing`; `callbacks` LiteLLM's `litellm_settings.callbacks` (plus
    `success_callback`), where "otel" turns tracing on as it does in LiteLLM."""
    unknown = sorted(set(raw) - TRACING_KEYS)
    if unknown:
        raise TracingConfigError(
            f"llmux.tracing: unknown setting(s) {unknown}; known: {sorted(TRACING_KEYS)}"
        )
    enabled = raw.get("enabled")
    if enabled is None:
        enabled = "otel" in callbacks
    if not isinstance(enabled, bool):
        raise TracingConfigError(f"llmux.tracing.enabled: must be true or false, got {enabled!r}")
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        if enabled:
            warnings.append("OTEL_SDK_DISABLED=true: tracing is off")
        enabled = False

    litellm_exporter = env.get("OTEL_EXPORTER", "").strip().lower()
    protocol = raw.get("protocol") or (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or _LITELLM_EXPORTERS.get(litellm_exporter)
        or "grpc"
    )
    if litellm_exporter and litellm_exporter not in _LITELLM_EXPORTERS and enabled:
        warnings.append(
            f"OTEL_EXPORTER={litellm_exporter}: not supported, spans go over OTLP ({protocol})"
        )
    if protocol not in PROTOCOLS:
        raise TracingConfigError(
            f"llmux.tracing.protocol: must be one of {list(PROTOCOLS)}, got {protocol!r}"
            " (http/json is not supported: use http/protobuf)"
        )

    endpoint = raw.get("endpoint")
    if endpoint is None:
        specific = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        generic = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_ENDPOINT")
        if specific:
            endpoint = specific
        elif generic:
            # The spec: the generic variable is a base URL, /v1/traces is added for HTTP.
            if protocol == "http/protobuf" and not generic.rstrip("/").endswith("/v1/traces"):
                endpoint = generic.rstrip("/") + "/v1/traces"
            else:
                endpoint = generic
        else:
            endpoint = _DEFAULT_ENDPOINT[protocol]
            if protocol == "http/protobuf":
                endpoint += "/v1/traces"
    if not isinstance(endpoint, str) or not endpoint:
        raise TracingConfigError(f"llmux.tracing.endpoint: must be a URL, got {endpoint!r}")
    if "://" not in endpoint:
        endpoint = "http://" + endpoint  # gRPC collectors are often written host:port
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TracingConfigError(
            f"llmux.tracing.endpoint: expected http(s)://host:port, got {endpoint!r}"
        )

    headers_raw = raw.get("headers")
    if headers_raw is None:
        text = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            or env.get("OTEL_EXPORTER_OTLP_HEADERS")
            or env.get("OTEL_HEADERS")
            or ""
        )
        try:
            headers = parse_headers(text)
        except TracingConfigError as exc:
            raise TracingConfigError(f"OTEL_EXPORTER_OTLP_HEADERS: {exc}") from exc
    elif isinstance(headers_raw, dict):
        pairs = []
        for key, value in headers_raw.items():
            text = str(value)
            if text.startswith("os.environ/"):  # LiteLLM's way of naming a secret
                name = text[len("os.environ/") :]
                if name not in env:
                    raise TracingConfigError(
                        f"llmux.tracing.headers.{key}: environment variable {name!r} is not set"
                    )
                text = env[name]
            pairs.append((str(key).lower(), text))
        headers = tuple(pairs)
    else:
        raise TracingConfigError("llmux.tracing.headers: must be a mapping of header: value")

    ratio = raw.get("sampling_ratio")
    if ratio is None:
        ratio = _ratio_from_sampler(env)
    if ratio is None:
        ratio = 1.0
    if not isinstance(ratio, int | float) or isinstance(ratio, bool) or not 0 <= ratio <= 1:
        raise TracingConfigError(
            f"llmux.tracing.sampling_ratio: must be between 0 and 1, got {ratio!r}"
        )
    service = raw.get("service_name") or env.get("OTEL_SERVICE_NAME") or "llmux"
    capture = raw.get("capture_message_content", False)
    if not isinstance(capture, bool):
        raise TracingConfigError("llmux.tracing.capture_message_content: must be true or false")
    timeout = raw.get("export_timeout", 10)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise TracingConfigError("llmux.tracing.export_timeout: must be a positive number")
    return TracingSettings(
        enabled=enabled,
        protocol=str(protocol),
        endpoint=endpoint,
        headers=headers,
        sampling_ratio=float(ratio),
        service_name=str(service),
        capture_message_content=capture,
        export_timeout_s=float(timeout),
    )
