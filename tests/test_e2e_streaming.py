"""Streaming end to end: the openai SDK's stream iterator through real Envoy and workers."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from llmux_extproc.accounting import tokens
from tests.harness import (
    Gateway,
    MockUpstream,
    json_response,
    metric,
    metric_delta,
    running_gateway,
)
from tests.mock_anthropic import API_KEY as ANTHROPIC_KEY
from tests.mock_anthropic import AnthropicMock

pytestmark = pytest.mark.e2e

WORDS = ["Streaming", " is", " where", " gateways", " break", "."]
# Deltas streamed before the upstream dies ("tools then die"): escapes, non-ASCII text and
# parallel tool calls, which a stream cut short must still be counted from.
CUT_DELTAS: list[dict[str, Any]] = [
    {"role": "assistant", "content": "Précis — 東京\n"},
    {"content": 'a "quoted" word and a back\\slash'},
    {
        "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather"}}
        ]
    },
    {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
    {
        "tool_calls": [
            {"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_time"}}
        ]
    },
    {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
    {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
]
CUT_TEXT = (
    'Précis — 東京\na "quoted" word and a back\\slash' + 'get_weather{"city": get_time"Paris"}{}'
)


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


@dataclass
class OpenAIStreamer:
    """An OpenAI-compatible upstream whose stream behaviour each test scripts by prompt."""

    closed_early: list[float] = field(default_factory=list)

    async def __call__(self, request: web.Request, body: bytes) -> web.StreamResponse:
        data = orjson.loads(body)
        prompt = data["messages"][-1]["content"]
        if not data.get("stream"):
            return json_response(
                {
                    "id": "chatcmpl-s",
                    "object": "chat.completion",
                    "created": 1,
                    "model": "gpt-4o",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(WORDS)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
                }
            )
        if prompt == "rate limit me":
            return json_response(
                {
                    "error": {
                        "message": "slow down",
                        "type": "requests",
                        "param": None,
                        "code": "rate_limit_exceeded",
                    }
                },
                429,
            )
        if prompt == "late start":
            await asyncio.sleep(1.2)  # past the deployment's timeout, within the idle one
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        if prompt.endswith("tools then die"):
            events = b"".join(chunk(delta) for delta in CUT_DELTAS)
            await _write_split(resp, events, 3 if prompt.startswith("split") else len(events))
            await asyncio.sleep(0.1)  # let Envoy pass them on before the connection drops
            assert request.transport is not None
            request.transport.abort()
            return resp
        if prompt == "split":
            # Every event split across writes, mid-line and mid-UTF-8 character, CRLF lines.
            body = b"".join(chunk(delta) for delta in SPLIT_DELTAS) + chunk({}, "stop")
            if (data.get("stream_options") or {}).get("include_usage"):
                body += b"data: " + orjson.dumps({"choices": [], "usage": SPLIT_USAGE}) + b"\n\n"
            body += b"data: [DONE]\n\n"
            await _write_split(resp, body.replace(b"\n", b"\r\n"), 3)
            await resp.write_eof()
            return resp
        await resp.write(chunk({"role": "assistant", "content": ""}))
        delay = {"slow and long": 0.2, "long": 0.001, "healthy and slow": 0.25}.get(prompt, 0.02)
        try:
            for i, word in enumerate(WORDS * (20 if prompt in ("slow and long", "long") else 1)):
                if prompt == "die midway" and i == 3:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if prompt == "stall" and i == 2:
                    await asyncio.sleep(30)
                await resp.write(chunk({"content": word}))
                await asyncio.sleep(delay)
            await resp.write(chunk({}, "stop"))
            if (data.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}
                await resp.write(
                    b"data: "
                    + orjson.dumps(
                        {
                            "id": "chatcmpl-s",
                            "object": "chat.completion.chunk",
                            "created": 1,
                            "model": "gpt-4o",
                            "choices": [],
                            "usage": usage,
                        }
                    )
                    + b"\n\n"
                )
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.closed_early.append(time.monotonic())
            raise
        return resp


SPLIT_DELTAS: list[dict[str, Any]] = [
    {"role": "assistant", "content": ""},
    *({"content": word} for word in ["Grüße", " aus", " 東京", " 🎉", " und", " Zürich."]),
]
SPLIT_USAGE = {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}


async def _write_split(resp: web.StreamResponse, data: bytes, size: int) -> None:
    for start in range(0, len(data), size):
        await resp.write(data[start : start + size])
        await asyncio.sleep(0.002)  # separate TCP segments, so Envoy sees separate chunks


@pytest.fixture(scope="module")
def streamer() -> OpenAIStreamer:
    return OpenAIStreamer()


@pytest.fixture(scope="module")
def upstreams(streamer: OpenAIStreamer) -> Iterator[tuple[MockUpstream, MockUpstream]]:
    openai_up = MockUpstream(streamer).start()
    anthropic_up = MockUpstream(AnthropicMock()).start()
    yield openai_up, anthropic_up
    openai_up.stop()
    anthropic_up.stop()


@pytest.fixture(scope="module")
def gateway(
    upstreams: tuple[MockUpstream, MockUpstream], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    openai_up, anthropic_up = upstreams
    config = {
        "model_list": [
            {
                "model_name": "gpt",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": f"{openai_up.base_url}/v1",
                    "api_key": "k",
                },
            },
            {
                "model_name": "claude",
                "litellm_params": {
                    "model": "anthropic/claude-3-5-sonnet-20241022",
                    "api_base": anthropic_up.base_url,
                    "api_key": ANTHROPIC_KEY,
                },
            },
            {"model_name": "mock", "litellm_params": {"model": "mock/gpt-4o-mini"}},
            _cut_model(openai_up),
            {
                "model_name": "gpt-timed",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": f"{openai_up.base_url}/v1",
                    "api_key": "k",
                    "timeout": 0.5,
                },
            },
        ],
        "llmux": {"stream_idle_timeout": 1.5, "workers": 2},
    }
    with running_gateway(config, tmp_path_factory.mktemp("stream")) as gw:
        yield gw


def _cut_model(upstream: MockUpstream) -> dict[str, Any]:
    # A model of its own, so that no other test's late accounting moves its figures.
    return {
        "model_name": "gpt-cut",
        "litellm_params": {
            "model": "openai/gpt-4o",
            "api_base": f"{upstream.base_url}/v1",
            "api_key": "k",
        },
    }


@pytest.fixture
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.openai_base, api_key="x", max_retries=0, timeout=20)


def collect(stream: Any) -> tuple[str, list[Any]]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_passthrough_stream_matches_non_stream_and_is_accounted(
    client: openai.OpenAI, gateway: Gateway, upstreams: tuple[MockUpstream, MockUpstream]
) -> None:
    answered = metric(gateway.metrics(), "llm_requests_total", model="gpt", status_code="200")
    whole = client.chat.completions.create(
        model="gpt", messages=[{"role": "user", "content": "hi"}]
    )
    # Wait until that answer is accounted, so only the stream below moves the figures.
    before = gateway.metrics_when(
        lambda m: metric(m, "llm_requests_total", model="gpt", status_code="200") > answered
    )
    text, chunks = collect(
        client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    # LLMux asked the upstream for usage, and dropped the usage chunk the client did not ask for.
    assert upstreams[0].last().json()["stream_options"] == {"include_usage": True}
    assert all(c.usage is None for c in chunks)
    after = gateway.metrics_changed(before, "llm_token_usage_total", model="gpt", type="output")
    assert metric_delta(before, after, "llm_token_usage_total", model="gpt", type="output") == 6
    streamed = {"model": "gpt", "type": "input", "estimated": "false"}
    assert metric_delta(before, after, "llm_streamed_tokens_total", **streamed) == 12
    assert metric(after, "llm_time_to_first_token_seconds_count", model="gpt") > metric(
        before, "llm_time_to_first_token_seconds_count", model="gpt"
    )


def test_include_usage_is_honoured(client: openai.OpenAI) -> None:
    _, chunks = collect(
        client.chat.completions.create(
            model="gpt",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (12, 6)


def test_anthropic_stream_is_translated_like_the_whole_answer(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Say hello"}]
    whole = client.chat.completions.create(model="claude", messages=messages)
    text, chunks = collect(
        client.chat.completions.create(
            model="claude", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    # The mock numbers its answers; everything else must match.
    assert re.sub(r"\d+", "N", text) == re.sub(r"\d+", "N", whole.choices[0].message.content or "")
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]
    assert whole.usage is not None and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_anthropic_streamed_tool_calls(client: openai.OpenAI) -> None:
    from tests.corpus import case

    request = case("parallel_tools").request
    whole = client.chat.completions.create(model="claude", **request)
    _, chunks = collect(client.chat.completions.create(model="claude", stream=True, **request))
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += tc.id or ""
            if tc.function:
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
    expected = whole.choices[0].message.tool_calls or []
    assert len(calls) == len(expected) == 2
    for i, call in enumerate(expected):
        assert calls[i]["id"].startswith("toolu_") and call.id.startswith("toolu_")
        assert calls[i]["name"] == call.function.name
        assert orjson.loads(calls[i]["arguments"]) == orjson.loads(call.function.arguments)


def test_mock_streams(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "stream me"}]
    )
    text, chunks = collect(
        client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "stream me"}], stream=True
        )
    )
    assert text == whole.choices[0].message.content
    assert len(chunks) > 3


def test_error_before_the_stream_is_an_sdk_exception(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        list(
            client.chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": "rate limit me"}], stream=True
            )
        )
    assert "slow down" in str(info.value)


def test_upstream_dying_midway_ends_the_stream(client: openai.OpenAI) -> None:
    started = time.monotonic()
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        collect(
            client.chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": "die midway"}], stream=True
            )
        )
    assert time.monotonic() - started < 10


def test_stalled_upstream_is_cut_by_the_idle_timeout(client: openai.OpenAI) -> None:
    started = time.monotonic()
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        collect(
            client.chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": "stall"}], stream=True
            )
        )
    assert time.monotonic() - started < 10  # stream_idle_timeout is 1.5 s; the stall is 30 s


def test_deployment_timeout_bounds_the_start_of_a_stream_not_its_life(
    client: openai.OpenAI,
) -> None:
    # timeout: 0.5. A stream answering at once and running 1.5 s (a chunk every 0.25 s) lives.
    started = time.monotonic()
    text, _ = collect(
        client.chat.completions.create(
            model="gpt-timed",
            messages=[{"role": "user", "content": "healthy and slow"}],
            stream=True,
        )
    )
    assert text == "".join(WORDS) and time.monotonic() - started > 1.0
    # One whose first byte comes after 1.2 s (stream_idle_timeout is 1.5 s) is cut by the
    # deployment's timeout: an OpenAI 504 before the stream.
    with pytest.raises(openai.APIStatusError) as info:
        collect(
            client.chat.completions.create(
                model="gpt-timed", messages=[{"role": "user", "content": "late start"}], stream=True
            )
        )
    assert info.value.status_code == 504
    assert isinstance(info.value.body, dict) and info.value.body.get("type") == "timeout_error"


@pytest.fixture(scope="module")
def processor_gateway(
    upstreams: tuple[MockUpstream, MockUpstream], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    config = {
        "model_list": [
            {
                "model_name": "gpt",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": f"{upstreams[0].base_url}/v1",
                    "api_key": "k",
                },
            },
            _cut_model(upstreams[0]),
        ],
        "llmux": {"stream_accounting": "processor"},
    }
    with running_gateway(config, tmp_path_factory.mktemp("processor")) as gw:
        yield gw


@pytest.mark.parametrize("mode", ["envoy", "processor"])
def test_client_disconnect_cancels_upstream_and_is_accounted(
    mode: str, request: pytest.FixtureRequest, streamer: OpenAIStreamer
) -> None:
    gateway: Gateway = request.getfixturevalue(
        "gateway" if mode == "envoy" else "processor_gateway"
    )
    before = gateway.metrics()
    streamer.closed_early.clear()
    with httpx.stream(
        "POST",
        f"{gateway.openai_base}/chat/completions",
        json={
            "model": "gpt",
            "stream": True,
            "messages": [{"role": "user", "content": "slow and long"}],
        },
        timeout=10,
    ) as resp:
        lines = resp.iter_lines()
        for _ in range(6):
            next(lines)
    left = time.monotonic()
    deadline = left + 5
    while not streamer.closed_early and time.monotonic() < deadline:
        time.sleep(0.02)
    assert streamer.closed_early, "the upstream never saw the disconnect"
    assert streamer.closed_early[0] - left < 1.0
    # Accounted as cut short (499), counted with tiktoken.
    cut = {"model": "gpt", "status_code": "499"}
    after = gateway.metrics_changed(before, "llm_requests_total", **cut)
    assert metric_delta(before, after, "llm_requests_total", **cut) == 1

    def estimated(text: str, kind: str) -> float:
        return metric(text, "llm_streamed_tokens_total", model="gpt", type=kind, estimated="true")

    assert estimated(after, "input") > estimated(before, "input")
    # What was produced before the client left is counted too (by the processor, or from the
    # text response.lua kept in Envoy).
    assert estimated(after, "output") > estimated(before, "output")


@pytest.mark.parametrize("prompt", ["tools then die", "split tools then die"])
@pytest.mark.parametrize("mode", ["envoy", "processor"])
def test_stream_cut_short_is_counted_with_tiktoken(
    mode: str, prompt: str, request: pytest.FixtureRequest
) -> None:
    """Without the provider's usage, both ways of streaming count what was asked and what was
    produced (text, escapes, tool names and arguments) with tiktoken, marked as estimated."""
    gateway: Gateway = request.getfixturevalue(
        "gateway" if mode == "envoy" else "processor_gateway"
    )
    client = openai.OpenAI(base_url=gateway.openai_base, api_key="x", max_retries=0)
    messages: list[Any] = [
        {"role": "system", "content": "Answer with tools."},
        {"role": "user", "content": prompt},
    ]
    labels = {"model": "gpt-cut", "estimated": "true"}
    before = gateway.metrics()
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        collect(client.chat.completions.create(model="gpt-cut", messages=messages, stream=True))
    after = gateway.metrics_changed(before, "llm_streamed_tokens_total", type="output", **labels)

    def delta(kind: str) -> float:
        return metric_delta(before, after, "llm_streamed_tokens_total", type=kind, **labels)

    assert delta("input") == tokens.count_messages(messages, "gpt-4o")
    assert delta("output") == tokens.count_text(CUT_TEXT, "gpt-4o")


def test_no_stream_state_leaks(gateway: Gateway) -> None:
    async def one(http: httpx.AsyncClient, i: int) -> None:
        body = {"model": "gpt", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with http.stream("POST", "/chat/completions", json=body) as resp:
            async for n, _ in _enumerate(resp.aiter_lines()):
                if i % 3 == 0 and n == 2:
                    break  # cut short

    async def main(count: int) -> None:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(
            base_url=gateway.openai_base, limits=limits, timeout=30
        ) as http:
            for start in range(0, count, 50):
                await asyncio.gather(*(one(http, i) for i in range(start, start + 50)))

    def settled(tasks_wanted: float | None = None) -> tuple[float, float, int]:
        # The task gauge is sampled each second, and work that ends a request may outlive
        # it briefly (a reservation released a second after Envoy ends a request, an
        # access-log batch in flight): a leak is tasks that never go away, so wait for the
        # count to come back, up to a bound.
        deadline = time.monotonic() + 10
        while True:
            time.sleep(2.5)
            metrics = gateway.metrics()
            tasks = metric(metrics, "llmux_asyncio_tasks")
            if tasks_wanted is None or tasks <= tasks_wanted or time.monotonic() > deadline:
                break
        rss = sum(_rss_kib(pid) for pid in _worker_pids(gateway))
        return metric(metrics, "llmux_open_streams"), tasks, rss

    asyncio.run(main(100))  # warm up: tokenizer, connection pools, caches
    _, tasks_before, rss_before = settled()
    asyncio.run(main(3000))
    open_after, tasks_after, rss_after = settled(tasks_before)
    assert open_after == 0
    assert tasks_after <= tasks_before
    assert rss_after - rss_before < 20 * 1024, (rss_before, rss_after)


def _worker_pids(gateway: Gateway) -> list[int]:
    return [
        int(line.split("ext_proc worker ")[1].split()[0])
        for line in gateway.log().splitlines()
        if "ext_proc worker" in line and "serving" in line
    ]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def _enumerate(it: Any) -> Any:
    n = 0
    async for item in it:
        yield n, item
        n += 1


def _extproc_messages(gateway: Gateway) -> int:
    stats = httpx.get(
        f"http://127.0.0.1:{gateway.admin_port}/stats?filter=ext_proc.stream_msgs_sent"
    ).text
    return sum(int(line.rsplit(" ", 1)[1]) for line in stats.splitlines() if line.strip())


def test_passthrough_with_client_usage_costs_no_python_per_chunk(
    client: openai.OpenAI, gateway: Gateway
) -> None:
    before_metrics = gateway.metrics()
    before = _extproc_messages(gateway)
    _, chunks = collect(
        client.chat.completions.create(
            model="gpt",
            messages=[{"role": "user", "content": "long"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len(chunks) > 100
    # Request headers, request body, response headers: the chunks never reach the processor.
    assert _extproc_messages(gateway) - before == 3
    # Accounted from Envoy's batched access log entry, with the provider's own counts.
    labels = {"model": "gpt", "type": "output", "estimated": "false"}
    after = gateway.metrics_changed(before_metrics, "llm_streamed_tokens_total", **labels)
    delta = metric_delta(before_metrics, after, "llm_streamed_tokens_total", **labels)
    assert delta == 6
    assert metric(after, "llm_requests_total", model="gpt", status_code="200") > metric(
        before_metrics, "llm_requests_total", model="gpt", status_code="200"
    )


def test_passthrough_without_client_usage_drops_the_injected_chunk_in_envoy(
    client: openai.OpenAI, gateway: Gateway
) -> None:
    before_metrics = gateway.metrics()
    before = _extproc_messages(gateway)
    text, chunks = collect(
        client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "long"}], stream=True
        )
    )
    assert text == "".join(WORDS * 20)
    assert all(c.usage is None and c.choices for c in chunks)  # the usage chunk never arrives
    assert _extproc_messages(gateway) - before == 3
    labels = {"model": "gpt", "type": "output", "estimated": "false"}
    after = gateway.metrics_changed(before_metrics, "llm_streamed_tokens_total", **labels)
    delta = metric_delta(before_metrics, after, "llm_streamed_tokens_total", **labels)
    assert delta == 6  # the provider's own count, read by Envoy before the chunk was dropped


@pytest.mark.parametrize("include_usage", [False, True])
def test_passthrough_reassembles_events_split_anywhere(
    include_usage: bool, client: openai.OpenAI, gateway: Gateway
) -> None:
    """Envoy's side of a passed-through stream (response.lua holding back incomplete events,
    sse_to_metadata reading usage) copes with events split mid-line and mid-character."""
    labels = {"model": "gpt-cut", "type": "output", "estimated": "false"}
    before = gateway.metrics()
    options: Any = {"include_usage": True} if include_usage else openai.NOT_GIVEN
    text, chunks = collect(
        client.chat.completions.create(
            model="gpt-cut",
            messages=[{"role": "user", "content": "split"}],
            stream=True,
            stream_options=options,
        )
    )
    assert text == "".join(d["content"] for d in SPLIT_DELTAS)
    assert chunks[0].choices[0].delta.role == "assistant"
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == SPLIT_USAGE["completion_tokens"]
    else:
        assert all(c.choices and c.usage is None for c in chunks)
    after = gateway.metrics_changed(before, "llm_streamed_tokens_total", **labels)
    delta = metric_delta(before, after, "llm_streamed_tokens_total", **labels)
    assert delta == SPLIT_USAGE["completion_tokens"]


def test_translated_stream_goes_through_the_processor(
    client: openai.OpenAI, gateway: Gateway
) -> None:
    before = _extproc_messages(gateway)
    collect(
        client.chat.completions.create(
            model="claude", messages=[{"role": "user", "content": "Say hello"}], stream=True
        )
    )
    assert _extproc_messages(gateway) - before > 3
