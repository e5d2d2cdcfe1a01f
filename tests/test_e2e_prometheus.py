"""The dashboard proven real: Debian's Prometheus scrapes a running LLMux (its /metrics and
Envoy's /stats/prometheus) under a short mixed load (whole answers, streams, retries,
fallbacks, provider errors, two model groups and a translated provider), then every panel's
and every alert's PromQL is evaluated against it: each parses and returns series. A panel
that can never show data fails here.

Also: hostile model names, paths and keys do not add a single series."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import openai
import orjson
import psycopg
import pytest
import yaml
from aiohttp import web

from deploy import dashboard
from tests import mock_anthropic as ma
from tests.harness import (
    Gateway,
    MockUpstream,
    free_port,
    json_response,
    metric,
    openai_chat_completion,
    running_gateway,
    worker_pid,
)
from tests.pg import fresh_database

pytestmark = pytest.mark.e2e

MASTER = "sk-master-prometheus"
UPSTREAM_KEY = "sk-upstream"
MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]
# What Grafana puts in place of the dashboard's variables.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*", "${datasource}": ""}


async def failing(request: web.Request, body: bytes) -> web.StreamResponse:
    return json_response({"error": {"message": "overloaded", "type": "server_error"}}, 503)


async def stalling(request: web.Request, body: bytes) -> web.StreamResponse:
    await asyncio.sleep(30)
    return json_response({"error": {"message": "too late", "type": "server_error"}}, 500)


async def answering(request: web.Request, body: bytes) -> web.StreamResponse:
    """An OpenAI-format provider: checks what it gets, streams with its usage chunk when
    asked for one, as OpenAI does."""
    if request.headers.get("authorization") != f"Bearer {UPSTREAM_KEY}":
        return json_response({"error": {"message": "bad key", "type": "auth"}}, 401)
    data = orjson.loads(body)
    assert data["messages"] == MESSAGES, data
    if not data.get("stream"):
        return json_response(openai_chat_completion(data["model"], "fine, thanks", 9, 4))
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for piece in ("fine", ", ", "thanks", " for", " asking"):
        chunk = {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": data["model"],
            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
        }
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    if (data.get("stream_options") or {}).get("include_usage"):
        usage = {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": data["model"],
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14},
        }
        await response.write(b"data: " + orjson.dumps(usage) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _openai(name: str, dep_id: str, up: MockUpstream) -> dict[str, Any]:
    return {
        "model_name": name,
        "litellm_params": {
            "model": f"openai_compatible/{dep_id}-model",
            "api_base": up.base_url + "/v1",
            "api_key": UPSTREAM_KEY,
            "input_cost_per_token": 0.000002,
            "output_cost_per_token": 0.00001,
        },
        "model_info": {"id": dep_id},
    }


@dataclass
class Prometheus:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        reply = httpx.get(f"http://127.0.0.1:{self.port}/api/v1/{path}", params=params, timeout=30)
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])


@contextlib.contextmanager
def running_prometheus(tmp: Path, gw: Gateway) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, (
        "Debian's prometheus is not installed: run `make system` (scripts/setup-system.sh "
        "installs it; `make test` does so first)"
    )
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(dashboard.RULES_PATH)],
        "scrape_configs": [
            {
                "job_name": "llmux",
                "static_configs": [{"targets": [f"127.0.0.1:{gw.metrics_port}"]}],
            },
            {
                "job_name": "envoy",
                "metrics_path": "/stats/prometheus",
                "static_configs": [{"targets": [f"127.0.0.1:{gw.admin_port}"]}],
            },
        ],
    }
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(port, process, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "Prometheus not ready in 60 s"
            time.sleep(0.1)
        yield prom
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _targets_up(prom: Prometheus) -> bool:
    targets = prom.api("targets")["activeTargets"]
    return len(targets) == 2 and all(t["health"] == "up" for t in targets)


def _wait(what: str, ready: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.2)


def _team_with_budget(gw: Gateway, database: str) -> str:
    """A team and a key with budgets, most of each spent (as LiteLLM's spend columns would
    say); the key is used by part of the load. Returns the key."""
    headers = {"authorization": f"Bearer {MASTER}"}
    with httpx.Client(base_url=gw.base_url, headers=headers, timeout=30) as http:
        team = http.post(
            "/team/new", json={"team_id": "ops", "team_alias": "Ops", "max_budget": 10}
        )
        assert team.status_code == 200, team.text
        made = http.post(
            "/key/generate", json={"team_id": "ops", "key_alias": "ops-ci", "max_budget": 2}
        )
        assert made.status_code == 200, made.text
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute('UPDATE "LiteLLM_TeamTable" SET "spend" = 9 WHERE "team_id" = %s', ("ops",))
        conn.execute(
            'UPDATE "LiteLLM_VerificationToken" SET "spend" = 0.5 WHERE "key_alias" = %s',
            ("ops-ci",),
        )
    return str(made.json()["key"])


def _load(gw: Gateway, team_key: str) -> None:
    """A mix: whole answers and streams on two groups, one with a failing deployment
    (retries, then cooldowns), one falling back to another, a translated provider's
    stream, provider errors that reach the client, and client errors."""
    client = openai.OpenAI(base_url=gw.openai_base, api_key=MASTER, max_retries=0)
    team = openai.OpenAI(base_url=gw.openai_base, api_key=team_key, max_retries=0)
    for _ in range(6):
        client.chat.completions.create(model="chat-a", messages=MESSAGES)
        client.chat.completions.create(model="chat-b", messages=MESSAGES)
        for model in ("chat-a", "chat-b"):
            stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        stream = client.chat.completions.create(model="claude", messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model="broken", messages=MESSAGES)
        assert failed.value.status_code == 503
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=MESSAGES)
        # Translated, so accounted by the processor with its caller: the key's team.
        team.chat.completions.create(model="claude", messages=MESSAGES)


@dataclass
class Env:
    gateway: Gateway
    prometheus: Prometheus


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    ups = {
        "good": MockUpstream(answering).start(),
        "good2": MockUpstream(answering).start(),
        "bad": MockUpstream(failing).start(),
        "stalling": MockUpstream(stalling).start(),
        "anthropic": MockUpstream(ma.AnthropicMock()).start(),
    }
    config = {
        "model_list": [
            _openai("chat-a", "a-good", ups["good"]),
            _openai("chat-a", "a-bad", ups["bad"]),
            _openai("chat-b", "b-down", ups["bad"]),
            _openai("broken", "broken-1", ups["bad"]),
            _openai("spare", "spare-1", ups["good2"]),
            _openai("slow", "slow-1", ups["stalling"]),
            {
                "model_name": "claude",
                "litellm_params": {
                    "model": "anthropic/claude-sonnet-4-5",
                    "api_base": ups["anthropic"].base_url,
                    "api_key": ma.API_KEY,
                },
                "model_info": {"id": "claude-1"},
            },
        ],
        "router_settings": {
            "num_retries": 2,
            "cooldown_time": 1,
            "fallbacks": [{"chat-b": ["spare"]}],
        },
        "litellm_settings": {"callbacks": ["prometheus"]},
        "general_settings": {"master_key": MASTER},
        "llmux": {
            "workers": 2,
            "circuit_breaker": {"min_requests": 8, "window": 60, "open_time": 1},
        },
    }
    tmp = tmp_path_factory.mktemp("prometheus")
    try:
        with (
            fresh_database() as database,
            running_gateway(
                {
                    **config,
                    "general_settings": {
                        "master_key": MASTER,
                        "database_url": database,
                        "user_api_key_cache_ttl": 1,  # budgets re-read each second
                    },
                },
                tmp,
            ) as gw,
            running_prometheus(tmp, gw) as prom,
        ):
            key = _team_with_budget(gw, database)
            _wait("both scrape targets up", lambda: _targets_up(prom))
            _load(gw, key)
            # A worker killed between two rounds: the restart shows on the dashboard.
            pid = worker_pid(gw, 0)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            _wait("worker 0 restarted", lambda: worker_pid(gw, 0) not in (None, pid), 30)
            _wait("LLMux ready again", lambda: _ready(gw), 30)
            time.sleep(2)  # two scrapes between the rounds, so rates see an increase
            _load(gw, key)
            time.sleep(3)  # the access-log batches, then a scrape or two
            yield Env(gw, prom)
    finally:
        for up in ups.values():
            up.stop()


def _ready(gw: Gateway) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{gw.base_url}/health/readiness", timeout=1).status_code == 200
    return False


def _grafana(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a dashboard variable the test does not know: {expr}"
    return expr


def _finite(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in result if math.isfinite(float(r["value"][1]))]


def _data(prom: Prometheus, expr: str) -> list[dict[str, Any]]:
    """The query's finite samples, asked again for a few seconds if there are none: one
    scrape that times out on a loaded machine marks the target's series stale until the
    next one (seen once: two llmux panels empty, the next llmux panel fine)."""
    deadline = time.monotonic() + 10
    while True:
        found = _finite(prom.query(expr))
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_every_panel_query_returns_series(env: Env) -> None:
    empty = []
    for title, expr in dashboard.panel_queries():
        result = _data(env.prometheus, _grafana(expr))
        if not result:
            empty.append(f"{title}: {expr} -> {result}")
    up = [(r["metric"]["job"], r["value"][1]) for r in env.prometheus.query("up")]
    assert not empty, "panels without data:\n" + "\n".join(empty) + f"\nscrape targets up: {up}"


def test_the_model_variable_lists_the_model_groups(env: Env) -> None:
    values = env.prometheus.api("label/model/values", **{"match[]": "llm_requests_total"})
    assert {"chat-a", "spare", "broken", "claude"} <= set(values)


def test_every_alert_parses_and_its_quantity_returns_series(env: Env) -> None:
    for alert in dashboard.ALERTS:
        assert _data(env.prometheus, alert.query), alert.name
        env.prometheus.query(alert.expr)  # the rule itself parses (firing or not)
    _wait(
        "Prometheus evaluated every rule",
        lambda: all(
            rule.get("health") == "ok"
            for group in env.prometheus.api("rules")["groups"]
            for rule in group["rules"]
        ),
        30,
    )
    loaded = [r["name"] for g in env.prometheus.api("rules")["groups"] for r in g["rules"]]
    assert sorted(loaded) == sorted(a.name for a in dashboard.ALERTS)


def test_what_the_load_did_shows_in_prometheus(env: Env) -> None:
    """Not just any series: the figures the mix must produce."""
    prom = env.prometheus

    def value(expr: str) -> float:
        result = _data(prom, expr)
        attempts = [
            (r["metric"]["deployment"], r["metric"]["kind"], r["value"][1])
            for r in prom.query("llmux_upstream_attempts_total")
        ]
        assert len(result) == 1, (expr, result, attempts)
        return float(result[0]["value"][1])

    def reaches(expr: str, expected: float) -> bool:
        """Counts of answers Envoy passed on arrive with its access log (batched) and the
        next scrape: wait for the figure rather than for a guessed moment."""
        deadline = time.monotonic() + 15
        while (found := value(expr)) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        assert found == expected, (expr, found)
        return True

    assert reaches('sum(llm_requests_total{model="broken",status_code="503"})', 12)
    assert value('sum(llmux_upstream_attempts_total{kind="fallback"})') > 0
    # broken: 12 requests, 3 attempts each (num_retries 2). Envoy's upstream log counts
    # every attempt as the first; the attempt header tag tells them apart.
    assert reaches('sum(llmux_upstream_attempts_total{deployment="broken-1",kind="first"})', 12)
    assert reaches('sum(llmux_upstream_attempts_total{deployment="broken-1",kind="retry"})', 24)
    assert value('sum(llmux_process_restarts_total{process="worker"})') >= 1
    assert value('max(llmux_deployment_state{deployment="broken-1"})') >= 1
    streamed = prom.query(
        "sum by (gen_ai_request_model, gen_ai_provider_name) "
        "(gen_ai_server_time_to_first_token_seconds_count)"
    )
    by_model = {r["metric"]["gen_ai_request_model"]: r["metric"] for r in streamed}
    # After a fallback the answer counts to the group that gave it, as llm_requests_total.
    assert {"chat-a", "spare", "claude"} <= set(by_model)
    assert by_model["claude"]["gen_ai_provider_name"] == "anthropic"
    # LiteLLM's names, asked for with litellm_settings.callbacks: [prometheus]
    assert reaches('sum(litellm_proxy_total_requests_metric_total{requested_model="chat-a"})', 24)
    assert value("sum(litellm_spend_metric_total)") > 0
    assert value('sum(litellm_deployment_failure_responses_total{model_id="a-bad"})') > 0
    assert prom.query("litellm_deployment_state")
    # The virtual key's requests count to its team, and its budgets are read back.
    assert value('sum(llm_token_usage_total{team="ops",type="input"})') > 0
    assert reaches('llmux_team_max_budget_usd{team="ops",team_alias="Ops"}', 10)
    # 0.5 set by SQL, plus what the key's requests cost since (the spend logs add it).
    assert 0.5 <= value('llmux_key_spend_usd{key="ops-ci",team="ops"}') < 0.6
    # 10 - 9 set by SQL, less what the team's requests cost since (the spend logs add it).
    assert 0.9 < value('litellm_remaining_team_budget_metric{team="ops"}') <= 1


def test_the_budget_alert_fires_for_the_team_that_spent_most_of_its_budget(env: Env) -> None:
    (team,) = [a for a in dashboard.ALERTS if a.name == "LLMuxTeamBudgetNearLimit"]
    assert [r["metric"]["team"] for r in env.prometheus.query(team.expr)] == ["ops"]
    (key,) = [a for a in dashboard.ALERTS if a.name == "LLMuxKeyBudgetNearLimit"]
    assert env.prometheus.query(key.expr) == []  # 0.5 of 2 spent: not near
    _wait(
        "Prometheus fires the team budget alert",
        lambda: (
            [
                a["labels"]["team"]
                for a in env.prometheus.api("alerts")["alerts"]
                if a["labels"]["alertname"] == team.name and a["state"] == "firing"
            ]
            == ["ops"]
        ),
        30,
    )


def _series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}


HOSTILE_MODELS = [
    "gpt-4o\n",
    "' OR 1=1 --",
    'a"b{c="d"}',
    "x" * 5000,
    "ünïcödé-модель-模型",
    "../../etc/passwd",
    "chat-a ",
    "CHAT-A",
    "${jndi:ldap://x}",
    "\u0000null",
]


def test_hostile_model_names_paths_and_keys_add_no_series(env: Env) -> None:
    gw = env.gateway
    admin = f"http://127.0.0.1:{gw.admin_port}/stats/prometheus"
    headers = {"authorization": f"Bearer {MASTER}"}

    def hostile(i: int, name: str) -> None:
        body = orjson.dumps({"model": name, "messages": MESSAGES, "user": f"user-{i}-{name}"})
        with httpx.Client(base_url=gw.base_url, timeout=30) as http:
            for response in (
                http.post("/v1/chat/completions", content=body, headers=headers),
                http.post(f"/v1/chat/completions?model={i}", content=body, headers=headers),
                http.post(
                    "/v1/chat/completions",
                    content=orjson.dumps({"model": "chat-a", "messages": MESSAGES}),
                    headers={"authorization": f"Bearer sk-random-{i}-{quote(name[:50])}"},
                ),
                http.post(f"/v1/{i}/{quote(name[:100])}", content=body, headers=headers),
                http.post("/v1/embeddings", content=body, headers=headers),
            ):
                assert 400 <= response.status_code < 500, (name, response.text)
                assert "error" in response.json()

    hostile(0, "warm-up-name")  # whatever series a refusal creates, it creates now
    time.sleep(1.5)  # the access-log batch of those answers
    before, envoy_before = _series(gw.metrics()), _series(httpx.get(admin, timeout=10).text)
    for i, name in enumerate(HOSTILE_MODELS, start=1):
        hostile(i, name)
    time.sleep(1.5)
    after, envoy_after = _series(gw.metrics()), _series(httpx.get(admin, timeout=10).text)
    assert after - before == set(), sorted(after - before)[:10]
    assert envoy_after - envoy_before == set(), sorted(envoy_after - envoy_before)[:10]


def test_a_worker_killed_mid_request_leaves_no_open_stream_behind(env: Env) -> None:
    """prometheus_client sums a dead process's last gauge values unless told it died."""
    gw = env.gateway

    def open_streams() -> float:
        return metric(gw.metrics(), "llmux_open_streams")

    answers: list[int] = []

    def slow_request() -> None:
        body = orjson.dumps({"model": "slow", "messages": MESSAGES})
        headers = {"authorization": f"Bearer {MASTER}"}
        reply = httpx.post(
            f"{gw.base_url}/v1/chat/completions", content=body, headers=headers, timeout=60
        )
        answers.append(reply.status_code)

    thread = threading.Thread(target=slow_request)
    thread.start()
    _wait("the slow request open in a worker", lambda: open_streams() >= 1, 30)
    pids = [worker_pid(gw, i) for i in (0, 1)]
    for pid in pids:  # whichever holds it
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert answers == [503]  # OpenAI-shaped, from Envoy's ext_proc status_on_error
    _wait("both workers back", lambda: all(worker_pid(gw, i) not in (None, *pids) for i in (0, 1)))
    _wait("LLMux ready again", lambda: _ready(gw), 30)
    assert open_streams() == 0
