"""Anthropic's Messages API, translated to and from OpenAI chat completions.

The translation follows what LiteLLM sends for `anthropic/...` models, so a config moved
from LiteLLM behaves the same: system prompts go top-level, tool results become
`tool_result` blocks in user turns, `response_format` is emulated by forcing a tool named
`json_tool_call` whose input becomes the answer's text, and `reasoning_effort` turns on
extended thinking. Thinking blocks come back as `reasoning_content` plus `thinking_blocks`,
which a client sends back on the assistant message to continue a thinking conversation.

Refused with a 400 (or fixed up with `drop_params`), where LiteLLM forwards and the provider
refuses: `temperature` together with `top_p` on Claude Opus 4.1 and every Claude from 4.5 on
(`drops_top_p`; Bedrock's Converse translation applies the same rule). With drop_params,
`temperature` is kept and `top_p` left out.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from llmux_extproc.accounting import pricing
from llmux_extproc.accounting.usage import Usage
from llmux_extproc.errors import GatewayError
from llmux_extproc.providers.auth import APIKeyHeader
from llmux_extproc.providers.base import (
    Adapter,
    ClientRequest,
    StreamTranslator,
    UpstreamRequest,
    UpstreamResult,
    extract_message,
)
from llmux_extproc.providers.openai_chunks import ChunkWriter

if TYPE_CHECKING:
    from llmux_extproc.control.config import Deployment

API_VERSION = "2023-06-01"
JSON_TOOL = "json_tool_call"
DEFAULT_MAX_TOKENS = 4096
# Anthropic's minimum budget is 1024; OpenAI's "minimal" effort gets that minimum too.
THINKING_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 2048, "high": 4096}
IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic's error type decides the status: it is what their docs promise, while the HTTP
# status may be one OpenAI clients do not know (529).
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 503,
    "timeout_error": 504,
}
CONTEXT_WINDOW_MARKERS = ("prompt is too long", "exceed context limit", "context window")
CONTENT_POLICY_MARKERS = ("content filtering policy", "usage policy", "content policy")


# seed is absent on purpose: OpenAI documents it as best effort, so ignoring it keeps the
# contract, whereas these change what the client gets back.
UNSUPPORTED_PARAMS = (
    "n",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "audio",
    "prediction",
)


def _is_default(name: str, value: Any) -> bool:
    """True when an OpenAI parameter Anthropic lacks is set to its no-op value."""
    if value is None or value is False:
        return True
    if name == "n":
        return bool(value == 1)
    return bool(value == 0 or value == {})


class AnthropicAdapter(Adapter):
    name = "anthropic"
    auth = APIKeyHeader("x-api-key")
    auth_headers = auth.headers
    request_headers = frozenset({"content-type", "anthropic-version"})

    def translate(self, req: ClientRequest, dep: Deployment) -> UpstreamRequest:
        if req.operation != "chat":
            return super().translate(req, dep)
        assert dep.upstream is not None
        headers = {"content-type": "application/json", "anthropic-version": API_VERSION}
        body = build_body(req.body, dep, req.stream)
        return UpstreamRequest(dep.upstream.base_path + "/v1/messages", headers, orjson.dumps(body))

    def response(self, body: bytes, req: ClientRequest, dep: Deployment) -> UpstreamResult:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise GatewayError(502, "provider 'anthropic' returned invalid JSON") from exc
        if not isinstance(data, dict) or not isinstance(data.get("content"), list):
            raise GatewayError(502, "provider 'anthropic' returned an unexpected body")
        completion, usage = translate_message(data, dep, json_mode(req.body))
        return UpstreamResult(usage, orjson.dumps(completion))

    def error(self, status: int, body: bytes, dep: Deployment) -> GatewayError:
        return translate_error(status, body)

    def stream(self, req: ClientRequest, dep: Deployment) -> StreamTranslator | None:
        options = req.body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return AnthropicStreamTranslator(dep.model, include_usage, json_mode(req.body))


# -- request ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JsonMode:
    """response_format emulated with a forced tool; wrapped: schema is not an object, so
    the tool takes it under "value" (tool input must be an object) and the answer unwraps."""

    schema: dict[str, Any]
    wrapped: bool
    description: str


def json_mode(body: dict[str, Any]) -> JsonMode | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonMode({"type": "object"}, False, "Respond with a JSON object.")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        spec = spec if isinstance(spec, dict) else {}
        schema = spec.get("schema")
        schema = schema if isinstance(schema, dict) and schema else {"type": "object"}
        description = str(spec.get("description") or "Respond with JSON matching this schema.")
        if schema.get("type") == "object":
            return JsonMode(schema, False, description)
        wrapper = {"type": "object", "properties": {"value": schema}, "required": ["value"]}
        return JsonMode(wrapper, True, description)
    raise GatewayError(
        400,
        "response_format.type must be 'text', 'json_object' or 'json_schema'.",
        param="response_format",
    )


def build_body(body: dict[str, Any], dep: Deployment, stream: bool) -> dict[str, Any]:
    """The Anthropic /v1/messages body for an OpenAI chat completion request."""
    dropped = _check_unsupported(body, dep)
    system, messages = convert_messages(body.get("messages") or [])
    out: dict[str, Any] = {"model": dep.model, "messages": messages}
    if system:
        out["system"] = system

    thinking = _thinking(body)
    budget = thinking.get("budget_tokens") if thinking else None
    out["max_tokens"] = _max_tokens(body, dep, budget if isinstance(budget, int) else None)
    if thinking:
        out["thinking"] = thinking

    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None and key not in dropped:
            out[key] = body[key]
    stops = _stop_sequences(body.get("stop"))
    if stops:
        out["stop_sequences"] = stops
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}

    tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    mode = json_mode(body)
    if mode is not None:
        # Forcing a tool and thinking cannot be combined on Anthropic, and forcing would
        # also forbid the client's own tools: in those cases the json tool is only offered.
        if not tools and not thinking:
            choice = {"type": "tool", "name": JSON_TOOL}
        tools.append(
            {"name": JSON_TOOL, "description": mode.description, "input_schema": mode.schema}
        )
    if tools:
        out["tools"] = tools
        if choice is not None:
            out["tool_choice"] = choice
    if stream:
        out["stream"] = True
    return out


# Claude Opus 4.1 and every Claude from 4.5 on refuse `temperature` together with `top_p`
# ("`temperature` and `top_p` cannot both be specified for this model", on Anthropic's API,
# Bedrock and Vertex alike). LiteLLM 1.110 forwards both and passes the provider's 400 on;
# LLMux refuses before anything is sent, or with drop_params sends temperature alone.
_CLAUDE_VERSION = re.compile(r"claude-(?:[a-z]+-)?(\d+)(?:[-.](\d{1,2}))?(?!\d)")


def refuses_temperature_with_top_p(model: str) -> bool:
    """Whether a Claude model id (Anthropic's, Bedrock's `anthropic.claude-...`, Vertex's
    `claude-...@date`) is one that refuses the pair: version 4.1 or later. A date suffix
    (`claude-sonnet-4-20250514`) is no minor version."""
    match = _CLAUDE_VERSION.search(model.lower())
    return match is not None and (int(match[1]), int(match[2] or 0)) >= (4, 1)


def drops_top_p(body: dict[str, Any], model: str, drop_params: bool) -> bool:
    """True when `top_p` must be left out (drop_params); 400 naming both parameters when the
    model refuses the pair and drop_params is off."""
    if body.get("temperature") is None or body.get("top_p") is None:
        return False
    if not refuses_temperature_with_top_p(model):
        return False
    if drop_params:
        return True
    raise GatewayError(
        400,
        f"{model} does not accept 'temperature' together with 'top_p': send only one of them,"
        " or set drop_params: true to have top_p dropped.",
        param="top_p",
        code="unsupported_parameter",
    )


def _check_unsupported(body: dict[str, Any], dep: Deployment) -> set[str]:
    """Names of parameters to leave out; raises 400 for them unless drop_params is set."""
    dropped = set()
    for name in UNSUPPORTED_PARAMS:
        if name in body and not _is_default(name, body[name]):
            if not dep.drop_params:
                raise GatewayError(
                    400,
                    f"anthropic does not support the parameter {name!r} "
                    f"(model {dep.model}). Remove it, or set drop_params: true to drop it.",
                    param=name,
                    code="unsupported_parameter",
                )
            dropped.add(name)
    if drops_top_p(body, dep.model, dep.drop_params):
        dropped.add("top_p")
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise GatewayError(
                400,
                f"The legacy {name!r} parameter is not supported for anthropic; use 'tools'.",
                param=name,
            )
    return dropped


def _thinking(body: dict[str, Any]) -> dict[str, Any] | None:
    # LiteLLM lets clients pass Anthropic's own `thinking` object; it wins over the effort.
    explicit = body.get("thinking")
    if isinstance(explicit, dict):
        return explicit if explicit.get("type") != "disabled" else None
    effort = body.get("reasoning_effort")
    if effort is None or effort == "none":
        return None
    if not isinstance(effort, str) or effort not in THINKING_BUDGETS:
        raise GatewayError(
            400,
            f"reasoning_effort must be one of {sorted(THINKING_BUDGETS)} or 'none', "
            f"got {effort!r}.",
            param="reasoning_effort",
        )
    return {"type": "enabled", "budget_tokens": THINKING_BUDGETS[effort]}


def _max_tokens(body: dict[str, Any], dep: Deployment, budget: int | None) -> int:
    requested = body.get("max_completion_tokens")
    name = "max_completion_tokens"
    if requested is None:
        requested, name = body.get("max_tokens"), "max_tokens"
    if requested is not None and (
        not isinstance(requested, int) or isinstance(requested, bool) or requested < 1
    ):
        raise GatewayError(400, f"{name} must be a positive integer.", param=name)
    if requested is None:
        price = pricing.lookup(dep.model, "anthropic")
        limit = price.max_output_tokens if price else None
        requested = limit or DEFAULT_MAX_TOKENS
    # Anthropic needs max_tokens > budget_tokens; keep the client's figure for the answer
    # itself rather than failing a request OpenAI would have served.
    if budget is not None and requested <= budget:
        requested += budget
    return int(requested)


def _stop_sequences(stop: Any) -> list[str]:
    values = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    # Anthropic rejects whitespace-only stop sequences ("\n\n" is common in OpenAI code):
    # they are dropped, as LiteLLM does, rather than failing the whole request.
    return [s for s in values if isinstance(s, str) and s.strip()]


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise GatewayError(400, "tools must be an array.", param="tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function" or not fn.get("name"):
            raise GatewayError(
                400, f"tools[{i}] must be a function tool with a name.", param=f"tools[{i}]"
            )
        params = fn.get("parameters")
        converted: dict[str, Any] = {
            "name": fn["name"],
            "input_schema": params if isinstance(params, dict) else {"type": "object"},
        }
        if fn.get("description"):
            converted["description"] = fn["description"]
        if isinstance(tool.get("cache_control"), dict):
            converted["cache_control"] = tool["cache_control"]
        out.append(converted)
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    result: dict[str, Any] | None
    if choice is None:
        result = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        result = {"type": "auto"}
    elif choice == "none":
        # Kept rather than dropping the tools: the prompt (and its cache) stays the same.
        return {"type": "none"}
    elif choice == "required":
        result = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        result = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise GatewayError(
            400,
            "tool_choice must be 'auto', 'none', 'required' or "
            '{"type": "function", "function": {"name": ...}}.',
            param="tool_choice",
        )
    if result is not None and parallel is False:
        result["disable_parallel_tool_use"] = True
    return result


def convert_messages(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, alternating user/assistant messages with block lists)."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            blocks = _text_blocks(message.get("content"), where)
            system.extend(_with_message_cache(blocks, message))
        elif role == "user":
            blocks = _user_blocks(message.get("content"), where)
            turns.append({"role": "user", "content": _with_message_cache(blocks, message)})
        elif role == "assistant":
            blocks = _assistant_blocks(message, where)
            turns.append({"role": "assistant", "content": _with_message_cache(blocks, message)})
        elif role == "tool":
            turns.append({"role": "user", "content": [_tool_result(message, where)]})
        else:
            raise GatewayError(
                400,
                f"{where}.role {role!r} is not supported for anthropic; use 'tool' messages.",
                param=f"{where}.role",
            )
    merged = _merge_turns(turns)
    if not merged:
        raise GatewayError(
            400, "messages must contain at least one user or assistant message.", param="messages"
        )
    _trim_prefill(merged)
    return system, merged


def _merge_turns(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Anthropic wants alternating roles; consecutive tool results (and a user message after
    # them) form one user turn. Empty turns (an assistant "" reply) would be rejected.
    merged: list[dict[str, Any]] = []
    for turn in turns:
        if not turn["content"]:
            continue
        if merged and merged[-1]["role"] == turn["role"]:
            merged[-1]["content"].extend(turn["content"])
        else:
            merged.append(turn)
    return merged


def _trim_prefill(turns: list[dict[str, Any]]) -> None:
    # A final assistant turn is a prefill, and Anthropic rejects one ending in whitespace.
    last = turns[-1]
    if last["role"] != "assistant" or last["content"][-1].get("type") != "text":
        return
    block = last["content"][-1]
    block["text"] = block["text"].rstrip()
    if not block["text"]:
        last["content"].pop()
        if not last["content"]:
            turns.pop()


def _with_message_cache(blocks: list[dict[str, Any]], message: dict[str, Any]) -> list[Any]:
    # LiteLLM accepts cache_control on a whole message: it marks the message's last block.
    cache = message.get("cache_control")
    if isinstance(cache, dict) and blocks:
        blocks[-1] = {**blocks[-1], "cache_control": cache}
    return blocks


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise GatewayError(400, f"{where}.content must be a string or an array.", param=where)
    blocks = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise GatewayError(
                400, f"{where}.content[{j}] must be a text part.", param=f"{where}.content[{j}]"
            )
        blocks.extend(_text_part(part))
    return blocks


def _text_part(part: dict[str, Any]) -> list[dict[str, Any]]:
    text = part.get("text")
    if not isinstance(text, str) or not text:
        return []  # Anthropic rejects empty text blocks
    block: dict[str, Any] = {"type": "text", "text": text}
    if isinstance(part.get("cache_control"), dict):
        block["cache_control"] = part["cache_control"]
    return [block]


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise GatewayError(400, f"{where}.content must be a string or an array.", param=where)
    blocks = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.extend(_text_part(part))
        elif kind == "image_url":
            blocks.append(_image_block(part, at))
        elif kind == "file":
            blocks.append(_document_block(part, at))
        else:
            raise GatewayError(
                400, f"{at}: content part type {kind!r} is not supported for anthropic.", param=at
            )
    return blocks


def _parse_data_url(url: str, at: str) -> tuple[str, str]:
    header, sep, data = url[len("data:") :].partition(",")
    media_type, _, encoding = header.partition(";")
    if not sep or encoding != "base64":
        raise GatewayError(400, f"{at}: data URLs must be base64-encoded.", param=at)
    return media_type, data


def _image_block(part: dict[str, Any], at: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise GatewayError(400, f"{at}.image_url.url is required.", param=at)
    source: dict[str, Any]
    if url.startswith("data:"):
        media_type, data = _parse_data_url(url, at)
        if media_type not in IMAGE_TYPES:
            raise GatewayError(
                400,
                f"{at}: image type {media_type!r} is not supported by anthropic "
                f"(supported: {', '.join(sorted(IMAGE_TYPES))}).",
                param=at,
            )
        source = {"type": "base64", "media_type": media_type, "data": data}
    elif url.startswith(("http://", "https://")):
        source = {"type": "url", "url": url}
    else:
        raise GatewayError(400, f"{at}: image URL must be a data: or http(s) URL.", param=at)
    block: dict[str, Any] = {"type": "image", "source": source}
    if isinstance(part.get("cache_control"), dict):
        block["cache_control"] = part["cache_control"]
    return block


def _document_block(part: dict[str, Any], at: str) -> dict[str, Any]:
    file = part.get("file")
    data_url = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data_url, str) or not data_url.startswith("data:"):
        raise GatewayError(
            400, f"{at}: only inline files (file.file_data data URLs) are supported.", param=at
        )
    media_type, data = _parse_data_url(data_url, at)
    if media_type != "application/pdf":
        raise GatewayError(400, f"{at}: file type {media_type!r} is not supported.", param=at)
    return {
        "type": "document",
        "source": {"type": "base64", "media_type": media_type, "data": data},
    }


def _assistant_blocks(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    # Thinking must lead the turn, or Anthropic rejects the signature check.
    blocks = _thinking_blocks(message.get("thinking_blocks"))
    content = message.get("content")
    if isinstance(content, list):
        # Assistant parts may also be refusals, which have no Anthropic equivalent to replay.
        content = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
    if content is not None:
        blocks.extend(_text_blocks(content, where))
    calls = message.get("tool_calls")
    for j, call in enumerate(calls if isinstance(calls, list) else []):
        blocks.append(_tool_use_block(call, f"{where}.tool_calls[{j}]"))
    return blocks


def _thinking_blocks(value: Any) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for block in value if isinstance(value, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "thinking" and block.get("signature"):
            blocks.append(
                {
                    "type": "thinking",
                    "thinking": block.get("thinking") or "",
                    "signature": block["signature"],
                }
            )
        elif block.get("type") == "redacted_thinking" and block.get("data"):
            blocks.append({"type": "redacted_thinking", "data": block["data"]})
    return blocks


def _tool_use_block(call: Any, at: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not fn.get("name") or not call.get("id"):
        raise GatewayError(400, f"{at} needs an id and a function name.", param=at)
    arguments = fn.get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(
            400, f"{at}.function.arguments is not valid JSON: {exc}", param=f"{at}.function"
        ) from exc
    if not isinstance(parsed, dict):
        raise GatewayError(
            400, f"{at}.function.arguments must be a JSON object.", param=f"{at}.function"
        )
    return {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": parsed}


def _tool_result(message: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise GatewayError(400, f"{where}.tool_call_id is required.", param=where)
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    elif content is not None:
        parts = _user_blocks(content, where)
        if parts:
            block["content"] = parts
    if isinstance(message.get("cache_control"), dict):
        block["cache_control"] = message["cache_control"]
    return block


# -- response --------------------------------------------------------------------------


def usage_from(raw: dict[str, Any]) -> Usage:
    """OpenAI's counting from Anthropic's: input_tokens excludes cache reads and writes."""
    uncached = _int(raw.get("input_tokens"))
    cache_read = _int(raw.get("cache_read_input_tokens"))
    cache_write = _int(raw.get("cache_creation_input_tokens"))
    details = raw.get("output_tokens_details")
    thinking = _int(details.get("thinking_tokens")) if isinstance(details, dict) else 0
    return Usage(
        prompt_tokens=uncached + cache_read + cache_write,
        completion_tokens=_int(raw.get("output_tokens")),
        cached_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=thinking,
    )


def openai_usage(usage: Usage) -> dict[str, object]:
    body = usage.to_openai()
    body["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    # LiteLLM adds Anthropic's own cache counters; clients that bill from them keep working.
    body["cache_read_input_tokens"] = usage.cached_tokens
    body["cache_creation_input_tokens"] = usage.cache_write_tokens
    return body


def _json_text(value: Any, mode: JsonMode) -> str:
    if mode.wrapped and isinstance(value, dict):
        value = value.get("value")
    return orjson.dumps(value).decode()


def translate_message(
    data: dict[str, Any], dep: Deployment, mode: JsonMode | None
) -> tuple[dict[str, Any], Usage]:
    texts: list[str] = []
    reasoning: list[str] = []
    thinking_blocks: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    for block in data["content"]:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind == "thinking":
            reasoning.append(str(block.get("thinking") or ""))
            thinking_blocks.append(block)
        elif kind == "redacted_thinking":
            thinking_blocks.append(block)
        elif kind == "tool_use" and mode is not None and block.get("name") == JSON_TOOL:
            texts.append(_json_text(block.get("input"), mode))
        elif kind == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": None,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    if thinking_blocks:
        message["reasoning_content"] = "".join(reasoning)
        message["thinking_blocks"] = thinking_blocks
    usage_raw = data.get("usage")
    usage = usage_from(usage_raw if isinstance(usage_raw, dict) else {})
    completion = {
        "id": data.get("id") or "msg_unknown",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": data.get("model") or dep.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason(data.get("stop_reason"), bool(tool_calls)),
                "logprobs": None,
            }
        ],
        "usage": openai_usage(usage),
    }
    return completion, usage


def finish_reason(stop_reason: Any, has_tool_calls: bool) -> str:
    reason = FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"
    # A forced json tool ends with tool_use, but the client asked for text.
    if reason == "tool_calls" and not has_tool_calls:
        return "stop"
    return reason


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# -- errors ----------------------------------------------------------------------------


def translate_error(status: int, body: bytes) -> GatewayError:
    message = extract_message(body) or f"anthropic returned HTTP {status}"
    err_type = _error_type(body)
    code: str | None = None
    mapped = ERROR_STATUS.get(err_type or "")
    if mapped is None:
        mapped = 503 if status == 529 else status
    if mapped == 400:
        lowered = message.lower()
        if any(marker in lowered for marker in CONTEXT_WINDOW_MARKERS):
            code = "context_length_exceeded"
        elif any(marker in lowered for marker in CONTENT_POLICY_MARKERS):
            code = "content_policy_violation"
    return GatewayError(mapped, message, code=code)


def _error_type(body: bytes) -> str | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    err = data.get("error") if isinstance(data, dict) else None
    kind = err.get("type") if isinstance(err, dict) else None
    return kind if isinstance(kind, str) else None


# -- streaming -------------------------------------------------------------------------


@dataclass(slots=True)
class _Block:
    """One open Anthropic content block, as the stream has shown it so far."""

    kind: str  # text, tool, json, thinking, redacted_thinking, other
    tool_index: int = -1
    text: list[str] = field(default_factory=list)
    signature: str = ""
    data: str = ""


class AnthropicStreamTranslator(StreamTranslator):
    """Anthropic server-sent events in, OpenAI `chat.completion.chunk` events out.

    Input is cut into lines at b"\\n" before decoding, so a split UTF-8 character or
    event is simply held back until the rest arrives.
    """

    def __init__(self, model: str, include_usage: bool, mode: JsonMode | None) -> None:
        self.usage = Usage()
        self.mode = mode
        self.chunks = ChunkWriter("msg_unknown", model, include_usage=include_usage)
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._out: list[bytes] = []
        self._blocks: dict[int, _Block] = {}
        self._tool_calls = 0
        self._usage_raw: dict[str, Any] = {}
        self._finish: str | None = None

    def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        while not self.chunks.closed:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            self._line(line)
        return self._flush()

    def finish(self) -> bytes:
        if not self.chunks.closed:
            if self._buffer:
                self._line(self._buffer)
                self._buffer = b""
            self._line(b"")  # a last event without its blank line
        if not self.chunks.closed:
            if self._finish is None:
                self._fail("api_error", "The anthropic stream ended before the message did.")
            else:
                self._end()
        return self._flush()

    def _flush(self) -> bytes:
        out, self._out = b"".join(self._out), []
        return out

    # SSE framing

    def _line(self, raw: bytes) -> None:
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if not line:
            if self._data:
                self._dispatch(self._event, "\n".join(self._data))
            self._event, self._data = "", []
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)

    def _dispatch(self, event: str, payload: str) -> None:
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._fail("api_error", f"anthropic sent an unreadable stream event: {payload[:200]}")
            return
        if not isinstance(data, dict):
            return
        kind = data.get("type") or event
        # An event whose type is no string is no event this knows (fuzzing: a list here
        # raised TypeError out of the stream).
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is not None:
            handler(self, data)

    # output

    def _end(self) -> None:
        self._out.append(self.chunks.done(openai_usage(self.usage)))

    def _fail(self, err_type: str, message: str) -> None:
        err = translate_error(500, orjson.dumps({"error": {"type": err_type, "message": message}}))
        self._out.append(self.chunks.error(err))

    def _update_usage(self, raw: Any) -> None:
        if isinstance(raw, dict):
            # message_delta repeats only the counters that changed; keep the others.
            self._usage_raw.update({k: v for k, v in raw.items() if v is not None})
            self.usage = usage_from(self._usage_raw)

    # events

    def _on_message_start(self, data: dict[str, Any]) -> None:
        message = data.get("message")
        message = message if isinstance(message, dict) else {}
        self.chunks.id = str(message.get("id") or self.chunks.id)
        self.chunks.model = str(message.get("model") or self.chunks.model)
        self._update_usage(message.get("usage"))
        self._out.append(self.chunks.role())

    def _on_block_start(self, data: dict[str, Any]) -> None:
        block = data.get("content_block")
        block = block if isinstance(block, dict) else {}
        kind = block.get("type")
        index = _int(data.get("index"))
        if kind == "text":
            self._blocks[index] = _Block("text")
            self._out.append(self.chunks.content(str(block.get("text") or "")))
        elif kind == "tool_use" and self.mode is not None and block.get("name") == JSON_TOOL:
            self._blocks[index] = _Block("json")
        elif kind == "tool_use":
            self._blocks[index] = _Block("tool", tool_index=self._tool_calls)
            self._tool_calls += 1
            start = self.chunks.tool_call_start(
                self._blocks[index].tool_index, block.get("id"), block.get("name")
            )
            self._out.append(start)
        elif kind == "thinking":
            self._blocks[index] = _Block("thinking")
        elif kind == "redacted_thinking":
            self._blocks[index] = _Block("redacted_thinking", data=str(block.get("data") or ""))
        else:
            self._blocks[index] = _Block("other")

    def _on_block_delta(self, data: dict[str, Any]) -> None:
        block = self._blocks.get(_int(data.get("index")))
        delta = data.get("delta")
        if block is None or not isinstance(delta, dict):
            return
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            self._out.append(self.chunks.content(delta["text"]))
        elif kind == "thinking_delta" and delta.get("thinking"):
            block.text.append(delta["thinking"])
            self._out.append(self.chunks.reasoning(delta["thinking"]))
        elif kind == "signature_delta":
            block.signature += str(delta.get("signature") or "")
        elif kind == "input_json_delta" and delta.get("partial_json"):
            self._on_json_fragment(block, delta["partial_json"])

    def _on_json_fragment(self, block: _Block, fragment: str) -> None:
        if block.kind == "tool":
            self._out.append(self.chunks.tool_call_arguments(block.tool_index, fragment))
        elif block.kind == "json" and self.mode is not None and not self.mode.wrapped:
            self._out.append(self.chunks.content(fragment))
        elif block.kind == "json":
            block.text.append(fragment)  # unwrapped once complete, at content_block_stop

    def _on_block_stop(self, data: dict[str, Any]) -> None:
        block = self._blocks.pop(_int(data.get("index")), None)
        if block is None:
            return
        if block.kind == "thinking":
            whole = {"type": "thinking", "thinking": "".join(block.text)}
            thinking = [{**whole, "signature": block.signature}]
            self._out.append(self.chunks.delta({"thinking_blocks": thinking}))
        elif block.kind == "redacted_thinking":
            redacted = [{"type": "redacted_thinking", "data": block.data}]
            self._out.append(self.chunks.delta({"thinking_blocks": redacted}))
        elif block.kind == "json" and block.text and self.mode is not None and self.mode.wrapped:
            try:
                value = orjson.loads("".join(block.text))
            except orjson.JSONDecodeError:
                value = None
            self._out.append(self.chunks.content(_json_text(value, self.mode)))

    def _on_message_delta(self, data: dict[str, Any]) -> None:
        self._update_usage(data.get("usage"))
        delta = data.get("delta")
        stop = delta.get("stop_reason") if isinstance(delta, dict) else None
        self._finish = finish_reason(stop, self._tool_calls > 0)
        self._out.append(self.chunks.finish(self._finish))

    def _on_message_stop(self, data: dict[str, Any]) -> None:
        if self._finish is None:
            self._finish = "stop"
            self._out.append(self.chunks.finish(self._finish))
        self._end()

    def _on_error(self, data: dict[str, Any]) -> None:
        err = data.get("error")
        err = err if isinstance(err, dict) else {}
        self._fail(str(err.get("type") or "api_error"), str(err.get("message") or "stream error"))


_HANDLERS = {
    "message_start": AnthropicStreamTranslator._on_message_start,
    "content_block_start": AnthropicStreamTranslator._on_block_start,
    "content_block_delta": AnthropicStreamTranslator._on_block_delta,
    "content_block_stop": AnthropicStreamTranslator._on_block_stop,
    "message_delta": AnthropicStreamTranslator._on_message_delta,
    "message_stop": AnthropicStreamTranslator._on_message_stop,
    "error": AnthropicStreamTranslator._on_error,
}


ADAPTER = AnthropicAdapter()
