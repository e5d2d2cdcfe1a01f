"""Vertex AI: Google's Gemini models and Anthropic's Claude models, with OAuth tokens.

Gemini on Vertex takes the same generateContent body as the Gemini API (the translation is
gemini.py's); only the path and the credentials differ. Claude on Vertex takes Anthropic's
Messages body, minus `model` (the path names it) plus Vertex's `anthropic_version`, so the
Anthropic adapter builds and reads it. Embeddings use Vertex's `:predict` API, which,
unlike the Gemini API's, reports token counts.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import orjson

from llmux_extproc.accounting import tokens
from llmux_extproc.accounting.usage import Usage
from llmux_extproc.errors import GatewayError
from llmux_extproc.providers import anthropic, gemini
from llmux_extproc.providers.auth import google_auth
from llmux_extproc.providers.base import (
    Adapter,
    ClientRequest,
    StreamTranslator,
    UpstreamRequest,
    UpstreamResult,
)
from llmux_extproc.providers.registry import vertex_location

if TYPE_CHECKING:
    from llmux_extproc.control.config import Deployment

ANTHROPIC_VERSION = "vertex-2023-10-16"
# Anthropic request headers Vertex honours; its API version it does not (the body has it).
_ANTHROPIC_HEADERS = ("anthropic-beta",)


def is_claude(dep: Deployment) -> bool:
    return dep.model.startswith("claude")


def project(dep: Deployment) -> str:
    value = (
        dep.params.get("vertex_project")
        or os.environ.get("VERTEXAI_PROJECT")
        or os.environ.get("GOOGLE_CLOUD_PROJECT")
        or google_auth.AUTH.project_id(dep)  # a service-account key names its project
    )
    if not isinstance(value, str) or not value:
        raise GatewayError(
            500,
            f"deployment {dep.model_name!r}: set litellm_params.vertex_project "
            "(or VERTEXAI_PROJECT) for Vertex AI.",
        )
    return value


def location(dep: Deployment) -> str:
    # The registry's host derivation, so path and host always agree.
    return vertex_location(dep.params, os.environ)


def model_path(dep: Deployment, publisher: str, method: str) -> str:
    assert dep.upstream is not None
    base = dep.upstream.base_path
    if not base.endswith(("/v1", "/v1beta1")):
        base += "/v1"
    return (
        f"{base}/projects/{project(dep)}/locations/{location(dep)}"
        f"/publishers/{publisher}/models/{dep.model}:{method}"
    )


class VertexAdapter(Adapter):
    name = "vertex"
    auth = google_auth.GoogleOAuth()
    auth_headers = auth.headers

    def translate(self, req: ClientRequest, dep: Deployment) -> UpstreamRequest:
        headers = {"content-type": "application/json"}
        if req.operation == "embeddings":
            if is_claude(dep):
                return super().translate(req, dep)
            return UpstreamRequest(
                model_path(dep, "google", "predict"), headers, predict_body(req, dep)
            )
        if is_claude(dep):
            return claude_request(req, dep, headers)
        method = "streamGenerateContent?alt=sse" if req.stream else "generateContent"
        body = orjson.dumps(gemini.to_gemini_body(req, dep))
        return UpstreamRequest(model_path(dep, "google", method), headers, body)

    def response(self, body: bytes, req: ClientRequest, dep: Deployment) -> UpstreamResult:
        if is_claude(dep):
            return anthropic.ADAPTER.response(body, req, dep)
        data = gemini.load_json(body, dep)
        if req.operation == "embeddings":
            return from_predict_response(data, req, dep)
        return gemini.from_gemini_response(data, req, dep)

    def error(self, status: int, body: bytes, dep: Deployment) -> GatewayError:
        fields = gemini.google_error_fields(body)
        if is_claude(dep) and not (fields and "status" in fields):
            # Claude's own errors keep Anthropic's shape; Vertex's (quota, auth) are Google's.
            return anthropic.ADAPTER.error(status, body, dep)
        return gemini.gemini_error(status, body)

    def stream(self, req: ClientRequest, dep: Deployment) -> StreamTranslator | None:
        if req.operation != "chat" or not req.stream:
            return None
        if is_claude(dep):
            return anthropic.ADAPTER.stream(req, dep)
        return gemini.GeminiStream(req, dep)


def claude_request(req: ClientRequest, dep: Deployment, headers: dict[str, str]) -> UpstreamRequest:
    """Anthropic's Messages body, re-addressed to Vertex's rawPredict."""
    messages = anthropic.ADAPTER.translate(req, dep)
    body: dict[str, Any] = orjson.loads(messages.body) if messages.body else {}
    body.pop("model", None)
    body["anthropic_version"] = ANTHROPIC_VERSION
    for name in _ANTHROPIC_HEADERS:
        if name in messages.headers:
            headers[name] = messages.headers[name]
    method = "streamRawPredict" if req.stream else "rawPredict"
    return UpstreamRequest(model_path(dep, "anthropic", method), headers, orjson.dumps(body))


def predict_body(req: ClientRequest, dep: Deployment) -> bytes:
    instances = [{"content": text} for text in gemini.embedding_inputs(req, dep)]
    body: dict[str, Any] = {"instances": instances}
    dims = req.body.get("dimensions")
    if dims is not None:
        body["parameters"] = {"outputDimensionality": dims}
    return orjson.dumps(body)


def from_predict_response(
    data: dict[str, Any], req: ClientRequest, dep: Deployment
) -> UpstreamResult:
    predictions = data.get("predictions")
    if not isinstance(predictions, list):
        raise GatewayError(502, f"provider {dep.provider!r} returned no embeddings")
    vectors: list[list[float]] = []
    counted = 0
    for prediction in predictions:
        embedding = prediction.get("embeddings") if isinstance(prediction, dict) else None
        embedding = embedding if isinstance(embedding, dict) else {}
        vectors.append(embedding.get("values") or [])
        stats = embedding.get("statistics")
        count = stats.get("token_count") if isinstance(stats, dict) else None
        counted += int(count) if isinstance(count, int | float) else 0
    if counted:
        usage = Usage(prompt_tokens=counted)
    else:  # older models report no statistics: count as OpenAI would, flagged
        texts = gemini.embedding_inputs(req, dep)
        usage = Usage(
            prompt_tokens=sum(tokens.count_text(t, dep.model) for t in texts), estimated=True
        )
    return UpstreamResult(usage, gemini.openai_embeddings(vectors, req, dep, usage))


ADAPTER = VertexAdapter()
