"""Bedrock adapter: Converse requests checked against botocore's service model, responses,
errors, the event-stream decoder and the ConverseStream translator."""

from __future__ import annotations

import base64
import struct
import uuid
import zlib
from typing import Any

import orjson
import pytest
import yaml

from llmux_extproc.control.config import Deployment, parse_config
from llmux_extproc.errors import GatewayError
from llmux_extproc.providers import bedrock
from llmux_extproc.providers.aws_eventstream import (
    EventStreamDecoder,
    EventStreamError,
    decode_message,
)
from llmux_extproc.providers.base import ClientRequest
from tests import corpus

pytest.importorskip("botocore")

from botocore.eventstream import EventStreamBuffer
from botocore.serialize import create_serializer

from tests import mock_bedrock as mb

CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"
ADAPTER = bedrock.ADAPTER


def make_dep(model: str = CLAUDE, **params: Any) -> Deployment:
    litellm = {
        "model": f"bedrock/{model}",
        "aws_access_key_id": mb.ACCESS_KEY,
        "aws_secret_access_key": mb.SECRET_KEY,
        "aws_region_name": mb.REGION,
        **params,
    }
    config = parse_config(
        yaml.safe_dump({"model_list": [{"model_name": "m", "litellm_params": litellm}]})
    )
    return config.deployments[0]


DEFAULT_DEP = make_dep()


def chat(body: dict[str, Any], stream: bool = False) -> ClientRequest:
    full = {"model": "m", **body, **({"stream": True} if stream else {})}
    return ClientRequest("chat", full, orjson.dumps(full), "m", stream)


def embed(body: dict[str, Any]) -> ClientRequest:
    full = {"model": "m", **body}
    return ClientRequest("embeddings", full, orjson.dumps(full), "m")


def converse(body: dict[str, Any], dep: Deployment | None = None) -> dict[str, Any]:
    up = ADAPTER.request(chat(body), dep or make_dep())
    assert up.body is not None
    result: dict[str, Any] = orjson.loads(up.body)
    return result


def botocore_request(params: dict[str, Any], operation: str = "Converse") -> dict[str, Any]:
    """What boto3 itself would send for these parameters (path and JSON body)."""
    model = mb.service_model().operation_model(operation)
    request: dict[str, Any] = create_serializer("rest-json").serialize_to_request(params, model)
    return request


# -- requests: every corpus case -------------------------------------------------------------


@pytest.mark.parametrize("case", corpus.CASES, ids=lambda c: c.name)
def test_corpus_request(case: corpus.Case) -> None:
    dep = make_dep()
    req = chat(case.request)
    if case.unsupported_param:
        with pytest.raises(GatewayError) as info:
            ADAPTER.request(req, dep)
        assert info.value.status == 400
        assert info.value.param == case.unsupported_param
        return
    up = ADAPTER.request(req, dep)
    assert up.body is not None
    body = orjson.loads(up.body)
    # The body is valid Converse input, and byte-for-byte what boto3 would build from it.
    assert mb.validate_converse(body, CLAUDE) == ""
    expected = botocore_request({**mb._decode_blobs(body), "modelId": CLAUDE})
    assert up.path == expected["url_path"] == f"/model/{CLAUDE.replace(':', '%3A')}/converse"
    assert body == orjson.loads(expected["body"])
    assert "modelId" not in body and "model" not in body
    # Signed over exactly this body, for the host Envoy will send.
    assert dep.upstream is not None
    headers = {**up.headers, "host": dep.upstream.authority}
    assert mb.verify_sigv4("POST", up.path, "", headers, up.body) is None


def test_drop_params_drops_unsupported() -> None:
    body = converse(corpus.case("unsupported_param").request, make_dep(drop_params=True))
    assert body == {"messages": [{"role": "user", "content": [{"text": "Say hello"}]}]}


def test_system_developer_and_inference_config() -> None:
    body = converse(corpus.case("system").request)
    assert body["system"] == [{"text": "You are terse."}]
    assert body["inferenceConfig"] == {
        "maxTokens": 64,
        "temperature": 0.2,
        "topP": 0.9,
        "stopSequences": ["\n\n"],
    }
    body = converse(corpus.case("developer").request)
    assert body["system"] == [{"text": "Answer in French."}]
    assert body["inferenceConfig"] == {"maxTokens": 50}
    assert converse({**corpus.case("plain").request, "stop": "END"})["inferenceConfig"] == {
        "stopSequences": ["END"]
    }


def test_roles_alternate_and_tool_results_merge() -> None:
    body = converse(corpus.case("tool_results").request)
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user"]
    assistant, results = body["messages"][1]["content"], body["messages"][2]["content"]
    assert assistant == [
        {"toolUse": {"toolUseId": "call_1", "name": "get_weather", "input": {"city": "Paris"}}},
        {"toolUse": {"toolUseId": "call_2", "name": "get_time", "input": {"city": "Paris"}}},
    ]
    assert results == [
        {"toolResult": {"toolUseId": "call_1", "content": [{"text": "18C, sunny"}]}},
        {"toolResult": {"toolUseId": "call_2", "content": [{"text": "14:05"}]}},
    ]
    merged = converse(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "text", "text": "b"}]},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": "c"},
            ]
        }
    )
    assert merged["messages"] == [
        {"role": "user", "content": [{"text": "a"}, {"text": "b"}, {"text": "c"}]}
    ]


def test_image_data_url_becomes_bytes_block() -> None:
    body = converse(corpus.case("image").request)
    blocks = body["messages"][0]["content"]
    assert blocks[1] == {"image": {"format": "png", "source": {"bytes": corpus.PNG_B64}}}
    jpeg = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}
    body = converse({"messages": [{"role": "user", "content": [jpeg]}]})
    assert body["messages"][0]["content"][0]["image"]["format"] == "jpeg"


@pytest.mark.parametrize(
    "url", ["https://example.com/cat.png", "data:image/tiff;base64,AAAA", "data:text/plain,hi"]
)
def test_unusable_images_are_400(url: str) -> None:
    part = {"type": "image_url", "image_url": {"url": url}}
    with pytest.raises(GatewayError) as info:
        converse({"messages": [{"role": "user", "content": [part]}]})
    assert info.value.status == 400


def test_tools_and_tool_choice() -> None:
    body = converse(corpus.case("tool_call").request)
    assert body["toolConfig"] == {
        "tools": [
            {
                "toolSpec": {
                    "name": "get_weather",
                    "description": "Current weather for a city",
                    "inputSchema": {"json": corpus.WEATHER_TOOL["function"]["parameters"]},  # type: ignore[index]
                }
            }
        ]
    }  # "auto" is Converse's default: left out, so models without toolChoice accept it
    tools = corpus.case("parallel_tools").request["tools"]
    required = converse({**corpus.case("parallel_tools").request, "tool_choice": "required"})
    assert required["toolConfig"]["toolChoice"] == {"any": {}}
    named = {"type": "function", "function": {"name": "get_time"}}
    one = converse(
        {"messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": named}
    )
    assert one["toolConfig"]["toolChoice"] == {"tool": {"name": "get_time"}}
    none = converse(
        {"messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": "none"}
    )
    assert "toolConfig" not in none


def test_tool_history_without_tools_gets_placeholder_specs() -> None:
    request = {k: v for k, v in corpus.case("tool_results").request.items() if k != "tools"}
    body = converse(request)
    names = [t["toolSpec"]["name"] for t in body["toolConfig"]["tools"]]
    assert names == ["get_weather", "get_time"]
    assert mb.validate_converse(body, CLAUDE) == ""
    with pytest.raises(GatewayError) as info:
        converse({**corpus.case("tool_results").request, "tool_choice": "none"})
    assert info.value.param == "tool_choice"


def test_json_modes_force_the_json_tool() -> None:
    body = converse(corpus.case("json_schema").request)
    spec = body["toolConfig"]["tools"][0]["toolSpec"]
    assert spec["name"] == bedrock.JSON_TOOL
    assert spec["inputSchema"]["json"]["required"] == ["name", "age"]
    assert body["toolConfig"]["toolChoice"] == {"tool": {"name": bedrock.JSON_TOOL}}
    body = converse(corpus.case("json_object").request)
    assert body["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"] == {"json": {"type": "object"}}
    text_format = {**corpus.case("plain").request, "response_format": {"type": "text"}}
    assert "toolConfig" not in converse(text_format)
    with pytest.raises(GatewayError) as info:
        converse({**corpus.case("json_object").request, "tools": [corpus.WEATHER_TOOL]})
    assert info.value.param == "response_format"
    with pytest.raises(GatewayError) as info:
        converse({**corpus.case("json_object").request, "reasoning_effort": "low"})
    assert info.value.param == "response_format"


def test_reasoning_effort_is_anthropic_thinking() -> None:
    body = converse(corpus.case("reasoning").request)
    assert body["additionalModelRequestFields"] == {
        "thinking": {"type": "enabled", "budget_tokens": 1024}
    }
    assert body["inferenceConfig"] == {"maxTokens": 4000}
    high = converse({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "high"})
    assert high["additionalModelRequestFields"]["thinking"]["budget_tokens"] == 4096
    assert high["inferenceConfig"]["maxTokens"] > 4096  # Anthropic needs room past the budget
    explicit = {"type": "enabled", "budget_tokens": 2000}
    body = converse({"messages": [{"role": "user", "content": "x"}], "thinking": explicit})
    assert body["additionalModelRequestFields"]["thinking"] == explicit
    profile = make_dep("us.anthropic.claude-3-7-sonnet-20250219-v1:0")
    assert "additionalModelRequestFields" in converse(corpus.case("reasoning").request, profile)
    llama = make_dep("meta.llama3-70b-instruct-v1:0")
    with pytest.raises(GatewayError) as info:
        converse(corpus.case("reasoning").request, llama)
    assert info.value.param == "reasoning_effort"
    assert "additionalModelRequestFields" not in converse(
        corpus.case("reasoning").request,
        make_dep("meta.llama3-70b-instruct-v1:0", drop_params=True),
    )


def test_thinking_blocks_are_sent_back() -> None:
    message = {
        "role": "assistant",
        "content": None,
        "thinking_blocks": [{"type": "thinking", "thinking": "hmm", "signature": "sig"}],
        "tool_calls": corpus.case("tool_results").request["messages"][1]["tool_calls"][:1],
    }
    messages = [
        {"role": "user", "content": "q"},
        message,
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]
    body = converse({"messages": messages, "tools": [corpus.WEATHER_TOOL]})
    blocks = body["messages"][1]["content"]
    assert blocks[0] == {"reasoningContent": {"reasoningText": {"text": "hmm", "signature": "sig"}}}
    assert mb.validate_converse(body, CLAUDE) == ""


def test_cache_control_becomes_cache_points() -> None:
    system = {
        "role": "system",
        "content": [{"type": "text", "text": "long", "cache_control": {"type": "ephemeral"}}],
    }
    body = converse({"messages": [system, {"role": "user", "content": "x"}]})
    assert body["system"] == [{"text": "long"}, {"cachePoint": {"type": "default"}}]
    assert mb.validate_converse(body, CLAUDE) == ""


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"functions": []}, "functions"),
        ({"audio": {"voice": "x"}}, "audio"),
    ],
)
def test_unsupported_params_name_the_param(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        converse({**corpus.case("plain").request, **extra})
    assert (info.value.status, info.value.param) == (400, param)
    assert "drop_params" in info.value.message


def test_neutral_values_are_accepted() -> None:
    extra = {"n": 1, "logprobs": False, "presence_penalty": 0, "parallel_tool_calls": True}
    assert converse({**corpus.case("plain").request, **extra})["messages"]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "function", "name": "f", "content": "x"}],
        [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}
                ],
            }
        ],
        [{"role": "tool", "content": "no id"}],
        [{"role": "user", "content": 5}],
    ],
)
def test_malformed_messages_are_400(messages: list[dict[str, Any]]) -> None:
    with pytest.raises(GatewayError) as info:
        converse({"messages": messages})
    assert info.value.status == 400


def test_stream_path_and_converse_route_prefix() -> None:
    dep = make_dep(f"converse/{CLAUDE}")
    up = ADAPTER.request(chat(corpus.case("plain").request, stream=True), dep)
    assert up.path == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse-stream"
    assert up.headers["accept"] == "application/vnd.amazon.eventstream"
    assert up.body is not None
    assert mb.validate_converse(orjson.loads(up.body), CLAUDE, "ConverseStream") == ""


def test_validator_is_a_real_check() -> None:
    assert mb.validate_converse({"messages": [{"role": "user", "content": [{"txt": "x"}]}]}, CLAUDE)
    assert mb.validate_converse({"messages": [], "inferenceConfig": {"topP": "high"}}, CLAUDE)


# -- auth ------------------------------------------------------------------------------------


def test_session_token_is_sent_and_signed() -> None:
    dep = make_dep(aws_session_token=mb.SESSION_TOKEN)
    up = ADAPTER.request(chat(corpus.case("plain").request), dep)
    assert up.headers["x-amz-security-token"] == mb.SESSION_TOKEN
    assert dep.upstream is not None and up.body is not None
    headers = {**up.headers, "host": dep.upstream.authority}
    assert (
        mb.verify_sigv4("POST", up.path, "", headers, up.body, session_token=mb.SESSION_TOKEN)
        is None
    )


def test_api_key_is_bearer(monkeypatch: pytest.MonkeyPatch) -> None:
    up = ADAPTER.request(chat(corpus.case("plain").request), make_dep(api_key="bedrock-api-key"))
    assert up.headers["authorization"] == "Bearer bedrock-api-key"
    assert "x-amz-date" not in up.headers


def test_missing_credentials_is_401(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    dep = make_dep(aws_access_key_id=None, aws_secret_access_key=None)
    with pytest.raises(GatewayError) as info:
        ADAPTER.request(chat(corpus.case("plain").request), dep)
    assert info.value.status == 401
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", mb.ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", mb.SECRET_KEY)
    up = ADAPTER.request(chat(corpus.case("plain").request), dep)
    assert up.headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={mb.ACCESS_KEY}/")


def test_api_base_with_path_is_signed_with_it() -> None:
    dep = make_dep(api_base="https://vpce-1.bedrock-runtime.us-west-2.vpce.amazonaws.com/proxy")
    up = ADAPTER.request(chat(corpus.case("plain").request), dep)
    assert up.path.startswith("/proxy/model/")
    assert dep.upstream is not None and up.body is not None
    headers = {**up.headers, "host": dep.upstream.authority}
    assert mb.verify_sigv4("POST", up.path, "", headers, up.body) is None


# -- responses -------------------------------------------------------------------------------


def respond(
    data: dict[str, Any], request: dict[str, Any] | None = None
) -> tuple[dict[str, Any], Any]:
    req = chat(request or corpus.case("plain").request)
    result = ADAPTER.response(orjson.dumps(data), req, make_dep())
    assert result.body is not None
    return orjson.loads(result.body), result.usage


def answer(blocks: list[dict[str, Any]], stop: str = "end_turn", **usage: int) -> dict[str, Any]:
    return {
        "output": {"message": {"role": "assistant", "content": blocks}},
        "stopReason": stop,
        "usage": {"inputTokens": 10, "outputTokens": 5, "totalTokens": 15, **usage},
        "metrics": {"latencyMs": 100},
    }


def test_text_response_and_usage() -> None:
    body, usage = respond(
        answer([{"text": "Hel"}, {"text": "lo"}], cacheReadInputTokens=4, cacheWriteInputTokens=6)
    )
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == CLAUDE
    choice = body["choices"][0]
    assert choice["message"]["content"] == "Hello" and choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (20, 5)
    assert (usage.cached_tokens, usage.cache_write_tokens) == (4, 6)
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    assert body["usage"]["total_tokens"] == 25


def test_tool_use_response() -> None:
    blocks: list[dict[str, Any]] = [
        {"text": "Let me check."},
        {"toolUse": {"toolUseId": "tooluse_a", "name": "get_weather", "input": {"city": "Paris"}}},
        {"toolUse": {"toolUseId": "tooluse_b", "name": "get_time", "input": {}}},
    ]
    body, _ = respond(answer(blocks, "tool_use"))
    message = body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert message["content"] == "Let me check."
    assert message["tool_calls"] == [
        {
            "id": "tooluse_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        },
        {
            "id": "tooluse_b",
            "type": "function",
            "function": {"name": "get_time", "arguments": "{}"},
        },
    ]


def test_json_tool_response_is_content() -> None:
    blocks = [
        {
            "toolUse": {
                "toolUseId": "t",
                "name": bedrock.JSON_TOOL,
                "input": {"name": "Ada", "age": 36},
            }
        }
    ]
    body, _ = respond(answer(blocks, "tool_use"), corpus.case("json_schema").request)
    choice = body["choices"][0]
    assert orjson.loads(choice["message"]["content"]) == {"name": "Ada", "age": 36}
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]


def test_reasoning_response() -> None:
    blocks: list[dict[str, Any]] = [
        {"reasoningContent": {"reasoningText": {"text": "Think.", "signature": "sig"}}},
        {"reasoningContent": {"redactedContent": "cmVkYWN0ZWQ="}},
        {"text": "Three."},
    ]
    body, _ = respond(answer(blocks))
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "Think."
    assert message["thinking_blocks"] == [
        {"type": "thinking", "thinking": "Think.", "signature": "sig"},
        {"type": "redacted_thinking", "data": "cmVkYWN0ZWQ="},
    ]


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("guardrail_intervened", "content_filter"),
        ("content_filtered", "content_filter"),
        ("malformed_model_output", "stop"),
    ],
)
def test_stop_reasons(stop: str, finish: str) -> None:
    body, _ = respond(answer([{"text": "x"}], stop))
    assert body["choices"][0]["finish_reason"] == finish


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"output": {}}'])
def test_malformed_response_is_502(raw: bytes) -> None:
    with pytest.raises(GatewayError) as info:
        ADAPTER.response(raw, chat(corpus.case("plain").request), make_dep())
    assert info.value.status == 502


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        ("ThrottlingException", 429, "429"),
        ("AccessDeniedException", 403, "403"),
        ("UnrecognizedClientException", 401, "401"),
        ("ResourceNotFoundException", 404, "404"),
        ("ValidationException", 400, "context_length_exceeded"),
        ("ModelTimeoutException", 408, "408"),
        ("ServiceUnavailableException", 503, "503"),
        ("ModelNotReadyException", 503, "503"),
        ("InternalServerException", 500, "500"),
    ],
)
def test_errors_from_status_and_message(name: str, status: int, code: str) -> None:
    upstream_status, message = mb.ERRORS[name]
    err = ADAPTER.error(upstream_status, orjson.dumps({"message": message}), make_dep())
    assert (err.status, err.code, err.message) == (status, code, message)


def test_error_variants() -> None:
    plain_400 = ADAPTER.error(400, b'{"message": "messages: field required"}', make_dep())
    assert (plain_400.status, plain_400.code) == (400, "400")
    prompt = b'{"message": "prompt is too long: 210000 tokens > 200000 maximum"}'
    assert ADAPTER.error(400, prompt, make_dep()).code == "context_length_exceeded"
    typed = b'{"__type": "com.amazon#ThrottlingException", "message": "slow down"}'
    assert ADAPTER.error(400, typed, make_dep()).status == 429
    quota = b'{"message": "Too many tokens per day, please wait."}'
    assert ADAPTER.error(400, quota, make_dep()).status == 429
    model_error = ADAPTER.error(424, b'{"message": "The model failed."}', make_dep())
    assert model_error.status == 502
    empty = ADAPTER.error(500, b"", make_dep())
    assert empty.status == 500 and "500" in empty.message
    assert bedrock.bedrock_error(400, b"{}", "ThrottlingException:http://internal/").status == 429


# -- embeddings ------------------------------------------------------------------------------

TITAN = "amazon.titan-embed-text-v2:0"
COHERE = "cohere.embed-english-v3"


def test_titan_request_and_response() -> None:
    dep = make_dep(TITAN)
    up = ADAPTER.request(embed({"input": "hello world", "dimensions": 256}), dep)
    assert up.path == "/model/amazon.titan-embed-text-v2%3A0/invoke"
    assert up.body is not None
    assert orjson.loads(up.body) == {"inputText": "hello world", "dimensions": 256}
    expected = botocore_request(
        {
            "modelId": TITAN,
            "body": up.body,
            "contentType": "application/json",
            "accept": "application/json",
        },
        "InvokeModel",
    )
    assert expected["url_path"] == up.path
    assert orjson.loads(ADAPTER.request(embed({"input": ["one"]}), dep).body or b"") == {
        "inputText": "one"
    }
    raw = orjson.dumps({"embedding": [0.5, -0.25], "inputTextTokenCount": 3})
    result = ADAPTER.response(raw, embed({"input": "hello world"}), dep)
    assert result.body is not None
    body = orjson.loads(result.body)
    assert body["data"] == [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert result.usage.prompt_tokens == 3 and not result.usage.estimated


def test_titan_batch_is_400() -> None:
    with pytest.raises(GatewayError) as info:
        ADAPTER.request(embed({"input": ["a", "b"]}), make_dep(TITAN))
    assert (info.value.status, info.value.param) == (400, "input")
    assert "one input" in info.value.message


def test_cohere_batch_and_base64() -> None:
    dep = make_dep(COHERE)
    up = ADAPTER.request(embed({"input": ["a", "b"], "encoding_format": "base64"}), dep)
    assert orjson.loads(up.body or b"") == {"texts": ["a", "b"], "input_type": "search_document"}
    query = ADAPTER.request(embed({"input": "q", "input_type": "search_query"}), dep)
    assert orjson.loads(query.body or b"")["input_type"] == "search_query"
    raw = orjson.dumps(
        {"id": "x", "embeddings": [[1.0, 2.0], [0.5, 0.0]], "response_type": "embeddings_floats"}
    )
    result = ADAPTER.response(raw, embed({"input": ["a", "b"], "encoding_format": "base64"}), dep)
    body = orjson.loads(result.body or b"")
    decoded = struct.unpack("<2f", base64.b64decode(body["data"][1]["embedding"]))
    assert decoded == (0.5, 0.0)
    assert result.usage.estimated and result.usage.prompt_tokens == 2
    v4 = orjson.dumps({"embeddings": {"float": [[1.0]]}, "response_type": "embeddings_by_type"})
    body = orjson.loads(
        ADAPTER.response(v4, embed({"input": "a"}), make_dep("cohere.embed-v4:0")).body or b""
    )
    assert body["data"][0]["embedding"] == [1.0]


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (TITAN, {"input": [1, 2, 3]}, "input"),
        ("amazon.titan-embed-text-v1", {"input": "a", "dimensions": 8}, "dimensions"),
        (COHERE, {"input": "a", "dimensions": 8}, "dimensions"),
        (TITAN, {"input": "a", "input_type": "search_query"}, "input_type"),
        (TITAN, {"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ("meta.llama3-70b-instruct-v1:0", {"input": "a"}, "model"),
    ],
)
def test_embedding_errors(model: str, body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        ADAPTER.request(embed(body), make_dep(model))
    assert (info.value.status, info.value.param) == (400, param)


# -- event-stream decoding -------------------------------------------------------------------


def _all_header_types() -> bytes:
    def typed(name: str, kind: int, value: bytes) -> bytes:
        return bytes([len(name)]) + name.encode() + bytes([kind]) + value

    return b"".join(
        (
            typed("byte", 2, struct.pack(">b", -3)),
            typed("short", 3, struct.pack(">h", -300)),
            typed("long", 5, struct.pack(">q", 2**40)),
            typed("time", 8, struct.pack(">q", 1_700_000_000_000)),
        )
    )


def test_decodes_every_header_type() -> None:
    tag = uuid.UUID("12345678-1234-5678-1234-567812345678")
    headers = {"t": True, "f": False, "i": -7, "s": "text", "b": b"\x00\x01", "u": tag}
    message = decode_message(mb.frame(headers, b"payload", _all_header_types()))
    assert message.payload == b"payload"
    assert message.headers == {
        **headers,
        "byte": -3,
        "short": -300,
        "long": 2**40,
        "time": 1_700_000_000_000,
    }


def test_frames_agree_with_botocore() -> None:
    data = b"".join(
        mb.stream_events(
            mb.converse_answer({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}),
            mb.USAGE,
        )
    )
    reference = EventStreamBuffer()
    reference.add_data(data)
    theirs = [(dict(m.headers), m.payload) for m in reference]
    ours = [(m.headers, m.payload) for m in EventStreamDecoder().feed(data)]
    assert ours == theirs and len(ours) > 5


def test_decoder_split_at_every_byte() -> None:
    data = (
        mb.frame({":event-type": "a"}, b"first")
        + mb.frame({}, b"")
        + mb.frame({"x": 1}, b"third" * 40)
    )
    whole = EventStreamDecoder().feed(data)
    assert [m.payload for m in whole] == [b"first", b"", b"third" * 40]
    for cut in range(len(data) + 1):
        decoder = EventStreamDecoder()
        got = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert got == whole and decoder.pending == 0
    decoder = EventStreamDecoder()
    got = [m for i in range(len(data)) for m in decoder.feed(data[i : i + 1])]
    assert got == whole


@pytest.mark.parametrize("position", ["prelude_crc", "headers", "payload", "message_crc"])
def test_decoder_rejects_corruption(position: str) -> None:
    data = bytearray(mb.frame({"k": "v"}, b"payload"))
    index = {"prelude_crc": 9, "headers": 14, "payload": -6, "message_crc": -1}[position]
    data[index] ^= 0xFF
    with pytest.raises(EventStreamError):
        EventStreamDecoder().feed(bytes(data))


def test_decoder_rejects_absurd_lengths() -> None:
    prelude = struct.pack(">II", 2**31, 0)
    with pytest.raises(EventStreamError):
        EventStreamDecoder().feed(prelude + struct.pack(">I", zlib.crc32(prelude)))


# -- stream translation ----------------------------------------------------------------------


def translate(
    data: bytes, request: dict[str, Any] | None = None, cuts: list[int] | None = None
) -> list[Any]:
    """Feed the frames (cut where asked), parse the SSE out, normalise the per-stream id."""
    req = chat(request or corpus.case("plain").request, stream=True)
    translator = ADAPTER.stream(req, DEFAULT_DEP)
    assert translator is not None
    out = b""
    start = 0
    for cut in [*(cuts or []), len(data)]:
        out += translator.feed(data[start:cut])
        start = cut
    out += translator.finish()
    events: list[Any] = []
    for block in out.decode().split("\n\n")[:-1]:
        assert block.startswith("data: ")
        payload = block.removeprefix("data: ")
        if payload == "[DONE]":
            events.append("[DONE]")
            continue
        chunk = orjson.loads(payload)
        chunk.pop("id", None)
        chunk.pop("created", None)
        events.append(chunk)
    return events


def stream_of(request: dict[str, Any]) -> bytes:
    body = converse(request)
    return b"".join(mb.stream_events(mb.converse_answer(body), mb.USAGE))


def deltas(events: list[Any]) -> list[dict[str, Any]]:
    return [e["choices"][0]["delta"] for e in events if isinstance(e, dict) and e["choices"]]


def test_text_stream() -> None:
    request = {**corpus.case("plain").request, "stream_options": {"include_usage": True}}
    events = translate(stream_of(request), request)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["prompt_tokens"] == 14
    assert usage_chunk["object"] == "chat.completion.chunk"
    finals = [e["choices"][0]["finish_reason"] for e in events[:-2]]
    assert finals[-1] == "stop" and set(finals[:-1]) == {None}
    parts = deltas(events)
    assert parts[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in parts) == "Hello from Bedrock. You said: Say hello"


def test_usage_chunk_only_when_asked() -> None:
    events = translate(stream_of(corpus.case("plain").request))
    assert all(e == "[DONE]" or e["choices"] for e in events)


def test_tool_call_stream() -> None:
    request = corpus.case("parallel_tools").request
    events = translate(stream_of(request), request)
    calls = [c for d in deltas(events) for c in d.get("tool_calls", [])]
    starts = [c for c in calls if "id" in c]
    assert [(c["index"], c["id"], c["function"]["name"]) for c in starts] == [
        (0, "tooluse_0", "get_weather"),
        (1, "tooluse_1", "get_time"),
    ]
    for index in (0, 1):
        args = "".join(c["function"]["arguments"] for c in calls if c["index"] == index)
        assert orjson.loads(args) == {"city": "Paris"}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_json_mode_stream_is_content() -> None:
    request = corpus.case("json_schema").request
    events = translate(stream_of(request), request)
    text = "".join(d.get("content", "") for d in deltas(events))
    assert orjson.loads(text) == {"name": "Ada", "age": 36}
    assert not any("tool_calls" in d for d in deltas(events))
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_reasoning_stream() -> None:
    request = corpus.case("reasoning").request
    parts = deltas(translate(stream_of(request), request))
    assert "".join(d.get("reasoning_content", "") for d in parts) == "Count the r letters: three."
    assert any(d.get("thinking_blocks", [{}])[0].get("signature") == "c2lnbmF0dXJl" for d in parts)


@pytest.mark.parametrize("case", ["plain", "parallel_tools", "json_schema", "reasoning"])
def test_stream_split_at_every_byte(case: str) -> None:
    request = {**corpus.case(case).request, "stream_options": {"include_usage": True}}
    data = stream_of(request)
    whole = translate(data, request)
    for cut in range(len(data) + 1):
        assert translate(data, request, [cut]) == whole
    assert translate(data, request, list(range(1, len(data)))) == whole


def test_exception_event_becomes_error_event() -> None:
    frames = [
        mb.event("messageStart", {"role": "assistant"}),
        mb.exception("throttlingException", "Too many tokens."),
    ]
    events = translate(b"".join(frames))
    # The error event, then [DONE], as for every translated stream.
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert events[-2]["error"]["message"] == "Too many tokens."
    assert events[-2]["error"]["type"] == "rate_limit_error"


def test_error_message_type_and_corruption() -> None:
    error = mb.frame(
        {":message-type": "error", ":error-code": "InternalFailure", ":error-message": "boom"}, b""
    )
    assert translate(error)[-2]["error"]["message"] == "boom"
    corrupt = bytearray(mb.event("messageStart", {"role": "assistant"}))
    corrupt[-1] ^= 1
    assert translate(bytes(corrupt))[-2]["error"]["code"] == "502"


def test_truncated_stream_is_an_error() -> None:
    data = stream_of(corpus.case("plain").request)
    events = translate(data[:-5])
    assert events[-2]["error"]["message"] == "Bedrock stream ended before messageStop"
    assert events[-1] == "[DONE]"


def test_translator_usage() -> None:
    translator = ADAPTER.stream(chat(corpus.case("plain").request, stream=True), make_dep())
    assert translator is not None
    translator.feed(stream_of(corpus.case("plain").request))
    assert (translator.usage.prompt_tokens, translator.usage.completion_tokens) == (14, 7)
    assert translator.usage.cached_tokens == 2


def test_claude_45_temperature_with_top_p_is_400_or_top_p_dropped() -> None:
    model = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.2, "top_p": 0.5}
    with pytest.raises(GatewayError) as info:
        converse(body, make_dep(model))
    assert info.value.status == 400 and info.value.param == "top_p"
    sent = converse(body, make_dep(model, drop_params=True))
    assert sent["inferenceConfig"] == {"temperature": 0.2}
    assert mb.validate_converse(sent, model) == ""
    # Other families on Bedrock take both.
    sent = converse(body, make_dep("meta.llama3-1-70b-instruct-v1:0"))
    assert sent["inferenceConfig"] == {"temperature": 0.2, "topP": 0.5}
