"""Azure OpenAI: OpenAI's wire format behind per-deployment paths and an `api-version`.

Requests and responses are OpenAI's, so the client's body is forwarded untouched (Azure
ignores `model`: the deployment in the path decides) and responses, streams included, pass
through as OpenAI's do. What differs: the path, the auth header (`api-key`, or an Entra ID
bearer token), and content-filter refusals, which get LiteLLM's error code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from llmux_extproc.errors import GatewayError
from llmux_extproc.providers.auth import litellm_param
from llmux_extproc.providers.auth.azure import AzureAuth
from llmux_extproc.providers.base import ClientRequest, UpstreamRequest
from llmux_extproc.providers.openai import OpenAIAdapter

if TYPE_CHECKING:
    from llmux_extproc.control.config import Deployment

DEFAULT_API_VERSION = "2024-10-21"  # the newest GA data-plane version when written
_OPERATIONS = {"chat": "chat/completions", "embeddings": "embeddings"}
# Azure's "v1" API takes the deployment name as `model` in the body, under /openai/v1.
_V1_VERSIONS = {"v1", "latest", "preview"}
# Older api-versions reject `stream_options` as an unknown argument.
STREAM_USAGE_SINCE = "2024-09-01"


class AzureAdapter(OpenAIAdapter):
    name = "azure"
    auth = AzureAuth()
    auth_headers = auth.headers

    def translate(self, req: ClientRequest, dep: Deployment) -> UpstreamRequest:
        assert dep.upstream is not None
        operation = _OPERATIONS.get(req.operation)
        if operation is None:
            return super(OpenAIAdapter, self).translate(req, dep)
        # An api_base copied with its /openai suffix must not double it.
        base = dep.upstream.base_path.removesuffix("/openai")
        version = api_version(dep.params)
        headers = {"content-type": "application/json"}
        v1 = version in _V1_VERSIONS
        body = _body(req, dep, version, v1)
        if v1:
            query = "?api-version=preview" if version == "preview" else ""
            return UpstreamRequest(f"{base}/openai/v1/{operation}{query}", headers, body)
        deployment = quote(dep.model, safe="")
        path = (
            f"{base}/openai/deployments/{deployment}/{operation}"
            f"?api-version={quote(version, safe='')}"
        )
        return UpstreamRequest(path, headers, body)

    def error(self, status: int, body: bytes, dep: Deployment) -> GatewayError:
        err = super().error(status, body, dep)
        if err.code == "content_filter" or _inner_code(body) == "ResponsibleAIPolicyViolation":
            # LiteLLM's ContentPolicyViolationError: the refusal is the content filter's.
            return GatewayError(
                400, err.message, type=err.type, param=err.param, code="content_policy_violation"
            )
        return err


def _body(req: ClientRequest, dep: Deployment, version: str, v1: bool) -> bytes | None:
    """The client's body, re-encoded only when something must change."""
    changes: dict[str, Any] = {}
    if v1 and req.body.get("model") != dep.model:
        changes["model"] = dep.model  # the v1 API reads the deployment from `model`
    options = req.body.get("stream_options")
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    if req.stream and not wants_usage and (v1 or version >= STREAM_USAGE_SINCE):
        # As for OpenAI: ask for the usage chunk so the stream is accounted from Azure's own
        # counts (the OpenAI stream translator drops it again for the client).
        changes["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    return orjson.dumps({**req.body, **changes}) if changes else None


def api_version(params: Mapping[str, Any]) -> str:
    return (
        litellm_param(params, "api_version")
        or os.environ.get("AZURE_API_VERSION")
        or DEFAULT_API_VERSION
    )


def _inner_code(body: bytes) -> str | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    inner = error.get("innererror") if isinstance(error, dict) else None
    code = inner.get("code") if isinstance(inner, dict) else None
    return code if isinstance(code, str) else None


ADAPTER = AzureAdapter()
