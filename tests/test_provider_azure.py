"""Azure OpenAI adapter: paths, api-version, auth headers, pass-through, error codes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import yaml

from llmux_extproc.control.config import Deployment, parse_config
from llmux_extproc.errors import GatewayError
from llmux_extproc.providers import azure
from llmux_extproc.providers.base import ClientRequest
from llmux_extproc.providers.openai import ADAPTER as openai_adapter
from tests import corpus

ADAPTER = azure.ADAPTER
BASE = "https://my-resource.openai.azure.com"


def make_dep(model: str = "gpt-4o-prod", **params: Any) -> Deployment:
    litellm = {"model": f"azure/{model}", "api_base": BASE, "api_key": "azure-key", **params}
    litellm = {k: v for k, v in litellm.items() if v is not None}
    config = parse_config(
        yaml.safe_dump({"model_list": [{"model_name": "m", "litellm_params": litellm}]})
    )
    return config.deployments[0]


def request(operation: str, body: dict[str, Any]) -> ClientRequest:
    full = {"model": "m", **body}
    return ClientRequest(operation, full, orjson.dumps(full), "m", bool(body.get("stream")))


@pytest.fixture(autouse=True)
def _no_azure_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AZURE_API_VERSION", "AZURE_API_KEY", "AZURE_AD_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("case", corpus.CASES, ids=lambda c: c.name)
def test_corpus_request_passes_through(case: corpus.Case) -> None:
    # Azure speaks OpenAI: every corpus case, unsupported_param included, goes as sent.
    up = ADAPTER.request(request("chat", case.request), make_dep(api_version="2024-10-21"))
    assert up.path == "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21"
    assert up.body is None
    assert up.headers == {"content-type": "application/json", "api-key": "azure-key"}


def test_api_version_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    chat = request("chat", corpus.case("plain").request)
    assert ADAPTER.request(chat, make_dep()).path.endswith(
        f"?api-version={azure.DEFAULT_API_VERSION}"
    )
    monkeypatch.setenv("AZURE_API_VERSION", "2025-01-01-preview")
    assert ADAPTER.request(chat, make_dep()).path.endswith("?api-version=2025-01-01-preview")
    assert ADAPTER.request(chat, make_dep(api_version="2024-06-01")).path.endswith(
        "?api-version=2024-06-01"
    )


def test_embeddings_path() -> None:
    up = ADAPTER.request(request("embeddings", {"input": ["a", "b"]}), make_dep("embed-small"))
    assert up.path == "/openai/deployments/embed-small/embeddings?api-version=2024-10-21"
    assert up.body is None


def test_api_base_with_openai_suffix() -> None:
    dep = make_dep(api_base=f"{BASE}/openai/")
    up = ADAPTER.request(request("chat", corpus.case("plain").request), dep)
    assert up.path.startswith("/openai/deployments/gpt-4o-prod/chat/completions?")


def test_stream_is_openais() -> None:
    dep = make_dep()
    streamed = request("chat", {**corpus.case("plain").request, "stream": True})
    # Whatever OpenAI's adapter does with its SSE (pass through, read usage), Azure does.
    assert type(ADAPTER.stream(streamed, dep)) is type(openai_adapter.stream(streamed, dep))
    up = ADAPTER.request(streamed, dep)
    assert up.body is not None
    assert orjson.loads(up.body)["stream_options"] == {"include_usage": True}
    asked = request(
        "chat",
        {**corpus.case("plain").request, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert ADAPTER.request(asked, dep).body is None
    # api-versions before 2024-09-01 reject stream_options: the body goes as sent.
    assert ADAPTER.request(streamed, make_dep(api_version="2024-06-01")).body is None


def test_v1_api_puts_deployment_in_body() -> None:
    up = ADAPTER.request(request("chat", corpus.case("plain").request), make_dep(api_version="v1"))
    assert up.path == "/openai/v1/chat/completions"
    assert up.body is not None and orjson.loads(up.body)["model"] == "gpt-4o-prod"


def test_ad_token_is_bearer(monkeypatch: pytest.MonkeyPatch) -> None:
    chat = request("chat", corpus.case("plain").request)
    up = ADAPTER.request(chat, make_dep(api_key=None, azure_ad_token="eyJ.token"))
    assert up.headers["authorization"] == "Bearer eyJ.token"
    assert "api-key" not in up.headers
    monkeypatch.setenv("ENTRA_TOKEN", "from-env")
    dep = make_dep(api_key=None, azure_ad_token="os.environ/ENTRA_TOKEN")
    assert ADAPTER.request(chat, dep).headers["authorization"] == "Bearer from-env"


def test_missing_credentials_is_401() -> None:
    with pytest.raises(GatewayError) as info:
        ADAPTER.request(request("chat", corpus.case("plain").request), make_dep(api_key=None))
    assert info.value.status == 401


def test_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_API_KEY", "env-key")
    up = ADAPTER.request(request("chat", corpus.case("plain").request), make_dep(api_key=None))
    assert up.headers["api-key"] == "env-key"


def test_response_passes_through_with_usage() -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 2,
            "total_tokens": 11,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
    }
    result = ADAPTER.response(
        orjson.dumps(body), request("chat", corpus.case("plain").request), make_dep()
    )
    assert result.body is None  # forwarded untouched
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (9, 2)
    assert result.usage.cached_tokens == 4


def test_content_filter_error() -> None:
    body = {
        "error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's "
            "content management policy.",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {"hate": {"filtered": True, "severity": "high"}},
            },
        }
    }
    err = ADAPTER.error(400, orjson.dumps(body), make_dep())
    assert (err.status, err.code, err.param) == (400, "content_policy_violation", "prompt")
    assert "content management policy" in err.message
    assert err.type == "invalid_request_error"


def test_other_errors_keep_openai_codes() -> None:
    body = {
        "error": {
            "message": "This model's maximum context length is 128000 tokens.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    err = ADAPTER.error(400, orjson.dumps(body), make_dep())
    assert (err.status, err.code) == (400, "context_length_exceeded")
    missing = {"error": {"code": "DeploymentNotFound", "message": "The API deployment ..."}}
    err = ADAPTER.error(404, orjson.dumps(missing), make_dep())
    assert (err.status, err.code, err.type) == (404, "DeploymentNotFound", "not_found_error")
    throttled = {"error": {"code": "429", "message": "Rate limit is exceeded."}}
    assert ADAPTER.error(429, orjson.dumps(throttled), make_dep()).type == "rate_limit_error"
