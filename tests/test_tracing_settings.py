"""llmux.tracing, the OTEL_* variables and LiteLLM's callbacks: ["otel"]; what Envoy gets."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from llmux_extproc.control.config import ConfigError, parse_config
from llmux_extproc.control.envoy_config import RuntimePaths, bootstrap
from llmux_extproc.control.envoy_tracing import OTLP_CLUSTER
from llmux_extproc.observability.tracing import answer_marks, request_marks
from llmux_extproc.observability.tracing_settings import (
    TracingConfigError,
    TracingSettings,
    parse_headers,
    parse_tracing,
)


def tracing(raw: dict[str, Any], env: dict[str, str] | None = None, callbacks: Any = ()) -> Any:
    warnings: list[str] = []
    return parse_tracing(raw, list(callbacks), env or {}, warnings), warnings


def test_off_by_default_even_with_otel_variables() -> None:
    t, _ = tracing({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert not t.enabled


def test_litellm_callback_turns_it_on_with_litellm_variables() -> None:
    env = {
        "OTEL_EXPORTER": "otlp_http",
        "OTEL_ENDPOINT": "https://otel.example.com",
        "OTEL_HEADERS": "Authorization=Bearer%20k,x-team=a",
    }
    t, warnings = tracing({}, env, ["otel"])
    assert t.enabled and t.protocol == "http/protobuf"
    assert t.endpoint == "https://otel.example.com/v1/traces"
    assert t.headers == (("authorization", "Bearer k"), ("x-team", "a"))
    assert (t.host, t.port, t.tls) == ("otel.example.com", 443, True)
    assert warnings == []


def test_standard_variables_and_their_precedence() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4317",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_SERVICE_NAME": "gw",
    }
    t, _ = tracing({"enabled": True}, env)
    assert (t.endpoint, t.protocol, t.sampling_ratio, t.service_name) == (
        "http://traces:4317",
        "grpc",
        0.25,
        "gw",
    )
    # The config wins over the variables.
    t, _ = tracing({"enabled": True, "endpoint": "collector:4317", "sampling_ratio": 1}, env)
    assert t.endpoint == "http://collector:4317" and t.sampling_ratio == 1.0


def test_generic_http_endpoint_gets_the_traces_path() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
    t, _ = tracing({"enabled": True}, env)
    assert t.endpoint == "http://c:4318/v1/traces"
    t, _ = tracing({"enabled": True, "protocol": "http/protobuf"})
    assert t.endpoint == "http://127.0.0.1:4318/v1/traces"


def test_header_values_may_name_environment_variables() -> None:
    t, _ = tracing({"enabled": True, "headers": {"X-Key": "os.environ/KEY"}}, {"KEY": "v"})
    assert t.headers == (("x-key", "v"),)
    with pytest.raises(TracingConfigError, match="'MISSING' is not set"):
        tracing({"headers": {"x": "os.environ/MISSING"}})


def test_sdk_disabled_wins() -> None:
    t, warnings = tracing({"enabled": True}, {"OTEL_SDK_DISABLED": "true"})
    assert not t.enabled
    assert warnings == ["OTEL_SDK_DISABLED=true: tracing is off"]


@pytest.mark.parametrize(
    ("raw", "env", "needle"),
    [
        ({"protocol": "http/json"}, {}, "http/json is not supported"),
        ({"sampling_ratio": 2}, {}, "sampling_ratio: must be between 0 and 1"),
        ({"endpoint": "ftp://x"}, {}, "expected http"),
        ({"enabled": "yes"}, {}, "enabled: must be true or false"),
        ({"colour": 1}, {}, "unknown setting"),
        ({}, {"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "not supported"),
        ({}, {"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "expected key=value"),
    ],
)
def test_bad_settings_are_refused_naming_them(
    raw: dict[str, Any], env: dict[str, str], needle: str
) -> None:
    with pytest.raises(TracingConfigError, match=needle):
        tracing(raw, env)


def test_config_errors_and_callbacks_warnings_in_parse_config() -> None:
    with pytest.raises(ConfigError, match=re.escape("llmux.tracing.sampling_ratio")):
        parse_config("llmux:\n  tracing: {sampling_ratio: -1}\n")
    config = parse_config("litellm_settings:\n  callbacks: [otel, langfuse]\n")
    assert config.settings.tracing.enabled
    assert config.warnings == (
        "litellm_settings.callbacks: 'langfuse' not supported by LLMux, ignored",
    )
    config = parse_config("litellm_settings:\n  success_callback: [langfuse]\n")
    assert not config.settings.tracing.enabled


def test_headers_are_not_in_the_repr() -> None:
    assert "s3cret" not in repr(TracingSettings(headers=(("authorization", "s3cret"),)))
    assert parse_headers("a=1, b = x%3Dy ,") == (("a", "1"), ("b", "x=y"))


def envoy_bootstrap(text: str, tmp_path: Path) -> dict[str, Any]:
    doc = bootstrap(parse_config(text), RuntimePaths(tmp_path), static_clusters=True)
    parsed: dict[str, Any] = orjson.loads(orjson.dumps(doc))
    return parsed


def hcm(doc: dict[str, Any]) -> dict[str, Any]:
    listener = doc["static_resources"]["listeners"][0]
    return dict(listener["filter_chains"][0]["filters"][0]["typed_config"])


def test_envoy_has_no_tracer_and_no_collector_when_off(tmp_path: Path) -> None:
    doc = envoy_bootstrap("llmux: {}\n", tmp_path)
    assert "tracing" not in hcm(doc)
    assert OTLP_CLUSTER not in [c["name"] for c in doc["static_resources"]["clusters"]]


def test_envoy_tracer_grpc(tmp_path: Path) -> None:
    doc = envoy_bootstrap(
        "llmux:\n  tracing: {enabled: true, endpoint: 'http://10.1.2.3:4317',"
        " sampling_ratio: 0.1, headers: {api-key: k}}\n",
        tmp_path,
    )
    t = hcm(doc)["tracing"]
    # Envoy's own random sampling lets everything through; the tracer's sampler decides
    # (parent-based, then the ratio).
    assert t["random_sampling"] == {"value": 100}
    sampler = t["provider"]["typed_config"]["sampler"]
    assert sampler["name"] == "envoy.tracers.opentelemetry.samplers.parent_based"
    ratio = sampler["typed_config"]["wrapped_sampler"]["typed_config"]["sampling_percentage"]
    assert ratio == {"numerator": 100_000, "denominator": "MILLION"}
    assert t["spawn_upstream_span"] is True
    config = t["provider"]["typed_config"]
    assert config["grpc_service"]["envoy_grpc"]["cluster_name"] == OTLP_CLUSTER
    assert config["grpc_service"]["initial_metadata"] == [{"key": "api-key", "value": "k"}]
    tags = {tag["tag"]: tag for tag in t["custom_tags"]}
    assert tags["gen_ai.request.model"]["metadata"]["metadata_key"]["key"] == "llmux.request"
    assert tags["gen_ai.usage.input_tokens"]["metadata"]["metadata_key"]["path"] == [
        {"key": "prompt_tokens"}
    ]
    cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == OTLP_CLUSTER)
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert address["address"]["socket_address"] == {"address": "10.1.2.3", "port_value": 4317}
    assert "http2_protocol_options" in str(cluster)


def test_envoy_tracer_http_with_tls(tmp_path: Path) -> None:
    doc = envoy_bootstrap(
        "llmux:\n  tracing: {enabled: true, protocol: http/protobuf,"
        " endpoint: 'https://otel.example.com/v1/traces'}\n",
        tmp_path,
    )
    config = hcm(doc)["tracing"]["provider"]["typed_config"]
    assert config["http_service"]["http_uri"]["uri"] == "https://otel.example.com/v1/traces"
    cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == OTLP_CLUSTER)
    assert cluster["transport_socket"]["typed_config"]["sni"] == "otel.example.com"
    assert "http2_protocol_options" not in str(cluster)


def test_request_marks_follow_the_genai_conventions() -> None:
    body = {"temperature": 0, "max_completion_tokens": 9, "top_p": True, "seed": 4}
    marks = request_marks("chat", body, "bedrock", "team-a", "sk-...abcd", 2)
    assert marks["op"] == "chat" and marks["gen_ai_provider"] == "aws.bedrock"
    assert (marks["temperature"], marks["max_tokens"], marks["seed"]) == (0, 9, 4)
    assert "top_p" not in marks  # not a number
    assert (marks["team"], marks["key_alias"], marks["attempt"]) == ("team-a", "sk-...abcd", 2)


def test_answer_marks_of_an_openai_body() -> None:
    body = orjson.dumps(
        {
            "id": "chatcmpl-1",
            "model": "claude-x",
            "choices": [{"finish_reason": "stop"}, {"finish_reason": "length"}],
        }
    )
    assert answer_marks(body) == {
        "response_model": "claude-x",
        "response_id": "chatcmpl-1",
        "finish_reasons": '["stop","length"]',
    }
    assert answer_marks(b"not json") == {}


def test_worker_spans_follow_envoys_sampling_decision() -> None:
    from llmux_extproc.observability.logs import trace_ids_from_traceparent
    from llmux_extproc.observability.tracing import WorkerTracer

    tracer = WorkerTracer(TracingSettings(enabled=True, endpoint="http://127.0.0.1:9"))
    try:
        base = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-"
        for flags, sampled in (("01", True), ("00", False), ("03", True), ("zz", False)):
            tp = base + flags
            span = tracer.attempt(tp, trace_ids_from_traceparent(tp))
            assert (span is not None) == sampled, flags
        root = tracer.attempt(None, None)  # no parent: the ratio (1.0) decides
        assert root is not None and root.ids == ("", "")
    finally:
        tracer.shutdown()
