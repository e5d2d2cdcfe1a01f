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

from llmux_extproc.envoy_config import METADATA_NAMESPACE, ROUTE_HEADER
from llmux_extproc.errors import GatewayError
from llmux_extproc.gateway import Exchange, Forward, Gateway, Immediate

log = logging.getLogger("llmux.extproc")

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# Streamed responses are passed through untouched until streaming translation lands.
_PASSTHROUGH_RESPONSE = ProcessingMode(
    response_header_mode=ProcessingMode.SKIP,
    response_body_mode=ProcessingMode.NONE,
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
    struct = Struct()
    struct.update({METADATA_NAMESPACE: fields})
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
    if fwd.exchange.req.stream:
        response.mode_override.CopyFrom(_PASSTHROUGH_RESPONSE)
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
        exchange: Exchange | None = None
        headers: dict[str, str] = {}  # request headers, then the response's :status
        self.open_streams += 1
        try:
            async for msg in request_iterator:
                try:
                    reply, exchange = await self._handle(msg, exchange, headers)
                except Exception:
                    log.exception("processing failed")
                    reply = immediate(_internal_error())
                yield reply
        finally:
            self.open_streams -= 1

    async def _handle(
        self, msg: pb.ProcessingRequest, exchange: Exchange | None, headers: dict[str, str]
    ) -> tuple[pb.ProcessingResponse, Exchange | None]:
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            headers.update(_header_map(msg.request_headers.headers.headers))
            path = headers.get(":path", "")
            answer = self.gateway.on_headers(headers.get(":method", ""), path, headers)
            if answer is None and msg.request_headers.end_of_stream:
                # No body will follow (an empty POST): the body phase would never run.
                decision = await self.gateway.on_body(path, b"")
                if isinstance(decision, Immediate):
                    return immediate(decision), None
            elif answer is not None:
                return immediate(answer), None
            return _HEADERS_CONTINUE, exchange
        if kind == "request_body":
            decision = await self.gateway.on_body(headers.get(":path", ""), msg.request_body.body)
            if isinstance(decision, Immediate):
                return immediate(decision), None
            return forward(decision), decision.exchange
        if kind == "response_headers":
            for h in msg.response_headers.headers.headers:
                if h.key == ":status":
                    headers[":status"] = h.raw_value.decode() if h.raw_value else h.value
            return _RESPONSE_HEADERS_CONTINUE, exchange
        if kind == "response_body":
            if exchange is None:
                return pb.ProcessingResponse(response_body=pb.BodyResponse()), None
            status = int(headers.get(":status", "200"))
            action = self.gateway.handle_response(exchange, status, msg.response_body.body)
            out_headers = dict(action.headers)
            body_mutation = None
            if action.body is not None:
                body_mutation = pb.BodyMutation(body=action.body)
                out_headers["content-length"] = str(len(action.body))
                out_headers["content-type"] = "application/json"
            if action.status != status:
                out_headers[":status"] = str(action.status)
            return (
                pb.ProcessingResponse(
                    response_body=pb.BodyResponse(
                        response=pb.CommonResponse(
                            header_mutation=pb.HeaderMutation(
                                set_headers=_set_headers(out_headers)
                            ),
                            body_mutation=body_mutation,
                        )
                    ),
                    dynamic_metadata=_metadata(action.log),
                ),
                None,
            )
        # Phases this configuration does not send; answer so Envoy never waits.
        return _continue(kind), exchange


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
