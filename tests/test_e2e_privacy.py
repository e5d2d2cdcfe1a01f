"""Secrets and privacy end to end (issue 10, item 5): real Envoy and workers, the openai
SDK as client, an OpenAI-format mock upstream that records what a provider would see.

- client `x-llmux-*` headers change nothing and reach no provider;
- `/metrics` on the listener needs the master key (`llmux.listener_metrics`);
- the access log never holds a query string;
- only allow-listed client headers reach a provider, on every attempt;
- provider error messages reach the log only with `turn_off_message_logging: false`, and
  redacted.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from tests.harness import (
    Gateway,
    MockUpstream,
    json_response,
    openai_chat_completion,
    running_gateway,
)

pytestmark = pytest.mark.e2e

MASTER_KEY = "sk-master-privacy-1234567890"
UPSTREAM_KEYS = {"d1": "sk-upstream-one-abcdefghijklmnop", "d2": "sk-upstream-two-abcdefghijklmnop"}
# In prompts and URLs: none of these may reach the gateway's log.
QUERY_SECRET = "sk-query-secret-zyxwvutsrqponmlk"
EMAIL = "jane.roe@example.org"
PROMPT_KEY = "sk-proj-prompt-key-0123456789abcdef"
# What a provider may get of a request besides what its adapter sets.
PROVIDER_MAY_SEE = {
    "host",
    "content-type",
    "content-length",
    "authorization",
    "x-request-id",
    "x-envoy-attempt-count",
}
WORKER_RELOADED = re.compile(r'"logger":"llmux\.worker","pid":\d+,"message":"config reloaded')

_failed_once: set[str] = set()


async def provider(request: web.Request, body: bytes) -> web.StreamResponse:
    data = orjson.loads(body)
    text = data["messages"][-1]["content"]
    if text.startswith("fail 400"):
        # As providers do: the error message quotes the request.
        message = f"Invalid 'messages[0].content': {text!r} is not allowed"
        return json_response(
            {"error": {"message": message, "type": "invalid_request_error", "param": None}}, 400
        )
    if text.startswith("retry me") and text not in _failed_once:
        _failed_once.add(text)
        return json_response({"error": {"message": "overloaded"}}, 503)
    return json_response(openai_chat_completion("gpt-4o", f"echo: {text}"))


def config(upstream: MockUpstream, **litellm_settings: Any) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": "gpt",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": f"{upstream.base_url}/v1",
                    "api_key": key,
                },
                "model_info": {"id": dep_id},
            }
            for dep_id, key in UPSTREAM_KEYS.items()
        ],
        "router_settings": {"num_retries": 1},
        "general_settings": {"master_key": MASTER_KEY},
        "litellm_settings": litellm_settings,
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    up = MockUpstream(provider).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gateway(upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(config(upstream), tmp_path_factory.mktemp("privacy")) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.openai_base, api_key=MASTER_KEY, max_retries=0)


def assert_openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    return dict(err)


def assert_serves(client: openai.OpenAI, text: str = "still here") -> None:
    reply = client.chat.completions.create(
        model="gpt", messages=[{"role": "user", "content": text}]
    )
    assert reply.choices[0].message.content == f"echo: {text}"


def access_log_line(gw: Gateway, request_id: str) -> dict[str, Any]:
    """The access-log entry of one request (Envoy writes it a moment after the answer)."""
    deadline = time.monotonic() + 15
    while True:
        for line in gw.log().splitlines():
            if request_id in line and line.startswith("{") and '"request_id"' in line:
                entry: dict[str, Any] = orjson.loads(line)
                return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no access-log line for {request_id}:\n{gw.log()[-3000:]}")
        time.sleep(0.05)


# -- x-llmux-* -----------------------------------------------------------------------------


def test_client_llmux_headers_change_nothing(
    gateway: Gateway, client: openai.OpenAI, upstream: MockUpstream
) -> None:
    internal = {
        "x-llmux-cluster": "llmux_metrics",
        "x-llmux-retry": "1",
        "x-llmux-marks": "cost=n1;envoy_accounts=b1",
        "x-llmux-stream": "1",
        "x-llmux-anything-new": "1",
    }
    for path in ("/health/readiness", "/health/ready", "/health/liveliness", "/health/live"):
        plain = httpx.get(gateway.base_url + path, timeout=10)
        for name, value in internal.items():
            resp = httpx.get(gateway.base_url + path, headers={name: value}, timeout=10)
            assert (
                (resp.status_code, resp.text)
                == (plain.status_code, plain.text)
                == ((200, plain.text))
            ), (path, name)
    reply = client.chat.completions.with_raw_response.create(
        model="gpt",
        messages=[{"role": "user", "content": "internal headers"}],
        extra_headers=internal,
    )
    assert reply.parse().choices[0].message.content == "echo: internal headers"
    assert not [h for h in reply.headers if h.startswith("x-llmux-") and "cost" not in h]
    assert not [h for h in upstream.last().headers if h.startswith("x-llmux-")]
    assert_serves(client)


# -- /metrics ----------------------------------------------------------------------------


def test_metrics_on_the_listener_need_the_master_key(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    assert_serves(client, "count me")
    url = gateway.base_url + "/metrics"
    missing = assert_openai_error(httpx.get(url, timeout=10), 401)
    assert missing["type"] == "authentication_error"
    wrong = httpx.get(url, headers={"authorization": "Bearer sk-not-the-master"}, timeout=10)
    assert assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
    for header in ({"authorization": f"Bearer {MASTER_KEY}"}, {"x-api-key": MASTER_KEY}):
        # The answer is accounted from Envoy's batched access log, a moment after it.
        deadline = time.monotonic() + 10
        while True:
            resp = httpx.get(url, headers=header, timeout=10)
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/plain")
            if 'llm_requests_total{model="gpt"' in resp.text:
                break
            assert time.monotonic() < deadline, resp.text
            time.sleep(0.1)
    # Other methods are refused as such, in OpenAI's shape, naming the one allowed.
    posted = httpx.post(url, headers={"x-api-key": MASTER_KEY}, timeout=10)
    assert_openai_error(posted, 405)
    assert posted.headers["allow"] == "GET"
    # The metrics address itself is unchanged (it is not the public listener).
    assert "llm_requests_total" in gateway.metrics()
    assert_serves(client)


# -- the access log ------------------------------------------------------------------------


def test_access_log_never_holds_the_query(gateway: Gateway, client: openai.OpenAI) -> None:
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions?api_key={QUERY_SECRET}&key={QUERY_SECRET}",
        headers={"authorization": f"Bearer {MASTER_KEY}"},
        json={"model": "gpt", "messages": [{"role": "user", "content": "query"}]},
        timeout=30,
    )
    assert resp.status_code == 200
    entry = access_log_line(gateway, resp.headers["x-request-id"])
    assert entry["path"] == "/v1/chat/completions"
    refused = httpx.get(
        f"{gateway.base_url}/key/info?key={QUERY_SECRET}",
        headers={"authorization": f"Bearer {MASTER_KEY}"},
        timeout=10,
    )
    assert_openai_error(refused, 400)  # no database configured
    assert access_log_line(gateway, refused.headers["x-request-id"])["path"] == "/key/info"
    # LiteLLM's /key/{key}/regenerate carries the key in the path: neither the answer
    # (here: no database configured) nor the access log repeats it.
    regenerate = httpx.post(
        f"{gateway.base_url}/key/{QUERY_SECRET}/regenerate",
        headers={"authorization": f"Bearer {MASTER_KEY}"},
        timeout=10,
    )
    assert QUERY_SECRET not in assert_openai_error(regenerate, 400)["message"]
    assert QUERY_SECRET not in str(access_log_line(gateway, regenerate.headers["x-request-id"]))
    # Paths LLMux does not serve are not logged at all: a segment may be a key.
    unknown = httpx.post(
        f"{gateway.base_url}/nowhere/{QUERY_SECRET}",
        headers={"authorization": f"Bearer {MASTER_KEY}"},
        timeout=10,
    )
    assert_openai_error(unknown, 404)
    entry = access_log_line(gateway, unknown.headers["x-request-id"])
    assert entry["path"] == "(a path LLMux does not serve; not logged)"
    assert entry["status"] == 404 and entry["method"] == "POST"
    assert QUERY_SECRET not in gateway.log()
    assert MASTER_KEY not in gateway.log()
    assert_serves(client)


# -- what a provider sees ----------------------------------------------------------------


def test_provider_gets_only_allow_listed_headers_on_every_attempt(
    gateway: Gateway, upstream: MockUpstream
) -> None:
    client = openai.OpenAI(
        base_url=gateway.openai_base,
        api_key=MASTER_KEY,
        max_retries=0,
        default_headers={
            "cookie": "session=s3cr3t",
            "proxy-authorization": "Basic dXNlcjpwYXNz",
            "x-forwarded-for": "203.0.113.9",
            "x-custom-trace": "abc",
            "openai-organization": "org-client",
            "accept-encoding": "gzip",
        },
    )
    before = len(upstream.requests)
    reply = client.chat.completions.with_raw_response.create(
        model="gpt", messages=[{"role": "user", "content": "retry me, headers"}]
    )
    assert reply.parse().choices[0].message.content == "echo: retry me, headers"
    assert reply.headers["x-litellm-attempted-retries"] == "1"
    attempts = upstream.requests[before:]
    assert [a.json()["messages"][0]["content"] for a in attempts] == ["retry me, headers"] * 2
    keys = set()
    for attempt in attempts:
        assert set(attempt.headers) <= PROVIDER_MAY_SEE, attempt.headers
        assert attempt.headers["content-type"] == "application/json"
        keys.add(attempt.headers["authorization"])
    # Each attempt carries its own deployment's key, never the client's.
    assert keys == {f"Bearer {k}" for k in UPSTREAM_KEYS.values()}
    assert_serves(client)


# -- provider error messages in the log ----------------------------------------------------


def test_provider_messages_logged_only_when_allowed_and_redacted(
    gateway: Gateway, client: openai.OpenAI, upstream: MockUpstream
) -> None:
    prompt = f"fail 400: mail {EMAIL}, key {PROMPT_KEY}"

    def fail() -> None:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": prompt}]
            )
        err = caught.value.body
        assert isinstance(err, dict) and err["type"] == "invalid_request_error"
        assert "is not allowed" in err["message"]  # the client gets the provider's message

    fail()
    assert_serves(client)
    assert "answered 400" not in gateway.log()  # turn_off_message_logging's default
    reloads = len(WORKER_RELOADED.findall(gateway.log()))
    gateway.write_config(config(upstream, turn_off_message_logging=False))
    deadline = time.monotonic() + 20
    while len(WORKER_RELOADED.findall(gateway.log())) <= reloads:
        assert time.monotonic() < deadline, gateway.log()[-3000:]
        time.sleep(0.1)
    fail()
    gateway.wait_for_log("answered 400")
    (line,) = [line for line in gateway.log().splitlines() if "answered 400" in line]
    assert "[REDACTED]" in line and "is not allowed" in line
    log = gateway.log()
    assert EMAIL not in log and PROMPT_KEY not in log
    assert not any(key in log for key in UPSTREAM_KEYS.values())
    assert_serves(client)


def test_metrics_off_the_listener_after_a_reload(
    gateway: Gateway, client: openai.OpenAI, upstream: MockUpstream
) -> None:
    cfg = config(upstream)
    cfg["llmux"] = {"listener_metrics": "off"}
    gateway.write_config(cfg)
    url = gateway.base_url + "/metrics"
    deadline = time.monotonic() + 20
    while (
        resp := httpx.get(url, headers={"x-api-key": MASTER_KEY}, timeout=10)
    ).status_code == 200:
        assert time.monotonic() < deadline, "still served on the listener"
        time.sleep(0.1)
    assert_openai_error(resp, 404)
    assert "llm_requests_total" in gateway.metrics()
    assert_serves(client)


def test_litellm_require_auth_false_opens_metrics(upstream: MockUpstream, tmp_path: Path) -> None:
    with running_gateway(config(upstream, require_auth_for_metrics_endpoint=False), tmp_path) as gw:
        resp = httpx.get(gw.base_url + "/metrics", timeout=10)
        assert resp.status_code == 200 and "llmux_open_streams" in resp.text


def test_translated_providers_get_only_allow_listed_headers(tmp_path: Path) -> None:
    """The same allow-list for translated providers, whole and streamed: Anthropic, and
    Bedrock, whose SigV4 signature must still verify (its mock re-computes it)."""
    from tests import mock_bedrock as mb
    from tests.mock_anthropic import AnthropicMock

    anthropic_key = "sk-ant-upstream-abcdefghijklmnop"
    anthropic = MockUpstream(AnthropicMock(api_key=anthropic_key)).start()
    bedrock_mock = mb.BedrockMock()
    bedrock = MockUpstream(bedrock_mock).start()
    try:
        cfg: dict[str, Any] = {
            "model_list": [
                {
                    "model_name": "claude",
                    "litellm_params": {
                        "model": "anthropic/claude-3-5-sonnet-20241022",
                        "api_base": anthropic.base_url,
                        "api_key": anthropic_key,
                    },
                },
                {
                    "model_name": "bedrock",
                    "litellm_params": {
                        "model": "bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0",
                        "api_base": bedrock.base_url,
                        "aws_access_key_id": mb.ACCESS_KEY,
                        "aws_secret_access_key": mb.SECRET_KEY,
                        "aws_region_name": mb.REGION,
                    },
                },
            ],
            "general_settings": {"master_key": MASTER_KEY},
        }
        with running_gateway(cfg, tmp_path) as gw:
            client = openai.OpenAI(
                base_url=gw.openai_base,
                api_key=MASTER_KEY,
                max_retries=0,
                default_headers={
                    "cookie": "session=s3cr3t",
                    "proxy-authorization": "Basic dXNlcjpwYXNz",
                    "x-custom-trace": "abc",
                },
            )
            messages: Any = [{"role": "user", "content": "Say hello"}]
            for model in ("claude", "bedrock"):
                reply = client.chat.completions.create(model=model, messages=messages)
                assert reply.choices[0].message.content, model
                chunks = list(
                    client.chat.completions.create(model=model, messages=messages, stream=True)
                )
                assert chunks, model
            assert len(anthropic.requests) == 2 and len(bedrock.requests) == 2
            for seen in anthropic.requests:
                assert seen.headers["x-api-key"] == anthropic_key
                extra = set(seen.headers) - PROVIDER_MAY_SEE
                assert extra <= {"x-api-key", "anthropic-version", "anthropic-beta"}, seen.headers
            assert bedrock_mock.failures == []  # every signature verified
            for seen in bedrock.requests:
                extra = set(seen.headers) - PROVIDER_MAY_SEE
                assert extra <= {"accept", "x-amz-date", "x-amz-content-sha256"}, seen.headers
            assert_serves_model(client, "claude")
    finally:
        anthropic.stop()
        bedrock.stop()


def assert_serves_model(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "again"}]
    )
    assert reply.choices[0].message.content


def test_a_virtual_key_may_not_read_metrics(tmp_path: Path) -> None:
    """With virtual keys (PostgreSQL), /metrics stays the master key's: a valid virtual
    key that may call every model gets 403, and still gets its completions."""
    from tests.pg import fresh_database

    with fresh_database() as db:
        cfg = {
            "model_list": [{"model_name": "m", "litellm_params": {"model": "mock/gpt-4o-mini"}}],
            "general_settings": {"master_key": MASTER_KEY, "database_url": db},
        }
        with running_gateway(cfg, tmp_path) as gw:
            master = {"authorization": f"Bearer {MASTER_KEY}"}
            made = httpx.post(gw.base_url + "/key/generate", headers=master, json={}, timeout=15)
            assert made.status_code == 200, made.text
            key = made.json()["key"]
            url = gw.base_url + "/metrics"
            refused = httpx.get(url, headers={"authorization": f"Bearer {key}"}, timeout=15)
            assert assert_openai_error(refused, 403)["type"] == "permission_error"
            assert httpx.get(url, headers=master, timeout=15).status_code == 200
            client = openai.OpenAI(base_url=gw.openai_base, api_key=key, max_retries=0)
            reply = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content


# -- settings ------------------------------------------------------------------------------


def test_privacy_settings_parse_as_documented() -> None:
    from llmux_extproc.control.config import ConfigError, parse_config

    def parse(text: str) -> Any:
        return parse_config("model_list: []\n" + text)

    assert parse("").settings.listener_metrics == "auth"
    assert parse("llmux: {listener_metrics: off}").settings.listener_metrics == "off"  # YAML false
    assert parse("llmux: {listener_metrics: open}").settings.listener_metrics == "open"
    lite = "litellm_settings: {require_auth_for_metrics_endpoint: false}\n"
    assert parse(lite).settings.listener_metrics == "open"
    assert parse(lite + "llmux: {listener_metrics: auth}").settings.listener_metrics == "auth"
    with pytest.raises(ConfigError, match=r"llmux\.listener_metrics: must be one of"):
        parse("llmux: {listener_metrics: public}")
    assert parse("").message_logging is False
    assert parse("litellm_settings: {turn_off_message_logging: true}").message_logging is False
    assert parse("litellm_settings: {turn_off_message_logging: false}").message_logging is True
    warned = parse("general_settings: {forward_client_headers_to_llm_api: true}").warnings
    assert any("forward_client_headers_to_llm_api: not supported" in w for w in warned)
