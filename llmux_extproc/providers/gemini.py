"""Google AI Studio Gemini (`generateContent`), and the translation Vertex AI reuses.

OpenAI chat and Gemini differ in shape more than in meaning: system messages become one
`systemInstruction`, turns must alternate user/model (so same-role neighbours are merged),
tool results are matched to calls by function *name* (Gemini has no call ids), and tool
schemas are OpenAPI-subset `Schema` objects rather than JSON Schema. The module-level
functions are the translation, free of endpoint and auth details, so `vertex` builds the
same bodies and reads the same answers.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from llmux_extproc.accounting import tokens
from llmux_extproc.accounting.usage import Usage
from llmux_extproc.errors import GatewayError, bad_request
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

Json = dict[str, Any]

# reasoning_effort -> thinkingBudget, in tokens. "none" turns thinking off where the model
# allows it (2.5 Flash); "minimal" is the smallest budget 2.5 Pro accepts.
THINKING_BUDGETS = {"none": 0, "minimal": 128, "low": 1024, "medium": 8192, "high": 24576}

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
    "MODEL_ARMOR": "content_filter",
}

# google.rpc.Code names -> HTTP status, for bodies whose HTTP status got lost (streams).
GOOGLE_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

# OpenAI parameters whose effect Gemini cannot reproduce: 400 unless drop_params.
_UNSUPPORTED = ("logit_bias", "logprobs", "top_logprobs", "audio", "prediction")

# Marks a Gemini thought signature carried inside an OpenAI tool-call id. Gemini 3 rejects
# a replayed function call without its signature, and the id is the one field of a tool
# call every OpenAI client echoes back verbatim.
SIGNATURE_MARK = "__sig__"

# Schema keys Gemini's OpenAPI-subset `Schema` accepts unchanged.
_SCHEMA_PASSTHROUGH = (
    "title",
    "description",
    "nullable",
    "maxItems",
    "minItems",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "default",
    "minimum",
    "maximum",
)
_SCHEMA_TYPES = {"string", "number", "integer", "boolean", "array", "object", "null"}
# Gemini rejects any other `format` (e.g. "email", "uri") with a 400, so others are dropped.
_SCHEMA_FORMATS = {
    "STRING": {"enum", "date-time"},
    "NUMBER": {"float", "double"},
    "INTEGER": {"int32", "int64"},
}
_NATIVE_TOOLS = ("googleSearch", "googleSearchRetrieval", "codeExecution", "urlContext")


# -- endpoint -----------------------------------------------------------------------------


def model_path(dep: Deployment, method: str) -> str:
    """`/v1beta/models/{model}:{method}` under the deployment's base path."""
    assert dep.upstream is not None
    base = dep.upstream.base_path
    # An api_base that already names the API version is taken as the version root.
    if not base.endswith(("/v1beta", "/v1", "/v1alpha")):
        base += "/v1beta"
    model = dep.model.removeprefix("models/")
    return f"{base}/models/{model}:{method}"


class GeminiAdapter(Adapter):
    name = "gemini"
    auth = APIKeyHeader("x-goog-api-key")
    auth_headers = auth.headers

    def translate(self, req: ClientRequest, dep: Deployment) -> UpstreamRequest:
        headers = {"content-type": "application/json"}
        if req.operation == "embeddings":
            body = to_batch_embed_body(req, dep)
            return UpstreamRequest(model_path(dep, "batchEmbedContents"), headers, body)
        method = "streamGenerateContent?alt=sse" if req.stream else "generateContent"
        return UpstreamRequest(
            model_path(dep, method), headers, orjson.dumps(to_gemini_body(req, dep))
        )

    def response(self, body: bytes, req: ClientRequest, dep: Deployment) -> UpstreamResult:
        data = load_json(body, dep)
        if req.operation == "embeddings":
            return from_batch_embed_response(data, req, dep)
        return from_gemini_response(data, req, dep)

    def error(self, status: int, body: bytes, dep: Deployment) -> GatewayError:
        return gemini_error(status, body)

    def stream(self, req: ClientRequest, dep: Deployment) -> StreamTranslator | None:
        return GeminiStream(req, dep) if req.operation == "chat" and req.stream else None


def load_json(body: bytes, dep: Deployment) -> Json:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(502, f"provider {dep.provider!r} returned invalid JSON") from exc
    if not isinstance(data, dict):
        raise GatewayError(502, f"provider {dep.provider!r} returned an unexpected answer")
    return data


# -- request: OpenAI chat -> generateContent ----------------------------------------------


def to_gemini_body(req: ClientRequest, dep: Deployment) -> Json:
    """The generateContent body for an OpenAI chat request (Gemini API and Vertex alike)."""
    body = req.body
    _reject_unsupported(body, dep)
    system, contents = convert_messages(body.get("messages") or [])
    if not contents:
        # Gemini needs at least one turn; a system-only prompt is sent as the user's.
        contents = [{"role": "user", "parts": system or [{"text": ""}]}]
        system = []
    out: Json = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    tools = convert_tools(body)
    if tools:
        out["tools"] = tools
        tool_config = convert_tool_choice(body)
        if tool_config:
            out["toolConfig"] = tool_config
    generation = generation_config(body, dep)
    if generation:
        out["generationConfig"] = generation
    safety = body.get("safety_settings", dep.params.get("safety_settings"))
    if isinstance(safety, list):
        out["safetySettings"] = safety
    return out


def _reject_unsupported(body: Json, dep: Deployment) -> None:
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, {}, [], 0) and not dep.drop_params:
            raise _unsupported(name, dep)
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]) and not dep.drop_params:
        raise _unsupported("modalities", dep)


def _unsupported(name: str, dep: Deployment) -> GatewayError:
    return bad_request(
        f"{name} is not supported by provider {dep.provider!r} (model {dep.model!r}); "
        "remove it, or set drop_params: true to have LLMux drop it.",
        name,
    )


def convert_messages(messages: list[Any]) -> tuple[list[Json], list[Json]]:
    """OpenAI messages -> (systemInstruction parts, alternating user/model contents)."""
    system: list[Json] = []
    contents: list[Json] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, from assistant turns
    for i, message in enumerate(messages):
        role = message.get("role")
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            system.extend(_text_parts(message.get("content"), where))
            continue
        if role == "user":
            parts = _user_parts(message.get("content"), where)
            _append_turn(contents, "user", parts)
        elif role == "assistant":
            parts = _assistant_parts(message, where, call_names)
            _append_turn(contents, "model", parts)
        elif role == "tool":
            _append_turn(contents, "user", [_tool_result(message, where, call_names)])
        elif role == "function":  # the deprecated form of tool results, named directly
            name = message.get("name")
            if not isinstance(name, str) or not name:
                raise bad_request(f"{where}.name is required for function messages.", where)
            _append_turn(contents, "user", [_function_response(name, message.get("content"))])
    return system, contents


def _append_turn(contents: list[Json], role: str, parts: list[Json]) -> None:
    if not parts:
        return  # Gemini rejects a turn without parts
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def _text_parts(content: Any, where: str) -> list[Json]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or an array of parts.", where)
    parts = []
    for j, part in enumerate(content):
        text = part.get("text", part.get("refusal")) if isinstance(part, dict) else None
        if not isinstance(text, str):
            raise bad_request(f"{where}.content[{j}] must be a text part here.", where)
        if text:
            parts.append({"text": text})
    return parts


def _user_parts(content: Any, where: str) -> list[Json]:
    if not isinstance(content, list):
        return _text_parts(content, where)
    parts = []
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise bad_request(f"{here} must be an object.", here)
        converted = _user_part(part, here)
        if converted is not None:
            parts.append(converted)
    return parts


def _user_part(part: Json, where: str) -> Json | None:
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{where}.text must be a string.", where)
        return {"text": text} if text else None
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise bad_request(f"{where}.image_url.url must be a string.", where)
        fmt = image.get("format") if isinstance(image, dict) else None
        return _media_part(url, fmt if isinstance(fmt, str) else None, where)
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise bad_request(f"{where}.input_audio.data must be base64 audio.", where)
        return {
            "inlineData": {"mimeType": f"audio/{audio.get('format', 'wav')}", "data": audio["data"]}
        }
    if kind == "file":
        return _file_part(part.get("file"), where)
    raise bad_request(f"{where}: content part type {kind!r} is not supported by Gemini.", where)


def _media_part(url: str, mime: str | None, where: str) -> Json:
    if url.startswith("data:"):
        header, sep, data = url[len("data:") :].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64" or not media_type:
            raise bad_request(
                f"{where}: data URLs must be 'data:<mime type>;base64,<data>'.", where
            )
        return {"inlineData": {"mimeType": mime or media_type, "data": data}}
    if url.startswith("gs://") or _is_files_api_uri(url):
        file_data = {"fileUri": url}
        guessed = mime or mimetypes.guess_type(urlsplit(url).path)[0]
        if guessed:
            file_data["mimeType"] = guessed
        return {"fileData": file_data}
    raise bad_request(
        f"{where}: Gemini reads images only inline (base64 data URLs) or from gs:// and "
        f"Files API URIs; LLMux does not download {url[:60]!r} for the client. "
        "Send the image as a data URL.",
        where,
    )


def _is_files_api_uri(url: str) -> bool:
    parts = urlsplit(url)
    return (
        parts.scheme == "https"
        and parts.hostname == "generativelanguage.googleapis.com"
        and ("/files/" in parts.path)
    )


def _file_part(file: Any, where: str) -> Json:
    if not isinstance(file, dict):
        raise bad_request(f"{where}.file must be an object.", where)
    data = file.get("file_data")
    if isinstance(data, str):
        if data.startswith("data:"):
            return _media_part(data, None, where)
        filename = file.get("filename")
        mime = mimetypes.guess_type(filename)[0] if isinstance(filename, str) else None
        if not mime:
            raise bad_request(f"{where}.file: send file_data as a data URL with its type.", where)
        return {"inlineData": {"mimeType": mime, "data": data}}
    file_id = file.get("file_id")
    if isinstance(file_id, str):
        return _media_part(file_id, None, where)
    raise bad_request(f"{where}.file needs file_data or file_id.", where)


def _assistant_parts(message: Json, where: str, call_names: dict[str, str]) -> list[Json]:
    parts = _text_parts(message.get("content"), where)
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise bad_request(f"{where}.tool_calls must be an array.", f"{where}.tool_calls")
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        calls = [*calls, {"id": None, "type": "function", "function": legacy}]
    for j, call in enumerate(calls):
        here = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{here}.function.name is required.", here)
        name = function["name"]
        part: Json = {"functionCall": {"name": name, "args": _parse_args(function, here)}}
        call_id = call.get("id")
        if isinstance(call_id, str):
            call_names[call_id] = name
            _, mark, signature = call_id.partition(SIGNATURE_MARK)
            if mark and signature:
                part["thoughtSignature"] = signature
        parts.append(part)
    return parts


def _parse_args(function: Json, where: str) -> Json:
    raw = function.get("arguments")
    if raw in (None, ""):
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        args = orjson.loads(raw) if isinstance(raw, str) else None
    except orjson.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise bad_request(f"{where}.function.arguments must be a JSON object string.", where)
    return args


def _tool_result(message: Json, where: str, call_names: dict[str, str]) -> Json:
    call_id = message.get("tool_call_id")
    name = call_names.get(call_id) if isinstance(call_id, str) else None
    if name is None:
        # Gemini matches results to calls by name: without the call we cannot name it.
        fallback = message.get("name")
        if not isinstance(fallback, str) or not fallback:
            raise bad_request(
                f"{where}.tool_call_id {call_id!r} matches no earlier assistant tool call; "
                "Gemini needs the function name of each tool result.",
                f"{where}.tool_call_id",
            )
        name = fallback
    return _function_response(name, message.get("content"))


def _function_response(name: str, content: Any) -> Json:
    if isinstance(content, list):
        content = "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    text = content if isinstance(content, str) else orjson.dumps(content).decode()
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        parsed = None
    # `response` must be an object; Google's convention for anything else is {"output": ...}.
    response = parsed if isinstance(parsed, dict) else {"output": text}
    return {"functionResponse": {"name": name, "response": response}}


# -- request: tools -----------------------------------------------------------------------


def convert_tools(body: Json) -> list[Json]:
    tools = body.get("tools")
    if tools is None and isinstance(body.get("functions"), list):
        tools = [{"type": "function", "function": f} for f in body["functions"]]
    # OpenAI's web search is Gemini's Google Search grounding tool.
    search: list[Json] = (
        [{"googleSearch": {}}] if body.get("web_search_options") is not None else []
    )
    if tools is None:
        return search
    if not isinstance(tools, list):
        raise bad_request("tools must be an array.", "tools")
    allowed = _allowed_tool_names(body.get("tool_choice"))
    declarations: list[Json] = []
    native: list[Json] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise bad_request(f"tools[{i}] must be an object.", "tools")
        if any(key in tool for key in _NATIVE_TOOLS):  # Gemini's own tools, passed through
            native.append({k: v for k, v in tool.items() if k in _NATIVE_TOOLS})
            continue
        if tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise bad_request(
                f"tools[{i}]: only function tools are supported by Gemini, got "
                f"{tool.get('type')!r}.",
                "tools",
            )
        declaration = function_declaration(tool["function"], f"tools[{i}].function")
        if allowed is None or declaration["name"] in allowed:
            declarations.append(declaration)
    out = [{"functionDeclarations": declarations}] if declarations else []
    return out + native + [t for t in search if t not in native]


def _allowed_tool_names(choice: Any) -> set[str] | None:
    """Names an `allowed_tools` choice with mode auto restricts to (Gemini: by omission)."""
    if not isinstance(choice, dict) or choice.get("type") != "allowed_tools":
        return None
    spec = choice.get("allowed_tools")
    if not isinstance(spec, dict) or spec.get("mode") == "required":
        return None
    return _names_of(spec.get("tools"))


def _names_of(tools: Any) -> set[str]:
    names = set()
    for tool in tools if isinstance(tools, list) else []:
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str):
            names.add(name)
    return names


def function_declaration(function: Json, where: str) -> Json:
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"{where}.name is required.", "tools")
    out: Json = {"name": name}
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    params = function.get("parameters")
    # Gemini rejects an OBJECT schema without properties; a function without arguments
    # is declared without parameters instead.
    if isinstance(params, dict) and params.get("properties"):
        try:
            out["parameters"] = to_gemini_schema(params)
        except SchemaNotConvertible:
            out["parametersJsonSchema"] = json_schema_for_gemini(params)
    return out


def convert_tool_choice(body: Json) -> Json | None:
    choice = body.get("tool_choice", body.get("function_call"))
    if choice is None:
        return None
    mode: str
    names: list[str] = []
    if choice == "auto":
        mode = "AUTO"
    elif choice == "none":
        mode = "NONE"
    elif choice == "required":
        mode = "ANY"
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        spec = choice.get("allowed_tools")
        required = isinstance(spec, dict) and spec.get("mode") == "required"
        mode = "ANY" if required else "AUTO"
        if required:
            names = sorted(_names_of(spec.get("tools") if isinstance(spec, dict) else None))
    elif isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else choice
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise bad_request("tool_choice must name a function.", "tool_choice")
        mode, names = "ANY", [name]
    else:
        raise bad_request(f"tool_choice {choice!r} is not valid.", "tool_choice")
    config: Json = {"mode": mode}
    if names:
        config["allowedFunctionNames"] = names
    return {"functionCallingConfig": config}


# -- request: JSON Schema -> Gemini Schema ------------------------------------------------


class SchemaNotConvertible(Exception):
    """The schema needs JSON Schema features Gemini's `Schema` lacks (recursion, tuples)."""


def to_gemini_schema(schema: Json, *, ordered: bool = False) -> Json:
    """JSON Schema -> Gemini's OpenAPI-subset Schema.

    Keys Gemini would reject (`additionalProperties`, `$schema`, `strict`, unknown formats)
    are dropped; `$ref`s are inlined; `["T", "null"]` and `anyOf [T, null]` become
    `nullable`. `ordered` adds `propertyOrdering`, so structured output keeps the client's
    key order (Gemini otherwise sorts keys).
    """
    defs = {**_mapping(schema.get("definitions")), **_mapping(schema.get("$defs"))}
    return _convert_schema(schema, defs, frozenset(), ordered)


def json_schema_for_gemini(schema: Json) -> Json:
    """The raw-JSON-Schema fallback (`parametersJsonSchema`/`responseJsonSchema`)."""
    return {k: v for k, v in schema.items() if k not in ("$schema", "strict")}


def _mapping(value: Any) -> Json:
    return value if isinstance(value, dict) else {}


def _convert_schema(schema: Any, defs: Json, seen: frozenset[str], ordered: bool) -> Json:
    if not isinstance(schema, dict):
        raise SchemaNotConvertible("schema is not an object")
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        if name in seen or name not in defs:
            raise SchemaNotConvertible(f"recursive or unknown $ref {ref!r}")
        merged = {**defs[name], **{k: v for k, v in schema.items() if k != "$ref"}}
        return _convert_schema(merged, defs, seen | {name}, ordered)
    out: Json = {k: schema[k] for k in _SCHEMA_PASSTHROUGH if k in schema}
    _convert_type(schema.get("type"), out)
    _convert_variants(schema, out, defs, seen, ordered)
    _convert_enum(schema, out)
    properties = schema.get("properties")
    if isinstance(properties, dict) and properties:
        out["properties"] = {
            key: _convert_schema(value, defs, seen, ordered) for key, value in properties.items()
        }
        if ordered:
            out["propertyOrdering"] = list(properties)
        if isinstance(schema.get("required"), list):
            out["required"] = [r for r in schema["required"] if r in properties]
    items = schema.get("items")
    if isinstance(items, dict):
        out["items"] = _convert_schema(items, defs, seen, ordered)
    elif items is not None and items is not True:
        raise SchemaNotConvertible("tuple items")
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt in _SCHEMA_FORMATS.get(out.get("type", ""), set()):
        out["format"] = fmt
    return out


def _convert_type(kind: Any, out: Json) -> None:
    if isinstance(kind, list):
        if "null" in kind:
            out["nullable"] = True
        kinds = [k for k in kind if k != "null"]
        if len(kinds) > 1:
            raise SchemaNotConvertible("union types")
        kind = kinds[0] if kinds else "null"
    if kind is None:
        return
    if not isinstance(kind, str) or kind not in _SCHEMA_TYPES:
        raise SchemaNotConvertible(f"type {kind!r}")
    out["type"] = str(kind).upper()


def _convert_variants(
    schema: Json, out: Json, defs: Json, seen: frozenset[str], ordered: bool
) -> None:
    variants = schema.get("anyOf", schema.get("oneOf"))
    if isinstance(variants, list):
        kept = [v for v in variants if not (isinstance(v, dict) and v.get("type") == "null")]
        if len(kept) < len(variants):
            out["nullable"] = True
        converted = [_convert_schema(v, defs, seen, ordered) for v in kept]
        if len(converted) == 1:  # Optional[X]: X itself, nullable
            out.update({k: v for k, v in converted[0].items() if k not in out})
        elif converted:
            out["anyOf"] = converted
    all_of = schema.get("allOf")
    if isinstance(all_of, list):
        if len(all_of) != 1:
            raise SchemaNotConvertible("allOf")
        single = _convert_schema(all_of[0], defs, seen, ordered)
        out.update({k: v for k, v in single.items() if k not in out})


def _convert_enum(schema: Json, out: Json) -> None:
    values = schema["enum"] if isinstance(schema.get("enum"), list) else None
    if "const" in schema:
        values = [schema["const"]]
    if values is None:
        return
    if None in values:
        out["nullable"] = True
        values = [v for v in values if v is not None]
    if not all(isinstance(v, str) for v in values):
        raise SchemaNotConvertible("non-string enum")  # Gemini enums are strings only
    out["enum"] = values
    out.setdefault("type", "STRING")


# -- request: generationConfig ------------------------------------------------------------


def generation_config(body: Json, dep: Deployment) -> Json:
    config: Json = {}
    simple = (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("top_k", "topK"),
        ("n", "candidateCount"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    )
    for name, key in simple:
        if body.get(name) is not None:
            config[key] = body[name]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        config["stopSequences"] = [stop]
    elif isinstance(stop, list) and stop:
        config["stopSequences"] = stop
    config.update(_response_format(body.get("response_format")))
    thinking = _thinking_config(body.get("reasoning_effort"))
    if thinking is not None:
        config["thinkingConfig"] = thinking
    return config


def _response_format(fmt: Any) -> Json:
    if fmt is None:
        return {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            return {"responseMimeType": "application/json"}
        try:
            return {
                "responseMimeType": "application/json",
                "responseSchema": to_gemini_schema(schema, ordered=True),
            }
        except SchemaNotConvertible:
            return {
                "responseMimeType": "application/json",
                "responseJsonSchema": json_schema_for_gemini(schema),
            }
    raise bad_request(f"response_format type {kind!r} is not supported.", "response_format")


def _thinking_config(effort: Any) -> Json | None:
    if effort is None:
        return None
    if not isinstance(effort, str) or effort not in THINKING_BUDGETS:
        raise bad_request(
            f"reasoning_effort must be one of {sorted(THINKING_BUDGETS)}, got {effort!r}.",
            "reasoning_effort",
        )
    budget = THINKING_BUDGETS[effort]
    return {"thinkingBudget": budget, "includeThoughts": budget > 0}


# -- response: generateContent -> OpenAI chat completion ----------------------------------


def gemini_usage(meta: Any) -> Usage:
    if not isinstance(meta, dict):
        return Usage()
    thoughts = _count(meta.get("thoughtsTokenCount"))
    return Usage(
        # Tool-use prompt tokens (search results, fetched URLs) are billed as input.
        prompt_tokens=_count(meta.get("promptTokenCount"))
        + _count(meta.get("toolUsePromptTokenCount")),
        completion_tokens=_count(meta.get("candidatesTokenCount")) + thoughts,
        cached_tokens=_count(meta.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def blocked_prompt_error(data: Json) -> GatewayError | None:
    """A 200 answer that refused the prompt itself: no candidates, a blockReason."""
    feedback = data.get("promptFeedback")
    reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
    if not reason or data.get("candidates"):
        return None
    detail = feedback.get("blockReasonMessage") if isinstance(feedback, dict) else None
    message = f"The prompt was blocked by the provider's content filter (blockReason: {reason})."
    if isinstance(detail, str) and detail:
        message += f" {detail}"
    return GatewayError(
        400,
        message,
        type="invalid_request_error",
        param="messages",
        code="content_policy_violation",
    )


@dataclass(slots=True)
class Turn:
    """One candidate's output, in OpenAI terms."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[Json] = field(default_factory=list)


def read_parts(
    parts: Any, turn: Turn, call_seed: str, *, single_call: bool = False
) -> tuple[list[str], list[str], list[Json]]:
    """Add a candidate's parts to `turn`; returns what they added (text, reasoning, calls)."""
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[Json] = []
    for part in parts if isinstance(parts, list) else []:
        if not isinstance(part, dict):
            continue
        call = part.get("functionCall")
        if isinstance(call, dict):
            if single_call and turn.tool_calls:
                continue  # parallel_tool_calls=false: the client asked for one call per turn
            openai_call = _openai_tool_call(call, part, call_seed, len(turn.tool_calls))
            turn.tool_calls.append(openai_call)
            calls.append(openai_call)
        elif isinstance(part.get("text"), str) and part["text"]:
            (reasoning if part.get("thought") else text).append(part["text"])
    turn.text.extend(text)
    turn.reasoning.extend(reasoning)
    return text, reasoning, calls


def _openai_tool_call(call: Json, part: Json, seed: str, index: int) -> Json:
    name = call.get("name") if isinstance(call.get("name"), str) else ""
    args = orjson.dumps(call.get("args") or {}, option=orjson.OPT_SORT_KEYS).decode()
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        # Gemini gives no ids; a digest keeps ids identical between a streamed and an
        # unstreamed answer, and distinct between calls and between responses.
        digest = hashlib.sha256(f"{seed}\0{index}\0{name}\0{args}".encode()).hexdigest()
        call_id = f"call_{digest[:24]}"
    signature = part.get("thoughtSignature")
    if isinstance(signature, str) and signature:
        call_id = f"{call_id}{SIGNATURE_MARK}{signature}"
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def finish_reason(reason: Any, has_tool_calls: bool) -> str | None:
    if not isinstance(reason, str) or reason == "FINISH_REASON_UNSPECIFIED":
        return None
    if has_tool_calls and reason == "STOP":
        return "tool_calls"
    return FINISH_REASONS.get(reason, "tool_calls" if has_tool_calls else "stop")


def response_id(data: Json, req: ClientRequest) -> str:
    rid = data.get("responseId")
    if not isinstance(rid, str) or not rid:
        rid = hashlib.sha256(req.raw).hexdigest()[:24]
    return f"chatcmpl-{rid}"


def from_gemini_response(data: Json, req: ClientRequest, dep: Deployment) -> UpstreamResult:
    blocked = blocked_prompt_error(data)
    if blocked is not None:
        raise blocked
    candidates = data.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        raise GatewayError(502, f"provider {dep.provider!r} returned no candidates")
    usage = gemini_usage(data.get("usageMetadata"))
    rid = response_id(data, req)
    single_call = req.body.get("parallel_tool_calls") is False
    choices = []
    for i, candidate in enumerate(candidates):
        if not isinstance(candidate, dict):
            continue
        index = candidate.get("index", i)
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        turn = Turn()
        read_parts(parts, turn, f"{rid}\0{index}", single_call=single_call)
        message: Json = {
            "role": "assistant",
            "content": "".join(turn.text) if turn.text or not turn.tool_calls else None,
        }
        if turn.reasoning:
            message["reasoning_content"] = "".join(turn.reasoning)
        if turn.tool_calls:
            message["tool_calls"] = turn.tool_calls
        reason = finish_reason(candidate.get("finishReason"), bool(turn.tool_calls))
        choices.append(
            {
                "index": index,
                "message": message,
                "finish_reason": reason or "stop",
                "logprobs": None,
            }
        )
    body = {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": data.get("modelVersion") or dep.model,
        "choices": choices,
        "usage": usage.to_openai(),
    }
    return UpstreamResult(usage, orjson.dumps(body))


# -- errors -------------------------------------------------------------------------------


def google_error_fields(body: bytes) -> Json | None:
    """The `error` object of a Google API error body (also in its one-element-list form)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, list) and data:
        data = data[0]
    err = data.get("error") if isinstance(data, dict) else None
    return err if isinstance(err, dict) else None


def gemini_error(status: int, body: bytes) -> GatewayError:
    """A Google API error answer -> the OpenAI error, keeping Google's message."""
    err = google_error_fields(body) or {}
    message = err.get("message") if isinstance(err.get("message"), str) else None
    message = message or extract_message(body) or f"upstream returned HTTP {status}"
    return google_error(status, message, err)


def google_error(status: int, message: str, err: Json) -> GatewayError:
    google_status = err.get("status")
    if status < 400:
        status = GOOGLE_STATUS.get(str(google_status), 502)
    code: str | None = None
    reasons = {d.get("reason") for d in err.get("details") or [] if isinstance(d, dict)}
    lowered = message.lower()
    if "API_KEY_INVALID" in reasons or "api key not valid" in lowered:
        # Gemini answers a bad key with 400 INVALID_ARGUMENT; clients expect 401.
        status, code = 401, "invalid_api_key"
    elif "exceeds the maximum number of tokens" in lowered or "input token count" in lowered:
        status, code = 400, "context_length_exceeded"
    elif google_status == "RESOURCE_EXHAUSTED" or status == 429:
        code = "rate_limit_exceeded"
    return GatewayError(status, message, code=code)


# -- streaming ----------------------------------------------------------------------------


class GeminiStream(StreamTranslator):
    """Gemini `alt=sse` events -> OpenAI chat.completion.chunk events.

    Each Gemini event is a whole GenerateContentResponse holding only the new parts;
    usageMetadata (cumulative) may ride on any of them. Bytes are buffered until a full
    line, so splits anywhere, including inside a UTF-8 character, are harmless.
    """

    def __init__(self, req: ClientRequest, dep: Deployment) -> None:
        self.usage = Usage()
        self._req = req
        self._buffer = b""
        self._data: list[bytes] = []
        self._other: list[bytes] = []  # non-SSE lines: an error body sent as plain JSON
        self._id: str | None = None
        self._turns: dict[int, Turn] = {}  # per candidate index
        options = req.body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        # The id is the response's own once its first event arrives.
        self.chunks = ChunkWriter(response_id({}, req), dep.model, include_usage=include_usage)
        self._single_call = req.body.get("parallel_tool_calls") is False

    def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        out = []
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if not sep:
                break
            self._buffer = rest
            out.append(self._line(line.rstrip(b"\r")))
        return b"".join(out)

    def finish(self) -> bytes:
        out = [self._line(self._buffer.rstrip(b"\r")) if self._buffer else b""]
        self._buffer = b""
        out.append(self._dispatch())
        if self._other:
            out.append(self.chunks.error(gemini_error(502, b"\n".join(self._other))))
        unfinished = [i for i in self._turns if not self.chunks.finished(i)]
        if not self._turns or unfinished:
            err = GatewayError(502, "the provider's stream ended before the answer did")
            out.append(self.chunks.error(err))
        out.append(self.chunks.done(self.usage.to_openai()))
        return b"".join(out)

    def _line(self, line: bytes) -> bytes:
        if not line:
            return self._dispatch()
        if line.startswith(b"data:"):
            data = line[5:]
            self._data.append(data[1:] if data.startswith(b" ") else data)
        elif not line.startswith((b":", b"event:", b"id:", b"retry:")):
            self._other.append(line)
        return b""

    def _dispatch(self) -> bytes:
        if not self._data:
            return b""
        raw = b"\n".join(self._data)
        self._data = []
        if self.chunks.closed:
            return b""
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self.chunks.error(GatewayError(502, "the provider sent an invalid stream event"))
        if isinstance(event, list) and event:
            event = event[0]
        if not isinstance(event, dict):
            return b""
        if isinstance(event.get("error"), dict):
            return self.chunks.error(gemini_error(502, raw))
        return self._response(event)

    def _response(self, event: Json) -> bytes:
        if self._id is None:
            self._id = self.chunks.id = response_id(event, self._req)
        if isinstance(event.get("modelVersion"), str):
            self.chunks.model = event["modelVersion"]
        if "usageMetadata" in event:
            self.usage = gemini_usage(event["usageMetadata"])
        blocked = blocked_prompt_error(event)
        if blocked is not None:
            return self.chunks.error(blocked)
        out = []
        for i, candidate in enumerate(event.get("candidates") or []):
            if isinstance(candidate, dict):
                out.append(self._candidate(candidate, i))
        return b"".join(out)

    def _candidate(self, candidate: Json, position: int) -> bytes:
        index = candidate.get("index", position)
        turn = self._turns.setdefault(index, Turn())
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        seed = f"{self._id}\0{index}"
        text, reasoning, calls = read_parts(parts, turn, seed, single_call=self._single_call)
        delta: Json = {}
        if reasoning:
            delta["reasoning_content"] = "".join(reasoning)
        if text:
            delta["content"] = "".join(text)
        if calls:
            first = len(turn.tool_calls) - len(calls)
            delta["tool_calls"] = [{"index": first + k, **c} for k, c in enumerate(calls)]
        reason = finish_reason(candidate.get("finishReason"), bool(turn.tool_calls))
        out = self.chunks.delta(delta, index) if delta else b""
        return out + self.chunks.finish(reason, index) if reason else out


# -- embeddings ---------------------------------------------------------------------------


def embedding_inputs(req: ClientRequest, dep: Deployment) -> list[str]:
    raw = req.body.get("input")
    items: list[Any] = raw if isinstance(raw, list) else [raw]
    inputs = [item for item in items if isinstance(item, str)]
    if len(inputs) != len(items):
        raise bad_request(
            f"provider {dep.provider!r} embeds text only; token-id input is not supported.",
            "input",
        )
    fmt = req.body.get("encoding_format")
    if fmt not in (None, "float", "base64"):
        raise bad_request("encoding_format must be 'float' or 'base64'.", "encoding_format")
    return inputs


def to_batch_embed_body(req: ClientRequest, dep: Deployment) -> bytes:
    model = f"models/{dep.model.removeprefix('models/')}"
    dims = req.body.get("dimensions")
    requests = []
    for text in embedding_inputs(req, dep):
        item: Json = {"model": model, "content": {"parts": [{"text": text}]}}
        if dims is not None:
            item["outputDimensionality"] = dims
        requests.append(item)
    return orjson.dumps({"requests": requests})


def from_batch_embed_response(data: Json, req: ClientRequest, dep: Deployment) -> UpstreamResult:
    embeddings = data.get("embeddings")
    if not isinstance(embeddings, list):
        raise GatewayError(502, f"provider {dep.provider!r} returned no embeddings")
    vectors = [e.get("values") or [] if isinstance(e, dict) else [] for e in embeddings]
    # Gemini reports no token counts for embeddings: count them as OpenAI would, flagged.
    prompt = sum(tokens.count_text(text, dep.model) for text in embedding_inputs(req, dep))
    usage = Usage(prompt_tokens=prompt, estimated=True)
    return UpstreamResult(usage, openai_embeddings(vectors, req, dep, usage))


def openai_embeddings(
    vectors: list[list[float]], req: ClientRequest, dep: Deployment, usage: Usage
) -> bytes:
    as_base64 = req.body.get("encoding_format") == "base64"
    data = [
        {
            "object": "embedding",
            "index": i,
            # base64 is little-endian float32, what OpenAI's SDKs decode (and ask for by default).
            "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
            if as_base64
            else v,
        }
        for i, v in enumerate(vectors)
    ]
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": dep.model,
            "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
        }
    )


ADAPTER = GeminiAdapter()
