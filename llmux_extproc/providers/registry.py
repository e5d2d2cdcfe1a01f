"""Which LiteLLM provider prefix speaks which wire format, with its defaults.

Providers from other installed packages
---------------------------------------
A package adds providers through the entry point group `llmux.providers`; they are loaded
once, when this module is imported. The entry point's *name* is the provider prefix
(`acme` serves `litellm_params.model: acme/<model>`), and the object it names is one of:

- a `ProviderSpec`, whose `adapter` is either a built-in wire format ("openai",
  "anthropic", ...: an OpenAI-compatible server needs nothing more) or the dotted name of a
  module whose `ADAPTER` is an `Adapter` instance;
- a `(ProviderSpec, Adapter)` pair: the adapter serves the spec, and `spec.adapter` is the
  (unique, not built-in) key it is registered under.

For example, in the package's pyproject.toml:

    [project.entry-points."llmux.providers"]
    acme = "acme_llmux:PROVIDER"    # PROVIDER = (ProviderSpec("acme", "acme_llmux"), Adapter())

`spec.name` must equal the entry point's name and may not replace a built-in provider.
Each entry point is loaded and checked (its adapter imported) at startup: one that cannot
be loaded raises `ProviderPluginError` naming it, instead of failing a request later.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmux_extproc.providers.base import Adapter

ENTRY_POINT_GROUP = "llmux.providers"


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    name: str
    # Module in llmux_extproc.providers that translates for it; a dotted name is a module
    # of its own (another package's), a key registered by an entry point (see above).
    adapter: str
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


_BUILTIN_PROVIDERS = frozenset(PROVIDERS)
_BUILTIN_ADAPTERS = frozenset(spec.adapter for spec in PROVIDERS.values())


def adapter_for(spec: ProviderSpec) -> Adapter:
    # Imported on first use: the registry is imported by config, which adapters import.
    adapter = _ADAPTERS.get(spec.adapter)
    if adapter is None:
        name = spec.adapter if "." in spec.adapter else f"llmux_extproc.providers.{spec.adapter}"
        adapter = _ADAPTERS[spec.adapter] = importlib.import_module(name).ADAPTER
    return adapter


_ADAPTERS: dict[str, Adapter] = {}


def provider_header_names() -> frozenset[str]:
    """Lower-case names of every header any provider's auth or translation may set.

    A retry to another provider removes these before the next attempt sets its own, so
    nothing (an x-api-key, a SigV4 date, anthropic-version) leaks from one to the next.
    """
    global _header_names
    if _header_names is None:
        names: set[str] = set()
        for spec in PROVIDERS.values():
            adapter = adapter_for(spec)
            names |= adapter.auth_headers | adapter.auth.headers | adapter.request_headers
        _header_names = frozenset(names)
    return _header_names


_header_names: frozenset[str] | None = None


# -- providers from other packages --------------------------------------------------------


class ProviderPluginError(Exception):
    """An `llmux.providers` entry point that cannot serve; the message names it."""


_PLUGINS: dict[str, str] = {}  # provider name -> "name = value" of the entry point


def load_entry_points() -> list[str]:
    """Register the providers of every installed `llmux.providers` entry point.

    Returns their names; raises ProviderPluginError for the first one that is broken.
    Loading again (after installing a package) re-reads them all.
    """
    global _header_names
    found: dict[str, tuple[metadata.EntryPoint, ProviderSpec, Adapter | None]] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        spec, adapter = _load(ep)
        if spec.name in found:
            other = found[spec.name][0]
            raise ProviderPluginError(
                f"{_describe(ep)}: provider {spec.name!r} is also given by {_describe(other)}"
            )
        found[spec.name] = (ep, spec, adapter)
    # Registered only once all are known good: a failed start leaves the built-ins alone.
    for ep, spec, adapter in found.values():
        _register(ep, spec, adapter)
    _header_names = None
    return list(found)


def _describe(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    source = f", distribution {dist.name} {dist.version}" if dist is not None else ""
    return f"entry point {ep.name!r} ({ep.name} = {ep.value}, group {ENTRY_POINT_GROUP}{source})"


def _load(ep: metadata.EntryPoint) -> tuple[ProviderSpec, Adapter | None]:
    from llmux_extproc.providers.base import Adapter

    where = _describe(ep)
    try:
        obj = ep.load()
    except Exception as exc:
        raise ProviderPluginError(f"{where} cannot be loaded: {exc!r}") from exc
    adapter: Adapter | None = None
    if isinstance(obj, tuple) and len(obj) == 2:
        obj, adapter = obj
        if not isinstance(adapter, Adapter):
            raise ProviderPluginError(
                f"{where}: the second item of the pair is a {type(adapter).__name__}, "
                "not an llmux_extproc.providers.base.Adapter"
            )
    if not isinstance(obj, ProviderSpec):
        raise ProviderPluginError(
            f"{where} is a {type(obj).__name__}; expected a ProviderSpec or a "
            "(ProviderSpec, Adapter) pair"
        )
    if obj.name != ep.name:
        raise ProviderPluginError(f"{where} names its ProviderSpec {obj.name!r}, not {ep.name!r}")
    if obj.name in _BUILTIN_PROVIDERS:
        raise ProviderPluginError(f"{where} would replace the built-in provider {obj.name!r}")
    owner = _PLUGINS.get(obj.name)
    if owner is not None and owner != f"{ep.name} = {ep.value}":
        raise ProviderPluginError(f"{where}: provider {obj.name!r} is already given by {owner}")
    if adapter is not None:
        if obj.adapter in _BUILTIN_ADAPTERS:
            raise ProviderPluginError(
                f"{where} registers its adapter under the built-in key {obj.adapter!r}"
            )
        taken = _ADAPTERS.get(obj.adapter)
        if taken is not None and taken is not adapter:
            raise ProviderPluginError(f"{where}: adapter key {obj.adapter!r} is already used")
    else:
        try:
            # Imported now, so a missing module fails the start, not the first request.
            found = adapter_for(obj)
        except Exception as exc:
            raise ProviderPluginError(
                f"{where}: its adapter {obj.adapter!r} cannot be imported: {exc!r}"
            ) from exc
        if not isinstance(found, Adapter):
            raise ProviderPluginError(
                f"{where}: ADAPTER in {obj.adapter!r} is not an llmux_extproc Adapter"
            )
    return obj, adapter


def _register(ep: metadata.EntryPoint, spec: ProviderSpec, adapter: Adapter | None) -> None:
    if adapter is not None:
        _ADAPTERS[spec.adapter] = adapter
    PROVIDERS[spec.name] = spec
    _PLUGINS[spec.name] = f"{ep.name} = {ep.value}"


load_entry_points()
