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
    # Environment variables LiteLLM reads for the endpoint when litellm_params.api_base is
    # not set, first match wins (OPENAI_BASE_URL, AZURE_API_BASE, HOSTED_VLLM_API_BASE, ...).
    api_base_env: tuple[str, ...] = ()
    # The provider's own litellm_params keys its adapter reads (besides the common ones
    # config.py takes: model, api_base, api_key, rpm, ...); any other key is warned about by
    # name. None: not declared (a plugin), so unknown keys are not warned about.
    params: frozenset[str] | None = frozenset()


def vertex_location(params: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """As LiteLLM: vertex_location (config.py folds vertex_ai_location into it), then
    VERTEXAI_LOCATION, then VERTEX_LOCATION."""
    value = (
        params.get("vertex_location") or env.get("VERTEXAI_LOCATION") or env.get("VERTEX_LOCATION")
    )
    return str(value) if value else "us-central1"


def _vertex_base(params: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    location = vertex_location(params, env)
    if location == "global":
        return "https://aiplatform.googleapis.com"
    return f"https://{location}-aiplatform.googleapis.com"


def _bedrock_base(params: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    # LiteLLM's order (BaseAWSLLM.get_runtime_endpoint): api_base (config.py, before this),
    # aws_bedrock_runtime_endpoint, AWS_BEDROCK_RUNTIME_ENDPOINT, then the region's public
    # endpoint. A VPC or proxy endpoint is what a private network can reach at all.
    endpoint = params.get("aws_bedrock_runtime_endpoint") or env.get("AWS_BEDROCK_RUNTIME_ENDPOINT")
    if endpoint:
        return str(endpoint)
    region = (
        params.get("aws_region_name")
        or env.get("AWS_REGION")
        or env.get("AWS_DEFAULT_REGION")
        or env.get("AWS_REGION_NAME")
    )
    return f"https://bedrock-runtime.{region}.amazonaws.com" if region else None


def _compatible(
    name: str, base: str | None, key_env: str | None = None, base_env: tuple[str, ...] = ()
) -> ProviderSpec:
    return ProviderSpec(name, "openai", base, key_env, api_base_env=base_env)


_AWS_PARAMS = frozenset(
    {
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "aws_region_name",
        "aws_bedrock_runtime_endpoint",
    }
)
_VERTEX_PARAMS = frozenset({"vertex_project", "vertex_location", "vertex_credentials"})


PROVIDERS: dict[str, ProviderSpec] = {
    spec.name: spec
    for spec in (
        ProviderSpec("mock", "mock", needs_upstream=False, params=frozenset({"mock_response"})),
        ProviderSpec(
            "openai",
            "openai",
            "https://api.openai.com/v1",
            "OPENAI_API_KEY",
            api_base_env=("OPENAI_BASE_URL", "OPENAI_API_BASE"),
        ),
        ProviderSpec(
            "anthropic",
            "anthropic",
            "https://api.anthropic.com",
            "ANTHROPIC_API_KEY",
            api_base_env=("ANTHROPIC_API_BASE", "ANTHROPIC_BASE_URL"),
        ),
        ProviderSpec(
            "gemini",
            "gemini",
            "https://generativelanguage.googleapis.com",
            "GEMINI_API_KEY",
            api_base_env=("GEMINI_API_BASE",),
            params=frozenset({"safety_settings"}),
        ),
        ProviderSpec(
            "vertex_ai",
            "vertex",
            derive_api_base=_vertex_base,
            api_base_env=("VERTEXAI_API_BASE", "VERTEX_API_BASE"),
            params=_VERTEX_PARAMS | {"safety_settings"},
        ),
        ProviderSpec(
            "azure",
            "azure",
            None,
            "AZURE_API_KEY",
            api_base_env=("AZURE_API_BASE",),
            params=frozenset({"api_version", "azure_ad_token"}),
        ),
        ProviderSpec("bedrock", "bedrock", derive_api_base=_bedrock_base, params=_AWS_PARAMS),
        # OpenAI-compatible servers: same wire format, another base URL and key.
        _compatible("openai_compatible", None),
        _compatible("hosted_vllm", None, base_env=("HOSTED_VLLM_API_BASE",)),
        _compatible("vllm", None, base_env=("VLLM_API_BASE",)),
        _compatible("ollama", "http://localhost:11434/v1", base_env=("OLLAMA_API_BASE",)),
        _compatible("ollama_chat", "http://localhost:11434/v1", base_env=("OLLAMA_API_BASE",)),
        _compatible("lm_studio", "http://localhost:1234/v1", base_env=("LM_STUDIO_API_BASE",)),
        _compatible("groq", "https://api.groq.com/openai/v1", "GROQ_API_KEY", ("GROQ_API_BASE",)),
        _compatible(
            "mistral", "https://api.mistral.ai/v1", "MISTRAL_API_KEY", ("MISTRAL_API_BASE",)
        ),
        _compatible(
            "deepseek", "https://api.deepseek.com/v1", "DEEPSEEK_API_KEY", ("DEEPSEEK_API_BASE",)
        ),
        _compatible(
            "openrouter",
            "https://openrouter.ai/api/v1",
            "OPENROUTER_API_KEY",
            ("OPENROUTER_API_BASE",),
        ),
        _compatible(
            "together_ai",
            "https://api.together.xyz/v1",
            "TOGETHERAI_API_KEY",
            ("TOGETHER_AI_API_BASE",),
        ),
        _compatible(
            "fireworks_ai",
            "https://api.fireworks.ai/inference/v1",
            "FIREWORKS_API_KEY",
            ("FIREWORKS_API_BASE", "FIREWORKS_AI_API_BASE"),
        ),
        _compatible("xai", "https://api.x.ai/v1", "XAI_API_KEY", ("XAI_API_BASE",)),
        _compatible(
            "deepinfra",
            "https://api.deepinfra.com/v1/openai",
            "DEEPINFRA_API_KEY",
            ("DEEPINFRA_API_BASE",),
        ),
        _compatible(
            "perplexity",
            "https://api.perplexity.ai",
            "PERPLEXITYAI_API_KEY",
            ("PERPLEXITY_API_BASE",),
        ),
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
