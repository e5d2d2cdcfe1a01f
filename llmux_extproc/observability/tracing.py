"""Traces: the GenAI attributes of an attempt, and the workers' own spans.

Two tracers write one trace. Envoy's (control/envoy_tracing.py) makes the request's span and
one per upstream attempt, and carries the attributes of every answer, passed-through ones
included, as custom tags read from the `llmux` metadata: `marks()` below is what the
processor puts there (through the marks header), response.lua adds what it reads from
OpenAI-format answers. The worker's span (`AttemptSpan`) is a child of Envoy's span of the
attempt (its traceparent reaches the processor with the attempt's request headers) and
covers what Python does: authentication, translation, translated answers and streams.

Off, nothing here runs: the processor checks one attribute (`Gateway.tracer is None`) per
message, the OpenTelemetry SDK is not even imported, and no span object exists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from llmux_extproc.observability.tracing_settings import TracingSettings

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("llmux.tracing")

# gen_ai.provider.name values of the semantic conventions, by LiteLLM provider prefix;
# providers the conventions do not list keep their LiteLLM name.
GEN_AI_PROVIDERS = {
    "azure": "azure.ai.openai",
    "bedrock": "aws.bedrock",
    "gemini": "gcp.gemini",
    "vertex_ai": "gcp.vertex_ai",
    "mistral": "mistral_ai",
    "xai": "x_ai",
}
OPERATIONS = {"chat": "chat", "embeddings": "embeddings"}
# Request parameters recorded as gen_ai.request.<name> (the client's names).
REQUEST_PARAMS = (
    "temperature",
    "max_tokens",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "seed",
)

# Span attribute ← key of the marks (the `llmux` metadata Envoy's tags read). Both tracers
# use this one table.
SPAN_ATTRIBUTES = {
    "gen_ai.operation.name": "op",
    "gen_ai.provider.name": "gen_ai_provider",
    "gen_ai.system": "gen_ai_provider",  # the older name, which the seed uses
    "gen_ai.response.model": "response_model",
    "gen_ai.response.id": "response_id",
    "gen_ai.response.finish_reasons": "finish_reasons",
    "gen_ai.usage.input_tokens": "prompt_tokens",
    "gen_ai.usage.output_tokens": "completion_tokens",
    **{f"gen_ai.request.{p}": p for p in REQUEST_PARAMS},
    "llmux.model_group": "model",
    "llmux.deployment": "deployment",
    "llmux.provider": "provider",
    "llmux.team": "team",
    "llmux.key_alias": "key_alias",
    "llmux.cost": "cost",
    "llmux.attempts": "attempt",
    "llmux.error": "error",
}


def gen_ai_provider(provider: str) -> str:
    return GEN_AI_PROVIDERS.get(provider, provider)


def request_marks(
    operation: str,
    body: Mapping[str, Any],
    provider: str,
    team: str,
    key_alias: str | None,
    attempt: int,
) -> dict[str, Any]:
    """What an attempt's span needs to know of its request; strings, numbers, bools only
    (the marks header's types)."""
    marks: dict[str, Any] = {
        "trace": True,  # response.lua reads the answer's model, finish reasons, tokens
        "op": OPERATIONS.get(operation, operation),
        "gen_ai_provider": gen_ai_provider(provider),
        "team": team,
        "attempt": attempt,
    }
    if key_alias:
        marks["key_alias"] = key_alias
    for name in REQUEST_PARAMS:
        value = body.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            marks[name] = value
    if "max_tokens" not in marks:
        value = body.get("max_completion_tokens")
        if isinstance(value, int) and not isinstance(value, bool):
            marks["max_tokens"] = value
    return marks


def answer_marks(body: bytes) -> dict[str, Any]:
    """Response model, id and finish reasons of an OpenAI-shaped answer the processor
    wrote (a translated one); response.lua finds the same in passed-through answers."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(doc, dict):
        return {}
    marks: dict[str, Any] = {}
    if isinstance(doc.get("model"), str):
        marks["response_model"] = doc["model"]
    if isinstance(doc.get("id"), str):
        marks["response_id"] = doc["id"]
    choices = doc.get("choices")
    if isinstance(choices, list):
        reasons = [c.get("finish_reason") for c in choices if isinstance(c, dict)]
        kept = [r for r in reasons if isinstance(r, str)]
        if kept:
            # As Envoy's tag renders a list: JSON text (one attribute type for both tracers).
            marks["finish_reasons"] = orjson.dumps(kept).decode()
    return marks


# What the worker's span of a passed-through attempt keeps: Envoy's request span already
# has the GenAI attributes (custom tags), so only what is the worker's own.
_PASSTHROUGH_KEYS = ("model", "deployment", "attempt")


_SAMPLED_FLAGS = frozenset({"01", "03"})


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


class AttemptSpan:
    """The worker's span of one attempt, from its request headers to the last message the
    processor sees (or Envoy ending the stream).

    Nothing of the SDK is touched until the attempt ends: the start time, the events and
    the marks are kept in plain Python, and `end` makes the span in one call with all of
    them (the SDK validates attributes on every set: recording them as they came cost 130
    us per request of the worker's event loop, measured with bench/tracing_cost.py)."""

    __slots__ = ("_ended", "_events", "_extra", "_marks", "_parent", "_start", "_tracer", "ids")

    def __init__(self, tracer: WorkerTracer, traceparent: str | None, ids: tuple[str, str]) -> None:
        self._tracer = tracer
        self._parent = traceparent
        self._start = time.time_ns()
        self._events: list[tuple[str, int]] = []
        self._marks: dict[str, Any] = {}
        self._extra: dict[str, Any] = {}
        self._ended = False
        # Trace id and the parent's span id (Envoy's span of this attempt): the ids the
        # worker's log lines carry, known before the span exists.
        self.ids = ids

    @property
    def ended(self) -> bool:
        return self._ended

    def event(self, name: str) -> None:
        self._events.append((name, time.time_ns()))

    def record(self, marks: Mapping[str, Any]) -> None:
        """Marks (request_marks, the accounting log, answer_marks), as span attributes."""
        self._marks.update(marks)

    def set(self, key: str, value: Any) -> None:
        self._extra[key] = value

    def end(
        self, status: int | None = None, error: str | None = None, *, genai: bool = True
    ) -> None:
        """genai=False: a passed-through answer, whose GenAI attributes Envoy's span has."""
        if self._ended:
            return
        self._ended = True
        marks = self._marks
        attrs: dict[str, Any] = {}
        for attribute, key in SPAN_ATTRIBUTES.items():
            value = marks.get(key)
            if value is None or (not genai and key not in _PASSTHROUGH_KEYS):
                continue
            if key == "finish_reasons" and isinstance(value, str):
                value = orjson.loads(value)
            attrs[attribute] = value
        attrs.update(self._extra)
        if status is not None:
            attrs["http.response.status_code"] = status
        failed = error is not None or (status is not None and status >= 500)
        if failed:
            attrs["error.type"] = error or str(status)
        op, model = marks.get("op"), marks.get("model")
        name = f"{op} {model}" if op and model else "llmux.attempt"
        span = self._tracer.start(name, self._parent, _attributes(attrs), self._start)
        for event, at in self._events:
            span.add_event(event, timestamp=at)
        if failed:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


def _attributes(values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, str | bool | int | float):
            out[key] = value
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            out[key] = list(value)
        elif value is not None:
            out[key] = orjson.dumps(value).decode()
    return out


class WorkerTracer:
    """The worker's TracerProvider: OTLP over gRPC or HTTP, batched off the event loop
    (the SDK's BatchSpanProcessor exports from its own thread)."""

    def __init__(self, settings: TracingSettings) -> None:
        from opentelemetry.propagate import extract  # noqa: F401  (fail early if missing)
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        self.settings = settings
        # Envoy already sampled: a worker span follows its parent's flag; the ratio only
        # decides for an attempt that arrived without a traceparent (a sidecar setup).
        sampler = ParentBased(TraceIdRatioBased(settings.sampling_ratio))
        resource = Resource.create({"service.name": settings.service_name})
        self.provider = TracerProvider(resource=resource, sampler=sampler)
        self.provider.add_span_processor(BatchSpanProcessor(self._exporter(settings)))
        self.tracer: Tracer = self.provider.get_tracer("llmux")
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._propagator = TraceContextTextMapPropagator()

    @staticmethod
    def _exporter(s: TracingSettings) -> Any:
        headers = dict(s.headers)
        if s.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )

            return GrpcExporter(
                endpoint=f"{s.host}:{s.port}",
                insecure=not s.tls,
                headers=headers or None,
                timeout=s.export_timeout_s,
            )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter(endpoint=s.endpoint, headers=headers, timeout=s.export_timeout_s)

    def attempt(self, traceparent: str | None, ids: tuple[str, str] | None) -> AttemptSpan | None:
        """The span of an attempt whose request carries `traceparent` (Envoy's attempt span,
        `ids` its trace and span id); None when Envoy did not sample it, so an unsampled
        request costs the worker nothing more (parent-based sampling, as Envoy's)."""
        if ids is None:  # no parent (a sidecar setup): the span starts a trace of its own
            return AttemptSpan(self, None, ("", ""))
        assert traceparent is not None
        flags = traceparent[53:55]
        if flags not in _SAMPLED_FLAGS and not (_is_hex(flags) and int(flags, 16) & 1):
            return None
        return AttemptSpan(self, traceparent, ids)

    def start(
        self, name: str, traceparent: str | None, attributes: dict[str, Any], start_time: int
    ) -> Span:
        from opentelemetry.trace import SpanKind

        parent = self._propagator.extract({"traceparent": traceparent}) if traceparent else None
        return self.tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=start_time,
        )

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what is batched
