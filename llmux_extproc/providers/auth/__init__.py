"""Provider credentials, kept apart from translation (as Envoy AI Gateway's backendauth).

A translator builds path, headers and body without any secret; the deployment's
`BackendAuth` then adds its credentials to that finished request. The split lets the
same translated request be signed per attempt: with retries and fallback, each attempt
may go to another provider, and a signature (SigV4) covers the final body and host.

Implementations: `APIKeyHeader` here (Bearer, x-api-key, x-goog-api-key, ...),
`azure.AzureAuth` (api-key or Entra ID token), `google_auth.GoogleOAuth` (Vertex AI
access tokens), `sigv4.AWSSigV4` (Bedrock). The heavier ones live in their own modules
so that importing this package costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmux_extproc.control.config import Deployment
    from llmux_extproc.providers.base import UpstreamRequest


class BackendAuth:
    """Adds one deployment's credentials to an already translated request."""

    # Lower-case names of every header `apply` may set: a retry against another provider
    # removes them before the next attempt's auth sets its own.
    headers: frozenset[str] = frozenset()

    def ready(self, dep: Deployment) -> bool:
        """Cheap, on every request: can `apply` run now without I/O?"""
        return True

    async def prepare(self, dep: Deployment) -> None:
        """Fetch or refresh what `apply` needs (OAuth tokens); awaited when not `ready`."""

    def apply(self, dep: Deployment, request: UpstreamRequest) -> None:
        """Set the auth headers on `request` (its path and body are final)."""
        raise NotImplementedError


class NoAuth(BackendAuth):
    """Providers answered inside LLMux, or servers that take no key."""

    def apply(self, dep: Deployment, request: UpstreamRequest) -> None:
        return None


class APIKeyHeader(BackendAuth):
    """`dep.api_key` in one header, optionally after a scheme ("Bearer"); nothing without
    a key (local OpenAI-compatible servers usually take none)."""

    def __init__(self, header: str, scheme: str | None = None) -> None:
        self.header = header.lower()
        self.scheme = scheme
        self.headers = frozenset({self.header})

    def apply(self, dep: Deployment, request: UpstreamRequest) -> None:
        if dep.api_key:
            value = f"{self.scheme} {dep.api_key}" if self.scheme else dep.api_key
            request.headers[self.header] = value


def litellm_param(
    params: Mapping[str, Any], key: str, env: Mapping[str, str] | None = None
) -> str | None:
    """A litellm_params string, None when unset or empty; `os.environ/NAME` is read from
    the environment, as LiteLLM does (config resolves it only for api_key and api_base)."""
    value = params.get(key)
    if value is None:
        return None
    text = str(value)
    if text.startswith("os.environ/"):
        return (os.environ if env is None else env).get(text[len("os.environ/") :]) or None
    return text or None


__all__ = ["APIKeyHeader", "BackendAuth", "NoAuth", "litellm_param"]
