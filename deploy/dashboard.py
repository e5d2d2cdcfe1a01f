"""LLMux's Grafana dashboard and Prometheus alert rules, from one list of queries.

`make dashboard` writes `deploy/grafana/llmux.json` (built with grafana-foundation-sdk,
Grafana's own typed builders) and `deploy/prometheus/llmux-rules.yml`; a test checks the
committed files equal what this script generates, and tests/test_e2e_prometheus.py
evaluates every query against a real Prometheus scraping a running LLMux.

Queries use two dashboard variables: `$model` (the model groups, from
`llm_requests_total`) and Grafana's `$__rate_interval`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from grafana_foundation_sdk.builders import common as gc
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    TooltipDisplayMode,
)
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

ROOT = Path(__file__).resolve().parent
DASHBOARD_PATH = ROOT / "grafana" / "llmux.json"
RULES_PATH = ROOT / "prometheus" / "llmux-rules.yml"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
M = 'model=~"$model"'
RATE = "[$__rate_interval]"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # or "stat"


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def _quantiles(metric: str, by: str, label_filter: str = "") -> tuple[Query, ...]:
    inner = f"sum by (le, {by}) (rate({metric}_bucket{{{label_filter}}}{RATE}))"
    return tuple(
        Query(f"histogram_quantile({q}, {inner})", f"p{round(q * 100)} {{{{{by}}}}}")
        for q in (0.5, 0.95, 0.99)
    )


GM = 'gen_ai_request_model=~"$model"'
TEAM_BUDGET_USED = (
    "max by (team, team_alias) (llmux_team_spend_usd)"
    " / max by (team, team_alias) (llmux_team_max_budget_usd > 0)"
)
KEY_BUDGET_USED = "max by (key) (llmux_key_spend_usd) / max by (key) (llmux_key_max_budget_usd > 0)"

ROWS: tuple[Row, ...] = (
    Row(
        "Traffic and errors",
        (
            Panel(
                "Request rate by model and provider",
                "Answered requests per second (llm_requests_total), retries not counted",
                "reqps",
                (
                    Query(
                        f"sum by (model, provider) (rate(llm_requests_total{{{M}}}{RATE}))",
                        "{{model}} / {{provider}}",
                    ),
                ),
            ),
            Panel(
                "Error rate by model and provider",
                "Share of answered requests with a 4xx or 5xx status",
                "percentunit",
                (
                    Query(
                        "sum by (model, provider) "
                        f'(rate(llm_requests_total{{{M},status_code=~"[45].."}}{RATE}))'
                        f" / sum by (model, provider) (rate(llm_requests_total{{{M}}}{RATE}))",
                        "{{model}} / {{provider}}",
                    ),
                ),
            ),
            Panel(
                "Upstream errors by type",
                "Failed provider answers, retried ones included (llm_upstream_error_total)",
                "reqps",
                (
                    Query(
                        f"sum by (error_type) (rate(llm_upstream_error_total{RATE}))",
                        "{{error_type}}",
                    ),
                ),
            ),
            Panel(
                "Responses by status class (Envoy)",
                "Every response the listener sent, LLMux's own 4xx (unknown model, bad key, "
                "bad JSON) included",
                "reqps",
                (
                    Query(
                        "sum by (envoy_response_code_class) "
                        '(rate(envoy_http_downstream_rq_xx{envoy_http_conn_manager_prefix="llmux"}'
                        f"{RATE}))",
                        "{{envoy_response_code_class}}xx",
                    ),
                ),
            ),
        ),
    ),
    Row(
        "Latency",
        (
            Panel(
                "Request latency p50 / p95 / p99",
                "From the request body reaching LLMux to the end of the answer",
                "s",
                _quantiles("llm_request_latency_seconds", "model", M),
            ),
            Panel(
                "Time to first token",
                "Streams: until the first output reached the client "
                "(gen_ai.server.time_to_first_token)",
                "s",
                _quantiles("gen_ai_server_time_to_first_token_seconds", "gen_ai_request_model", GM),
            ),
            Panel(
                "Time per output token",
                "Streams: time after the first output per further output token "
                "(gen_ai.server.time_per_output_token)",
                "s",
                _quantiles(
                    "gen_ai_server_time_per_output_token_seconds", "gen_ai_request_model", GM
                ),
            ),
            Panel(
                "Request duration p95 by provider (GenAI conventions)",
                "gen_ai.server.request.duration; error_type set on failures",
                "s",
                (
                    Query(
                        "histogram_quantile(0.95, sum by (le, gen_ai_provider_name, error_type) "
                        f"(rate(gen_ai_server_request_duration_seconds_bucket{{{GM}}}{RATE})))",
                        "{{gen_ai_provider_name}} {{error_type}}",
                    ),
                ),
            ),
        ),
    ),
    Row(
        "Tokens and spend",
        (
            Panel(
                "Tokens in / out by team and model",
                "Tokens per second from the providers' counts (tiktoken where they gave none)",
                "short",
                (
                    Query(
                        "sum by (team, model, type) "
                        f'(rate(llm_token_usage_total{{{M},type=~"input|output"}}{RATE}))',
                        "{{team}} {{model}} {{type}}",
                    ),
                ),
            ),
            Panel(
                "Spend by team and model",
                "USD per hour, from the model price table",
                "currencyUSD",
                (
                    Query(
                        f"sum by (team, model) (rate(llm_spend_total{{{M}}}{RATE})) * 3600",
                        "{{team}} {{model}}",
                    ),
                ),
            ),
            Panel(
                "Spend by key alias",
                "USD per hour per virtual key (its alias, else a short hash; never the key)",
                "currencyUSD",
                (
                    Query(
                        f"sum by (key) (rate(llm_spend_total{{{M}}}{RATE})) * 3600",
                        "{{key}}",
                    ),
                ),
            ),
            Panel(
                "Tokens per request (GenAI conventions)",
                "gen_ai.client.token.usage, median per request",
                "short",
                (
                    Query(
                        "histogram_quantile(0.5, sum by (le, gen_ai_token_type) "
                        f"(rate(gen_ai_client_token_usage_bucket{{{GM}}}{RATE})))",
                        "{{gen_ai_token_type}}",
                    ),
                ),
            ),
        ),
    ),
    Row(
        "Budgets",
        (
            Panel(
                "Budget used by team",
                "spend / max_budget of each team that has one, from the key database",
                "percentunit",
                (Query(TEAM_BUDGET_USED, "{{team_alias}} ({{team}})"),),
            ),
            Panel(
                "Budget used by key",
                "spend / max_budget of each virtual key that has one (by alias, else key name)",
                "percentunit",
                (Query(KEY_BUDGET_USED, "{{key}}"),),
            ),
        ),
    ),
    Row(
        "Deployments and resilience",
        (
            Panel(
                "Deployment state",
                "0 healthy, 1 partial (half-open probes), 2 down (cooling down or circuit open)",
                "short",
                (
                    Query(
                        f"max by (deployment, model) (llmux_deployment_state{{{M}}})",
                        "{{deployment}}",
                    ),
                ),
            ),
            Panel(
                "Retries and fallbacks",
                "Upstream attempts per second by kind: first, retry, fallback",
                "reqps",
                (
                    Query(
                        f"sum by (kind) (rate(llmux_upstream_attempts_total{RATE}))",
                        "{{kind}}",
                    ),
                ),
            ),
            Panel(
                "Cooldowns",
                "Cooldowns started per deployment in the interval",
                "short",
                (
                    Query(
                        f"sum by (deployment) (increase(llmux_deployment_cooldowns_total{RATE}))",
                        "{{deployment}}",
                    ),
                ),
            ),
            Panel(
                "Envoy upstream requests by cluster and status class",
                "Per group cluster (llm_g<N>) and llmux_local",
                "reqps",
                (
                    Query(
                        "sum by (envoy_cluster_name, envoy_response_code_class) "
                        f"(rate(envoy_cluster_upstream_rq_xx{RATE}))",
                        "{{envoy_cluster_name}} {{envoy_response_code_class}}xx",
                    ),
                ),
            ),
        ),
    ),
    Row(
        "ext_proc and Envoy health",
        (
            Panel(
                "Open ext_proc streams",
                "HTTP requests in the processor workers",
                "short",
                (Query("sum(llmux_open_streams)", "streams"),),
            ),
            Panel(
                "Process restarts",
                "Workers and Envoy restarted by the supervisor in the interval",
                "short",
                (
                    Query(
                        f"sum by (process) (increase(llmux_process_restarts_total{RATE}))",
                        "{{process}}",
                    ),
                ),
            ),
            Panel(
                "Healthy ext_proc workers",
                "Workers passing Envoy's gRPC health checks",
                "short",
                (
                    Query(
                        'sum(envoy_cluster_membership_healthy{envoy_cluster_name="llmux_extproc"})',
                        "healthy",
                    ),
                ),
                kind="stat",
            ),
            Panel(
                "Active downstream requests (Envoy)",
                "Requests in flight on the listener",
                "short",
                (
                    Query(
                        'sum(envoy_http_downstream_rq_active{envoy_http_conn_manager_prefix="llmux"})',
                        "active",
                    ),
                ),
            ),
        ),
    ),
)


@dataclass(frozen=True)
class Alert:
    name: str
    query: str  # the quantity: the test checks it returns series
    condition: str  # appended to the query, e.g. "> 0.05"
    for_: str
    severity: str
    summary: str

    @property
    def expr(self) -> str:
        return f"({self.query}) {self.condition}"


ALERTS: tuple[Alert, ...] = (
    Alert(
        "LLMuxHighErrorRate",
        'sum by (model) (rate(llm_requests_total{status_code=~"5.."}[5m]))'
        " / sum by (model) (rate(llm_requests_total[5m]))",
        "> 0.05",
        "5m",
        "critical",
        "More than 5% of {{ $labels.model }} requests fail with a 5xx",
    ),
    Alert(
        "LLMuxUpstreamErrors",
        "sum by (error_type) (rate(llm_upstream_error_total[5m]))",
        "> 1",
        "10m",
        "warning",
        "Providers return more than one {{ $labels.error_type }} a second",
    ),
    Alert(
        "LLMuxHighLatency",
        "histogram_quantile(0.95, sum by (le, model) "
        "(rate(llm_request_latency_seconds_bucket[5m])))",
        "> 30",
        "10m",
        "warning",
        "p95 latency of {{ $labels.model }} is above 30 s",
    ),
    Alert(
        "LLMuxSlowFirstToken",
        "histogram_quantile(0.95, sum by (le, gen_ai_request_model) "
        "(rate(gen_ai_server_time_to_first_token_seconds_bucket[5m])))",
        "> 10",
        "10m",
        "warning",
        "p95 time to first token of {{ $labels.gen_ai_request_model }} is above 10 s",
    ),
    Alert(
        "LLMuxDeploymentDown",
        "max by (deployment, model) (llmux_deployment_state)",
        "== 2",
        "5m",
        "warning",
        "Deployment {{ $labels.deployment }} of {{ $labels.model }} has been down "
        "(cooling down or circuit open) for 5 minutes",
    ),
    Alert(
        "LLMuxModelGroupDown",
        "min by (model) (llmux_deployment_state)",
        "== 2",
        "2m",
        "critical",
        "Every deployment of {{ $labels.model }} is down",
    ),
    Alert(
        "LLMuxTeamBudgetNearLimit",
        TEAM_BUDGET_USED,
        "> 0.8",
        "0m",
        "warning",
        "Team {{ $labels.team_alias }} ({{ $labels.team }}) has spent over 80% of its budget",
    ),
    Alert(
        "LLMuxKeyBudgetNearLimit",
        KEY_BUDGET_USED,
        "> 0.8",
        "0m",
        "warning",
        "Key {{ $labels.key }} has spent over 80% of its budget",
    ),
    Alert(
        "LLMuxProcessRestarting",
        "sum by (process) (increase(llmux_process_restarts_total[15m]))",
        "> 3",
        "0m",
        "warning",
        "The supervisor restarted {{ $labels.process }} more than 3 times in 15 minutes",
    ),
)


def _panel(p: Panel, panel_id: int) -> timeseries.Panel | stat.Panel:
    builder: timeseries.Panel | stat.Panel
    if p.kind == "timeseries":
        builder = (
            timeseries.Panel()
            .legend(
                gc.VizLegendOptions()
                .show_legend(True)
                .display_mode(LegendDisplayMode.LIST)
                .placement(LegendPlacement.BOTTOM)
            )
            .tooltip(
                gc.VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)
            )
            .line_width(1)
            .fill_opacity(10)
        )
    else:
        builder = stat.Panel().reduce_options(gc.ReduceDataOptions().calcs(["lastNotNull"]))
    builder = builder.id(panel_id).title(p.title).description(p.description).unit(p.unit)
    builder = builder.datasource(DATASOURCE).height(8).span(6)
    for i, q in enumerate(p.queries):
        target = prometheus.Dataquery().expr(q.expr).legend_format(q.legend)
        builder = builder.with_target(target.ref_id(chr(ord("A") + i)).datasource(DATASOURCE))
    return builder


def dashboard() -> gd.Dashboard:
    board = (
        gd.Dashboard("LLMux")
        .uid("llmux")
        .description("LLMux gateway: traffic, latency, tokens, spend, deployments, health")
        .tags(["llmux", "llm"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(gd.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            gd.QueryVariable("model")
            .label("Model")
            .datasource(DATASOURCE)
            .query("label_values(llm_requests_total, model)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )
    panel_id = 0
    for row in ROWS:
        panel_id += 1
        board = board.with_row(gd.Row(row.title).id(panel_id))
        for p in row.panels:
            panel_id += 1
            board = board.with_panel(_panel(p, panel_id))
    return board


def dashboard_json() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(dashboard().build()) + "\n"


def rules_yaml() -> str:
    rules = [
        {
            "alert": a.name,
            "expr": a.expr,
            "for": a.for_,
            "labels": {"severity": a.severity},
            "annotations": {"summary": a.summary},
        }
        for a in ALERTS
    ]
    doc = {"groups": [{"name": "llmux", "rules": rules}]}
    header = "# Generated by `make dashboard` (deploy/dashboard.py); do not edit.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=100)


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard."""
    return [(p.title, q.expr) for row in ROWS for p in row.panels for q in p.queries]


def main() -> int:
    DASHBOARD_PATH.parent.mkdir(parents=True, exist_ok=True)
    RULES_PATH.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD_PATH.write_text(dashboard_json())
    RULES_PATH.write_text(rules_yaml())
    print(f"wrote {DASHBOARD_PATH} and {RULES_PATH}")
    json.loads(DASHBOARD_PATH.read_text())  # what Grafana will parse
    return 0


if __name__ == "__main__":
    sys.exit(main())
