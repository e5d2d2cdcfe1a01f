"""Price table lookup and cost arithmetic, checked against the shipped JSON read independently."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmux_extproc.accounting import pricing
from llmux_extproc.accounting.pricing import ModelPrice, cost, lookup
from llmux_extproc.accounting.usage import Usage

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "llmux_extproc" / "data"
RAW: dict[str, dict[str, Any]] = json.loads((DATA / "model_prices.json").read_text())


def test_gpt_4o_matches_json() -> None:
    raw = RAW["gpt-4o"]
    price = lookup("gpt-4o")
    assert price is not None
    assert price.input_cost_per_token == raw["input_cost_per_token"]
    assert price.output_cost_per_token == raw["output_cost_per_token"]
    assert price.cache_read_input_token_cost == raw["cache_read_input_token_cost"]
    assert price.max_input_tokens == raw["max_input_tokens"]
    usage = Usage(prompt_tokens=1000, completion_tokens=500)
    expected = 1000 * raw["input_cost_per_token"] + 500 * raw["output_cost_per_token"]
    assert cost(price, usage) == pytest.approx(expected, rel=1e-12)
    assert cost(price, usage) > 0


def test_cached_tokens_billed_at_cache_read_price() -> None:
    raw = RAW["gpt-4o"]
    price = lookup("gpt-4o")
    assert price is not None
    usage = Usage(prompt_tokens=1000, cached_tokens=400, completion_tokens=100)
    expected = (
        600 * raw["input_cost_per_token"]
        + 400 * raw["cache_read_input_token_cost"]
        + 100 * raw["output_cost_per_token"]
    )
    assert cost(price, usage) == pytest.approx(expected, rel=1e-12)
    assert cost(price, usage) < cost(price, Usage(prompt_tokens=1000, completion_tokens=100))


def test_cache_write_billed_at_cache_creation_price() -> None:
    raw = RAW["claude-sonnet-4-5"]
    price = lookup("claude-sonnet-4-5")
    assert price is not None
    usage = Usage(prompt_tokens=1000, cached_tokens=200, cache_write_tokens=300)
    expected = (
        500 * raw["input_cost_per_token"]
        + 200 * raw["cache_read_input_token_cost"]
        + 300 * raw["cache_creation_input_token_cost"]
    )
    assert cost(price, usage) == pytest.approx(expected, rel=1e-12)


def test_reasoning_split() -> None:
    price = ModelPrice(
        input_cost_per_token=1.0, output_cost_per_token=2.0, output_cost_per_reasoning_token=5.0
    )
    usage = Usage(prompt_tokens=3, completion_tokens=10, reasoning_tokens=4)
    assert cost(price, usage) == 3 * 1.0 + 6 * 2.0 + 4 * 5.0
    # Without a reasoning price, reasoning tokens are ordinary output tokens.
    plain = ModelPrice(input_cost_per_token=1.0, output_cost_per_token=2.0)
    assert cost(plain, usage) == 3 * 1.0 + 10 * 2.0


def test_reasoning_price_from_table() -> None:
    raw = RAW["dashscope/qwen-turbo"]
    assert raw["output_cost_per_reasoning_token"] != raw["output_cost_per_token"]
    price = lookup("qwen-turbo", "dashscope")
    assert price is not None
    usage = Usage(prompt_tokens=100, completion_tokens=50, reasoning_tokens=30)
    expected = (
        100 * raw["input_cost_per_token"]
        + 20 * raw["output_cost_per_token"]
        + 30 * raw["output_cost_per_reasoning_token"]
    )
    assert cost(price, usage) == pytest.approx(expected, rel=1e-12)


def test_cache_prices_fall_back_to_input_price() -> None:
    price = ModelPrice(input_cost_per_token=1.0, output_cost_per_token=2.0)
    usage = Usage(prompt_tokens=10, cached_tokens=3, cache_write_tokens=2, completion_tokens=1)
    assert cost(price, usage) == 10 * 1.0 + 1 * 2.0
    # An explicit zero cache price is free, not "unknown".
    free_cache = ModelPrice(input_cost_per_token=1.0, cache_read_input_token_cost=0.0)
    assert cost(free_cache, Usage(prompt_tokens=10, cached_tokens=3)) == 7.0


def test_inconsistent_usage_never_bills_negative_tokens() -> None:
    price = ModelPrice(input_cost_per_token=1.0, cache_read_input_token_cost=0.5)
    assert cost(price, Usage(prompt_tokens=2, cached_tokens=4)) == 4 * 0.5
    assert cost(ModelPrice(), Usage(prompt_tokens=5, completion_tokens=5)) == 0.0


def test_missing_model_is_none() -> None:
    assert lookup("definitely-not-a-model-xyz") is None
    assert lookup("definitely-not-a-model-xyz", "openai") is None


@pytest.mark.parametrize(
    ("model", "provider", "key"),
    [
        ("gpt-4o", "azure", "azure/gpt-4o"),
        ("gemini-2.5-pro", "gemini", "gemini/gemini-2.5-pro"),
        ("gemini-2.5-pro", "vertex_ai", "gemini-2.5-pro"),
        ("claude-3-5-sonnet@20240620", "vertex_ai", "vertex_ai/claude-3-5-sonnet@20240620"),
        ("anthropic.claude-3-5-sonnet-20240620-v1:0", "bedrock", None),
        ("us.anthropic.claude-sonnet-4-6", "bedrock", None),
        ("anthropic/claude-sonnet-4-5", None, "claude-sonnet-4-5"),
    ],
)
def test_lookup_key_styles(model: str, provider: str | None, key: str | None) -> None:
    price = lookup(model, provider)
    assert price == ModelPrice.from_entry(RAW[key or model])


def test_lookup_prefers_provider_specific_entry() -> None:
    # Vertex and Gemini API list different max_output_tokens for the same model name.
    assert RAW["gemini/gemini-2.5-pro"] != RAW["gemini-2.5-pro"]
    assert lookup("gemini-2.5-pro", "gemini") == ModelPrice.from_entry(RAW["gemini/gemini-2.5-pro"])


def test_bedrock_geo_prefix_falls_back_to_base_model() -> None:
    base = "anthropic.claude-3-5-sonnet-20240620-v1:0"
    assert f"jp.{base}" not in RAW  # otherwise this would not exercise the fallback
    assert lookup(f"jp.{base}", "bedrock") == ModelPrice.from_entry(RAW[base])


def test_alias_entries_resolve_to_target() -> None:
    target = RAW["claude-opus-latest"]["alias_of"]
    assert "input_cost_per_token" not in RAW["claude-opus-latest"]
    price = lookup("claude-opus-latest")
    assert price is not None
    assert price == ModelPrice.from_entry(RAW[target])


def test_overrides() -> None:
    base = lookup("gpt-4o")
    assert base is not None
    params: dict[str, object] = {
        "model": "azure/my-deployment",
        "api_key": "k",
        "input_cost_per_token": 1e-6,
        "max_output_tokens": 4096,
    }
    price = base.with_overrides(params)
    assert price.input_cost_per_token == 1e-6
    assert price.max_output_tokens == 4096
    assert price.output_cost_per_token == base.output_cost_per_token
    assert base.input_cost_per_token == RAW["gpt-4o"]["input_cost_per_token"]  # copy, not mutated
    # An unknown deployment can be priced from config alone.
    custom = ModelPrice().with_overrides({"input_cost_per_token": 1, "output_cost_per_token": 2})
    assert cost(custom, Usage(prompt_tokens=3, completion_tokens=4)) == 11.0


@pytest.mark.parametrize(
    "bad",
    [
        {"input_cost_per_token": "0.001"},
        {"input_cost_per_token": -1.0},
        {"output_cost_per_token": True},
        {"max_input_tokens": 1.5},
    ],
)
def test_bad_overrides_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ModelPrice().with_overrides(bad)


def test_table_loaded_lazily() -> None:
    code = "import llmux_extproc.accounting.pricing as p; assert p._table is None"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    lookup("gpt-4o")
    assert pricing._table is not None and len(pricing._table) > 1000


def test_shipped_data_matches_source_txt() -> None:
    listed = 0
    for line in (DATA / "SOURCE.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name
            listed += 1
    assert listed == 3
