"""Prometheus metrics, named as the issue and LiteLLM users expect.

Label values are bounded: model labels come from the config (unknown names become
"unknown"), statuses are HTTP codes, error types a fixed set. With several processor
workers, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by `llmux
run`) lets one endpoint report the sum.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)

if TYPE_CHECKING:
    from llmux_extproc.accounting.usage import Usage
    from llmux_extproc.control.config import Deployment

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
KEY_CACHE = Gauge(
    "llmux_key_cache_keys",
    "Virtual keys in each worker's cache (a series per process; the supervisor's stays 0)",
    multiprocess_mode="liveall",
)
SPEND_LOG_DROPPED = Counter(
    "llmux_spend_log_dropped",
    "Spend log rows dropped: the worker's queue was full (PostgreSQL down or too slow)",
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
# Written by the supervisor: a worker or Envoy that died and was started again.
RESTARTS = Counter("llmux_process_restarts", "Child processes restarted", ["process"])

# Written by the supervisor from the key database (observability/budgets.py): teams and
# keys that have a max_budget. `key`: the alias, else LiteLLM's key name; never the key.
TEAM_BUDGET = Gauge(
    "llmux_team_max_budget_usd", "Team max_budget", ["team", "team_alias"], multiprocess_mode="max"
)
TEAM_SPEND = Gauge(
    "llmux_team_spend_usd",
    "Team spend as the key database has it",
    ["team", "team_alias"],
    multiprocess_mode="max",
)
KEY_BUDGET = Gauge(
    "llmux_key_max_budget_usd", "Key max_budget", ["key", "team"], multiprocess_mode="max"
)
KEY_SPEND = Gauge(
    "llmux_key_spend_usd",
    "Key spend as the key database has it",
    ["key", "team"],
    multiprocess_mode="max",
)

# -- OpenTelemetry GenAI semantic conventions, named as an OpenTelemetry Prometheus exporter
# names them (dots become underscores, the unit `s` a `_seconds` suffix, `{token}` nothing),
# with the conventions' advisory bucket boundaries. Labels are the conventions' attributes.
GENAI_LABELS = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]
GENAI_TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Tokens per request (gen_ai.client.token.usage), by gen_ai_token_type input or output",
    [*GENAI_LABELS, "gen_ai_token_type"],
    buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216),
)
GENAI_REQUEST_DURATION = Histogram(
    "gen_ai_server_request_duration_seconds",
    "Time from the request body reaching LLMux to the end of the answer "
    "(gen_ai.server.request.duration); error_type set on failures",
    [*GENAI_LABELS, "error_type"],
    buckets=(
        0.01,
        0.02,
        0.04,
        0.08,
        0.16,
        0.32,
        0.64,
        1.28,
        2.56,
        5.12,
        10.24,
        20.48,
        40.96,
        81.92,
    ),
)
GENAI_TTFT = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "Time to the first streamed output (gen_ai.server.time_to_first_token)",
    GENAI_LABELS,
    buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10),
)
GENAI_TPOT = Histogram(
    "gen_ai_server_time_per_output_token_seconds",
    "Streaming time after the first output per further output token "
    "(gen_ai.server.time_per_output_token)",
    GENAI_LABELS,
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5),
)

# -- LiteLLM's names and labels (litellm/integrations/prometheus.py), filled only when the
# config asks for LiteLLM's Prometheus callback (`litellm_settings.callbacks: [prometheus]`),
# so a LiteLLM user's dashboards keep working. Only labels LLMux can fill with bounded
# values: end_user (a client string), user and hashed_api_key (one series per key) are
# left out; key and team aliases come from the key database, models from the config.
LITELLM_BUCKETS = (
    0.005, 0.00625, 0.0125, 0.025, 0.05, 0.1, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6,
    6.5, 7, 7.5, 8, 8.5, 9, 9.5, 10, 15, 20, 25, 30, 60, 120, 180, 240, 300,
)  # fmt: skip
CALLER_LABELS = ["team", "team_alias", "api_key_alias"]
REQUEST_LABELS = ["model", "requested_model", *CALLER_LABELS]
DEPLOYMENT_LABELS = ["litellm_model_name", "model_id", "api_base", "api_provider"]
LITELLM_REQUESTS = Counter(
    "litellm_proxy_total_requests_metric",
    "Client requests answered (LiteLLM's name)",
    ["requested_model", *CALLER_LABELS, "status_code"],
)
LITELLM_FAILED = Counter(
    "litellm_proxy_failed_requests_metric",
    "Client requests answered with an error (LiteLLM's name)",
    ["requested_model", *CALLER_LABELS, "exception_status", "exception_class"],
)
LITELLM_TOTAL_LATENCY = Histogram(
    "litellm_request_total_latency_metric",
    "Seconds from the answering attempt's request body to its last byte (LiteLLM's name)",
    REQUEST_LABELS,
    buckets=LITELLM_BUCKETS,
)
LITELLM_API_LATENCY = Histogram(
    "litellm_llm_api_latency_metric",
    "Seconds the provider took for the answering attempt (LiteLLM's name)",
    REQUEST_LABELS,
    buckets=LITELLM_BUCKETS,
)
LITELLM_TTFT = Histogram(
    "litellm_llm_api_time_to_first_token_metric",
    "Seconds to the first streamed output (LiteLLM's name)",
    REQUEST_LABELS,
    buckets=LITELLM_BUCKETS,
)
LITELLM_SPEND = Counter("litellm_spend_metric", "Spend in USD (LiteLLM's name)", REQUEST_LABELS)
LITELLM_TOTAL_TOKENS = Counter(
    "litellm_total_tokens_metric", "Input + output tokens (LiteLLM's name)", REQUEST_LABELS
)
LITELLM_INPUT_TOKENS = Counter(
    "litellm_input_tokens_metric", "Input tokens (LiteLLM's name)", REQUEST_LABELS
)
LITELLM_OUTPUT_TOKENS = Counter(
    "litellm_output_tokens_metric", "Output tokens (LiteLLM's name)", REQUEST_LABELS
)
LITELLM_LATENCY_PER_OUTPUT_TOKEN = Histogram(
    "litellm_deployment_latency_per_output_token",
    "Seconds per output token of streamed answers (LiteLLM's name)",
    [*DEPLOYMENT_LABELS, *CALLER_LABELS],
    buckets=LITELLM_BUCKETS,
)
# Supervisor side: budgets from the key database, as TEAM_BUDGET and KEY_BUDGET.
LITELLM_TEAM_MAX_BUDGET = Gauge(
    "litellm_team_max_budget_metric",
    "Maximum budget set for team (LiteLLM's name)",
    ["team", "team_alias"],
    multiprocess_mode="max",
)
LITELLM_TEAM_REMAINING = Gauge(
    "litellm_remaining_team_budget_metric",
    "Remaining budget for team (LiteLLM's name)",
    ["team", "team_alias"],
    multiprocess_mode="max",
)
LITELLM_KEY_MAX_BUDGET = Gauge(
    "litellm_api_key_max_budget_metric",
    "Maximum budget set for api key (LiteLLM's name)",
    ["api_key_alias"],
    multiprocess_mode="max",
)
LITELLM_KEY_REMAINING = Gauge(
    "litellm_remaining_api_key_budget_metric",
    "Remaining budget for api key (LiteLLM's name)",
    ["api_key_alias"],
    multiprocess_mode="max",
)
# Supervisor side: from every attempt Envoy's upstream log reports.
LITELLM_DEPLOYMENT_STATE = Gauge(
    "litellm_deployment_state",
    "0 healthy, 1 partial outage (half-open probes), 2 complete outage (cooling down or "
    "circuit open)",
    DEPLOYMENT_LABELS,
    multiprocess_mode="max",
)
LITELLM_DEPLOYMENT_REQUESTS = Counter(
    "litellm_deployment_total_requests",
    "Attempts sent to the deployment (LiteLLM's name)",
    [*DEPLOYMENT_LABELS, "requested_model"],
)
LITELLM_DEPLOYMENT_SUCCESS = Counter(
    "litellm_deployment_success_responses",
    "Attempts the deployment answered successfully (LiteLLM's name)",
    [*DEPLOYMENT_LABELS, "requested_model"],
)
LITELLM_DEPLOYMENT_FAILURE = Counter(
    "litellm_deployment_failure_responses",
    "Attempts the deployment failed (LiteLLM's name); exception_status 0: no response",
    [*DEPLOYMENT_LABELS, "requested_model", "exception_status"],
)
LITELLM_DEPLOYMENT_COOLED_DOWN = Counter(
    "litellm_deployment_cooled_down",
    "Cooldowns started (LiteLLM's name)",
    [*DEPLOYMENT_LABELS, "exception_status"],
)

# LLMux provider → the conventions' gen_ai.provider.name, where they name one; others keep
# LLMux's name (a fixed set: the provider registry).
GENAI_PROVIDERS = {
    "azure": "azure.ai.openai",
    "bedrock": "aws.bedrock",
    "gemini": "gcp.gemini",
    "vertex_ai": "gcp.vertex_ai",
    "mistral": "mistral_ai",
    "xai": "x_ai",
}
# An HTTP status → the openai SDK's exception class, LiteLLM's `exception_class` values.
EXCEPTION_CLASSES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "Timeout",
    413: "BadRequestError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    499: "APIConnectionError",
    503: "ServiceUnavailableError",
    504: "Timeout",
}


def exception_class(status: int) -> str:
    return EXCEPTION_CLASSES.get(status, "InternalServerError" if status >= 500 else "APIError")


def api_base(dep: Deployment) -> str:
    """The deployment's provider URL without path or query (never a key: config text)."""
    up = dep.upstream
    return "" if up is None else f"{up.scheme}://{up.authority}"


def deployment_labels(dep: Deployment) -> tuple[str, str, str, str]:
    """LiteLLM's deployment labels: litellm_model_name, model_id, api_base, api_provider."""
    return (f"{dep.provider}/{dep.model}", dep.id, api_base(dep), dep.provider)


# The labelled children of one (deployment, operation, caller): looking them up costs
# ~1 us each in multiprocess mode, and an answer touches up to a dozen. The key holds
# config values and key-database aliases only, so the cache is as bounded as the labels.
_children: dict[tuple[str, ...], dict[str | int, Any]] = {}


_labelled: dict[tuple[object, ...], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: the per-answer counters of gateway.py
    (same reason and bound as `_children`)."""
    key = (id(metric), *labels)  # module-level metrics: their ids never change
    found = _labelled.get(key)
    if found is None:
        found = _labelled[key] = metric.labels(*labels)
    return found


def _request_children(
    dep: Deployment, operation: str, caller: tuple[str, str, str], litellm: bool
) -> dict[str | int, Any]:
    key = (dep.id, dep.model_name, dep.provider, dep.model, operation, *caller, str(litellm))
    found = _children.get(key)
    if found is not None:
        return found
    genai = (operation, GENAI_PROVIDERS.get(dep.provider, dep.provider), dep.model_name)
    children: dict[str | int, Any] = {
        "tokens_in": GENAI_TOKEN_USAGE.labels(*genai, "input"),
        "tokens_out": GENAI_TOKEN_USAGE.labels(*genai, "output"),
        "duration": GENAI_REQUEST_DURATION.labels(*genai, ""),
        "ttft": GENAI_TTFT.labels(*genai),
        "tpot": GENAI_TPOT.labels(*genai),
        "genai": genai,
    }
    if litellm:
        req = (dep.model, dep.model_name, *caller)
        children |= {
            "l_latency": LITELLM_TOTAL_LATENCY.labels(*req),
            "l_api_latency": LITELLM_API_LATENCY.labels(*req),
            "l_ttft": LITELLM_TTFT.labels(*req),
            "l_spend": LITELLM_SPEND.labels(*req),
            "l_total": LITELLM_TOTAL_TOKENS.labels(*req),
            "l_in": LITELLM_INPUT_TOKENS.labels(*req),
            "l_out": LITELLM_OUTPUT_TOKENS.labels(*req),
            "l_tpot": LITELLM_LATENCY_PER_OUTPUT_TOKEN.labels(*deployment_labels(dep), *caller),
        }
    _children[key] = children
    return children


def answered(
    dep: Deployment,
    operation: str,
    caller: tuple[str, str, str],
    status: int,
    seconds: float,
    usage: Usage | None,
    cost: float | None,
    litellm: bool,
) -> None:
    """One request's final answer, in the GenAI conventions' and (`litellm`) LiteLLM's
    names. `caller` is (team, team_alias, key_alias), each bounded by the key database."""
    c = _request_children(dep, operation, caller, litellm)
    if status >= 400:
        # error.type: the status class's OpenAI error type, a fixed set.
        from llmux_extproc.errors import error_type

        GENAI_REQUEST_DURATION.labels(*c["genai"], error_type(status)).observe(seconds)
    else:
        c["duration"].observe(seconds)
    if usage is not None:
        c["tokens_in"].observe(usage.prompt_tokens)
        c["tokens_out"].observe(usage.completion_tokens)
    if not litellm:
        return
    requests = c.get(status)
    if requests is None:
        requests = c[status] = LITELLM_REQUESTS.labels(dep.model_name, *caller, str(status))
    requests.inc()
    if status >= 400:
        LITELLM_FAILED.labels(dep.model_name, *caller, str(status), exception_class(status)).inc()
    c["l_latency"].observe(seconds)
    c["l_api_latency"].observe(seconds)
    if usage is not None:
        c["l_in"].inc(usage.prompt_tokens)
        c["l_out"].inc(usage.completion_tokens)
        c["l_total"].inc(usage.prompt_tokens + usage.completion_tokens)
    if cost is not None:
        c["l_spend"].inc(cost)


def streamed(
    dep: Deployment,
    operation: str,
    caller: tuple[str, str, str],
    ttft_s: float,
    per_token_s: float | None,
    litellm: bool,
) -> None:
    """A stream's time to first output and, with two output tokens or more, per token."""
    c = _request_children(dep, operation, caller, litellm)
    c["ttft"].observe(ttft_s)
    if per_token_s is not None:
        c["tpot"].observe(per_token_s)
    if litellm:
        c["l_ttft"].observe(ttft_s)
        if per_token_s is not None:
            c["l_tpot"].observe(per_token_s)


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


def render() -> tuple[bytes, str]:
    """The Prometheus text `serve` answers with (every process's figures in multiprocess
    mode), and its content type: for /metrics on the public listener, answered by a worker
    once the caller showed the master key."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    registry: CollectorRegistry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST
