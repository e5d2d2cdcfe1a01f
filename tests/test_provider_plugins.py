"""Providers from other installed packages, through the `llmux.providers` entry points.

Nothing is installed: the tests hand `importlib.metadata.entry_points` their own entry
points, or put a dist-info directory on sys.path, and check that the provider becomes
usable (PROVIDERS, adapter_for, config) and that a broken one is named in the error.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import pytest

from llmux_extproc.control.config import Deployment, parse_config
from llmux_extproc.providers import registry
from llmux_extproc.providers.auth import APIKeyHeader
from llmux_extproc.providers.base import Adapter, ClientRequest, UpstreamRequest
from llmux_extproc.providers.registry import ProviderPluginError, ProviderSpec

GROUP = registry.ENTRY_POINT_GROUP
HERE = __name__


class AcmeAdapter(Adapter):
    """What a company's own adapter looks like: a translation and its auth."""

    name = "acme"
    auth = APIKeyHeader("x-acme-key")
    auth_headers = auth.headers
    request_headers = frozenset({"content-type", "x-acme-trace"})

    def translate(self, req: ClientRequest, dep: Deployment) -> UpstreamRequest:
        assert dep.upstream is not None
        body = orjson.dumps({"prompt": req.body["messages"][-1]["content"], "model": dep.model})
        headers = {"content-type": "application/json", "x-acme-trace": "1"}
        return UpstreamRequest(dep.upstream.base_path + "/generate", headers, body)


ADAPTER = AcmeAdapter()  # the module-level ADAPTER a dotted `ProviderSpec.adapter` names
PAIR = (ProviderSpec("acme", "acme-adapter", "https://llm.acme.example/api", "ACME_KEY"), ADAPTER)
COMPATIBLE = ProviderSpec("acme_openai", "openai", "https://openai.acme.example/v1")
DOTTED = ProviderSpec("acme_dotted", HERE, "https://llm.acme.example/api")
MISNAMED = ProviderSpec("other", "openai", "https://x.example/v1")
SHADOWING = ProviderSpec("openai", "openai", "https://evil.example/v1")
NO_ADAPTER_MODULE = ProviderSpec("acme_gone", "acme_not_installed.adapter", "https://x.example")
NOT_A_SPEC = {"name": "acme"}
BAD_PAIR = (ProviderSpec("acme_bad", "acme-bad", "https://x.example"), object())


@pytest.fixture(autouse=True)
def restore_registry() -> Iterator[None]:
    providers, adapters = dict(registry.PROVIDERS), dict(registry._ADAPTERS)
    plugins, names = dict(registry._PLUGINS), registry._header_names
    yield
    # In place: config holds the same PROVIDERS dict.
    registry.PROVIDERS.clear()
    registry.PROVIDERS.update(providers)
    registry._ADAPTERS.clear()
    registry._ADAPTERS.update(adapters)
    registry._PLUGINS.clear()
    registry._PLUGINS.update(plugins)
    registry._header_names = names


def use_entry_points(monkeypatch: pytest.MonkeyPatch, **targets: str) -> None:
    points = metadata.EntryPoints(
        metadata.EntryPoint(name, value, GROUP) for name, value in targets.items()
    )

    def entry_points(**params: Any) -> metadata.EntryPoints:
        assert params == {"group": GROUP}
        return points

    monkeypatch.setattr(metadata, "entry_points", entry_points)


def deployment(model: str, **params: Any) -> Deployment:
    config = {"model_list": [{"model_name": "m", "litellm_params": {"model": model, **params}}]}
    return parse_config(orjson.dumps(config).decode()).deployments[0]


def chat() -> ClientRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return ClientRequest("chat", body, orjson.dumps(body), "m")


def test_a_provider_with_its_own_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    use_entry_points(monkeypatch, acme=f"{HERE}:PAIR")
    before = registry.provider_header_names()
    assert registry.load_entry_points() == ["acme"]
    spec = registry.PROVIDERS["acme"]
    assert spec is PAIR[0] and registry.adapter_for(spec) is ADAPTER
    # The config accepts the new prefix, and a request goes through its adapter and auth.
    dep = deployment("acme/acme-large", api_key="k-acme")
    up = registry.adapter_for(dep.spec).request(chat(), dep)
    assert up.path == "/api/generate"
    assert up.headers == {
        "content-type": "application/json",
        "x-acme-trace": "1",
        "x-acme-key": "k-acme",
    }
    assert orjson.loads(up.body or b"") == {"prompt": "hi", "model": "acme-large"}
    # Its headers join the set a retry removes.
    assert registry.provider_header_names() == before | {"x-acme-key", "x-acme-trace"}


def test_a_spec_for_a_built_in_wire_format_or_a_module(monkeypatch: pytest.MonkeyPatch) -> None:
    use_entry_points(monkeypatch, acme_openai=f"{HERE}:COMPATIBLE", acme_dotted=f"{HERE}:DOTTED")
    assert registry.load_entry_points() == ["acme_openai", "acme_dotted"]
    dep = deployment("acme_openai/llama-70b", api_key="sk")
    up = registry.adapter_for(dep.spec).request(chat(), dep)
    assert up.path == "/v1/chat/completions" and up.headers["authorization"] == "Bearer sk"
    assert registry.adapter_for(registry.PROVIDERS["acme_dotted"]) is ADAPTER


def test_loading_again_is_harmless(monkeypatch: pytest.MonkeyPatch) -> None:
    use_entry_points(monkeypatch, acme=f"{HERE}:PAIR")
    registry.load_entry_points()
    assert registry.load_entry_points() == ["acme"]


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("acme", "acme_not_installed:PAIR", "cannot be loaded: ModuleNotFoundError"),
        ("acme", f"{HERE}:MISSING", "cannot be loaded: AttributeError"),
        ("acme", f"{HERE}:NOT_A_SPEC", "is a dict; expected a ProviderSpec"),
        ("acme_bad", f"{HERE}:BAD_PAIR", "not an llmux_extproc.providers.base.Adapter"),
        ("acme", f"{HERE}:MISNAMED", "names its ProviderSpec 'other', not 'acme'"),
        ("openai", f"{HERE}:SHADOWING", "would replace the built-in provider 'openai'"),
        ("acme_gone", f"{HERE}:NO_ADAPTER_MODULE", "its adapter 'acme_not_installed.adapter'"),
    ],
)
def test_a_broken_entry_point_is_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, why: str
) -> None:
    use_entry_points(monkeypatch, **{name: value})
    providers = dict(registry.PROVIDERS)
    with pytest.raises(ProviderPluginError) as info:
        registry.load_entry_points()
    message = str(info.value)
    assert f"entry point {name!r} ({name} = {value}, group llmux.providers)" in message
    assert why in message
    assert providers == registry.PROVIDERS  # nothing half-registered
    assert registry.PROVIDERS["openai"].default_api_base == "https://api.openai.com/v1"


def test_two_packages_cannot_give_the_same_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    use_entry_points(monkeypatch, acme=f"{HERE}:PAIR")
    registry.load_entry_points()
    use_entry_points(monkeypatch, acme="other_package:PAIR")
    monkeypatch.setitem(sys.modules, "other_package", sys.modules[HERE])
    with pytest.raises(ProviderPluginError, match="already given by acme = "):
        registry.load_entry_points()


def test_an_installed_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real dist-info on sys.path, found by importlib.metadata itself."""
    dist = tmp_path / "acme_llmux-1.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-llmux\nVersion: 1.2\n")
    (dist / "entry_points.txt").write_text(
        "[llmux.providers]\nacme_pkg = acme_llmux:SPEC\nacme_broken = acme_llmux:NOPE\n"
    )
    (tmp_path / "acme_llmux.py").write_text(
        "from llmux_extproc.providers.registry import ProviderSpec\n"
        "SPEC = ProviderSpec('acme_pkg', 'openai', 'https://acme.example/v1', 'ACME_KEY')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "acme_llmux", raising=False)
    providers = dict(registry.PROVIDERS)
    with pytest.raises(ProviderPluginError) as info:
        registry.load_entry_points()
    assert providers == registry.PROVIDERS  # the good one waits for the broken one's fix
    assert (
        "'acme_broken' (acme_broken = acme_llmux:NOPE, group llmux.providers, distribution acme-llmux 1.2)"
        in str(info.value)
    )
    (dist / "entry_points.txt").write_text("[llmux.providers]\nacme_pkg = acme_llmux:SPEC\n")
    assert "acme_pkg" in registry.load_entry_points()
    dep = deployment("acme_pkg/m1", api_key="k")
    assert dep.upstream is not None and dep.upstream.host == "acme.example"
