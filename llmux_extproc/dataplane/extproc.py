"""The ext_proc protocol: Envoy's ProcessingRequest messages in, ProcessingResponses out.

This is the only module that knows the gRPC message shapes; decisions come from
`gateway.Gateway`. The processor runs as an *upstream* filter of each model group's
cluster (envoy_routing), so one gRPC stream is one attempt of an HTTP request, on the
endpoint Envoy chose: request headers (authentication from the key Envoy moved into
metadata; which deployment, from the endpoint's metadata), the buffered request body
(translation and signing for that deployment), the response headers (an OpenAI-format
success goes on through Envoy alone; errors and translated answers ask for the body) and,
for those, the buffered response body.

What the processor writes as dynamic metadata stays on the attempt's own stream info
(docs/architecture.md), so what Envoy's downstream filters and access log need travels as
the `x-llmux-marks` response header, which response.lua reads and removes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import orjson
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorServicer
from envoy.type.v3.http_status_pb2 import HttpStatus

from llmux_extproc.control.envoy_routing import (
    ALIAS_PATH,
    CLIENT_KEY_HEADERS,
    MARKS_HEADER,
    REQUEST_NAMESPACE,
    RETRY_HEADER,
)
from llmux_extproc.dataplane.context import Attempt, Caller, RequestContext
from llmux_extproc.dataplane.gateway import (
    Exchange,
    Forward,
    Gateway,
    Immediate,
    PassThrough,
    Pending,
    ResponseAction,
    StreamSession,
    attempt_headers,
    dropped_client_headers,
    trace_marks,
)
from llmux_extproc.dataplane.marks import encode_marks
from llmux_extproc.errors import GatewayError
from llmux_extproc.observability import metrics
from llmux_extproc.observability.logs import TRACE_IDS, trace_ids_from_traceparent
from llmux_extproc.observability.tracing import AttemptSpan

log = logging.getLogger("llmux.extproc")

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# Set (in reply to the response headers) for an answer Envoy passes on by itself.
_PASSTHROUGH_RESPONSE = ProcessingMode(
    response_header_mode=ProcessingMode.SEND,
    response_body_mode=ProcessingMode.NONE,
    response_trailer_mode=ProcessingMode.SKIP,
)
# Set (in reply to the response headers) for a streamed success: each upstream chunk is
# translated and passed on as it arrives instead of buffered.
_STREAMED_RESPONSE = ProcessingMode(
    response_header_mode=ProcessingMode.SEND,
    response_body_mode=ProcessingMode.STREAMED,
    response_trailer_mode=ProcessingMode.SKIP,
)


# Set (in reply to the response headers) for an answer whose body the processor handles
# whole: errors (translated to OpenAI's shape, judged for a retry) and translated answers.
_BUFFERED_RESPONSE = ProcessingMode(
    response_header_mode=ProcessingMode.SEND,
    response_body_mode=ProcessingMode.BUFFERED,
    response_trailer_mode=ProcessingMode.SKIP,
)

_TRACE_CONTEXT = ("traceparent", "tracestate")
_HEADERS_CONTINUE = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_RESPONSE_HEADERS_CONTINUE = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
_HOST_ATTRIBUTES = "envoy.filters.http.ext_proc"
# `xds.upstream_host_metadata` arrives as protobuf text format (a string, not a Struct):
# the endpoint's `llmux.d` value is "<priority>|<deployment id>" (envoy_routing).
_HOST_DEPLOYMENT = re.compile(r'key: "d" value \{ string_value: "((?:[^"\\]|\\.)*)"')


def _mutation(headers: Mapping[str, str], remove: Iterable[str] = ()) -> pb.HeaderMutation:
    # Filled in place: half the cost of building each HeaderValueOption from keyword
    # arguments (measured: 4.0 vs 7.2 us for four headers), twice on every request.
    mutation = pb.HeaderMutation(remove_headers=remove)
    add = mutation.set_headers.add
    for key, value in headers.items():
        option = add(append_action=_OVERWRITE)
        option.header.key = key
        option.header.raw_value = value.encode()
    return mutation


def immediate(answer: Immediate) -> pb.ProcessingResponse:
    headers = {
        "content-type": answer.headers.get("content-type", "application/json"),
        **answer.headers,
    }
    if answer.log:
        headers[MARKS_HEADER] = encode_marks(answer.log)
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=HttpStatus(code=answer.status),  # type: ignore[arg-type]
            headers=_mutation(headers),
            body=answer.body,
            details="llmux",
        ),
    )


def forward(fwd: Forward, request_headers: Iterable[str] = ()) -> pb.ProcessingResponse:
    up = fwd.upstream
    headers = {":path": up.path, ":authority": fwd.authority, **up.headers}
    body_mutation = None
    if up.body is not None:
        headers["content-length"] = str(len(up.body))
        body_mutation = pb.BodyMutation(body=up.body)
    else:
        # Envoy re-sends the client's body on a retry, but the headers keep what the last
        # attempt set: a length it set for a rewritten body must not outlive it.
        headers["content-length"] = str(len(fwd.exchange.req.raw))
    # The allow-list of client headers: request_headers are what this attempt's headers
    # message held (the client's, Envoy's, a previous attempt's).
    remove = dropped_client_headers(request_headers, headers)
    remove.extend(h for h in fwd.remove_headers if h not in headers and h not in remove)
    response = pb.ProcessingResponse(
        request_body=pb.BodyResponse(
            response=pb.CommonResponse(
                header_mutation=_mutation(headers, remove),
                body_mutation=body_mutation,
            )
        )
    )
    return response


def _header_map(headers: Iterable[HeaderValue]) -> dict[str, str]:
    return {
        h.key: h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value for h in headers
    }


def host_deployment(msg: pb.ProcessingRequest) -> tuple[int, str] | None:
    """(priority, deployment id) of the endpoint Envoy chose for this attempt; None for
    `llmux_local`, whose endpoint carries no deployment."""
    attrs = msg.attributes.get(_HOST_ATTRIBUTES)
    if attrs is None or "xds.upstream_host_metadata" not in attrs.fields:
        return None
    found = _HOST_DEPLOYMENT.search(attrs.fields["xds.upstream_host_metadata"].string_value)
    if found is None:
        return None
    value = found.group(1)
    if "\\" in value:  # text format escapes quotes, backslashes and non-ASCII bytes
        value = value.encode("latin-1").decode("unicode_escape").encode("latin-1").decode()
    priority, _, dep_id = value.partition("|")
    return int(priority), dep_id


def client_request(msg: pb.ProcessingRequest) -> tuple[dict[str, str], str | None]:
    """The client's key headers and path, which Envoy copied into metadata before routing
    (the keys removed from the request; the path survives no attempt's rewrite)."""
    ns = msg.metadata_context.filter_metadata.get(REQUEST_NAMESPACE)
    if ns is None:
        return {}, None
    fields = ns.fields
    keys = {k: fields[k].string_value for k in CLIENT_KEY_HEADERS if k in fields}
    return keys, fields["path"].string_value if "path" in fields else None


class Processor(ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.open_streams = 0

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        state = _HttpStream(self.gateway)
        self.open_streams += 1
        metrics.OPEN_STREAMS.inc()
        try:
            async for msg in request_iterator:
                try:
                    reply = await state.handle(msg)
                except Exception:
                    log.exception("processing failed")
                    reply = immediate(_internal_error())
                yield reply
                if state.last_reply or reply.HasField("immediate_response"):
                    # Envoy sends nothing more: end the RPC now. Waiting for Envoy to close
                    # it races with Envoy resetting the stream, and grpcio (1.85) leaks the
                    # ~80-byte op array of a status sent on a reset call (grpc/grpc#43360):
                    # ~120 bytes of RSS per request over a million requests.
                    return
        finally:
            # The gRPC stream ends with the HTTP request, also when the client left mid-way:
            # a stream cut short is still accounted.
            state.abandon()
            self.open_streams -= 1
            metrics.OPEN_STREAMS.dec()


class _HttpStream:
    """The state of one HTTP request across its ext_proc messages."""

    __slots__ = (
        "ctx",
        "exchange",
        "gateway",
        "headers",
        "held",
        "last_reply",
        "session",
        "span",
        "status",
    )

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        # Set when the reply being made is the last message Envoy will ask for.
        self.last_reply = False
        self.headers: dict[str, str] = {}
        self.ctx: RequestContext | None = None
        self.exchange: Exchange | None = None
        self.status = 200
        self.session: StreamSession | None = None
        # A deployment whose bulkhead place this attempt holds: given back when Envoy ends
        # the stream (the attempt's end), so the RPC is kept open until then.
        self.held: str | None = None
        # The worker's span of this attempt, only while tracing is on.
        self.span: AttemptSpan | None = None

    async def handle(self, msg: pb.ProcessingRequest) -> pb.ProcessingResponse:
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            return await self._request_headers(msg)
        if kind == "request_body":
            assert self.ctx is not None
            decision = await self.gateway.on_body(
                self.headers.get(":path", ""),
                msg.request_body.body,
                self.ctx,
                self.headers.get(":method", "POST"),
            )
            if isinstance(decision, Immediate):
                if self.span is not None:
                    self._span_ends(decision.log, decision.status)
                return immediate(decision)
            self.exchange = decision.exchange
            if self.span is not None:
                self._span_forwards(decision.exchange)
            if decision.held:
                self.held = decision.exchange.dep.id
            seen: Iterable[str] = self.headers
            if self.gateway.tracer is not None:
                # Tracing on, the trace context is Envoy's attempt span (Envoy rewrote what
                # the client sent): the provider gets it. Off, the client's is removed with
                # every other client header.
                seen = [h for h in self.headers if h not in _TRACE_CONTEXT]
            return forward(decision, seen)
        if kind == "response_headers":
            return self._response_headers(msg.response_headers)
        if kind == "response_body":
            if self.session is not None:
                return self._stream_chunk(msg.response_body)
            return self._response_body(msg.response_body.body)
        # Phases this configuration does not send; answer so Envoy never waits.
        return _continue(kind)

    async def _request_headers(self, msg: pb.ProcessingRequest) -> pb.ProcessingResponse:
        headers = msg.request_headers
        self.headers.update(_header_map(headers.headers.headers))
        keys, path = client_request(msg)
        if path is not None:
            self.headers[":path"] = path
        path = self.headers.get(":path", "")
        if not keys and path.startswith(ALIAS_PATH):
            # alias.lua's own request (an httpCall: no downstream filters, no metadata)
            # carries the client's key in its headers. Clients cannot send one: the
            # listener routes no such path to the processor.
            keys = {k: self.headers[k] for k in CLIENT_KEY_HEADERS if k in self.headers}
        method = self.headers.get(":method", "")
        tracer = self.gateway.tracer
        if tracer is not None:
            # Envoy's span of this attempt is the parent (its context is in the headers).
            traceparent = self.headers.get("traceparent")
            ids = trace_ids_from_traceparent(traceparent)
            if ids is not None:
                TRACE_IDS.set(ids)  # this task's log lines carry them, sampled or not
            span = self.span = tracer.attempt(traceparent, ids)
            if span is not None:
                span.set("llmux.attempts", int(self.headers.get("x-envoy-attempt-count") or 1))
        answer = self.gateway.on_headers(method, path, keys)
        if isinstance(answer, Pending):  # a key not cached yet: one database query
            answer = await answer.answer
        if isinstance(answer, Immediate):
            if self.span is not None:
                self._span_ends(answer.log, answer.status)
            return immediate(answer)
        if self.span is not None:
            self.span.event("authenticated")
        self.ctx = self._context(answer, host_deployment(msg))
        if headers.end_of_stream:
            # No body will follow (an empty POST): the body phase would never run.
            decision = await self.gateway.on_body(path, b"", self.ctx, method)
            if isinstance(decision, Immediate):
                if self.span is not None:
                    self._span_ends(decision.log, decision.status)
                return immediate(decision)
        return _HEADERS_CONTINUE

    def _span_forwards(self, exchange: Exchange) -> None:
        span = self.span
        assert span is not None
        dep = exchange.dep
        # What an attempt Envoy ends before its answer still reports; the answer's marks
        # (the same and more) are recorded when it comes.
        span.record({"model": dep.model_name, "deployment": dep.id, "provider": dep.provider})
        # What the client asked for (a fallback's deployment serves another group).
        span.set("gen_ai.request.model", exchange.req.model)
        span.event("translated")
        tracer = self.gateway.tracer
        if tracer is not None and tracer.settings.capture_message_content:
            span.set("gen_ai.input.messages", _json_text(exchange.req.body.get("messages")))

    def _span_ends(
        self,
        marks: Mapping[str, Any],
        status: int,
        body: bytes | None = None,
        *,
        genai: bool = True,
    ) -> None:
        span = self.span
        if span is None:
            return
        span.record(marks)
        tracer = self.gateway.tracer
        if body is not None and tracer is not None and tracer.settings.capture_message_content:
            span.set("gen_ai.output.messages", _output_messages(body))
        span.end(status, marks.get("error"), genai=genai)

    def _context(self, caller: Caller, host: tuple[int, str] | None) -> RequestContext:
        number = int(self.headers.get("x-envoy-attempt-count") or 1)
        request_id = self.headers.get("x-request-id", "")
        if host is None:
            return RequestContext(caller, Attempt(number, None), request_id)
        priority, dep_id = host
        attempt = Attempt(number, self.gateway.deployment(dep_id), priority)
        return RequestContext(caller, attempt, request_id)

    def _response_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        for h in msg.headers.headers:
            if h.key == ":status":  # a pseudo-header: first, so the loop stops at once
                self.status = int(h.raw_value or h.value)
                break
        if self.exchange is None:
            return _RESPONSE_HEADERS_CONTINUE
        handling = self.gateway.on_response_headers(self.exchange, self.status)
        if handling is None:
            response = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
            response.mode_override.CopyFrom(_BUFFERED_RESPONSE)
            return response
        if isinstance(handling, PassThrough):
            headers = attempt_headers(self.exchange)
            headers[MARKS_HEADER] = encode_marks(handling.log)
            # The rest of the answer is Envoy's; its span has the usage and finish reasons.
            if self.span is not None:
                self._span_ends(handling.log, self.status, genai=False)
            self.exchange = None
            # The body is Envoy's alone; a held bulkhead place waits for the stream's end.
            self.last_reply = self.held is None
            response = pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(
                    response=pb.CommonResponse(header_mutation=_mutation(headers))
                ),
            )
            response.mode_override.CopyFrom(_PASSTHROUGH_RESPONSE)
            return response
        self.session = handling
        # A streamed answer: chunks go through the session as they come, so the length is
        # unknown and the type is OpenAI's SSE whatever the provider sent. Its tokens are
        # accounted here at the end; the log line gets what is known now.
        dep = self.exchange.dep
        marks: dict[str, Any] = {
            "model": dep.model_name,
            "deployment": dep.id,
            "provider": dep.provider,
        }
        if self.span is not None:
            # Envoy's span of the request: the request's attributes (its tokens are counted
            # at the end of the stream, here, and recorded on the worker's span).
            marks.update(trace_marks(self.exchange))
            self.span.event("stream started")
        headers = {
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            **attempt_headers(self.exchange),
            MARKS_HEADER: encode_marks(marks),
        }
        response = pb.ProcessingResponse(
            response_headers=pb.HeadersResponse(
                response=pb.CommonResponse(header_mutation=_mutation(headers, ["content-length"]))
            )
        )
        response.mode_override.CopyFrom(_STREAMED_RESPONSE)
        return response

    def _stream_chunk(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        session = self.session
        assert session is not None
        out = session.feed(msg.body, msg.end_of_stream)
        common = None
        if out != msg.body:
            common = pb.CommonResponse(body_mutation=pb.BodyMutation(body=out))
        response = pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))
        if msg.end_of_stream:
            self.last_reply = True
            action = session.close(completed=True)  # accounted here; the log has the marks
            if self.span is not None:
                self._span_ends(action.log, 200)
        return response

    def _response_body(self, body: bytes) -> pb.ProcessingResponse:
        self.last_reply = True  # buffered: the whole body in one message
        if self.exchange is None:
            return pb.ProcessingResponse(response_body=pb.BodyResponse())
        action = self.gateway.handle_response(self.exchange, self.status, body)
        self.exchange = None
        if self.span is not None:
            self._span_ends(action.log, action.status, action.body)
        out_headers = _answer_headers(action)
        body_mutation = None
        if action.body is not None:
            body_mutation = pb.BodyMutation(body=action.body)
            out_headers["content-length"] = str(len(action.body))
            out_headers["content-type"] = "application/json"
        if action.status != self.status:
            out_headers[":status"] = str(action.status)
        return pb.ProcessingResponse(
            response_body=pb.BodyResponse(
                response=pb.CommonResponse(
                    header_mutation=_mutation(out_headers),
                    body_mutation=body_mutation,
                )
            ),
        )

    def abandon(self) -> None:
        if self.session is not None and not self.session.closed:
            action = self.session.close(completed=False)
            if self.span is not None:
                self._span_ends(action.log, 499)
        span = self.span
        if span is not None and not span.ended:
            # Envoy ended the attempt before its answer: a connect failure, a reset, a
            # timeout, or the client gone; Envoy's attempt span has the reason.
            span.set("llmux.ended_by_envoy", True)
            span.end()
        if self.held is not None:
            self.gateway.release(self.held)
            self.held = None


def _answer_headers(action: ResponseAction) -> dict[str, str]:
    headers = dict(action.headers)
    headers[MARKS_HEADER] = encode_marks(action.log)
    if action.retry:
        headers[RETRY_HEADER] = "1"  # Envoy's retry policy retries on it (envoy_routing)
    return headers


def _continue(kind: str | None) -> pb.ProcessingResponse:
    if kind in ("request_headers", "response_headers"):
        return pb.ProcessingResponse(**{kind: pb.HeadersResponse()})
    if kind in ("request_trailers", "response_trailers"):
        return pb.ProcessingResponse(**{kind: pb.TrailersResponse()})
    if kind in ("request_body", "response_body"):
        return pb.ProcessingResponse(**{kind: pb.BodyResponse()})
    return pb.ProcessingResponse()


def _json_text(value: object) -> str:
    return orjson.dumps(value).decode()


def _output_messages(body: bytes) -> str:
    """The answer's messages (gen_ai.output.messages), captured only when configured."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list):
        return ""
    return _json_text([c.get("message") for c in choices if isinstance(c, dict)])


def _internal_error() -> Immediate:
    err = GatewayError(500, "Internal gateway error; see the gateway logs.")
    return Immediate(err.status, err.body(), log={"error": err.type})
