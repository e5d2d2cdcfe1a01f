"""Envoy's OpenTelemetry tracer: the span of every request, one per upstream attempt.

Passed-through answers never reach Python after their headers, so the request's span has
to be Envoy's own. Its GenAI attributes are custom tags read from the `llmux` dynamic
metadata at the end of the request: the processor's marks (operation, provider, request
parameters, team, key alias, attempt), which response.lua turns into metadata, plus what
response.lua reads from OpenAI-format answers (response model, finish reasons, tokens,
cost). Metadata the upstream processor writes itself reaches no downstream span or log
(docs/architecture.md), hence the marks header.

Envoy extracts a client's W3C `traceparent` (the request's span joins the client's trace)
and injects its own upstream span's context into each attempt's request: the processor
parents its spans on it and the provider receives it.
"""

from __future__ import annotations

from typing import Any

from llmux_extproc.control.envoy_routing import REQUEST_NAMESPACE
from llmux_extproc.observability.tracing import SPAN_ATTRIBUTES
from llmux_extproc.observability.tracing_settings import TracingSettings

OTLP_CLUSTER = "llmux_otlp"
MARKS_NAMESPACE = "llmux"  # envoy_config.METADATA_NAMESPACE: what response.lua writes
_TYPE = "@type"
_T = "type.googleapis.com/"


def _tag(name: str, namespace: str, key: str) -> dict[str, Any]:
    return {
        "tag": name,
        "metadata": {
            "kind": {"request": {}},
            "metadata_key": {"key": namespace, "path": [{"key": key}]},
        },
    }


def custom_tags() -> list[dict[str, Any]]:
    # Envoy renders metadata values as strings: a number as its decimal text, a list as
    # JSON (spike: every tag arrived as an OTLP string attribute).
    tags = [_tag(name, MARKS_NAMESPACE, key) for name, key in SPAN_ATTRIBUTES.items()]
    # What the client asked for, read by json_to_metadata before routing: there even when
    # no attempt answered (an unknown model, Envoy's own 503).
    tags.append(_tag("gen_ai.request.model", REQUEST_NAMESPACE, "model"))
    return tags


def _exporter(t: TracingSettings) -> dict[str, Any]:
    timeout = f"{t.export_timeout_s:.3f}s"
    if t.protocol == "grpc":
        return {
            "grpc_service": {
                "envoy_grpc": {"cluster_name": OTLP_CLUSTER, "authority": t.host},
                "timeout": timeout,
                "initial_metadata": [{"key": k, "value": v} for k, v in t.headers],
            }
        }
    return {
        "http_service": {
            "http_uri": {"uri": t.endpoint, "cluster": OTLP_CLUSTER, "timeout": timeout},
            "request_headers_to_add": [
                {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                for k, v in t.headers
            ],
        }
    }


def _sampler(t: TracingSettings) -> dict[str, Any]:
    """OpenTelemetry's parentbased_traceidratio, the SDK default for OTEL_TRACES_SAMPLER_ARG:
    a client's traceparent decides (sampled or not), the ratio decides for the rest."""
    ratio = {
        "name": "envoy.tracers.opentelemetry.samplers.trace_id_ratio_based",
        "typed_config": {
            _TYPE: _T
            + "envoy.extensions.tracers.opentelemetry.samplers.v3.TraceIdRatioBasedSamplerConfig",
            "sampling_percentage": {
                "numerator": round(t.sampling_ratio * 1_000_000),
                "denominator": "MILLION",
            },
        },
    }
    return {
        "name": "envoy.tracers.opentelemetry.samplers.parent_based",
        "typed_config": {
            _TYPE: _T
            + "envoy.extensions.tracers.opentelemetry.samplers.v3.ParentBasedSamplerConfig",
            "wrapped_sampler": ratio,
        },
    }


def hcm_tracing(t: TracingSettings) -> dict[str, Any]:
    """The HTTP connection manager's `tracing` block."""
    return {
        # Every request reaches the tracer's sampler, which decides (below): Envoy's own
        # random_sampling overrides a client's sampled flag (spike: at 0, a client's
        # `-01` traceparent went upstream as `-00` and no span was exported).
        "random_sampling": {"value": 100},
        # One span per upstream attempt (retries and fallbacks each get theirs), whose
        # context is what the attempt's request carries.
        "spawn_upstream_span": True,
        "custom_tags": custom_tags(),
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                _TYPE: _T + "envoy.config.trace.v3.OpenTelemetryConfig",
                "service_name": t.service_name,
                "sampler": _sampler(t),
                **_exporter(t),
            },
        },
    }


def otlp_cluster(t: TracingSettings) -> dict[str, Any]:
    """The collector Envoy exports spans to: HTTP/2 for OTLP/gRPC, TLS for https."""
    cluster: dict[str, Any] = {
        "name": OTLP_CLUSTER,
        "type": "STRICT_DNS",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": OTLP_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": t.host, "port_value": t.port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if t.protocol == "grpc":
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                _TYPE: _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    if t.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                _TYPE: _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": t.host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"}
                    }
                },
            },
        }
    return cluster
