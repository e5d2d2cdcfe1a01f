"""Amazon Bedrock: chat through the Converse API, embeddings through InvokeModel.

Converse is Bedrock's one request shape for every chat model family, so a single
translation covers Claude, Llama, Mistral, Nova, ... Requests are signed with our own
SigV4 (auth/sigv4.py) over the final body; a Bedrock API key (`litellm_params.api_key`) is sent
as a bearer token instead.

What cannot be expressed in Converse is refused with a 400 naming the parameter, unless the
deployment has `drop_params`. Deliberate choices, as LiteLLM makes them:
- `response_format` json_object/json_schema becomes a forced tool (`json_tool_call`) whose
  input is returned as the message content; it cannot be combined with `tools` or with
  extended thinking (Anthropic refuses a forced tool while thinking).
- `reasoning_effort` becomes Anthropic extended thinking with a token budget; other
  families refuse it.
- `seed` and `user` are accepted and ignored: neither changes what a correct answer is.
- A conversation that carries tool calls but no `tools` gets placeholder tool specs,
  because Converse rejects toolUse/toolResult blocks without a toolConfig.
"""

from __future__ import annotations

import base64
import re
import struct
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from llmux_extproc.accounting import tokens
from llmux_extproc.accounting.usage import Usage
from llmux_extproc.errors import GatewayError, bad_request
from llmux_extproc.providers import anthropic
from llmux_extproc.providers.auth import sigv4
from llmux_extproc.providers.aws_eventstream import EventStreamDecoder, EventStreamError, Message
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

JSON = dict[str, Any]
SERVICE = "bedrock"
JSON_TOOL = "json_tool_call"
# Anthropic extended-thinking budgets per OpenAI reasoning_effort, as LiteLLM maps them.
THINKING_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 2048, "high": 4096}
# Output room left beyond the thinking budget when the client set no max_tokens: Anthropic
# requires max_tokens > budget_tokens and Bedrock's default may be lower.
THINKING_ANSWER_TOKENS = 4096
IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}

# Chat parameters: translated, or accepted because ignoring them changes nothing the
# client can rely on. Anything else is refused (or dropped with drop_params).
CHAT_PARAMS = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "tools",
    "tool_choice",
    "response_format",
    "reasoning_effort",
    "thinking",
    "user",
    "seed",
}
# Parameters Converse cannot express but whose given value asks for the default behaviour.
NEUTRAL_VALUES: dict[str, Any] = {
    "n": 1,
    "logprobs": False,
    "parallel_tool_calls": True,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "store": False,
}
EMBEDDING_PARAMS = {"model", "input", "encoding_format", "dimensions", "user", "input_type"}


class BedrockAdapter(Adapter):
    name = "bedrock"
    auth = sigv4.AWSSigV4(SERVICE)
    auth_headers = auth.headers
    request_headers = frozenset({"content-type", "accept"})

    def translate(self, req: ClientRequest, dep: Deployment) -> UpstreamRequest:
        assert dep.upstream is not None
        model_id = model_id_of(dep.model)
        if req.operation == "chat":
            payload = converse_body(req.body, model_id, dep.drop_params)
            action = "converse-stream" if req.stream else "converse"
            accept = "application/vnd.amazon.eventstream" if req.stream else "application/json"
        elif req.operation == "embeddings":
            payload = embedding_body(req.body, model_id, dep.drop_params)
            action, accept = "invoke", "application/json"
        else:
            return super().translate(req, dep)
        body = orjson.dumps(payload)
        path = f"{dep.upstream.base_path}/model/{sigv4.encode_segment(model_id)}/{action}"
        headers = {"content-type": "application/json", "accept": accept}
        return UpstreamRequest(path, headers, body)

    def response(self, body: bytes, req: ClientRequest, dep: Deployment) -> UpstreamResult:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise GatewayError(502, "Bedrock returned invalid JSON") from exc
        if not isinstance(data, dict):
            raise GatewayError(502, "Bedrock returned JSON that is not an object")
        if req.operation == "embeddings":
            out, usage = embedding_response(data, req.body, model_id_of(dep.model))
        else:
            out, usage = chat_response(data, model_id_of(dep.model), json_mode(req.body))
        return UpstreamResult(usage, orjson.dumps(out))

    def error(self, status: int, body: bytes, dep: Deployment) -> GatewayError:
        return bedrock_error(status, body)

    def stream(self, req: ClientRequest, dep: Deployment) -> StreamTranslator | None:
        options = req.body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return ConverseStreamTranslator(model_id_of(dep.model), include_usage, json_mode(req.body))


def model_id_of(model: str) -> str:
    # LiteLLM picks its route with `bedrock/converse/<id>` or `bedrock/invoke/<id>`; here
    # chat always goes through Converse, so the prefix only names the model.
    return model.removeprefix("converse/").removeprefix("invoke/")


# -- chat request ------------------------------------------------------------------------


def is_anthropic(model_id: str) -> bool:
    # Plain ids ("anthropic.claude-...") and cross-region profiles ("us.anthropic.claude-...").
    return model_id.startswith("anthropic.") or ".anthropic." in model_id


def json_mode(body: JSON) -> bool:
    """Whether response_format asks for JSON, answered through the forced JSON tool."""
    fmt = body.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def check_params(body: JSON, allowed: set[str], drop: bool) -> None:
    for key, value in body.items():
        if value is None or key in allowed:
            continue
        if key in NEUTRAL_VALUES and value == NEUTRAL_VALUES[key]:
            continue
        if not drop:
            raise unsupported(key)


def unsupported(param: str, why: str = "") -> GatewayError:
    detail = f": {why}" if why else ""
    return GatewayError(
        400,
        f"Parameter {param!r} is not supported by Bedrock{detail}. "
        "Remove it, or set drop_params: true to have it dropped.",
        param=param,
        code="unsupported_parameter",
    )


def converse_body(body: JSON, model_id: str, drop: bool) -> JSON:
    """An OpenAI chat request as a Converse request body (modelId travels in the path)."""
    check_params(body, CHAT_PARAMS, drop)
    system, messages = convert_messages(body["messages"])
    out: JSON = {"messages": messages}
    if system:
        out["system"] = system
    thinking = thinking_config(body, model_id, drop)
    if is_anthropic(model_id) and anthropic.drops_top_p(body, model_id, drop):
        body = {k: v for k, v in body.items() if k != "top_p"}
    inference = inference_config(body, thinking)
    if inference:
        out["inferenceConfig"] = inference
    tool_config = tools_config(body, messages, thinking is not None, drop)
    if tool_config:
        out["toolConfig"] = tool_config
    if thinking is not None:
        out["additionalModelRequestFields"] = {"thinking": thinking}
    return out


def _number(body: JSON, key: str, kind: type | tuple[type, ...] = (int, float)) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise bad_request(f"'{key}' must be {'an integer' if kind is int else 'a number'}.", key)
    return value


def inference_config(body: JSON, thinking: JSON | None) -> JSON:
    config: JSON = {}
    max_tokens = _number(body, "max_completion_tokens", int) or _number(body, "max_tokens", int)
    if max_tokens is None and thinking is not None:
        max_tokens = thinking["budget_tokens"] + THINKING_ANSWER_TOKENS
    if max_tokens is not None:
        config["maxTokens"] = max_tokens
    for key, name in (("temperature", "temperature"), ("top_p", "topP")):
        value = _number(body, key)
        if value is not None:
            config[name] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad_request("'stop' must be a string or an array of strings.", "stop")
        config["stopSequences"] = stop
    return config


def thinking_config(body: JSON, model_id: str, drop: bool) -> JSON | None:
    """Anthropic extended thinking from `reasoning_effort` (or LiteLLM's `thinking`)."""
    effort = body.get("reasoning_effort")
    thinking = body.get("thinking")
    param = "thinking" if thinking is not None else "reasoning_effort"
    if effort in (None, "none") and thinking is None:
        return None
    if not is_anthropic(model_id):
        if drop:
            return None
        raise unsupported(param, f"only Anthropic models on Bedrock take it, not {model_id!r}")
    if isinstance(thinking, dict):
        if thinking.get("type") != "enabled":
            return None
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
            raise bad_request("'thinking.budget_tokens' must be a positive integer.", "thinking")
        return {"type": "enabled", "budget_tokens": budget}
    if thinking is not None:
        raise bad_request("'thinking' must be an object.", "thinking")
    if not isinstance(effort, str) or effort not in THINKING_BUDGETS:
        raise bad_request(
            f"'reasoning_effort' must be one of {sorted(THINKING_BUDGETS)} or 'none'.",
            "reasoning_effort",
        )
    return {"type": "enabled", "budget_tokens": THINKING_BUDGETS[effort]}


# -- messages ----------------------------------------------------------------------------


def convert_messages(messages: list[JSON]) -> tuple[list[JSON], list[JSON]]:
    """System blocks, and user/assistant turns with same-role neighbours merged (Converse
    requires alternation; OpenAI allows, e.g., several tool messages in a row)."""
    system: list[JSON] = []
    turns: list[JSON] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(text_blocks(message.get("content"), where))
            continue
        if role == "user":
            blocks = user_blocks(message.get("content"), where)
        elif role == "assistant":
            blocks = assistant_blocks(message, where)
        elif role == "tool":
            role, blocks = "user", [tool_result(message, where)]
        else:
            raise bad_request(
                f"{where}.role {role!r} is not supported by Bedrock; use 'tool' messages.",
                f"{where}.role",
            )
        if not blocks:
            continue  # Converse rejects empty content; an empty turn carries nothing
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return system, turns


def _parts(content: Any, where: str) -> list[JSON]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return content
    raise bad_request(f"{where}.content must be a string or an array of parts.", where)


def _text_block(text: Any, where: str) -> list[JSON]:
    if not isinstance(text, str):
        raise bad_request(f"{where}.text must be a string.", where)
    # Converse rejects blank text blocks; a blank part adds nothing to the prompt.
    return [{"text": text}] if text.strip() else []


def _cache_point(part: JSON) -> list[JSON]:
    # Anthropic-style `cache_control` on a part (as LiteLLM accepts it) marks a cache point.
    return [{"cachePoint": {"type": "default"}}] if part.get("cache_control") else []


def text_blocks(content: Any, where: str) -> list[JSON]:
    blocks: list[JSON] = []
    for j, part in enumerate(_parts(content, where)):
        if part.get("type") != "text":
            raise bad_request(
                f"{where}.content[{j}]: only text parts are allowed here.", f"{where}.content"
            )
        blocks += _text_block(part.get("text"), f"{where}.content[{j}]") + _cache_point(part)
    return blocks


def user_blocks(content: Any, where: str) -> list[JSON]:
    blocks: list[JSON] = []
    for j, part in enumerate(_parts(content, where)):
        at = f"{where}.content[{j}]"
        kind = part.get("type")
        if kind == "text":
            blocks += _text_block(part.get("text"), at)
        elif kind == "image_url":
            blocks.append(image_block(part.get("image_url"), at))
        else:
            raise bad_request(f"{at}: content part type {kind!r} is not supported by Bedrock.", at)
        blocks += _cache_point(part)
    return blocks


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[^,;]*)*;base64,(?P<data>.*)", re.S)


def image_block(image: Any, where: str) -> JSON:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise bad_request(f"{where}.image_url.url must be a string.", where)
    match = _DATA_URL.fullmatch(url)
    if match is None:
        # Converse takes image bytes or S3 locations; fetching URLs is not the gateway's job.
        raise bad_request(
            f"{where}: Bedrock takes images as base64 data URLs "
            "(data:image/png;base64,...), not URLs.",
            where,
        )
    fmt = IMAGE_FORMATS.get(match["mime"].lower())
    if fmt is None:
        raise bad_request(
            f"{where}: image type {match['mime']!r} is not supported by Bedrock "
            "(png, jpeg, gif, webp).",
            where,
        )
    return {"image": {"format": fmt, "source": {"bytes": match["data"]}}}


def assistant_blocks(message: JSON, where: str) -> list[JSON]:
    blocks = reasoning_blocks(message.get("thinking_blocks"), where)
    for j, part in enumerate(_parts(message.get("content"), where)):
        at = f"{where}.content[{j}]"
        if part.get("type") == "text":
            blocks += _text_block(part.get("text"), at)
        elif part.get("type") == "refusal":
            blocks += _text_block(part.get("refusal"), at)
        else:
            raise bad_request(f"{at}: assistant content must be text.", at)
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise bad_request(f"{where}.tool_calls must be an array.", f"{where}.tool_calls")
    blocks += [tool_use_block(call, f"{where}.tool_calls[{k}]") for k, call in enumerate(calls)]
    return blocks


def reasoning_blocks(thinking_blocks: Any, where: str) -> list[JSON]:
    """Earlier extended-thinking output, sent back as Anthropic requires with tool use."""
    if not isinstance(thinking_blocks, list):
        return []
    blocks: list[JSON] = []
    for block in thinking_blocks:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "thinking":
            text: JSON = {"text": block.get("thinking", "")}
            if block.get("signature"):
                text["signature"] = block["signature"]
            blocks.append({"reasoningContent": {"reasoningText": text}})
        elif block.get("type") == "redacted_thinking":
            blocks.append({"reasoningContent": {"redactedContent": block.get("data", "")}})
    return blocks


def tool_use_block(call: Any, where: str) -> JSON:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request(f"{where} must have function.name.", where)
    arguments = function.get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) else arguments
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"{where}.function.arguments is not valid JSON.", where) from exc
    if not isinstance(parsed, dict):
        raise bad_request(f"{where}.function.arguments must be a JSON object.", where)
    return {"toolUse": {"toolUseId": call.get("id"), "name": function["name"], "input": parsed}}


def tool_result(message: JSON, where: str) -> JSON:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise bad_request(f"{where}.tool_call_id is required.", f"{where}.tool_call_id")
    texts = []
    for part in _parts(message.get("content"), where):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}: tool results must be text.", f"{where}.content")
        texts.append({"text": part["text"]})
    return {"toolResult": {"toolUseId": call_id, "content": texts or [{"text": ""}]}}


# -- tools -------------------------------------------------------------------------------


def tool_spec(name: str, description: Any, schema: Any) -> JSON:
    spec: JSON = {"name": name, "inputSchema": {"json": schema or {"type": "object"}}}
    if isinstance(description, str) and description:
        spec["description"] = description
    return {"toolSpec": spec}


def client_tools(tools: Any) -> list[JSON]:
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array.", "tools")
    specs = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if function is None or tool.get("type") != "function" or not isinstance(function, dict):
            raise bad_request(f"tools[{i}]: only function tools are supported.", f"tools[{i}]")
        if not isinstance(function.get("name"), str):
            raise bad_request(f"tools[{i}].function.name is required.", f"tools[{i}]")
        specs.append(
            tool_spec(function["name"], function.get("description"), function.get("parameters"))
        )
    return specs


def tool_choice(choice: Any) -> JSON | None:
    """Converse's toolChoice; None leaves it out (auto is the default, and models without
    toolChoice support, such as Llama, accept only its absence)."""
    if choice in (None, "auto"):
        return None
    if choice == "required":
        return {"any": {}}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if isinstance(name, str):
            return {"tool": {"name": name}}
    raise bad_request(
        "'tool_choice' must be 'auto', 'required', 'none' or a function.", "tool_choice"
    )


def _history_tool_names(messages: list[JSON]) -> list[str]:
    names = [
        block["toolUse"]["name"]
        for message in messages
        for block in message["content"]
        if "toolUse" in block
    ]
    return list(dict.fromkeys(names))


def _has_tool_blocks(messages: list[JSON]) -> bool:
    return any(
        "toolUse" in block or "toolResult" in block
        for message in messages
        for block in message["content"]
    )


def tools_config(body: JSON, messages: list[JSON], thinking: bool, drop: bool) -> JSON | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if json_mode(body):
        if tools:
            if not drop:
                raise unsupported("response_format", "it cannot be combined with tools")
        elif thinking:
            if not drop:
                raise unsupported(
                    "response_format", "Anthropic refuses the forced JSON tool while thinking"
                )
        else:
            return json_tool_config(body["response_format"])
    if choice == "none":
        if _has_tool_blocks(messages):
            if not drop:
                raise unsupported(
                    "tool_choice", "'none' cannot be honoured once the conversation has tool calls"
                )
        else:
            return None  # no tools offered: the model cannot call one
        choice = None
    specs = client_tools(tools) if tools else []
    if not specs and _has_tool_blocks(messages):
        specs = [
            tool_spec(name, None, {"type": "object", "properties": {}})
            for name in _history_tool_names(messages)
        ]
        if not specs:  # tool results without their calls: any name satisfies Converse
            specs = [tool_spec("placeholder_tool", None, {"type": "object", "properties": {}})]
    if not specs:
        return None
    config: JSON = {"tools": specs}
    converse_choice = tool_choice(choice)
    if converse_choice is not None:
        config["toolChoice"] = converse_choice
    return config


def json_tool_config(fmt: JSON) -> JSON:
    schema: Any = {"type": "object"}
    description = "Respond with a JSON object."
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad_request(
                "'response_format.json_schema.schema' must be an object.", "response_format"
            )
        schema = spec["schema"]
        description = spec.get("description") or description
    return {
        "tools": [tool_spec(JSON_TOOL, description, schema)],
        "toolChoice": {"tool": {"name": JSON_TOOL}},
    }


# -- chat response -----------------------------------------------------------------------


def chat_response(data: JSON, model: str, json_tool: bool) -> tuple[JSON, Usage]:
    output = data.get("output")
    message = output.get("message") if isinstance(output, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        raise GatewayError(502, "Bedrock answered without output.message.content")
    texts: list[str] = []
    reasoning: list[str] = []
    thinking_blocks: list[JSON] = []
    calls: list[JSON] = []
    for block in message["content"]:
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif isinstance(block.get("toolUse"), dict):
            use = block["toolUse"]
            arguments = orjson.dumps(use.get("input") or {}).decode()
            if json_tool and use.get("name") == JSON_TOOL:
                texts.append(arguments)
            else:
                calls.append(_tool_call(use.get("toolUseId"), use.get("name"), arguments))
        elif isinstance(block.get("reasoningContent"), dict):
            reasoning_block(block["reasoningContent"], reasoning, thinking_blocks)
    stop = data.get("stopReason")
    finish = FINISH_REASONS.get(stop, "stop") if isinstance(stop, str) else "stop"
    if finish == "tool_calls" and not calls:
        finish = "stop"  # the forced JSON tool: the answer is content, not a call
    reply: JSON = {"role": "assistant", "content": "".join(texts) or None, "refusal": None}
    if calls:
        reply["tool_calls"] = calls
    if reasoning:
        reply["reasoning_content"] = "".join(reasoning)
    if thinking_blocks:
        reply["thinking_blocks"] = thinking_blocks
    usage = usage_of(data.get("usage"))
    body = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": reply, "finish_reason": finish, "logprobs": None}],
        "usage": usage.to_openai(),
    }
    return body, usage


def _tool_call(call_id: Any, name: Any, arguments: str) -> JSON:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def reasoning_block(block: JSON, texts: list[str], thinking_blocks: list[JSON]) -> None:
    text = block.get("reasoningText")
    if isinstance(text, dict):
        texts.append(str(text.get("text", "")))
        thinking_blocks.append(
            {
                "type": "thinking",
                "thinking": text.get("text", ""),
                "signature": text.get("signature"),
            }
        )
    elif "redactedContent" in block:
        thinking_blocks.append({"type": "redacted_thinking", "data": block["redactedContent"]})


def usage_of(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage()

    def count(key: str) -> int:
        value = usage.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    cached, written = count("cacheReadInputTokens"), count("cacheWriteInputTokens")
    # Bedrock's inputTokens leaves cache reads and writes out; OpenAI's prompt_tokens has both.
    return Usage(
        prompt_tokens=count("inputTokens") + cached + written,
        completion_tokens=count("outputTokens"),
        cached_tokens=cached,
        cache_write_tokens=written,
    )


# -- errors ------------------------------------------------------------------------------

# Bedrock's exception names and the HTTP status each is answered to the client with.
EXCEPTION_STATUS = {
    "ValidationException": 400,
    "AccessDeniedException": 403,
    "UnrecognizedClientException": 401,
    "InvalidSignatureException": 401,
    "ExpiredTokenException": 401,
    "ResourceNotFoundException": 404,
    "ModelTimeoutException": 408,
    "ThrottlingException": 429,
    "ServiceQuotaExceededException": 429,
    "ModelErrorException": 502,
    "ModelStreamErrorException": 502,
    "InternalServerException": 500,
    "ServiceUnavailableException": 503,
    "ModelNotReadyException": 503,
}
_CONTEXT_TOO_LONG = re.compile(
    r"too long|context (window|length)|too many input tokens|input length .*exceed", re.I
)
# Bedrock answers a bad key or signature with 403, indistinguishable by status from a
# missing model permission; these messages tell the authentication failures apart.
_AUTH_FAILURE = re.compile(
    r"security token included in the request is invalid|signature we calculated does not"
    r"|request signature|token has expired|invalid api key|authorization header",
    re.I,
)
# Statuses Bedrock uses that OpenAI clients have no class for.
_STATUS_FOR_CLIENT = {424: 502}


def exception_name(body: bytes) -> str | None:
    """`__type` from an AWS JSON error body when present ("...#ThrottlingException")."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    kind = data.get("__type") if isinstance(data, dict) else None
    return kind.rpartition("#")[2].split(":")[0] if isinstance(kind, str) else None


def bedrock_error(status: int, body: bytes, name: str | None = None) -> GatewayError:
    """Bedrock's `{"message": ...}` error as the OpenAI error a client expects.

    The exception name normally travels in the x-amzn-errortype header, which adapters do
    not see; the status (and a few telling messages) carry the same information.
    """
    message = extract_message(body) or f"Bedrock returned HTTP {status}"
    name = (name or exception_name(body) or "").split(":")[0]  # "X:http://..." in headers
    if name[:1].islower():  # stream events spell them camelCase
        name = name[0].upper() + name[1:]
    status = EXCEPTION_STATUS.get(name, _STATUS_FOR_CLIENT.get(status, status))
    code = None
    if status == 400 and _CONTEXT_TOO_LONG.search(message):
        code = "context_length_exceeded"
    elif status == 403 and _AUTH_FAILURE.search(message):
        status = 401
    elif status == 400 and re.search(r"too many (requests|tokens)", message, re.I):
        status = 429  # quota errors arrive as 400 ServiceQuotaExceededException
    return GatewayError(status, message, code=code)


# -- embeddings --------------------------------------------------------------------------


def embedding_family(model_id: str) -> str:
    if "titan-embed" in model_id:
        return "titan"
    if "cohere.embed" in model_id:
        return "cohere"
    raise bad_request(
        f"Embeddings through Bedrock support amazon.titan-embed-* and cohere.embed-* models, "
        f"not {model_id!r}.",
        "model",
    )


def embedding_inputs(body: JSON) -> list[str]:
    raw = body.get("input")
    inputs: list[Any] = raw if isinstance(raw, list) else [raw]
    texts = [item for item in inputs if isinstance(item, str)]
    if len(texts) != len(inputs):
        raise bad_request("Bedrock embeddings take text input, not token arrays.", "input")
    return texts


def embedding_body(body: JSON, model_id: str, drop: bool) -> JSON:
    family = embedding_family(model_id)
    allowed = EMBEDDING_PARAMS if family == "cohere" else EMBEDDING_PARAMS - {"input_type"}
    check_params(body, allowed, drop)
    if body.get("encoding_format") not in (None, "float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    inputs = embedding_inputs(body)
    dimensions = _number(body, "dimensions", int)
    if family == "titan":
        # Titan embeds one text per InvokeModel call, and one client request is one upstream
        # call here: a batch would need a fan-out the gateway does not do.
        if len(inputs) != 1:
            raise bad_request(
                "Titan embedding models take one input per request; send a single string.",
                "input",
            )
        out: JSON = {"inputText": inputs[0]}
        if dimensions is not None:
            if "text-v1" in model_id:
                if not drop:
                    raise unsupported("dimensions", f"{model_id} has a fixed size")
            else:
                out["dimensions"] = dimensions
        return out
    out = {"texts": inputs, "input_type": body.get("input_type") or "search_document"}
    if dimensions is not None:
        if "embed-v4" in model_id:
            out["output_dimension"] = dimensions
        elif not drop:
            raise unsupported("dimensions", f"{model_id} has a fixed size")
    return out


def embedding_response(data: JSON, request: JSON, model_id: str) -> tuple[JSON, Usage]:
    vectors: Any
    if embedding_family(model_id) == "titan":
        vectors = [data.get("embedding")]
        count = data.get("inputTextTokenCount")
        usage = (
            Usage(prompt_tokens=count) if isinstance(count, int) else _estimate(request, model_id)
        )
    else:
        found = data.get("embeddings")
        # embed-v3 answers a list of vectors; embed-v4 (and embedding_types) a dict by type.
        vectors = found.get("float") if isinstance(found, dict) else found
        # Cohere on Bedrock reports token counts only in a response header we do not see.
        usage = _estimate(request, model_id)
    if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
        raise GatewayError(502, "Bedrock answered without embeddings")
    encode = _base64_floats if request.get("encoding_format") == "base64" else _identity
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(vector)}
            for i, vector in enumerate(vectors)
        ],
        "model": model_id,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
    }
    return body, usage


def _estimate(request: JSON, model_id: str) -> Usage:
    # Not an OpenAI model: tokens counts with cl100k, an estimate.
    total = sum(tokens.count_text(text, model_id) for text in embedding_inputs(request))
    return Usage(prompt_tokens=total, estimated=True)


def _identity(vector: list[float]) -> Any:
    return vector


def _base64_floats(vector: list[float]) -> Any:
    # What OpenAI sends for encoding_format=base64 (the openai SDK's default): float32 LE.
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# -- streaming ---------------------------------------------------------------------------


class ConverseStreamTranslator(StreamTranslator):
    """ConverseStream's event-stream frames in, OpenAI chat.completion.chunk SSE out."""

    def __init__(self, model: str, include_usage: bool, json_tool: bool) -> None:
        self.usage = Usage()
        self.chunks = ChunkWriter(
            f"chatcmpl-{uuid.uuid4().hex}", model, include_usage=include_usage
        )
        self._decoder = EventStreamDecoder()
        self._json_tool = json_tool
        self._tool_index: dict[int, int] = {}  # Converse block index -> OpenAI tool index
        self._json_blocks: set[int] = set()  # blocks of the forced JSON tool: content
        self._stopped = False  # messageStop seen
        self._handlers: dict[str, Callable[[JSON], bytes]] = {
            "messageStart": self._on_message_start,
            "contentBlockStart": self._on_block_start,
            "contentBlockDelta": self._on_block_delta,
            "messageStop": self._on_message_stop,
            "metadata": self._on_metadata,
        }

    def feed(self, chunk: bytes) -> bytes:
        if self.chunks.closed:
            return b""
        try:
            messages = self._decoder.feed(chunk)
        except EventStreamError as exc:
            return self.chunks.error(GatewayError(502, f"Bedrock stream is corrupt: {exc}"))
        out = bytearray()
        for message in messages:
            out += self._on_frame(message)
            if self.chunks.closed:
                break
        return bytes(out)

    def finish(self) -> bytes:
        if self._decoder.pending or not self._stopped:
            return self.chunks.error(GatewayError(502, "Bedrock stream ended before messageStop"))
        # The usage chunk waits for the end: `metadata` may come before the last frames.
        return self.chunks.done(self.usage.to_openai())

    def _on_frame(self, message: Message) -> bytes:
        kind = message.header(":message-type")
        if kind == "exception":
            name = message.header(":exception-type")
            err = bedrock_error(500, message.payload, name or "InternalServerException")
            return self.chunks.error(err)
        if kind == "error":
            code = message.header(":error-code") or "InternalServerException"
            text = message.header(":error-message") or "Bedrock stream error"
            return self.chunks.error(bedrock_error(500, orjson.dumps({"message": text}), code))
        handler = self._handlers.get(message.header(":event-type") or "")
        if handler is None:
            return b""  # contentBlockStop and events newer than this code carry nothing
        try:
            data = orjson.loads(message.payload)
        except orjson.JSONDecodeError:
            return self.chunks.error(GatewayError(502, "Bedrock stream event is not JSON"))
        return handler(data) if isinstance(data, dict) else b""

    def _on_message_start(self, data: JSON) -> bytes:
        return self.chunks.role()

    def _on_block_start(self, data: JSON) -> bytes:
        start = data.get("start")
        use = start.get("toolUse") if isinstance(start, dict) else None
        if not isinstance(use, dict):
            return b""
        block = data.get("contentBlockIndex", 0)
        if self._json_tool and use.get("name") == JSON_TOOL:
            self._json_blocks.add(block)
            return b""
        index = self._tool_index[block] = len(self._tool_index)
        return self.chunks.tool_call_start(index, use.get("toolUseId"), use.get("name"))

    def _on_block_delta(self, data: JSON) -> bytes:
        delta = data.get("delta")
        if not isinstance(delta, dict):
            return b""
        block = data.get("contentBlockIndex", 0)
        if isinstance(delta.get("text"), str):
            # An empty text delta still opens the stream with the role, as it always has.
            return self.chunks.delta({"content": delta["text"]})
        use = delta.get("toolUse")
        if isinstance(use, dict) and isinstance(use.get("input"), str):
            if block in self._json_blocks:
                return self.chunks.content(use["input"])
            if block in self._tool_index:
                return self.chunks.tool_call_arguments(self._tool_index[block], use["input"])
            return b""
        reasoning = delta.get("reasoningContent")
        if isinstance(reasoning, dict):
            return self._on_reasoning(reasoning)
        return b""

    def _on_reasoning(self, reasoning: JSON) -> bytes:
        if isinstance(reasoning.get("text"), str):
            return self.chunks.reasoning(reasoning["text"])
        # The signature closes a thinking block; clients send it back with tool results.
        if isinstance(reasoning.get("signature"), str):
            block = {"type": "thinking", "thinking": "", "signature": reasoning["signature"]}
            return self.chunks.delta({"thinking_blocks": [block]})
        if "redactedContent" in reasoning:
            block = {"type": "redacted_thinking", "data": reasoning["redactedContent"]}
            return self.chunks.delta({"thinking_blocks": [block]})
        return b""

    def _on_message_stop(self, data: JSON) -> bytes:
        stop = data.get("stopReason")
        finish = FINISH_REASONS.get(stop, "stop") if isinstance(stop, str) else "stop"
        if finish == "tool_calls" and not self._tool_index:
            finish = "stop"  # only the forced JSON tool ran
        self._stopped = True
        return self.chunks.finish(finish)

    def _on_metadata(self, data: JSON) -> bytes:
        self.usage = usage_of(data.get("usage"))
        return b""


ADAPTER = BedrockAdapter()
