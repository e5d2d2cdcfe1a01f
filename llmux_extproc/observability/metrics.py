"""Prometheus metrics, named as the issue and LiteLLM users expect.

Label values are bounded: model labels come from the config (unknown names become
"unknown"), statuses are HTTP codes, error types a fixed set. With several processor
workers, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by `llmux
run`) lets one endpoint report the sum.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # In multiprocess mode every increment calls os.getpid() to notice a fork (4.4% of a
    # worker's busy time in the profile). Workers are started with exec, never forked after
    # this import, so their pid is read once. Must run before any metric is created.
    _PID = os.getpid()
    values.ValueClass = values.MultiProcessValue(lambda: _PID)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter(
    "llm_requests", "LLM API requests answered", ["model", "provider", "status_code"]
)
LATENCY = Histogram(
    "llm_request_latency_seconds",
    "Time from the request body reaching LLMux to the response body",
    ["provider", "model"],
    buckets=LATENCY_BUCKETS,
)
TOKENS = Counter("llm_token_usage", "Tokens accounted", ["team", "model", "type"])
SPEND = Counter("llm_spend", "Cost in USD from the model price table", ["team", "model"])
UPSTREAM_ERRORS = Counter("llm_upstream_error", "Failed upstream answers", ["error_type"])
TIME_TO_FIRST_TOKEN = Histogram(
    "llm_time_to_first_token_seconds",
    "Time from the request body reaching LLMux to the first streamed output",
    ["provider", "model"],
    buckets=LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "llm_time_per_output_token_seconds",
    "Streaming time after the first output, per further output token",
    ["provider", "model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
)
STREAMED_TOKENS = Counter(
    "llm_streamed_tokens", "Tokens of streamed responses", ["model", "type", "estimated"]
)
OPEN_STREAMS = Gauge(
    "llmux_open_streams",
    "ext_proc streams (HTTP requests) in progress",
    multiprocess_mode="livesum",
)
ASYNCIO_TASKS = Gauge(
    "llmux_asyncio_tasks",
    "asyncio tasks alive in the ext_proc workers (sampled each second)",
    multiprocess_mode="livesum",
)
CONFIG_RELOADS = Counter("llmux_config_reloads", "Config reload attempts", ["result"])
# Written by the supervisor's control plane (one process), labelled by config values only.
DEPLOYMENT_STATE = Gauge(
    "llmux_deployment_state",
    "Deployment state: 0 healthy, 1 partial (half-open probes), 2 down (cooling down or "
    "circuit open); as LiteLLM's litellm_deployment_state",
    ["deployment", "model"],
    multiprocess_mode="max",
)
ATTEMPTS = Counter(
    "llmux_upstream_attempts",
    "Upstream attempts by deployment and kind (first, retry, fallback)",
    ["deployment", "kind"],
)
COOLDOWNS = Counter("llmux_deployment_cooldowns", "Cooldowns started", ["deployment"])
BREAKER = Counter(
    "llmux_circuit_breaker_transitions", "Circuit breaker transitions", ["deployment", "state"]
)
# Rate limits and budgets (policy/limits.py): refusals by LiteLLM's field (rpm_limit,
# tpm_limit, max_parallel_requests, model_rpm_limit, model_tpm_limit, max_budget).
RATE_LIMITED = Counter("llmux_admission_refused", "Requests refused by a limit", ["limit"])
SOFT_BUDGET_EXCEEDED = Counter(
    "llmux_soft_budget_exceeded", "Settlements at or above a soft_budget", ["scope"]
)
REDIS_ERRORS = Counter("llmux_redis_errors", "Redis calls that failed or timed out")


def serve(host: str, port: int) -> None:
    """Serve /metrics in a background thread (all workers' figures in multiprocess mode)."""
    registry = None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    if registry is None:
        start_http_server(port, addr=host)
    else:
        start_http_server(port, addr=host, registry=registry)
