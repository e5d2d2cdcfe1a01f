"""A Bedrock runtime that checks what it is sent: for unit tests and tests.harness.MockUpstream.

Every request's SigV4 signature is recomputed with botocore (the reference implementation)
from the known test credentials, and every Converse body is validated against botocore's
Bedrock service model. Answers follow tests.corpus: a request offering tools whose last
user turn has text gets tool calls (two when two or more tools are offered), the forced
JSON tool gets a schema-shaped object, anything else gets text. A user text containing
`BEDROCK_ERROR:<ExceptionName>` gets that error; `BEDROCK_STREAM_ERROR` breaks a stream
midway with a throttlingException event.
"""

from __future__ import annotations

import base64
import copy
import re
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from aiohttp import web

pytest.importorskip("botocore")

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.loaders import Loader
from botocore.model import ServiceModel
from botocore.validate import ParamValidator

from tests.mock_anthropic import BOTH_SAMPLING, REFUSES_TEMPERATURE_WITH_TOP_P

ACCESS_KEY = "AKIDLLMUXTESTKEY"
SECRET_KEY = "llmux/test+secret/key"
SESSION_TOKEN = "llmux-test-session-token=="
REGION = "us-west-2"
JSON_TOOL = "json_tool_call"

# Exception name -> (HTTP status, message), as Bedrock sends them.
ERRORS = {
    "ThrottlingException": (429, "Too many requests, please wait before trying again."),
    "AccessDeniedException": (403, "You don't have access to the model with the specified ID."),
    "UnrecognizedClientException": (403, "The security token included in the request is invalid."),
    "ResourceNotFoundException": (404, "Could not resolve the foundation model."),
    "ValidationException": (400, "Input is too long for requested model."),
    "ModelTimeoutException": (408, "Model has timed out in processing the request."),
    "ServiceUnavailableException": (503, "Bedrock is unable to process your request."),
    "ModelNotReadyException": (503, "Model is not ready to serve inference requests."),
    "InternalServerException": (500, "The server encountered an internal error."),
}

_service_model: ServiceModel | None = None


def service_model() -> ServiceModel:
    global _service_model
    if _service_model is None:
        _service_model = ServiceModel(Loader().load_service_model("bedrock-runtime", "service-2"))
    return _service_model


# -- request checks ------------------------------------------------------------------------


def verify_sigv4(
    method: str,
    raw_path: str,
    query: str,
    headers: dict[str, str],
    body: bytes,
    *,
    secret_key: str = SECRET_KEY,
    access_key: str = ACCESS_KEY,
    session_token: str | None = None,
    max_skew_s: float = 300,
) -> str | None:
    """None when botocore computes the same signature over what arrived; else why not."""
    auth = headers.get("authorization", "")
    match = re.fullmatch(
        r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
        r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})",
        auth,
    )
    if match is None:
        return f"malformed authorization header {auth!r}"
    key, date, region, service, signed, signature = match.groups()
    if key != access_key:
        return f"unknown access key {key!r}"
    amz_date = headers.get("x-amz-date", "")
    if not amz_date.startswith(date):
        return f"x-amz-date {amz_date!r} is not of the credential's day {date}"
    when = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    if abs((datetime.now(UTC) - when).total_seconds()) > max_skew_s:
        return f"x-amz-date {amz_date} is too far from now"
    names = signed.split(";")
    if "host" not in names or "x-amz-date" not in names:
        return f"host and x-amz-date must be signed, got {signed}"
    if session_token is not None and (
        headers.get("x-amz-security-token") != session_token or "x-amz-security-token" not in names
    ):
        return "x-amz-security-token missing or unsigned"
    url = f"http://{headers['host']}{raw_path}" + (f"?{query}" if query else "")
    request = AWSRequest(method=method, url=url, data=body, headers={n: headers[n] for n in names})
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(access_key, secret_key, session_token), service, region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if expected != signature:
        return f"signature mismatch; botocore's canonical request:\n{canonical}"
    return None


def _decode_blobs(value: Any) -> Any:
    """A Converse body as boto3 callers pass it: blobs (base64 on the wire) as bytes."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in ("bytes", "redactedContent") and isinstance(item, str):
                out[key] = base64.b64decode(item, validate=True)
            else:
                out[key] = _decode_blobs(item)
        return out
    if isinstance(value, list):
        return [_decode_blobs(item) for item in value]
    return value


def validate_converse(body: dict[str, Any], model_id: str, operation: str = "Converse") -> str:
    """botocore's validation report for this body as `operation` input; empty when valid."""
    shape = service_model().operation_model(operation).input_shape
    params = {**_decode_blobs(copy.deepcopy(body)), "modelId": model_id}
    report = ParamValidator().validate(params, shape)
    if report.has_errors():
        return str(report.generate_report())
    inference = body.get("inferenceConfig") or {}
    if (
        any(f"anthropic.{m}" in model_id for m in REFUSES_TEMPERATURE_WITH_TOP_P)
        and "temperature" in inference
        and "topP" in inference
    ):
        # What Bedrock answers (ValidationException) for the newer Claude models.
        return "The model returned the following errors: " + BOTH_SAMPLING
    return ""


# -- event-stream frames ---------------------------------------------------------------------


def _header(name: str, value: Any) -> bytes:
    raw_name = name.encode()
    head = bytes([len(raw_name)]) + raw_name
    if isinstance(value, bool):
        return head + bytes([0 if value else 1])
    if isinstance(value, int):
        return head + b"\x04" + struct.pack(">i", value)
    if isinstance(value, bytes):
        return head + b"\x06" + struct.pack(">H", len(value)) + value
    if isinstance(value, uuid.UUID):
        return head + b"\x09" + value.bytes
    raw = str(value).encode()
    return head + b"\x07" + struct.pack(">H", len(raw)) + raw


def frame(headers: dict[str, Any], payload: bytes, raw_headers: bytes = b"") -> bytes:
    """One event-stream message with correct CRCs (`raw_headers` appended pre-encoded)."""
    encoded = b"".join(_header(k, v) for k, v in headers.items()) + raw_headers
    prelude = struct.pack(">II", 16 + len(encoded) + len(payload), len(encoded))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event(kind: str, payload: dict[str, Any]) -> bytes:
    headers = {
        ":event-type": kind,
        ":content-type": "application/json",
        ":message-type": "event",
    }
    # Bedrock pads events with a "p" field so their sizes leak nothing; keep it realistic.
    return frame(headers, orjson.dumps({**payload, "p": "abcdefgh"}))


def exception(kind: str, message: str) -> bytes:
    headers = {
        ":exception-type": kind,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return frame(headers, orjson.dumps({"message": message}))


def stream_events(answer: dict[str, Any], usage: dict[str, int]) -> list[bytes]:
    """A Converse answer (output.message.content, stopReason) as ConverseStream frames."""
    frames = [event("messageStart", {"role": "assistant"})]
    for index, block in enumerate(answer["output"]["message"]["content"]):
        deltas: list[dict[str, Any]]
        if "toolUse" in block:
            use = block["toolUse"]
            start = {"toolUse": {"toolUseId": use["toolUseId"], "name": use["name"]}}
            frames.append(event("contentBlockStart", {"contentBlockIndex": index, "start": start}))
            text = orjson.dumps(use["input"]).decode()
            deltas = [{"toolUse": {"input": piece}} for piece in _pieces(text)]
        elif "reasoningContent" in block:
            reasoning = block["reasoningContent"]["reasoningText"]
            deltas = [{"reasoningContent": {"text": p}} for p in _pieces(reasoning["text"])]
            deltas.append({"reasoningContent": {"signature": reasoning["signature"]}})
        else:
            deltas = [{"text": piece} for piece in _pieces(block["text"])]
        for delta in deltas:
            frames.append(event("contentBlockDelta", {"contentBlockIndex": index, "delta": delta}))
        frames.append(event("contentBlockStop", {"contentBlockIndex": index}))
    frames.append(event("messageStop", {"stopReason": answer["stopReason"]}))
    frames.append(event("metadata", {"usage": usage, "metrics": {"latencyMs": 12}}))
    return frames


def _pieces(text: str, size: int = 5) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


# -- answers -----------------------------------------------------------------------------------

USAGE = {
    "inputTokens": 11,
    "outputTokens": 7,
    "totalTokens": 21,
    "cacheReadInputTokens": 2,
    "cacheWriteInputTokens": 1,
}


def sample_for(schema: Any) -> Any:
    """A value matching a (simple) JSON schema: what the forced JSON tool returns."""
    if not isinstance(schema, dict):
        return {}
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {"a": {"type": "integer"}}
        return {name: sample_for(sub) for name, sub in props.items()}
    return {"string": "Ada", "integer": 36, "number": 1.5, "boolean": True, "array": []}.get(
        str(kind), "x"
    )


def _user_texts(message: dict[str, Any]) -> list[str]:
    return [block["text"] for block in message["content"] if "text" in block]


def converse_answer(body: dict[str, Any]) -> dict[str, Any]:
    messages = body["messages"]
    last = messages[-1]
    config = body.get("toolConfig") or {}
    tools = [t["toolSpec"] for t in config.get("tools", [])]
    forced = (config.get("toolChoice") or {}).get("tool", {}).get("name")
    blocks: list[dict[str, Any]] = []
    if "thinking" in (body.get("additionalModelRequestFields") or {}):
        reasoning = {"text": "Count the r letters: three.", "signature": "c2lnbmF0dXJl"}
        blocks.append({"reasoningContent": {"reasoningText": reasoning}})
    if forced == JSON_TOOL:
        schema = tools[0]["inputSchema"]["json"]
        use = {"toolUseId": "tooluse_json", "name": JSON_TOOL, "input": sample_for(schema)}
        blocks.append({"toolUse": use})
        stop = "tool_use"
    elif tools and last["role"] == "user" and _user_texts(last):
        for i, tool in enumerate(tools[:2]):
            use = {"toolUseId": f"tooluse_{i}", "name": tool["name"], "input": {"city": "Paris"}}
            blocks.append({"toolUse": use})
        stop = "tool_use"
    else:
        seen = " ".join(_user_texts(last)) if last["role"] == "user" else ""
        blocks.append({"text": f"Hello from Bedrock. You said: {seen[:60]}"})
        stop = "end_turn"
    return {
        "output": {"message": {"role": "assistant", "content": blocks}},
        "stopReason": stop,
        "usage": USAGE,
        "metrics": {"latencyMs": 42},
    }


def error_response(name: str, message: str | None = None) -> web.Response:
    status, default = ERRORS.get(name, (400, "Bad request."))
    return web.Response(
        status=status,
        body=orjson.dumps({"message": message or default}),
        content_type="application/json",
        headers={
            "x-amzn-errortype": f"{name}:http://internal.amazon.com/coral/com.amazon.bedrock/"
        },
    )


def embedding_answer(model_id: str, body: dict[str, Any]) -> dict[str, Any]:
    def vector(text: str, size: int) -> list[float]:
        return [((len(text) + i) % 7) / 8 for i in range(size)]

    if "titan" in model_id:
        text = body["inputText"]
        return {
            "embedding": vector(text, body.get("dimensions", 8)),
            "inputTextTokenCount": len(text.split()),
        }
    return {
        "id": "emb-1",
        "embeddings": [vector(t, 6) for t in body["texts"]],
        "response_type": "embeddings_floats",
        "texts": body["texts"],
    }


@dataclass
class BedrockMock:
    """The aiohttp handler; `failures` lists every signature or shape problem it saw."""

    session_token: str | None = None
    failures: list[str] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    raw_paths: list[str] = field(default_factory=list)

    async def __call__(self, request: web.Request, body: bytes) -> web.StreamResponse:
        self.raw_paths.append(request.raw_path)
        headers = {k.lower(): v for k, v in request.headers.items()}
        raw_path, _, query = request.raw_path.partition("?")
        problem = verify_sigv4(
            request.method, raw_path, query, headers, body, session_token=self.session_token
        )
        if problem is not None:
            self.failures.append(problem)
            return error_response(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided.",
            )
        match = re.fullmatch(r"/model/([^/]+)/(converse|converse-stream|invoke)", raw_path)
        if match is None or ":" in match[1]:
            self.failures.append(f"bad path {raw_path!r}")
            return error_response("ResourceNotFoundException")
        model_id, action = unquote(match[1]), match[2]
        data = orjson.loads(body)
        self.bodies.append(data)
        if action == "invoke":
            return web.json_response(embedding_answer(model_id, data))
        operation = "Converse" if action == "converse" else "ConverseStream"
        report = validate_converse(data, model_id, operation)
        if report:
            self.failures.append(report)
            return error_response("ValidationException", report)
        texts = " ".join(block.get("text", "") for m in data["messages"] for block in m["content"])
        trigger = re.search(r"BEDROCK_ERROR:(\w+)", texts)
        if trigger:
            return error_response(trigger[1])
        answer = converse_answer(data)
        if action == "converse":
            return web.json_response(answer)
        return await self._stream(request, answer, "BEDROCK_STREAM_ERROR" in texts)

    async def _stream(
        self, request: web.Request, answer: dict[str, Any], fail: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"content-type": "application/vnd.amazon.eventstream"}
        )
        await response.prepare(request)
        frames = stream_events(answer, USAGE)
        if fail:
            frames = [*frames[:3], exception("throttlingException", "Too many tokens.")]
        data = b"".join(frames)
        # Odd-sized writes: frames reach the gateway split mid-prelude and mid-payload.
        for start in range(0, len(data), 37):
            await response.write(data[start : start + 37])
        await response.write_eof()
        return response
