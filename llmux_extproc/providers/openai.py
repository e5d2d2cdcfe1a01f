"""OpenAI and every OpenAI-compatible server (vLLM, Ollama, Groq, Mistral, DeepSeek, ...).

The request differs from the client's only in `model` (the alias becomes the provider's
name), so the body is re-encoded only when that name really differs, and the response is
forwarded untouched: usage is read, nothing is rewritten.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from llmux_extproc.errors import GatewayError
from llmux_extproc.providers.base import (
    Adapter,
    ClientRequest,
    UpstreamRequest,
    UpstreamResult,
    extract_message,
)
from llmux_extproc.usage import Usage

if TYPE_CHECKING:
    from llmux_extproc.config import Deployment

_PATHS = {"chat": "/chat/completions", "embeddings": "/embeddings"}


class OpenAIAdapter(Adapter):
    name = "openai"

    def request(self, req: ClientRequest, dep: Deployment) -> UpstreamRequest:
        assert dep.upstream is not None
        headers = {"content-type": "application/json"}
        if dep.api_key:
            headers["authorization"] = f"Bearer {dep.api_key}"
        body = None
        if req.body.get("model") != dep.model:
            body = orjson.dumps({**req.body, "model": dep.model})
        return UpstreamRequest(dep.upstream.base_path + _PATHS[req.operation], headers, body)

    def response(self, body: bytes, req: ClientRequest, dep: Deployment) -> UpstreamResult:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise GatewayError(502, f"provider {dep.provider!r} returned invalid JSON") from exc
        usage = data.get("usage") if isinstance(data, dict) else None
        return UpstreamResult(Usage.from_openai(usage))

    def error(self, status: int, body: bytes, dep: Deployment) -> GatewayError:
        message = extract_message(body) or f"upstream returned HTTP {status}"
        err_type = param = code = None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            err = data["error"]
            err_type = err.get("type") if isinstance(err.get("type"), str) else None
            param = err.get("param") if isinstance(err.get("param"), str) else None
            code = err.get("code") if isinstance(err.get("code"), str) else None
        return GatewayError(status, message, type=err_type, param=param, code=code)


ADAPTER = OpenAIAdapter()
