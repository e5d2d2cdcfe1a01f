"""The fast mock provider and the bare-Envoy floor: two Envoy configurations.

The mock is an Envoy process answering every provider call with `direct_response`: a static
OpenAI chat.completion, a static Anthropic Messages answer, and static SSE bodies for
streaming (OpenAI chunks, Anthropic events). Static answers from Envoy cost microseconds, so
what is measured is the gateway in front of it, not the provider.

Which answer comes back is chosen by the listener (port), since a route cannot look into
the request body: one port per kind of answer, so each gateway deployment picks its answer
with its `api_base`, and each gets an upstream cluster of its own, as distinct providers
would. One more listener (FAILING) answers every call with HTTP 500 and an OpenAI-shaped
error body: the broken deployment of the failover scenario. Held streams need an upstream
that stays open after the first chunk, which `direct_response` cannot do:
`bench.hold_server` plays that part.
"""

from __future__ import annotations

from typing import Any

import orjson

_TYPE = "@type"
_T = "type.googleapis.com/"
MODEL_OPENAI = "gpt-4o-mini"
MODEL_ANTHROPIC = "claude-3-5-haiku-20241022"
# Content events per streamed answer (plus role/usage/stop events around them).
STREAM_CHUNKS = 20
_WORDS = [f" word{i}" for i in range(STREAM_CHUNKS)]
COMPLETION_TEXT = "".join(_WORDS).strip()


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def openai_json() -> str:
    return _dumps(
        {
            "id": "chatcmpl-bench-1",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": MODEL_OPENAI,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": COMPLETION_TEXT, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 14, "completion_tokens": 20, "total_tokens": 34},
            "system_fingerprint": "fp_bench",
        }
    )


def anthropic_json() -> str:
    return _dumps(
        {
            "id": "msg_bench_1",
            "type": "message",
            "role": "assistant",
            "model": MODEL_ANTHROPIC,
            "content": [{"type": "text", "text": COMPLETION_TEXT}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 14, "output_tokens": 20},
        }
    )


def _openai_chunk(delta: dict[str, Any], finish: str | None, usage: Any = None) -> str:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-bench-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL_OPENAI,
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if delta or finish
        else [],
    }
    if usage is not None:
        chunk["usage"] = usage
    return f"data: {_dumps(chunk)}\n\n"


def openai_sse(words: list[str] | None = None) -> str:
    parts = [_openai_chunk({"role": "assistant", "content": ""}, None)]
    parts += [_openai_chunk({"content": w}, None) for w in (words or _WORDS)]
    parts.append(_openai_chunk({}, "stop"))
    usage = {"prompt_tokens": 14, "completion_tokens": 20, "total_tokens": 34}
    parts.append(_openai_chunk({}, None, usage))
    parts.append("data: [DONE]\n\n")
    return "".join(parts)


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {_dumps({'type': name, **data})}\n\n"


def anthropic_sse() -> str:
    message: dict[str, Any] = {
        "id": "msg_bench_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL_ANTHROPIC,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 14, "output_tokens": 1},
    }
    parts = [
        _event("message_start", {"message": message}),
        _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        _event("ping", {}),
    ]
    parts += [
        _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}})
        for w in _WORDS
    ]
    parts.append(_event("content_block_stop", {"index": 0}))
    parts.append(
        _event(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 20},
            },
        )
    )
    parts.append(_event("message_stop", {}))
    return "".join(parts)


def openai_error_json() -> str:
    """What OpenAI sends with a 500."""
    return _dumps(
        {
            "error": {
                "message": "The server had an error while processing your request. "
                "Sorry about that!",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
    )


def _answer(body: str, content_type: str, status: int = 200) -> dict[str, Any]:
    return {
        "match": {
            "prefix": "/",
            "headers": [{"name": ":method", "string_match": {"exact": "POST"}}],
        },
        "direct_response": {"status": status, "body": {"inline_string": body}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": content_type}},
        ],
    }


def _hcm(stat_prefix: str, routes: list[dict[str, Any]], filters: list[dict[str, Any]]) -> Any:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            _TYPE: _T
            + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "stream_idle_timeout": "3600s",
            "request_timeout": "0s",
            "route_config": {
                "name": stat_prefix,
                # Static answers larger than the 4 KiB default.
                "max_direct_response_body_size_bytes": 1024 * 1024,
                "virtual_hosts": [{"name": stat_prefix, "domains": ["*"], "routes": routes}],
            },
            "http_filters": [
                *filters,
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {_TYPE: _T + "envoy.extensions.filters.http.router.v3.Router"},
                },
            ],
        },
    }


def _listener(name: str, port: int, hcm: Any) -> dict[str, Any]:
    return {"name": name, "address": _addr(port), "filter_chains": [{"filters": [hcm]}]}


def _bootstrap(node: str, admin_port: int, listeners: list[Any], clusters: list[Any]) -> Any:
    return {
        "node": {"id": node, "cluster": node},
        "admin": {"address": _addr(admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _addr(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


ANSWERS = {
    "openai": (openai_json, "application/json"),
    "anthropic": (anthropic_json, "application/json"),
    "openai_stream": (openai_sse, "text/event-stream"),
    "anthropic_stream": (anthropic_sse, "text/event-stream"),
}


# The failing deployment: its listener (and stat prefix, `http.failing.*` in the mock's
# admin stats, which count the attempts that reached it) and its status.
FAILING = "failing"
FAILING_STATUS = 500


def mock_config(ports: dict[str, int], admin_port: int, failing_port: int | None = None) -> Any:
    """Envoy bootstrap of the mock provider: one listener per kind of answer, `ports`
    mapping each kind of ANSWERS to its port, and with `failing_port` the FAILING listener
    answering every POST with a 500 and an OpenAI error body."""
    # The buffer filter reads each request body before the route answers: a reply sent
    # while the request is still incomplete would make Envoy close the connection, so
    # every proxied call would pay a new upstream connection.
    buffer = {
        "name": "envoy.filters.http.buffer",
        "typed_config": {
            _TYPE: _T + "envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": 16 * 1024 * 1024,
        },
    }
    listeners = []
    for kind, (body, content_type) in ANSWERS.items():
        routes = [
            _answer(body(), content_type),
            {"match": {"prefix": "/"}, "direct_response": {"status": 405}},
        ]
        listeners.append(_listener(f"mock_{kind}", ports[kind], _hcm(kind, routes, [buffer])))
    if failing_port is not None:
        routes = [
            _answer(openai_error_json(), "application/json", FAILING_STATUS),
            {"match": {"prefix": "/"}, "direct_response": {"status": 405}},
        ]
        hcm = _hcm(FAILING, routes, [buffer])
        listeners.append(_listener(f"mock_{FAILING}", failing_port, hcm))
    return _bootstrap("bench-mock", admin_port, listeners, [])


def _cluster(name: str, *ports: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _addr(port)}} for port in ports]}
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
            }
        },
    }


# Paths the floor is sent, and the mock answer each one is routed to (what a provider
# itself would be sent; the prefix only selects the cluster).
BARE_ROUTES = {
    "/failover/v1/chat/completions": "failover",
    "/stream/v1/chat/completions": "openai_stream",
    "/stream/v1/messages": "anthropic_stream",
    "/v1/chat/completions": "openai",
    "/v1/messages": "anthropic",
    "/hold/": "hold",
}


# The floor of the failover scenario: Envoy alone retrying a 5xx once on the other
# endpoint, as LLMux's group route does with `num_retries: 1` (same host predicate, same
# jittered back-off before the retry). Its load balancer is round robin; LLMux's groups use
# weighted least request (envoy_routing), which favours a deployment that fails fast.
BARE_FAILOVER_RETRY = {
    "retry_on": "5xx",
    "num_retries": 1,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                _TYPE: _T + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": 5,
    "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.25s"},
}


def bare_proxy_config(
    port: int,
    admin_port: int,
    upstream_ports: dict[str, int],
    failover_ports: tuple[int, int] | None = None,
) -> Any:
    """The floor: a plain Envoy listener routing to the mock, its upstream clusters set up
    like LLMux's provider clusters (HTTP/1.1, same circuit breakers), no filter but the
    router. `upstream_ports` maps each kind of ANSWERS and "hold" to its port;
    `failover_ports` (the FAILING port, then the OpenAI one) makes the "failover" cluster of
    those two endpoints, whose route retries a 5xx once on the other one."""
    routes = []
    for path, kind in BARE_ROUTES.items():
        if kind == "failover" and failover_ports is None:
            continue
        route: dict[str, Any] = {"cluster": kind, "timeout": "0s" if kind == "hold" else "600s"}
        if kind == "failover":
            route["retry_policy"] = BARE_FAILOVER_RETRY
        routes.append({"match": {"prefix": path}, "route": route})
    clusters = [_cluster(kind, p) for kind, p in upstream_ports.items()]
    if failover_ports is not None:
        failover = _cluster("failover", *failover_ports)
        # Envoy's default allows 3 concurrent retries per cluster and answers the rest with
        # the failed attempt; LLMux's group clusters raise it, and so does the floor.
        failover["circuit_breakers"]["thresholds"][0]["max_retries"] = 10000
        clusters.append(failover)
    listener = _listener("bare", port, _hcm("bare", routes, []))
    return _bootstrap("bench-bare", admin_port, [listener], clusters)
