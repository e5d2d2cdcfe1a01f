"""Retries and fallback per attempt, end to end: real Envoy choosing the endpoint and
retrying, the processor translating and signing each attempt for its own provider, the
official openai SDK (its own retries off) and mock upstreams in each provider's wire
format that fail on purpose and record what they receive."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests import mock_anthropic as ma
from tests import mock_bedrock as mb
from tests.harness import (
    Gateway,
    MockUpstream,
    json_response,
    openai_chat_completion,
    running_gateway,
)

pytestmark = pytest.mark.e2e

OPENAI_KEY = "sk-openai-upstream"
CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


def openai_error(status: int, message: str, err_type: str = "server_error") -> web.Response:
    return json_response({"error": {"message": message, "type": err_type}}, status)


async def failing(request: web.Request, body: bytes) -> web.StreamResponse:
    return openai_error(503, "upstream overloaded")


async def too_long(request: web.Request, body: bytes) -> web.StreamResponse:
    return openai_error(
        400,
        "This model's maximum context length is 8192 tokens. However, your messages "
        "resulted in 9000 tokens.",
        "invalid_request_error",
    )


async def anthropic_overloaded(request: web.Request, body: bytes) -> web.StreamResponse:
    return ma.anthropic_error(529, "overloaded_error", "Overloaded")


async def bad_request(request: web.Request, body: bytes) -> web.StreamResponse:
    return openai_error(400, "temperature must be at most 2", "invalid_request_error")


async def answering(request: web.Request, body: bytes) -> web.StreamResponse:
    data = orjson.loads(body)
    if data.get("stream"):
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for piece in ("good ", "answer"):
            chunk = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": data["model"],
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
            }
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    return json_response(openai_chat_completion(data["model"], "good answer"))


def _compatible(name: str, dep_id: str, up: MockUpstream) -> dict[str, Any]:
    return {
        "model_name": name,
        "litellm_params": {
            "model": f"openai_compatible/{dep_id}-model",
            "api_base": up.base_url + "/v1",
            "api_key": OPENAI_KEY,
        },
        "model_info": {"id": dep_id},
    }


@dataclass
class Env:
    gateway: Gateway
    bad: MockUpstream
    good: MockUpstream
    small: MockUpstream
    refusing: MockUpstream
    overloaded: MockUpstream
    anthropic: MockUpstream
    bedrock: mb.BedrockMock

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.openai_base, api_key="sk-any", max_retries=0)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    bedrock = mb.BedrockMock()
    ups: dict[str, MockUpstream] = {
        name: MockUpstream(handler).start()
        for name, handler in (
            ("bad", failing),
            ("good", answering),
            ("small", too_long),
            ("refusing", bad_request),
            ("overloaded", anthropic_overloaded),
            ("anthropic", ma.AnthropicMock()),
            ("bedrock", bedrock),
        )
    }
    config = {
        "model_list": [
            _compatible("pair", "bad", ups["bad"]),
            _compatible("pair", "good", ups["good"]),
            _compatible("to-claude", "down-1", ups["bad"]),
            _compatible("to-bedrock", "down-2", ups["bad"]),
            _compatible("small", "small", ups["small"]),
            _compatible("big", "big", ups["good"]),
            _compatible("picky", "picky", ups["refusing"]),
            {
                "model_name": "from-claude",
                "litellm_params": {
                    "model": "anthropic/claude-sonnet-4-5",
                    "api_base": ups["overloaded"].base_url,
                    "api_key": ma.API_KEY,
                },
                "model_info": {"id": "claude-overloaded"},
            },
            {
                "model_name": "claude",
                "litellm_params": {
                    "model": "anthropic/claude-sonnet-4-5",
                    "api_base": ups["anthropic"].base_url,
                    "api_key": ma.API_KEY,
                },
                "model_info": {"id": "claude-direct"},
            },
            {
                "model_name": "bedrock-claude",
                "litellm_params": {
                    "model": f"bedrock/{CLAUDE}",
                    "api_base": ups["bedrock"].base_url,
                    "aws_access_key_id": mb.ACCESS_KEY,
                    "aws_secret_access_key": mb.SECRET_KEY,
                    "aws_region_name": mb.REGION,
                },
                "model_info": {"id": "claude-bedrock"},
            },
        ],
        "router_settings": {
            "num_retries": 1,
            "fallbacks": [
                {"to-claude": ["claude"]},
                {"to-bedrock": ["bedrock-claude"]},
                {"picky": ["big"]},
                {"from-claude": ["big"]},
            ],
            "context_window_fallbacks": [{"small": ["big"]}],
        },
    }
    try:
        with running_gateway(config, tmp_path_factory.mktemp("resilience")) as gw:
            yield Env(
                gw,
                bad=ups["bad"],
                good=ups["good"],
                small=ups["small"],
                refusing=ups["refusing"],
                overloaded=ups["overloaded"],
                anthropic=ups["anthropic"],
                bedrock=bedrock,
            )
    finally:
        for up in ups.values():
            up.stop()


def test_retry_inside_a_group_answers_every_request(env: Env) -> None:
    client = env.client()
    answered_by: Counter[str] = Counter()
    retried = 0
    before = len(env.bad.requests)
    for _ in range(30):
        raw = client.chat.completions.with_raw_response.create(model="pair", messages=MESSAGES)
        assert raw.parse().choices[0].message.content == "good answer"
        answered_by[raw.headers["x-litellm-model-id"]] += 1
        retried += int(raw.headers["x-litellm-attempted-retries"])
    assert answered_by == {"good": 30}
    # The failing deployment was tried (Envoy picks at random) and each time retried on the
    # other one: one retry per request that met it first.
    tried_bad = len(env.bad.requests) - before
    assert tried_bad > 0 and retried == tried_bad


def test_fallback_to_anthropic_translates_and_signs_for_it(env: Env) -> None:
    raw = env.client().chat.completions.with_raw_response.create(
        model="to-claude", messages=MESSAGES
    )
    reply = raw.parse()
    assert reply.object == "chat.completion" and reply.choices[0].message.content
    assert raw.headers["x-litellm-model-id"] == "claude-direct"
    assert raw.headers["x-litellm-attempted-fallbacks"] == "1"
    # The group's own deployment got both of its attempts first, as OpenAI-format requests.
    tried = [r for r in env.bad.requests if r.json()["model"] == "down-1-model"]
    assert len(tried) >= 2
    assert tried[-1].headers["authorization"] == f"Bearer {OPENAI_KEY}"
    # Anthropic got its own wire format and key, and nothing of the OpenAI attempt's.
    got = env.anthropic.last()
    assert got.path == "/v1/messages"
    assert got.headers["x-api-key"] == ma.API_KEY
    assert "authorization" not in got.headers
    assert got.json()["model"] == "claude-sonnet-4-5"


def test_streamed_fallback_to_anthropic(env: Env) -> None:
    stream = env.client().chat.completions.create(model="to-claude", messages=MESSAGES, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def test_fallback_to_bedrock_is_signed_per_attempt(env: Env) -> None:
    failures_before = list(env.bedrock.failures)
    for stream in (False, True):
        if stream:
            chunks = list(
                env.client().chat.completions.create(
                    model="to-bedrock", messages=MESSAGES, stream=True
                )
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            raw = env.client().chat.completions.with_raw_response.create(
                model="to-bedrock", messages=MESSAGES
            )
            assert raw.parse().choices[0].message.content
            assert raw.headers["x-litellm-model-id"] == "claude-bedrock"
    # SigV4 recomputed by the mock over what it received: valid for both attempts.
    assert env.bedrock.failures == failures_before == []


def test_context_window_error_goes_to_the_context_window_fallback(env: Env) -> None:
    raw = env.client().chat.completions.with_raw_response.create(model="small", messages=MESSAGES)
    assert raw.parse().choices[0].message.content == "good answer"
    assert raw.headers["x-litellm-model-id"] == "big"
    assert env.small.requests


def test_a_client_error_is_not_retried_or_fallen_back(env: Env) -> None:
    good_before, picky_before = len(env.good.requests), len(env.refusing.requests)
    with pytest.raises(openai.BadRequestError) as err:
        env.client().chat.completions.create(model="picky", messages=MESSAGES)
    assert "temperature must be at most 2" in str(err.value)
    assert len(env.refusing.requests) == picky_before + 1  # one attempt
    assert len(env.good.requests) == good_before  # no fallback for the client's own mistake


def test_fallback_from_anthropic_to_openai_format_leaves_nothing_of_anthropic(env: Env) -> None:
    raw = env.client().chat.completions.with_raw_response.create(
        model="from-claude", messages=MESSAGES
    )
    assert raw.parse().choices[0].message.content == "good answer"
    assert raw.headers["x-litellm-model-id"] == "big"
    # The Anthropic attempts went to Anthropic's path with its key ...
    tried = env.overloaded.requests
    assert len(tried) == 2 and tried[-1].path == "/v1/messages"
    assert tried[-1].headers["x-api-key"] == ma.API_KEY
    # ... and the OpenAI-format attempt after them to its own path, with its own key and
    # none of Anthropic's headers (they persist across Envoy's attempts unless removed).
    got = env.good.last()
    assert got.path == "/v1/chat/completions"
    assert got.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "x-api-key" not in got.headers and "anthropic-version" not in got.headers
    assert got.json()["model"] == "big-model"
