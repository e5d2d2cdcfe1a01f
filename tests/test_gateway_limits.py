"""Admission once per request, settlement once per answer, in the gateway's own logic (no
Envoy, no gRPC): a real limiter on dicts, a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from llmux_extproc.accounting.usage import Usage
from llmux_extproc.control.config import parse_config
from llmux_extproc.dataplane.context import Attempt, Caller, RequestContext
from llmux_extproc.dataplane.gateway import Forward, Gateway, Immediate
from llmux_extproc.policy.bulkhead import Bulkhead
from llmux_extproc.policy.keys import Limits, Principal
from llmux_extproc.policy.limits import LocalLimiter, MemoryState

CONFIG = """
model_list:
  - model_name: gpt
    litellm_params: {model: openai/gpt-4o-2024-08-06, api_key: sk-up}
  - model_name: mock
    litellm_params: {model: mock/gpt-4o-mini, mock_response: "fixed answer"}
general_settings: {master_key: sk-master}
"""
KEY = Principal(token="k" * 64, key_alias="ci", limits=Limits(rpm_limit=2, tpm_limit=10_000))
BODY = orjson.dumps({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]})


class Clock:
    now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def run(gw: Gateway, number: int, rid: str, model: str = "gpt") -> Immediate | Forward:
    gw.loop = asyncio.get_running_loop()
    dep = gw.state.config.group(model)[0]
    ctx = RequestContext(Caller.of(KEY), Attempt(number, dep), rid)
    raw = BODY.replace(b'"gpt"', f'"{model}"'.encode())
    decision = await gw.on_body("/v1/chat/completions", raw, ctx)
    await asyncio.sleep(0)  # settlements run as tasks
    await asyncio.gather(*gw._settling)
    return decision


def gateway() -> tuple[Gateway, MemoryState]:
    gw = Gateway(parse_config(CONFIG))
    state = MemoryState()
    gw.limiter = LocalLimiter(state, Clock())
    return gw, state


def test_the_first_attempt_admits_a_retry_does_not() -> None:
    async def scenario() -> None:
        gw, state = gateway()
        first = await run(gw, 1, "r1")
        assert isinstance(first, Forward)
        assert first.exchange.limit_headers["x-ratelimit-remaining-requests"] == "1"
        assert "r1" in state.reservations
        retry = await run(gw, 2, "r1")  # the same request, attempt 2: not admitted again
        assert isinstance(retry, Forward)
        assert retry.exchange.settle_id == "r1"
        assert retry.exchange.limit_headers["x-ratelimit-remaining-requests"] == "1"
        # The retry's answer settles the first attempt's reservation, with the real usage.
        action = gw._account(
            retry.exchange, 200, Usage(prompt_tokens=10, completion_tokens=5), None
        )
        assert action.headers["x-ratelimit-limit-tokens"] == "10000"
        await asyncio.gather(*gw._settling)
        assert "r1" not in state.reservations
        tokens, _ = state.buckets[f"api_key:{KEY.token}:tokens"]
        assert tokens == 10_000 - 15
        second = await run(gw, 1, "r2")
        assert isinstance(second, Forward)
        third = await run(gw, 1, "r3")  # rpm_limit 2: the third request is refused
        assert isinstance(third, Immediate) and third.status == 429
        assert third.headers["retry-after"] == "30"
        assert orjson.loads(third.body)["error"]["param"] == "rpm_limit"

    asyncio.run(scenario())


def test_an_answer_the_processor_gives_settles_at_once() -> None:
    async def scenario() -> None:
        gw, state = gateway()
        answer = await run(gw, 1, "m1", model="mock")
        assert isinstance(answer, Immediate) and answer.status == 200
        assert answer.headers["x-ratelimit-remaining-requests"] == "1"
        assert state.reservations == {}  # settled with the mock's real usage

    asyncio.run(scenario())


def test_a_request_refused_after_admission_is_released(tmp_path: Path) -> None:
    """The deployment's own bulkhead refuses after the key's limits admitted: the
    reservation is given back at once, not left to expire."""

    async def scenario() -> None:
        gw = Gateway(
            parse_config(
                CONFIG.replace("api_key: sk-up}", "api_key: sk-up, max_parallel_requests: 1}")
            )
        )
        state = MemoryState()
        gw.limiter = LocalLimiter(state, Clock())
        gw.bulkhead = Bulkhead(tmp_path / "bulkheads", 0, 1)
        held = await run(gw, 1, "holds")
        assert isinstance(held, Forward) and held.held
        refused = await run(gw, 1, "refused")
        assert isinstance(refused, Immediate) and refused.status == 429
        assert orjson.loads(refused.body)["error"]["code"] == "max_parallel_requests"
        assert list(state.reservations) == ["holds"]

    asyncio.run(scenario())
