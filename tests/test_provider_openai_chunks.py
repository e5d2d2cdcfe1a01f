"""The OpenAI chunk writer's stream guarantees, and every translator ending a stream that
fails midway with an OpenAI error event followed by `data: [DONE]`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletionChunk

from llmux_extproc.control.config import Deployment, parse_config
from llmux_extproc.errors import GatewayError
from llmux_extproc.providers import anthropic, bedrock, gemini, vertex
from llmux_extproc.providers.base import ClientRequest, StreamTranslator
from llmux_extproc.providers.openai_chunks import DONE, ChunkWriter
from tests import mock_bedrock as mb

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def events(out: bytes) -> list[Any]:
    """Each SSE event's JSON payload, "[DONE]" for the terminator."""
    assert out.endswith(b"\n\n")
    parsed: list[Any] = []
    for block in out.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: ")
        payload = block[len(b"data: ") :]
        parsed.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return parsed


def writer(include_usage: bool = False) -> ChunkWriter:
    return ChunkWriter("chatcmpl-1", "m", 1_700_000_000, include_usage=include_usage)


# -- the writer --------------------------------------------------------------------------------


def test_role_comes_first_whatever_is_written_first() -> None:
    firsts: list[Callable[[ChunkWriter], bytes]] = [
        lambda w: w.content("hi"),
        lambda w: w.reasoning("think"),
        lambda w: w.tool_call_start(0, "call_1", "f"),
        lambda w: w.finish("stop"),
        lambda w: w.delta({"thinking_blocks": []}),
    ]
    for first in firsts:
        w = writer()
        chunk = events(first(w))[0]
        assert chunk["choices"][0]["delta"]["role"] == "assistant"
        assert "role" not in events(w.content("more"))[0]["choices"][0]["delta"]


def test_role_chunk_once_and_per_choice() -> None:
    w = writer()
    assert events(w.role())[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert w.role() == b""
    assert events(w.content("x", index=1))[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "x",
    }
    assert w.started(0) and w.started(1) and not w.started(2)


def test_chunks_are_valid_openai_chunks() -> None:
    w = writer(include_usage=True)
    out = (
        w.role()
        + w.content("Hel")
        + w.reasoning("hmm")
        + w.tool_call_start(0, "call_1", "get_weather")
        + w.tool_call_arguments(0, '{"city"')
        + w.tool_call_arguments(0, ': "Paris"}')
        + w.finish("tool_calls")
        + w.done(USAGE)
    )
    parsed = events(out)
    assert parsed[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in parsed[:-1]]
    assert {c.id for c in chunks} == {"chatcmpl-1"}
    assert all(c.object == "chat.completion.chunk" and c.created == 1_700_000_000 for c in chunks)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].id == "call_1" and calls[0].function is not None
    assert "".join(tc.function.arguments or "" for tc in calls if tc.function) == (
        '{"city": "Paris"}'
    )


def test_one_finish_reason_per_choice() -> None:
    w = writer()
    w.role()
    assert events(w.finish("length"))[0]["choices"][0]["finish_reason"] == "length"
    assert w.finish("stop") == b""
    assert w.finished(0) and not w.finished(1)
    assert events(w.finish("stop", index=1))[0]["choices"][0]["index"] == 1


def test_usage_chunk_is_last_before_done_and_only_when_asked() -> None:
    w = writer(include_usage=True)
    parsed = events(w.content("a") + w.finish("stop") + w.done(USAGE))
    assert [e == "[DONE]" for e in parsed] == [False, False, False, True]
    assert all(e["usage"] is None for e in parsed[:2])  # as OpenAI: null until the last
    assert parsed[2]["choices"] == [] and parsed[2]["usage"] == USAGE
    w = writer()
    parsed = events(w.content("a") + w.finish("stop") + w.done(USAGE))
    assert parsed[-1] == "[DONE]" and all(e["choices"] and "usage" not in e for e in parsed[:-1])


def test_error_is_followed_by_done_and_then_nothing() -> None:
    w = writer(include_usage=True)
    w.content("partial")
    out = w.error(GatewayError(429, "slow down", code="rate_limit_exceeded"))
    parsed = events(out)
    assert parsed[0]["error"]["message"] == "slow down"
    assert parsed[0]["error"]["code"] == "rate_limit_exceeded"
    assert parsed[1:] == ["[DONE]"]
    assert w.closed
    for after in (
        w.content("x"),
        w.role(1),
        w.finish("stop"),
        w.tool_call_arguments(0, "{}"),
        w.done(USAGE),  # no usage chunk after an error
        w.error(GatewayError(500, "again")),
    ):
        assert after == b""


def test_nothing_after_done() -> None:
    w = writer()
    assert w.done() == DONE
    assert w.content("late") == b"" and w.done() == b"" and w.error(GatewayError(500, "x")) == b""


def test_empty_deltas_write_nothing_once_started() -> None:
    w = writer()
    w.role()
    assert w.content("") == b"" and w.reasoning("") == b"" and w.delta({}) == b""
    assert w.tool_call_arguments(0, "") == b""


def test_id_and_model_may_change_before_the_first_chunk() -> None:
    w = writer()
    w.id, w.model = "msg_42", "real-model"
    chunk = events(w.role())[0]
    assert (chunk["id"], chunk["model"]) == ("msg_42", "real-model")


# -- every translator: an upstream error mid-stream ----------------------------------------------


def _config_dep(litellm: dict[str, Any]) -> Deployment:
    config = {"model_list": [{"model_name": "m", "litellm_params": litellm}]}
    return parse_config(orjson.dumps(config).decode()).deployments[0]


def _chat(stream_options: dict[str, Any] | None = None) -> ClientRequest:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body["stream"] = True
    if stream_options is not None:
        body["stream_options"] = stream_options
    return ClientRequest("chat", body, orjson.dumps(body), "m", True)


def _sse(name: str | None, data: dict[str, Any]) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


ANTHROPIC_FAILS = [
    _sse("message_start", {"type": "message_start", "message": {"id": "msg_1", "usage": {}}}),
    _sse(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
    ),
    _sse(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    ),
    _sse(
        "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    ),
    _sse("ping", {"type": "ping"}),  # nothing after the error reaches the client
]
GEMINI_FAILS = [
    _sse(None, {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hi"}]}}]}),
    _sse(None, {"error": {"code": 503, "message": "Overloaded", "status": "UNAVAILABLE"}}),
    _sse(None, {"candidates": [{"content": {"parts": [{"text": "late"}]}}]}),
]
BEDROCK_FAILS = [
    mb.event("messageStart", {"role": "assistant"}),
    mb.event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hi"}}),
    mb.exception("serviceUnavailableException", "Overloaded"),
    mb.event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "late"}}),
]


def _translators() -> list[tuple[str, StreamTranslator, list[bytes]]]:
    req = _chat({"include_usage": True})
    key = {"api_key": "k"}
    anthropic_dep = _config_dep({"model": "anthropic/claude-x", **key})
    gemini_dep = _config_dep({"model": "gemini/gemini-2.5-flash", **key})
    bedrock_dep = _config_dep(
        {"model": "bedrock/anthropic.claude-x", "aws_region_name": "us-west-2"}
    )
    vertex_params = {"vertex_project": "p", "vertex_location": "us-central1"}
    vertex_gemini = _config_dep({"model": "vertex_ai/gemini-2.5-flash", **vertex_params})
    vertex_claude = _config_dep({"model": "vertex_ai/claude-sonnet-4", **vertex_params})
    made = [
        ("anthropic", anthropic.ADAPTER.stream(req, anthropic_dep), ANTHROPIC_FAILS),
        ("gemini", gemini.ADAPTER.stream(req, gemini_dep), GEMINI_FAILS),
        ("bedrock", bedrock.ADAPTER.stream(req, bedrock_dep), BEDROCK_FAILS),
        ("vertex-gemini", vertex.ADAPTER.stream(req, vertex_gemini), GEMINI_FAILS),
        ("vertex-claude", vertex.ADAPTER.stream(req, vertex_claude), ANTHROPIC_FAILS),
    ]
    out = []
    for name, translator, pieces in made:
        assert translator is not None, name
        out.append((name, translator, pieces))
    return out


@pytest.mark.parametrize("split", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("index", range(5), ids=lambda i: _translators()[i][0])
def test_upstream_error_mid_stream_ends_with_error_then_done(index: int, split: bool) -> None:
    name, translator, pieces = _translators()[index]
    data = b"".join(pieces)
    chunks = [data[i : i + 1] for i in range(len(data))] if split else pieces
    out = b"".join(translator.feed(c) for c in chunks) + translator.finish()
    parsed = events(out)
    assert parsed[-1] == "[DONE]" and parsed.count("[DONE]") == 1, name
    error = parsed[-2]["error"]
    assert error["message"] == "Overloaded" and error["type"].endswith("_error")
    # What came before the failure reached the client, role first; no usage chunk after it.
    content = [ChatCompletionChunk.model_validate(e) for e in parsed[:-2]]
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content if c.choices) == "Hi"
    assert all(c.choices for c in content)
    assert translator.feed(b"more") == b"" and translator.finish() == b""
