"""Which LiteLLM provider prefix speaks which wire format, with its defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmux_extproc.providers.base import Adapter


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    name: str
    adapter: str  # module in llmux_extproc.providers that translates for it
    default_api_base: str | None = None
    api_key_env: str | None = None  # read when litellm_params.api_key is absent, as LiteLLM does
    needs_upstream: bool = True


def _compatible(name: str, base: str | None, key_env: str | None = None) -> ProviderSpec:
    return ProviderSpec(name, "openai", base, key_env)


PROVIDERS: dict[str, ProviderSpec] = {
    spec.name: spec
    for spec in (
        ProviderSpec("mock", "mock", needs_upstream=False),
        ProviderSpec("openai", "openai", "https://api.openai.com/v1", "OPENAI_API_KEY"),
        # OpenAI-compatible servers: same wire format, another base URL and key.
        _compatible("openai_compatible", None),
        _compatible("hosted_vllm", None),
        _compatible("vllm", None),
        _compatible("ollama", "http://localhost:11434/v1"),
        _compatible("ollama_chat", "http://localhost:11434/v1"),
        _compatible("lm_studio", "http://localhost:1234/v1"),
        _compatible("groq", "https://api.groq.com/openai/v1", "GROQ_API_KEY"),
        _compatible("mistral", "https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
        _compatible("deepseek", "https://api.deepseek.com/v1", "DEEPSEEK_API_KEY"),
        _compatible("openrouter", "https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
        _compatible("together_ai", "https://api.together.xyz/v1", "TOGETHERAI_API_KEY"),
        _compatible("fireworks_ai", "https://api.fireworks.ai/inference/v1", "FIREWORKS_API_KEY"),
        _compatible("xai", "https://api.x.ai/v1", "XAI_API_KEY"),
        _compatible("deepinfra", "https://api.deepinfra.com/v1/openai", "DEEPINFRA_API_KEY"),
        _compatible("perplexity", "https://api.perplexity.ai", "PERPLEXITYAI_API_KEY"),
    )
}


def adapter_for(spec: ProviderSpec) -> Adapter:
    # Imported on first use: registry is imported by config, which adapters import.
    if not _ADAPTERS:
        _ADAPTERS.update(_load_adapters())
    return _ADAPTERS[spec.adapter]


def _load_adapters() -> dict[str, Adapter]:
    import importlib

    names = {spec.adapter for spec in PROVIDERS.values()}
    return {
        name: importlib.import_module(f"llmux_extproc.providers.{name}").ADAPTER for name in names
    }


_ADAPTERS: dict[str, Adapter] = {}
