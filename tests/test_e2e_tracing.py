"""Traces end to end: `llmux run` exporting to a real OTLP receiver in this process.

Envoy's tracer makes the request's span (kind SERVER) and one per upstream attempt (kind
CLIENT); the worker's span of each attempt (kind INTERNAL) is a child of Envoy's attempt
span. A client's traceparent puts all of them in the client's trace.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.harness import (
    Gateway,
    MockUpstream,
    free_port,
    json_response,
    openai_chat_completion,
    running_gateway,
)
from tests.mock_anthropic import AnthropicMock
from tests.otlp_receiver import Collector, GrpcReceiver, Received, http_receiver

pytestmark = pytest.mark.e2e

SERVER, CLIENT, INTERNAL = 2, 3, 1
UPSTREAM_MODEL = "gpt-4o-2024-08-06"


async def openai_upstream(request: web.Request, body: bytes) -> web.StreamResponse:
    req = orjson.loads(body)
    if not req.get("stream"):
        return json_response(openai_chat_completion(UPSTREAM_MODEL, "traced", 11, 7))
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    base = {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1}
    chunks: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"content": "tra"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "ced"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}},
    ]
    for chunk in chunks:
        event = {**base, "model": UPSTREAM_MODEL, **chunk}
        await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def gateway_config(openai_base: str, anthropic_base: str) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": "gpt-test",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": f"{openai_base}/v1",
                    "api_key": "sk-upstream",
                },
            },
            {
                "model_name": "claude",
                "litellm_params": {
                    "model": "anthropic/claude-3-5-sonnet-20241022",
                    "api_base": anthropic_base,
                    "api_key": "sk-ant-test",
                },
            },
        ],
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[GrpcReceiver]:
    r = GrpcReceiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[MockUpstream, MockUpstream]]:
    oai = MockUpstream(openai_upstream).start()
    ant = MockUpstream(AnthropicMock()).start()
    yield oai, ant
    oai.stop()
    ant.stop()


@pytest.fixture(scope="module")
def gateway(
    receiver: GrpcReceiver,
    upstreams: tuple[MockUpstream, MockUpstream],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    config = gateway_config(upstreams[0].base_url, upstreams[1].base_url)
    config["llmux"] = {
        "tracing": {
            "enabled": True,
            "endpoint": receiver.endpoint,
            "headers": {"x-collector-token": "t0ken"},
        }
    }
    with running_gateway(config, tmp_path_factory.mktemp("tracing")) as gw:
        yield gw


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.openai_base, api_key="anything", max_retries=0)


def new_traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def complete(spans: list[Received]) -> bool:
    """Envoy's request span, its attempt span and the worker's span have all arrived."""
    kinds = {s.kind for s in spans if s.name == "ingress" or s.name.startswith("router ")}
    return {SERVER, CLIENT} <= kinds and any(s.kind == INTERNAL for s in spans)


def parts(spans: list[Received]) -> tuple[Received, Received, Received]:
    request = next(s for s in spans if s.kind == SERVER)
    attempt = next(s for s in spans if s.kind == CLIENT and s.name.startswith("router "))
    worker = next(s for s in spans if s.kind == INTERNAL)
    return request, attempt, worker


def test_passed_through_answer_is_traced_by_envoy_in_the_clients_trace(
    gateway: Gateway, receiver: GrpcReceiver, upstreams: tuple[MockUpstream, MockUpstream]
) -> None:
    traceparent, trace_id, client_span = new_traceparent()
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "secret prompt text"}],
        temperature=0.25,
        max_tokens=50,
        extra_headers={"traceparent": traceparent},
    )
    assert raw.parse().choices[0].message.content == "traced"
    spans = receiver.collector.wait(complete, trace_id)
    request, attempt, worker = parts(spans)

    # The client's trace: Envoy's span is a child of the client's span.
    assert request.parent_span_id == client_span
    assert request.service == "llmux"
    a = request.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == a["gen_ai.system"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-test"
    # Read by response.lua from the answer Envoy passed on (Envoy renders tags as text).
    assert a["gen_ai.response.model"] == UPSTREAM_MODEL
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == ("11", "7")
    assert orjson.loads(a["gen_ai.response.finish_reasons"]) == ["stop"]
    assert float(a["gen_ai.request.temperature"]) == 0.25
    assert a["gen_ai.request.max_tokens"] == "50"
    assert a["llmux.team"] == "default"
    assert a["llmux.attempts"] == "1"
    assert a["llmux.deployment"] and a["llmux.provider"] == "openai"
    assert float(a["llmux.cost"]) == pytest.approx(float(raw.headers["x-llmux-response-cost"]))
    assert a["http.status_code"] == "200"

    # The attempt span is the request span's child; the provider got its context.
    assert attempt.parent_span_id == request.span_id
    sent = upstreams[0].last().headers["traceparent"]
    assert sent == f"00-{trace_id}-{attempt.span_id}-01"
    # The worker's span (authentication, translation) is the attempt's child, typed.
    assert worker.parent_span_id == attempt.span_id
    assert worker.name == "chat gpt-test"
    assert worker.attributes["llmux.deployment"] == a["llmux.deployment"]
    assert worker.attributes["gen_ai.request.model"] == "gpt-test"
    assert worker.attributes["llmux.attempts"] == 1
    assert {"authenticated", "translated"} <= set(worker.events)
    # The GenAI attributes are Envoy's span's alone: Python never saw the answer.
    assert "gen_ai.usage.input_tokens" not in worker.attributes
    # No message content unless configured.
    for span in spans:
        assert not any("secret prompt text" in str(v) for v in span.attributes.values())
        assert "gen_ai.input.messages" not in span.attributes
    # The collector's headers from the config reached it.
    assert any(h.get("x-collector-token") == "t0ken" for h in receiver.collector.headers)


def test_translated_answer_has_genai_attributes_on_both_tracers(
    gateway: Gateway, receiver: GrpcReceiver
) -> None:
    traceparent, trace_id, _ = new_traceparent()
    reply = client(gateway).chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=64,
        extra_headers={"traceparent": traceparent},
    )
    spans = receiver.collector.wait(complete, trace_id)
    request, _, worker = parts(spans)
    w = worker.attributes
    assert worker.name == "chat claude"
    assert w["gen_ai.provider.name"] == "anthropic"
    assert w["gen_ai.request.model"] == "claude"
    assert w["gen_ai.response.model"] == reply.model
    assert w["gen_ai.response.finish_reasons"] == [reply.choices[0].finish_reason]
    assert reply.usage is not None
    assert w["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    assert w["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens
    assert w["gen_ai.request.max_tokens"] == 64
    assert w["http.response.status_code"] == 200
    # Envoy's span of the request carries the same, from the processor's marks.
    a = request.attributes
    assert a["gen_ai.response.model"] == reply.model
    assert a["gen_ai.usage.input_tokens"] == str(reply.usage.prompt_tokens)
    assert a["gen_ai.request.model"] == "claude"


def test_stream_is_traced_with_usage_and_finish_reason(
    gateway: Gateway, receiver: GrpcReceiver
) -> None:
    traceparent, trace_id, client_span = new_traceparent()
    stream = client(gateway).chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "stream it"}],
        stream=True,
        extra_headers={"traceparent": traceparent},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "traced"
    spans = receiver.collector.wait(complete, trace_id)
    request, _, worker = parts(spans)
    assert request.parent_span_id == client_span
    a = request.attributes
    assert a["gen_ai.response.model"] == UPSTREAM_MODEL
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == ("9", "2")
    assert orjson.loads(a["gen_ai.response.finish_reasons"]) == ["length"]
    assert worker.name == "chat gpt-test"


def test_translated_stream_usage_is_on_the_worker_span(
    gateway: Gateway, receiver: GrpcReceiver
) -> None:
    traceparent, trace_id, _ = new_traceparent()
    stream = client(gateway).chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "stream it"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"traceparent": traceparent},
    )
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None
    spans = receiver.collector.wait(complete, trace_id)
    request, _, worker = parts(spans)
    assert worker.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert worker.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert "stream started" in worker.events
    assert request.attributes["gen_ai.provider.name"] == "anthropic"


def test_request_without_traceparent_starts_a_trace_the_access_log_names(
    gateway: Gateway, receiver: GrpcReceiver
) -> None:
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "log me"}]
    )
    request_id = raw.headers["x-request-id"]
    line: dict[str, Any] | None = None
    deadline = time.monotonic() + 15
    while line is None and time.monotonic() < deadline:
        for text in gateway.log().splitlines():
            if text.startswith("{") and request_id in text and '"request_id"' in text:
                line = orjson.loads(text)
        time.sleep(0.1)
    assert line is not None, gateway.log()[-2000:]
    trace_id = line["trace_id"]
    assert isinstance(trace_id, str) and len(trace_id) == 32
    spans = receiver.collector.wait(complete, trace_id)
    request, _, _ = parts(spans)
    assert request.parent_span_id == ""  # a root: nobody upstream of Envoy
    assert line["span_id"] == request.span_id
    assert request.attributes["guid:x-request-id"] == request_id


def test_unknown_model_error_is_traced(gateway: Gateway, receiver: GrpcReceiver) -> None:
    traceparent, trace_id, _ = new_traceparent()
    with pytest.raises(openai.NotFoundError):
        client(gateway).chat.completions.create(
            model="no-such-model",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"traceparent": traceparent},
        )
    spans = receiver.collector.wait(
        lambda s: any(x.kind == SERVER for x in s) and any(x.kind == INTERNAL for x in s),
        trace_id,
    )
    request = next(s for s in spans if s.kind == SERVER)
    worker = next(s for s in spans if s.kind == INTERNAL)
    assert request.attributes["http.status_code"] == "404"
    assert request.attributes["gen_ai.request.model"] == "no-such-model"
    assert worker.attributes["http.response.status_code"] == 404


def test_each_attempt_has_its_span_and_the_worker_span_of_it(
    receiver: GrpcReceiver,
    upstreams: tuple[MockUpstream, MockUpstream],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A group with a deployment that refuses connections: requests that meet it first are
    retried on the other one, and each attempt is a span of Envoy's."""
    config = gateway_config(upstreams[0].base_url, upstreams[1].base_url)
    dead = {
        "model_name": "gpt-test",
        "litellm_params": {
            "model": "openai/gpt-4o",
            "api_base": f"http://127.0.0.1:{free_port()}/v1",
            "api_key": "sk-upstream",
        },
        "model_info": {"id": "dead"},
    }
    config["model_list"] = [dead, config["model_list"][0]]
    config["router_settings"] = {"num_retries": 2, "disable_cooldowns": True}
    config["llmux"] = {
        "tracing": {"enabled": True, "endpoint": receiver.endpoint, "sampling_ratio": 0}
    }
    sent: list[tuple[str, int]] = []
    with running_gateway(config, tmp_path_factory.mktemp("tracing-retries")) as gw:
        for _ in range(6):
            traceparent, trace_id, _ = new_traceparent()
            raw = client(gw).chat.completions.with_raw_response.create(
                model="gpt-test",
                messages=[{"role": "user", "content": "retry me"}],
                extra_headers={"traceparent": traceparent},
            )
            sent.append((trace_id, int(raw.headers["x-litellm-attempted-retries"]) + 1))
        assert any(attempts > 1 for _, attempts in sent), "none met the dead deployment first"
        for trace_id, attempts in sent:

            def arrived(spans: list[Received], n: int = attempts) -> bool:
                routers = [s for s in spans if s.name.startswith("router ")]
                workers = [s for s in spans if s.kind == INTERNAL]
                return complete(spans) and len(routers) == n and len(workers) == n

            # sampling_ratio 0: the client's sampled flag alone keeps the trace.
            spans = receiver.collector.wait(arrived, trace_id)
            request = next(s for s in spans if s.kind == SERVER)
            routers = [s for s in spans if s.name.startswith("router ")]
            workers = {s.parent_span_id: s for s in spans if s.kind == INTERNAL}
            assert {r.parent_span_id for r in routers} == {request.span_id}
            assert set(workers) == {r.span_id for r in routers}  # one per attempt
            assert request.attributes["llmux.attempts"] == str(attempts)
            answered = max(workers.values(), key=lambda w: w.attributes["llmux.attempts"])
            assert answered.attributes["llmux.attempts"] == attempts
            if attempts > 1:
                failed = next(r for r in routers if r.attributes.get("error") == "true")
                assert "connection failure" in failed.attributes["error.reason"]
                assert workers[failed.span_id].attributes.get("llmux.ended_by_envoy") is True
        # An unsampled client trace stays unsampled, whatever the ratio.
        _, unsampled, _ = new_traceparent()
        client(gw).chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "not sampled"}],
            extra_headers={"traceparent": f"00-{unsampled}-{secrets.token_hex(8)}-00"},
        )
    time.sleep(6)
    assert receiver.collector.of_trace(unsampled) == []


def test_litellm_otel_callback_exports_over_http(
    upstreams: tuple[MockUpstream, MockUpstream], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """LiteLLM's way: callbacks: ["otel"], OTEL_EXPORTER=otlp_http, OTEL_ENDPOINT."""
    collector = Collector()
    http = http_receiver(collector).start()
    config = gateway_config(upstreams[0].base_url, upstreams[1].base_url)
    config["litellm_settings"] = {"callbacks": ["otel"]}
    # Content is opted into here (and only here): the other tests check its absence.
    config["llmux"] = {"tracing": {"capture_message_content": True}}
    env = {
        "OTEL_EXPORTER": "otlp_http",
        "OTEL_ENDPOINT": http.base_url,
        "OTEL_HEADERS": "authorization=Bearer%20abc",
        "OTEL_SERVICE_NAME": "llmux-http",
    }
    try:
        with running_gateway(config, tmp_path_factory.mktemp("tracing-http"), env) as gw:
            traceparent, trace_id, _ = new_traceparent()
            reply = client(gw).chat.completions.create(
                model="claude",
                messages=[{"role": "user", "content": "over http"}],
                extra_headers={"traceparent": traceparent},
            )
            spans = collector.wait(complete, trace_id)
    finally:
        http.stop()
    request, _, worker = parts(spans)
    assert request.service == worker.service == "llmux-http"
    assert worker.attributes["gen_ai.provider.name"] == "anthropic"
    assert any(h.get("authorization") == "Bearer abc" for h in collector.headers)
    sent = orjson.loads(worker.attributes["gen_ai.input.messages"])
    assert sent == [{"role": "user", "content": "over http"}]
    answered = orjson.loads(worker.attributes["gen_ai.output.messages"])
    assert answered[0]["content"] == reply.choices[0].message.content


def test_nothing_is_exported_when_tracing_is_off(
    receiver: GrpcReceiver,
    upstreams: tuple[MockUpstream, MockUpstream],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    config = gateway_config(upstreams[0].base_url, upstreams[1].base_url)
    # The standard variables alone point at a collector but do not turn tracing on.
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    with running_gateway(config, tmp_path_factory.mktemp("tracing-off"), env) as gw:
        trace_ids = []
        for model, stream in (("gpt-test", False), ("gpt-test", True), ("claude", False)):
            traceparent, trace_id, _ = new_traceparent()
            trace_ids.append(trace_id)
            reply = client(gw).chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "untraced"}],
                stream=stream,
                extra_headers={"traceparent": traceparent},
            )
            if stream:
                list(reply)  # type: ignore[call-overload]
        # Off, the client's trace context is one more client header kept from providers.
        assert "traceparent" not in upstreams[0].last().headers
        # Envoy flushes spans every 5 s and the workers' batches leave within 5 s: wait
        # past both before concluding that nothing came.
        time.sleep(7)
        for trace_id in trace_ids:
            assert receiver.collector.of_trace(trace_id) == []
        log = gw.log()
        assert "Traceback" not in log
        # The access log names no trace when there is none.
        lines = [orjson.loads(x) for x in log.splitlines() if '"request_id"' in x]
        access = [x for x in lines if x["model"] in ("gpt-test", "claude")]
        assert len(access) == 3
        assert all(line["trace_id"] is None and line["span_id"] is None for line in access)


def test_virtual_keys_team_and_alias_are_on_the_span_never_the_key(
    receiver: GrpcReceiver,
    upstreams: tuple[MockUpstream, MockUpstream],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """PostgreSQL (tests/pg.py): a key of a team, with an alias, calls a passed-through model."""
    import httpx

    from tests.pg import fresh_database

    master = "sk-master-tracing"
    config = gateway_config(upstreams[0].base_url, upstreams[1].base_url)
    with fresh_database() as db:
        config["general_settings"] = {"master_key": master, "database_url": db}
        config["llmux"] = {"tracing": {"enabled": True, "endpoint": receiver.endpoint}}
        with running_gateway(config, tmp_path_factory.mktemp("tracing-keys")) as gw:

            def admin(path: str, body: dict[str, Any]) -> dict[str, Any]:
                reply = httpx.post(
                    gw.base_url + path,
                    json=body,
                    headers={"Authorization": f"Bearer {master}"},
                    timeout=15,
                )
                assert reply.status_code == 200, reply.text
                answer: dict[str, Any] = reply.json()
                return answer

            admin("/team/new", {"team_id": "search-team", "team_alias": "search"})
            key = admin("/key/generate", {"team_id": "search-team", "key_alias": "ci-bot"})["key"]
            traceparent, trace_id, _ = new_traceparent()
            openai.OpenAI(
                base_url=gw.openai_base, api_key=key, max_retries=0
            ).chat.completions.create(
                model="gpt-test",
                messages=[{"role": "user", "content": "who am i"}],
                extra_headers={"traceparent": traceparent},
            )
            spans = receiver.collector.wait(complete, trace_id)
    request, _, _ = parts(spans)
    assert request.attributes["llmux.team"] == "search-team"
    assert request.attributes["llmux.key_alias"] == "ci-bot"
    for span in spans:
        assert not any(key in str(v) for v in span.attributes.values())
