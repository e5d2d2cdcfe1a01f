"""What LLMux does with one API request, as plain Python: no gRPC, no Envoy.

`Gateway.on_headers` authenticates and answers what needs no body (model list, errors);
`Gateway.on_body` turns the request body into either an immediate answer (error, mock
completion) or a `Forward` (cluster, path, headers, body for the chosen deployment).
`Gateway.on_response_headers` decides who handles the answer: Envoy alone (`PassThrough`,
accounted later by `account_passthrough`), a `StreamSession` chunk by chunk, or
`handle_response` with the whole body. The ext_proc layer only carries these in and out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from llmux_extproc import metrics, pricing, sse, tokens
from llmux_extproc.auth import authenticate
from llmux_extproc.config import PRICE_KEYS, Config, Deployment
from llmux_extproc.errors import GatewayError, bad_request, error_type
from llmux_extproc.providers.base import (
    Adapter,
    ClientRequest,
    StreamTranslator,
    UpstreamRequest,
)
from llmux_extproc.providers.mock import MockAdapter
from llmux_extproc.providers.openai import OpenAIStream, client_wants_usage
from llmux_extproc.providers.registry import adapter_for
from llmux_extproc.router import Router
from llmux_extproc.usage import Usage

OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/embeddings": "embeddings",
}
MODEL_LIST_PATHS = {"/v1/models", "/models"}
# Client headers that carry the client's own key: never forwarded to a provider.
CLIENT_AUTH_HEADERS = ("authorization", "api-key", "x-api-key")
TEAM = "default"  # until virtual keys bring teams
VALID_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


@dataclass(slots=True)
class Immediate:
    """An answer LLMux gives without calling a provider."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Exchange:
    """What the response phase needs to know about its request."""

    req: ClientRequest
    dep: Deployment
    adapter: Adapter
    price: pricing.ModelPrice | None
    started: float


@dataclass(slots=True)
class Forward:
    cluster: str
    authority: str
    upstream: UpstreamRequest
    exchange: Exchange
    timeout_ms: int | None = None
    remove_headers: tuple[str, ...] = CLIENT_AUTH_HEADERS


@dataclass(slots=True)
class ResponseAction:
    status: int
    body: bytes | None  # None: forward the provider's body unchanged
    headers: dict[str, str]
    log: dict[str, Any]


@dataclass(slots=True)
class PassThrough:
    """An answer Envoy passes on by itself; `log` marks it for response.lua and for
    accounting from its access log entry. A stream also leaves its request body with Envoy
    (`prompt`), to be counted only if the stream ends without the provider's usage."""

    log: dict[str, Any]
    prompt: str | None = None


@dataclass(frozen=True, slots=True)
class CutShort:
    """What Envoy kept of a passed-through stream that ended without the provider's usage:
    the client's request body and the text produced, as JSON string contents."""

    request_body: str
    escaped_text: str


class State:
    """Everything derived from one config, built once per (re)load, swapped atomically."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.by_id = {d.id: d for d in config.deployments}
        self.router = Router(config)
        self.prices = {d.id: _price_for(d) for d in config.deployments}
        # What response.lua needs to cost an answer, per deployment, built once.
        self.price_marks = {dep_id: _price_marks(p) for dep_id, p in self.prices.items() if p}
        self.known_models = set(config.model_names)
        created = int(time.time())
        self.model_list = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": created, "owned_by": "llmux"}
                    for name in config.model_names
                ],
            }
        )


def _price_for(dep: Deployment) -> pricing.ModelPrice | None:
    price = pricing.lookup(dep.model, dep.provider)
    if PRICE_KEYS & dep.params.keys():  # per-deployment prices, as in LiteLLM
        price = (price or pricing.ModelPrice.from_entry({})).with_overrides(dep.params)
    return price


def _price_marks(price: pricing.ModelPrice) -> dict[str, float]:
    marks = {
        "price_input": price.input_cost_per_token,
        "price_output": price.output_cost_per_token,
        "price_cached": price.cache_read_input_token_cost,
        "price_reasoning": price.output_cost_per_reasoning_token,
    }
    return {key: value for key, value in marks.items() if value is not None}


class Gateway:
    def __init__(self, config: Config) -> None:
        self.state = State(config)

    def reload(self, config: Config) -> None:
        # One assignment: a request sees the old state or the new one, never a mix.
        self.state = State(config)

    # -- request phase -------------------------------------------------------------

    def on_headers(self, method: str, path: str, headers: Mapping[str, str]) -> Immediate | None:
        """Request headers: authenticate and answer what needs no body; None reads the body."""
        state = self.state
        try:
            authenticate(headers, state.config.master_key)
        except GatewayError as err:
            return _error(err)
        path = path.partition("?")[0]
        if method == "GET" and path in MODEL_LIST_PATHS:
            return Immediate(200, state.model_list)
        if path not in OPERATIONS:
            return _error(GatewayError(404, f"Unknown path {path!r}"))
        return None

    async def on_body(self, path: str, body: bytes) -> Immediate | Forward:
        """The buffered request body of an authenticated request: choose and translate."""
        state = self.state
        try:
            limit = state.config.settings.max_request_body_bytes
            if len(body) > limit:
                raise GatewayError(
                    413, f"Request body is {len(body)} bytes; the limit is {limit} bytes."
                )
            req = parse_request(OPERATIONS[path.partition("?")[0]], body)
            if req.model not in state.known_models:
                raise GatewayError(
                    404,
                    f"The model {req.model!r} does not exist. "
                    f"Available: {', '.join(sorted(state.known_models))}",
                    param="model",
                    code="model_not_found",
                )
            dep = state.router.pick(req.model)
            adapter = adapter_for(dep.spec)
            if isinstance(adapter, MockAdapter):
                return self._mock(req, dep, adapter, state)
            if not adapter.ready(dep):
                await adapter.prepare(dep)
            upstream = adapter.request(req, dep)
        except GatewayError as err:
            return _error(err)
        assert dep.upstream is not None
        return Forward(
            cluster=dep.upstream.cluster,
            authority=dep.upstream.authority,
            upstream=upstream,
            exchange=Exchange(req, dep, adapter, state.prices.get(dep.id), time.monotonic()),
            timeout_ms=int(dep.timeout_s * 1000) if dep.timeout_s else None,
        )

    def _mock(
        self, req: ClientRequest, dep: Deployment, adapter: MockAdapter, state: State
    ) -> Immediate:
        started = time.monotonic()
        body, usage, content_type = adapter.answer(req, dep)
        exchange = Exchange(req, dep, adapter, state.prices.get(dep.id), started)
        action = self._account(exchange, 200, usage, None)
        return Immediate(200, body, {**action.headers, "content-type": content_type}, action.log)

    # -- response phase ------------------------------------------------------------

    def on_response_headers(
        self, exchange: Exchange, status: int
    ) -> StreamSession | PassThrough | None:
        """How a success is handled once its headers arrive.

        OpenAI-format answers are passed on by Envoy alone (PassThrough): response.lua reads
        their usage, adds the cost headers and, for streams, drops the usage chunk only LLMux
        asked for; Envoy's batched access log reports them for accounting. Other streams get
        a session that translates and accounts them chunk by chunk. None: the whole body goes
        to `handle_response` (errors, translated whole answers).
        """
        if not 200 <= status < 300:
            return None
        req, dep = exchange.req, exchange.dep
        if not req.stream:
            if exchange.adapter.openai_format:
                return PassThrough(self._passthrough_marks(exchange, body_usage=True))
            return None
        translator = exchange.adapter.stream(req, dep)
        wants_usage = client_wants_usage(req.body)
        if translator is None and self.state.config.settings.stream_accounting == "processor":
            translator = OpenAIStream(wants_usage)
        if translator is None:
            marks = self._passthrough_marks(exchange, strip_usage=not wants_usage)
            # orjson accepted the body, so it is UTF-8, as protobuf strings must be.
            return PassThrough(marks, prompt=req.raw.decode())
        return StreamSession(self, exchange, translator)

    def _passthrough_marks(self, exchange: Exchange, **flags: bool) -> dict[str, Any]:
        dep = exchange.dep
        marks: dict[str, Any] = {
            **self.state.price_marks.get(dep.id, {}),
            "envoy_accounts": True,
            "stream": exchange.req.stream,
            "model": dep.model_name,
            "deployment": dep.id,
            "provider": dep.provider,
            **flags,
        }
        return marks

    def account_passthrough(
        self,
        deployment_id: str,
        stream: bool,
        usage: dict[str, object] | None,
        cut_short: CutShort | None,
        status: int,
        completed: bool,
        ttft_s: float | None,
        duration_s: float,
    ) -> None:
        """Account an answer Envoy passed on by itself, from its access log entry.

        Without usage, a stream is counted with tiktoken from `cut_short` (~75 ns a byte):
        the caller runs this off the event loop then."""
        state = self.state
        dep = state.by_id.get(deployment_id)
        if dep is None:  # removed by a reload since; its price went with it
            return
        exchange = Exchange(
            ClientRequest("chat", {}, b"", dep.model_name, stream),
            dep,
            adapter_for(dep.spec),
            state.prices.get(dep.id),
            time.monotonic() - duration_s,
        )
        if status >= 400:  # response.lua found no JSON in a 2xx answer
            metrics.UPSTREAM_ERRORS.labels(error_type(status)).inc()
            err = GatewayError(status, "the provider returned a response that is not JSON")
            self._account(exchange, status, None, err)
            return
        if usage:
            counted = Usage.from_openai(usage)
        elif cut_short is not None:  # a stream cut short, or a provider that never counts
            counted = count_cut_short(cut_short, dep.model)
        else:
            counted = Usage(estimated=True)
        if stream:
            model, provider = dep.model_name, dep.provider
            if ttft_s is not None:
                metrics.TIME_TO_FIRST_TOKEN.labels(provider, model).observe(ttft_s)
                if counted.completion_tokens > 1 and duration_s > ttft_s:
                    per_token = (duration_s - ttft_s) / (counted.completion_tokens - 1)
                    metrics.TIME_PER_OUTPUT_TOKEN.labels(provider, model).observe(per_token)
            estimated = "true" if counted.estimated else "false"
            metrics.STREAMED_TOKENS.labels(model, "input", estimated).inc(counted.prompt_tokens)
            metrics.STREAMED_TOKENS.labels(model, "output", estimated).inc(
                counted.completion_tokens
            )
        self._account(exchange, status if completed else 499, counted, None)

    def handle_response(self, exchange: Exchange, status: int, body: bytes) -> ResponseAction:
        dep = exchange.dep
        if status >= 400:
            err = exchange.adapter.error(status, body, dep)
            # Labelled by status class, not the provider's free-form type: bounded values.
            metrics.UPSTREAM_ERRORS.labels(error_type(err.status)).inc()
            return self._account(exchange, err.status, None, err)
        try:
            result = exchange.adapter.response(body, exchange.req, dep)
        except GatewayError as err:
            metrics.UPSTREAM_ERRORS.labels(error_type(err.status)).inc()
            return self._account(exchange, err.status, None, err)
        return self._account(exchange, status, result.usage, None, result.body)

    def _account(
        self,
        ex: Exchange,
        status: int,
        usage: Usage | None,
        err: GatewayError | None,
        body: bytes | None = None,
    ) -> ResponseAction:
        dep = ex.dep
        model = dep.model_name
        metrics.REQUESTS.labels(model, dep.provider, str(status)).inc()
        metrics.LATENCY.labels(dep.provider, model).observe(time.monotonic() - ex.started)
        headers: dict[str, str] = {"x-litellm-model-id": dep.id}
        log: dict[str, Any] = {"model": model, "deployment": dep.id, "provider": dep.provider}
        if err is not None:
            log["error"] = err.type
            return ResponseAction(err.status, err.body(), headers, log)
        if usage is not None:
            _count_tokens(model, usage)
            log["prompt_tokens"] = usage.prompt_tokens
            log["completion_tokens"] = usage.completion_tokens
            if ex.price is not None:
                cost = pricing.cost(ex.price, usage)
                metrics.SPEND.labels(TEAM, model).inc(cost)
                headers["x-llmux-response-cost"] = headers["x-litellm-response-cost"] = repr(cost)
                log["cost"] = cost
        return ResponseAction(status, body, headers, log)


class StreamSession:
    """One streamed response: upstream chunks in, OpenAI SSE out, accounted at the end.

    The output is kept (as the client saw it) only so that a stream that ends without the
    provider's counts, e.g. because the client left, can still be counted with tiktoken.
    """

    def __init__(self, gateway: Gateway, exchange: Exchange, translator: StreamTranslator) -> None:
        self.gateway = gateway
        self.exchange = exchange
        self.translator = translator
        self.output: list[bytes] = []
        self.first_output: float | None = None
        self.closed = False

    def feed(self, chunk: bytes, end: bool) -> bytes:
        out = self.translator.feed(chunk) if chunk else b""
        if end:
            out += self.translator.finish()
        if out:
            self.output.append(out)
            if self.first_output is None:
                self.first_output = time.monotonic()
        return out

    def close(self, completed: bool) -> ResponseAction:
        """Account the stream; `completed` is False when it was cut short (client gone)."""
        self.closed = True
        ex = self.exchange
        usage = self.translator.usage
        if usage.completion_tokens == 0 or usage.prompt_tokens == 0:
            usage = self._estimate(usage)
        now = time.monotonic()
        model, provider = ex.dep.model_name, ex.dep.provider
        if self.first_output is not None:
            metrics.TIME_TO_FIRST_TOKEN.labels(provider, model).observe(
                self.first_output - ex.started
            )
            if usage.completion_tokens > 1:
                per_token = (now - self.first_output) / (usage.completion_tokens - 1)
                metrics.TIME_PER_OUTPUT_TOKEN.labels(provider, model).observe(per_token)
        estimated = "true" if usage.estimated else "false"
        metrics.STREAMED_TOKENS.labels(model, "input", estimated).inc(usage.prompt_tokens)
        metrics.STREAMED_TOKENS.labels(model, "output", estimated).inc(usage.completion_tokens)
        action = self.gateway._account(ex, 200 if completed else 499, usage, None)
        action.log["stream"] = True
        action.log["usage_estimated"] = usage.estimated
        return action

    def _estimate(self, usage: Usage) -> Usage:
        ex = self.exchange
        return _fill_in(
            usage, ex.req.body.get("messages"), lambda: _streamed_text(self.output), ex.dep.model
        )


def _fill_in(usage: Usage, messages: object, text: Callable[[], str], model: str) -> Usage:
    """`usage` with the counts the provider did not give counted with tiktoken, marked
    estimated. `text` is what the model produced, computed only if needed."""
    prompt = usage.prompt_tokens or (
        tokens.count_messages(messages, model) if isinstance(messages, list) else 0
    )
    completion = usage.completion_tokens or tokens.count_text(text(), model)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=usage.cached_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        estimated=True,
    )


def count_cut_short(kept: CutShort, model: str) -> Usage:
    """Usage of a passed-through stream that ended without the provider's, with tiktoken."""
    try:
        body = orjson.loads(kept.request_body) if kept.request_body else {}
    except orjson.JSONDecodeError:
        body = {}
    messages = body.get("messages") if isinstance(body, dict) else None

    def text() -> str:
        try:
            return str(orjson.loads(f'"{kept.escaped_text}"'))
        except orjson.JSONDecodeError:  # an escape response.lua cut wrongly: close enough
            return kept.escaped_text

    return _fill_in(Usage(), messages, text, model)


def _streamed_text(output: list[bytes]) -> str:
    """Everything the model produced in an OpenAI chunk stream: content, reasoning, tool calls."""
    parts: list[str] = []
    splitter = sse.EventSplitter()
    for chunk in [*output, b"\n\n"]:
        for ev in splitter.feed(chunk):
            data = sse.data_json(ev)
            if not isinstance(data, dict):
                continue
            for choice in data.get("choices") or []:
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if not isinstance(delta, dict):
                    continue
                for key in ("content", "reasoning_content"):
                    if isinstance(delta.get(key), str):
                        parts.append(delta[key])
                for call in delta.get("tool_calls") or []:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        parts.extend(
                            v
                            for v in (function.get("name"), function.get("arguments"))
                            if isinstance(v, str)
                        )
    return "".join(parts)


def _count_tokens(model: str, usage: Usage) -> None:
    counter = metrics.TOKENS
    counter.labels(TEAM, model, "input").inc(usage.prompt_tokens)
    counter.labels(TEAM, model, "output").inc(usage.completion_tokens)
    if usage.cached_tokens:
        counter.labels(TEAM, model, "cached_input").inc(usage.cached_tokens)
    if usage.cache_write_tokens:
        counter.labels(TEAM, model, "cache_write").inc(usage.cache_write_tokens)
    if usage.reasoning_tokens:
        counter.labels(TEAM, model, "reasoning").inc(usage.reasoning_tokens)


def _error(err: GatewayError) -> Immediate:
    return Immediate(err.status, err.body(), log={"error": err.type})


def parse_request(operation: str, raw: bytes) -> ClientRequest:
    """Parse and check the fields LLMux itself relies on; providers check the rest."""
    if not raw:
        raise bad_request("Request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string.", "model")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", "stream")
    if operation == "chat":
        _check_messages(body.get("messages"))
    elif "input" not in body or body["input"] in (None, "", []):
        raise bad_request("'input' is required.", "input")
    return ClientRequest(operation, body, raw, model, bool(stream))


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty array.", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object.", f"messages[{i}]")
        role = message.get("role")
        if role not in VALID_ROLES:
            raise bad_request(
                f"messages[{i}].role must be one of {sorted(VALID_ROLES)}, got {role!r}.",
                f"messages[{i}].role",
            )


__all__ = ["Exchange", "Forward", "Gateway", "Immediate", "ResponseAction", "error_type"]
