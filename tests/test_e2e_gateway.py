"""The core gateway end to end: real Envoy, real ext_proc workers, the official openai SDK,
and mock OpenAI-compatible upstreams that check what they receive."""

from __future__ import annotations

import asyncio
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
    metric,
    metric_delta,
    openai_chat_completion,
    running_gateway,
)

pytestmark = pytest.mark.e2e

MASTER_KEY = "sk-master-e2e-1234"
UPSTREAM_KEY = "sk-upstream-secret-5678"
VLLM_KEY = "vllm-key-from-env-9012"


async def openai_handler(request: web.Request, body: bytes) -> web.StreamResponse:
    data = orjson.loads(body) if body else {}
    text = next(
        (m["content"] for m in reversed(data.get("messages", [])) if m.get("role") == "user"), ""
    )
    if text == "please fail 429":
        return json_response(
            {
                "error": {
                    "message": "Rate limit reached for gpt-4o",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            },
            429,
        )
    if text == "please fail 500":
        return web.Response(status=500, text="upstream exploded")
    if text == "please send garbage":
        return web.Response(status=200, text="this is not json", content_type="application/json")
    if text == "please be slow":
        await asyncio.sleep(3)
    if request.path.endswith("/embeddings"):
        inputs = data["input"] if isinstance(data["input"], list) else [data["input"]]
        return json_response(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": [0.1, 0.2]}
                    for i in range(len(inputs))
                ],
                "model": data["model"],
                "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)},
            }
        )
    return json_response(openai_chat_completion(data["model"], f"echo: {text}", 11, 7))


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    up = MockUpstream(openai_handler).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def vllm() -> Iterator[MockUpstream]:
    up = MockUpstream(openai_handler).start()
    yield up
    up.stop()


def base_config(upstream: MockUpstream, vllm: MockUpstream) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": "gpt-test",
                "litellm_params": {
                    "model": "openai/gpt-4o-2024-08-06",
                    "api_base": f"{upstream.base_url}/v1",
                    "api_key": UPSTREAM_KEY,
                },
            },
            {
                "model_name": "local-llama",
                "litellm_params": {
                    "model": "hosted_vllm/meta-llama/Llama-3.1-8B-Instruct",
                    "api_base": f"{vllm.base_url}/custom/v1",
                    "api_key": "os.environ/E2E_VLLM_KEY",
                    "timeout": 1,
                },
            },
            {
                "model_name": "text-embed",
                "litellm_params": {
                    "model": "openai/text-embedding-3-small",
                    "api_base": f"{upstream.base_url}/v1",
                    "api_key": UPSTREAM_KEY,
                },
            },
            {
                "model_name": "dead",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": "http://127.0.0.1:9/v1",
                    "api_key": "x",
                },
            },
            {"model_name": "mock", "litellm_params": {"model": "mock/gpt-4o-mini"}},
        ],
        "general_settings": {"master_key": MASTER_KEY},
        "llmux": {"max_request_body_bytes": 256 * 1024, "workers": 2},
    }


@pytest.fixture(scope="module")
def gateway(
    upstream: MockUpstream, vllm: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("gw")
    with running_gateway(base_config(upstream, vllm), tmp, env={"E2E_VLLM_KEY": VLLM_KEY}) as gw:
        yield gw


@pytest.fixture
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.openai_base, api_key=MASTER_KEY, max_retries=0)


def assert_openai_error(
    resp: httpx.Response, status: int, err_type: str | None = None
) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in resp.text
    if err_type:
        assert err["type"] == err_type, err
    return dict(err)


# -- the happy path ------------------------------------------------------------------------


def test_chat_completion_reaches_openai_with_provider_key(
    client: openai.OpenAI, upstream: MockUpstream
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi there"}], temperature=0.5
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hi there"
    assert completion.usage is not None and completion.usage.total_tokens == 18
    seen = upstream.last()
    assert seen.method == "POST"
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen.headers["host"] == f"127.0.0.1:{upstream.port}"
    assert MASTER_KEY not in str(seen.headers)
    assert "x-llmux-cluster" not in seen.headers
    body = seen.json()
    # The alias is replaced by the provider's model name; everything else is the client's.
    assert body["model"] == "gpt-4o-2024-08-06"
    assert body["messages"] == [{"role": "user", "content": "hi there"}]
    assert body["temperature"] == 0.5
    assert raw.headers["x-litellm-model-id"]
    # gpt-4o-2024-08-06 is in the price table: 11 input and 7 output tokens are priced.
    assert float(raw.headers["x-llmux-response-cost"]) > 0
    assert raw.headers["x-litellm-response-cost"] == raw.headers["x-llmux-response-cost"]


def test_openai_compatible_server_with_base_path_and_env_key(
    client: openai.OpenAI, vllm: MockUpstream
) -> None:
    completion = client.chat.completions.create(
        model="local-llama", messages=[{"role": "user", "content": "hello vllm"}]
    )
    assert completion.choices[0].message.content == "echo: hello vllm"
    seen = vllm.last()
    assert seen.path == "/custom/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {VLLM_KEY}"
    assert seen.json()["model"] == "meta-llama/Llama-3.1-8B-Instruct"


def test_client_cannot_pick_a_cluster(gateway: Gateway, upstream: MockUpstream) -> None:
    # A client-supplied routing header is stripped before anything reads it.
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={"authorization": f"Bearer {MASTER_KEY}", "x-llmux-cluster": "llmux_metrics"},
        content=b"",
    )
    assert_openai_error(resp, 400)


def test_embeddings(client: openai.OpenAI, upstream: MockUpstream) -> None:
    result = client.embeddings.create(model="text-embed", input=["a", "b", "c"])
    assert len(result.data) == 3
    assert result.usage.prompt_tokens == 9
    assert upstream.last().path == "/v1/embeddings"
    assert upstream.last().json()["model"] == "text-embedding-3-small"


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["gpt-test", "local-llama", "text-embed", "dead", "mock"]


def test_mock_provider_counts_tokens_honestly(client: openai.OpenAI) -> None:
    from llmux_extproc.accounting import tokens

    messages: list[Any] = [{"role": "user", "content": "count these tokens please"}]
    completion = client.chat.completions.create(model="mock", messages=messages)
    content = completion.choices[0].message.content
    assert content and "count these tokens please" in content
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == tokens.count_messages(messages, "gpt-4o-mini")
    assert completion.usage.completion_tokens == tokens.count_text(content, "gpt-4o-mini")


# -- errors ---------------------------------------------------------------------------------


def test_missing_and_wrong_key(gateway: Gateway) -> None:
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        content=orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}),
    )
    err = assert_openai_error(resp, 401, "authentication_error")
    assert err["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=gateway.openai_base, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    resp = httpx.get(f"{gateway.openai_base}/models")
    assert_openai_error(resp, 401, "authentication_error")


def test_malformed_json(gateway: Gateway) -> None:
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={"authorization": f"Bearer {MASTER_KEY}", "content-type": "application/json"},
        content=b'{"model": "gpt-test", "messages": [',
    )
    err = assert_openai_error(resp, 400, "invalid_request_error")
    assert "JSON" in err["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "gpt-test"}, "messages"),
        ({"model": "gpt-test", "messages": []}, "messages"),
        (
            {"model": "gpt-test", "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
        ),
        (
            {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            "stream",
        ),
        ([1, 2, 3], None),
    ],
)
def test_invalid_fields(gateway: Gateway, body: Any, param: str | None) -> None:
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={"authorization": f"Bearer {MASTER_KEY}"},
        content=orjson.dumps(body),
    )
    err = assert_openai_error(resp, 400, "invalid_request_error")
    assert err["param"] == param


def test_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model="gpt-nope", messages=[{"role": "user", "content": "x"}]
        )
    assert "gpt-nope" in str(info.value)
    assert info.value.code == "model_not_found"


def test_body_over_limit(gateway: Gateway) -> None:
    huge = "x" * (300 * 1024)
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={"authorization": f"Bearer {MASTER_KEY}"},
        content=orjson.dumps(
            {"model": "gpt-test", "messages": [{"role": "user", "content": huge}]}
        ),
    )
    assert_openai_error(resp, 413, "invalid_request_error")


def test_unknown_path(gateway: Gateway) -> None:
    resp = httpx.get(f"{gateway.base_url}/v1/assistants")
    assert_openai_error(resp, 404, "not_found_error")


def test_upstream_rate_limit_passes_through(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "please fail 429"}]
        )
    assert "Rate limit reached" in str(info.value)


def test_upstream_plain_text_error_becomes_openai_error(gateway: Gateway) -> None:
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={"authorization": f"Bearer {MASTER_KEY}"},
        content=orjson.dumps(
            {"model": "gpt-test", "messages": [{"role": "user", "content": "please fail 500"}]}
        ),
    )
    err = assert_openai_error(resp, 500)
    assert "upstream exploded" in err["message"]


def test_upstream_invalid_json_is_502(gateway: Gateway) -> None:
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={"authorization": f"Bearer {MASTER_KEY}"},
        content=orjson.dumps(
            {"model": "gpt-test", "messages": [{"role": "user", "content": "please send garbage"}]}
        ),
    )
    assert_openai_error(resp, 502, "upstream_error")


def test_upstream_unreachable_is_503(client: openai.OpenAI, gateway: Gateway) -> None:
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={"authorization": f"Bearer {MASTER_KEY}"},
        content=orjson.dumps({"model": "dead", "messages": [{"role": "user", "content": "x"}]}),
    )
    assert_openai_error(resp, 503, "service_unavailable_error")


def test_upstream_timeout_is_504(gateway: Gateway) -> None:
    # local-llama has litellm_params.timeout: 1 and the mock takes 3 s.
    resp = httpx.post(
        f"{gateway.openai_base}/chat/completions",
        headers={"authorization": f"Bearer {MASTER_KEY}"},
        content=orjson.dumps(
            {"model": "local-llama", "messages": [{"role": "user", "content": "please be slow"}]}
        ),
        timeout=10,
    )
    assert_openai_error(resp, 504, "timeout_error")


# -- metrics and logs -----------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_errors(client: openai.OpenAI, gateway: Gateway) -> None:
    before = gateway.metrics()
    for i in range(3):
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": f"m{i}"}]
        )
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "please fail 429"}]
        )
    ok_before = metric(before, "llm_requests_total", model="gpt-test", status_code="200")
    after = gateway.metrics_when(
        lambda m: (
            metric(m, "llm_requests_total", model="gpt-test", status_code="200") >= ok_before + 3
        )
    )

    def delta(name: str, **labels: str) -> float:
        return metric_delta(before, after, name, **labels)

    assert delta("llm_requests_total", model="gpt-test", status_code="200") == 3
    assert delta("llm_requests_total", model="gpt-test", status_code="429") == 1
    assert delta("llm_token_usage_total", model="gpt-test", type="input", team="default") == 33
    assert delta("llm_token_usage_total", model="gpt-test", type="output") == 21
    assert delta("llm_upstream_error_total", error_type="rate_limit_error") == 1
    assert delta("llm_request_latency_seconds_count", provider="openai", model="gpt-test") == 4
    assert delta("llm_spend_total", model="gpt-test") > 0
    # Labels are bounded: no raw paths, keys or user text.
    assert (
        MASTER_KEY not in after
        and UPSTREAM_KEY not in after
        and "m0" not in re.findall(r'"([^"]*)"', after)
    )
    envoy_stats = httpx.get(f"http://127.0.0.1:{gateway.admin_port}/stats/prometheus").text
    assert "envoy_http_downstream_rq_total" in envoy_stats


def test_access_log_line_per_request_without_keys(client: openai.OpenAI, gateway: Gateway) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "log me"}]
    )
    request_id = raw.headers["x-request-id"]
    line: dict[str, Any] | None = None
    for _ in range(50):
        for text in gateway.log().splitlines():
            if text.startswith("{") and request_id in text and '"request_id"' in text:
                line = orjson.loads(text)
        if line:
            break
        time.sleep(0.1)
    assert line is not None, gateway.log()[-2000:]
    assert line["request_id"] == request_id
    assert line["status"] == 200
    assert (line["model"], line["provider"]) == ("gpt-test", "openai")
    assert line["deployment"]
    assert isinstance(line["latency_ms"], int)
    # An OpenAI-format answer is passed on by Envoy: its usage and cost were read there.
    usage = line["envoy_usage"]
    usage = orjson.loads(usage) if isinstance(usage, str) else usage
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (11, 7)
    assert line["envoy_cost"] == pytest.approx(float(raw.headers["x-llmux-response-cost"]))
    log = gateway.log()
    assert MASTER_KEY not in log and UPSTREAM_KEY not in log and VLLM_KEY not in log


# -- hot reload -----------------------------------------------------------------------------


def test_hot_reload_add_remove_and_reject_while_serving(
    upstream: MockUpstream, vllm: MockUpstream, tmp_path: Path
) -> None:
    config = base_config(upstream, vllm)
    with running_gateway(config, tmp_path, env={"E2E_VLLM_KEY": VLLM_KEY}) as gw:
        client = openai.OpenAI(base_url=gw.openai_base, api_key=MASTER_KEY, max_retries=0)
        failures: list[str] = []
        done = asyncio.Event()

        async def keep_calling() -> int:
            count = 0
            async with httpx.AsyncClient(
                base_url=gw.openai_base, headers={"authorization": f"Bearer {MASTER_KEY}"}
            ) as http:
                while not done.is_set():
                    resp = await http.post(
                        "/chat/completions",
                        content=orjson.dumps(
                            {
                                "model": "gpt-test",
                                "messages": [{"role": "user", "content": "steady"}],
                            }
                        ),
                    )
                    count += 1
                    if resp.status_code != 200:
                        failures.append(f"{resp.status_code} {resp.text}")
            return count

        async def edits() -> None:
            loop = asyncio.get_running_loop()
            # 1. add a model on a new upstream (a new Envoy cluster)
            added = dict(config)
            other = MockUpstream(openai_handler).start()
            try:
                added["model_list"] = [
                    *config["model_list"],
                    {
                        "model_name": "new-model",
                        "litellm_params": {
                            "model": "openai/gpt-4.1",
                            "api_base": f"{other.base_url}/v1",
                            "api_key": "k2",
                        },
                    },
                ]
                gw.write_config(added)
                await loop.run_in_executor(None, gw.wait_for_log, "config reloaded")
                # Each worker reloads on its own signal: ask often enough to reach both.
                await _eventually(
                    lambda: all(
                        "new-model" in [m.id for m in client.models.list()] for _ in range(8)
                    )
                )
                completion = await loop.run_in_executor(
                    None,
                    lambda: client.chat.completions.create(
                        model="new-model", messages=[{"role": "user", "content": "fresh"}]
                    ),
                )
                assert completion.choices[0].message.content == "echo: fresh"
                assert other.last().headers["authorization"] == "Bearer k2"
                # 2. break the file: the old config keeps serving
                gw.write_config(
                    "model_list: [ {model_name: broken, litellm_params: {model: nonsense}} ]\n"
                )
                await loop.run_in_executor(None, gw.wait_for_log, "config reload rejected")
                assert "model_list[0].litellm_params.model" in gw.log()
                assert "new-model" in [m.id for m in client.models.list()]
                # 3. remove the model again
                gw.write_config(config)

                def gone_everywhere() -> bool:
                    return all(
                        "new-model" not in [m.id for m in client.models.list()] for _ in range(8)
                    )

                await _eventually(gone_everywhere)
                with pytest.raises(openai.NotFoundError):
                    client.chat.completions.create(
                        model="new-model", messages=[{"role": "user", "content": "x"}]
                    )
            finally:
                other.stop()
                done.set()

        async def main() -> int:
            caller = asyncio.create_task(keep_calling())
            await edits()
            return await caller

        calls = asyncio.run(main())
        assert calls > 10
        assert failures == []
        metrics = gw.metrics()
        assert metric(metrics, "llmux_config_reloads_total", result="error") >= 1
        assert metric(metrics, "llmux_config_reloads_total", result="success") >= 2


async def _eventually(check: Any, limit_s: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not await loop.run_in_executor(None, check):
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)
