"""Envoy's configuration, generated from the LLMux `Config`; never written by hand.

Two outputs: the bootstrap (listener, filters, routes, the ext_proc and metrics clusters),
written once at start, and the provider clusters, served to Envoy through file-based CDS so
a config reload changes them without restarting Envoy.

The request path costs as few ext_proc messages as the features allow: request headers are
skipped (the processor reads the few headers it needs as attributes of the body message),
the request body is buffered (one message: auth, routing and translation at once), and the
response body is buffered with its status code as an attribute (one message: usage, cost,
translation). Envoy itself answers what needs no Python: health, unknown paths, its own
upstream failures (rewritten into OpenAI's error shape by `local_reply_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from llmux_extproc.config import Config, Listen, Upstream
from llmux_extproc.errors import error_type

EXTPROC_FILTER = "envoy.filters.http.ext_proc"
EXTPROC_CLUSTER = "llmux_extproc"
METRICS_CLUSTER = "llmux_metrics"
ROUTE_HEADER = "x-llmux-cluster"
STREAM_HEADER = "x-llmux-stream"  # set by the processor on streamed requests
# Dynamic metadata namespace the processor writes (per-request log fields, reply marks).
METADATA_NAMESPACE = "llmux"
# Where Envoy's sse_to_metadata filter puts the `usage` object of OpenAI-format streams.
USAGE_NAMESPACE = "llmux.usage"
# What a passed-through stream needs to be counted with tiktoken if it ends without the
# provider's usage: the request body (set by the processor, cleared by response.lua once the
# provider's usage arrives) and the text produced so far (t1..tN, one per chunk, response.lua).
STREAM_NAMESPACE = "llmux.stream"
ACCESS_LOG_NAME = "llmux-streams"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

_TYPE = "@type"
_T = "type.googleapis.com/"


@dataclass(frozen=True, slots=True)
class RuntimePaths:
    """Where the running gateway keeps its sockets and generated files."""

    root: Path

    def extproc_socket(self, worker: int) -> Path:
        return self.root / f"extproc-{worker}.sock"

    @property
    def bootstrap(self) -> Path:
        return self.root / "envoy.json"

    @property
    def cds(self) -> Path:
        return self.root / "cds.json"


def address(listen: Listen) -> dict[str, Any]:
    if listen.path:
        return {"pipe": {"path": listen.path}}
    return {"socket_address": {"address": listen.host, "port_value": listen.port}}


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def upstream_cluster(up: Upstream, config: Config) -> dict[str, Any]:
    s = config.settings
    is_ip = up.host.replace(".", "").isdigit() or ":" in up.host or up.host == "localhost"
    cluster: dict[str, Any] = {
        "name": up.cluster,
        # LOGICAL_DNS suits large provider front ends (one connection target, many IPs).
        "type": "STATIC" if is_ip and up.host != "localhost" else "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": _duration(s.connect_timeout_s),
        "per_connection_buffer_limit_bytes": s.max_response_body_bytes,
        "load_assignment": {
            "cluster_name": up.cluster,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": "127.0.0.1"
                                        if up.host == "localhost"
                                        else up.host,
                                        "port_value": up.port,
                                    }
                                },
                                "hostname": up.host,
                            }
                        }
                    ]
                }
            ],
        },
        # LLM calls are long; Envoy's default of 1024 in-flight requests per cluster is a
        # bulkhead sized for short RPCs.
        "circuit_breakers": {
            "thresholds": [
                {"max_connections": 10000, "max_pending_requests": 10000, "max_requests": 10000}
            ]
        },
    }
    if cluster["type"] == "STATIC":
        cluster.pop("dns_lookup_family")
    protocol: dict[str, Any]
    if up.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                _TYPE: _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": up.host,
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "validation_context": {
                        "trusted_ca": {"filename": CA_BUNDLE},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": up.host}}
                        ],
                    },
                },
            },
        }
        protocol = {"auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}}}
    else:
        protocol = {"explicit_http_config": {"http_protocol_options": {}}}
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            _TYPE: _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            **protocol,
        }
    }
    return cluster


def provider_clusters(config: Config) -> list[dict[str, Any]]:
    return [upstream_cluster(up, config) for up in config.upstreams]


def cds_document(clusters: list[dict[str, Any]], version: str) -> dict[str, Any]:
    return {
        "version_info": version,
        "resources": [{_TYPE: _T + "envoy.config.cluster.v3.Cluster", **c} for c in clusters],
    }


def _extproc_cluster(config: Config, paths: RuntimePaths) -> dict[str, Any]:
    endpoints = [
        {"endpoint": {"address": {"pipe": {"path": str(paths.extproc_socket(i))}}}}
        for i in range(config.settings.workers)
    ]
    return {
        "name": EXTPROC_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {
            "cluster_name": EXTPROC_CLUSTER,
            "endpoints": [{"lb_endpoints": endpoints}],
        },
        "circuit_breakers": {
            "thresholds": [
                {"max_connections": 10000, "max_pending_requests": 10000, "max_requests": 100000}
            ]
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                _TYPE: _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {"max_concurrent_streams": 100000}
                },
            }
        },
    }


def _metrics_cluster(config: Config) -> dict[str, Any]:
    return {
        "name": METRICS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": METRICS_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": address(config.settings.metrics)}}]}
            ],
        },
    }


def _extproc_filter(config: Config) -> dict[str, Any]:
    body_limit = config.settings.max_request_body_bytes
    return {
        "name": EXTPROC_FILTER,
        "typed_config": {
            _TYPE: _T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {
                "envoy_grpc": {
                    "cluster_name": EXTPROC_CLUSTER,
                    # Prompts with images run to megabytes; gRPC's 4 MiB default would cut them.
                    "max_receive_message_length": max(
                        body_limit, config.settings.max_response_body_bytes
                    )
                    + 65536,
                },
                "timeout": "30s",
            },
            "processing_mode": {
                # Headers must be held until the body is processed: the router picks the
                # cluster from them. Only SEND holds them (SKIP lets them reach the router).
                "request_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                # Likewise the response headers: held so the status, length and cost headers
                # can still change once the body is translated and accounted.
                "response_header_mode": "SEND",
                "response_body_mode": "BUFFERED",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            "message_timeout": "10s",
            "allow_mode_override": True,
            "metadata_options": {
                "receiving_namespaces": {"untyped": [METADATA_NAMESPACE, STREAM_NAMESPACE]}
            },
            "mutation_rules": {"allow_all_routing": True, "allow_envoy": True},
            "failure_mode_allow": False,
        },
    }


def _per_route_extproc(**overrides: Any) -> dict[str, Any]:
    return {
        EXTPROC_FILTER: {
            _TYPE: _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
            **overrides,
        }
    }


def _routes(config: Config) -> list[dict[str, Any]]:
    s = config.settings
    timeout = _duration(s.request_timeout_s)
    llm_action = {
        "cluster_header": ROUTE_HEADER,
        "timeout": timeout,
        # A request the processor did not route (empty body) has no cluster header.
        "cluster_not_found_response_code": "SERVICE_UNAVAILABLE",
    }
    disabled = {"typed_per_filter_config": _per_route_extproc(disabled=True)}
    json_ct = [{"header": {"key": "content-type", "value": "application/json"}}]
    internal = [ROUTE_HEADER, STREAM_HEADER]
    chosen = {"name": ROUTE_HEADER, "present_match": True}
    routes: list[dict[str, Any]] = [
        {
            # A streamed answer may run long, but must not stall: bounded by idle time.
            "match": {
                "prefix": "/",
                "headers": [chosen, {"name": STREAM_HEADER, "present_match": True}],
            },
            "route": {**llm_action, "idle_timeout": _duration(s.stream_idle_timeout_s)},
            "request_headers_to_remove": internal,
        },
        {
            # Once the processor has chosen a cluster, the rewritten :path (a provider's
            # own, e.g. /v1/messages) must still route there.
            "match": {"prefix": "/", "headers": [chosen]},
            "route": llm_action,
            "request_headers_to_remove": internal,
        },
    ]
    for path in ("/v1/chat/completions", "/chat/completions", "/v1/embeddings", "/embeddings"):
        routes.append(
            {
                "match": {
                    "path": path,
                    "headers": [{"name": ":method", "string_match": {"exact": "POST"}}],
                },
                "route": llm_action,
            }
        )
    for path in ("/v1/models", "/models"):
        routes.append(
            {
                "match": {
                    "path": path,
                    "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
                },
                # Never reached: the processor answers from the request headers.
                "direct_response": {"status": 500},
            }
        )
    for path in ("/health/liveliness", "/health/readiness", "/health"):
        routes.append(
            {
                "match": {"path": path},
                "direct_response": {
                    "status": 200,
                    "body": {"inline_string": '{"status":"healthy"}'},
                },
                "response_headers_to_add": json_ct,
                **disabled,
            }
        )
    routes.append(
        {"match": {"path": "/metrics"}, "route": {"cluster": METRICS_CLUSTER}, **disabled}
    )
    routes.append(
        {
            "match": {"prefix": "/"},
            # local_reply_config renders the message as an OpenAI error body.
            "direct_response": {
                "status": 404,
                "body": {
                    "inline_string": "Unknown path. LLMux serves /v1/chat/completions, "
                    "/v1/embeddings and /v1/models."
                },
            },
            **disabled,
        }
    )
    return routes


def _local_reply_config() -> dict[str, Any]:
    """Envoy's own error replies (no upstream, timeout, body too large, processor down) in
    OpenAI's shape. The processor marks its own replies in dynamic metadata so they pass
    untouched."""
    # True when the processor did not mark the reply: an absent key matches, and the mark
    # (a bool) never equals this string.
    not_ours = {
        "metadata_filter": {
            "matcher": {
                "filter": METADATA_NAMESPACE,
                "path": [{"key": "own_reply"}],
                "value": {"string_match": {"exact": "never"}},
            },
            "match_if_key_not_found": True,
        }
    }
    messages = {
        413: "Request body is larger than llmux.max_request_body_bytes",
        500: "Internal gateway error; see the gateway logs",
    }
    mappers = []
    for status in (400, 404, 413, 429, 500, 502, 503, 504):
        status_is = {
            "status_code_filter": {
                "comparison": {
                    "op": "EQ",
                    "value": {
                        "default_value": status,
                        "runtime_key": f"llmux.local_reply.{status}",
                    },
                }
            }
        }
        mapper: dict[str, Any] = {
            "filter": {"and_filter": {"filters": [status_is, not_ours]}},
            "body_format_override": {
                "json_format": {
                    "error": {
                        "message": "%LOCAL_REPLY_BODY%",
                        "type": error_type(status),
                        "param": None,
                        "code": str(status),
                    }
                },
                "content_type": "application/json",
            },
        }
        if status in messages:
            mapper["body"] = {"inline_string": messages[status]}
        mappers.append(mapper)
    return {"mappers": mappers}


def _response_lua_filter() -> dict[str, Any]:
    """response.lua: usage, cost headers and the dropped usage chunk for OpenAI-format
    answers the processor handed back to Envoy (see that file)."""
    script = resources.files("llmux_extproc").joinpath("response.lua").read_text()
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            _TYPE: _T + "envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": script},
        },
    }


def _stream_usage_filter() -> dict[str, Any]:
    """Envoy reads `usage` from OpenAI-format SSE itself, so streams passed through untouched
    need no Python per chunk; the last `usage` seen wins (earlier chunks carry null)."""
    rule = {
        "selectors": [{"key": "usage"}],
        "on_present": {
            "metadata_namespace": USAGE_NAMESPACE,
            "key": "usage",
            "type": "PROTOBUF_VALUE",
        },
    }
    return {
        "name": "envoy.filters.http.sse_to_metadata",
        "typed_config": {
            _TYPE: _T + "envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
            "response_rules": {
                "content_parser": {
                    "name": "envoy.content_parsers.json",
                    "typed_config": {
                        _TYPE: _T + "envoy.extensions.content_parsers.json.v3.JsonContentParser",
                        "rules": [{"rule": rule}],
                    },
                },
                "max_event_size": 1024 * 1024,
            },
        },
    }


def _stream_accounting_log() -> dict[str, Any]:
    """Answers Envoy passes on by itself are accounted from their access-log entries, which
    Envoy sends to the workers in batches over gRPC: one message per batch, not per request
    or chunk."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {
            "metadata_filter": {
                "matcher": {
                    "filter": METADATA_NAMESPACE,
                    "path": [{"key": "envoy_accounts"}],
                    "value": {"present_match": True},
                },
                "match_if_key_not_found": False,  # the default (True) would log every request
            }
        },
        "typed_config": {
            _TYPE: _T + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": ACCESS_LOG_NAME,
                "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
                "transport_api_version": "V3",
                "buffer_flush_interval": "0.2s",
            },
        },
    }


def _access_log(config: Config) -> list[dict[str, Any]]:
    accounting = _stream_accounting_log()
    target = config.settings.access_log
    if target == "off":
        return [accounting]
    md = f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{{}})%"
    fmt = {
        "time": "%START_TIME%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "status": "%RESPONSE_CODE%",
        "flags": "%RESPONSE_FLAGS%",
        "latency_ms": "%DURATION%",
        "upstream_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
        **{
            key: md.format(key)
            for key in (
                "model",
                "deployment",
                "provider",
                "prompt_tokens",
                "completion_tokens",
                "cost",
                "error",
            )
        },
        # Answers Envoy passed on by itself: usage as the provider reported it, and the cost
        # response.lua computed for whole bodies.
        "envoy_usage": f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:usage)%",
        "envoy_cost": f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:cost)%",
    }
    if target == "stdout":
        log = {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                _TYPE: _T + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                "log_format": {"json_format": fmt},
            },
        }
    else:
        log = {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                _TYPE: _T + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": target,
                "log_format": {"json_format": fmt},
            },
        }
    return [log, accounting]


def bootstrap(
    config: Config, paths: RuntimePaths, *, static_clusters: bool = False
) -> dict[str, Any]:
    """The Envoy bootstrap; with static_clusters the provider clusters are inlined (for
    `envoy --mode validate` and `llmux envoy-config`) instead of read through CDS."""
    s = config.settings
    hcm = {
        _TYPE: _T
        + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "llmux",
        "codec_type": "AUTO",
        "server_name": "llmux",
        # Non-streamed completions can be silent for minutes; the route timeout bounds them.
        "stream_idle_timeout": _duration(s.request_timeout_s),
        "use_remote_address": True,
        # Clients can quote it to operators; the access log carries the same id.
        "always_set_request_id_in_response": True,
        "access_log": _access_log(config),
        "local_reply_config": _local_reply_config(),
        "http_filters": [
            {
                # No client may choose a cluster: strip the routing header before anything reads it.
                "name": "envoy.filters.http.header_mutation",
                "typed_config": {
                    _TYPE: _T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                    "mutations": {
                        "request_mutations": [{"remove": ROUTE_HEADER}, {"remove": STREAM_HEADER}]
                    },
                },
            },
            # Response order is the reverse: a stream's usage is read (sse_to_metadata)
            # before it is dropped (lua).
            _response_lua_filter(),
            _stream_usage_filter(),
            _extproc_filter(config),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    _TYPE: _T + "envoy.extensions.filters.http.router.v3.Router",
                    "suppress_envoy_headers": False,
                },
            },
        ],
        "route_config": {
            "name": "llmux",
            "virtual_hosts": [{"name": "llmux", "domains": ["*"], "routes": _routes(config)}],
        },
    }
    listener = {
        "name": "llmux",
        "address": address(s.listen),
        # Bounds what Envoy buffers per request and response; the processor enforces the
        # exact request limit itself.
        "per_connection_buffer_limit_bytes": max(
            s.max_request_body_bytes, s.max_response_body_bytes
        ),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }
    clusters = [_extproc_cluster(config, paths), _metrics_cluster(config)]
    doc: dict[str, Any] = {
        "node": {"id": "llmux", "cluster": "llmux"},
        "admin": {"address": address(s.admin)},
        "static_resources": {"listeners": [listener], "clusters": clusters},
        "layered_runtime": {
            "layers": [
                {
                    "name": "llmux",
                    "static_layer": {
                        # Envoy half-closes each ext_proc stream and waits (up to 1 s) for the
                        # processor's status instead of resetting it. grpcio (1.85) leaks the
                        # op array of a status sent on a reset call (grpc/grpc#43360), which
                        # was ~120 bytes of worker RSS per request.
                        "envoy.reloadable_features.ext_proc_graceful_grpc_close": True,
                    },
                }
            ]
        },
    }
    if static_clusters:
        clusters.extend(provider_clusters(config))
    else:
        doc["dynamic_resources"] = {
            "cds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": str(paths.cds),
                    "watched_directory": {"path": str(paths.root)},
                },
            }
        }
    return doc
