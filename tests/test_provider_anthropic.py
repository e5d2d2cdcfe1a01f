"""The Anthropic adapter as pure functions: requests checked against the official SDK's
types (strictly, through the mock upstream's validator), responses against the openai
SDK's types, errors as Anthropic documents them, and the stream translator against a
recorded event stream split at every byte."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest
import yaml
from anthropic.types import Message
from anthropic.types.shared import ErrorResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llmux_extproc.accounting.usage import Usage
from llmux_extproc.control.config import Deployment, parse_config
from llmux_extproc.errors import GatewayError
from llmux_extproc.providers.anthropic import (
    ADAPTER,
    AnthropicStreamTranslator,
    usage_from,
)
from llmux_extproc.providers.base import ClientRequest
from tests import mock_anthropic
from tests.corpus import CASES, PNG_B64, TIME_TOOL, WEATHER_TOOL, Case, case

MODEL = "claude-3-5-sonnet-20241022"


def deployment(
    model: str = MODEL, api_base: str | None = None, drop_params: bool = False
) -> Deployment:
    params: dict[str, Any] = {"model": f"anthropic/{model}", "api_key": "sk-ant-test"}
    if api_base:
        params["api_base"] = api_base
    config = {
        "model_list": [{"model_name": "claude", "litellm_params": params}],
        "litellm_settings": {"drop_params": drop_params},
    }
    return parse_config(yaml.safe_dump(config)).deployments[0]


def client_request(body: dict[str, Any], stream: bool = False) -> ClientRequest:
    full = {"model": "claude", **body}
    if stream:
        full["stream"] = True
    return ClientRequest("chat", full, orjson.dumps(full), "claude", stream)


def translate(body: dict[str, Any], dep: Deployment | None = None) -> dict[str, Any]:
    """The Anthropic body for an OpenAI body, which Anthropic must accept."""
    up = ADAPTER.request(client_request(body), dep or deployment())
    assert up.body is not None
    sent: dict[str, Any] = orjson.loads(up.body)
    assert mock_anthropic.request_errors(sent) == []
    return sent


def completion(
    message: dict[str, Any], body: dict[str, Any] | None = None
) -> tuple[dict[str, Any], Usage]:
    """The OpenAI answer for an Anthropic message, checked by both SDKs' types."""
    Message.model_validate(message)
    result = ADAPTER.response(orjson.dumps(message), client_request(body or {}), deployment())
    assert result.body is not None
    data: dict[str, Any] = orjson.loads(result.body)
    ChatCompletion.model_validate(data)
    return data, result.usage


def anthropic_message(content: list[dict[str, Any]], stop: str = "end_turn") -> dict[str, Any]:
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 100,
            "cache_creation_input_tokens": 20,
            "cache_read_input_tokens": 300,
            "output_tokens": 50,
        },
    }


# -- request: the corpus -------------------------------------------------------------------


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_corpus_requests_are_valid_anthropic(c: Case) -> None:
    if c.unsupported_param:
        with pytest.raises(GatewayError) as info:
            translate(c.request)
        assert info.value.status == 400
        assert info.value.param == c.unsupported_param
        assert c.unsupported_param in info.value.message
        sent = translate(c.request, deployment(drop_params=True))
        assert c.unsupported_param not in sent
    else:
        sent = translate(c.request)
    assert sent["model"] == MODEL
    assert "stream" not in sent


def test_plain() -> None:
    sent = translate(case("plain").request)
    assert sent == {
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}],
        # The model is not in the price table: the documented fallback.
        "max_tokens": 4096,
    }


def test_system_and_sampling() -> None:
    sent = translate(case("system").request)
    assert sent["system"] == [{"type": "text", "text": "You are terse."}]
    assert [m["role"] for m in sent["messages"]] == ["user"]
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"]) == (0.2, 0.9, 64)
    # "\n\n" is whitespace only, which Anthropic rejects: dropped.
    assert "stop_sequences" not in sent


def test_developer_message_is_system() -> None:
    sent = translate(case("developer").request)
    assert sent["system"] == [{"type": "text", "text": "Answer in French."}]
    assert sent["max_tokens"] == 50


def test_system_and_developer_concatenate() -> None:
    sent = translate(
        {
            "messages": [
                {"role": "system", "content": "One."},
                {"role": "user", "content": "Hi"},
                {"role": "developer", "content": [{"type": "text", "text": "Two."}]},
            ]
        }
    )
    assert sent["system"] == [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}]


def test_multi_turn() -> None:
    sent = translate(case("multi_turn").request)
    assert [(m["role"], m["content"][0]["text"]) for m in sent["messages"]] == [
        ("user", "My name is Ada."),
        ("assistant", "Hello Ada."),
        ("user", "What is my name?"),
    ]


def test_image_data_url() -> None:
    sent = translate(case("image").request)
    blocks = sent["messages"][0]["content"]
    assert blocks == [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
    ]


def test_image_http_url() -> None:
    url = "https://example.com/cat.jpg"
    part = {"type": "image_url", "image_url": {"url": url, "detail": "low"}}
    sent = translate({"messages": [{"role": "user", "content": [part]}]})
    assert sent["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "url", "url": url}}
    ]


@pytest.mark.parametrize(
    "url", ["data:image/bmp;base64,AAAA", "data:image/png,notbase64", "ftp://x/y.png"]
)
def test_bad_images_are_400(url: str) -> None:
    part = {"type": "image_url", "image_url": {"url": url}}
    with pytest.raises(GatewayError) as info:
        translate({"messages": [{"role": "user", "content": [part]}]})
    assert info.value.status == 400
    assert info.value.param == "messages[0].content[0]"


def test_pdf_file_part_is_a_document() -> None:
    part = {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0x"}}
    sent = translate({"messages": [{"role": "user", "content": [part]}]})
    assert sent["messages"][0]["content"] == [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"},
        }
    ]


def test_tool_call_request() -> None:
    sent = translate(case("tool_call").request)
    fn = cast(dict[str, Any], WEATHER_TOOL["function"])
    assert sent["tools"] == [
        {"name": "get_weather", "description": fn["description"], "input_schema": fn["parameters"]}
    ]
    assert sent["tool_choice"] == {"type": "auto"}


def test_parallel_tools_request() -> None:
    sent = translate(case("parallel_tools").request)
    assert [t["name"] for t in sent["tools"]] == ["get_weather", "get_time"]
    assert "tool_choice" not in sent  # parallel use is Anthropic's default


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", {"type": "any", "disable_parallel_tool_use": True}),
        ("none", {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_time"}},
            {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
        ),
        (None, {"type": "auto", "disable_parallel_tool_use": True}),
    ],
)
def test_tool_choice_without_parallel_calls(choice: Any, expected: dict[str, Any]) -> None:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Time?"}],
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "parallel_tool_calls": False,
    }
    if choice is not None:
        body["tool_choice"] = choice
    assert translate(body)["tool_choice"] == expected


def test_tool_results_request() -> None:
    sent = translate(case("tool_results").request)
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {"city": "Paris"}},
    ]
    # Both tool messages form the one user turn Anthropic's alternation requires.
    assert sent["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "18C, sunny"},
        {"type": "tool_result", "tool_use_id": "call_2", "content": "14:05"},
    ]


def test_user_message_after_tool_results_joins_their_turn() -> None:
    messages = [*case("tool_results").request["messages"], {"role": "user", "content": "Thanks"}]
    sent = translate({**case("tool_results").request, "messages": messages})
    assert [b["type"] for b in sent["messages"][2]["content"]] == [
        "tool_result",
        "tool_result",
        "text",
    ]


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]"])
def test_bad_tool_arguments_are_400(arguments: str) -> None:
    body = case("tool_results").request
    messages = [dict(m) for m in body["messages"]]
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    messages[1] = {"role": "assistant", "content": None, "tool_calls": [call]}
    with pytest.raises(GatewayError) as info:
        translate({**body, "messages": messages[:3]})
    assert info.value.status == 400
    assert info.value.param == "messages[1].tool_calls[0].function"


def test_json_object_forces_the_json_tool() -> None:
    sent = translate(case("json_object").request)
    assert sent["tools"] == [
        {
            "name": "json_tool_call",
            "description": "Respond with a JSON object.",
            "input_schema": {"type": "object"},
        }
    ]
    assert sent["tool_choice"] == {"type": "tool", "name": "json_tool_call"}


def test_json_schema_uses_the_schema() -> None:
    request = case("json_schema").request
    sent = translate(request)
    assert sent["tools"][0]["input_schema"] == request["response_format"]["json_schema"]["schema"]
    assert sent["tool_choice"] == {"type": "tool", "name": "json_tool_call"}


def test_json_schema_that_is_not_an_object_is_wrapped_and_unwrapped() -> None:
    schema = {"type": "array", "items": {"type": "string"}}
    body = {
        "messages": [{"role": "user", "content": "Names?"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    }
    sent = translate(body)
    assert sent["tools"][0]["input_schema"]["properties"] == {"value": schema}
    block = {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "json_tool_call",
        "input": {"value": ["a"]},
    }
    data, _ = completion(anthropic_message([block], "tool_use"), body)
    assert data["choices"][0]["message"]["content"] == '["a"]'


def test_json_mode_with_thinking_offers_the_tool_without_forcing() -> None:
    sent = translate({**case("json_object").request, "reasoning_effort": "low"})
    assert sent["tools"][0]["name"] == "json_tool_call"
    assert "tool_choice" not in sent


def test_reasoning_effort_enables_thinking() -> None:
    sent = translate(case("reasoning").request)
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert sent["max_tokens"] == 4000


@pytest.mark.parametrize(("effort", "budget"), [("low", 1024), ("medium", 2048), ("high", 4096)])
def test_max_tokens_stays_above_the_budget(effort: str, budget: int) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "reasoning_effort": effort}
    sent = translate({**body, "max_tokens": 100})
    assert sent["thinking"]["budget_tokens"] == budget
    assert sent["max_tokens"] == budget + 100


def test_thinking_blocks_lead_the_assistant_turn() -> None:
    thinking = [
        {"type": "thinking", "thinking": "Count the r's.", "signature": "sig=="},
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
    ]
    call = {"id": "toolu_1", "type": "function", "function": {"name": "get_time", "arguments": ""}}
    sent = translate(
        {
            "messages": [
                {"role": "user", "content": "Time?"},
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [call],
                    "thinking_blocks": thinking,
                    "reasoning_content": "Count the r's.",
                },
                {"role": "tool", "tool_call_id": "toolu_1", "content": "14:05"},
            ],
            "tools": [TIME_TOOL],
            "reasoning_effort": "medium",
        }
    )
    assert sent["messages"][1]["content"] == [
        *thinking,
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}},
    ]


def test_sampling_extras() -> None:
    sent = translate(case("sampling_extras").request)
    assert sent["metadata"] == {"user_id": "user-42"}
    for key in ("seed", "n", "user"):
        assert key not in sent


def test_stop_string_and_list() -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    assert translate({**body, "stop": "END"})["stop_sequences"] == ["END"]
    assert translate({**body, "stop": ["END", " ", "###"]})["stop_sequences"] == ["END", "###"]


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("n", 2),
        ("logit_bias", {"1": 2}),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
    ],
)
def test_unsupported_params(param: str, value: Any) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], param: value}
    with pytest.raises(GatewayError) as info:
        translate(body)
    assert (info.value.status, info.value.param) == (400, param)
    assert param not in translate(body, deployment(drop_params=True))


def test_noop_values_of_unsupported_params_pass() -> None:
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "n": 1,
        "logprobs": False,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "seed": 3,
    }
    assert set(translate(body)) == {"model", "messages", "max_tokens"}


def test_consecutive_user_messages_merge_and_prefill_is_trimmed() -> None:
    sent = translate(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "The answer is "},
            ]
        }
    )
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The answer is"}]},
    ]


def test_cache_control_is_passed_on() -> None:
    cache = {"type": "ephemeral"}
    tool = {**WEATHER_TOOL, "cache_control": cache}
    sent = translate(
        {
            "messages": [
                {
                    "role": "system",
                    "content": [{"type": "text", "text": "S", "cache_control": cache}],
                },
                {"role": "user", "content": "Long document", "cache_control": cache},
            ],
            "tools": [tool],
        }
    )
    assert sent["system"][0]["cache_control"] == cache
    assert sent["messages"][0]["content"][-1]["cache_control"] == cache
    assert sent["tools"][0]["cache_control"] == cache


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "system", "content": "only"}]}, "messages"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}], "functions": []}, "functions"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "maybe"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "max"}, None),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0]",
        ),
    ],
)
def test_bad_requests_are_400(body: dict[str, Any], param: str | None) -> None:
    with pytest.raises(GatewayError) as info:
        translate(body)
    assert info.value.status == 400
    assert info.value.param == (param or "reasoning_effort")


def test_envelope() -> None:
    up = ADAPTER.request(client_request(case("plain").request), deployment())
    assert up.path == "/v1/messages"
    assert up.headers == {
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
        "x-api-key": "sk-ant-test",
    }
    proxied = deployment(api_base="https://gateway.example.com/anthropic/")
    assert (
        ADAPTER.request(client_request(case("plain").request), proxied).path
        == "/anthropic/v1/messages"
    )


def test_default_max_tokens_from_the_price_table() -> None:
    sent = translate(case("plain").request, deployment("claude-sonnet-4-5"))
    assert sent["max_tokens"] == 64000


def test_streaming_request() -> None:
    up = ADAPTER.request(client_request(case("plain").request, stream=True), deployment())
    assert up.body is not None
    sent = orjson.loads(up.body)
    assert sent["stream"] is True
    assert mock_anthropic.request_errors(sent) == []


def test_embeddings_are_not_supported() -> None:
    req = ClientRequest("embeddings", {"model": "claude", "input": "x"}, b"{}", "claude")
    with pytest.raises(GatewayError) as info:
        ADAPTER.request(req, deployment())
    assert info.value.status == 400


# -- response --------------------------------------------------------------------------------


def test_text_response_and_usage() -> None:
    text = [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]
    data, usage = completion(anthropic_message(text))
    assert data["id"] == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert data["model"] == MODEL
    choice = data["choices"][0]
    assert choice["message"]["content"] == "Hello there"
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    assert usage == Usage(
        prompt_tokens=420, completion_tokens=50, cached_tokens=300, cache_write_tokens=20
    )
    assert data["usage"]["prompt_tokens"] == 420
    assert data["usage"]["completion_tokens"] == 50
    assert data["usage"]["total_tokens"] == 470
    assert data["usage"]["prompt_tokens_details"] == {"cached_tokens": 300}


def test_usage_without_cache() -> None:
    message = anthropic_message([{"type": "text", "text": "x"}])
    message["usage"] = {"input_tokens": 9, "output_tokens": 2}
    data, usage = completion(message)
    assert usage == Usage(prompt_tokens=9, completion_tokens=2)
    assert data["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_tool_use_response() -> None:
    blocks: list[dict[str, Any]] = [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {"city": "Paris"}},
    ]
    data, _ = completion(anthropic_message(blocks, "tool_use"))
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    calls = choice["message"]["tool_calls"]
    assert [(c["id"], c["type"], c["function"]["name"]) for c in calls] == [
        ("toolu_01A", "function", "get_weather"),
        ("toolu_01B", "function", "get_time"),
    ]
    assert [orjson.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}] * 2


def test_tool_only_response_has_null_content() -> None:
    blocks = [{"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}}]
    data, _ = completion(anthropic_message(blocks, "tool_use"))
    assert data["choices"][0]["message"]["content"] is None
    assert data["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"


def test_thinking_response() -> None:
    blocks = [
        {"type": "thinking", "thinking": "Three r's.", "signature": "EqQBCgIYAhIM=="},
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
        {"type": "text", "text": "3"},
    ]
    data, _ = completion(anthropic_message(blocks))
    message = data["choices"][0]["message"]
    assert message["content"] == "3"
    assert message["reasoning_content"] == "Three r's."
    assert message["thinking_blocks"] == blocks[:2]


def test_thinking_blocks_round_trip() -> None:
    """What the response carries, sent back on the assistant message, is what Anthropic sent."""
    blocks = [{"type": "thinking", "thinking": "Hmm.", "signature": "sig=="}]
    tool = {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"city": "Oslo"}}
    data, _ = completion(anthropic_message([*blocks, tool], "tool_use"))
    assistant = data["choices"][0]["message"]
    sent = translate(
        {
            "messages": [
                {"role": "user", "content": "Time in Oslo?"},
                assistant,
                {"role": "tool", "tool_call_id": "toolu_1", "content": "09:00"},
            ],
            "tools": [TIME_TOOL],
            "reasoning_effort": "low",
        }
    )
    assert sent["messages"][1]["content"] == [*blocks, tool]


@pytest.mark.parametrize("name", ["json_object", "json_schema"])
def test_json_mode_response_is_text(name: str) -> None:
    person = {"name": "Ada", "age": 36}
    block = {"type": "tool_use", "id": "toolu_1", "name": "json_tool_call", "input": person}
    data, _ = completion(anthropic_message([block], "tool_use"), case(name).request)
    choice = data["choices"][0]
    assert orjson.loads(choice["message"]["content"]) == person
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("model_context_window_exceeded", "length"),
    ],
)
def test_finish_reasons(stop: str, finish: str) -> None:
    data, _ = completion(anthropic_message([{"type": "text", "text": "x"}], stop))
    assert data["choices"][0]["finish_reason"] == finish


def test_invalid_response_is_502() -> None:
    for body in (b"not json", b'{"type": "message"}'):
        with pytest.raises(GatewayError) as info:
            ADAPTER.response(body, client_request({}), deployment())
        assert info.value.status == 502


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "err_type", "message", "expected", "code"),
    [
        (400, "invalid_request_error", "messages: field required", 400, "400"),
        (
            400,
            "invalid_request_error",
            "prompt is too long: 215000 tokens > 200000 maximum",
            400,
            "context_length_exceeded",
        ),
        (
            400,
            "invalid_request_error",
            "input length and `max_tokens` exceed context limit: 198000 + 8192 > 200000",
            400,
            "context_length_exceeded",
        ),
        (
            400,
            "invalid_request_error",
            "Output blocked by content filtering policy",
            400,
            "content_policy_violation",
        ),
        (401, "authentication_error", "invalid x-api-key", 401, "401"),
        (402, "billing_error", "Your credit balance is too low", 402, "402"),
        (403, "permission_error", "Your API key does not have permission", 403, "403"),
        (404, "not_found_error", "model: claude-9", 404, "404"),
        (413, "request_too_large", "Request exceeds the maximum allowed size", 413, "413"),
        (
            429,
            "rate_limit_error",
            "Number of request tokens has exceeded your rate limit",
            429,
            "429",
        ),
        (500, "api_error", "Internal server error", 500, "500"),
        (504, "timeout_error", "Request timed out", 504, "504"),
        (529, "overloaded_error", "Overloaded", 503, "503"),
    ],
)
def test_errors(status: int, err_type: str, message: str, expected: int, code: str) -> None:
    body = {
        "type": "error",
        "error": {"type": err_type, "message": message},
        "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy",
    }
    if err_type != "request_too_large":  # documented, but absent from the SDK's union
        ErrorResponse.model_validate(body)
    err = ADAPTER.error(status, orjson.dumps(body), deployment())
    assert (err.status, err.message, err.code) == (expected, message, code)
    if expected in (400, 401, 403, 404, 429):
        assert err.type == err_type


def test_error_that_is_not_anthropic_json() -> None:
    err = ADAPTER.error(503, b"upstream connect error or disconnect/reset", deployment())
    assert (err.status, err.message) == (503, "upstream connect error or disconnect/reset")
    assert ADAPTER.error(529, b"", deployment()).status == 503


# -- streaming -------------------------------------------------------------------------------


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {orjson.dumps(data).decode()}\n\n"


def _delta(index: int, **delta: Any) -> str:
    return _event(
        "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    )


def _block(index: int, block: dict[str, Any]) -> str:
    start = {"type": "content_block_start", "index": index, "content_block": block}
    return _event("content_block_start", start)


def _stop(index: int) -> str:
    return _event("content_block_stop", {"type": "content_block_stop", "index": index})


WEATHER_ARGS = '{"city": "Paris", "unit": "°C"}'
# A stream as Anthropic sends it for thinking, text with multi-byte characters and two
# parallel tool calls, with pings and the usage split between message_start and
# message_delta.
RECORDED = "".join(
    [
        _event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01Rec",
                    "type": "message",
                    "role": "assistant",
                    "model": MODEL,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": 472,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 1024,
                        "output_tokens": 2,
                    },
                },
            },
        ),
        _block(0, {"type": "thinking", "thinking": "", "signature": ""}),
        _event("ping", {"type": "ping"}),
        _delta(0, type="thinking_delta", thinking="Weather and time: "),
        _delta(0, type="thinking_delta", thinking="two tools, in parallel."),
        _delta(0, type="signature_delta", signature="EqQBCgIYAhIM1gbcDa9GJwZA=="),
        _stop(0),
        _block(1, {"type": "text", "text": ""}),
        _delta(1, type="text_delta", text="Je vérifie la météo "),
        _delta(1, type="text_delta", text="et l'heure 🌤️."),
        _stop(1),
        _block(2, {"type": "tool_use", "id": "toolu_01W", "name": "get_weather", "input": {}}),
        _delta(2, type="input_json_delta", partial_json=""),
        _delta(2, type="input_json_delta", partial_json=WEATHER_ARGS[:9]),
        _delta(2, type="input_json_delta", partial_json=WEATHER_ARGS[9:22]),
        _delta(2, type="input_json_delta", partial_json=WEATHER_ARGS[22:]),
        _stop(2),
        _block(3, {"type": "tool_use", "id": "toolu_01T", "name": "get_time", "input": {}}),
        _delta(3, type="input_json_delta", partial_json='{"city":'),
        _delta(3, type="input_json_delta", partial_json=' "Paris"}'),
        _stop(3),
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 89},
            },
        ),
        _event("message_stop", {"type": "message_stop"}),
    ]
).encode()

# The same answer, not streamed.
RECORDED_MESSAGE = {
    **anthropic_message(
        [
            {
                "type": "thinking",
                "thinking": "Weather and time: two tools, in parallel.",
                "signature": "EqQBCgIYAhIM1gbcDa9GJwZA==",
            },
            {"type": "text", "text": "Je vérifie la météo et l'heure 🌤️."},
            {
                "type": "tool_use",
                "id": "toolu_01W",
                "name": "get_weather",
                "input": orjson.loads(WEATHER_ARGS),
            },
            {"type": "tool_use", "id": "toolu_01T", "name": "get_time", "input": {"city": "Paris"}},
        ],
        "tool_use",
    ),
    "id": "msg_01Rec",
    "usage": {
        "input_tokens": 472,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 1024,
        "output_tokens": 89,
    },
}
STREAM_BODY = {
    "messages": [{"role": "user", "content": "Weather and time in Paris?"}],
    "tools": [WEATHER_TOOL, TIME_TOOL],
    "stream_options": {"include_usage": True},
}


def translator(body: dict[str, Any]) -> AnthropicStreamTranslator:
    t = ADAPTER.stream(client_request(body, stream=True), deployment())
    assert isinstance(t, AnthropicStreamTranslator)
    t.chunks.created = 1_700_000_000  # outputs of translators made at different seconds compare
    return t


def run_stream(pieces: list[bytes], body: dict[str, Any] = STREAM_BODY) -> bytes:
    t = translator(body)
    return b"".join(t.feed(p) for p in pieces) + t.finish()


def parse_sse(output: bytes) -> list[dict[str, Any]]:
    """The JSON events of an OpenAI stream, which must end with exactly one [DONE]."""
    assert output.endswith(b"data: [DONE]\n\n")
    events = output.split(b"\n\n")
    assert events.pop() == b""
    assert events.pop() == b"data: [DONE]"
    assert all(e.startswith(b"data: ") for e in events)
    return [orjson.loads(e[len(b"data: ") :]) for e in events]


def assemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """What an OpenAI client builds from the chunks: one message, finish reason, usage."""
    content, reasoning = [], []
    thinking_blocks: list[dict[str, Any]] = []
    calls: dict[int, dict[str, Any]] = {}
    finish = usage = None
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content.append(delta.get("content") or "")
            reasoning.append(delta.get("reasoning_content") or "")
            thinking_blocks += delta.get("thinking_blocks") or []
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(call["index"], {"arguments": ""})
                slot.update({k: call[k] for k in ("id", "type") if k in call})
                fn = call.get("function") or {}
                slot.update({"name": fn["name"]} if "name" in fn else {})
                slot["arguments"] += fn.get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return {
        "content": "".join(content) or None,
        "reasoning_content": "".join(reasoning) or None,
        "thinking_blocks": thinking_blocks or None,
        "tool_calls": [calls[i] for i in sorted(calls)],
        "finish_reason": finish,
        "usage": usage,
    }


def flatten(data: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed completion in `assemble`'s shape."""
    choice = data["choices"][0]
    message = choice["message"]
    return {
        "content": message["content"],
        "reasoning_content": message.get("reasoning_content"),
        "thinking_blocks": message.get("thinking_blocks"),
        "tool_calls": [
            {"id": c["id"], "type": c["type"], **c["function"]}
            for c in message.get("tool_calls", [])
        ],
        "finish_reason": choice["finish_reason"],
        "usage": data["usage"],
    }


def comparable(view: dict[str, Any]) -> dict[str, Any]:
    # Arguments are JSON text: the stream relays Anthropic's spacing, the response re-encodes.
    calls = [{**c, "arguments": orjson.loads(c["arguments"])} for c in view["tool_calls"]]
    return {**view, "tool_calls": calls}


def test_stream_matches_the_non_streamed_answer() -> None:
    chunks = parse_sse(run_stream([RECORDED]))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["id"] for c in chunks} == {"msg_01Rec"}
    streamed = assemble(chunks)
    expected, _ = completion(RECORDED_MESSAGE, STREAM_BODY)
    assert comparable(streamed) == comparable(flatten(expected))
    assert streamed["tool_calls"][0]["arguments"] == WEATHER_ARGS
    assert [c["id"] for c in streamed["tool_calls"]] == ["toolu_01W", "toolu_01T"]
    # Last: the usage chunk, with no choices.
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 472 + 1024
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 1024}


def test_stream_tool_call_indexes_count_tool_calls_only() -> None:
    chunks = parse_sse(run_stream([RECORDED]))
    starts = [
        call
        for c in chunks
        for choice in c["choices"]
        for call in choice["delta"].get("tool_calls", [])
        if "id" in call
    ]
    assert starts == [
        {
            "index": 0,
            "id": "toolu_01W",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        },
        {
            "index": 1,
            "id": "toolu_01T",
            "type": "function",
            "function": {"name": "get_time", "arguments": ""},
        },
    ]


def test_stream_split_at_every_byte_is_identical() -> None:
    whole = run_stream([RECORDED])
    for i in range(1, len(RECORDED)):
        assert run_stream([RECORDED[:i], RECORDED[i:]]) == whole, f"split at byte {i}"
    assert run_stream([RECORDED[i : i + 1] for i in range(len(RECORDED))]) == whole


def test_stream_with_crlf_and_without_final_blank_line() -> None:
    crlf = RECORDED.replace(b"\n", b"\r\n")
    assert run_stream([crlf]) == run_stream([RECORDED])
    assert run_stream([RECORDED.rstrip(b"\n")]) == run_stream([RECORDED])


def test_stream_usage_attribute_and_no_usage_chunk_by_default() -> None:
    t = translator({**STREAM_BODY, "stream_options": None})
    head, tail = RECORDED.split(b"event: message_delta")
    t.feed(head)
    assert t.usage == Usage(prompt_tokens=1496, completion_tokens=2, cached_tokens=1024)
    output = t.feed(b"event: message_delta" + tail) + t.finish()
    assert t.usage == usage_from(RECORDED_MESSAGE["usage"])
    chunks = parse_sse(output)
    assert all(c["choices"] for c in chunks)
    assert "usage" not in chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_error_event() -> None:
    head = RECORDED.split(b"event: content_block_start")[0]
    error = _event(
        "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    output = run_stream([head + error.encode(), b"event: ping\ndata: {}\n\n"])
    assert output.endswith(b"data: [DONE]\n\n")
    last = output.split(b"\n\n")[-3]
    assert orjson.loads(last[len(b"data: ") :]) == {
        "error": {
            "message": "Overloaded",
            "type": "service_unavailable_error",
            "param": None,
            "code": "503",
        }
    }


def test_truncated_stream_ends_with_an_error() -> None:
    head = RECORDED.split(b"event: message_delta")[0]
    output = run_stream([head])
    assert output.count(b"data: [DONE]") == 1
    assert b'"error":{' in output.split(b"\n\n")[-3]


def test_nothing_after_done() -> None:
    t = translator(STREAM_BODY)
    assert t.feed(RECORDED).endswith(b"data: [DONE]\n\n")
    assert t.feed(RECORDED) == b""
    assert t.finish() == b""


@pytest.mark.parametrize("c", [c for c in CASES if not c.unsupported_param], ids=lambda c: c.name)
def test_corpus_streams_match_the_mock_answer(c: Case) -> None:
    """Every corpus case, answered by the mock Anthropic, streamed and not streamed."""
    up = ADAPTER.request(client_request(c.request, stream=True), deployment())
    assert up.body is not None
    sent = orjson.loads(up.body)
    assert mock_anthropic.request_errors(sent) == []
    message = mock_anthropic.answer(sent)
    body = {**c.request, "stream_options": {"include_usage": True}}
    streamed = assemble(parse_sse(run_stream([mock_anthropic.sse(message)], body)))
    expected, _ = completion(message, c.request)
    assert comparable(streamed) == comparable(flatten(expected))
    assert len(streamed["tool_calls"]) == c.expect_tool_calls
    assert streamed["finish_reason"] == c.expect_finish


# -- temperature with top_p on the newer models ---------------------------------------------------


@pytest.mark.parametrize(
    ("model", "refuses"),
    [
        ("claude-sonnet-4-5-20250929", True),
        ("claude-haiku-4-5", True),
        ("claude-opus-4-1-20250805", True),
        ("claude-opus-4-5", True),
        ("claude-sonnet-4-6", True),
        ("claude-sonnet-4-20250514", False),  # a date is no minor version
        ("claude-opus-4", False),
        ("claude-3-7-sonnet-20250219", False),
        ("claude-3-5-sonnet-20241022", False),
        ("claude-2.1", False),
    ],
)
def test_which_models_refuse_the_pair(model: str, refuses: bool) -> None:
    from llmux_extproc.providers.anthropic import refuses_temperature_with_top_p

    assert refuses_temperature_with_top_p(model) is refuses
    # The mock answers as Anthropic does, from its own list of models.
    sent = {"model": model, "max_tokens": 10, "temperature": 0.5, "top_p": 0.9}
    sent["messages"] = [{"role": "user", "content": "hi"}]
    assert (mock_anthropic.BOTH_SAMPLING in mock_anthropic.request_errors(sent)) is refuses


def test_temperature_with_top_p_is_400_naming_both_or_top_p_dropped() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.2, "top_p": 0.5}
    with pytest.raises(GatewayError) as info:
        translate(body, deployment("claude-sonnet-4-5-20250929"))
    assert info.value.status == 400 and info.value.param == "top_p"
    assert "'temperature' together with 'top_p'" in info.value.message
    sent = translate(body, deployment("claude-sonnet-4-5-20250929", drop_params=True))
    assert sent["temperature"] == 0.2 and "top_p" not in sent
    sent = translate({**body, "temperature": None}, deployment("claude-sonnet-4-5-20250929"))
    assert sent["top_p"] == 0.5 and "temperature" not in sent
    sent = translate(body)  # an older model takes both
    assert (sent["temperature"], sent["top_p"]) == (0.2, 0.5)
