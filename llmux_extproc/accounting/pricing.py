"""Per-token prices from LiteLLM's table, shipped as llmux_extproc/data/model_prices.json.

The table (~5k models) is parsed once, on first lookup, so importing this module is free.
See scripts/refresh_data.py for where the data comes from.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

import orjson

from llmux_extproc.accounting.usage import Usage

_LIMIT_FIELDS = ("max_input_tokens", "max_output_tokens")

# Bedrock cross-region inference profiles ("us.anthropic.claude-..."). LiteLLM lists most of
# them, some with a regional uplift (~10%); for the others the base model id's price is the
# best guess we have.
_BEDROCK_GEO_PREFIX = re.compile(r"^(?:us|us-gov|eu|apac|au|jp|in|global)\.(?=[a-z0-9-]+\.)")


@dataclass(slots=True, frozen=True)
class ModelPrice:
    """USD per token; None where LiteLLM gives no price (counted as free in cost())."""

    input_cost_per_token: float | None = None
    output_cost_per_token: float | None = None
    cache_read_input_token_cost: float | None = None
    cache_creation_input_token_cost: float | None = None
    output_cost_per_reasoning_token: float | None = None
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None

    @classmethod
    def from_entry(cls, entry: Mapping[str, object]) -> ModelPrice:
        """Build from a LiteLLM table entry, ignoring unknown keys and mistyped values."""
        return cls(
            input_cost_per_token=_number(entry.get("input_cost_per_token")),
            output_cost_per_token=_number(entry.get("output_cost_per_token")),
            cache_read_input_token_cost=_number(entry.get("cache_read_input_token_cost")),
            cache_creation_input_token_cost=_number(entry.get("cache_creation_input_token_cost")),
            output_cost_per_reasoning_token=_number(entry.get("output_cost_per_reasoning_token")),
            max_input_tokens=_integer(entry.get("max_input_tokens")),
            max_output_tokens=_integer(entry.get("max_output_tokens")),
        )

    def with_overrides(self, params: Mapping[str, object]) -> ModelPrice:
        """A copy with the fields present in params replaced, e.g. per-deployment prices.

        params may be a whole LiteLLM-style litellm_params mapping: keys that are not fields
        (model, api_key, ...) are ignored. Unlike the shipped table, config is validated:
        prices must be numbers >= 0 and limits integers >= 0.
        """
        merged: dict[str, object] = dataclasses.asdict(self)
        for key in merged.keys() & params.keys():
            value = params[key]
            num = _integer(value) if key in _LIMIT_FIELDS else _number(value)
            if num is None or num < 0:
                raise ValueError(f"{key} must be a non-negative number, got {value!r}")
            merged[key] = value
        return ModelPrice.from_entry(merged)


def _number(value: object) -> float | None:
    # bool is an int subclass; a true "price" would be a data error, not 1 USD.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_table: dict[str, ModelPrice] | None = None
_lock = threading.Lock()


def _load() -> dict[str, ModelPrice]:
    raw = (resources.files("llmux_extproc") / "data" / "model_prices.json").read_bytes()
    entries: dict[str, dict[str, object]] = {
        k: v for k, v in orjson.loads(raw).items() if isinstance(v, dict)
    }
    table: dict[str, ModelPrice] = {}
    for model, entry in entries.items():
        # "-latest" entries hold only alias_of; follow it (a couple of hops at most).
        resolved = entry
        for _ in range(4):
            target = resolved.get("alias_of")
            if not isinstance(target, str) or target not in entries:
                break
            resolved = entries[target]
        if "alias_of" not in resolved:
            table[model] = ModelPrice.from_entry(resolved)
    return table


def _prices() -> dict[str, ModelPrice]:
    global _table
    if _table is None:
        with _lock:
            if _table is None:
                _table = _load()
    return _table


def lookup(model: str, provider: str | None = None) -> ModelPrice | None:
    """The price of model, or None if LiteLLM's table does not know it.

    provider is a LiteLLM provider prefix ("openai", "azure", "gemini", "vertex_ai",
    "bedrock", ...). Tried in order:
      1. "{provider}/{model}": azure/gpt-4o, gemini/gemini-2.5-pro, vertex_ai/claude-...@...
      2. model: gpt-4o, claude-sonnet-4-5, anthropic.claude-...-v1:0 (Bedrock ids), and
         gemini-2.5-pro (Vertex prices Gemini without a prefix)
      3. model without a leading "provider/" segment, for LiteLLM-style "anthropic/claude-..."
      4. a Bedrock id without its cross-region prefix: us.anthropic.x -> anthropic.x
    Regional Bedrock prices ("bedrock/us-east-1/...") are not consulted.
    """
    table = _prices()
    bare = model.split("/", 1)[1] if "/" in model else model
    candidates = [f"{provider}/{model}"] if provider else []
    candidates += [model, bare, _BEDROCK_GEO_PREFIX.sub("", bare)]
    for key in candidates:
        price = table.get(key)
        if price is not None:
            return price
    return None


def cost(price: ModelPrice, usage: Usage) -> float:
    """USD cost of usage; unknown (None) prices count as 0."""
    inp = price.input_cost_per_token or 0.0
    out = price.output_cost_per_token or 0.0
    cache_read = _or(price.cache_read_input_token_cost, inp)
    cache_write = _or(price.cache_creation_input_token_cost, inp)
    # prompt_tokens includes the cached and cache-write tokens; clamp in case a provider's
    # numbers do not add up, so we never bill negative tokens.
    uncached = max(usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens, 0)
    total = (
        uncached * inp + usage.cached_tokens * cache_read + usage.cache_write_tokens * cache_write
    )
    if price.output_cost_per_reasoning_token is not None:
        # completion_tokens includes reasoning_tokens.
        reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
        total += reasoning * price.output_cost_per_reasoning_token
        total += (usage.completion_tokens - reasoning) * out
    else:
        total += usage.completion_tokens * out
    return total


def _or(value: float | None, fallback: float) -> float:
    # Not `value or fallback`: an explicit 0.0 cache price means free, not "use input price".
    return fallback if value is None else value
