"""Cost: the response header and the spend metric equal the price table's arithmetic."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from llmux_extproc.accounting import pricing
from tests.harness import Gateway, MockUpstream, running_gateway
from tests.mock_anthropic import API_KEY, MOCK_USAGE, AnthropicMock

pytestmark = pytest.mark.e2e
MODEL = "claude-sonnet-4-5-20250929"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    upstream = MockUpstream(AnthropicMock()).start()
    config = {
        "model_list": [
            {
                "model_name": "claude",
                "litellm_params": {
                    "model": f"anthropic/{MODEL}",
                    "api_base": upstream.base_url,
                    "api_key": API_KEY,
                },
            },
            {
                "model_name": "claude-discounted",
                "litellm_params": {
                    "model": f"anthropic/{MODEL}",
                    "api_base": upstream.base_url,
                    "api_key": API_KEY,
                    "input_cost_per_token": 0.000001,
                    "output_cost_per_token": 0.000002,
                },
            },
        ]
    }
    with running_gateway(config, tmp_path_factory.mktemp("cost")) as gw:
        yield gw
    upstream.stop()


def expected_cost(price: pricing.ModelPrice) -> float:
    # Anthropic reports uncached input, cache reads and cache writes separately.
    assert price.input_cost_per_token is not None and price.output_cost_per_token is not None
    read = price.cache_read_input_token_cost
    write = price.cache_creation_input_token_cost
    return (
        MOCK_USAGE["input_tokens"] * price.input_cost_per_token
        + MOCK_USAGE["cache_read_input_tokens"]
        * (read if read is not None else price.input_cost_per_token)
        + MOCK_USAGE["cache_creation_input_tokens"]
        * (write if write is not None else price.input_cost_per_token)
        + MOCK_USAGE["output_tokens"] * price.output_cost_per_token
    )


def call(gateway: Gateway, model: str) -> float:
    client = openai.OpenAI(base_url=gateway.openai_base, api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hello"}]
    )
    usage = raw.parse().usage
    assert usage is not None
    assert usage.prompt_tokens == 11 + 5 + 3
    assert (
        usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 5
    )
    assert raw.headers["x-litellm-response-cost"] == raw.headers["x-llmux-response-cost"]
    return float(raw.headers["x-llmux-response-cost"])


def test_cost_header_is_the_price_tables_arithmetic(gateway: Gateway) -> None:
    price = pricing.lookup(MODEL, "anthropic")
    assert (
        price is not None
        and price.cache_read_input_token_cost
        and price.cache_creation_input_token_cost
    )
    assert call(gateway, "claude") == pytest.approx(expected_cost(price), rel=1e-9, abs=1e-15)


def test_per_deployment_price_override(gateway: Gateway) -> None:
    table = pricing.lookup(MODEL, "anthropic")
    assert table is not None
    overridden = table.with_overrides(
        {"input_cost_per_token": 0.000001, "output_cost_per_token": 0.000002}
    )
    cost = call(gateway, "claude-discounted")
    assert cost == pytest.approx(expected_cost(overridden), rel=1e-9, abs=1e-15)
    assert cost != pytest.approx(expected_cost(table))


def test_spend_metric_sums_the_costs(gateway: Gateway) -> None:
    def spend() -> float:
        for line in gateway.metrics().splitlines():
            if line.startswith('llm_spend_total{model="claude",team="default"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = spend()
    costs = [call(gateway, "claude") for _ in range(3)]
    assert spend() - before == pytest.approx(sum(costs), rel=1e-9)


def test_openai_format_cost_is_computed_in_envoy_with_the_same_arithmetic(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """OpenAI-format answers are costed by response.lua inside Envoy; it must agree with
    pricing.cost, cached and reasoning tokens included, to the last digit that matters."""
    from aiohttp import web

    from tests.harness import json_response

    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1024},
        "completion_tokens_details": {"reasoning_tokens": 200},
    }

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        return json_response(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 1,
                "model": "o3-mini",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )

    upstream = MockUpstream(handler).start()
    config = {
        "model_list": [
            {
                "model_name": "o3",
                "litellm_params": {
                    "model": "openai/o3-mini",
                    "api_base": f"{upstream.base_url}/v1",
                    "api_key": "k",
                },
            }
        ]
    }
    try:
        with running_gateway(config, tmp_path_factory.mktemp("lua-cost")) as gw:
            client = openai.OpenAI(base_url=gw.openai_base, api_key="x", max_retries=0)
            raw = client.chat.completions.with_raw_response.create(
                model="o3", messages=[{"role": "user", "content": "hi"}]
            )
            price = pricing.lookup("o3-mini", "openai")
            assert price is not None and price.cache_read_input_token_cost is not None
            from llmux_extproc.accounting.usage import Usage

            expected = pricing.cost(price, Usage.from_openai(usage))
            assert expected > 0
            assert float(raw.headers["x-llmux-response-cost"]) == pytest.approx(expected, rel=1e-12)
            # The spend metric is fed from the same answer through Envoy's access log.
            text = gw.metrics_when(lambda m: 'llm_spend_total{model="o3"' in m)
            spend = next(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith('llm_spend_total{model="o3"')
            )
            assert spend == pytest.approx(expected, rel=1e-9)
    finally:
        upstream.stop()
