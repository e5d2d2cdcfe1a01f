"""Provider auth apart from translation: `translate` carries no credentials, `request` is
`translate` plus the deployment's `auth.apply`, and every header either may set is in
`provider_header_names()` (what a retry to another provider removes)."""

from __future__ import annotations

import importlib
from typing import Any

import orjson
import pytest

from llmux_extproc.control.config import Deployment, parse_config
from llmux_extproc.errors import GatewayError
from llmux_extproc.providers import registry
from llmux_extproc.providers.auth import APIKeyHeader, BackendAuth, NoAuth
from llmux_extproc.providers.auth import google_auth as google_auth_module
from llmux_extproc.providers.auth import sigv4 as sigv4_module
from llmux_extproc.providers.base import Adapter, ClientRequest, UpstreamRequest
from tests import mock_bedrock as mb

EXPECTED_HEADER_NAMES = frozenset(
    {
        "accept",
        "anthropic-version",
        "api-key",
        "authorization",
        "content-type",
        "x-amz-content-sha256",
        "x-amz-date",
        "x-amz-security-token",
        "x-api-key",
        "x-goog-api-key",
        "x-goog-user-project",
    }
)


class FakeTokens:
    """Stands in for the Vertex token cache: a token is always at hand."""

    def ready(self, dep: Deployment) -> bool:
        return True

    async def prepare(self, dep: Deployment) -> None:
        return None

    def headers(self, dep: Deployment) -> dict[str, str]:
        return {"authorization": "Bearer ya29.token", "x-goog-user-project": "quota"}

    def project_id(self, dep: Deployment) -> str | None:
        return None


@pytest.fixture(autouse=True)
def fake_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(google_auth_module, "AUTH", FakeTokens())


def dep_for(litellm: dict[str, Any]) -> Deployment:
    config = {"model_list": [{"model_name": "m", "litellm_params": litellm}]}
    return parse_config(orjson.dumps(config).decode()).deployments[0]


def chat(stream: bool = False) -> ClientRequest:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    return ClientRequest("chat", body, orjson.dumps(body), "m", stream)


AWS = {
    "aws_access_key_id": mb.ACCESS_KEY,
    "aws_secret_access_key": mb.SECRET_KEY,
    "aws_session_token": mb.SESSION_TOKEN,
    "aws_region_name": mb.REGION,
}
DEPLOYMENTS = {
    "openai": ({"model": "openai/gpt-4o", "api_key": "sk-1"}, {"authorization": "Bearer sk-1"}),
    "azure": (
        {"model": "azure/gpt", "api_base": "https://x.openai.azure.com", "api_key": "az-1"},
        {"api-key": "az-1"},
    ),
    "azure-entra": (
        {
            "model": "azure/gpt",
            "api_base": "https://x.openai.azure.com",
            "azure_ad_token": "eyJ.t",
        },
        {"authorization": "Bearer eyJ.t"},
    ),
    "anthropic": ({"model": "anthropic/claude-x", "api_key": "sk-ant"}, {"x-api-key": "sk-ant"}),
    "gemini": ({"model": "gemini/gemini-2.5-flash", "api_key": "g-1"}, {"x-goog-api-key": "g-1"}),
    "vertex": (
        {"model": "vertex_ai/gemini-2.5-flash", "vertex_project": "p"},
        {"authorization": "Bearer ya29.token", "x-goog-user-project": "quota"},
    ),
    "vertex-claude": (
        {"model": "vertex_ai/claude-sonnet-4", "vertex_project": "p"},
        {"authorization": "Bearer ya29.token", "x-goog-user-project": "quota"},
    ),
    "bedrock-key": (
        {"model": "bedrock/anthropic.claude-x", "aws_region_name": "us-west-2", "api_key": "br"},
        {"authorization": "Bearer br"},
    ),
    "bedrock-sigv4": ({"model": "bedrock/anthropic.claude-x", **AWS}, None),
    "local-vllm": ({"model": "hosted_vllm/llama", "api_base": "http://vllm:8000/v1"}, {}),
}


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_request_is_translation_plus_auth(name: str) -> None:
    params, expected_auth = DEPLOYMENTS[name]
    dep = dep_for(params)
    adapter = registry.adapter_for(dep.spec)
    bare = adapter.translate(chat(), dep)
    assert not bare.headers.keys() & (adapter.auth_headers | adapter.auth.headers), name
    assert bare.headers.keys() <= adapter.request_headers
    full = adapter.request(chat(), dep)
    assert (full.path, full.body) == (bare.path, bare.body)
    added = {k: v for k, v in full.headers.items() if k not in bare.headers}
    assert {k: full.headers[k] for k in bare.headers} == bare.headers
    if expected_auth is not None:
        assert added == expected_auth
    assert added.keys() <= adapter.auth_headers
    assert full.headers.keys() <= registry.provider_header_names()


def test_sigv4_signs_the_translated_request() -> None:
    dep = dep_for({"model": "bedrock/anthropic.claude-x", **AWS})
    adapter = registry.adapter_for(dep.spec)
    up = adapter.translate(chat(stream=True), dep)
    adapter.auth.apply(dep, up)
    assert up.headers.keys() >= {"authorization", "x-amz-date", "x-amz-security-token"}
    assert dep.upstream is not None and up.body is not None
    headers = {**up.headers, "host": dep.upstream.authority}
    assert (
        mb.verify_sigv4("POST", up.path, "", headers, up.body, session_token=mb.SESSION_TOKEN)
        is None
    )


def test_sigv4_signs_a_query_and_refuses_a_forwarded_body() -> None:
    dep = dep_for({"model": "bedrock/anthropic.claude-x", **AWS})
    auth = sigv4_module.AWSSigV4("bedrock")
    up = UpstreamRequest("/model/x/invoke?trace=on", {"content-type": "application/json"}, b"{}")
    auth.apply(dep, up)
    assert dep.upstream is not None
    headers = {**up.headers, "host": dep.upstream.authority}
    verdict = mb.verify_sigv4(
        "POST", "/model/x/invoke", "trace=on", headers, b"{}", session_token=mb.SESSION_TOKEN
    )
    assert verdict is None
    with pytest.raises(GatewayError):
        auth.apply(dep, UpstreamRequest("/model/x/invoke", {}, None))


def test_api_key_header_without_a_key_sets_nothing() -> None:
    dep = dep_for({"model": "hosted_vllm/llama", "api_base": "http://vllm:8000/v1"})
    up = UpstreamRequest("/v1/chat/completions")
    APIKeyHeader("authorization", "Bearer").apply(dep, up)
    NoAuth().apply(dep, up)
    assert up.headers == {}
    assert APIKeyHeader("X-Api-Key").headers == frozenset({"x-api-key"})


def test_azure_without_credentials_is_401(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AZURE_API_KEY", "AZURE_AD_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    dep = dep_for({"model": "azure/gpt", "api_base": "https://x.openai.azure.com"})
    adapter = registry.adapter_for(dep.spec)
    assert adapter.translate(chat(), dep).path.startswith("/openai/deployments/gpt/")
    with pytest.raises(GatewayError) as info:
        adapter.request(chat(), dep)
    assert info.value.status == 401


def test_every_adapter_declares_its_auth_headers() -> None:
    adapters = {registry.adapter_for(spec) for spec in registry.PROVIDERS.values()}
    for adapter in adapters:
        assert isinstance(adapter.auth, BackendAuth)
        assert adapter.auth.headers <= adapter.auth_headers, adapter.name
        assert all(h == h.lower() for h in adapter.auth_headers | adapter.request_headers)
    bedrock = registry.adapter_for(registry.PROVIDERS["bedrock"])
    assert bedrock.auth_headers == {
        "authorization",
        "x-amz-date",
        "x-amz-security-token",
        "x-amz-content-sha256",
    }


def test_provider_header_names() -> None:
    assert registry.provider_header_names() == EXPECTED_HEADER_NAMES


async def test_ready_and_prepare_come_from_the_auth() -> None:
    class Pending(BackendAuth):
        prepared = False

        def ready(self, dep: Deployment) -> bool:
            return self.prepared

        async def prepare(self, dep: Deployment) -> None:
            self.prepared = True

    class Custom(Adapter):
        auth = Pending()

    dep = dep_for({"model": "openai/gpt-4o", "api_key": "k"})
    adapter = Custom()
    assert not adapter.ready(dep)
    await adapter.prepare(dep)
    assert adapter.ready(dep)


@pytest.mark.parametrize("old", ["sigv4", "google_auth"])
def test_old_module_paths_are_the_moved_modules(old: str) -> None:
    legacy = importlib.import_module(f"llmux_extproc.providers.{old}")
    moved = importlib.import_module(f"llmux_extproc.providers.auth.{old}")
    assert legacy is moved
