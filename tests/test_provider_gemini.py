"""Gemini translation without a network: every corpus case, responses, usage, errors, streams.

Translated bodies are checked by tests.mock_gemini.validate_generate_request (the google-genai
SDK's pydantic types, which forbid unknown fields, plus Gemini's rules they cannot express);
translated answers are parsed with the openai SDK's own response types.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llmux_extproc.control.config import Deployment, parse_config
from llmux_extproc.errors import GatewayError
from llmux_extproc.providers import gemini
from llmux_extproc.providers.base import ClientRequest
from tests import mock_gemini
from tests.corpus import CASES, PNG_B64, WEATHER_TOOL, Case, case

Json = dict[str, Any]


def deployment(model: str = "gemini-2.5-flash", **params: Any) -> Deployment:
    litellm = {"model": f"gemini/{model}", "api_key": "k-123", **params}
    config = parse_config(
        orjson.dumps({"model_list": [{"model_name": "g", "litellm_params": litellm}]}).decode()
    )
    return config.deployments[0]


def chat(body: Json, stream: bool = False) -> ClientRequest:
    full = {"model": "g", **body, **({"stream": True} if stream else {})}
    return ClientRequest("chat", full, orjson.dumps(full), "g", stream)


def translate(body: Json, dep: Deployment | None = None) -> Json:
    result = gemini.to_gemini_body(chat(body), dep or deployment())
    problems = mock_gemini.validate_generate_request(result)
    assert not problems, problems
    return result


def roundtrip(body: Json, dep: Deployment | None = None) -> tuple[ChatCompletion, Json]:
    """Translate, answer as the mock Gemini would, translate back, parse with the SDK."""
    dep = dep or deployment()
    req = chat(body)
    answer = mock_gemini.generate(translate(body, dep), dep.model)
    result = gemini.ADAPTER.response(orjson.dumps(answer), req, dep)
    assert result.body is not None
    return ChatCompletion.model_validate_json(result.body), answer


# -- every corpus case ------------------------------------------------------------------------


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_corpus_case_translates_and_answers(c: Case) -> None:
    if c.unsupported_param:
        with pytest.raises(GatewayError) as info:
            gemini.to_gemini_body(chat(c.request), deployment())
        assert info.value.status == 400 and info.value.param == c.unsupported_param
        assert c.unsupported_param in info.value.message
        # drop_params: the parameter is dropped and the request goes through.
        body = translate(c.request, deployment(drop_params=True))
        assert "logit_bias" not in orjson.dumps(body).decode()
        return
    completion, answer = roundtrip(c.request)
    choice = completion.choices[0]
    assert choice.finish_reason == c.expect_finish
    assert len(choice.message.tool_calls or []) == c.expect_tool_calls
    if not c.expect_tool_calls:
        assert choice.message.content
    usage = answer["usageMetadata"]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == usage["promptTokenCount"]
    assert completion.usage.completion_tokens == usage["candidatesTokenCount"] + usage.get(
        "thoughtsTokenCount", 0
    )


def test_system_and_sampling_parameters() -> None:
    body = translate(case("system").request)
    assert body["systemInstruction"] == {"parts": [{"text": "You are terse."}]}
    assert body["contents"] == [{"role": "user", "parts": [{"text": "Say hello"}]}]
    assert body["generationConfig"] == {
        "temperature": 0.2,
        "topP": 0.9,
        "maxOutputTokens": 64,
        "stopSequences": ["\n\n"],
    }


def test_developer_message_and_max_completion_tokens() -> None:
    body = translate(case("developer").request)
    assert body["systemInstruction"]["parts"] == [{"text": "Answer in French."}]
    assert body["generationConfig"] == {"maxOutputTokens": 50}


def test_multi_turn_roles() -> None:
    body = translate(case("multi_turn").request)
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]


def test_inline_image() -> None:
    body = translate(case("image").request)
    parts = body["contents"][0]["parts"]
    assert parts[1] == {"inlineData": {"mimeType": "image/png", "data": PNG_B64}}


def test_tools_and_tool_choice() -> None:
    body = translate(case("tool_call").request)
    declaration = body["tools"][0]["functionDeclarations"][0]
    assert declaration == {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "OBJECT",
            "properties": {"city": {"type": "STRING"}},
            "required": ["city"],
        },
    }
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
        (
            {
                "type": "allowed_tools",
                "allowed_tools": {"mode": "required", "tools": [WEATHER_TOOL]},
            },
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
def test_tool_choice_modes(choice: Any, expected: Json) -> None:
    body = translate({**case("tool_call").request, "tool_choice": choice})
    assert body["toolConfig"]["functionCallingConfig"] == expected


def test_tool_results_recover_function_names_and_merge() -> None:
    body = translate(case("tool_results").request)
    roles = [c["role"] for c in body["contents"]]
    assert roles == ["user", "model", "user"]
    calls, results = body["contents"][1]["parts"], body["contents"][2]["parts"]
    assert [p["functionCall"] for p in calls] == [
        {"name": "get_weather", "args": {"city": "Paris"}},
        {"name": "get_time", "args": {"city": "Paris"}},
    ]
    assert [p["functionResponse"] for p in results] == [
        {"name": "get_weather", "response": {"output": "18C, sunny"}},
        {"name": "get_time", "response": {"output": "14:05"}},
    ]


def test_tool_result_json_object_is_passed_as_response() -> None:
    messages = [*case("tool_results").request["messages"][:2]]
    messages.append({"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'})
    messages.append(
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "14:05"}]}
    )
    messages.append({"role": "user", "content": "Thanks. And tomorrow?"})
    body = translate({"messages": messages})
    last = body["contents"][-1]
    assert last["role"] == "user"
    assert last["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"temp": 18}}},
        {"functionResponse": {"name": "get_time", "response": {"output": "14:05"}}},
        {"text": "Thanks. And tomorrow?"},
    ]


def test_unknown_tool_call_id_is_a_400() -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "tool", "tool_call_id": "call_nowhere", "content": "x"},
    ]
    with pytest.raises(GatewayError) as info:
        gemini.to_gemini_body(chat({"messages": messages}), deployment())
    assert info.value.status == 400 and info.value.param == "messages[1].tool_call_id"


def test_consecutive_same_roles_merge() -> None:
    body = translate(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "c"},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": "d"},
            ]
        }
    )
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "a"}, {"text": "b"}]},
        {"role": "model", "parts": [{"text": "c"}]},
        {"role": "user", "parts": [{"text": "d"}]},
    ]


def test_system_only_prompt_becomes_the_user_turn() -> None:
    body = translate({"messages": [{"role": "system", "content": "Tell a joke."}]})
    assert body["contents"] == [{"role": "user", "parts": [{"text": "Tell a joke."}]}]
    assert "systemInstruction" not in body


def test_http_image_url_is_a_400_but_gcs_is_file_data() -> None:
    def image(url: str) -> Json:
        part = {"type": "image_url", "image_url": {"url": url}}
        return {"messages": [{"role": "user", "content": [part]}]}

    with pytest.raises(GatewayError) as info:
        gemini.to_gemini_body(chat(image("https://example.com/cat.png")), deployment())
    assert info.value.status == 400 and "data URL" in info.value.message
    body = translate(image("gs://bucket/cat.png"))
    assert body["contents"][0]["parts"] == [
        {"fileData": {"fileUri": "gs://bucket/cat.png", "mimeType": "image/png"}}
    ]
    files_api = "https://generativelanguage.googleapis.com/v1beta/files/abc123"
    body = translate(image(files_api))
    assert body["contents"][0]["parts"] == [{"fileData": {"fileUri": files_api}}]


def test_audio_and_file_parts() -> None:
    content = [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {
            "type": "file",
            "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"},
        },
        {"type": "file", "file": {"file_data": "JVBERi0=", "filename": "b.pdf"}},
    ]
    body = translate({"messages": [{"role": "user", "content": content}]})
    assert body["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
    ]


def test_json_object_and_schema() -> None:
    assert translate(case("json_object").request)["generationConfig"] == {
        "responseMimeType": "application/json"
    }
    config = translate(case("json_schema").request)["generationConfig"]
    assert config == {
        "responseMimeType": "application/json",
        "responseSchema": {
            "type": "OBJECT",
            "properties": {"name": {"type": "STRING"}, "age": {"type": "INTEGER"}},
            "required": ["name", "age"],
            "propertyOrdering": ["name", "age"],
        },
    }
    completion, _ = roundtrip(case("json_schema").request)
    assert orjson.loads(completion.choices[0].message.content or "") == {"name": "Ada", "age": 36}


def test_reasoning_effort_and_thoughts() -> None:
    config = translate(case("reasoning").request)["generationConfig"]
    assert config == {
        "maxOutputTokens": 4000,
        "thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": True},
    }
    completion, _ = roundtrip(case("reasoning").request)
    message = completion.choices[0].message
    assert message.content == mock_gemini.TEXT
    assert (message.model_extra or {})["reasoning_content"] == mock_gemini.THOUGHT
    assert completion.usage is not None and completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens == 12
    with pytest.raises(GatewayError):
        gemini.to_gemini_body(
            chat({**case("reasoning").request, "reasoning_effort": "max"}), deployment()
        )


def test_sampling_extras() -> None:
    config = translate(
        {
            **case("sampling_extras").request,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.1,
            "n": 2,
        }
    )["generationConfig"]
    assert config == {
        "seed": 7,
        "candidateCount": 2,
        "presencePenalty": 0.5,
        "frequencyPenalty": 0.1,
    }
    completion, _ = roundtrip({**case("plain").request, "n": 2})
    assert [c.index for c in completion.choices] == [0, 1]


@pytest.mark.parametrize(
    ("param", "value"),
    [("logprobs", True), ("top_logprobs", 3), ("audio", {"voice": "x"}), ("modalities", ["audio"])],
)
def test_unsupported_parameters(param: str, value: Any) -> None:
    with pytest.raises(GatewayError) as info:
        gemini.to_gemini_body(chat({**case("plain").request, param: value}), deployment())
    assert info.value.param == param
    translate({**case("plain").request, param: value}, deployment(drop_params=True))


def test_harmless_openai_fields_are_accepted() -> None:
    translate(
        {**case("plain").request, "user": "u", "logprobs": False, "store": False, "metadata": {}}
    )


# -- schemas ----------------------------------------------------------------------------------


def test_schema_conversion_strips_inlines_and_nulls() -> None:
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "additionalProperties": False,
        "$defs": {"Unit": {"type": "string", "enum": ["C", "F"], "description": "unit"}},
        "properties": {
            "city": {"type": "string", "format": "uri", "minLength": 1},
            "unit": {"$ref": "#/$defs/Unit"},
            "when": {"type": ["string", "null"], "format": "date-time"},
            "days": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
            "tags": {"type": "array", "items": {"type": "string", "const": "x"}},
        },
        "required": ["city", "ghost"],
    }
    assert gemini.to_gemini_schema(schema) == {
        "type": "OBJECT",
        "properties": {
            "city": {"type": "STRING", "minLength": 1},
            "unit": {"type": "STRING", "enum": ["C", "F"], "description": "unit"},
            "when": {"type": "STRING", "nullable": True, "format": "date-time"},
            "days": {"type": "INTEGER", "nullable": True, "default": None},
            "tags": {"type": "ARRAY", "items": {"type": "STRING", "enum": ["x"]}},
        },
        "required": ["city"],
    }


def test_recursive_schema_falls_back_to_json_schema() -> None:
    tree = {
        "type": "object",
        "properties": {"children": {"type": "array", "items": {"$ref": "#"}}},
        "$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}},
    }
    node = {"$ref": "#/$defs/Node", "$defs": tree["$defs"]}
    tool = {
        "type": "function",
        "function": {
            "name": "walk",
            "parameters": {"type": "object", "properties": {"n": node}, "$defs": tree["$defs"]},
        },
    }
    body = translate({"messages": [{"role": "user", "content": "x"}], "tools": [tool]})
    declaration = body["tools"][0]["functionDeclarations"][0]
    assert "parameters" not in declaration
    assert declaration["parametersJsonSchema"]["$defs"] == tree["$defs"]
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": {**node, "strict": True}}}
    config = translate({"messages": [{"role": "user", "content": "x"}], "response_format": fmt})[
        "generationConfig"
    ]
    assert config["responseJsonSchema"] == node


def test_function_without_parameters_is_declared_without_them() -> None:
    tool = {
        "type": "function",
        "function": {"name": "now", "parameters": {"type": "object", "properties": {}}},
    }
    body = translate({"messages": [{"role": "user", "content": "x"}], "tools": [tool]})
    assert body["tools"] == [{"functionDeclarations": [{"name": "now"}]}]


def test_non_function_tools_are_rejected_native_ones_passed() -> None:
    with pytest.raises(GatewayError):
        gemini.to_gemini_body(
            chat(
                {
                    "messages": [{"role": "user", "content": "x"}],
                    "tools": [{"type": "custom", "custom": {}}],
                }
            ),
            deployment(),
        )
    body = translate(
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [WEATHER_TOOL, {"googleSearch": {}}],
        }
    )
    assert body["tools"][1] == {"googleSearch": {}}


# -- responses ----------------------------------------------------------------------------------


def test_tool_call_ids_are_stable_and_carry_the_thought_signature() -> None:
    first, _ = roundtrip(case("parallel_tools").request)
    again, _ = roundtrip(case("parallel_tools").request)
    calls = first.choices[0].message.tool_calls or []
    assert [c.id for c in calls] == [c.id for c in again.choices[0].message.tool_calls or []]
    assert len({c.id for c in calls}) == 2
    assert calls[0].id.endswith(gemini.SIGNATURE_MARK + mock_gemini.SIGNATURE)
    assert gemini.SIGNATURE_MARK not in calls[1].id
    assert orjson.loads(calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    # The client sends the call back: the signature returns to its functionCall part.
    history = [
        *case("parallel_tools").request["messages"],
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        *[{"role": "tool", "tool_call_id": c.id, "content": "ok"} for c in calls],
    ]
    body = translate({"messages": history, "tools": case("parallel_tools").request["tools"]})
    model_parts = body["contents"][1]["parts"]
    assert model_parts[0]["thoughtSignature"] == mock_gemini.SIGNATURE
    assert "thoughtSignature" not in model_parts[1]
    assert [p["functionResponse"]["name"] for p in body["contents"][2]["parts"]] == [
        "get_weather",
        "get_time",
    ]


def test_parallel_tool_calls_false_keeps_one_call() -> None:
    completion, _ = roundtrip({**case("parallel_tools").request, "parallel_tool_calls": False})
    assert len(completion.choices[0].message.tool_calls or []) == 1


@pytest.mark.parametrize(
    ("reason", "calls", "expected"),
    [
        ("STOP", False, "stop"),
        ("STOP", True, "tool_calls"),
        ("MAX_TOKENS", False, "length"),
        ("SAFETY", False, "content_filter"),
        ("RECITATION", False, "content_filter"),
        ("BLOCKLIST", False, "content_filter"),
        ("PROHIBITED_CONTENT", False, "content_filter"),
        ("SPII", False, "content_filter"),
        ("MALFORMED_FUNCTION_CALL", False, "stop"),
        ("FINISH_REASON_UNSPECIFIED", False, None),
    ],
)
def test_finish_reasons(reason: str, calls: bool, expected: str | None) -> None:
    assert gemini.finish_reason(reason, calls) == expected


def test_usage_mapping() -> None:
    usage = gemini.gemini_usage(
        {
            "promptTokenCount": 100,
            "cachedContentTokenCount": 60,
            "toolUsePromptTokenCount": 5,
            "candidatesTokenCount": 20,
            "thoughtsTokenCount": 30,
            "totalTokenCount": 155,
        }
    )
    assert (usage.prompt_tokens, usage.completion_tokens) == (105, 50)
    assert (usage.cached_tokens, usage.reasoning_tokens) == (60, 30)
    assert usage.to_openai() == {
        "prompt_tokens": 105,
        "completion_tokens": 50,
        "total_tokens": 155,
        "prompt_tokens_details": {"cached_tokens": 60},
        "completion_tokens_details": {"reasoning_tokens": 30},
    }


def test_safety_block_in_a_200_is_a_content_policy_400() -> None:
    answer = mock_gemini.trigger_error("TRIGGER_BLOCK")
    with pytest.raises(GatewayError) as info:
        gemini.ADAPTER.response(orjson.dumps(answer), chat(case("plain").request), deployment())
    err = info.value
    assert (err.status, err.code) == (400, "content_policy_violation")
    assert "SAFETY" in err.message


def test_candidate_stopped_by_safety_has_content_filter() -> None:
    answer = {
        "candidates": [{"finishReason": "SAFETY", "index": 0}],
        "usageMetadata": {"promptTokenCount": 3},
    }
    result = gemini.ADAPTER.response(
        orjson.dumps(answer), chat(case("plain").request), deployment()
    )
    completion = ChatCompletion.model_validate_json(result.body or b"")
    assert completion.choices[0].finish_reason == "content_filter"
    assert completion.choices[0].message.content == ""


@pytest.mark.parametrize("body", [b"not json", b"[1]", b'{"candidates": []}'])
def test_unusable_answers_are_502(body: bytes) -> None:
    with pytest.raises(GatewayError) as info:
        gemini.ADAPTER.response(body, chat(case("plain").request), deployment())
    assert info.value.status == 502


# -- errors ------------------------------------------------------------------------------------


def google_body(code: int, status: str, message: str, reason: str | None = None) -> bytes:
    return bytes(mock_gemini.GoogleError(code, status, message, reason).response().body)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "status", "expected_status", "expected_type"),
    [
        (400, "INVALID_ARGUMENT", 400, "invalid_request_error"),
        (401, "UNAUTHENTICATED", 401, "authentication_error"),
        (403, "PERMISSION_DENIED", 403, "permission_error"),
        (404, "NOT_FOUND", 404, "not_found_error"),
        (429, "RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
        (500, "INTERNAL", 500, "api_error"),
        (503, "UNAVAILABLE", 503, "service_unavailable_error"),
        (504, "DEADLINE_EXCEEDED", 504, "timeout_error"),
    ],
)
def test_google_errors_map_to_openai(
    code: int, status: str, expected_status: int, expected_type: str
) -> None:
    err = gemini.ADAPTER.error(code, google_body(code, status, f"boom {status}"), deployment())
    assert (err.status, err.type, err.message) == (expected_status, expected_type, f"boom {status}")
    if status == "RESOURCE_EXHAUSTED":
        assert err.code == "rate_limit_exceeded"


def test_bad_api_key_is_401_and_context_overflow_has_its_code() -> None:
    body = google_body(400, "INVALID_ARGUMENT", "API key not valid.", "API_KEY_INVALID")
    err = gemini.ADAPTER.error(400, body, deployment())
    assert (err.status, err.code) == (401, "invalid_api_key")
    context = mock_gemini.trigger_error("TRIGGER_CONTEXT")
    assert isinstance(context, mock_gemini.GoogleError)
    err = gemini.ADAPTER.error(
        400, google_body(400, "INVALID_ARGUMENT", context.message), deployment()
    )
    assert (err.status, err.code, err.message) == (400, "context_length_exceeded", context.message)


def test_error_in_list_form_and_plain_text() -> None:
    wrapped = b"[" + google_body(429, "RESOURCE_EXHAUSTED", "quota") + b"]"
    assert gemini.ADAPTER.error(429, wrapped, deployment()).message == "quota"
    err = gemini.ADAPTER.error(502, b"upstream connect error", deployment())
    assert (err.status, err.message) == (502, "upstream connect error")


# -- streaming --------------------------------------------------------------------------------


def stream_case(c: Case) -> tuple[ClientRequest, bytes, Json]:
    req = chat({**c.request, "stream_options": {"include_usage": True}}, stream=True)
    body = gemini.to_gemini_body(req, deployment())
    answer = mock_gemini.generate(body, "gemini-2.5-flash")
    return req, mock_gemini.sse(mock_gemini.stream_events(answer)), answer


def run_stream(req: ClientRequest, pieces: list[bytes]) -> tuple[bytes, gemini.GeminiStream]:
    translator = gemini.GeminiStream(req, deployment())
    translator.chunks.created = 1_700_000_000  # the only wall-clock value in the output
    out = b"".join(translator.feed(p) for p in pieces) + translator.finish()
    return out, translator


def chunks(out: bytes) -> list[ChatCompletionChunk]:
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    return [ChatCompletionChunk.model_validate_json(e[len(b"data: ") :]) for e in events[:-1]]


STREAM_CASES = [c for c in CASES if not c.unsupported_param]


@pytest.mark.parametrize("c", STREAM_CASES, ids=lambda c: c.name)
def test_stream_matches_the_unstreamed_answer(c: Case) -> None:
    req, raw, answer = stream_case(c)
    out, translator = run_stream(req, [raw])
    parsed = chunks(out)
    assert parsed[0].choices[0].delta.role == "assistant"
    content = "".join(ch.choices[0].delta.content or "" for ch in parsed if ch.choices)
    reasoning = "".join(
        (ch.choices[0].delta.model_extra or {}).get("reasoning_content", "")
        for ch in parsed
        if ch.choices
    )
    calls = [tc for ch in parsed if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    finishes = [
        ch.choices[0].finish_reason for ch in parsed if ch.choices and ch.choices[0].finish_reason
    ]
    unstreamed, _ = roundtrip(c.request)
    message = unstreamed.choices[0].message
    assert content == (message.content or "")
    assert reasoning == (message.model_extra or {}).get("reasoning_content", "")
    assert [(t.index, t.id, t.function.name, t.function.arguments) for t in calls] == [  # type: ignore[union-attr]
        (i, t.id, t.function.name, t.function.arguments)  # type: ignore[union-attr]
        for i, t in enumerate(message.tool_calls or [])
    ]
    assert finishes == [c.expect_finish]
    assert parsed[-2].choices[0].finish_reason == c.expect_finish  # finish reason, then usage
    assert parsed[-1].choices == [] and parsed[-1].usage is not None
    assert parsed[-1].usage.prompt_tokens == answer["usageMetadata"]["promptTokenCount"]
    assert translator.usage.prompt_tokens == answer["usageMetadata"]["promptTokenCount"]
    assert len({ch.id for ch in parsed}) == 1


@pytest.mark.parametrize("name", ["plain", "parallel_tools", "reasoning"])
def test_stream_split_at_every_byte_gives_identical_output(name: str) -> None:
    req, raw, _ = stream_case(case(name))
    whole, _ = run_stream(req, [raw])
    for cut in range(1, len(raw)):
        split, _ = run_stream(req, [raw[:cut], raw[cut:]])
        assert split == whole, f"split at byte {cut}"
    bytewise, _ = run_stream(req, [raw[i : i + 1] for i in range(len(raw))])
    assert bytewise == whole


def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    req = chat(case("plain").request, stream=True)
    answer = mock_gemini.generate(gemini.to_gemini_body(req, deployment()), "m")
    out, translator = run_stream(req, [mock_gemini.sse(mock_gemini.stream_events(answer))])
    assert all(ch.choices for ch in chunks(out))
    assert translator.usage.completion_tokens == 7


def test_stream_error_event_and_blocked_prompt() -> None:
    req = chat(case("plain").request, stream=True)
    error = (
        b'data: {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}\n\n'
    )
    out, _ = run_stream(req, [error])
    events = out.split(b"\n\n")
    payload = orjson.loads(events[0][len(b"data: ") :])
    assert (
        payload["error"]["message"] == "quota" and payload["error"]["code"] == "rate_limit_exceeded"
    )
    assert events[1] == b"data: [DONE]"
    blocked = mock_gemini.sse(iter([mock_gemini.trigger_error("TRIGGER_BLOCK")]))  # type: ignore[list-item]
    out, _ = run_stream(req, [blocked])
    assert orjson.loads(out.split(b"\n\n")[0][6:])["error"]["code"] == "content_policy_violation"


def test_stream_cut_short_reports_an_error() -> None:
    req, raw, _ = stream_case(case("plain"))
    first_event = raw.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    out, _ = run_stream(req, [first_event])
    assert b'"error"' in out and out.endswith(b"data: [DONE]\n\n")


def test_stream_of_a_plain_json_error_body() -> None:
    req = chat(case("plain").request, stream=True)
    out, _ = run_stream(req, [google_body(400, "INVALID_ARGUMENT", "bad request")])
    assert orjson.loads(out.split(b"\n\n")[0][6:])["error"]["message"] == "bad request"


# -- requests and embeddings ------------------------------------------------------------------


def test_request_path_and_key_header() -> None:
    dep = deployment()
    up = gemini.ADAPTER.request(chat(case("plain").request), dep)
    assert up.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert up.headers["x-goog-api-key"] == "k-123"
    streamed = gemini.ADAPTER.request(chat(case("plain").request, stream=True), dep)
    assert streamed.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert gemini.ADAPTER.stream(chat(case("plain").request), dep) is None
    proxied = deployment(api_base="https://proxy.example/google/v1beta")
    assert gemini.ADAPTER.request(chat(case("plain").request), proxied).path == (
        "/google/v1beta/models/gemini-2.5-flash:generateContent"
    )


def embeddings_request(body: Json) -> ClientRequest:
    full = {"model": "g", **body}
    return ClientRequest("embeddings", full, orjson.dumps(full), "g")


def test_batch_embeddings_roundtrip_with_base64() -> None:
    dep = deployment("gemini-embedding-001")
    req = embeddings_request(
        {"input": ["hello world", "bye"], "dimensions": 4, "encoding_format": "base64"}
    )
    up = gemini.ADAPTER.request(req, dep)
    assert up.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    sent = orjson.loads(up.body or b"")
    assert sent["requests"][0] == {
        "model": "models/gemini-embedding-001",
        "content": {"parts": [{"text": "hello world"}]},
        "outputDimensionality": 4,
    }
    answer = {"embeddings": [{"values": mock_gemini.vector(t, 4)} for t in ("hello world", "bye")]}
    result = gemini.ADAPTER.response(orjson.dumps(answer), req, dep)
    assert result.usage.estimated and result.usage.prompt_tokens == 3
    raw = orjson.loads(result.body or b"")
    decoded = struct.unpack("<4f", base64.b64decode(raw["data"][1]["embedding"]))
    assert decoded == pytest.approx(mock_gemini.vector("bye", 4))
    # What the openai SDK builds once it has decoded the base64 vectors.
    for item in raw["data"]:
        item["embedding"] = list(struct.unpack("<4f", base64.b64decode(item["embedding"])))
    parsed = CreateEmbeddingResponse.model_validate(raw)
    assert parsed.usage.prompt_tokens == 3 and len(parsed.data) == 2


def test_embeddings_reject_token_input() -> None:
    with pytest.raises(GatewayError) as info:
        gemini.ADAPTER.request(embeddings_request({"input": [[1, 2, 3]]}), deployment())
    assert info.value.param == "input"


def test_web_search_options_become_google_search() -> None:
    body = translate({**case("plain").request, "web_search_options": {}})
    assert body["tools"] == [{"googleSearch": {}}]
    body = translate({**case("tool_call").request, "web_search_options": {}})
    assert body["tools"][1] == {"googleSearch": {}}
