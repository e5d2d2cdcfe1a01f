"""A real OTLP trace receiver in the test process: OpenTelemetry's own proto stubs, served
over gRPC (TraceService/Export) and over HTTP (POST /v1/traces, protobuf bodies), keeping
every span it is sent with its resource's service name."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.harness import MockUpstream, free_port


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind is None:
        return None
    return getattr(v, kind)


@dataclass(frozen=True)
class Received:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: tuple[str, ...]
    status_code: int

    @classmethod
    def of(cls, service: str, span: Span) -> Received:
        return cls(
            service,
            span.name,
            span.kind,
            span.trace_id.hex(),
            span.span_id.hex(),
            span.parent_span_id.hex(),
            {a.key: value(a.value) for a in span.attributes},
            tuple(e.name for e in span.events),
            span.status.code,
        )


@dataclass
class Collector:
    spans: list[Received] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        got = []
        for rs in request.resource_spans:
            service = next(
                (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"),
                "",
            )
            for ss in rs.scope_spans:
                got += [Received.of(service, s) for s in ss.spans]
        with self.lock:
            self.spans += got

    def of_trace(self, trace_id: str) -> list[Received]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait(
        self, ready: Callable[[list[Received]], bool], trace_id: str, timeout: float = 20
    ) -> list[Received]:
        """The spans of `trace_id` once `ready` holds for them (Envoy flushes its spans
        every 5 s, the workers' batch processor every 5 s: generous bounds)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.of_trace(trace_id)
            if ready(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans of {trace_id} not complete in {timeout}s: {spans}")
            time.sleep(0.1)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.collector.lock:
            self.collector.headers.append({k: v for k, v in context.invocation_metadata()})
        self.collector.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@dataclass
class GrpcReceiver:
    collector: Collector = field(default_factory=Collector)
    port: int = field(default_factory=free_port)
    server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GrpcReceiver:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
            _TraceService(self.collector), self.server
        )
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=1)


def http_receiver(collector: Collector) -> MockUpstream:
    """OTLP/HTTP: protobuf ExportTraceServiceRequest bodies POSTed to /v1/traces."""

    async def handle(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.method != "POST" or request.path != "/v1/traces":
            return web.Response(status=404)
        if request.headers.get("content-type") != "application/x-protobuf":
            return web.Response(status=415, text=request.headers.get("content-type", ""))
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(body)
        with collector.lock:
            collector.headers.append({k.lower(): v for k, v in request.headers.items()})
        collector.add(message)
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    return MockUpstream(handle)
