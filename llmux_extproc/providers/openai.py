"""OpenAI and every OpenAI-compatible server (vLLM, Ollama, Groq, Mistral, DeepSeek, ...).

The request differs from the client's only in `model` (the alias becomes the provider's
name), so the body is re-encoded only when that name really differs, and the response is
forwarded untouched: usage is read, nothing is rewritten.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from llmux_extproc.accounting.usage import Usage
from llmux_extproc.dataplane.sse import EventSplitter, data_json
from llmux_extproc.errors import GatewayError
from llmux_extproc.providers.auth import APIKeyHeader, BackendAuth
from llmux_extproc.providers.base import (
    Adapter,
    ClientRequest,
    StreamTranslator,
    UpstreamRequest,
    UpstreamResult,
    extract_message,
)

if TYPE_CHECKING:
    from llmux_extproc.control.config import Deployment

_PATHS = {"chat": "/chat/completions", "embeddings": "/embeddings"}


class OpenAIAdapter(Adapter):
    name = "openai"
    openai_format = True
    auth: BackendAuth = APIKeyHeader("authorization", "Bearer")
    auth_headers = auth.headers

    def translate(self, req: ClientRequest, dep: Deployment) -> UpstreamRequest:
        assert dep.upstream is not None
        headers = {"content-type": "application/json"}
        body = None
        if req.stream and not client_wants_usage(req.body):
            # Ask for the usage chunk so the stream is accounted from the provider's counts.
            options = req.body.get("stream_options")
            options = (
                {**options, "include_usage": True}
                if isinstance(options, dict)
                else {"include_usage": True}
            )
            body = orjson.dumps({**req.body, "model": dep.model, "stream_options": options})
        elif req.body.get("model") != dep.model:
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


class OpenAIStream(StreamTranslator):
    """An OpenAI-format stream passed through the processor (`stream_accounting: processor`):
    reads usage and drops the usage chunk the client did not ask for, changes nothing else.

    The default (`stream_accounting: envoy`) does the same inside Envoy instead; this path
    costs a gRPC message per chunk but keeps what was streamed, so a stream the client cut
    short can still be counted with tiktoken.
    """

    def __init__(self, client_wants_usage: bool) -> None:
        self.usage = Usage()
        self.has_usage = False
        self._keep_usage_chunk = client_wants_usage
        self._events = EventSplitter()

    def feed(self, chunk: bytes) -> bytes:
        out = []
        for ev in self._events.feed(chunk):
            if b'"usage"' in ev and self._take_usage(ev):
                continue
            out.append(ev)
        return b"".join(out)

    def finish(self) -> bytes:
        return self._events.rest()

    def _take_usage(self, ev: bytes) -> bool:
        """Record usage from the event; True when the event should be dropped."""
        data = data_json(ev)
        if not isinstance(data, dict) or not isinstance(data.get("usage"), dict):
            return False
        self.usage = Usage.from_openai(data["usage"])
        self.has_usage = True
        return not self._keep_usage_chunk and not data.get("choices")


def client_wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
