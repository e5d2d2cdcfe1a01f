"""Fuzzing (issue 10, item 7): random and mutated OpenAI requests through the request
parser and every provider's request translation, random and mutated provider answers
through every response, error and stream translator. Nothing may raise but LLMux's own
`GatewayError` (which the client gets as an OpenAI-shaped error).

Deterministic and bounded by example count, not time: hypothesis with `derandomize=True`,
no example database, no deadline (CI is a loaded 2-core machine).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmux_extproc.control.config import Deployment, parse_config
from llmux_extproc.dataplane.gateway import parse_request
from llmux_extproc.errors import GatewayError
from llmux_extproc.providers.base import ClientRequest, StreamTranslator
from llmux_extproc.providers.openai import OpenAIStream
from llmux_extproc.providers.registry import adapter_for
from tests import corpus
from tests import mock_bedrock as mb
from tests.harness import openai_chat_completion

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_AWS = {
    "aws_access_key_id": mb.ACCESS_KEY,
    "aws_secret_access_key": mb.SECRET_KEY,
    "aws_region_name": mb.REGION,
}
# One deployment per wire format (and per model family where the format differs).
_LITELLM: dict[str, dict[str, Any]] = {
    "openai": {"model": "openai/gpt-4o", "api_key": "sk-fuzz"},
    "vllm": {"model": "hosted_vllm/llama", "api_base": "http://127.0.0.1:9/v1"},
    "azure": {
        "model": "azure/gpt-4o",
        "api_base": "https://fuzz.openai.azure.com",
        "api_version": "2024-10-21",
        "api_key": "azure-key",
    },
    "anthropic": {"model": "anthropic/claude-sonnet-4-5", "api_key": "sk-ant-fuzz"},
    "gemini": {"model": "gemini/gemini-2.5-flash", "api_key": "AIza-fuzz"},
    "vertex_gemini": {
        "model": "vertex_ai/gemini-2.5-flash",
        "vertex_project": "p",
        "vertex_location": "us-central1",
    },
    "vertex_claude": {
        "model": "vertex_ai/claude-sonnet-4-5",
        "vertex_project": "p",
        "vertex_location": "us-east5",
    },
    "bedrock_claude": {"model": "bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0", **_AWS},
    "bedrock_titan": {"model": "bedrock/amazon.titan-embed-text-v2:0", **_AWS},
    "mock": {"model": "mock/fuzz"},
}
DEPS: dict[str, Deployment] = {
    name: parse_config(
        yaml.safe_dump({"model_list": [{"model_name": "m", "litellm_params": params}]})
    ).deployments[0]
    for name, params in _LITELLM.items()
}

# Keys the translators look at, so random objects reach past the first type check.
_KEYS = [
    "model", "messages", "role", "content", "type", "text", "image_url", "url", "tools",
    "tool_choice", "function", "name", "arguments", "parameters", "tool_calls", "id",
    "tool_call_id", "stream", "stream_options", "include_usage", "temperature", "top_p",
    "max_tokens", "max_completion_tokens", "stop", "n", "response_format", "json_schema",
    "schema", "input", "reasoning_effort", "thinking", "cache_control", "choices", "delta",
    "usage", "candidates", "parts", "functionCall", "args", "finishReason", "usageMetadata",
    "output", "message", "toolUse", "input_tokens", "output_tokens", "stop_reason", "error",
    "embedding", "embeddings", "values", "data", "index", "encoding_format", "dimensions",
]  # fmt: skip
JSON: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=16,
)


def mutate(data: st.DataObject, value: Any, depth: int = 0) -> Any:
    """`value` with one place in it replaced by random JSON, a key dropped or added."""
    if isinstance(value, dict) and value and depth < 6:
        key = data.draw(st.sampled_from(sorted(value)))
        action = data.draw(st.sampled_from(["descend", "descend", "replace", "drop", "add"]))
        if action == "drop":
            return {k: v for k, v in value.items() if k != key}
        if action == "add":
            return {**value, data.draw(st.sampled_from(_KEYS)): data.draw(JSON)}
        new = mutate(data, value[key], depth + 1) if action == "descend" else data.draw(JSON)
        return {**value, key: new}
    if isinstance(value, list) and value and depth < 6:
        i = data.draw(st.integers(0, len(value) - 1))
        if data.draw(st.booleans()):
            return [*value[:i], mutate(data, value[i], depth + 1), *value[i + 1 :]]
        return [*value[:i], data.draw(JSON), *value[i + 1 :]]
    return data.draw(JSON)


def only_gateway_errors(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except GatewayError as err:
        assert 400 <= err.status < 600 and err.message
        orjson.loads(err.body())
        return None


# -- requests ------------------------------------------------------------------------------

CHAT_SEEDS = [{"model": "m", **c.request} for c in corpus.CASES] + [
    {"model": "m", **c.request, "stream": True, "stream_options": {"include_usage": True}}
    for c in corpus.CASES[:4]
]
EMBED_SEEDS: list[dict[str, Any]] = [
    {"model": "m", "input": "hello"},
    {"model": "m", "input": ["a", "b"], "dimensions": 8, "encoding_format": "float"},
]


def translate_everywhere(operation: str, raw: bytes) -> None:
    req = only_gateway_errors(parse_request, operation, raw)
    if req is None:
        return
    for dep in DEPS.values():
        adapter = adapter_for(dep.spec)
        if dep.provider == "mock":
            only_gateway_errors(adapter.answer, req, dep)  # type: ignore[attr-defined]
        elif adapter.ready(dep):  # signed too (SigV4 over the translated body)
            only_gateway_errors(adapter.request, req, dep)
        else:  # Vertex: an OAuth token would need the network
            only_gateway_errors(adapter.translate, req, dep)


@FUZZ
@given(st.sampled_from(["chat", "embeddings"]), st.binary(max_size=200))
def test_random_bytes_are_refused_cleanly(operation: str, raw: bytes) -> None:
    translate_everywhere(operation, raw)


@FUZZ
@given(st.sampled_from(["chat", "embeddings"]), st.dictionaries(st.sampled_from(_KEYS), JSON))
def test_random_json_requests(operation: str, body: dict[str, Any]) -> None:
    translate_everywhere(operation, orjson.dumps({"model": "m", **body}))


@settings(FUZZ, max_examples=400)
@given(st.data())
def test_mutated_openai_requests(data: st.DataObject) -> None:
    operation = data.draw(st.sampled_from(["chat", "chat", "chat", "embeddings"]))
    seed = data.draw(st.sampled_from(CHAT_SEEDS if operation == "chat" else EMBED_SEEDS))
    body = mutate(data, seed)
    if data.draw(st.booleans()):  # and mutations of mutations
        body = mutate(data, body)
    translate_everywhere(operation, orjson.dumps(body))


# -- answers -------------------------------------------------------------------------------

_ANTHROPIC = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude",
    "content": [
        {"type": "thinking", "thinking": "hm", "signature": "s"},
        {"type": "text", "text": "hi"},
        {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
    "usage": {"input_tokens": 3, "output_tokens": 2, "cache_read_input_tokens": 1},
}
_GEMINI = {
    "candidates": [
        {
            "content": {
                "role": "model",
                "parts": [{"text": "hi"}, {"functionCall": {"name": "f", "args": {"a": 1}}}],
            },
            "finishReason": "STOP",
        }
    ],
    "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5},
    "modelVersion": "gemini-2.5-flash",
    "responseId": "r1",
}
_CONVERSE = {
    "output": {
        "message": {
            "role": "assistant",
            "content": [
                {"text": "hi"},
                {"toolUse": {"toolUseId": "t1", "name": "f", "input": {"a": 1}}},
            ],
        }
    },
    "stopReason": "tool_use",
    "usage": {"inputTokens": 3, "outputTokens": 2, "totalTokens": 5},
}
_OPENAI_EMBED = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
    "model": "m",
    "usage": {"prompt_tokens": 1, "total_tokens": 1},
}
ANSWERS: dict[str, list[dict[str, Any]]] = {
    "openai": [openai_chat_completion("gpt-4o", "hi"), _OPENAI_EMBED],
    "anthropic": [_ANTHROPIC],
    "gemini": [
        _GEMINI,
        {"embeddings": [{"values": [0.1, 0.2]}]},
        {"embedding": {"values": [0.1]}},
    ],
    "bedrock": [_CONVERSE, {"embedding": [0.1, 0.2], "inputTextTokenCount": 2}],
}
FORMAT = {
    "openai": "openai",
    "vllm": "openai",
    "azure": "openai",
    "anthropic": "anthropic",
    "gemini": "gemini",
    "vertex_gemini": "gemini",
    "vertex_claude": "anthropic",
    "bedrock_claude": "bedrock",
    "bedrock_titan": "bedrock",
}
REQUESTS = {
    "chat": ClientRequest("chat", CHAT_SEEDS[0], orjson.dumps(CHAT_SEEDS[0]), "m"),
    "tools": ClientRequest(
        "chat",
        {"model": "m", **corpus.case("tool_call").request},
        orjson.dumps({"model": "m", **corpus.case("tool_call").request}),
        "m",
    ),
    "embeddings": ClientRequest("embeddings", EMBED_SEEDS[1], orjson.dumps(EMBED_SEEDS[1]), "m"),
}


@settings(FUZZ, max_examples=400)
@given(st.data())
def test_mutated_provider_answers(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(FORMAT)))
    dep, adapter = DEPS[name], adapter_for(DEPS[name].spec)
    req = REQUESTS[data.draw(st.sampled_from(sorted(REQUESTS)))]
    seed = data.draw(st.sampled_from(ANSWERS[FORMAT[name]]))
    body = orjson.dumps(mutate(data, seed))
    if data.draw(st.booleans()):
        only_gateway_errors(adapter.response, body, req, dep)
    else:
        # Errors are mapped, never raised: the client gets the mapped one.
        status = data.draw(st.sampled_from([400, 401, 403, 404, 408, 413, 429, 500, 502, 503]))
        err = adapter.error(status, body, dep)
        assert isinstance(err, GatewayError) and 400 <= err.status < 600
        orjson.loads(err.body())


@FUZZ
@given(st.sampled_from(sorted(FORMAT)), st.binary(max_size=300), st.integers(100, 599))
def test_random_provider_bytes(name: str, body: bytes, status: int) -> None:
    dep, adapter = DEPS[name], adapter_for(DEPS[name].spec)
    for req in REQUESTS.values():
        only_gateway_errors(adapter.response, body, req, dep)
    err = adapter.error(status if status >= 400 else 500, body, dep)
    assert isinstance(err, GatewayError)


# -- streams -------------------------------------------------------------------------------


def _sse(events: list[tuple[str | None, dict[str, Any]]]) -> list[bytes]:
    return [
        (f"event: {kind}\n" if kind else "").encode() + b"data: " + orjson.dumps(ev) + b"\n\n"
        for kind, ev in events
    ]


_ANTHROPIC_EVENTS: list[tuple[str | None, dict[str, Any]]] = [
    ("message_start", {"type": "message_start", "message": {**_ANTHROPIC, "content": []}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 4}}),
    ("message_stop", {"type": "message_stop"}),
]  # fmt: skip
_OPENAI_CHUNK = {
    "id": "c1",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "gpt-4o",
    "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}
    ],
}
STREAMS: dict[str, list[dict[str, Any]]] = {
    "anthropic": [ev for _, ev in _ANTHROPIC_EVENTS],
    "gemini": [_GEMINI, {**_GEMINI, "candidates": [{"content": {"parts": [{"text": "!"}]}}]}],
    "openai": [
        _OPENAI_CHUNK,
        {**_OPENAI_CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**_OPENAI_CHUNK, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
    ],
    "bedrock": [
        {"messageStart": {"role": "assistant"}},
        {"contentBlockDelta": {"contentBlockIndex": 0, "delta": {"text": "hi"}}},
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "end_turn"}},
        {"metadata": {"usage": {"inputTokens": 1, "outputTokens": 1, "totalTokens": 2}}},
    ],
}


def _encode(fmt: str, events: list[dict[str, Any]]) -> bytes:
    if fmt == "bedrock":
        pairs = [next(iter(ev.items())) for ev in events]
        return b"".join(mb.event(k, v if isinstance(v, dict) else {"v": v}) for k, v in pairs)
    if fmt == "anthropic":
        return b"".join(_sse([(str(ev.get("type")), ev) for ev in events]))
    return b"".join(_sse([(None, ev) for ev in events])) + (
        b"data: [DONE]\n\n" if fmt == "openai" else b""
    )


def _translator(name: str, req: ClientRequest) -> StreamTranslator:
    dep = DEPS[name]
    translator = adapter_for(dep.spec).stream(req, dep)
    return translator if translator is not None else OpenAIStream(True)


STREAM_REQ = ClientRequest("chat", {**CHAT_SEEDS[-1]}, orjson.dumps(CHAT_SEEDS[-1]), "m", True)


@settings(FUZZ, max_examples=300)
@given(st.data())
def test_mutated_provider_streams(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(n for n in FORMAT if n != "bedrock_titan")))
    fmt = FORMAT[name]
    events = list(STREAMS[fmt])
    i = data.draw(st.integers(0, len(events) - 1))
    mutated = mutate(data, events[i])
    if fmt == "bedrock" and not (isinstance(mutated, dict) and len(mutated) == 1):
        mutated = {data.draw(st.sampled_from(["contentBlockDelta", "metadata"])): mutated}
    if data.draw(st.booleans()) or not isinstance(mutated, dict):
        events[i] = mutated if isinstance(mutated, dict) else {"x": mutated}
    else:
        events.insert(i, mutated)
    raw = _encode(fmt, events)
    if data.draw(st.booleans()):  # a stream cut anywhere
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    translator = _translator(name, STREAM_REQ)
    start = 0
    for cut in [*cuts, len(raw)]:
        only_gateway_errors(translator.feed, raw[start:cut])
        start = cut
    only_gateway_errors(translator.finish)


@FUZZ
@given(st.sampled_from(sorted(n for n in FORMAT if n != "bedrock_titan")), st.binary(max_size=400))
def test_random_stream_bytes(name: str, raw: bytes) -> None:
    translator = _translator(name, STREAM_REQ)
    only_gateway_errors(translator.feed, raw[: len(raw) // 2])
    only_gateway_errors(translator.feed, raw[len(raw) // 2 :])
    only_gateway_errors(translator.finish)


def test_the_fuzz_targets_are_real() -> None:
    """The seeds translate without error: the fuzzing starts from requests and answers
    every translator takes, so a mutation that raises is a mutation's doing."""
    for seed in (corpus.case("plain").request, corpus.case("tool_call").request):
        req = parse_request("chat", orjson.dumps({"model": "m", **seed}))
        for name, dep in DEPS.items():
            adapter = adapter_for(dep.spec)
            if name in ("bedrock_titan",) or dep.provider == "mock":
                continue
            up = adapter.translate(req, dep)
            assert up.path
    for name, fmt in FORMAT.items():
        if name == "bedrock_titan":
            continue
        result = adapter_for(DEPS[name].spec).response(
            orjson.dumps(ANSWERS[fmt][0]), REQUESTS["tools"], DEPS[name]
        )
        assert result.usage.completion_tokens == (7 if fmt == "openai" else 2), name
        translator = _translator(name, STREAM_REQ)
        out = translator.feed(_encode(fmt, STREAMS[fmt])) + translator.finish()
        assert b"chat.completion.chunk" in out, name
    with pytest.raises(GatewayError):
        parse_request("chat", b"{")
