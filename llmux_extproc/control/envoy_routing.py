"""Model groups as Envoy clusters, and the routes that reach them (docs/architecture.md).

Each model group is one cluster; each deployment is an endpoint of it, with its id in the
endpoint metadata. The group's own deployments are priority 0, each fallback group a
further priority, so Envoy's load balancer picks the deployment, its retry policy moves to
another deployment (`previous_hosts`) and then to the fallback groups
(`previous_priorities`), and the ext_proc running as an *upstream* filter of the cluster
translates and signs each attempt for the endpoint Envoy chose.

Requests that reach no group (unknown or missing model, `GET /v1/models`) and deployments
answered inside LLMux (`mock`) go to `llmux_local`, whose endpoint is a sink listener in
Envoy: the same upstream processor answers them before anything is forwarded. (Envoy
connects to the chosen endpoint while the processor runs, so the endpoint must accept.)
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from llmux_extproc.control.config import Config, Deployment, RouterSettings
from llmux_extproc.policy.strategies import DeploymentInfo, SimpleShuffle

_TYPE = "@type"
_T = "type.googleapis.com/"

EXTPROC_CLUSTER = "llmux_extproc"
LOCAL_CLUSTER = "llmux_local"
SINK_LISTENER = "llmux_sink"
ROUTE_CONFIG = "llmux"
# Dynamic metadata the downstream filters leave for every attempt (json_to_metadata,
# header_to_metadata), forwarded to the upstream processor.
REQUEST_NAMESPACE = "llmux.request"
# Endpoint metadata: `d` = "<priority>|<deployment id>".
HOST_NAMESPACE = "llmux"
TLS_MATCH_KEY = "tls"
# Set by the processor on an attempt's failed answer that another attempt may fix.
RETRY_HEADER = "x-llmux-retry"
# The processor's accounting marks for response.lua, on the answer's headers (metadata it
# writes as an upstream filter stays on the attempt's own stream info).
MARKS_HEADER = "x-llmux-marks"
PROMPT_FILTER = "llmux.prompt"  # prompt.lua's Lua filter, enabled on stream routes
ALIAS_FILTER = "llmux.alias"  # alias.lua: key model aliases, on the unknown-model route
ALIAS_PATH = "/llmux/alias"  # what alias.lua asks the processor, through llmux_local
# Routes whose request paths the access log leaves out (envoy_config) set this request
# header, through the first filter's per-route config.
OPAQUE_ROUTE = "llmux_opaque_path"
OPAQUE_HEADER = "x-llmux-opaque-path"


def opaque_route(route: dict[str, Any]) -> dict[str, Any]:
    """`route` marked for the access log as one whose path is not LLMux's (the catch-all
    404, what the management prefixes do not serve): its requests' paths may hold anything,
    a key included, and are not logged. A request header the access log's header filter
    reads: a CEL filter on the route name cost ~10 us of Envoy CPU per request (measured)."""
    mark = {
        "append": {
            "header": {"key": OPAQUE_HEADER, "value": "1"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    }
    per_filter = route.setdefault("typed_per_filter_config", {})
    per_filter["envoy.filters.http.header_mutation"] = {
        _TYPE: _T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute",
        "mutations": {"request_mutations": [mark]},
    }
    return {"name": OPAQUE_ROUTE, **route}


API_PATHS = ("/v1/chat/completions", "/chat/completions", "/v1/embeddings", "/embeddings")
MODEL_LIST_PATHS = ("/v1/models", "/models")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Client key headers: moved into metadata before routing (a retry must still see the
# client's key, and no provider may).
CLIENT_KEY_HEADERS = ("authorization", "api-key", "x-api-key")


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def group_cluster_name(group: str) -> str:
    # Stable across reloads and safe for Envoy's stat names, whatever the model name holds.
    return "llm_" + hashlib.sha256(group.encode()).hexdigest()[:16]


def priorities(config: Config, group: str) -> list[list[Deployment]]:
    """The deployments a group's cluster holds, per priority: its own, then each fallback
    group's (a deployment appears once, at its first priority)."""
    seen: set[str] = set()
    levels: list[list[Deployment]] = []
    for name in (group, *(g for _, g in config.router.fallback_groups(group))):
        level = [d for d in config.group(name) if d.id not in seen]
        seen.update(d.id for d in level)
        if level:
            levels.append(level)
    return levels


def endpoint(
    dep: Deployment,
    priority: int,
    sink_port: int,
    *,
    addresses: list[str] | None = None,
    weight: int = 1,
    healthy: bool = True,
) -> dict[str, Any]:
    """One deployment as an endpoint. `addresses`: what the provider's name resolved to
    (the supervisor resolves names, so each deployment is one host, its further addresses
    Envoy's additional addresses); None leaves a name for a DNS cluster to resolve."""
    metadata: dict[str, Any] = {HOST_NAMESPACE: {"d": f"{priority}|{dep.id}"}}
    up = dep.upstream
    extra: list[str] = []
    if up is None:  # answered inside LLMux
        hosts, port = ["127.0.0.1"], sink_port
    else:
        hosts = addresses or ["127.0.0.1" if up.host == "localhost" else up.host]
        port = up.port
        if up.tls:
            metadata["envoy.transport_socket_match"] = {TLS_MATCH_KEY: up.host}
    first, *extra = hosts
    ep: dict[str, Any] = {
        "address": {"socket_address": {"address": first, "port_value": port}},
        # Only a label (admin /clusters); the processor sets each attempt's :authority.
        "hostname": f"{priority}.{dep.id}",
    }
    if extra:
        ep["additional_addresses"] = [
            {"address": {"socket_address": {"address": a, "port_value": port}}} for a in extra
        ]
    return {
        "endpoint": ep,
        "load_balancing_weight": max(1, weight),
        # UNHEALTHY takes it out of the load balancer; the supervisor decides (cooldowns,
        # breaker) and Envoy enforces, the same for every worker.
        "health_status": "HEALTHY" if healthy else "UNHEALTHY",
        "metadata": {"filter_metadata": metadata},
    }


def initial_weights(deps: list[Deployment]) -> dict[str, int]:
    """simple-shuffle's weights (weight, else rpm, else tpm), before any policy applies."""
    infos = [DeploymentInfo(d.id, d.weight, d.rpm, d.tpm) for d in deps]
    return SimpleShuffle().weights(infos, {})


def load_assignment(
    config: Config,
    group: str,
    sink_port: int,
    *,
    addresses: Mapping[str, list[str]] | None = None,
    weights: Mapping[str, int] | None = None,
    healthy: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """The group cluster's endpoints, with the control plane's health and weights."""
    levels = []
    for p, level in enumerate(priorities(config, group)):
        w = {**initial_weights(level), **(weights or {})}
        levels.append(
            {
                "priority": p,
                "lb_endpoints": [
                    endpoint(
                        d,
                        p,
                        sink_port,
                        addresses=(addresses or {}).get(d.upstream.host) if d.upstream else None,
                        weight=w.get(d.id, 1),
                        healthy=(healthy or {}).get(d.id, True),
                    )
                    for d in level
                ],
            }
        )
    return {
        "cluster_name": group_cluster_name(group),
        "endpoints": levels,
        # A priority keeps all traffic while any of its endpoints is healthy: the next
        # group is a fallback, not an overflow (Envoy's default 140 spills early).
        "policy": {"overprovisioning_factor": 100000},
    }


def _tls_socket(host: str, alpn: list[str]) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            _TYPE: _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": host,
            "common_tls_context": {
                "alpn_protocols": alpn,
                "validation_context": {
                    "trusted_ca": {"filename": CA_BUNDLE},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": host}}
                    ],
                },
            },
        },
    }


def upstream_extproc_filter(config: Config) -> dict[str, Any]:
    s = config.settings
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            _TYPE: _T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {
                "envoy_grpc": {
                    "cluster_name": EXTPROC_CLUSTER,
                    # Prompts with images run to megabytes; gRPC's 4 MiB default would cut them.
                    "max_receive_message_length": max(
                        s.max_request_body_bytes, s.max_response_body_bytes
                    )
                    + 65536,
                },
                "timeout": "30s",
            },
            "processing_mode": {
                # Headers are held until the body is translated (SEND holds them; SKIP would
                # send them upstream before the body is read).
                "request_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                "response_header_mode": "SEND",
                # The processor asks for the body (mode override) only when it translates it.
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            # The endpoint Envoy chose for this attempt, as protobuf text (see extproc.py).
            "request_attributes": ["xds.upstream_host_metadata"],
            "metadata_options": {"forwarding_namespaces": {"untyped": [REQUEST_NAMESPACE]}},
            "message_timeout": "10s",
            # A worker gone mid-request: the client gets a 503 (OpenAI-shaped by
            # local_reply_config), never a 500.
            "status_on_error": {"code": 503},
            "allow_mode_override": True,
            "mutation_rules": {"allow_all_routing": True, "allow_envoy": True},
            "failure_mode_allow": False,
        },
    }


def upstream_filters(config: Config) -> list[dict[str, Any]]:
    """The filters every attempt runs through: the processor, then the codec (last, as
    Envoy requires of upstream filter chains)."""
    return [
        upstream_extproc_filter(config),
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {
                _TYPE: _T + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
            },
        },
    ]


def group_cluster(
    config: Config, group: str, sink_port: int, assignment: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The group's cluster with its endpoints inline: `assignment` is what the supervisor's
    control plane says now (resolved addresses, health, weights), else the config's.

    Inline rather than EDS: Envoy's EDS merges endpoints that share an address (its host
    map is keyed by address), and deployments often do (several keys or models on one
    provider, a group and its fallback on the same API); STATIC and DNS clusters keep
    them apart, as the spike showed. A change replaces the cluster (its connections are
    re-opened), so the control plane pushes health changes at once and weight-only changes
    at most every few seconds."""
    s = config.settings
    name = group_cluster_name(group)
    levels = priorities(config, group)
    deployments = [d for level in levels for d in level]
    if assignment is None:
        assignment = load_assignment(config, group, sink_port)
    hostnames = any(
        not is_ip(ep["endpoint"]["address"]["socket_address"]["address"])
        for level in assignment["endpoints"]
        for ep in level["lb_endpoints"]
    )
    cluster: dict[str, Any] = {
        "name": name,
        "connect_timeout": _duration(s.connect_timeout_s),
        "per_connection_buffer_limit_bytes": s.max_response_body_bytes,
        # With every endpoint marked down the request fails over to no one rather than to
        # all (panic routing); the supervisor keeps the least-recently-failed one routable.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        # LLM calls are long; Envoy's default of 1024 in-flight requests per cluster is a
        # bulkhead sized for short RPCs.
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 10000,
                    "max_pending_requests": 10000,
                    "max_requests": 10000,
                    "max_retries": 10000,
                }
            ]
        },
    }
    cluster["load_assignment"] = assignment
    if hostnames:
        # A name the supervisor could not resolve (yet): Envoy resolves it. Each address
        # it resolves to becomes a host of the deployment (LOGICAL_DNS, one host per name,
        # allows one endpoint per cluster).
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    else:
        cluster["type"] = "STATIC"
    # simple-shuffle and the strategies' weights: Envoy's weighted least request. With
    # equal weights it picks the less busy of two random deployments, otherwise it follows
    # the weights (earliest-deadline-first, adjusted by in-flight requests). Not RANDOM:
    # it ignores weights (measured: 153/147 for 9:1); not round robin: after a retry moved
    # its cursor every request started on the same deployment (a failing one got 72-86%
    # of first attempts instead of half, in the failover benchmark); not Maglev: it hashes
    # by address, and deployments sharing one got equal shares whatever their weights.
    cluster["lb_policy"] = "LEAST_REQUEST"
    if config.routing_strategy == "least-busy":
        del cluster["lb_policy"]
        cluster["load_balancing_policy"] = {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "envoy.load_balancing_policies.least_request",
                        "typed_config": {
                            _TYPE: _T + "envoy.extensions.load_balancing_policies.least_request.v3."
                            "LeastRequest",
                            # Every endpoint compared, not two random ones: a group is small
                            # and "least busy" should mean it.
                            "selection_method": "FULL_SCAN",
                        },
                    }
                }
            ]
        }
    tls_hosts = sorted({d.upstream.host for d in deployments if d.upstream and d.upstream.tls})
    # HTTP/2 where TLS negotiates it (ALPN); a group that mixes TLS and plain endpoints (a
    # local server, the mock's sink) speaks HTTP/1.1 to all, since Envoy's ALPN choice
    # needs TLS as every endpoint's socket.
    all_tls = all(d.upstream and d.upstream.tls for d in deployments)
    alpn = ["h2", "http/1.1"] if all_tls else ["http/1.1"]
    if tls_hosts:
        cluster["transport_socket_matches"] = [
            {
                "name": f"tls-{i}",
                "match": {TLS_MATCH_KEY: host},
                "transport_socket": _tls_socket(host, alpn),
            }
            for i, host in enumerate(tls_hosts)
        ]
    protocol: dict[str, Any] = {"explicit_http_config": {"http_protocol_options": {}}}
    if all_tls:
        cluster["transport_socket"] = _tls_socket(tls_hosts[0], alpn)
        protocol = {"auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}}}
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            _TYPE: _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            **protocol,
            "http_filters": upstream_filters(config),
        }
    }
    return cluster


def local_cluster(config: Config, sink_port: int) -> dict[str, Any]:
    """Where requests no group takes are answered by the processor (errors, model list,
    mock): a cluster like the groups', whose endpoint is Envoy's own sink listener."""
    cluster = {
        "name": LOCAL_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": LOCAL_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": "127.0.0.1",
                                        "port_value": sink_port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
        "circuit_breakers": {
            "thresholds": [
                {"max_connections": 10000, "max_pending_requests": 10000, "max_requests": 10000}
            ]
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                _TYPE: _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": upstream_filters(config),
            }
        },
    }
    return cluster


def sink_listener(sink_port: int) -> dict[str, Any]:
    """Accepts the connections Envoy opens to `llmux_local` and mock endpoints; a request
    reaches it only if the processor let one through, which it never does."""
    hcm = {
        _TYPE: _T
        + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "llmux_sink",
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {_TYPE: _T + "envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "sink",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {
                                "status": 500,
                                "body": {"inline_string": "not answered by the processor"},
                            },
                        }
                    ],
                }
            ]
        },
    }
    return {
        "name": SINK_LISTENER,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": sink_port}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def provider_clusters(
    config: Config, sink_port: int, assignments: Mapping[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The clusters served through CDS: one per model group, plus `llmux_local`;
    `assignments` (per group) from the control plane."""
    return [local_cluster(config, sink_port)] + [
        group_cluster(config, name, sink_port, (assignments or {}).get(name))
        for name in config.model_names
    ]


def is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def attempts_per_group(router: RouterSettings) -> int:
    return router.num_retries + 1


def retry_policy(config: Config, group: str) -> dict[str, Any]:
    """Envoy's retry policy for one group: `num_retries` within the group (spread over its
    deployments), then as many attempts on each fallback group in order."""
    router = config.router
    per_group = attempts_per_group(router)
    levels = len(priorities(config, group))
    policy: dict[str, Any] = {
        # Answers are judged by the processor (RETRY_HEADER); Envoy adds what never reaches
        # it: resets, refused connections, per-try timeouts, Envoy's own 502-504.
        "retry_on": "retriable-headers,reset,connect-failure,gateway-error",
        "retriable_headers": [{"name": RETRY_HEADER, "present_match": True}],
        "num_retries": per_group * levels - 1,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    _TYPE: _T
                    + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        # The load balancer picks at random among the less busy; a fast-failing deployment
        # is often the least busy, so the predicate may reject it many times in a row. With
        # 5 re-picks, 3.1% of the failover benchmark's requests met it twice and failed.
        "host_selection_retry_max_attempts": 50,
        # Retries are meant to land elsewhere; a short pause keeps a brief blip from eating
        # the whole budget without making failover slow.
        "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.25s"},
    }
    if levels > 1:
        policy["retry_priority"] = {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                _TYPE: _T
                + "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                "update_frequency": per_group,
            },
        }
    if router.timeout_s or any(d.timeout_s for d in config.group(group)):
        timeouts = [t for t in (router.timeout_s, *(d.timeout_s for d in config.group(group))) if t]
        policy["per_try_timeout"] = _duration(max(timeouts))
    return policy


def _model_is(group: str) -> dict[str, Any]:
    return {
        "filter": REQUEST_NAMESPACE,
        "path": [{"key": "model"}],
        "value": {"string_match": {"exact": group}},
    }


_IS_STREAM = {
    "filter": REQUEST_NAMESPACE,
    "path": [{"key": "stream"}],
    "value": {"bool_match": True},
}


def _api_paths_regex() -> str:
    return "|".join(p.replace("/", "\\/") for p in API_PATHS)


def routes(config: Config, extra: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The route table: API paths per model group (streamed or not), everything else the
    processor or Envoy answers. `extra` routes (health, metrics) go before the catch-all."""
    s = config.settings
    post_api = {
        "safe_regex": {"regex": _api_paths_regex()},
        "headers": [{"name": ":method", "string_match": {"exact": "POST"}}],
    }
    table: list[dict[str, Any]] = [unsupported_encoding_route()]
    for group in config.model_names:
        policy = retry_policy(config, group)
        action: dict[str, Any] = {
            "cluster": group_cluster_name(group),
            "timeout": _duration(s.request_timeout_s),
            # A whole answer may be silent until it is done; without this the listener's
            # stream idle timeout (its value at Envoy's start) would cut it, whatever a
            # reload made request_timeout (measured: 504 "stream timeout" after a reload
            # raised request_timeout above it).
            "idle_timeout": _duration(s.request_timeout_s),
            "retry_policy": policy,
        }
        stream_action = {**action, "idle_timeout": _duration(s.stream_idle_timeout_s)}
        stream_policy = dict(policy)
        # The deployment's timeout (per_try_timeout) bounds the wait for a stream's first
        # byte: Envoy stops that timer once the response starts (verified end to end: a
        # 1.5 s stream under `timeout: 0.5` completes, a 1.2 s silent start is cut).
        # LiteLLM's stream_timeout is an HTTP read timeout, Envoy's per-try idle timeout.
        if config.router.stream_timeout_s:
            stream_policy["per_try_idle_timeout"] = _duration(config.router.stream_timeout_s)
        stream_action["retry_policy"] = stream_policy
        table.append(
            {
                # A streamed answer may run long, but must not stall: bounded by idle time.
                "match": {**post_api, "dynamic_metadata": [_model_is(group), _IS_STREAM]},
                "route": stream_action,
                # Keeps the prompt for counting a stream cut short (prompt.lua).
                "typed_per_filter_config": {
                    PROMPT_FILTER: {
                        _TYPE: _T + "envoy.extensions.filters.http.lua.v3.LuaPerRoute",
                        "name": "prompt",
                    }
                },
            }
        )
        table.append(
            {"match": {**post_api, "dynamic_metadata": [_model_is(group)]}, "route": action}
        )
    local = {"cluster": LOCAL_CLUSTER, "timeout": "30s"}
    unknown_model: dict[str, Any] = {"match": post_api, "route": local}
    if config.database_url and config.master_key:
        # Only virtual keys have aliases: without a key database no request pays for it.
        unknown_model["typed_per_filter_config"] = {
            ALIAS_FILTER: {
                _TYPE: _T + "envoy.extensions.filters.http.lua.v3.LuaPerRoute",
                "name": "alias",
            }
        }
    table.append(unknown_model)
    for path in MODEL_LIST_PATHS:
        table.append(
            {
                "match": {
                    "path": path,
                    "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
                },
                "route": local,
            }
        )
    table.extend(_wrong_method_routes())
    table.extend(extra)
    table.append(
        opaque_route(
            {
                "match": {"prefix": "/"},
                "direct_response": {
                    "status": 404,
                    "body": {
                        "inline_string": '{"error":{"message":"Unknown path. LLMux serves '
                        '/v1/chat/completions, /v1/embeddings and /v1/models.",'
                        '"type":"not_found_error","param":null,"code":"404"}}'
                    },
                },
                "response_headers_to_add": [
                    {"header": {"key": "content-type", "value": "application/json"}}
                ],
            }
        )
    )
    return table


def method_not_allowed(match: dict[str, Any], allow: str) -> dict[str, Any]:
    """A 405 with `Allow`, in OpenAI's shape, answered by Envoy."""
    message = f"Method not allowed; this path accepts {allow}."
    body = orjson.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "405",
            }
        }
    ).decode()
    return {
        "match": match,
        "direct_response": {"status": 405, "body": {"inline_string": body}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": "application/json"}},
            {"header": {"key": "allow", "value": allow}},
        ],
    }


def unsupported_encoding_route() -> dict[str, Any]:
    """A request body in an encoding Envoy's decompressor did not undo (it takes gzip and
    removes the header): 415, never forwarded as it is. Also met by a gzip body that does
    not inflate (corrupt, or beyond the inflate ratio): its JSON cannot be read, so the
    route chosen on the headers, while they still named the encoding, stands (spike)."""
    body = orjson.dumps(
        {
            "error": {
                "message": "Content-Encoding is not supported, or the gzip body could not "
                "be decompressed; send the body uncompressed or gzip-compressed.",
                "type": "invalid_request_error",
                "param": None,
                "code": "415",
            }
        }
    ).decode()
    encoded = [
        {"name": "content-encoding", "present_match": True},
        {
            "name": "content-encoding",
            "string_match": {"exact": "identity", "ignore_case": True},
            "invert_match": True,
        },
    ]
    return {
        "match": {"prefix": "/", "headers": encoded},
        "direct_response": {"status": 415, "body": {"inline_string": body}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": "application/json"}}
        ],
    }


def _not_method(method: str) -> list[dict[str, Any]]:
    return [{"name": ":method", "string_match": {"exact": method}, "invert_match": True}]


def _wrong_method_routes() -> list[dict[str, Any]]:
    """Known paths asked with a method they do not take: 405, not the catch-all's 404.
    After the routes that take them (the API's POST, the model list's GET), before the
    extra routes, so /metrics and /health get theirs whatever serves the right method."""
    table = [method_not_allowed({"safe_regex": {"regex": _api_paths_regex()}}, "POST")]
    # CONNECT has no path; without a route for it, it waited for ever in json_to_metadata
    # (a tunnel's body never ends). With one, Envoy refuses the tunnel at once, since no
    # CONNECT upgrade is configured: 403 `upgrade_failed` (spike), shaped by envoy_config.
    table.append(method_not_allowed({"connect_matcher": {}}, "GET, POST"))
    table += [method_not_allowed({"path": p}, "GET") for p in MODEL_LIST_PATHS]
    # The metrics server (prometheus_client) takes GET and OPTIONS, and answers anything
    # else with a plain-text 405.
    for path in ("/metrics", "/health"):
        table.append(method_not_allowed({"path": path, "headers": _not_method("GET")}, "GET"))
    return table


def route_configuration(config: Config, extra: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    return {
        "name": ROUTE_CONFIG,
        "virtual_hosts": [
            {
                "name": "llmux",
                "domains": ["*"],
                "routes": routes(config, extra),
                # What Envoy buffers of a request body (json_to_metadata, the router's copy
                # for retries): above the listener's per-connection limit as well (spike:
                # a 400 kB body passed a 100 kB listener with this at 1 MB), so a reload
                # raising max_request_body_bytes takes effect; larger bodies get Envoy's 413.
                "request_body_buffer_limit": config.settings.max_request_body_bytes,
                # The processor reads the attempt number (x-litellm-attempted-retries).
                "include_request_attempt_count": True,
                # prompt.lua and alias.lua run only where a route names them.
                "typed_per_filter_config": {
                    name: {
                        _TYPE: _T + "envoy.extensions.filters.http.lua.v3.LuaPerRoute",
                        "disabled": True,
                    }
                    for name in (PROMPT_FILTER, ALIAS_FILTER)
                },
            }
        ],
    }


def request_metadata_filters() -> list[dict[str, Any]]:
    """Downstream filters that leave for every attempt what the processor needs and the
    router routes on: the client's key (moved out of the headers) and the body's model and
    stream flag (read by Envoy's C++ JSON parser; top-level keys only)."""
    key_rules = [
        {
            "header": name,
            "on_header_present": {"metadata_namespace": REQUEST_NAMESPACE, "key": name},
            "remove": True,
        }
        for name in CLIENT_KEY_HEADERS
    ]
    # The client's path: an attempt rewrites :path for its provider, and the next attempt
    # sees that rewrite in the shared headers.
    key_rules.append(
        {
            "header": ":path",
            "on_header_present": {"metadata_namespace": REQUEST_NAMESPACE, "key": "path"},
        }
    )

    def rule(key: str, kind: str) -> dict[str, Any]:
        return {
            "selectors": [{"key": key}],
            "on_present": {"metadata_namespace": REQUEST_NAMESPACE, "key": key, "type": kind},
        }

    return [
        {
            "name": "envoy.filters.http.header_to_metadata",
            "typed_config": {
                _TYPE: _T + "envoy.extensions.filters.http.header_to_metadata.v3.Config",
                "request_rules": key_rules,
            },
        },
        {
            "name": "envoy.filters.http.json_to_metadata",
            "typed_config": {
                _TYPE: _T + "envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
                "request_rules": {
                    "rules": [rule("model", "STRING"), rule("stream", "PROTOBUF_VALUE")],
                    # Whatever the client calls it: the processor answers a body that is not
                    # JSON with a clear 400.
                    "allow_content_types_regex": {"regex": ".*"},
                    "allow_empty_content_type": True,
                },
            },
        },
    ]
