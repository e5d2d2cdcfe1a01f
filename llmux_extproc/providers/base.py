"""The one interface every provider adapter implements.

An adapter is pure: it turns an OpenAI-shaped request into what its provider expects
(path, headers, body) and the provider's answer back into OpenAI's shape. It does no I/O;
Envoy moves the bytes. Keeping it pure lets the same adapter run wherever the request is
processed (today the downstream ext_proc filter, per attempt in an upstream filter later).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmux_extproc.accounting.usage import Usage
from llmux_extproc.errors import GatewayError
from llmux_extproc.providers.auth import BackendAuth, NoAuth

if TYPE_CHECKING:
    from llmux_extproc.control.config import Deployment


@dataclass(slots=True)
class ClientRequest:
    """What the client sent, parsed once."""

    operation: str  # "chat" or "embeddings"
    body: dict[str, Any]
    raw: bytes
    model: str
    stream: bool = False


@dataclass(slots=True)
class UpstreamRequest:
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # None: the client's body is forwarded untouched


@dataclass(slots=True)
class UpstreamResult:
    usage: Usage
    body: bytes | None = None  # None: the provider's body is already OpenAI's shape


class StreamTranslator:
    """Turns one provider stream into OpenAI server-sent events, chunk by chunk.

    Upstream chunks may split anywhere (mid-event, mid-line, mid-UTF-8 character,
    mid-binary-frame): `feed` keeps what it cannot translate yet. `usage` holds the
    provider's counts as they arrive.
    """

    usage: Usage

    def feed(self, chunk: bytes) -> bytes:
        """Upstream bytes in, OpenAI SSE bytes out (possibly empty)."""
        raise NotImplementedError

    def finish(self) -> bytes:
        """End of the upstream stream: whatever is left (final chunks, `data: [DONE]`)."""
        raise NotImplementedError


class Adapter:
    """Base adapter: operations a provider lacks answer 400, naming the operation.

    `request` is `translate` (path, headers and body, no credentials) followed by
    `auth.apply` (the deployment's credentials on that final request). Callers that
    translate and sign per attempt call the two themselves.
    """

    name = "base"
    # True when the provider answers in OpenAI's format already: Envoy then passes successful
    # answers on by itself and reads their usage (see response.lua).
    openai_format = False
    auth: BackendAuth = NoAuth()
    # Lower-case names of every header `auth` may set, and of those `translate` sets: a
    # retry removes both sets left by an attempt to another provider (see
    # registry.provider_header_names).
    auth_headers: frozenset[str] = frozenset()
    request_headers: frozenset[str] = frozenset({"content-type"})

    def ready(self, dep: Deployment) -> bool:
        """Cheap check, on every request: can `request` sign/authorize right now?"""
        return self.auth.ready(dep)

    async def prepare(self, dep: Deployment) -> None:
        """Fetch or refresh credentials (OAuth tokens); called when `ready` is False."""
        await self.auth.prepare(dep)

    def stream(self, req: ClientRequest, dep: Deployment) -> StreamTranslator | None:
        """A translator for a streamed response; None when the stream is already OpenAI's."""
        return None

    def request(self, req: ClientRequest, dep: Deployment) -> UpstreamRequest:
        """The upstream request, credentials included."""
        upstream = self.translate(req, dep)
        self.auth.apply(dep, upstream)
        return upstream

    def translate(self, req: ClientRequest, dep: Deployment) -> UpstreamRequest:
        """The upstream request without credentials."""
        raise GatewayError(
            400, f"{req.operation} is not supported by provider {dep.provider!r}", param="model"
        )

    def response(self, body: bytes, req: ClientRequest, dep: Deployment) -> UpstreamResult:
        raise NotImplementedError

    def error(self, status: int, body: bytes, dep: Deployment) -> GatewayError:
        """Map a provider's error answer to the OpenAI error the client gets."""
        return GatewayError(status, extract_message(body) or f"upstream returned HTTP {status}")


def extract_message(body: bytes) -> str | None:
    """The human message in the error bodies providers and OpenAI-compatible servers send."""
    import orjson

    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:1000] or None
    if isinstance(data, list) and data:
        data = data[0]  # Gemini wraps errors in a one-element list on some endpoints
    if not isinstance(data, dict):
        return None
    err = data.get("error")
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err["message"])
    for candidate in (err, data.get("message"), data.get("detail"), data.get("Message")):
        if isinstance(candidate, str):
            return candidate
    return None
