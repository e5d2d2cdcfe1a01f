"""What LLMux does with one API request, as plain Python: no gRPC, no Envoy.

Everything here runs once per *attempt*: the processor is an upstream filter of the model
group's cluster, so Envoy has already chosen the deployment (`context.Attempt`), and a
retry or fallback is a new attempt, possibly on another provider, in another worker.

`Gateway.on_headers` authenticates and answers what needs no body (model list, errors);
`Gateway.on_body` turns the request body into either an immediate answer (error, mock
completion) or a `Forward` (path, headers, body translated and signed for this attempt's
deployment).
`Gateway.on_response_headers` decides who handles the answer: Envoy alone (`PassThrough`,
accounted later by `account_passthrough`), a `StreamSession` chunk by chunk, or
`handle_response` with the whole body. The ext_proc layer only carries these in and out.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from collections.abc import Callable, Container, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson

from llmux_extproc.accounting import pricing, tokens
from llmux_extproc.accounting.spendlog import CALL_TYPES, SpendQueue, SpendRow
from llmux_extproc.accounting.usage import Usage
from llmux_extproc.control.config import PRICE_KEYS, Config, Deployment
from llmux_extproc.control.envoy_routing import ALIAS_PATH, attempts_per_group
from llmux_extproc.dataplane import sse
from llmux_extproc.dataplane.context import (
    DEFAULT_CALLER,
    MASTER_CALLER,
    Attempt,
    Caller,
    RequestContext,
)
from llmux_extproc.dataplane.marks import Encoded, encode_marks
from llmux_extproc.db import management
from llmux_extproc.db.keystore import KeyStore
from llmux_extproc.errors import GatewayError, bad_request, error_type
from llmux_extproc.observability import metrics
from llmux_extproc.observability.tracing import WorkerTracer, answer_marks, request_marks
from llmux_extproc.policy import budgets
from llmux_extproc.policy.auth import authenticate, client_key
from llmux_extproc.policy.bulkhead import Bulkhead
from llmux_extproc.policy.keys import Missing, Principal, hash_key, principal_refusal
from llmux_extproc.policy.limits import Limiter, ratelimit_headers
from llmux_extproc.providers.base import (
    Adapter,
    ClientRequest,
    StreamTranslator,
    UpstreamRequest,
)
from llmux_extproc.providers.mock import MockAdapter
from llmux_extproc.providers.openai import OpenAIStream, client_wants_usage
from llmux_extproc.providers.registry import adapter_for, provider_header_names

log = logging.getLogger("llmux.gateway")

OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/embeddings": "embeddings",
}
MODEL_LIST_PATHS = {"/v1/models", "/models"}
# Headers any adapter may set: an attempt removes those a previous attempt (perhaps for
# another provider) left on the shared request headers before setting its own.
PROVIDER_HEADERS = provider_header_names()
# Said by providers when a prompt does not fit, or an answer was refused on content: such
# a 400 is worth another group (context_window_fallbacks, content_policy_fallbacks).
_CONTEXT_WINDOW_HINTS = (
    "context length",
    "context_length",
    "context window",
    "maximum context",
    "prompt is too long",
    "input is too long",
    "too many tokens",
)
_CONTENT_POLICY_HINTS = ("content policy", "content_policy", "content_filter", "safety")
VALID_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
# The only request headers a provider gets besides the pseudo-headers and what its adapter
# sets: everything else the client sent (cookies, proxy credentials, tracing and SDK
# headers) and Envoy's x-forwarded-* and x-envoy-* are removed, as LiteLLM forwards no
# client header by default. `accept-encoding` goes too: a compressed answer could be
# neither translated nor read for its usage. Two of Envoy's stay: the removal edits the
# request's one header map, which the logs read when the attempt ends, `x-request-id` in
# the access log (removing it nulled the log's request_id in a spike) and
# `x-envoy-attempt-count` in the upstream log (the control plane counts retries by it).
CLIENT_HEADERS_TO_PROVIDER = frozenset({"content-type", "x-request-id", "x-envoy-attempt-count"})


def dropped_client_headers(request_headers: Iterable[str], keep: Container[str]) -> list[str]:
    """The request headers an attempt must remove: all but the allow-list and `keep` (what
    the adapter sets). On a retry that includes what the previous attempt set."""
    return [
        h
        for h in request_headers
        if h not in keep and h not in CLIENT_HEADERS_TO_PROVIDER and h[:1] != ":"
    ]


_log = logging.getLogger("llmux.gateway")


class Refused(Exception):
    """A request a rate limit or budget refuses: its error and headers (retry-after,
    x-ratelimit-*)."""

    def __init__(self, error: GatewayError, headers: dict[str, str]) -> None:
        super().__init__(error.message)
        self.error = error
        self.headers = headers


@dataclass(slots=True)
class Immediate:
    """An answer LLMux gives without calling a provider."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Pending:
    """The request-headers answer for a key this worker has not cached: it needs one
    PostgreSQL query first (the ext_proc layer awaits it)."""

    answer: Coroutine[Any, Any, Immediate | Caller]


@dataclass(slots=True)
class Exchange:
    """What the response phase needs to know about its attempt."""

    req: ClientRequest
    dep: Deployment
    adapter: Adapter
    price: pricing.ModelPrice | None
    started: float
    ctx: RequestContext = field(
        default_factory=lambda: RequestContext(DEFAULT_CALLER, Attempt(1, None))
    )
    # The request id of a rate-limit/budget reservation to settle when the answer ends.
    settle_id: str | None = None
    limit_headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-*


@dataclass(slots=True)
class Forward:
    authority: str
    upstream: UpstreamRequest
    exchange: Exchange
    remove_headers: tuple[str, ...] = ()
    held: bool = False  # holds a bulkhead place until the attempt ends


@dataclass(slots=True)
class ResponseAction:
    status: int
    body: bytes | None  # None: forward the provider's body unchanged
    headers: dict[str, str]
    log: dict[str, Any]
    # The answer failed in a way another attempt (deployment, fallback group) may fix.
    retry: bool = False


@dataclass(slots=True)
class PassThrough:
    """An answer Envoy passes on by itself; `log` marks it for response.lua and for
    accounting from its access log entry (a stream's request body is kept there by
    response.lua, to be counted only if the stream ends without the provider's usage)."""

    log: dict[str, Any]


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
        router = config.router
        # Which groups may answer for a requested model (itself, then its fallbacks), and
        # how many attempts Envoy makes at most: an attempt's failure counts as the
        # request's answer only when it is the last.
        self.answering = {
            name: {name, *(g for _, g in router.fallback_groups(name))}
            for name in config.model_names
        }
        self.fallback_kinds = {
            name: {kind for kind, _ in router.fallback_groups(name)} for name in config.model_names
        }
        self.max_attempts = {
            name: attempts_per_group(router) * len(self.answering[name])
            for name in config.model_names
        }
        self.retriable = router.retriable_statuses()
        self.usage_routing = router.routing_strategy.startswith("usage-based")
        self.prices = {d.id: price_for(d) for d in config.deployments}
        # What response.lua needs to cost an answer, per deployment, built once.
        self.price_marks = {dep_id: _price_marks(p) for dep_id, p in self.prices.items() if p}
        self.known_models = set(config.model_names)
        # What spend logs name the master key by, as LiteLLM does: its hash.
        self.master_token = hash_key(config.master_key) if config.master_key else ""
        self.api_bases = {
            d.id: f"{d.upstream.scheme}://{d.upstream.authority}{d.upstream.base_path}"
            for d in config.deployments
            if d.upstream is not None
        }
        # LiteLLM's model access groups (model_info.access_groups), per model group: a
        # key's `models` may name a group instead of the models in it.
        groups: dict[str, set[str]] = {}
        for d in config.deployments:
            access = d.model_info.get("access_groups")
            if isinstance(access, list):
                groups.setdefault(d.model_name, set()).update(str(g) for g in access)
        self.access_groups = {name: frozenset(g) for name, g in groups.items()}
        # The dearest (input, output) price among the deployments that may answer a group:
        # what a budget reservation assumes, as any of them may take the request.
        self.max_prices: dict[str, tuple[float, float]] = {}
        for name, answering in self.answering.items():
            found = [self.prices[d.id] for d in config.deployments if d.model_name in answering]
            self.max_prices[name] = (
                max((p.input_cost_per_token or 0.0 for p in found if p), default=0.0),
                max((p.output_cost_per_token or 0.0 for p in found if p), default=0.0),
            )
        self.model_created = created = int(time.time())
        self.model_list = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": created, "owned_by": "llmux"}
                    for name in config.model_names
                ],
            }
        )


def price_for(dep: Deployment) -> pricing.ModelPrice | None:
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
        self.refresh: Callable[[], object] | None = None
        self._refreshed = 0.0
        # Set by the worker when it runs under `llmux run` (the file is shared by workers).
        self.bulkhead: Bulkhead | None = None
        # Tokens per deployment for the supervisor's usage-based routing (TPM).
        self.report_tokens: Callable[[str, int], None] | None = None
        # Virtual keys (PostgreSQL), set by the worker when a database is configured.
        self.keys: KeyStore | None = None
        # The Caller of each cached principal, built once: building one per request cost
        # 1.3 us of the 3.2 us a cache hit took (measured).
        self._callers: dict[str, Caller] = {}
        # Set by the worker when llmux.tracing is on; None costs nothing per request.
        self.tracer: WorkerTracer | None = None
        # Spend logs (PostgreSQL), set by the worker with `keys`: rows queued, written in
        # batches by a background task (accounting/spendlog.py).
        self.spend: SpendQueue | None = None
        # The caller's part of a passed-through answer's marks, encoded once per key: its
        # four fields cost 2.2 us per answer to encode (measured), a lookup 0.05 us.
        self._caller_marks: dict[str, tuple[Principal, Encoded]] = {}
        # Rate limits and budgets (policy/limits.py), set by the worker with virtual keys.
        self.limiter: Limiter | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._settling: set[asyncio.Task[None]] = set()

    def reload(self, config: Config) -> None:
        # One assignment: a request sees the old state or the new one, never a mix.
        self.state = State(config)

    def deployment(self, dep_id: str) -> Deployment | None:
        """The deployment of an endpoint Envoy chose. An id this worker does not know yet
        means Envoy already has a reloaded config this worker's signal has not brought
        yet: `refresh` (set by the worker) re-reads it then, at most once a second."""
        dep = self.state.by_id.get(dep_id)
        if dep is None and self.refresh is not None:
            now = time.monotonic()
            if now - self._refreshed > 1.0:
                self._refreshed = now
                self.refresh()
                dep = self.state.by_id.get(dep_id)
        return dep

    # -- request phase -------------------------------------------------------------

    def on_headers(
        self, method: str, path: str, client_keys: Mapping[str, str]
    ) -> Immediate | Caller | Pending:
        """Request headers of an attempt: authenticate (the client's key headers, which
        Envoy moved into metadata) and answer what needs no body.

        A virtual key in this worker's cache costs a sha256 and a dict lookup; one that is
        not is a `Pending` answer (one indexed query)."""
        state = self.state
        master = state.config.master_key
        keys = self.keys
        if keys is None or master is None:
            try:
                authenticate(client_keys, master)
            except GatewayError as err:
                return _error(err)
            return self._route(method, path, DEFAULT_CALLER if master is None else MASTER_CALLER)
        key = client_key(client_keys)
        if not key:
            return _error(
                GatewayError(
                    401,
                    "No API key provided. Send it as 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                )
            )
        if hmac.compare_digest(key.encode(), master.encode()):
            return self._route(method, path, MASTER_CALLER)
        token, found = keys.cached(key)
        if isinstance(found, Missing):
            return Pending(self._look_up(keys, token, method, path))
        return self._as_key(found, method, path)

    async def _look_up(
        self, keys: KeyStore, token: str, method: str, path: str
    ) -> Immediate | Caller:
        try:
            principal = await keys.lookup(token)
        except GatewayError as err:
            return _error(err)
        return self._as_key(principal, method, path)

    def _as_key(self, principal: Principal | None, method: str, path: str) -> Immediate | Caller:
        refusal = principal_refusal(principal)
        if refusal is not None:
            return _error(refusal)
        assert principal is not None
        caller = self._callers.get(principal.token)
        if caller is None or caller.principal is not principal:  # new, or re-read since
            if self.keys is not None and len(self._callers) > 2 * len(self.keys.cache) + 64:
                self._callers.clear()  # entries of keys the cache dropped
            caller = self._callers[principal.token] = Caller.of(principal)
        return self._route(method, path, caller)

    def _route(self, method: str, path: str, caller: Caller) -> Immediate | Caller:
        """What an authenticated request gets before its body: the model list, /health,
        a 404 for an unknown path, or on to the body phase."""
        state = self.state
        path, _, query = path.partition("?")
        if method == "GET" and path in MODEL_LIST_PATHS:
            if caller.principal is not None:
                return Immediate(200, self._model_list(caller.principal))
            return Immediate(200, state.model_list)
        if method == "GET" and path == "/metrics":  # llmux.listener_metrics: auth
            refusal = self._metrics_refusal(caller)
            if refusal is not None:
                return _error(refusal)
            text, content_type = metrics.render()
            return Immediate(200, text, {"content-type": content_type})
        if management.owns(path) or (method == "GET" and path == "/health"):
            refusal = self._admin_only(caller, path)
            if refusal is not None:
                return _error(refusal)
            if path == "/health":
                return Immediate(200, deployment_health())
            return caller  # the management API answers in the body phase
        if path == ALIAS_PATH:
            return self._alias(caller, query)
        if path not in OPERATIONS:
            return _error(GatewayError(404, f"Unknown path {path!r}"))
        return caller

    def _alias(self, caller: Caller, query: str) -> Immediate:
        """alias.lua's question: which model group the caller's key means by a model name
        no group serves (the answer in `x-llmux-alias`; 404: none)."""
        model = parse_qs(query).get("model", [""])[-1]
        principal = caller.principal
        target = principal.aliases.get(model) if principal is not None else None
        if target is None or target not in self.state.known_models:
            return Immediate(404, b"{}")
        return Immediate(200, b"{}", {"x-llmux-alias": target})

    def _metrics_refusal(self, caller: Caller) -> GatewayError | None:
        """Spend by team and model is the operator's: with a master key set, /metrics needs
        it (a missing or wrong key was already refused with a 401); a virtual key gets 403.
        Without a master key there are no keys to ask for."""
        if caller.principal is not None or (self.state.config.master_key and not caller.admin):
            return GatewayError(
                403, "/metrics needs the master key; a virtual key may not read it."
            )
        return None

    def _admin_only(self, caller: Caller, path: str) -> GatewayError | None:
        # The messages never quote the path: LiteLLM's /key/{key}/regenerate carries a key.
        if caller.principal is not None:
            return GatewayError(
                403, "This path needs the master key; a virtual key may not call it."
            )
        if management.owns(path):
            if not caller.admin:
                return GatewayError(
                    403, "The management API needs general_settings.master_key to be set."
                )
            if self.keys is None:
                return GatewayError(
                    400,
                    "The management API needs a database: set general_settings.database_url "
                    "or DATABASE_URL.",
                    code="no_database",
                )
        return None

    def _model_list(self, principal: Principal) -> bytes:
        """OpenAI's model list of what this key may call (LiteLLM lists a key's models)."""
        state = self.state
        if principal.models.everything and principal.team_models.everything:
            return state.model_list
        names = [
            n
            for n in state.config.model_names
            if principal.model_refusal(n, state.access_groups.get(n, frozenset())) is None
        ]
        return orjson.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": n,
                        "object": "model",
                        "created": state.model_created,
                        "owned_by": "llmux",
                    }
                    for n in names
                ],
            }
        )

    async def _manage(self, method: str, path: str, body: bytes) -> Immediate:
        assert self.keys is not None
        try:
            answer = await management.handle(self.keys, method, path, body)
        except management.MethodNotAllowed as err:
            return Immediate(err.status, err.body(), {"allow": err.allow}, {"error": err.type})
        except GatewayError as err:
            return _error(err)
        return Immediate(answer.status, orjson.dumps(answer.body), answer.headers)

    async def on_body(
        self, path: str, body: bytes, ctx: RequestContext, method: str = "POST"
    ) -> Immediate | Forward:
        """The buffered request body of an authenticated attempt: translate it for the
        deployment Envoy chose."""
        state = self.state
        settle_id: str | None = None
        try:
            limit = state.config.settings.max_request_body_bytes
            if len(body) > limit:
                raise GatewayError(
                    413, f"Request body is {len(body)} bytes; the limit is {limit} bytes."
                )
            route = path.partition("?")[0]
            if management.owns(route):
                return await self._manage(method, path, body)
            req = parse_request(OPERATIONS[route], body)
            principal = ctx.caller.principal
            if req.model not in state.known_models and principal is not None:
                # A key alias (alias.lua routed the request to the target's group).
                target = principal.aliases.get(req.model)
                if target is not None:
                    req = ClientRequest(req.operation, req.body, req.raw, target, req.stream)
            if req.model not in state.known_models:
                raise GatewayError(
                    404,
                    f"The model {req.model!r} does not exist. "
                    f"Available: {', '.join(sorted(state.known_models))}",
                    param="model",
                    code="model_not_found",
                )
            if principal is not None:
                refusal = principal.model_refusal(
                    req.model, state.access_groups.get(req.model, frozenset())
                )
                if refusal is not None:
                    raise refusal
            settle_id, limit_headers = await self._limit(principal, req, len(body), ctx)
            dep = ctx.attempt.deployment
            if dep is None and _nesting(req.body) >= ENCODE_DEPTH - _PROVIDER_NESTING:
                # Envoy's JSON reader gives up before orjson's (measured: 800 levels read,
                # 1000 not), so such a body reaches no group.
                raise _too_deep(_nesting(req.body))
            if dep is None or dep.model_name not in state.answering[req.model]:
                # Envoy's routes and this worker's config disagree: a reload is under way.
                raise GatewayError(
                    503, f"The model {req.model!r} is being reconfigured; retry the request."
                )
            adapter = adapter_for(dep.spec)
            if isinstance(adapter, MockAdapter):
                return self._mock(req, dep, adapter, state, ctx, settle_id, limit_headers)
            if not adapter.ready(dep):
                await adapter.prepare(dep)
            upstream = adapter.request(req, dep)
            held = self._admit(dep)
        except Refused as refused:
            err = refused.error
            return Immediate(err.status, err.body(), refused.headers, {"error": err.type})
        except GatewayError as err:
            if settle_id is not None:  # admitted, then refused here (translation, bulkhead)
                self._settle(settle_id, 0, 0.0)
            return _error(err)
        except orjson.JSONEncodeError:
            # orjson parses 1024 levels of nesting but encodes only 254 (measured): a body
            # in between parses and then cannot be re-encoded for the provider, whose format
            # may nest the client's values a few levels deeper. Checked on the failure only,
            # so a well-formed request pays nothing for it.
            depth = _nesting(orjson.loads(body))
            if depth < ENCODE_DEPTH - _PROVIDER_NESTING:
                raise
            return _error(_too_deep(depth))
        assert dep.upstream is not None
        remove: tuple[str, ...] = ()
        if ctx.attempt.number > 1:
            remove = tuple(h for h in PROVIDER_HEADERS if h not in upstream.headers)
        exchange = Exchange(req, dep, adapter, state.prices.get(dep.id), time.monotonic(), ctx)
        exchange.settle_id, exchange.limit_headers = settle_id, limit_headers
        return Forward(
            authority=dep.upstream.authority,
            upstream=upstream,
            exchange=exchange,
            remove_headers=remove,
            held=held,
        )

    async def _limit(
        self, principal: Principal | None, req: ClientRequest, raw_length: int, ctx: RequestContext
    ) -> tuple[str | None, dict[str, str]]:
        """Rate limits and budgets, once per request: its first attempt admits and reserves
        (one call to the limiter: no Redis, a local transaction; with Redis, one round
        trip), the answer settles (`_account`). Returns the reservation to settle and the
        x-ratelimit-* headers; raises `Refused`."""
        limiter = self.limiter
        if principal is None or limiter is None or not ctx.caller.limited or not ctx.request_id:
            return None, {}
        state = self.state
        now = time.time()
        ask = budgets.ask_for(
            principal,
            ctx.request_id,
            req.model,
            req.body,
            raw_length,
            state.max_prices.get(req.model, (0.0, 0.0)),
            now,
            state.config.settings.request_timeout_s + 60.0,
        )
        if ask.empty:
            return None, {}
        if ctx.attempt.number > 1:
            # Admitted by the first attempt; settled once, by whichever attempt answers.
            # Its headers come from a look at the buckets (a retry's cost only).
            return ctx.request_id, ratelimit_headers(await limiter.peek(ask.limits))
        decision = await limiter.admit(ask)
        headers = ratelimit_headers(decision.headroom)
        if not decision.admitted:
            err = budgets.refusal(decision)
            metrics.RATE_LIMITED.labels(err.param or "").inc()
            if err.status == 429:
                headers["retry-after"] = str(max(1, round(decision.retry_after_s)))
            raise Refused(err, headers)
        return ctx.request_id, headers

    def release_later(self, request_id: str) -> None:
        """Release the reservation of a request Envoy ended itself (no upstream, timeout,
        the processor gone): nothing else would before it expires. A second later, so
        that a processor that did answer (a translated stream the client left) settles
        with the real usage first; settling twice is a no-op."""
        if self.limiter is None or self.loop is None or not request_id:
            return
        loop = self.loop
        loop.call_soon_threadsafe(loop.call_later, 1.0, self._settle, request_id, 0, 0.0)

    def _settle(self, request_id: str, tokens: int, cost: float) -> None:
        """Settle a reservation off the request's path (a Redis round trip at most);
        callable from the accounting thread too."""
        limiter, loop = self.limiter, self.loop
        if limiter is None or loop is None:
            return

        async def settle() -> None:
            try:
                budgets.soft_budget_crossed(await limiter.settle(request_id, tokens, cost))
            except Exception:
                _log.exception("could not settle the reservation of request %s", request_id)

        def start() -> None:
            task = loop.create_task(settle())
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            start()
        else:
            loop.call_soon_threadsafe(start)

    def _admit(self, dep: Deployment) -> bool:
        """The deployment's bulkhead (max_parallel_requests): True when this attempt holds
        a place, to be given back when it ends; full answers a 429 naming it."""
        cap = dep.max_parallel_requests
        if cap is None or self.bulkhead is None:
            return False
        if not self.bulkhead.acquire(dep.id, cap):
            raise GatewayError(
                429,
                f"Deployment {dep.id!r} of {dep.model_name!r} is at its max_parallel_requests "
                f"({cap}); retry later.",
                code="max_parallel_requests",
            )
        return True

    def release(self, dep_id: str) -> None:
        if self.bulkhead is not None:
            self.bulkhead.release(dep_id)

    def _mock(
        self,
        req: ClientRequest,
        dep: Deployment,
        adapter: MockAdapter,
        state: State,
        ctx: RequestContext,
        settle_id: str | None = None,
        limit_headers: dict[str, str] | None = None,
    ) -> Immediate:
        started = time.monotonic()
        body, usage, content_type = adapter.answer(req, dep)
        exchange = Exchange(req, dep, adapter, state.prices.get(dep.id), started, ctx)
        exchange.settle_id, exchange.limit_headers = settle_id, limit_headers or {}
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
            return PassThrough(self._passthrough_marks(exchange, strip_usage=not wants_usage))
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
        caller = exchange.ctx.caller
        principal = caller.principal
        if principal is not None:  # who called, for accounting from the access log
            known = self._caller_marks.get(principal.token)
            if known is None or known[0] is not principal:  # new, or re-read since
                if len(self._caller_marks) > 2 * len(self._callers) + 64:
                    self._caller_marks.clear()  # entries of keys the cache dropped
                known = self._caller_marks[principal.token] = (principal, caller_marks(principal))
            marks["caller"] = known[1]
        elif caller.admin:
            marks["admin"] = True
        if exchange.settle_id:  # the access log entry settles the reservation
            marks["rid"] = exchange.settle_id
        if self.tracer is not None:
            marks.update(trace_marks(exchange))
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
        caller: Caller = DEFAULT_CALLER,
        request_id: str = "",
        settle_id: str | None = None,
    ) -> None:
        """Account an answer Envoy passed on by itself, from its access log entry.

        Without usage, a stream is counted with tiktoken from `cut_short` (~75 ns a byte):
        the caller runs this off the event loop then."""
        state = self.state
        dep = state.by_id.get(deployment_id)
        if dep is None:  # removed by a reload since; its price went with it
            if settle_id:
                self._settle(settle_id, 0, 0.0)
            return
        exchange = Exchange(
            ClientRequest("chat", {}, b"", dep.model_name, stream),
            dep,
            adapter_for(dep.spec),
            state.prices.get(dep.id),
            time.monotonic() - duration_s,
            RequestContext(caller, Attempt(1, dep), request_id),
            settle_id=settle_id,
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
                per_token: float | None = None
                if counted.completion_tokens > 1 and duration_s > ttft_s:
                    per_token = (duration_s - ttft_s) / (counted.completion_tokens - 1)
                    metrics.TIME_PER_OUTPUT_TOKEN.labels(provider, model).observe(per_token)
                self._streamed(exchange, ttft_s, per_token)
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
            if self.state.config.message_logging:
                # Providers echo prompts in their messages: logged only when
                # litellm_settings.turn_off_message_logging is false, and redacted then.
                log.warning(
                    "deployment %s (%s) answered %d: %s", dep.id, dep.provider, status, err.message
                )
            retry = self._worth_retrying(exchange, status, err)
            action = self._account(exchange, err.status, None, err, final=not retry)
            action.retry = retry
            return action
        try:
            result = exchange.adapter.response(body, exchange.req, dep)
        except GatewayError as err:
            metrics.UPSTREAM_ERRORS.labels(error_type(err.status)).inc()
            return self._account(exchange, err.status, None, err)
        return self._account(exchange, status, result.usage, None, result.body)

    def _worth_retrying(self, ex: Exchange, status: int, err: GatewayError) -> bool:
        """Whether another attempt may fix this answer, and Envoy has one left for it."""
        state = self.state
        group = ex.req.model
        if ex.ctx.attempt.number >= state.max_attempts.get(group, 1):
            return False
        if status in state.retriable:
            return True
        if status != 400:
            return False
        message = err.message.lower()
        kinds = state.fallback_kinds.get(group, set())
        if "context_window" in kinds and any(h in message for h in _CONTEXT_WINDOW_HINTS):
            return True
        return "content_policy" in kinds and any(h in message for h in _CONTENT_POLICY_HINTS)

    def _account(
        self,
        ex: Exchange,
        status: int,
        usage: Usage | None,
        err: GatewayError | None,
        body: bytes | None = None,
        *,
        final: bool = True,
    ) -> ResponseAction:
        dep = ex.dep
        model = dep.model_name
        if final:  # a failed attempt Envoy retries is counted as an upstream error only
            metrics.child(metrics.REQUESTS, model, dep.provider, str(status)).inc()
            metrics.child(metrics.LATENCY, dep.provider, model).observe(
                time.monotonic() - ex.started
            )
            self._conventions(ex, status, usage if err is None else None)
        headers = attempt_headers(ex)
        log: dict[str, Any] = {"model": model, "deployment": dep.id, "provider": dep.provider}
        if self.tracer is not None:
            log.update(trace_marks(ex))
            if body is not None:
                log.update(answer_marks(body))
        if err is not None:
            log["error"] = err.type
            if final:
                self._log_spend(ex, err.status, None, 0.0, err.type)
            if final and ex.settle_id:
                self._settle(ex.settle_id, 0, 0.0)
            return ResponseAction(err.status, err.body(), headers, log)
        cost = 0.0
        if usage is not None:
            caller = ex.ctx.caller
            _count_tokens(caller.team, model, usage)
            if self.report_tokens is not None and self.state.usage_routing:
                self.report_tokens(dep.id, usage.prompt_tokens + usage.completion_tokens)
            log["prompt_tokens"] = usage.prompt_tokens
            log["completion_tokens"] = usage.completion_tokens
            if ex.price is not None:
                cost = pricing.cost(ex.price, usage)
                metrics.child(metrics.SPEND, caller.team, model).inc(cost)
                headers["x-llmux-response-cost"] = headers["x-litellm-response-cost"] = repr(cost)
                log["cost"] = cost
        self._log_spend(ex, status, usage, cost, None)
        if final and ex.settle_id:
            used = 0 if usage is None else usage.prompt_tokens + usage.completion_tokens
            self._settle(ex.settle_id, used, cost)
        return ResponseAction(status, body, headers, log)

    def _log_spend(
        self, ex: Exchange, status: int, usage: Usage | None, cost: float, error: str | None
    ) -> None:
        """Queue the request's spend log row (no I/O: a background task writes batches)."""
        queue = self.spend
        if queue is None:
            return
        caller = ex.ctx.caller
        dep = ex.dep
        end = time.time()
        token = caller.token or (self.state.master_token if caller.admin else "")
        queue.put(
            SpendRow(
                request_id=ex.ctx.request_id or str(uuid.uuid4()),
                call_type=CALL_TYPES.get(ex.req.operation, ex.req.operation),
                api_key=token,
                user=caller.user_id or (management.ADMIN_NAME if caller.admin else None),
                team_id=caller.principal.team_id if caller.principal else None,
                key_alias=caller.principal.key_alias if caller.principal else None,
                model=dep.model,
                model_group=ex.req.model,
                model_id=dep.id,
                provider=dep.provider,
                api_base=self.state.api_bases.get(dep.id, ""),
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
                cached_tokens=usage.cached_tokens if usage else 0,
                cache_write_tokens=usage.cache_write_tokens if usage else 0,
                spend=cost,
                start=end - (time.monotonic() - ex.started),
                end=end,
                status="success" if error is None and status < 400 else "failure",
                error=error,
            )
        )

    def _conventions(self, ex: Exchange, status: int, usage: Usage | None) -> None:
        """The answer in the GenAI conventions' names and, when asked for, LiteLLM's."""
        litellm = self.state.config.litellm_metrics
        cost = None
        if litellm and usage is not None and ex.price is not None:
            cost = pricing.cost(ex.price, usage)
        seconds = time.monotonic() - ex.started
        caller = caller_labels(ex.ctx.caller)
        metrics.answered(ex.dep, ex.req.operation, caller, status, seconds, usage, cost, litellm)

    def _streamed(self, ex: Exchange, ttft_s: float, per_token_s: float | None) -> None:
        litellm = self.state.config.litellm_metrics
        caller = caller_labels(ex.ctx.caller)
        metrics.streamed(ex.dep, ex.req.operation, caller, ttft_s, per_token_s, litellm)


def caller_labels(caller: Caller) -> tuple[str, str, str]:
    """(team, team_alias, api_key_alias) for metrics: ids and aliases from the key
    database, never the key."""
    principal = caller.principal
    team_alias = (principal.team_alias if principal is not None else None) or ""
    return caller.team, team_alias, caller.key_alias or ""


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
            per_token: float | None = None
            if usage.completion_tokens > 1:
                per_token = (now - self.first_output) / (usage.completion_tokens - 1)
                metrics.TIME_PER_OUTPUT_TOKEN.labels(provider, model).observe(per_token)
            self.gateway._streamed(ex, self.first_output - ex.started, per_token)
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


def _count_tokens(team: str, model: str, usage: Usage) -> None:
    counter = metrics.TOKENS
    metrics.child(counter, team, model, "input").inc(usage.prompt_tokens)
    metrics.child(counter, team, model, "output").inc(usage.completion_tokens)
    if usage.cached_tokens:
        metrics.child(counter, team, model, "cached_input").inc(usage.cached_tokens)
    if usage.cache_write_tokens:
        metrics.child(counter, team, model, "cache_write").inc(usage.cache_write_tokens)
    if usage.reasoning_tokens:
        metrics.child(counter, team, model, "reasoning").inc(usage.reasoning_tokens)


def caller_marks(principal: Principal) -> Encoded:
    """Who called, as marks (read back by accesslog._caller): what the spend row and the
    metrics' labels need."""
    fields = {
        "key": principal.token,
        "team": principal.team_id,
        "team_alias": principal.team_alias,
        "alias": principal.key_alias,
        "key_name": principal.key_name,
        "user": principal.user_id,
    }
    return Encoded(encode_marks({k: v for k, v in fields.items() if v}))


def deployment_health() -> bytes:
    """LiteLLM's /health shape (healthy and unhealthy endpoints, counts) from the states
    the supervisor's control plane last wrote: cooldowns, circuit open or half-open."""
    root = os.environ.get("LLMUX_RUNTIME_DIR")
    try:
        states = orjson.loads(Path(root, "deployments.json").read_bytes()) if root else {}
    except (OSError, orjson.JSONDecodeError):
        states = {}
    healthy: list[dict[str, Any]] = []
    unhealthy: list[dict[str, Any]] = []
    for dep_id, st in states.items():
        entry = {"model_id": dep_id, **st}
        (healthy if st.get("state") == "healthy" else unhealthy).append(entry)
    return orjson.dumps(
        {
            "healthy_endpoints": healthy,
            "unhealthy_endpoints": unhealthy,
            "healthy_count": len(healthy),
            "unhealthy_count": len(unhealthy),
        }
    )


def trace_marks(ex: Exchange) -> dict[str, Any]:
    """The request's GenAI attributes for the spans of both tracers (tracing on only)."""
    caller = ex.ctx.caller
    return request_marks(
        ex.req.operation,
        ex.req.body,
        ex.dep.provider,
        caller.team,
        caller.key_alias,
        ex.ctx.attempt.number,
    )


def attempt_headers(ex: Exchange) -> dict[str, str]:
    """LiteLLM's response headers: which deployment answered, after how many retries and
    fallbacks."""
    attempt = ex.ctx.attempt
    return {
        "x-litellm-model-id": ex.dep.id,
        "x-litellm-attempted-retries": str(attempt.retries),
        "x-litellm-attempted-fallbacks": str(attempt.priority),
        **ex.limit_headers,
    }


# The nesting orjson refuses to encode (arrays or objects inside one another), and the
# levels a provider's format may add around the client's values.
ENCODE_DEPTH = 255
_PROVIDER_NESTING = 8


def _too_deep(depth: int) -> GatewayError:
    return bad_request(
        f"Request body is nested {depth} levels deep; LLMux forwards at most "
        f"{ENCODE_DEPTH - _PROVIDER_NESTING - 1}."
    )


def _nesting(value: Any) -> int:
    """How deeply arrays and objects are nested in a parsed JSON value (no recursion:
    the value may be nested deeper than Python's stack allows)."""
    deepest = 0
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in children)
    return deepest


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
        # A role that is no string is refused as any other (a list raised TypeError: a 500).
        if not isinstance(role, str) or role not in VALID_ROLES:
            raise bad_request(
                f"messages[{i}].role must be one of {sorted(VALID_ROLES)}, got {role!r}.",
                f"messages[{i}].role",
            )


__all__ = ["Exchange", "Forward", "Gateway", "Immediate", "ResponseAction", "error_type"]
