"""Anthropic end to end: the official openai SDK against `llmux run` in front of a mock
Anthropic upstream that validates what it receives with the official anthropic SDK's types."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from tests.corpus import CASES, Case, case
from tests.harness import Gateway, MockUpstream, running_gateway
from tests.mock_anthropic import MOCK_USAGE, AnthropicMock
from tests.streams import assert_stream_matches, numbers_masked

pytestmark = pytest.mark.e2e

MODEL = "claude-3-5-sonnet-20241022"


def config(api_base: str, drop_params: bool = False) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": "claude",
                "litellm_params": {
                    "model": f"anthropic/{MODEL}",
                    "api_base": api_base,
                    "api_key": "sk-ant-test",
                },
            }
        ],
        "litellm_settings": {"drop_params": drop_params},
    }


@pytest.fixture(scope="module")
def mock() -> Iterator[tuple[MockUpstream, AnthropicMock]]:
    handler = AnthropicMock()
    upstream = MockUpstream(handler).start()
    yield upstream, handler
    upstream.stop()


@pytest.fixture(scope="module")
def gateway(
    mock: tuple[MockUpstream, AnthropicMock], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with running_gateway(config(mock[0].base_url), tmp_path_factory.mktemp("anthropic")) as gw:
        yield gw


def client(gw: Gateway) -> openai.OpenAI:
    # No retries: each test scripts exactly one upstream answer.
    return openai.OpenAI(base_url=gw.openai_base, api_key="anything", max_retries=0)


SUPPORTED = [c for c in CASES if not c.unsupported_param]


def tool_names(c: Case) -> list[str]:
    return [t["function"]["name"] for t in c.request.get("tools", [])]


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_corpus(gateway: Gateway, mock: tuple[MockUpstream, AnthropicMock], c: Case) -> None:
    upstream, handler = mock
    if c.unsupported_param:
        with pytest.raises(openai.BadRequestError) as info:
            client(gateway).chat.completions.create(model="claude", **c.request)
        assert info.value.param == c.unsupported_param
        assert c.unsupported_param in info.value.message
        return
    seen = len(upstream.requests)
    rejected = len(handler.rejected)
    resp = client(gateway).chat.completions.create(model="claude", **c.request)
    assert handler.rejected[rejected:] == []
    assert len(upstream.requests) == seen + 1
    sent = upstream.last()
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "sk-ant-test"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers  # the client's key never reaches Anthropic
    assert sent.json()["model"] == MODEL

    choice = resp.choices[0]
    assert choice.finish_reason == c.expect_finish
    calls = choice.message.tool_calls or []
    assert len(calls) == c.expect_tool_calls
    assert [call.function.name for call in calls] == tool_names(c)[: c.expect_tool_calls]
    for call in calls:
        assert call.id.startswith("toolu_")
        assert orjson.loads(call.function.arguments) == {"city": "Ada"}
    if not calls:
        assert choice.message.content
    if "json" in c.tags:
        assert choice.message.content is not None
        value = orjson.loads(choice.message.content)
        assert value == ({"name": "Ada", "age": 36} if c.name == "json_schema" else {"a": 1})
    if "reasoning" in c.tags:
        extra = choice.message.model_extra or {}
        assert extra["reasoning_content"]
        assert extra["thinking_blocks"][0]["signature"]

    usage = resp.usage
    assert usage is not None
    cached = MOCK_USAGE["cache_read_input_tokens"]
    prompt = MOCK_USAGE["input_tokens"] + cached + MOCK_USAGE["cache_creation_input_tokens"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, MOCK_USAGE["output_tokens"])
    assert usage.total_tokens == prompt + MOCK_USAGE["output_tokens"]
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == cached


@pytest.mark.parametrize("c", SUPPORTED, ids=lambda c: c.name)
def test_stream_matches_the_whole_answer(gateway: Gateway, c: Case) -> None:
    """Anthropic's event stream (thinking, parallel tool_use with input_json_delta, usage in
    message_start and message_delta, pings) says what the whole answer says."""
    api = client(gateway)
    whole = api.chat.completions.create(model="claude", **c.request)
    chunks = list(
        api.chat.completions.create(
            model="claude", stream=True, stream_options={"include_usage": True}, **c.request
        )
    )
    # The mock numbers its answers; everything else must match.
    assert_stream_matches(whole, chunks, numbers_masked)


def test_drop_params(
    mock: tuple[MockUpstream, AnthropicMock], tmp_path_factory: pytest.TempPathFactory
) -> None:
    upstream, _ = mock
    c = case("unsupported_param")
    tmp = tmp_path_factory.mktemp("anthropic_drop")
    with running_gateway(config(upstream.base_url, drop_params=True), tmp) as gw:
        resp = client(gw).chat.completions.create(model="claude", **c.request)
    assert resp.choices[0].message.content
    assert "logit_bias" not in upstream.last().json()


def _fail_next(
    gateway: Gateway, handler: AnthropicMock, status: int, err_type: str, message: str
) -> openai.APIStatusError:
    handler.fail_next = (status, err_type, message)
    try:
        with pytest.raises(openai.APIStatusError) as info:
            client(gateway).chat.completions.create(model="claude", **case("plain").request)
    finally:
        handler.fail_next = None
    return info.value


def test_rate_limit(gateway: Gateway, mock: tuple[MockUpstream, AnthropicMock]) -> None:
    text = "Number of request tokens has exceeded your per-minute rate limit"
    err = _fail_next(gateway, mock[1], 429, "rate_limit_error", text)
    assert isinstance(err, openai.RateLimitError)
    assert isinstance(err.body, dict)
    assert err.body["message"] == text


def test_overloaded_is_503(gateway: Gateway, mock: tuple[MockUpstream, AnthropicMock]) -> None:
    err = _fail_next(gateway, mock[1], 529, "overloaded_error", "Overloaded")
    assert isinstance(err, openai.InternalServerError)
    assert err.status_code == 503
    assert isinstance(err.body, dict)
    assert err.body["message"] == "Overloaded"


def test_prompt_too_long(gateway: Gateway, mock: tuple[MockUpstream, AnthropicMock]) -> None:
    text = "prompt is too long: 215000 tokens > 200000 maximum"
    err = _fail_next(gateway, mock[1], 400, "invalid_request_error", text)
    assert isinstance(err, openai.BadRequestError)
    assert err.code == "context_length_exceeded"
    assert isinstance(err.body, dict)
    assert err.body["message"] == text


def test_bad_upstream_key_is_401(
    gateway: Gateway, mock: tuple[MockUpstream, AnthropicMock]
) -> None:
    handler = mock[1]
    handler.api_key = "sk-ant-another"
    try:
        with pytest.raises(openai.AuthenticationError) as info:
            client(gateway).chat.completions.create(model="claude", **case("plain").request)
    finally:
        handler.api_key = "sk-ant-test"
    assert isinstance(info.value.body, dict)
    assert info.value.body["message"] == "invalid x-api-key"
