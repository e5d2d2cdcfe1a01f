"""A mock Anthropic Messages API for `tests.harness.MockUpstream`.

It is deliberately as strict as Anthropic: headers, the body against the official SDK's
request types (unknown keys rejected), plus the rules those types cannot express
(alternating roles, tool results answering the previous turn's tool uses, thinking
budgets, whitespace-only stop sequences). It answers in Anthropic's shapes, streamed or
not, choosing the answer from the request as `tests.corpus` describes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from anthropic.types import Message
from anthropic.types.message_create_params import (
    MessageCreateParamsNonStreaming,
    MessageCreateParamsStreaming,
)
from pydantic import BaseModel, ConfigDict, ValidationError

from tests.harness import json_response

API_KEY = "sk-ant-test"
JSON_TOOL = "json_tool_call"
MOCK_USAGE = {
    "input_tokens": 11,
    "cache_creation_input_tokens": 3,
    "cache_read_input_tokens": 5,
    "output_tokens": 7,
}


# The SDK's request types are TypedDicts, which pydantic validates leniently (extra keys
# ignored) unless a model's config says otherwise; nested TypedDicts inherit the config.
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    body: MessageCreateParamsNonStreaming


class _StrictStreaming(BaseModel):
    model_config = ConfigDict(extra="forbid")
    body: MessageCreateParamsStreaming


def _materialize(value: Any, path: str, errors: list[str]) -> None:
    """Walk a validated body. Iterables are validated lazily, so consume them; a response
    model (TextBlock, ...) where a request block belongs means the param type rejected it."""
    if isinstance(value, BaseModel):
        errors.append(f"{path}: not a valid request block: {value!r}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _materialize(item, f"{path}.{key}", errors)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _materialize(item, f"{path}[{i}]", errors)
    elif hasattr(value, "__next__"):
        try:
            items = list(value)
        except ValidationError as exc:
            errors.append(f"{path}: {exc}")
            return
        _materialize(items, path, errors)


# The API still takes these on models with sampling options, but SDK 1.0 dropped them from
# its types (clients pass them as extra_body), so they are checked here.
SAMPLING_RANGES = {"temperature": (0.0, 1.0), "top_p": (0.0, 1.0), "top_k": (0, 1_000_000)}


def request_errors(body: Any) -> list[str]:
    """Why Anthropic would answer 400 to this /v1/messages body (empty: it would not)."""
    if not isinstance(body, dict):
        return ["body must be a JSON object"]
    errors: list[str] = []
    for key, (low, high) in SAMPLING_RANGES.items():
        value = body.get(key)
        if key in body and not (
            isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high
        ):
            errors.append(f"{key}: must be a number in [{low}, {high}]")
    if isinstance(body.get("top_k"), float):
        errors.append("top_k: must be an integer")
    sdk_body = {k: v for k, v in body.items() if k not in SAMPLING_RANGES}
    schema = _StrictStreaming if body.get("stream") else _Strict
    try:
        validated = schema.model_validate({"body": sdk_body}).body
    except ValidationError as exc:
        return [*errors, str(exc)]
    _materialize(dict(validated), "body", errors)
    if errors:
        return errors
    return _semantic_errors(body)


# Models that refuse `temperature` with `top_p` (Anthropic's message, as its API sends it);
# a list of ids, not LLMux's version rule, so the mock can disagree with it.
REFUSES_TEMPERATURE_WITH_TOP_P = (
    "claude-opus-4-1",
    "claude-sonnet-4-5",
    "claude-haiku-4-5",
    "claude-opus-4-5",
    "claude-sonnet-4-6",
    "claude-opus-4-6",
)
BOTH_SAMPLING = (
    "`temperature` and `top_p` cannot both be specified for this model. Please use only one."
)


def _semantic_errors(body: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    if (
        str(body.get("model", "")).startswith(REFUSES_TEMPERATURE_WITH_TOP_P)
        and "temperature" in body
        and "top_p" in body
    ):
        errors.append(BOTH_SAMPLING)
    messages = body["messages"]
    if not messages:
        errors.append("messages: at least one message is required")
    tool_names = [t["name"] for t in body.get("tools", [])]
    if len(set(tool_names)) != len(tool_names):
        errors.append("tools: tool names must be unique")
    if "tool_choice" in body and not tool_names:
        errors.append("tool_choice: may only be specified while providing tools")
    for stop in body.get("stop_sequences", []):
        if not stop.strip():
            errors.append("stop_sequences: each stop sequence must contain non-whitespace")
    thinking = body.get("thinking")
    if thinking and thinking.get("type") == "enabled":
        budget = thinking["budget_tokens"]
        if budget < 1024:
            errors.append("thinking.budget_tokens: must be >= 1024")
        if body["max_tokens"] <= budget:
            errors.append("max_tokens: must be greater than thinking.budget_tokens")
        if body.get("tool_choice", {}).get("type") in ("any", "tool"):
            errors.append("Thinking may not be enabled when tool_choice forces tool use.")
    previous_uses: set[str] = set()
    for i, message in enumerate(messages):
        errors += _message_errors(i, message, messages, previous_uses, bool(tool_names))
        content = message["content"]
        blocks = content if isinstance(content, list) else []
        previous_uses = {b["id"] for b in blocks if b.get("type") == "tool_use"}
    return errors


def _message_errors(
    i: int,
    message: dict[str, Any],
    messages: list[dict[str, Any]],
    previous_uses: set[str],
    has_tools: bool,
) -> list[str]:
    errors = []
    where = f"messages.{i}"
    if i and messages[i - 1]["role"] == message["role"]:
        errors.append(f"{where}: roles must alternate between 'user' and 'assistant'")
    content = message["content"]
    if not content:
        errors.append(f"{where}: all messages must have non-empty content")
    blocks = content if isinstance(content, list) else []
    kinds = [b.get("type") for b in blocks]
    for j, block in enumerate(blocks):
        if block.get("type") == "text" and not block["text"]:
            errors.append(f"{where}.content.{j}.text: text content blocks must be non-empty")
    if ("tool_use" in kinds or "tool_result" in kinds) and not has_tools:
        errors.append(f"{where}: requests with tool_use or tool_result blocks must define tools")
    if "tool_result" in kinds:
        results = [b["tool_use_id"] for b in blocks if b.get("type") == "tool_result"]
        if kinds[: len(results)] != ["tool_result"] * len(results):
            errors.append(f"{where}: tool_result blocks must come first in the content")
        unknown = set(results) - previous_uses
        if unknown:
            errors.append(
                f"{where}: unexpected tool_use_id found in tool_result blocks: {sorted(unknown)}. "
                "Each tool_result block must have a corresponding tool_use block in the "
                "previous message."
            )
    thinking = [k in ("thinking", "redacted_thinking") for k in kinds]
    if any(thinking) and thinking[: thinking.count(True)] != [True] * thinking.count(True):
        errors.append(f"{where}: thinking blocks must come first in an assistant message")
    return errors


def anthropic_error(status: int, err_type: str, message: str) -> web.Response:
    body = {"type": "error", "error": {"type": err_type, "message": message}}
    return json_response(body, status, headers={"request-id": "req_mock"})


def sample(schema: Any) -> Any:
    """A value matching a (simple) JSON schema, for forced json tool answers."""
    if not isinstance(schema, dict):
        return "x"
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {k: sample(v) for k, v in props.items()} if props else {"a": 1}
    if kind == "array":
        return [sample(schema.get("items"))]
    return {"string": "Ada", "integer": 36, "number": 1.5, "boolean": True}.get(str(kind), "x")


_ids = itertools.count(1)


def answer(body: dict[str, Any]) -> dict[str, Any]:
    """The Message Anthropic might send for this request, as a JSON-ready dict."""
    n = next(_ids)
    content: list[dict[str, Any]] = []
    thinking = body.get("thinking")
    if thinking and thinking.get("type") == "enabled":
        content.append(
            {
                "type": "thinking",
                "thinking": "The user asks about letters; count them carefully.",
                "signature": f"EqQBCkYIARgCIkDmock{n}",
            }
        )
    tools = body.get("tools", [])
    last = body["messages"][-1]
    last_blocks = last["content"] if isinstance(last["content"], list) else []
    answers_results = any(b.get("type") == "tool_result" for b in last_blocks)
    json_tool = next((t for t in tools if t["name"] == JSON_TOOL), None)
    if json_tool is not None:
        calls = [json_tool]
    elif tools and last["role"] == "user" and not answers_results:
        calls = tools
    else:
        calls = []
    for i, tool in enumerate(calls):
        content.append(
            {
                "type": "tool_use",
                "id": f"toolu_mock{n}_{i}",
                "name": tool["name"],
                "input": sample(tool["input_schema"]),
            }
        )
    if not calls:
        content.append({"type": "text", "text": f"Hello from mock Anthropic (request {n})."})
    message = {
        "id": f"msg_mock{n}",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": content,
        "stop_reason": "tool_use" if calls else "end_turn",
        "stop_sequence": None,
        "usage": dict(MOCK_USAGE),
    }
    Message.model_validate(message)  # the mock must speak Anthropic's shape itself
    return message


def sse(message: dict[str, Any]) -> bytes:
    """`message` as the server-sent events Anthropic streams for it."""
    usage = message["usage"]
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "usage": {**usage, "output_tokens": 1},
    }
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("ping", {"type": "ping"}),
    ]
    for index, block in enumerate(message["content"]):
        events += _block_events(index, block)
    events += [
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(
        b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
        for name, data in events
    )


def _block_events(index: int, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    kind = block["type"]
    start: dict[str, Any]
    deltas: list[dict[str, Any]] = []
    if kind == "text":
        start = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": part} for part in _halves(block["text"])]
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": p} for p in _halves(block["thinking"])]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    else:
        start = {**block, "input": {}}
        arguments = orjson.dumps(block["input"]).decode()
        deltas = [{"type": "input_json_delta", "partial_json": ""}]
        deltas += [{"type": "input_json_delta", "partial_json": p} for p in _halves(arguments)]

    def event(name: str, **data: Any) -> tuple[str, dict[str, Any]]:
        return name, {"type": name, "index": index, **data}

    return [
        event("content_block_start", content_block=start),
        *(event("content_block_delta", delta=d) for d in deltas),
        event("content_block_stop"),
    ]


def _halves(text: str) -> list[str]:
    middle = len(text) // 2
    return [part for part in (text[:middle], text[middle:]) if part]


@dataclass
class AnthropicMock:
    """The handler: `MockUpstream(AnthropicMock()).start()`.

    `fail_next` makes the next request answer that (status, Anthropic error type, message).
    """

    api_key: str = API_KEY
    fail_next: tuple[int, str, str] | None = None
    rejected: list[list[str]] = field(default_factory=list)

    async def __call__(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if request.method != "POST" or request.path != "/v1/messages":
            return anthropic_error(404, "not_found_error", f"Not found: {request.path}")
        if request.headers.get("x-api-key") != self.api_key:
            return anthropic_error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return anthropic_error(
                400, "invalid_request_error", "anthropic-version: header is required"
            )
        if not request.headers.get("content-type", "").startswith("application/json"):
            return anthropic_error(400, "invalid_request_error", "content-type must be JSON")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return anthropic_error(400, "invalid_request_error", "body is not valid JSON")
        errors = request_errors(data)
        if errors:
            self.rejected.append(errors)
            return anthropic_error(400, "invalid_request_error", "; ".join(errors))
        if self.fail_next is not None:
            status, err_type, text = self.fail_next
            self.fail_next = None
            return anthropic_error(status, err_type, text)
        message = answer(data)
        if not data.get("stream"):
            return json_response(message, headers={"request-id": "req_mock"})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(message))
        await response.write_eof()
        return response
