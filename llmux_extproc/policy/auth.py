"""Client authentication: the master key, in any header an OpenAI-style client sends it."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from llmux_extproc.errors import GatewayError


def client_key(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else value.strip()
    # Azure-style and Anthropic-style clients.
    return headers.get("api-key") or headers.get("x-api-key")


def authenticate(headers: Mapping[str, str], master_key: str | None) -> None:
    if master_key is None:
        return
    key = client_key(headers)
    if not key:
        raise GatewayError(
            401,
            "No API key provided. Send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )
    if not hmac.compare_digest(key.encode(), master_key.encode()):
        raise GatewayError(401, "Invalid API key.", code="invalid_api_key")
