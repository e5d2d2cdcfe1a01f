"""A streamed answer put back together, to compare with the same request made whole."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from openai.types.chat import ChatCompletion, ChatCompletionChunk


@dataclass
class Assembled:
    role: str | None = None
    content: str = ""
    reasoning: str = ""
    tool_calls: dict[int, dict[str, str]] = field(default_factory=dict)
    finish_reasons: list[str] = field(default_factory=list)
    usage: Any = None
    usage_chunks: int = 0


def assemble(chunks: Iterable[ChatCompletionChunk]) -> Assembled:
    out = Assembled()
    for chunk in chunks:
        if chunk.usage is not None:
            out.usage = chunk.usage
            out.usage_chunks += 1
            # include_usage: the usage chunk is the last one and has no choices.
            assert chunk.choices == [], chunk
            continue
        assert len(chunk.choices) == 1, chunk
        choice = chunk.choices[0]
        delta = choice.delta
        if delta.role and out.role is None:
            out.role = delta.role
        out.content += delta.content or ""
        out.reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for call in delta.tool_calls or []:
            entry = out.tool_calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.id or ""
            if call.function is not None:
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
        if choice.finish_reason:
            out.finish_reasons.append(choice.finish_reason)
    return out


def numbers_masked(text: str) -> str:
    return re.sub(r"\d+", "N", text)


def assert_stream_matches(
    whole: ChatCompletion,
    chunks: list[ChatCompletionChunk],
    normalize: Callable[[str], str] = lambda text: text,
) -> None:
    """The stream says what the whole answer says: role first, the same text, reasoning
    and tool calls (in their OpenAI index order, ids present), one finish reason at the end,
    and a final usage chunk equal to the whole answer's usage."""
    got = assemble(chunks)
    message = whole.choices[0].message
    assert chunks[0].choices and chunks[0].choices[0].delta.role == "assistant"
    assert got.role == "assistant"
    assert normalize(got.content) == normalize(message.content or "")
    whole_reasoning = (message.model_extra or {}).get("reasoning_content") or ""
    assert normalize(got.reasoning) == normalize(whole_reasoning)
    expected = message.tool_calls or []
    assert sorted(got.tool_calls) == list(range(len(expected)))
    for i, call in enumerate(expected):
        streamed = got.tool_calls[i]
        assert streamed["id"] and call.id
        assert streamed["name"] == call.function.name  # type: ignore[union-attr]
        assert orjson.loads(streamed["arguments"]) == orjson.loads(
            call.function.arguments  # type: ignore[union-attr]
        )
    assert len({c["id"] for c in got.tool_calls.values()}) == len(got.tool_calls)
    assert got.finish_reasons == [whole.choices[0].finish_reason]
    last_choice = next(c for c in reversed(chunks) if c.choices)
    assert last_choice.choices[0].finish_reason == whole.choices[0].finish_reason
    assert got.usage_chunks == 1 and chunks[-1].usage is not None
    assert whole.usage is not None
    assert got.usage.model_dump() == whole.usage.model_dump()
