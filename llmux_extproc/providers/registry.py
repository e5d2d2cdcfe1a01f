"""Which LiteLLM provider prefix speaks which wire format, with its defaults."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmux_extproc.providers.base import Adapter


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    name: str
    adapter: str  # module in llmux_extproc.providers that translates for it
    default_api_base: str | None = None
    api_key_env: str | None = None  # read when litellm_params.api_key is absent, as LiteLLM does
    needs_upstream: bool = True
    # Providers whose host depends on other params (region, location) derive it from them.
    derive_api_base: Callable[[Mapping[str, Any], Mapping[str, str]], str | None] | None = None


def _vertex_base(params: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    location = params.get("vertex_location") or env.get("VERTEXAI_LOCATION") or "us-central1"
    if location == "global":
        return "https://aiplatform.googleapis.com"
    return f"https://{location}-aiplatform.googleapis.com"


def _bedrock_base(params: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    region = (
        params.get("aws_region_name")
        or env.get("AWS_REGION")
        or env.get("AWS_DEFAULT_REGION")
        or env.get("AWS_REGION_NAME")
    )
    return f"https://bedrock-runtime.{region}.amazonaws.com" if region else None


def _compatible(name: str, base: str | None, key_env: str | None = None) -> ProviderSpec:
    return ProviderSpec(name, "openai", base, key_env)


PROVIDERS: dict[str, ProviderSpec] = {
    spec.name: spec
    for spec in (
        ProviderSpec("mock", "mock", needs_upstream=False),
        ProviderSpec("openai", "openai", "https://api.openai.com/v1", "OPENAI_API_KEY"),
        ProviderSpec("anthropic", "anthropic", "https://api.anthropic.com", "ANTHROPIC_API_KEY"),
        ProviderSpec(
            "gemini", "gemini", "https://generativelanguage.googleapis.com", "GEMINI_API_KEY"
        ),
        ProviderSpec("vertex_ai", "vertex", derive_api_base=_vertex_base),
        ProviderSpec("azure", "azure", None, "AZURE_API_KEY"),
        ProviderSpec("bedrock", "bedrock", derive_api_base=_bedrock_base),
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
    # Imported on first use: the registry is imported by config, which adapters import.
    adapter = _ADAPTERS.get(spec.adapter)
    if adapter is None:
        module = importlib.import_module(f"llmux_extproc.providers.{spec.adapter}")
        adapter = _ADAPTERS[spec.adapter] = module.ADAPTER
    return adapter


_ADAPTERS: dict[str, Adapter] = {}
