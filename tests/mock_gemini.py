"""A Gemini API / Vertex AI upstream for tests, speaking Google's REST wire format.

It checks what LLMux sends as strictly as Google would: generateContent bodies are
validated with the google-genai SDK's pydantic types (which forbid unknown fields) plus the
rules those types cannot express, Gemini API calls need `x-goog-api-key`, Vertex calls a
bearer token this mock issued, and its OAuth endpoint verifies the RS256 signature of the
JWT assertion with the test key's public key. Answers follow tests/corpus.py: a request
offering tools whose last turn is the user's gets a call of every offered function;
anything else gets text. Prompts containing a TRIGGER_* word script failures.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import orjson
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.genai import types
from pydantic import BaseModel, ValidationError

from tests.harness import json_response

Json = dict[str, Any]

API_KEY = "gemini-test-key-123"
TEXT = "Hello from Gemini: héllo wörld ✓ 日本語"
THOUGHT = "Counting the letters… r, r, r."
TOOL_ANSWER = "It is 18C and sunny in Paris."
SIGNATURE = base64.b64encode(b"opaque-thought-signature").decode()
VERTEX_PATH = re.compile(
    r"^/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
    r"/publishers/(?P<publisher>google|anthropic)/models/(?P<model>[^:/]+):(?P<method>\w+)$"
)
GEMINI_PATH = re.compile(r"^/v1beta/models/(?P<model>[^:/]+):(?P<method>\w+)$")
REQUEST_FIELDS: dict[str, type[BaseModel]] = {
    "systemInstruction": types.Content,
    "toolConfig": types.ToolConfig,
    "generationConfig": types.GenerationConfig,
}
LIST_FIELDS: dict[str, type[BaseModel]] = {
    "contents": types.Content,
    "tools": types.Tool,
    "safetySettings": types.SafetySetting,
}
SCHEMA_TYPES = {"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL"}
# Keys of JSON Schema that Gemini's Schema rejects.
SCHEMA_REJECTED = {"additionalProperties", "$schema", "$ref", "$defs", "strict", "const"}


class GoogleError(Exception):
    def __init__(self, code: int, status: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code, self.status, self.message, self.reason = code, status, message, reason

    def response(self) -> web.Response:
        error: Json = {"code": self.code, "message": self.message, "status": self.status}
        if self.reason:
            error["details"] = [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": self.reason}
            ]
        return json_response({"error": error}, self.code)


# -- request validation ---------------------------------------------------------------------


def validate_generate_request(body: Any) -> list[str]:
    """Problems Gemini would answer 400 INVALID_ARGUMENT for; empty when the body is good."""
    if not isinstance(body, dict):
        return ["body is not an object"]
    problems = [f"unknown field {k!r}" for k in body if k not in {*REQUEST_FIELDS, *LIST_FIELDS}]
    for key, model in REQUEST_FIELDS.items():
        if key in body:
            problems += _validate(model, body[key], key)
    for key, model in LIST_FIELDS.items():
        value = body.get(key, [])
        if not isinstance(value, list):
            problems.append(f"{key} is not a list")
            continue
        for i, item in enumerate(value):
            problems += _validate(model, item, f"{key}[{i}]")
    contents = body.get("contents")
    if not contents:
        problems.append("contents is not specified")
    else:
        problems += _check_turns(contents)
    for i, tool in enumerate(body.get("tools") or []):
        for j, decl in enumerate(tool.get("functionDeclarations") or []):
            if "parameters" in decl:
                problems += _check_schema(decl["parameters"], f"tools[{i}].fd[{j}].parameters")
    generation = body.get("generationConfig") or {}
    if "responseSchema" in generation:
        problems += _check_schema(generation["responseSchema"], "responseSchema")
    return problems


def _validate(model: type[BaseModel], value: Any, where: str) -> list[str]:
    try:
        # JSON mode, so bytes fields are checked as base64 the way the REST API reads them.
        model.model_validate_json(orjson.dumps(value))
    except ValidationError as exc:
        return [f"{where}: {exc}"]
    return []


def _check_turns(contents: list[Any]) -> list[str]:
    problems = []
    previous = None
    for i, content in enumerate(contents):
        role = content.get("role") if isinstance(content, dict) else None
        if role not in ("user", "model"):
            problems.append(f"contents[{i}].role must be user or model, got {role!r}")
        if role == previous:
            problems.append(f"contents[{i}]: consecutive {role} turns")
        previous = role
        parts = content.get("parts") if isinstance(content, dict) else None
        if not parts:
            problems.append(f"contents[{i}].parts must not be empty")
        for j, part in enumerate(parts or []):
            if len([k for k in part if k not in ("thought", "thoughtSignature")]) != 1:
                problems.append(f"contents[{i}].parts[{j}] must hold exactly one kind of data")
            response = part.get("functionResponse")
            if response is not None and not isinstance(response.get("response"), dict):
                problems.append(f"contents[{i}].parts[{j}].functionResponse.response")
    return problems


def _check_schema(schema: Any, where: str) -> list[str]:
    if not isinstance(schema, dict):
        return [f"{where} is not an object"]
    problems = [f"{where}.{k} is not allowed" for k in schema if k in SCHEMA_REJECTED]
    kind = schema.get("type")
    if kind is not None and kind not in SCHEMA_TYPES:
        problems.append(f"{where}.type {kind!r} is not an uppercase Gemini type")
    if kind == "OBJECT" and "properties" in schema and not schema["properties"]:
        problems.append(f"{where}.properties should be non-empty for OBJECT type")
    for key, sub in (schema.get("properties") or {}).items():
        problems += _check_schema(sub, f"{where}.properties.{key}")
    if "items" in schema:
        problems += _check_schema(schema["items"], f"{where}.items")
    for k, sub in enumerate(schema.get("anyOf") or []):
        problems += _check_schema(sub, f"{where}.anyOf[{k}]")
    return problems


# -- answers ----------------------------------------------------------------------------------


def _last_turn_text(body: Json) -> str:
    contents = body.get("contents") or [{}]
    return " ".join(p.get("text", "") for p in contents[-1].get("parts", []) if "text" in p)


def _prompt_text(body: Json) -> str:
    texts = [p.get("text", "") for c in body.get("contents") or [] for p in c.get("parts", [])]
    return " ".join(texts)


def trigger_error(text: str) -> GoogleError | Json | None:
    """A scripted failure for a TRIGGER_* word: an error, or a 200 body that blocks."""
    if "TRIGGER_CONTEXT" in text:
        return GoogleError(
            400,
            "INVALID_ARGUMENT",
            "The input token count (1200000) exceeds the maximum number of tokens allowed "
            "(1048576).",
        )
    if "TRIGGER_RATE" in text:
        return GoogleError(
            429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."
        )
    if "TRIGGER_UNAVAILABLE" in text:
        return GoogleError(503, "UNAVAILABLE", "The model is overloaded. Please try later.")
    if "TRIGGER_BLOCK" in text:
        return {
            "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
            "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        }
    return None


def _function_names(body: Json) -> list[str]:
    return [d["name"] for t in body.get("tools") or [] for d in t.get("functionDeclarations") or []]


def _wants_calls(body: Json) -> bool:
    last = (body.get("contents") or [{}])[-1]
    mode = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("mode")
    return (
        bool(_function_names(body))
        and mode != "NONE"
        and last.get("role") == "user"
        and not any("functionResponse" in p for p in last.get("parts", []))
    )


def sample(schema: Json) -> Any:
    """A value matching a (Gemini or JSON) schema, for structured-output answers."""
    kind = str(schema.get("type", "object")).upper()
    if schema.get("enum"):
        return schema["enum"][0]
    if kind == "OBJECT":
        return {k: sample(v) for k, v in (schema.get("properties") or {}).items()}
    if kind == "ARRAY":
        return [sample(schema.get("items") or {"type": "STRING"})]
    return {"STRING": "Ada", "INTEGER": 36, "NUMBER": 1.5, "BOOLEAN": True}.get(kind)


def _answer_text(body: Json) -> str:
    generation = body.get("generationConfig") or {}
    if generation.get("responseMimeType") == "application/json":
        schema = generation.get("responseSchema") or generation.get("responseJsonSchema")
        return orjson.dumps(sample(schema) if schema else {"a": 1}).decode()
    last = (body.get("contents") or [{}])[-1]
    if any("functionResponse" in p for p in last.get("parts", [])):
        return TOOL_ANSWER
    return TEXT


def candidate_parts(body: Json) -> list[Json]:
    """The parts of one candidate's answer, in the order Gemini would send them."""
    parts: list[Json] = []
    thinking = (body.get("generationConfig") or {}).get("thinkingConfig") or {}
    if thinking.get("includeThoughts"):
        parts.append({"text": THOUGHT, "thought": True})
    if _wants_calls(body):
        for k, name in enumerate(_function_names(body)):
            part: Json = {"functionCall": {"name": name, "args": {"city": "Paris"}}}
            if k == 0:  # Gemini 3 signs the first call of a turn
                part["thoughtSignature"] = SIGNATURE
            parts.append(part)
        return parts
    parts.append({"text": _answer_text(body)})
    return parts


def usage_metadata(body: Json, candidates: int) -> Json:
    prompt = 10 + len(_prompt_text(body).split())
    thinking = (body.get("generationConfig") or {}).get("thinkingConfig") or {}
    thoughts = 12 if thinking.get("includeThoughts") else 0
    meta: Json = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": 7 * candidates,
        "totalTokenCount": prompt + 7 * candidates + thoughts,
    }
    if thoughts:
        meta["thoughtsTokenCount"] = thoughts
    return meta


def generate(body: Json, model: str) -> Json:
    count = (body.get("generationConfig") or {}).get("candidateCount") or 1
    parts = candidate_parts(body)
    return {
        "candidates": [
            {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": i}
            for i in range(count)
        ],
        "usageMetadata": usage_metadata(body, count),
        "modelVersion": model,
        "responseId": "resp-" + hashlib.sha256(orjson.dumps(body)).hexdigest()[:12],
    }


def stream_events(answer: Json) -> Iterator[Json]:
    """Split one answer the way Gemini streams it: a part (or a slice of text) per event,
    usage on every event, the finish reason on the last."""
    meta, rid, model = answer["usageMetadata"], answer["responseId"], answer["modelVersion"]
    pieces: list[tuple[int, Json]] = []
    for cand in answer["candidates"]:
        for part in cand["content"]["parts"]:
            text = part.get("text")
            if text and not part.get("thought") and len(text) > 8:
                cut = len(text) // 3
                pieces += [
                    (cand["index"], {"text": text[:cut]}),
                    (cand["index"], {"text": text[cut:]}),
                ]
            else:
                pieces.append((cand["index"], part))
    for index, part in pieces:
        yield {
            "candidates": [{"content": {"role": "model", "parts": [part]}, "index": index}],
            "usageMetadata": {k: v for k, v in meta.items() if k == "promptTokenCount"},
            "modelVersion": model,
            "responseId": rid,
        }
    yield {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": ""}]},
                "finishReason": "STOP",
                "index": c["index"],
            }
            for c in answer["candidates"]
        ],
        "usageMetadata": meta,
        "modelVersion": model,
        "responseId": rid,
    }


def sse(events: Iterator[Json]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\r\n\r\n" for e in events)


def vector(text: str, dims: int) -> list[float]:
    seed = hashlib.sha256(text.encode()).digest()
    return [(seed[i % len(seed)] - 128) / 128 for i in range(dims)]


# -- Claude on Vertex -----------------------------------------------------------------------


def claude_answer(body: Json, model: str) -> Json:
    messages = body.get("messages") or [{}]
    last = messages[-1]
    content = last.get("content")
    has_result = isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content
    )
    tools = [t["name"] for t in body.get("tools") or [] if "name" in t]
    blocks: list[Json]
    if tools and last.get("role") == "user" and not has_result:
        blocks = [
            {"type": "tool_use", "id": f"toolu_{k}", "name": n, "input": {"city": "Paris"}}
            for k, n in enumerate(tools)
        ]
        stop = "tool_use"
    else:
        blocks = [{"type": "text", "text": TOOL_ANSWER if has_result else TEXT}]
        stop = "end_turn"
    return {
        "id": "msg_vertex_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 21, "output_tokens": 9},
    }


def claude_events(answer: Json) -> Iterator[tuple[str, Json]]:
    start = {
        **answer,
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": 21, "output_tokens": 1},
    }
    yield "message_start", {"type": "message_start", "message": start}
    for i, block in enumerate(answer["content"]):
        if block["type"] == "text":
            yield (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": i,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            empty = {**block, "input": {}}
            yield (
                "content_block_start",
                {"type": "content_block_start", "index": i, "content_block": empty},
            )
            delta = {
                "type": "input_json_delta",
                "partial_json": orjson.dumps(block["input"]).decode(),
            }
        yield "content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": i}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": answer["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": 9},
        },
    )
    yield "message_stop", {"type": "message_stop"}


# -- the server -----------------------------------------------------------------------------


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class GeminiMock:
    """One mock for the Gemini API, Vertex AI and Google's OAuth endpoint."""

    public_key: rsa.RSAPublicKey | None = None
    api_key: str = API_KEY
    token_lifetime: int = 3600
    refresh_token: str = "user-refresh-token"
    issued: set[str] = field(default_factory=set)
    token_requests: int = 0
    token_delay: float = 0.0
    fail_tokens: bool = False

    async def handler(self, request: web.Request, body: bytes) -> web.StreamResponse:
        try:
            if request.path == "/token":
                return await self._token(request, body)
            if request.path.startswith("/computeMetadata/"):
                return self._metadata(request)
            match = GEMINI_PATH.match(request.path)
            if match:
                if request.headers.get("x-goog-api-key") != self.api_key:
                    raise GoogleError(
                        400,
                        "INVALID_ARGUMENT",
                        "API key not valid. Please pass a valid API key.",
                        "API_KEY_INVALID",
                    )
                return await self._gemini(request, body, match["model"], match["method"])
            match = VERTEX_PATH.match(request.path)
            if match:
                self._check_bearer(request)
                if match["publisher"] == "anthropic":
                    return await self._claude(request, body, match["model"], match["method"])
                return await self._gemini(request, body, match["model"], match["method"])
            raise GoogleError(404, "NOT_FOUND", f"path {request.path} not found")
        except GoogleError as err:
            return err.response()

    # -- OAuth --

    async def _token(self, request: web.Request, body: bytes) -> web.Response:
        import asyncio

        self.token_requests += 1
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if self.fail_tokens:
            return json_response({"error": "internal_failure"}, 500)
        if form.get("grant_type") == "refresh_token":
            if form.get("refresh_token") != self.refresh_token:
                return json_response(
                    {"error": "invalid_grant", "error_description": "Bad Request"}, 400
                )
            return self._issue()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return json_response({"error": "unsupported_grant_type"}, 400)
        problem = self._check_assertion(
            form.get("assertion", ""), str(request.url.with_query(None))
        )
        if problem:
            return json_response({"error": "invalid_grant", "error_description": problem}, 400)
        return self._issue()

    def _check_assertion(self, assertion: str, audience: str) -> str | None:
        try:
            header_b64, claims_b64, signature_b64 = assertion.split(".")
            header = orjson.loads(_b64url_decode(header_b64))
            claims = orjson.loads(_b64url_decode(claims_b64))
            signature = _b64url_decode(signature_b64)
        except ValueError:
            return "Malformed JWT."
        if header.get("alg") != "RS256" or self.public_key is None:
            return "Invalid JWT algorithm."
        try:
            self.public_key.verify(
                signature,
                f"{header_b64}.{claims_b64}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            return "Invalid JWT Signature."
        now = time.time()
        if claims.get("aud") != audience:
            return f"Invalid JWT: audience {claims.get('aud')!r} is not {audience!r}."
        if claims.get("scope") != "https://www.googleapis.com/auth/cloud-platform":
            return "Invalid JWT: bad scope."
        if (
            not (claims.get("iat", 0) - 60 <= now < claims.get("exp", 0))
            or claims["exp"] - claims["iat"] > 3600
        ):
            return "Invalid JWT: Token must be a short-lived token (60 minutes)."
        if not str(claims.get("iss", "")).endswith(".iam.gserviceaccount.com"):
            return "Invalid JWT: bad issuer."
        return None

    def _issue(self) -> web.Response:
        token = f"ya29.mock-{len(self.issued) + 1}"
        self.issued.add(token)
        return json_response(
            {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        )

    def _metadata(self, request: web.Request) -> web.Response:
        if request.headers.get("metadata-flavor") != "Google":
            return web.Response(status=403, text="Missing Metadata-Flavor:Google header.")
        if request.path.endswith("/project/project-id"):
            return web.Response(text="metadata-project")
        self.token_requests += 1
        return self._issue()

    def _check_bearer(self, request: web.Request) -> None:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[len("Bearer ") :] not in self.issued:
            raise GoogleError(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token.",
            )

    # -- Gemini --

    async def _gemini(
        self, request: web.Request, body: bytes, model: str, method: str
    ) -> web.StreamResponse:
        data = orjson.loads(body)
        if method == "batchEmbedContents":
            return self._batch_embed(data, model)
        if method == "predict":
            return self._predict(data)
        if method not in ("generateContent", "streamGenerateContent"):
            raise GoogleError(404, "NOT_FOUND", f"method {method} not found")
        problems = validate_generate_request(data)
        if problems:
            raise GoogleError(400, "INVALID_ARGUMENT", "; ".join(problems))
        scripted = trigger_error(_last_turn_text(data))
        if isinstance(scripted, GoogleError):
            raise scripted
        answer = scripted if scripted is not None else generate(data, model)
        if method == "generateContent":
            return json_response(answer)
        if request.query.get("alt") != "sse":
            raise GoogleError(400, "INVALID_ARGUMENT", "this mock streams only with alt=sse")
        events = iter([answer]) if scripted is not None else stream_events(answer)
        return await _write_split(request, sse(events), "text/event-stream")

    def _batch_embed(self, data: Json, model: str) -> web.Response:
        out = []
        for item in data.get("requests") or []:
            if item.get("model") != f"models/{model}":
                raise GoogleError(400, "INVALID_ARGUMENT", "model of each request must match")
            text = item["content"]["parts"][0]["text"]
            out.append({"values": vector(text, item.get("outputDimensionality") or 8)})
        return json_response({"embeddings": out})

    def _predict(self, data: Json) -> web.Response:
        dims = (data.get("parameters") or {}).get("outputDimensionality") or 8
        predictions = [
            {
                "embeddings": {
                    "values": vector(i["content"], dims),
                    "statistics": {"token_count": len(i["content"].split()), "truncated": False},
                }
            }
            for i in data.get("instances") or []
        ]
        return json_response(
            {"predictions": predictions, "metadata": {"billableCharacterCount": 1}}
        )

    # -- Claude --

    async def _claude(
        self, request: web.Request, body: bytes, model: str, method: str
    ) -> web.StreamResponse:
        data = orjson.loads(body)
        problems = []
        if "model" in data:
            problems.append("model: Extra inputs are not permitted")
        if data.get("anthropic_version") != "vertex-2023-10-16":
            problems.append("anthropic_version: must be vertex-2023-10-16")
        if not data.get("messages") or not data.get("max_tokens"):
            problems.append("messages and max_tokens are required")
        if (method == "streamRawPredict") != bool(data.get("stream")):
            problems.append("stream must be set exactly for streamRawPredict")
        if problems:
            error = {"type": "invalid_request_error", "message": "; ".join(problems)}
            return json_response({"type": "error", "error": error}, 400)
        answer = claude_answer(data, model)
        if method == "rawPredict":
            return json_response(answer)
        payload = b"".join(
            f"event: {name}\ndata: ".encode() + orjson.dumps(event) + b"\n\n"
            for name, event in claude_events(answer)
        )
        return await _write_split(request, payload, "text/event-stream")


async def _write_split(
    request: web.Request, payload: bytes, content_type: str
) -> web.StreamResponse:
    """Writes in small pieces, some ending mid-UTF-8 character, as a network may deliver."""
    response = web.StreamResponse(headers={"content-type": content_type})
    await response.prepare(request)
    step = 7
    for start in range(0, len(payload), step):
        await response.write(payload[start : start + step])
    await response.write_eof()
    return response


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def service_account_info(
    key: rsa.RSAPrivateKey, token_uri: str, project: str = "key-project"
) -> Json:
    """A service-account key file's JSON for a throwaway key (never written to the repo)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "project_id": project,
        "private_key_id": "test-key-id",
        "private_key": pem,
        "client_email": f"llmux-test@{project}.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": token_uri,
    }
