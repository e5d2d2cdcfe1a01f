"""Envoy's gRPC access log service: accounting for answers Envoy passed on by itself.

Envoy sends the log entries of such answers (marked by the processor; usage read by Envoy's
sse_to_metadata filter for streams and by response.lua for whole bodies) in batches on a
long-lived stream, so accounting them costs a fraction of a gRPC message per request
instead of a message per body or chunk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.accesslog.v3.als_pb2_grpc import AccessLogServiceServicer

from llmux_extproc.control.envoy_config import METADATA_NAMESPACE, STREAM_NAMESPACE, USAGE_NAMESPACE
from llmux_extproc.dataplane.context import DEFAULT_CALLER, MASTER_CALLER, Caller
from llmux_extproc.dataplane.gateway import CutShort, Gateway
from llmux_extproc.policy.keys import Principal

log = logging.getLogger("llmux.accesslog")


def _plain(struct: Any) -> dict[str, object]:
    """A Struct of numbers and nested Structs (usage) as a dict; much cheaper than
    json_format.MessageToDict, which showed up in profiles on this path."""
    out: dict[str, object] = {}
    for key, value in struct.fields.items():
        kind = value.WhichOneof("kind")
        out[key] = _plain(value.struct_value) if kind == "struct_value" else getattr(value, kind)
    return out


class StreamAccounting(AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                metadata = entry.common_properties.metadata.filter_metadata
                marks = metadata.get(METADATA_NAMESPACE)
                if marks is None or "envoy_accounts" not in marks.fields:
                    # Ended by Envoy (or by the processor failing): its reservation, if
                    # any, is released; a processor that answered has settled it first.
                    self.gateway.release_later(entry.request.request_id)
                    continue
                try:
                    if STREAM_NAMESPACE in metadata and not _has_usage(metadata):
                        # Counted with tiktoken: off the event loop (tiktoken frees the GIL).
                        await asyncio.to_thread(self._account, entry)
                    else:
                        self._account(entry)
                except Exception:
                    log.exception("could not account a stream from its access log entry")
        return als_pb2.StreamAccessLogsResponse()

    def _account(self, entry: Any) -> None:
        common = entry.common_properties
        metadata = common.metadata.filter_metadata
        marks = metadata[METADATA_NAMESPACE].fields
        usage = None
        if _has_usage(metadata):
            value = metadata[USAGE_NAMESPACE].fields["usage"]
            kind = value.WhichOneof("kind")
            if kind == "struct_value":
                usage = _plain(value.struct_value)
            elif kind == "string_value":  # how sse_to_metadata stores a JSON object
                parsed = orjson.loads(value.string_value)
                usage = parsed if isinstance(parsed, dict) else None
        ttft = (
            common.time_to_first_downstream_tx_byte.ToTimedelta().total_seconds()
            if common.HasField("time_to_first_downstream_tx_byte")
            else None
        )
        self.gateway.account_passthrough(
            deployment_id=marks["deployment"].string_value,
            stream=marks["stream"].bool_value,
            usage=usage,
            cut_short=_cut_short(metadata) if usage is None else None,
            status=entry.response.response_code.value or 0,
            completed=not common.response_flags.downstream_connection_termination,
            ttft_s=ttft,
            duration_s=common.duration.ToTimedelta().total_seconds(),
            caller=_caller(marks),
            request_id=entry.request.request_id,
            # Only requests a limit or budget admitted carry it (gateway._passthrough_marks).
            settle_id=marks["rid"].string_value if "rid" in marks else None,
        )


def _caller(marks: Any) -> Caller:
    """Who made the request, from the marks the processor left (gateway._passthrough_marks)."""
    if "key" in marks:

        def text(name: str) -> str | None:
            return marks[name].string_value if name in marks else None

        return Caller.of(
            Principal(
                token=marks["key"].string_value,
                key_alias=text("alias"),
                key_name=text("key_name"),
                user_id=text("user"),
                team_id=text("team"),
                team_alias=text("team_alias"),
            )
        )
    return MASTER_CALLER if "admin" in marks else DEFAULT_CALLER


def _has_usage(metadata: Any) -> bool:
    return USAGE_NAMESPACE in metadata and "usage" in metadata[USAGE_NAMESPACE].fields


def _cut_short(metadata: Any) -> CutShort | None:
    if STREAM_NAMESPACE not in metadata:
        return None
    kept = metadata[STREAM_NAMESPACE].fields
    text = []
    n = 1
    while (key := f"t{n}") in kept:  # response.lua numbers the chunks' text from 1
        text.append(kept[key].string_value)
        n += 1
    return CutShort(kept["prompt"].string_value if "prompt" in kept else "", "".join(text))
