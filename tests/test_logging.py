"""LLMux's log lines: JSON, with trace ids where known, a level per component; and one
format on the gateway's output, Envoy's lines and the access log included."""

from __future__ import annotations

import io
import logging
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from llmux_extproc.control.config import ConfigError, parse_config
from llmux_extproc.observability import logs
from tests.harness import MockUpstream, json_response, openai_chat_completion, running_gateway


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The llmux loggers writing JSON into a buffer; levels put back afterwards."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger("llmux")
    root.addHandler(handler)
    yield buffer
    root.removeHandler(handler)
    logs.apply_levels(())


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in buffer.getvalue().splitlines()]


def test_a_line_is_one_json_object_with_time_level_logger_pid(captured: io.StringIO) -> None:
    logging.getLogger("llmux.worker").warning('said "%s"\nand more', "quoted")
    (line,) = lines(captured)
    assert line["level"] == "warning"
    assert line["logger"] == "llmux.worker"
    assert line["message"] == 'said "quoted"\nand more'
    assert isinstance(line["pid"], int)
    assert line["time"].endswith("Z") and "T" in line["time"]
    assert "trace_id" not in line  # no request being handled


def test_lines_written_while_an_attempt_is_handled_carry_its_trace_ids(
    captured: io.StringIO,
) -> None:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    token = logs.TRACE_IDS.set((trace_id, span_id))
    try:
        logging.getLogger("llmux.extproc").error("processing failed")
    finally:
        logs.TRACE_IDS.reset(token)
    logging.getLogger("llmux.extproc").error("after the request")
    first, second = lines(captured)
    assert (first["trace_id"], first["span_id"]) == (trace_id, span_id)
    assert "trace_id" not in second


def test_exceptions_are_kept_in_the_line(captured: io.StringIO) -> None:
    try:
        raise ValueError("broken")
    except ValueError:
        logging.getLogger("llmux.extproc").exception("processing failed")
    (line,) = lines(captured)
    assert "ValueError: broken" in line["exception"]
    assert line["message"] == "processing failed"


def test_levels_per_component(captured: io.StringIO) -> None:
    levels = logs.parse_log_levels({"extproc": "debug", "default": "warning", "envoy": "info"})
    assert levels[0] == ("default", "warning")  # applied first, components override it
    logs.apply_levels(levels)
    logging.getLogger("llmux.extproc").debug("shown")
    logging.getLogger("llmux.worker").info("hidden")
    logging.getLogger("llmux.supervisor").warning("shown too")
    assert [line["message"] for line in lines(captured)] == ["shown", "shown too"]
    assert logs.envoy_log_level(levels) == "info"
    assert logs.envoy_log_level(()) == "warning"


def test_a_single_level_is_the_default() -> None:
    assert logs.parse_log_levels("DEBUG") == (("default", "debug"),)
    assert logs.parse_log_levels({"worker": "warn"}) == (("worker", "warning"),)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ({"workers": "info"}, "llmux.log_level.workers: unknown component"),
        ({"extproc": "loud"}, "llmux.log_level.extproc: must be one of"),
        ({"default": "trace"}, "llmux.log_level.default: must be one of"),
        (["info"], "llmux.log_level: a level"),
    ],
)
def test_bad_levels_are_config_errors_naming_the_field(value: Any, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_config(orjson.dumps({"llmux": {"log_level": value}}).decode())


def test_log_level_in_the_config() -> None:
    config = parse_config("llmux:\n  log_level: {envoy: trace, keys: debug}\n")
    assert config.settings.log_levels == (("envoy", "trace"), ("keys", "debug"))


def test_traceparent_parsing() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert logs.trace_ids_from_traceparent(tp) == (
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
    )
    assert logs.trace_ids_from_traceparent("garbage") is None
    assert logs.trace_ids_from_traceparent(None) is None
    assert logs.trace_ids_from_traceparent("00-" + "0" * 32 + "-b7ad6b7169203331-01") is None


def test_setup_logging_makes_every_logger_json() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    try:
        sys_stderr, sys.stderr = sys.stderr, out
        try:
            logs.setup_logging()
            logging.getLogger("grpc._server").warning("from a library")
        finally:
            sys.stderr = sys_stderr
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    line = orjson.loads(out.getvalue())
    assert (line["logger"], line["message"]) == ("grpc._server", "from a library")


# -- a running gateway: one format on its output --------------------------------------


@pytest.mark.e2e
def test_gateway_output_is_json_lines_only_with_trace_ids_in_the_access_log(
    tmp_path: Path,
) -> None:
    async def answer(request: Any, body: bytes) -> Any:
        return json_response(openai_chat_completion("gpt-4o", "hi"))

    upstream = MockUpstream(answer).start()
    config = {
        "model_list": [
            {
                "model_name": "gpt-test",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": f"{upstream.base_url}/v1",
                    "api_key": "sk-upstream",
                },
            }
        ],
        "llmux": {
            # Envoy at info writes a few dozen lines at start: its format is checked too.
            "log_level": {"default": "info", "worker": "warning", "envoy": "info"},
            # Tracing on, towards a collector that is not there: requests do not suffer.
            "tracing": {"enabled": True, "endpoint": "http://127.0.0.1:9"},
        },
    }
    trace_id = secrets.token_hex(16)
    try:
        with running_gateway(config, tmp_path) as gw:
            client = openai.OpenAI(base_url=gw.openai_base, api_key="x", max_retries=0)
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-test",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
            )
            request_id = raw.headers["x-request-id"]
            deadline = time.monotonic() + 15
            while request_id not in gw.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            text = gw.log()
    finally:
        upstream.stop()
    parsed = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    assert len(parsed) == len([line for line in text.splitlines() if line.strip()])
    envoy = [p for p in parsed if str(p.get("logger", "")).startswith("envoy.")]
    ours = [p for p in parsed if str(p.get("logger", "")).startswith("llmux.")]
    assert envoy and ours
    assert all(p["level"] in ("info", "warning", "error", "debug") for p in envoy + ours)
    # worker: warning hides the workers' info lines; the supervisor's are still there.
    assert not [p for p in ours if p["logger"] == "llmux.worker" and p["level"] == "info"]
    assert any(p["message"].startswith("LLMux ready") for p in ours)
    access = next(p for p in parsed if p.get("request_id") == request_id)
    assert access["trace_id"] == trace_id
    assert isinstance(access["span_id"], str) and len(access["span_id"]) == 16


async def test_the_processor_sets_the_attempts_trace_ids_for_its_log_lines(
    captured: io.StringIO,
) -> None:
    """What the processor logs while it handles an attempt names that attempt's trace."""
    import asyncio

    from bench.tracing_cost import messages
    from llmux_extproc.dataplane import extproc
    from llmux_extproc.dataplane.gateway import Gateway
    from llmux_extproc.observability.tracing import WorkerTracer

    config = parse_config(
        "model_list:\n  - model_name: gpt-test\n    litellm_params: {model: openai/gpt-4o,"
        " api_base: 'http://127.0.0.1:9/v1', api_key: sk-x}\n    model_info: {id: dep1}\n"
        "llmux:\n  tracing: {enabled: true, endpoint: 'http://127.0.0.1:9', export_timeout: 0.5}\n"
    )
    gateway = Gateway(config)
    gateway.tracer = WorkerTracer(config.settings.tracing)
    on_headers = gateway.on_headers

    def logging_on_headers(*args: Any) -> Any:
        logging.getLogger("llmux.extproc").warning("authenticating")
        return on_headers(*args)

    gateway.on_headers = logging_on_headers  # type: ignore[method-assign,assignment]

    async def attempt() -> None:
        stream = extproc._HttpStream(gateway)
        for message in messages(trace=True):
            await stream.handle(message)
        stream.abandon()

    try:
        await asyncio.create_task(attempt())  # its own task, as each gRPC stream is
        logging.getLogger("llmux.extproc").warning("outside any attempt")
    finally:
        gateway.tracer.shutdown()
    inside, outside = lines(captured)
    # bench.tracing_cost's traceparent: trace 0af7..., Envoy's attempt span b7ad...
    assert inside["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert inside["span_id"] == "b7ad6b7169203331"
    assert "trace_id" not in outside
