"""Accounting from Envoy's access log entries, without Envoy: entries built as Envoy sends
them, read by the servicer, and a stream cut short counted with tiktoken."""

from __future__ import annotations

from typing import Any

import orjson
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf.struct_pb2 import Struct

from llmux_extproc.accounting import tokens
from llmux_extproc.control.envoy_config import METADATA_NAMESPACE, STREAM_NAMESPACE, USAGE_NAMESPACE
from llmux_extproc.dataplane.accesslog import StreamAccounting
from llmux_extproc.dataplane.gateway import CutShort, count_cut_short

MESSAGES: list[dict[str, object]] = [
    {"role": "user", "content": "Count the words in this sentence."}
]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def account_passthrough(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)


def entry(namespaces: dict[str, dict[str, Any]], downstream_gone: bool = False) -> Any:
    log = accesslog_pb2.HTTPAccessLogEntry()
    for name, fields in namespaces.items():
        struct = Struct()
        struct.update(fields)
        log.common_properties.metadata.filter_metadata[name].CopyFrom(struct)
    log.common_properties.response_flags.downstream_connection_termination = downstream_gone
    log.common_properties.duration.FromMilliseconds(1500)
    log.response.response_code.value = 200
    return log


MARKS = {"deployment": "d1", "stream": True, "envoy_accounts": True}


def test_stream_with_usage_is_accounted_from_it() -> None:
    recorder = Recorder()
    usage = {"prompt_tokens": 9, "completion_tokens": 4}
    StreamAccounting(recorder)._account(  # type: ignore[arg-type]
        entry({METADATA_NAMESPACE: MARKS, USAGE_NAMESPACE: {"usage": usage}})
    )
    (call,) = recorder.calls
    assert call["usage"] == usage
    assert call["cut_short"] is None
    assert call["completed"] is True
    assert call["duration_s"] == 1.5


def test_cut_short_text_is_joined_in_chunk_order() -> None:
    recorder = Recorder()
    # Eleven chunks: "t10" and "t11" must follow "t9", whatever the map order.
    pieces = {f"t{i}": f"w{i} " for i in range(1, 12)}
    request = orjson.dumps({"model": "gpt", "messages": MESSAGES}).decode()
    StreamAccounting(recorder)._account(  # type: ignore[arg-type]
        entry(
            {METADATA_NAMESPACE: MARKS, STREAM_NAMESPACE: {"prompt": request, **pieces}},
            downstream_gone=True,
        )
    )
    (call,) = recorder.calls
    assert call["usage"] is None
    assert call["completed"] is False
    assert call["cut_short"] == CutShort(request, "".join(f"w{i} " for i in range(1, 12)))


def test_cut_short_is_counted_with_tiktoken() -> None:
    request = orjson.dumps({"model": "gpt", "messages": MESSAGES}).decode()
    # As response.lua keeps it: the JSON string contents, escapes and all.
    escaped = 'Zwei W\\u00f6rter: \\"hallo\\"\\nund {\\"city\\": \\"Paris\\"}'
    usage = count_cut_short(CutShort(request, escaped), "gpt-4o")
    assert usage.estimated
    assert usage.prompt_tokens == tokens.count_messages(MESSAGES, "gpt-4o")
    text = 'Zwei Wörter: "hallo"\nund {"city": "Paris"}'
    assert usage.completion_tokens == tokens.count_text(text, "gpt-4o")


def test_cut_short_without_request_or_with_a_broken_escape_still_counts() -> None:
    usage = count_cut_short(CutShort("", "half an escape \\"), "gpt-4o")
    assert usage.prompt_tokens == 0
    assert usage.completion_tokens == tokens.count_text("half an escape \\", "gpt-4o")
    assert usage.estimated
