"""Metric names and labels as the GenAI conventions and LiteLLM users expect them, and the
shipped dashboard and alert rules: what the generator makes, valid for the Grafana SDK and
promtool, and naming only metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard
from prometheus_client import REGISTRY, generate_latest

from deploy import dashboard
from llmux_extproc.accounting.usage import Usage
from llmux_extproc.control.config import parse_config
from llmux_extproc.control.controlplane import ControlPlane, outcome_from_entry
from llmux_extproc.dataplane.context import Caller
from llmux_extproc.dataplane.gateway import caller_labels
from llmux_extproc.observability import metrics
from llmux_extproc.policy.health import Outcome
from llmux_extproc.policy.keys import Principal

CONFIG = """
model_list:
  - model_name: chat-a
    litellm_params: {model: openai/gpt-4o-mini, api_base: "https://api.example.com/v1", api_key: k}
    model_info: {id: dep-a}
  - model_name: claude
    litellm_params: {model: bedrock/anthropic.claude-3-haiku, aws_region_name: us-east-1,
                     aws_access_key_id: a, aws_secret_access_key: b}
    model_info: {id: dep-b}
"""


def exposed() -> str:
    return str(generate_latest(REGISTRY).decode())


def samples(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def labels_of(line: str) -> dict[str, str]:
    inner = line[line.index("{") + 1 : line.rindex("}")]
    return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', inner))


def test_litellm_metrics_follow_litellms_own_setting() -> None:
    assert not parse_config(CONFIG, "t").litellm_metrics
    for key in ("callbacks", "success_callback", "failure_callback"):
        text = CONFIG + f"litellm_settings:\n  {key}: [langfuse, prometheus]\n"
        assert parse_config(text, "t").litellm_metrics, key
    text = CONFIG + "litellm_settings:\n  callbacks: [langfuse]\n"
    assert not parse_config(text, "t").litellm_metrics


def test_genai_conventions_as_prometheus_exposes_them() -> None:
    dep = parse_config(CONFIG, "t").deployments[1]
    caller = ("team-1", "Team One", "ci-key")
    metrics.answered(dep, "chat", caller, 200, 0.3, Usage(21, 5), 0.01, litellm=False)
    metrics.answered(dep, "chat", caller, 503, 0.2, None, None, litellm=False)
    metrics.streamed(dep, "chat", caller, 0.05, 0.02, litellm=False)
    text = exposed()
    tokens = {
        labels_of(s)["gen_ai_token_type"]
        for s in samples(text, "gen_ai_client_token_usage_count")
        if labels_of(s)["gen_ai_request_model"] == "claude"
    }
    assert tokens == {"input", "output"}
    (line,) = [
        s
        for s in samples(text, "gen_ai_client_token_usage_sum")
        if 'gen_ai_token_type="input"' in s and 'gen_ai_request_model="claude"' in s
    ]
    assert labels_of(line) == {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "aws.bedrock",  # the conventions' name, not LLMux's
        "gen_ai_request_model": "claude",
        "gen_ai_token_type": "input",
    }
    assert float(line.rsplit(" ", 1)[1]) >= 21
    errors = {
        labels_of(s)["error_type"]
        for s in samples(text, "gen_ai_server_request_duration_seconds_count")
        if 'gen_ai_request_model="claude"' in s
    }
    assert errors == {"", "service_unavailable_error"}  # the OpenAI error type of a 503
    assert samples(text, "gen_ai_server_time_to_first_token_seconds_bucket")
    assert samples(text, "gen_ai_server_time_per_output_token_seconds_bucket")


def test_litellm_names_and_labels_only_when_asked_for() -> None:
    dep = parse_config(CONFIG, "t").deployments[0]
    caller = ("team-2", "", "key-two")
    metrics.answered(dep, "chat", caller, 200, 0.3, Usage(10, 4), 0.5, litellm=False)
    assert not [s for s in samples(exposed(), "litellm_spend_metric_total") if "key-two" in s]
    metrics.answered(dep, "chat", caller, 200, 0.3, Usage(10, 4), 0.5, litellm=True)
    metrics.answered(dep, "chat", caller, 429, 0.1, None, None, litellm=True)
    metrics.streamed(dep, "chat", caller, 0.05, 0.02, litellm=True)
    text = exposed()
    (spend,) = [s for s in samples(text, "litellm_spend_metric_total") if "key-two" in s]
    assert labels_of(spend) == {
        "model": "gpt-4o-mini",
        "requested_model": "chat-a",
        "team": "team-2",
        "team_alias": "",
        "api_key_alias": "key-two",
    }
    assert float(spend.rsplit(" ", 1)[1]) == pytest.approx(0.5)
    (total,) = [s for s in samples(text, "litellm_total_tokens_metric_total") if "key-two" in s]
    assert float(total.rsplit(" ", 1)[1]) == 14
    statuses = {
        labels_of(s)["status_code"]
        for s in samples(text, "litellm_proxy_total_requests_metric_total")
        if "key-two" in s
    }
    assert statuses == {"200", "429"}
    (failed,) = [
        s for s in samples(text, "litellm_proxy_failed_requests_metric_total") if "key-two" in s
    ]
    assert labels_of(failed)["exception_class"] == "RateLimitError"
    assert labels_of(failed)["exception_status"] == "429"
    (per_token,) = [
        s
        for s in samples(text, "litellm_deployment_latency_per_output_token_count")
        if "key-two" in s
    ]
    assert labels_of(per_token)["api_base"] == "https://api.example.com"  # no path, no key
    assert labels_of(per_token)["litellm_model_name"] == "openai/gpt-4o-mini"
    for name in (
        "litellm_request_total_latency_metric_bucket",
        "litellm_llm_api_latency_metric_bucket",
        "litellm_llm_api_time_to_first_token_metric_bucket",
        "litellm_input_tokens_metric_total",
        "litellm_output_tokens_metric_total",
    ):
        assert [s for s in samples(text, name) if "key-two" in s], name


def test_caller_labels_name_the_key_by_alias_never_by_the_key() -> None:
    principal = Principal(token="ab" * 32, key_alias="ci", team_id="t1", team_alias="Team 1")
    assert caller_labels(Caller.of(principal)) == ("t1", "Team 1", "ci")
    nameless = Principal(token="cd" * 32, key_name="sk-...wxyz")
    assert caller_labels(Caller.of(nameless)) == ("default", "", "sk-...wxyz")
    assert caller_labels(Caller()) == ("default", "", "")


# -- the shipped dashboard and rules -----------------------------------------------------


def test_committed_dashboard_and_rules_are_what_the_generator_makes() -> None:
    assert dashboard.DASHBOARD_PATH.read_text() == dashboard.dashboard_json(), (
        "deploy/grafana/llmux.json is stale: run `make dashboard`"
    )
    assert dashboard.RULES_PATH.read_text() == dashboard.rules_yaml(), (
        "deploy/prometheus/llmux-rules.yml is stale: run `make dashboard`"
    )


def test_dashboard_loads_with_the_grafana_sdks_own_models() -> None:
    raw: dict[str, Any] = json.loads(dashboard.DASHBOARD_PATH.read_text())
    plugins.register_default_plugins()
    board = Dashboard.from_json(raw)
    # Decoding and encoding again gives the same document: nothing in it falls outside
    # the SDK's schema (an unknown key or a wrongly typed field would be lost or changed).
    assert json.loads(JSONEncoder(sort_keys=True).encode(board)) == raw
    panels = [p for p in raw["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in raw["panels"]}) == len(raw["panels"])
    assert all(p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in panels)
    assert len(panels) == len({title for title, _ in dashboard.panel_queries()})


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run `make system` (installs Debian's prometheus package)"
    done = subprocess.run(
        [promtool, "check", "rules", str(dashboard.RULES_PATH)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(dashboard.ALERTS)} rules found" in done.stdout


PROMQL_WORDS = {
    "sum",
    "by",
    "rate",
    "increase",
    "histogram_quantile",
    "max",
    "min",
    "le",
}


def _metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "{}", without_strings)
    without_by = re.sub(r"by \([^)]*\)", "", without_labels)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*[\[{])", without_by))
    return names - PROMQL_WORDS


def test_every_query_names_a_metric_llmux_or_envoy_exports() -> None:
    ours = set()
    for collector in list(REGISTRY._collector_to_names):
        for family in collector.describe() if hasattr(collector, "describe") else []:
            ours.add(family.name)
    exported: set[str] = set()
    for family_name in ours:
        exported |= {family_name, f"{family_name}_total", f"{family_name}_bucket"}
    exprs = [e for _, e in dashboard.panel_queries()] + [a.query for a in dashboard.ALERTS]
    for expr in exprs:
        for name in _metric_names(expr):
            assert name in exported or name.startswith("envoy_"), (name, expr)


# -- the supervisor's side ---------------------------------------------------------------


def test_an_attempt_is_a_retry_by_its_attempt_header_when_envoy_says_attempt_1() -> None:
    """Envoy 1.40's upstream log has upstream_request_attempt_count 1 for every try; the
    x-envoy-attempt-count header, logged as a tag, tells."""
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.common_properties.custom_tags["llmux_host"] = "0|a"
    entry.response.response_code.value = 503
    entry.common_properties.upstream_request_attempt_count = 1
    for header, kind in (("1", "first"), ("3", "retry"), ("", "first"), ("x", "first")):
        entry.common_properties.custom_tags["llmux_attempt"] = header
        found = outcome_from_entry(entry)
        assert found is not None and found[1] == kind, header


SECOND = """
  - model_name: chat-a
    litellm_params: {model: openai/gpt-4o-mini, api_base: "https://api2.example.com/v1", api_key: k}
    model_info: {id: cp-a2}
"""


def test_litellm_deployment_metrics_from_the_control_plane(tmp_path: Path) -> None:
    text = CONFIG.replace("dep-a", "cp-a").replace("dep-b", "cp-b") + SECOND
    text += "router_settings: {cooldown_time: 5}\n"
    plain = parse_config(text.replace("cp-", "cq-"), "t")
    ControlPlane(plain, 1, lambda clusters: None).record(Outcome("cq-a", 503, 0.1, None, False))
    config = parse_config(text + "litellm_settings: {callbacks: [prometheus]}\n", "t")
    cp = ControlPlane(config, 1, lambda clusters: None)
    cp.record(Outcome("cp-b", 200, 0.1, None, False))
    for _ in range(3):  # a 429 in a group with another deployment: cooled down at once
        cp.record(Outcome("cp-a", 429, 0.1, None, False))
    cp.write_states(tmp_path / "states.json")
    out = exposed()
    # LiteLLM's names only when asked for (LLMux's own count cq-a's attempt).
    assert not [line for line in out.splitlines() if line.startswith("litellm_") and "cq-" in line]
    assert [line for line in out.splitlines() if line.startswith("llmux_") and "cq-a" in line]
    (success,) = [
        s for s in samples(out, "litellm_deployment_success_responses_total") if "cp-b" in s
    ]
    assert labels_of(success) == {
        "litellm_model_name": "bedrock/anthropic.claude-3-haiku",
        "model_id": "cp-b",
        "api_base": "https://bedrock-runtime.us-east-1.amazonaws.com",
        "api_provider": "bedrock",
        "requested_model": "claude",
    }
    (failures,) = [
        s for s in samples(out, "litellm_deployment_failure_responses_total") if 'cp-a"' in s
    ]
    assert labels_of(failures)["exception_status"] == "429"
    assert float(failures.rsplit(" ", 1)[1]) == 3
    (total,) = [s for s in samples(out, "litellm_deployment_total_requests_total") if 'cp-a"' in s]
    assert float(total.rsplit(" ", 1)[1]) == 3
    (cooled,) = [s for s in samples(out, "litellm_deployment_cooled_down_total") if 'cp-a"' in s]
    assert labels_of(cooled)["exception_status"] == "429"
    assert float(cooled.rsplit(" ", 1)[1]) == 1
    states = {
        labels_of(s)["model_id"]: float(s.rsplit(" ", 1)[1])
        for s in samples(out, "litellm_deployment_state")
    }
    assert states["cp-a"] == 2 and states["cp-b"] == 0 and states["cp-a2"] == 0


# Per alert: synthetic series (promtool's expanding notation, one sample a minute), when
# to look, and the labels of the alert that must fire then. A second, healthy series in
# each makes sure the rule does not fire for everything.
ALERT_CASES: dict[str, tuple[dict[str, str], str, list[dict[str, str]]]] = {
    "LLMuxHighErrorRate": (
        {
            'llm_requests_total{model="a",provider="openai",status_code="200"}': "0+60x20",
            'llm_requests_total{model="a",provider="openai",status_code="503"}': "0+10x20",
            'llm_requests_total{model="b",provider="openai",status_code="200"}': "0+60x20",
            'llm_requests_total{model="b",provider="openai",status_code="503"}': "0+1x20",
        },
        "15m",
        [{"model": "a"}],
    ),
    "LLMuxUpstreamErrors": (
        {
            'llm_upstream_error_total{error_type="api_error"}': "0+120x30",
            'llm_upstream_error_total{error_type="rate_limit_error"}': "0+30x30",
        },
        "20m",
        [{"error_type": "api_error"}],
    ),
    "LLMuxHighLatency": (
        {
            'llm_request_latency_seconds_bucket{model="slow",provider="p",le="30"}': "0+1x30",
            'llm_request_latency_seconds_bucket{model="slow",provider="p",le="60"}': "0+100x30",
            'llm_request_latency_seconds_bucket{model="slow",provider="p",le="+Inf"}': "0+100x30",
            'llm_request_latency_seconds_bucket{model="fast",provider="p",le="30"}': "0+100x30",
            'llm_request_latency_seconds_bucket{model="fast",provider="p",le="60"}': "0+100x30",
            'llm_request_latency_seconds_bucket{model="fast",provider="p",le="+Inf"}': "0+100x30",
        },
        "20m",
        [{"model": "slow"}],
    ),
    "LLMuxSlowFirstToken": (
        {
            'gen_ai_server_time_to_first_token_seconds_bucket{gen_ai_request_model="m",le="10"}': "0+1x30",
            'gen_ai_server_time_to_first_token_seconds_bucket{gen_ai_request_model="m",le="30"}': "0+100x30",
            'gen_ai_server_time_to_first_token_seconds_bucket{gen_ai_request_model="m",le="+Inf"}': "0+100x30",
        },
        "20m",
        [{"gen_ai_request_model": "m"}],
    ),
    "LLMuxDeploymentDown": (
        {
            'llmux_deployment_state{deployment="d1",model="g"}': "2x10",
            'llmux_deployment_state{deployment="d2",model="g"}': "0x10",
        },
        "8m",
        [{"deployment": "d1", "model": "g"}],
    ),
    "LLMuxModelGroupDown": (
        {
            'llmux_deployment_state{deployment="d1",model="g"}': "2x10",
            'llmux_deployment_state{deployment="d2",model="g"}': "2x10",
            'llmux_deployment_state{deployment="d3",model="h"}': "2x10",
            'llmux_deployment_state{deployment="d4",model="h"}': "0x10",
        },
        "5m",
        [{"model": "g"}],
    ),
    "LLMuxTeamBudgetNearLimit": (
        {
            'llmux_team_spend_usd{team="t1",team_alias="One"}': "9x5",
            'llmux_team_max_budget_usd{team="t1",team_alias="One"}': "10x5",
            'llmux_team_spend_usd{team="t2",team_alias="Two"}': "1x5",
            'llmux_team_max_budget_usd{team="t2",team_alias="Two"}': "10x5",
            'llmux_team_spend_usd{team="t3",team_alias="Three"}': "1x5",
            'llmux_team_max_budget_usd{team="t3",team_alias="Three"}': "0x5",
        },
        "2m",
        [{"team": "t1", "team_alias": "One"}],
    ),
    "LLMuxKeyBudgetNearLimit": (
        {
            'llmux_key_spend_usd{key="k1",team="t"}': "1.9x5",
            'llmux_key_max_budget_usd{key="k1",team="t"}': "2x5",
            'llmux_key_spend_usd{key="k2",team="t"}': "0.1x5",
            'llmux_key_max_budget_usd{key="k2",team="t"}': "2x5",
        },
        "2m",
        [{"key": "k1"}],
    ),
    "LLMuxProcessRestarting": (
        {
            'llmux_process_restarts_total{process="worker"}': "0 1 2 3 4 5 6",
            'llmux_process_restarts_total{process="envoy"}': "0x6",
        },
        "6m",
        [{"process": "worker"}],
    ),
}


def _summary(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)


def test_each_alert_fires_on_what_it_is_about_and_not_on_the_rest(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run `make system` (installs Debian's prometheus package)"
    assert set(ALERT_CASES) == {a.name for a in dashboard.ALERTS}
    by_name = {a.name: a for a in dashboard.ALERTS}
    tests = []
    for name, (series, at, firing) in ALERT_CASES.items():
        alert = by_name[name]
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": k, "values": v} for k, v in series.items()],
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": name,
                        "exp_alerts": [
                            {
                                "exp_labels": {**labels, "severity": alert.severity},
                                "exp_annotations": {"summary": _summary(alert.summary, labels)},
                            }
                            for labels in firing
                        ],
                    }
                ],
            }
        )
    test_file = tmp_path / "rules-test.yml"
    test_file.write_text(
        json.dumps(
            {"rule_files": [str(dashboard.RULES_PATH)], "evaluation_interval": "1m", "tests": tests}
        )
    )
    done = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_supervisor_imports_no_metric_before_it_sets_the_multiprocess_dir() -> None:
    """prometheus_client fixes each metric's storage when it is created: one created in the
    supervisor before PROMETHEUS_MULTIPROC_DIR is set never reaches /metrics (seen: every
    supervisor-side series gone once a module it imports imported metrics at the top)."""
    code = (
        "import sys, llmux_extproc.control.supervisor, llmux_extproc.cli; "
        "print('llmux_extproc.observability.metrics' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
