"""The ext_proc protocol: Envoy's ProcessingRequest messages in, ProcessingResponses out.

This is the only module that knows the gRPC message shapes; decisions come from
`gateway.Gateway`. One gRPC stream is one HTTP request. With the processing mode Envoy is
configured with (see envoy_config), a proxied request costs four messages: the request
headers (authentication; Envoy holds them until the body is done), the buffered request
body (routing and translation), the response headers (status) and the buffered response
body (usage, cost, translation; header changes still apply as Envoy holds the headers).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorServicer
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct

from llmux_extproc import metrics
from llmux_extproc.envoy_config import (
    METADATA_NAMESPACE,
    ROUTE_HEADER,
    STREAM_HEADER,
    STREAM_NAMESPACE,
)
from llmux_extproc.errors import GatewayError
from llmux_extproc.gateway import (
    Exchange,
    Forward,
    Gateway,
    Immediate,
    PassThrough,
    StreamSession,
)

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


_HEADERS_CONTINUE = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_RESPONSE_HEADERS_CONTINUE = pb.ProcessingResponse(response_headers=pb.HeadersResponse())


def _set_headers(headers: Mapping[str, str]) -> list[HeaderValueOption]:
    return [
        HeaderValueOption(header=HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE)
        for k, v in headers.items()
    ]


def _metadata(fields: Mapping[str, Any]) -> Struct:
    # Setting the values directly is ~3x faster than Struct.update's generic conversion, and
    # this runs on most requests; the values are flat strings, numbers and booleans.
    struct = Struct()
    inner = struct.fields[METADATA_NAMESPACE].struct_value.fields
    for key, value in fields.items():
        if isinstance(value, bool):
            inner[key].bool_value = value
        elif isinstance(value, str):
            inner[key].string_value = value
        elif isinstance(value, int | float):
            inner[key].number_value = value
    return struct


def immediate(answer: Immediate) -> pb.ProcessingResponse:
    headers = {
        "content-type": answer.headers.get("content-type", "application/json"),
        **answer.headers,
    }
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=HttpStatus(code=answer.status),  # type: ignore[arg-type]
            headers=pb.HeaderMutation(set_headers=_set_headers(headers)),
            body=answer.body,
            details="llmux",
        ),
        # Marks the reply as ours so Envoy's local_reply_config leaves it alone.
        dynamic_metadata=_metadata({**answer.log, "own_reply": True}),
    )


def forward(fwd: Forward) -> pb.ProcessingResponse:
    up = fwd.upstream
    headers = {
        ROUTE_HEADER: fwd.cluster,
        ":path": up.path,
        ":authority": fwd.authority,
        **up.headers,
    }
    if fwd.exchange.req.stream:
        headers[STREAM_HEADER] = "1"
    if fwd.timeout_ms:
        # Read by Envoy's router; clients cannot set it (Envoy strips it from edge requests).
        headers["x-envoy-upstream-rq-timeout-ms"] = str(fwd.timeout_ms)
    body_mutation = None
    if up.body is not None:
        headers["content-length"] = str(len(up.body))
        body_mutation = pb.BodyMutation(body=up.body)
    remove = [h for h in fwd.remove_headers if h not in headers]
    response = pb.ProcessingResponse(
        request_body=pb.BodyResponse(
            response=pb.CommonResponse(
                header_mutation=pb.HeaderMutation(
                    set_headers=_set_headers(headers), remove_headers=remove
                ),
                body_mutation=body_mutation,
                clear_route_cache=True,
            )
        )
    )
    return response


def _header_map(headers: Iterable[HeaderValue]) -> dict[str, str]:
    return {
        h.key: h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value for h in headers
    }


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

    __slots__ = ("exchange", "gateway", "headers", "last_reply", "session", "status")

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        # Set when the reply being made is the last message Envoy will ask for.
        self.last_reply = False
        self.headers: dict[str, str] = {}
        self.exchange: Exchange | None = None
        self.status = 200
        self.session: StreamSession | None = None

    async def handle(self, msg: pb.ProcessingRequest) -> pb.ProcessingResponse:
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            return await self._request_headers(msg.request_headers)
        if kind == "request_body":
            decision = await self.gateway.on_body(
                self.headers.get(":path", ""), msg.request_body.body
            )
            if isinstance(decision, Immediate):
                return immediate(decision)
            self.exchange = decision.exchange
            return forward(decision)
        if kind == "response_headers":
            return self._response_headers(msg.response_headers)
        if kind == "response_body":
            if self.session is not None:
                return self._stream_chunk(msg.response_body)
            return self._response_body(msg.response_body.body)
        # Phases this configuration does not send; answer so Envoy never waits.
        return _continue(kind)

    async def _request_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        self.headers.update(_header_map(msg.headers.headers))
        path = self.headers.get(":path", "")
        answer = self.gateway.on_headers(self.headers.get(":method", ""), path, self.headers)
        if answer is None and msg.end_of_stream:
            # No body will follow (an empty POST): the body phase would never run.
            decision = await self.gateway.on_body(path, b"")
            if isinstance(decision, Immediate):
                return immediate(decision)
        elif answer is not None:
            return immediate(answer)
        return _HEADERS_CONTINUE

    def _response_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        for h in msg.headers.headers:
            if h.key == ":status":
                self.status = int(h.raw_value or h.value)
        if self.exchange is None:
            return _RESPONSE_HEADERS_CONTINUE
        handling = self.gateway.on_response_headers(self.exchange, self.status)
        if handling is None:
            return _RESPONSE_HEADERS_CONTINUE
        if isinstance(handling, PassThrough):
            model_id = {"x-litellm-model-id": self.exchange.dep.id}
            self.exchange = None
            self.last_reply = True  # the body is Envoy's alone
            metadata = _metadata(handling.log)
            if handling.prompt is not None:
                kept = metadata.fields[STREAM_NAMESPACE].struct_value.fields
                kept["prompt"].string_value = handling.prompt
            response = pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(
                    response=pb.CommonResponse(
                        header_mutation=pb.HeaderMutation(set_headers=_set_headers(model_id))
                    )
                ),
                dynamic_metadata=metadata,
            )
            response.mode_override.CopyFrom(_PASSTHROUGH_RESPONSE)
            return response
        self.session = handling
        # A streamed answer: chunks go through the session as they come, so the length is
        # unknown and the type is OpenAI's SSE whatever the provider sent.
        response = pb.ProcessingResponse(
            response_headers=pb.HeadersResponse(
                response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(
                        set_headers=_set_headers(
                            {"content-type": "text/event-stream", "cache-control": "no-cache"}
                        ),
                        remove_headers=["content-length"],
                    )
                )
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
            action = session.close(completed=True)
            response.dynamic_metadata.CopyFrom(_metadata(action.log))
        return response

    def _response_body(self, body: bytes) -> pb.ProcessingResponse:
        self.last_reply = True  # buffered: the whole body in one message
        if self.exchange is None:
            return pb.ProcessingResponse(response_body=pb.BodyResponse())
        action = self.gateway.handle_response(self.exchange, self.status, body)
        self.exchange = None
        out_headers = dict(action.headers)
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
                    header_mutation=pb.HeaderMutation(set_headers=_set_headers(out_headers)),
                    body_mutation=body_mutation,
                )
            ),
            dynamic_metadata=_metadata(action.log),
        )

    def abandon(self) -> None:
        if self.session is not None and not self.session.closed:
            self.session.close(completed=False)


def _continue(kind: str | None) -> pb.ProcessingResponse:
    if kind in ("request_headers", "response_headers"):
        return pb.ProcessingResponse(**{kind: pb.HeadersResponse()})
    if kind in ("request_trailers", "response_trailers"):
        return pb.ProcessingResponse(**{kind: pb.TrailersResponse()})
    if kind in ("request_body", "response_body"):
        return pb.ProcessingResponse(**{kind: pb.BodyResponse()})
    return pb.ProcessingResponse()


def _internal_error() -> Immediate:
    err = GatewayError(500, "Internal gateway error; see the gateway logs.")
    return Immediate(err.status, err.body(), log={"error": err.type})
