"""Rate limits and budgets end to end: two `llmux run` instances (real Envoy, two workers
each) on one PostgreSQL database and one Redis prefix, keys made through LiteLLM's
management API, requests from httpx and the `openai` SDK; and one instance without Redis,
whose two workers share the replica's own buckets."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from tests import redis_server
from tests.harness import (
    Gateway,
    MockUpstream,
    json_response,
    openai_chat_completion,
    running_gateway,
)
from tests.pg import fresh_database

pytestmark = pytest.mark.e2e
MASTER = "sk-master-limits"
PRICE = 0.0001  # USD per token, in and out: a budget of $0.01 is ~100 tokens
MESSAGES = [{"role": "user", "content": "hi"}]


def config(db: str, redis_url: str | None) -> dict[str, Any]:
    router: dict[str, Any] = {"num_retries": 0}
    if redis_url:
        router["redis_url"] = redis_url
    return {
        "model_list": [
            {
                "model_name": "gpt-a",
                "litellm_params": {
                    "model": "mock/gpt-4o-mini",
                    "mock_response": "ok",
                    "input_cost_per_token": PRICE,
                    "output_cost_per_token": PRICE,
                },
            }
        ],
        "router_settings": router,
        "general_settings": {"master_key": MASTER, "database_url": db},
        "llmux": {"workers": 2, "access_log": "off"},
    }


@pytest.fixture(scope="module")
def db() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="module")
def pair(db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Gateway]]:
    redis_server.client().close()  # fails, saying how to start Redis, when it is not there
    prefix = redis_server.new_prefix()
    env = {"LLMUX_REDIS_PREFIX": prefix}
    cfg = config(db, redis_server.URL)
    try:
        with (
            running_gateway(cfg, tmp_path_factory.mktemp("a"), env) as a,
            running_gateway(cfg, tmp_path_factory.mktemp("b"), env) as b,
        ):
            yield a, b
    finally:
        redis_server.drop_prefix(prefix)


@pytest.fixture(scope="module")
def alone(db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(config(db, None), tmp_path_factory.mktemp("alone")) as gw:
        yield gw


def new_key(gw: Gateway, **fields: Any) -> str:
    reply = httpx.post(
        gw.base_url + "/key/generate",
        headers={"Authorization": f"Bearer {MASTER}"},
        json=fields,
        timeout=15,
    )
    assert reply.status_code == 200, reply.text
    assert "x-llmux-not-enforced-fields" not in reply.headers
    return str(reply.json()["key"])


async def burst(
    gateways: list[Gateway], key: str, n: int, body: dict[str, Any] | None = None
) -> tuple[list[httpx.Response], float]:
    """`n` concurrent requests spread over `gateways`; the replies and the seconds taken."""
    payload = body or {"model": "gpt-a", "messages": MESSAGES}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        started = time.monotonic()
        replies = await asyncio.gather(
            *(
                http.post(
                    gateways[i % len(gateways)].openai_base + "/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json=payload,
                )
                for i in range(n)
            )
        )
        return list(replies), time.monotonic() - started


def refused_shape(reply: httpx.Response, status: int, kind: str, param: str) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == (kind, param), error


def test_rpm_is_shared_by_two_instances(pair: tuple[Gateway, Gateway]) -> None:
    key = new_key(pair[0], rpm_limit=100)
    replies, elapsed = asyncio.run(burst(list(pair), key, 1000))
    ok = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code != 200]
    # A token bucket refills 100/60 per second while the burst runs: exactly 100 plus
    # what was refilled meanwhile, never 100 per instance.
    refilled = math.ceil(elapsed * 100 / 60)
    assert 100 <= len(ok) <= 100 + refilled, (len(ok), elapsed)
    for reply in refused:
        refused_shape(reply, 429, "rate_limit_error", "rpm_limit")
        assert int(reply.headers["retry-after"]) >= 1
        assert reply.headers["x-ratelimit-limit-requests"] == "100"
        assert reply.headers["x-ratelimit-remaining-requests"] == "0"
    assert {r.headers["x-ratelimit-limit-requests"] for r in ok} == {"100"}
    assert any(r.headers["x-ratelimit-remaining-requests"] == "0" for r in ok)


def test_tpm_is_charged_by_real_usage_across_instances(pair: tuple[Gateway, Gateway]) -> None:
    key = new_key(pair[0], tpm_limit=10_000, rpm_limit=60)
    clients = [
        openai.OpenAI(base_url=gw.openai_base, api_key=key, max_retries=0, timeout=15)
        for gw in pair
    ]
    started = time.monotonic()
    first = clients[0].chat.completions.with_raw_response.create(
        model="gpt-a",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=50,
    )
    used = first.parse().usage
    assert used is not None
    remaining_first = int(first.headers["x-ratelimit-remaining-tokens"])
    estimate = 10_000 - remaining_first  # what admission reserved: more than was used
    assert estimate > used.total_tokens
    assert first.headers["x-ratelimit-limit-tokens"] == "10000"
    assert first.headers["x-ratelimit-remaining-requests"] == "59"
    time.sleep(0.5)  # the settlement is sent after the answer
    second = clients[1].chat.completions.with_raw_response.create(
        model="gpt-a",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=50,
    )
    refill = math.ceil((time.monotonic() - started) * 10_000 / 60)
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    # Instance B sees A's request charged at its real usage, not at the estimate.
    expected = 10_000 - used.total_tokens - estimate
    assert expected <= remaining <= expected + refill, (remaining, expected, refill)


def test_budget_holds_across_instances(pair: tuple[Gateway, Gateway]) -> None:
    key = new_key(pair[0], max_budget=0.01)
    body = {"model": "gpt-a", "messages": MESSAGES, "max_tokens": 5}
    replies, _ = asyncio.run(burst(list(pair), key, 200, body))
    ok = [r for r in replies if r.status_code == 200]
    assert ok, "the first request is within budget"
    for reply in replies:
        if reply.status_code != 200:
            refused_shape(reply, 400, "budget_exceeded", "max_budget")
    costs = [float(r.headers["x-litellm-response-cost"]) for r in ok]
    # A request is admitted while spend + reservations in flight < max_budget, and each
    # reservation (prompt bytes / 4 + max_tokens, at the price) covers its request's real
    # cost: 200 concurrent requests overspend by less than the last admitted one's cost.
    assert sum(costs) < 0.01 + max(costs), (sum(costs), len(ok))
    assert len(ok) < 200


def test_without_redis_the_workers_share_one_bucket(alone: Gateway) -> None:
    key = new_key(alone, rpm_limit=5, max_parallel_requests=50)
    replies, elapsed = asyncio.run(burst([alone], key, 40))
    ok = sum(r.status_code == 200 for r in replies)
    assert 5 <= ok <= 5 + math.ceil(elapsed * 5 / 60), (ok, elapsed)
    for reply in replies:
        if reply.status_code != 200:
            refused_shape(reply, 429, "rate_limit_error", "rpm_limit")


# -- answers Envoy passes on by itself, streams cut short, Envoy's own failures ----------

UPSTREAM_USAGE = 11 + 7  # what the mock provider reports per answer


async def anthropic_stalling_stream(request: web.Request) -> web.StreamResponse:
    """Anthropic's stream format: the prompt's usage, one text delta, then nothing."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-5-sonnet-20241022",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 11, "output_tokens": 1},
    }
    for name, data in (
        ("message_start", {"type": "message_start", "message": message}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "hello there"},
            },
        ),
    ):
        await response.write(f"event: {name}\ndata: ".encode() + orjson.dumps(data) + b"\n\n")
    await asyncio.sleep(30)  # the client leaves meanwhile
    return response


async def openai_upstream(request: web.Request, body: bytes) -> web.StreamResponse:
    if request.path.endswith("/v1/messages"):
        return await anthropic_stalling_stream(request)
    if request.path.startswith("/fail/"):  # a deployment that always fails, retriably
        return json_response({"error": {"message": "overloaded", "type": "server_error"}}, 500)
    payload = orjson.loads(body)
    if payload["messages"][0]["content"] == "slow":  # past the deployment's timeout
        await asyncio.sleep(5)
    if not payload.get("stream"):
        return json_response(openai_chat_completion(payload["model"], "hello"))
    cut = payload["messages"][0]["content"] == "cut"
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for word in ("hel", "lo"):
        chunk = {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": payload["model"],
            "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
        }
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    if cut:  # the client leaves while the provider is still generating
        await asyncio.sleep(30)
        return response  # Envoy reset this stream long ago
    usage = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": payload["model"],
        "choices": [],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }
    await response.write(b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n")
    await response.write_eof()
    return response


@pytest.fixture(scope="module")
def upstreamed(db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    upstream = MockUpstream(openai_upstream).start()
    cfg = config(db, None)
    cfg["router_settings"]["num_retries"] = 1
    cfg["model_list"] += [
        {
            "model_name": "gpt-flaky",
            "litellm_params": {
                "model": "openai/gpt-4o-mini",
                "api_base": upstream.base_url + "/fail/v1",
                "api_key": "sk-upstream",
            },
        },
        {
            "model_name": "gpt-flaky",
            "litellm_params": {
                "model": "openai/gpt-4o-mini",
                "api_base": upstream.base_url + "/v1",
                "api_key": "sk-upstream",
            },
        },
        {
            "model_name": "gpt-up",
            "litellm_params": {
                "model": "openai/gpt-4o-mini",
                "api_base": upstream.base_url + "/v1",
                "api_key": "sk-upstream",
            },
        },
        {
            "model_name": "claude",
            "litellm_params": {
                "model": "anthropic/claude-3-5-sonnet-20241022",
                "api_base": upstream.base_url,
                "api_key": "sk-ant-test",
            },
        },
        {
            "model_name": "gpt-slow",
            "litellm_params": {
                "model": "openai/gpt-4o-mini",
                "api_base": upstream.base_url + "/v1",
                "api_key": "sk-upstream",
                "timeout": 1,
            },
        },
    ]
    try:
        with running_gateway(cfg, tmp_path_factory.mktemp("upstreamed")) as gw:
            yield gw
    finally:
        upstream.stop()


def remaining_tokens(gw: Gateway, key: str, stream: bool = False, content: str = "hi") -> int:
    body = {"model": "gpt-up", "messages": [{"role": "user", "content": content}], "stream": stream}
    with httpx.stream(
        "POST",
        gw.openai_base + "/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json=body,
        timeout=15,
    ) as reply:
        assert reply.status_code == 200, reply.read()
        reply.read()
        return int(reply.headers["x-ratelimit-remaining-tokens"])


def test_passed_through_answers_settle_from_the_access_log(upstreamed: Gateway) -> None:
    # A small limit, so that the refill (10 tokens/s) cannot hide a missing settlement.
    limit = 600
    key = new_key(upstreamed, tpm_limit=limit)
    started = time.monotonic()
    first = remaining_tokens(upstreamed, key)
    estimate = limit - first  # the same body each time: the same estimate (> 256)
    time.sleep(1.0)  # the access log reaches the workers every 0.2 s
    after_whole = remaining_tokens(upstreamed, key)
    time.sleep(1.0)
    after_stream = remaining_tokens(upstreamed, key, stream=True)
    refill = math.ceil((time.monotonic() - started) * limit / 60)
    assert estimate - UPSTREAM_USAGE > refill  # unsettled, remaining would be far lower
    # Each answer was charged its real 18 tokens, not the estimate.
    expected = limit - UPSTREAM_USAGE - estimate
    assert expected <= after_whole <= expected + refill, (after_whole, expected, refill)
    stream_estimate = estimate  # `"stream": true` instead of `false`: the same estimate
    expected = limit - 2 * UPSTREAM_USAGE - stream_estimate
    assert expected - 2 <= after_stream <= expected + refill, (after_stream, expected, refill)
    time.sleep(1.0)
    # And the stream itself (whose usage chunk sse_to_metadata read) as well.
    final = remaining_tokens(upstreamed, key)
    expected = limit - 3 * UPSTREAM_USAGE - estimate
    assert expected <= final <= expected + refill + 30, (final, expected)


def test_a_stream_cut_short_is_charged_what_it_produced(upstreamed: Gateway) -> None:
    limit = 600
    key = new_key(upstreamed, tpm_limit=limit)
    body = {"model": "gpt-up", "messages": [{"role": "user", "content": "cut"}], "stream": True}
    with httpx.stream(
        "POST",
        upstreamed.openai_base + "/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json=body,
        timeout=15,
    ) as reply:
        estimate = limit - int(reply.headers["x-ratelimit-remaining-tokens"])
        next(reply.iter_bytes())  # the first chunk, then the client leaves
    # Settled, the cut stream costs what tiktoken counts of it (< 40 tokens); unsettled,
    # its estimate (> 256) would stay taken for longer than this test waits.
    deadline = time.monotonic() + 15
    while True:
        time.sleep(0.5)
        remaining = remaining_tokens(upstreamed, key, content="cut")
        if remaining >= limit - estimate - 40:
            break
        assert time.monotonic() < deadline, ("the cut stream was never settled", remaining)


def test_envoy_failures_release_their_place(upstreamed: Gateway) -> None:
    key = new_key(upstreamed, max_parallel_requests=1)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "gpt-slow", "messages": [{"role": "user", "content": "slow"}]}
    url = upstreamed.openai_base + "/chat/completions"
    slow = httpx.post(url, headers=headers, json=body, timeout=30)
    # Envoy's own timeout (UT), after the processor admitted the request and forwarded it.
    assert slow.status_code == 504, slow.text
    assert set(slow.json()["error"]) == {"message", "type", "param", "code"}
    # Envoy's access log tells a worker, which gives the place back (a reservation
    # nobody releases would hold it until it expires, 11 minutes here).
    deadline = time.monotonic() + 20
    body = {"model": "gpt-up", "messages": MESSAGES}
    while True:
        reply = httpx.post(url, headers=headers, json=body)
        if reply.status_code == 200:
            break
        refused_shape(reply, 429, "rate_limit_error", "max_parallel_requests")
        assert time.monotonic() < deadline, "the failed request kept its place"
        time.sleep(0.3)


def test_a_retried_request_is_admitted_once_and_settled_once(upstreamed: Gateway) -> None:
    """The first attempt fails (500, retried on the other deployment): the retry is not
    admitted again (one place of max_parallel_requests 1 suffices) and its answer settles
    the first attempt's reservation (Envoy's x-request-id is the same on every attempt),
    so the next request finds the place free. A passed-through answer is settled from its
    access log entry, which Envoy flushes every 0.2 s: hence the pause between requests
    (a retry settled under another id would hold the place for 11 minutes)."""
    key = new_key(upstreamed, max_parallel_requests=1, rpm_limit=1000)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "gpt-flaky", "messages": MESSAGES}
    url = upstreamed.openai_base + "/chat/completions"
    retried = 0
    for _ in range(20):
        reply = httpx.post(url, headers=headers, json=body, timeout=15)
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-ratelimit-limit-requests"] == "1000"  # retried answers too
        retried += reply.headers["x-litellm-attempted-retries"] == "1"
        if retried >= 3:
            break
        time.sleep(1.0)
    assert retried >= 3


def test_redis_down_falls_back_to_the_replica(
    db: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.harness import free_port, metric

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens
    with running_gateway(config(db, dead), tmp_path_factory.mktemp("dead-redis")) as gw:
        key = new_key(gw, rpm_limit=3)
        replies, elapsed = asyncio.run(burst([gw], key, 8))
        # The replica's own bucket holds the limit (fail open to local counters, never a
        # hang: each request waits at most one 0.5 s timeout).
        assert sum(r.status_code == 200 for r in replies) == 3 + math.floor(elapsed * 3 / 60)
        for reply in replies:
            if reply.status_code != 200:
                refused_shape(reply, 429, "rate_limit_error", "rpm_limit")
        gw.wait_for_log("Redis unreachable")
        assert metric(gw.metrics(), "llmux_redis_errors_total") >= 1


def test_a_translated_stream_cut_short_is_charged_what_it_produced(upstreamed: Gateway) -> None:
    """Anthropic's stream goes through the processor chunk by chunk; the client leaves
    after the first: the processor's end of stream settles with the prompt's 11 tokens
    and the counted text, not the estimate."""
    limit = 600
    key = new_key(upstreamed, tpm_limit=limit)
    body = {"model": "claude", "messages": MESSAGES, "stream": True, "max_tokens": 300}
    with httpx.stream(
        "POST",
        upstreamed.openai_base + "/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json=body,
        timeout=15,
    ) as reply:
        assert reply.status_code == 200, reply.read()
        estimate = limit - int(reply.headers["x-ratelimit-remaining-tokens"])
        assert estimate > 300
        next(reply.iter_bytes())  # the first chunk, then the client leaves
    deadline = time.monotonic() + 15
    while True:
        time.sleep(0.5)
        remaining = remaining_tokens(upstreamed, key)
        # remaining_tokens asks ~280 tokens of its own; settled, the cut stream kept < 40.
        if remaining >= limit - 40 - 300:
            break
        assert time.monotonic() < deadline, ("the cut stream was never settled", remaining)
