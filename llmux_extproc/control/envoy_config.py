"""Envoy's configuration, generated from the LLMux `Config`; never written by hand.

Three outputs: the bootstrap (listeners, downstream filters, the ext_proc and metrics
clusters), written once at start; the model-group clusters (CDS) and the routes (RDS),
served to Envoy from files so a config reload changes them without restarting Envoy. The
groups, routes and the upstream processor filter are in `envoy_routing`; the design is in
docs/architecture.md. Envoy itself answers what needs no Python: health, unknown paths,
its own upstream failures (rewritten into OpenAI's error shape by `local_reply_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from llmux_extproc.control import envoy_routing, envoy_tracing
from llmux_extproc.control.config import Config, Listen
from llmux_extproc.control.envoy_routing import EXTPROC_CLUSTER, RETRY_HEADER
from llmux_extproc.db import management
from llmux_extproc.errors import error_type

METRICS_CLUSTER = "llmux_metrics"
# The workers again, for Envoy's access-log streams to them (see _extproc_log_cluster).
EXTPROC_LOG_CLUSTER = "llmux_extproc_log"
CONTROL_CLUSTER = "llmux_control"  # the supervisor's upstream-log server (controlplane.py)
UPSTREAM_LOG_NAME = "llmux-attempts"
# Dynamic metadata namespace the processor writes (per-request log fields, reply marks).
METADATA_NAMESPACE = "llmux"
# Where Envoy's sse_to_metadata filter puts the `usage` object of OpenAI-format streams.
USAGE_NAMESPACE = "llmux.usage"
# What a passed-through stream needs to be counted with tiktoken if it ends without the
# provider's usage: the request body (set by the processor, cleared by response.lua once the
# provider's usage arrives) and the text produced so far (t1..tN, one per chunk, response.lua).
STREAM_NAMESPACE = "llmux.stream"
ACCESS_LOG_NAME = "llmux-streams"
HEALTH_CHECK_INTERVAL_S = 0.5  # Envoy's gRPC health checks of each ext_proc worker
# Set to 100 through Envoy's admin runtime while `llmux run` drains: new requests get 503.
DRAINING_RUNTIME_KEY = "llmux.draining"
# Matched against `:path`, which holds the query: `/health/readiness?x=1` skipped the
# readiness check and got the route's unconditional 200 while no worker was up.
READY_PATHS = r"^/health/(ready|readiness)(\?.*)?$"
STILL_SERVED_WHILE_DRAINING = r"^/(health/live|health/liveliness|metrics)(\?.*)?$"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

_TYPE = "@type"
_T = "type.googleapis.com/"


@dataclass(frozen=True, slots=True)
class RuntimePaths:
    """Where the running gateway keeps its sockets and generated files."""

    root: Path
    # Loopback port of Envoy's sink listener (see envoy_routing); the supervisor picks a
    # free one at start.
    sink_port: int = 19902

    def extproc_socket(self, worker: int) -> Path:
        return self.root / f"extproc-{worker}.sock"

    @property
    def bootstrap(self) -> Path:
        return self.root / "envoy.json"

    @property
    def cds(self) -> Path:
        return self.root / "cds.json"

    @property
    def rds(self) -> Path:
        return self.root / "rds.json"

    @property
    def control_socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def deployments(self) -> Path:
        """Deployment states the supervisor writes for `/health` (no secrets)."""
        return self.root / "deployments.json"


def address(listen: Listen) -> dict[str, Any]:
    if listen.path:
        return {"pipe": {"path": listen.path}}
    return {"socket_address": {"address": listen.host, "port_value": listen.port}}


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def provider_clusters(config: Config, paths: RuntimePaths) -> list[dict[str, Any]]:
    """The group clusters as the config alone defines them (validation, `llmux
    envoy-config`); while running, the supervisor's control plane publishes them with
    resolved addresses, health and weights (controlplane.py)."""
    return envoy_routing.provider_clusters(config, paths.sink_port)


def cds_document(clusters: list[dict[str, Any]], version: str) -> dict[str, Any]:
    return {
        "version_info": version,
        "resources": [{_TYPE: _T + "envoy.config.cluster.v3.Cluster", **c} for c in clusters],
    }


def rds_document(config: Config, version: str) -> dict[str, Any]:
    route = envoy_routing.route_configuration(config, _extra_routes(config))
    return {
        "version_info": version,
        "resources": [{_TYPE: _T + "envoy.config.route.v3.RouteConfiguration", **route}],
    }


def _extproc_log_cluster(config: Config, paths: RuntimePaths) -> dict[str, Any]:
    """The same workers, for Envoy's access-log streams to them (accounting, releasing
    reservations): a cluster of their own, so requests shed at `max_streams_per_worker` can
    never take the places those streams need (measured: on the shared cluster, a burst of 46
    shed requests made 65 more stream openings overflow, the access log's among them)."""
    cluster = _extproc_cluster(config, paths, name=EXTPROC_LOG_CLUSTER)
    cluster["circuit_breakers"] = {
        "thresholds": [
            {"max_connections": 10000, "max_pending_requests": 10000, "max_requests": 100000}
        ]
    }
    return cluster


def _extproc_cluster(
    config: Config, paths: RuntimePaths, name: str = EXTPROC_CLUSTER
) -> dict[str, Any]:
    endpoints = [
        {"endpoint": {"address": {"pipe": {"path": str(paths.extproc_socket(i))}}}}
        for i in range(config.settings.workers)
    ]
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": endpoints}],
        },
        **_extproc_healing(),
        "circuit_breakers": {"thresholds": [_extproc_thresholds(config)]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                _TYPE: _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {"max_concurrent_streams": 100000}
                },
            }
        },
    }


def _extproc_thresholds(config: Config) -> dict[str, int]:
    """Load shedding. Every request holds an ext_proc stream while a worker handles it (a
    translated stream, for its whole life): past `max_streams_per_worker` per worker, Envoy
    refuses to open more and the request gets a 503 with retry-after at once, in Envoy
    (local_reply_config), costing no worker anything. Without a cap, translated streams at
    1,000-1,500 req/s on one worker were dropped by the worker's gRPC server (CANCELLED) or
    found it unhealthy (its health checks timing out), answered 503 without retry-after or
    504 after seconds, and Envoy crashed (SIGSEGV) in 6 runs of 7; with a cap of 512 (the
    default) or 300, only these immediate 503s and no crash in 8 runs
    (docs/architecture.md)."""
    s = config.settings
    return {
        "max_connections": 10000,
        "max_pending_requests": 10000,
        "max_requests": s.workers * s.max_streams_per_worker,
    }


def _extproc_healing() -> dict[str, Any]:
    """A worker that dies stops getting ext_proc streams: Envoy health-checks each one over
    grpc.health.v1 every half second (two failures mark it down, one pass up again) and
    ejects a worker whose socket refuses a stream at once (outlier detection on local-origin
    failures), until its restarted successor passes a health check."""
    every = _duration(HEALTH_CHECK_INTERVAL_S)
    return {
        "health_checks": [
            {
                # A dead worker fails at once (its socket refuses); the timeout is for a hung
                # one, and generous enough that a busy event loop is not taken for one.
                "timeout": "1s",
                "interval": every,
                # Envoy's defaults slow checks down while a cluster has no traffic (60 s) or
                # a host is down; a restarted worker must be taken back within a second.
                "no_traffic_interval": every,
                "no_traffic_healthy_interval": every,
                "unhealthy_interval": every,
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {},
                "always_log_health_check_failures": True,
            }
        ],
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "enforcing_consecutive_local_origin_failure": 100,
            # Only the local-origin detector: a worker's own gRPC errors are not its health.
            "enforcing_consecutive_5xx": 0,
            "enforcing_consecutive_gateway_failure": 0,
            "enforcing_success_rate": 0,
            "enforcing_local_origin_success_rate": 0,
            "interval": "1s",
            "base_ejection_time": "1s",
            "max_ejection_time": "5s",
            # A passing health check takes an ejected worker back (Envoy's default), so
            # ejecting them all cannot outlast their recovery.
            "max_ejection_percent": 100,
        },
        "common_lb_config": {
            # No panic routing: with every worker down, ext_proc fails fast (503) instead of
            # trying dead sockets.
            "healthy_panic_threshold": {"value": 0},
            # Health changes reach the load balancers at once, not batched for Envoy's
            # default second (readiness, which reads the health stats, would run ahead).
            "update_merge_window": "0s",
        },
    }


def _health_check_filter() -> dict[str, Any]:
    """/health/ready (and /health/readiness): 200 only while Envoy is not draining (admin
    `/healthcheck/fail`, which `llmux run` posts on SIGTERM) and at least one ext_proc worker
    passes Envoy's health checks. Answered by Envoy alone, before any other filter."""
    return {
        "name": "envoy.filters.http.health_check",
        "typed_config": {
            _TYPE: _T + "envoy.extensions.filters.http.health_check.v3.HealthCheck",
            "pass_through_mode": False,
            "headers": [{"name": ":path", "string_match": {"safe_regex": {"regex": READY_PATHS}}}],
            # Any worker healthy (1% < 1/64, the most workers there can be).
            "cluster_min_healthy_percentages": {EXTPROC_CLUSTER: {"value": 1.0}},
        },
    }


def _drain_filter() -> dict[str, Any]:
    """While `llmux run` drains (it sets DRAINING_RUNTIME_KEY to 100 through the admin
    runtime), every new request but liveness and metrics is refused with a 503 before it is
    routed; requests already in flight are past this filter and finish. Envoy's fault filter,
    which does nothing while the key is unset (0%)."""
    return {
        "name": "envoy.filters.http.fault",
        "typed_config": {
            _TYPE: _T + "envoy.extensions.filters.http.fault.v3.HTTPFault",
            "abort": {"http_status": 503, "percentage": {"numerator": 0}},
            "abort_percent_runtime": DRAINING_RUNTIME_KEY,
            "headers": [
                {
                    "name": ":path",
                    "string_match": {"safe_regex": {"regex": STILL_SERVED_WHILE_DRAINING}},
                    "invert_match": True,
                }
            ],
        },
    }


def _with_drain_reply(local_reply: dict[str, Any]) -> dict[str, Any]:
    """The drain filter's 503 (response flag FI) in OpenAI's shape, with a message that
    says what happened; ahead of the generic mappers."""
    mapper = {
        "filter": {"response_flag_filter": {"flags": ["FI"]}},
        "body": {"inline_string": "LLMux is shutting down; retry the request"},
        "headers_to_add": [_retry_after()],
        "body_format_override": _openai_error_format(503, "%LOCAL_REPLY_BODY%"),
    }
    return {**local_reply, "mappers": [mapper, *local_reply["mappers"]]}


def _control_cluster(paths: RuntimePaths) -> dict[str, Any]:
    return {
        "name": CONTROL_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": CONTROL_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"pipe": {"path": str(paths.control_socket)}}}}
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                _TYPE: _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


# What LiteLLM's cooldown counts against a deployment (policy.health.counts_as_failure), or
# any response flag (reset, connect failure, timeout). The processor's own replies have
# neither a status nor a flag and match neither expression: they never reached a deployment.
_FAILED = "response.flags != 0u || response.code >= 500 || response.code in [401, 404, 408, 429]"
_SUCCEEDED = f"response.code > 0 && !({_FAILED})"


def _upstream_log(config: Config) -> list[dict[str, Any]]:
    """Every attempt's outcome for the supervisor's policies (cooldowns, breaker, latency):
    batched over gRPC, with the deployment id from the chosen endpoint's metadata.

    Two loggers: failures leave within 50 ms (a cooldown must start before the next few
    requests arrive), successes once a second, in batches ~20 times larger. Reading the
    log cost the supervisor 137 us per request at 200 req/s with one 50 ms logger (/proc
    ticks over 3,000 requests), mostly per-message gRPC work on batches of ten. Successes
    only feed averages and windows that move once a second anyway, except usage-based
    routing's request count, which a full deployment must see at once.
    """
    usage_based = config.router.routing_strategy.startswith("usage-based")
    every = {
        "failures": ("0.05s", _FAILED),
        "successes": ("0.05s" if usage_based else "1s", _SUCCEEDED),
    }
    return [_attempt_logger(interval, expression) for interval, expression in every.values()]


def _attempt_logger(flush_interval: str, expression: str) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {
            "extension_filter": {
                "name": "envoy.access_loggers.extension_filters.cel",
                "typed_config": {
                    _TYPE: _T + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                    "expression": expression,
                },
            }
        },
        "typed_config": {
            _TYPE: _T + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": UPSTREAM_LOG_NAME,
                "grpc_service": {"envoy_grpc": {"cluster_name": CONTROL_CLUSTER}},
                "transport_api_version": "V3",
                "buffer_flush_interval": flush_interval,
                "custom_tags": [
                    {
                        "tag": "llmux_host",
                        "metadata": {
                            "kind": {"host": {}},
                            "metadata_key": {
                                "key": envoy_routing.HOST_NAMESPACE,
                                "path": [{"key": "d"}],
                            },
                        },
                    },
                    {
                        "tag": "llmux_stream",
                        "metadata": {
                            "kind": {"request": {}},
                            "metadata_key": {
                                "key": envoy_routing.REQUEST_NAMESPACE,
                                "path": [{"key": "stream"}],
                            },
                        },
                    },
                    # The router's upstream log leaves upstream_request_attempt_count at 1
                    # for every attempt (seen: 72 attempts of 24 requests, all "first");
                    # the attempt header the router sets per try is right.
                    {
                        "tag": "llmux_attempt",
                        "request_header": {"name": "x-envoy-attempt-count"},
                    },
                ],
            },
            "additional_response_headers_to_log": ["retry-after"],
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


# What the access log says for the path of a request on a path LLMux does not serve.
UNLOGGED_PATH = "(a path LLMux does not serve; not logged)"
# Every request header LLMux uses internally starts with it; clients may send none.
INTERNAL_HEADER_PREFIX = "x-llmux-"


def _internal_headers_filter() -> dict[str, Any]:
    """Internal headers are LLMux's alone: every client-sent `x-llmux-*` header (not only
    the ones in use today) is removed by the first filter, before anything reads the
    headers or matches a route, and the processor's retry marker never reaches a client."""
    prefix = {"key_matcher": {"prefix": INTERNAL_HEADER_PREFIX}}
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            _TYPE: _T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {
                "request_mutations": [{"remove_on_match": prefix}],
                "response_mutations": [{"remove": RETRY_HEADER}],
            },
        },
    }


def _extra_routes(config: Config) -> list[dict[str, Any]]:
    """Routes beside the API's: health, metrics, the management API."""
    json_ct = [{"header": {"key": "content-type", "value": "application/json"}}]
    table: list[dict[str, Any]] = [
        {
            "match": {"path": path},
            "direct_response": {"status": 200, "body": {"inline_string": '{"status":"healthy"}'}},
            "response_headers_to_add": json_ct,
        }
        for path in (
            "/health/live",
            "/health/ready",
            "/health/liveliness",
            "/health/readiness",
        )
    ]
    # Deployment states: answered by the processor (behind the master key) from what the
    # supervisor's control plane writes.
    table.append(
        {
            "match": {
                "path": "/health",
                "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
            },
            "route": {"cluster": envoy_routing.LOCAL_CLUSTER, "timeout": "10s"},
        }
    )
    # LiteLLM's key and team management API: answered by the processor (behind the master
    # key) from PostgreSQL, GET and POST alike.
    # Its paths one by one: what is left under the prefixes is not LLMux's.
    for path in sorted(management.PATHS):
        table.append(
            {
                "match": {"path": path},
                "route": {"cluster": envoy_routing.LOCAL_CLUSTER, "timeout": "30s"},
            }
        )
    for prefix in ("/key/", "/team/"):
        table.append(
            # Paths not listed, and LiteLLM's `/key/{key}/regenerate` (the processor serves
            # it): their paths may hold a key, so the access log leaves them out.
            envoy_routing.opaque_route(
                {
                    "match": {"prefix": prefix},
                    "route": {"cluster": envoy_routing.LOCAL_CLUSTER, "timeout": "30s"},
                }
            )
        )
    table.extend(_metrics_routes(config))
    return table


def _metrics_routes(config: Config) -> list[dict[str, Any]]:
    """/metrics on the public listener (llmux.listener_metrics): "auth" sends GETs to the
    processor, which asks for the master key (when one is set) and answers with the same
    figures as `llmux.metrics`; "open" is Envoy straight to the metrics server; "off"
    leaves it to the catch-all 404. The master key stays out of Envoy's config (an exact
    header match would put it in /config_dump)."""
    mode = config.settings.listener_metrics
    if mode == "open":
        return [{"match": {"path": "/metrics"}, "route": {"cluster": METRICS_CLUSTER}}]
    if mode == "off":
        return []
    get = [{"name": ":method", "string_match": {"exact": "GET"}}]
    return [
        {
            "match": {"path": "/metrics", "headers": get},
            "route": {"cluster": envoy_routing.LOCAL_CLUSTER, "timeout": "10s"},
        }
    ]


def _local_reply_config() -> dict[str, Any]:
    """Envoy's own error replies (no upstream, timeout, body too large, processor down) in
    OpenAI's shape. The processor's own replies (immediate responses of the upstream
    filter) carry no response flags, Envoy's failures do (UF, URX, UT, ...): that tells
    them apart, since metadata the upstream processor writes never reaches this point.
    The one failure of Envoy's without a flag is the processor itself failing (a worker
    gone mid-request), told by its response code details."""
    processor_failed = {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                _TYPE: _T + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": "response.code_details.startsWith('ext_proc_error')",
            },
        }
    }
    not_ours: dict[str, Any] = {
        # response_flag_filter without flags: any flag matches.
        "or_filter": {"filters": [{"response_flag_filter": {}}, processor_failed]}
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
            "body_format_override": _openai_error_format(status, "%LOCAL_REPLY_BODY%"),
        }
        if status in messages:
            mapper["body"] = {"inline_string": messages[status]}
        if status == 503:
            mapper["headers_to_add"] = [_retry_after()]
        mappers.append(mapper)
    return {"mappers": mappers}


# -- slow and idle clients, connection cap (README, Limits and overload) ------------------

# Seconds a client is told to wait before retrying a 503 LLMux gives for its own state
# (overload, a worker gone, draining): long enough for a shed burst to clear, short
# enough that the OpenAI SDK's own retries (0.5-8 s back-off) do not wait longer.
RETRY_AFTER_S = 1
# What the connection manager records for its request timeouts (no response flag): the
# whole-request timer (request_timeout) and the headers timer (request_headers_timeout).
CLIENT_TIMEOUT_DETAILS = ("request_overall_timeout", "request_header_timeout")


def _retry_after() -> dict[str, Any]:
    return {
        "header": {"key": "retry-after", "value": str(RETRY_AFTER_S)},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }


def _add_client_timeouts(hcm: dict[str, Any], config: Config) -> None:
    """A client trickling its request is answered 408 once `client_body_timeout` has passed
    since its first byte, however steadily it trickles: Envoy's request_timeout runs from the
    start of the request until the whole request has been received, and stops there, so a
    long answer is not cut by it (the route timeout bounds that). A connection with no
    request in flight is closed after `connection_idle_timeout` (HTTP/1: closed without a
    byte; HTTP/2: Envoy's GOAWAY, not measured), including one that never sent anything."""
    s = config.settings
    hcm["request_timeout"] = _duration(s.client_body_timeout_s)
    # Merged, not set: other HTTP protocol options may live in the same message.
    options = hcm.setdefault("common_http_protocol_options", {})
    options["idle_timeout"] = _duration(s.connection_idle_timeout_s)


def _with_limit_replies(config: Config, local_reply: dict[str, Any]) -> dict[str, Any]:
    """Envoy's answers for the limits, in OpenAI's shape, ahead of the generic mappers.
    Neither has a response flag, only response code details, matched here: the 408 of a
    client too slow to send its request (the processor's own 408s, from a provider's
    timeout, carry the details `llmux`), and the 503 of a request shed because the workers
    hold `max_streams_per_worker` streams each (the ext_proc stream could not be opened:
    measured details `ext_proc_error_gRPC_error_14{..._reset_reason:_overflow{...}}`)."""
    s = config.settings
    timeout = " || ".join(f"response.code_details == '{d}'" for d in CLIENT_TIMEOUT_DETAILS)
    shed = "response.code_details.startsWith('ext_proc_error') && "
    shed += "response.code_details.contains('overflow')"
    too_slow = _details_reply(
        timeout,
        408,
        "The request was not received in full within "
        f"llmux.client_body_timeout ({s.client_body_timeout_s:g}s)",
    )
    overloaded = _details_reply(
        shed,
        503,
        f"LLMux is at its limit of {s.max_streams_per_worker} requests per worker "
        "(llmux.max_streams_per_worker); retry after the retry-after header's seconds",
    )
    overloaded["headers_to_add"] = [_retry_after()]
    return {**local_reply, "mappers": [too_slow, overloaded, *local_reply["mappers"]]}


def _details_reply(expression: str, status: int, message: str) -> dict[str, Any]:
    # The status is compared first: every other local reply (the processor's answers, the
    # mock's 200s among them) passes without a CEL evaluation.
    status_is = {
        "status_code_filter": {
            "comparison": {
                "op": "EQ",
                "value": {
                    "default_value": status,
                    "runtime_key": f"llmux.local_reply.limit.{status}",
                },
            }
        }
    }
    return {
        "filter": {"and_filter": {"filters": [status_is, _cel(expression)]}},
        "body": {"inline_string": message},
        "body_format_override": _openai_error_format(status, "%LOCAL_REPLY_BODY%"),
    }


# Envoy's replies to requests it cannot take as HTTP (its codec's and the connection
# manager's checks, before any route or filter). Spike (raw sockets, Envoy 1.40): they carry
# the DPE flag only after the reply is built, so the flag-based mappers above never see them;
# their response code details (`http1.codec_error`, `low_version`, ...) tell them apart.
# Each detail gets a message saying what was wrong; any other such reply keeps Envoy's
# status with Envoy's words and the detail. Limits quoted are Envoy's defaults
# (max_request_headers_kb 60, max_headers_count 100), measured: a 70,000-byte header and 150
# headers got 431, a 16 KB path was served.
PROTOCOL_ERRORS: dict[str, tuple[int, str]] = {
    "missing_host_header": (400, "The request has no Host header; HTTP/1.1 requires one."),
    "path_normalization_failed": (
        400,
        "The request path is not valid: it contains a '#' fragment or an invalid escape.",
    ),
    "low_version": (
        426,
        "This HTTP version is not accepted (HTTP/1.0 and 0.9 are refused); LLMux speaks "
        "HTTP/1.1 and HTTP/2.",
    ),
    "http1.headers_too_large": (
        431,
        "The request line and headers are larger than 60 KiB; the URL may be too long.",
    ),
    "http1.too_many_headers": (431, "The request has more than 100 headers."),
    "http1.invalid_characters": (400, "A header name or value contains characters HTTP forbids."),
    "http1.content_length_and_chunked_not_allowed": (
        400,
        "The request has both Content-Length and Transfer-Encoding: chunked.",
    ),
    "http1.invalid_transfer_encoding": (
        501,
        "Transfer-Encoding other than chunked is not supported.",
    ),
    "http1.codec_error": (
        400,
        "Malformed HTTP/1.1 request (request line, header syntax, Content-Length or chunk "
        "framing).",
    ),
    "request_payload_too_large": (
        413,
        "Request body is larger than llmux.max_request_body_bytes.",
    ),
    "absolute_path_rejected": (404, "The request target must be a path starting with '/'."),
    "upgrade_failed": (
        403,
        "Connection upgrades and tunnels (WebSocket, CONNECT) are not supported.",
    ),
}
# Statuses Envoy answers itself before routing; any reply with one of them that neither the
# processor (details `llmux`) nor a route (`direct_response`, already OpenAI-shaped) made
# is Envoy's and gets the shape too. 5xx other than 501 stay with the mappers above (the
# health check filter's 503 is plain on purpose: probes read the status only).
_PROTOCOL_STATUSES = (400, 403, 404, 405, 411, 414, 415, 426, 431, 501)
_NOT_OURS_DETAILS = "!(response.code_details in ['llmux', 'direct_response', 'via_upstream'])"


def _cel(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                _TYPE: _T + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }
    }


def _status_is(status: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {
                "op": "EQ",
                "value": {
                    "default_value": status,
                    "runtime_key": f"llmux.local_reply.protocol.{status}",
                },
            }
        }
    }


def _openai_error_format(status: int, message: str) -> dict[str, Any]:
    return {
        "json_format": {
            "error": {
                "message": message,
                "type": error_type(status),
                "param": None,
                "code": str(status),
            }
        },
        "content_type": "application/json",
    }


def _protocol_error_mappers() -> list[dict[str, Any]]:
    """OpenAI-shaped bodies for Envoy's replies to malformed HTTP (see PROTOCOL_ERRORS)."""
    # The status is compared first, so the processor's immediate answers (the mock's 200s
    # among them) pass these mappers without a CEL evaluation.
    mappers: list[dict[str, Any]] = []
    for detail, (status, message) in PROTOCOL_ERRORS.items():
        cel = _cel(f"response.code_details == '{detail}'")
        mappers.append(
            {
                "filter": {"and_filter": {"filters": [_status_is(status), cel]}},
                "body": {"inline_string": message},
                "body_format_override": _openai_error_format(status, "%LOCAL_REPLY_BODY%"),
            }
        )
    for status in _PROTOCOL_STATUSES:
        mappers.append(
            {
                "filter": {
                    "and_filter": {"filters": [_status_is(status), _cel(_NOT_OURS_DETAILS)]}
                },
                "body_format_override": _openai_error_format(
                    status, "%LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)"
                ),
            }
        )
    return mappers


def _with_protocol_error_replies(local_reply: dict[str, Any]) -> dict[str, Any]:
    """Envoy's protocol-error replies first: they are matched by response details, which
    no other reply has."""
    return {**local_reply, "mappers": [*_protocol_error_mappers(), *local_reply["mappers"]]}


def _request_decompressor() -> dict[str, Any]:
    """`Content-Encoding: gzip` request bodies are decompressed before anything reads them
    (json_to_metadata, the processor); any other encoding meets a 415 route
    (envoy_routing). Before the buffering filters, so max_request_body_bytes bounds the
    decompressed body: a small gzip bomb still gets 413. Responses are left alone: the
    processor and response.lua read them as the provider sent them."""
    return {
        "name": "envoy.filters.http.decompressor",
        "typed_config": {
            _TYPE: _T + "envoy.extensions.filters.http.decompressor.v3.Decompressor",
            "decompressor_library": {
                "name": "gzip",
                "typed_config": {
                    _TYPE: _T + "envoy.extensions.compression.gzip.decompressor.v3.Gzip",
                    # Envoy's default (100) cut JSON padded with whitespace short (measured:
                    # 60 kB of spaces in 146 bytes); the body limit bounds what inflates.
                    "max_inflate_ratio": 1032,
                },
            },
            "request_direction_config": {
                "common_config": {"enabled": _ON},
                # The client's Accept-Encoding goes to the provider unchanged.
                "advertise_accept_encoding": False,
            },
            "response_direction_config": {"common_config": {"enabled": _OFF}},
        },
    }


def _overload_manager(config: Config) -> dict[str, Any]:
    """At most `max_connections` client connections at once, over every listener but the
    internal sink. Past it Envoy closes each new connection as it accepts it, without a
    byte (spike: no HTTP answer is possible there, and this monitor cannot trigger the
    overload actions that answer 503; see docs/architecture.md); counted in
    `listener.<address>.downstream_global_cx_overflow`."""
    return {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    _TYPE: _T + "envoy.extensions.resource_monitors.downstream_connections.v3."
                    "DownstreamConnectionsConfig",
                    "max_active_downstream_connections": config.settings.max_connections,
                },
            }
        ]
    }


def _internal(listener: dict[str, Any]) -> dict[str, Any]:
    # The sink listener's connections come from Envoy itself (llmux_local): they must never
    # be refused because clients filled the connection cap.
    return {**listener, "ignore_global_conn_limit": True}


_ON = {"default_value": True, "runtime_key": "llmux.request_decompression"}
_OFF = {"default_value": False, "runtime_key": "llmux.response_decompression"}


def _response_lua_filter() -> dict[str, Any]:
    """response.lua: usage, cost headers and the dropped usage chunk for OpenAI-format
    answers the processor handed back to Envoy (see that file)."""
    script = resources.files("llmux_extproc.dataplane").joinpath("response.lua").read_text()
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            _TYPE: _T + "envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": script},
        },
    }


def _prompt_lua_filter() -> dict[str, Any]:
    """prompt.lua, named: it runs only on the stream routes, which name it (envoy_routing);
    the virtual host turns it off everywhere else. Decided per route when the filter runs,
    i.e. after json_to_metadata read the body (a filter disabled in the chain itself would
    be decided on the headers alone, before the stream flag is known)."""
    script = resources.files("llmux_extproc.dataplane").joinpath("prompt.lua").read_text()
    return {
        "name": envoy_routing.PROMPT_FILTER,
        "typed_config": {
            _TYPE: _T + "envoy.extensions.filters.http.lua.v3.Lua",
            "source_codes": {"prompt": {"inline_string": script}},
        },
    }


def _alias_lua_filter() -> dict[str, Any]:
    """alias.lua (a key's model aliases): enabled only on the route of API requests for a
    model no group serves (envoy_routing), so known models never pay for it."""
    script = resources.files("llmux_extproc.dataplane").joinpath("alias.lua").read_text()
    return {
        "name": envoy_routing.ALIAS_FILTER,
        "typed_config": {
            _TYPE: _T + "envoy.extensions.filters.http.lua.v3.Lua",
            "source_codes": {"alias": {"inline_string": script}},
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
    passed_through = {
        "metadata_filter": {
            "matcher": {
                "filter": METADATA_NAMESPACE,
                "path": [{"key": "envoy_accounts"}],
                "value": {"present_match": True},
            },
            "match_if_key_not_found": False,  # the default (True) would log every request
        }
    }
    # Envoy's own failures (any response flag: no upstream, timeout, reset...) and the
    # processor failing: nobody else ends these requests' rate-limit reservations
    # (policy/limits.py), which the worker then releases. Failed requests only.
    envoy_failed = {
        "or_filter": {
            "filters": [
                {"response_flag_filter": {}},
                {
                    "extension_filter": {
                        "name": "envoy.access_loggers.extension_filters.cel",
                        "typed_config": {
                            _TYPE: _T
                            + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                            "expression": "response.code_details.startsWith('ext_proc_error')",
                        },
                    }
                },
            ]
        }
    }
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {"or_filter": {"filters": [passed_through, envoy_failed]}},
        "typed_config": {
            _TYPE: _T + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": ACCESS_LOG_NAME,
                "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_LOG_CLUSTER}},
                "transport_api_version": "V3",
                "buffer_flush_interval": f"{ACCOUNTING_FLUSH_S}s",
            },
        },
    }


# How long an answer's accounting entry may wait in Envoy's gRPC access log buffer.
ACCOUNTING_FLUSH_S = 0.2


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
        # Never the query string: clients put keys there (`?api_key=`, `?key=`, the
        # management API's `/key/info?key=sk-...`).
        "path": "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%",
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
        # The request's trace (the client's, when it sent a traceparent) and the span of
        # Envoy's that the attempts are children of; "-" when tracing is off.
        "trace_id": "%TRACE_ID%",
        "span_id": "%SPAN_ID%",
    }
    log_format: dict[str, Any] = {
        "json_format": fmt,
        "formatters": [
            {
                "name": "envoy.formatter.req_without_query",
                "typed_config": {
                    _TYPE: _T + "envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery"
                },
            }
        ],
    }
    # A path LLMux does not serve may hold anything, a key in a segment included
    # (`/key/sk-.../regenerate`): such requests (their routes mark them with OPAQUE_HEADER)
    # are logged by a second logger whose path is a constant.
    opaque_format = {**log_format, "json_format": {**fmt, "path": UNLOGGED_PATH}}
    return [
        _text_log(target, log_format, opaque=False),
        _text_log(target, opaque_format, opaque=True),
        accounting,
    ]


def _text_log(target: str, log_format: dict[str, Any], *, opaque: bool) -> dict[str, Any]:
    typed: dict[str, Any] = {"log_format": log_format}
    if target == "stdout":
        name = "envoy.access_loggers.stdout"
        typed[_TYPE] = _T + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
    else:
        name = "envoy.access_loggers.file"
        typed[_TYPE] = _T + "envoy.extensions.access_loggers.file.v3.FileAccessLog"
        typed["path"] = target
    return {
        "name": name,
        "filter": {
            "header_filter": {
                "header": {
                    "name": envoy_routing.OPAQUE_HEADER,
                    "present_match": True,
                    "invert_match": not opaque,
                }
            }
        },
        "typed_config": typed,
    }


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
        # An invalid HTTP/2 request resets its own stream, not the client's connection with
        # every other stream on it (Envoy's default; spike: one uppercase header name cost
        # a concurrent valid request its answer). Nothing can carry a status there.
        "http2_protocol_options": {"override_stream_error_on_invalid_http_message": True},
        # Clients can quote it to operators; the access log carries the same id.
        "always_set_request_id_in_response": True,
        "access_log": _access_log(config),
        "local_reply_config": _with_drain_reply(
            _with_limit_replies(config, _with_protocol_error_replies(_local_reply_config()))
        ),
        "http_filters": [
            _internal_headers_filter(),
            _health_check_filter(),
            _drain_filter(),
            _request_decompressor(),
            *envoy_routing.request_metadata_filters(),
            # Before the route's other filters: it may change the route.
            _alias_lua_filter(),
            # Response order is the reverse: a stream's usage is read (sse_to_metadata)
            # before it is dropped (lua).
            _prompt_lua_filter(),
            _response_lua_filter(),
            _stream_usage_filter(),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    _TYPE: _T + "envoy.extensions.filters.http.router.v3.Router",
                    "suppress_envoy_headers": False,
                    "upstream_log": _upstream_log(config),
                },
            },
        ],
    }
    _add_client_timeouts(hcm, config)
    if s.tracing.enabled:
        hcm["tracing"] = envoy_tracing.hcm_tracing(s.tracing)
    if static_clusters:
        hcm["route_config"] = envoy_routing.route_configuration(config, _extra_routes(config))
    else:
        hcm["rds"] = {
            "route_config_name": envoy_routing.ROUTE_CONFIG,
            "config_source": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": str(paths.rds),
                    "watched_directory": {"path": str(paths.root)},
                },
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
    clusters = [
        _extproc_cluster(config, paths),
        _extproc_log_cluster(config, paths),
        _metrics_cluster(config),
        _control_cluster(paths),
    ]
    if s.tracing.enabled:
        clusters.append(envoy_tracing.otlp_cluster(s.tracing))
    doc: dict[str, Any] = {
        "node": {"id": "llmux", "cluster": "llmux"},
        "overload_manager": _overload_manager(config),
        "admin": {"address": address(s.admin)},
        "static_resources": {
            "listeners": [listener, _internal(envoy_routing.sink_listener(paths.sink_port))],
            "clusters": clusters,
        },
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
    doc["layered_runtime"]["layers"].append({"name": "admin", "admin_layer": {}})  # drain key
    if static_clusters:
        clusters.extend(provider_clusters(config, paths))
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
