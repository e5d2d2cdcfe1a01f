"""Vertex AI: Google OAuth tokens against a mock token endpoint, and the Vertex adapter's
requests and answers for Gemini, Claude and embeddings."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llmux_extproc.control.config import ConfigError, Deployment, parse_config
from llmux_extproc.errors import GatewayError
from llmux_extproc.providers import vertex
from llmux_extproc.providers.auth import google_auth
from llmux_extproc.providers.auth.google_auth import GoogleAuth
from llmux_extproc.providers.base import ClientRequest
from tests import mock_gemini
from tests.corpus import CASES, Case, case
from tests.harness import MockUpstream, free_port

Json = dict[str, Any]
KEY = mock_gemini.new_rsa_key()


@pytest.fixture(scope="module")
def mock() -> mock_gemini.GeminiMock:
    return mock_gemini.GeminiMock(public_key=KEY.public_key())


@pytest.fixture(scope="module")
def upstream(mock: mock_gemini.GeminiMock) -> Iterator[MockUpstream]:
    up = MockUpstream(mock.handler).start()
    yield up
    up.stop()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (
        "GOOGLE_APPLICATION_CREDENTIALS",
        "VERTEXAI_PROJECT",
        "GOOGLE_CLOUD_PROJECT",
        "VERTEXAI_LOCATION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud ADC file
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{free_port()}")  # nobody listens


@pytest.fixture
def auth(monkeypatch: pytest.MonkeyPatch) -> GoogleAuth:
    fresh = GoogleAuth()
    monkeypatch.setattr(google_auth, "AUTH", fresh)  # the cache every Vertex deployment uses
    return fresh


@pytest.fixture(autouse=True)
def reset_mock(mock: mock_gemini.GeminiMock) -> None:
    mock.token_requests = 0
    mock.token_delay = 0.0
    mock.fail_tokens = False
    mock.token_lifetime = 3600


def sa_json(upstream: MockUpstream, key: Any = KEY) -> str:
    return orjson.dumps(
        mock_gemini.service_account_info(key, f"{upstream.base_url}/token")
    ).decode()


def deployment(
    upstream: MockUpstream, model: str = "gemini-2.5-flash", **params: Any
) -> Deployment:
    litellm: Json = {
        "model": f"vertex_ai/{model}",
        "api_base": upstream.base_url,
        "vertex_project": "proj-1",
        "vertex_location": "europe-west4",
        "vertex_credentials": sa_json(upstream),
        **params,
    }
    litellm = {k: v for k, v in litellm.items() if v is not None}
    config = parse_config(
        orjson.dumps({"model_list": [{"model_name": "v", "litellm_params": litellm}]}).decode()
    )
    return config.deployments[0]


def chat(body: Json, stream: bool = False) -> ClientRequest:
    full = {"model": "v", **body, **({"stream": True} if stream else {})}
    return ClientRequest("chat", full, orjson.dumps(full), "v", stream)


# -- google_auth ----------------------------------------------------------------------------


async def test_service_account_token_is_fetched_once_and_cached(
    auth: GoogleAuth, upstream: MockUpstream, mock: mock_gemini.GeminiMock
) -> None:
    dep = deployment(upstream)
    assert not auth.ready(dep)
    with pytest.raises(GatewayError):
        auth.headers(dep)
    await auth.prepare(dep)
    assert auth.ready(dep)
    bearer = auth.headers(dep)["authorization"]
    assert bearer.startswith("Bearer ") and bearer[7:] in mock.issued
    await auth.prepare(dep)
    assert mock.token_requests == 1
    assert auth.project_id(dep) == "key-project"
    # Another deployment with the same key shares the token.
    assert auth.ready(deployment(upstream, "claude-sonnet-4@20250514"))


async def test_concurrent_first_requests_share_one_fetch(
    auth: GoogleAuth, upstream: MockUpstream, mock: mock_gemini.GeminiMock
) -> None:
    mock.token_delay = 0.2
    dep = deployment(upstream)
    await asyncio.gather(*(auth.prepare(dep) for _ in range(20)))
    assert mock.token_requests == 1 and auth.ready(dep)


async def test_a_cancelled_waiter_does_not_cancel_the_fetch(
    auth: GoogleAuth, upstream: MockUpstream, mock: mock_gemini.GeminiMock
) -> None:
    mock.token_delay = 0.2
    dep = deployment(upstream)
    first = asyncio.ensure_future(auth.prepare(dep))
    await asyncio.sleep(0.05)
    first.cancel()
    await auth.prepare(dep)
    assert mock.token_requests == 1 and auth.ready(dep)


async def test_token_is_refreshed_five_minutes_before_expiry(
    upstream: MockUpstream, mock: mock_gemini.GeminiMock
) -> None:
    now = [1000.0]
    auth = GoogleAuth(clock=lambda: now[0])
    dep = deployment(upstream)
    await auth.prepare(dep)
    first = auth.headers(dep)
    now[0] += 3600 - 301
    assert auth.ready(dep)
    now[0] += 2
    assert not auth.ready(dep)
    assert auth.headers(dep) == first  # still valid for the requests already in flight
    await auth.prepare(dep)
    assert auth.ready(dep) and auth.headers(dep) != first
    assert mock.token_requests == 2


async def test_short_lived_token_refreshes_at_half_life(
    upstream: MockUpstream, mock: mock_gemini.GeminiMock
) -> None:
    mock.token_lifetime = 200
    now = [0.0]
    auth = GoogleAuth(clock=lambda: now[0])
    dep = deployment(upstream)
    await auth.prepare(dep)
    now[0] = 99
    assert auth.ready(dep)
    now[0] = 101
    assert not auth.ready(dep)


async def test_wrong_key_is_a_401_with_google_reason_and_backs_off(
    auth: GoogleAuth, upstream: MockUpstream, mock: mock_gemini.GeminiMock
) -> None:
    dep = deployment(upstream, vertex_credentials=sa_json(upstream, mock_gemini.new_rsa_key()))
    with pytest.raises(GatewayError) as info:
        await auth.prepare(dep)
    assert info.value.status == 401
    assert "invalid_grant: Invalid JWT Signature." in info.value.message
    with pytest.raises(GatewayError):
        await auth.prepare(dep)
    assert mock.token_requests == 1  # the second request got the remembered failure


async def test_token_endpoint_failures_are_503(
    auth: GoogleAuth, upstream: MockUpstream, mock: mock_gemini.GeminiMock
) -> None:
    mock.fail_tokens = True
    with pytest.raises(GatewayError) as info:
        await auth.prepare(deployment(upstream))
    assert info.value.status == 503
    info_dict = mock_gemini.service_account_info(KEY, f"http://127.0.0.1:{free_port()}/token")
    with pytest.raises(GatewayError) as info:
        await auth.prepare(
            deployment(upstream, vertex_credentials=orjson.dumps(info_dict).decode())
        )
    assert info.value.status == 503 and "unreachable" in info.value.message


async def test_failed_refresh_keeps_the_still_valid_token(
    upstream: MockUpstream, mock: mock_gemini.GeminiMock
) -> None:
    now = [0.0]
    auth = GoogleAuth(clock=lambda: now[0])
    dep = deployment(upstream)
    await auth.prepare(dep)
    token = auth.headers(dep)
    mock.fail_tokens = True
    now[0] = 3500
    await auth.prepare(dep)  # no error: the token has 100 s left
    assert auth.headers(dep) == token
    now[0] = 3601
    with pytest.raises(GatewayError) as info:
        await auth.prepare(dep)
    assert info.value.status == 503


@pytest.mark.parametrize("form", ["file", "env_json", "env_path", "gac", "dict"])
async def test_credential_sources(
    form: str,
    auth: GoogleAuth,
    upstream: MockUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = sa_json(upstream)
    path = tmp_path / "key.json"
    path.write_text(text)
    creds: Any = None
    if form == "file":
        creds = str(path)
    elif form == "env_json":
        monkeypatch.setenv("MY_VERTEX_KEY", text)
        creds = "os.environ/MY_VERTEX_KEY"
    elif form == "env_path":
        monkeypatch.setenv("MY_VERTEX_KEY", str(path))
        creds = "os.environ/MY_VERTEX_KEY"
    elif form == "gac":
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    elif form == "dict":
        creds = orjson.loads(text)
    dep = deployment(upstream, vertex_credentials=creds)
    await auth.prepare(dep)
    assert auth.ready(dep)


@pytest.mark.parametrize(
    ("creds", "needle"),
    [
        ("/nonexistent/dir/key.json", "cannot be read"),
        ('{"type": "service_account"', "not valid JSON"),
        ('{"type": "external_account"}', "'external_account' are not supported"),
        ('{"type": "service_account", "client_email": "a@b"}', "no 'private_key'"),
        (
            '{"type": "service_account", "client_email": "a@b", "private_key": "nope"}',
            "not a valid PEM key",
        ),
    ],
)
async def test_bad_credentials_are_clear_401s(
    creds: str, needle: str, auth: GoogleAuth, upstream: MockUpstream
) -> None:
    with pytest.raises(GatewayError) as info:
        await auth.prepare(deployment(upstream, vertex_credentials=creds))
    assert info.value.status == 401 and needle in info.value.message
    assert "/nonexistent" not in info.value.message  # paths stay in the server log


def test_unset_credentials_variable_is_a_config_error(upstream: MockUpstream) -> None:
    # os.environ/ references are resolved when the config loads, so this never reaches a request.
    with pytest.raises(ConfigError) as info:
        deployment(upstream, vertex_credentials="os.environ/NOT_SET_ANYWHERE")
    assert "litellm_params.vertex_credentials" in str(info.value)
    assert "NOT_SET_ANYWHERE" in str(info.value)


async def test_authorized_user_credentials(
    auth: GoogleAuth, upstream: MockUpstream, mock: mock_gemini.GeminiMock
) -> None:
    user = {
        "type": "authorized_user",
        "client_id": "cid",
        "client_secret": "secret",
        "refresh_token": mock.refresh_token,
        "quota_project_id": "quota-proj",
        "token_uri": f"{upstream.base_url}/token",
    }
    dep = deployment(upstream, vertex_credentials=orjson.dumps(user).decode(), vertex_project=None)
    await auth.prepare(dep)
    assert auth.headers(dep)["x-goog-user-project"] == "quota-proj"
    assert vertex.project(dep) == "quota-proj"
    bad = deployment(
        upstream, vertex_credentials=orjson.dumps({**user, "refresh_token": "x"}).decode()
    )
    with pytest.raises(GatewayError) as info:
        await auth.prepare(bad)
    assert info.value.status == 401


async def test_metadata_server_when_nothing_is_configured(
    auth: GoogleAuth, upstream: MockUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep = deployment(upstream, vertex_credentials=None, vertex_project=None)
    with pytest.raises(GatewayError) as info:
        await auth.prepare(dep)
    assert info.value.status == 401 and "metadata server" in info.value.message
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{upstream.port}")
    monkeypatch.setattr(google_auth, "FAILURE_BACKOFF_S", 0.0)  # forget the failure at once
    auth._failures.clear()
    await auth.prepare(dep)
    assert auth.ready(dep) and vertex.project(dep) == "metadata-project"


# -- the Vertex adapter -----------------------------------------------------------------------


async def test_gemini_request_paths_and_auth(auth: GoogleAuth, upstream: MockUpstream) -> None:
    dep = deployment(upstream)
    adapter = vertex.ADAPTER
    assert not adapter.ready(dep)
    await adapter.prepare(dep)
    assert adapter.ready(dep)
    up = adapter.request(chat(case("plain").request), dep)
    prefix = "/v1/projects/proj-1/locations/europe-west4/publishers/google/models/gemini-2.5-flash"
    assert up.path == f"{prefix}:generateContent"
    assert up.headers["authorization"] == auth.headers(dep)["authorization"]
    assert "x-goog-api-key" not in up.headers
    assert orjson.loads(up.body or b"") == {
        "contents": [{"role": "user", "parts": [{"text": "Say hello"}]}]
    }
    streamed = adapter.request(chat(case("plain").request, stream=True), dep)
    assert streamed.path == f"{prefix}:streamGenerateContent?alt=sse"


async def test_project_comes_from_the_key_when_not_configured(
    auth: GoogleAuth, upstream: MockUpstream
) -> None:
    dep = deployment(upstream, vertex_project=None, vertex_location=None)
    await vertex.ADAPTER.prepare(dep)
    up = vertex.ADAPTER.request(chat(case("plain").request), dep)
    assert up.path.startswith("/v1/projects/key-project/locations/us-central1/")


@pytest.mark.parametrize("c", [c for c in CASES if not c.unsupported_param], ids=lambda c: c.name)
async def test_gemini_corpus_through_vertex(
    c: Case, auth: GoogleAuth, upstream: MockUpstream
) -> None:
    dep = deployment(upstream)
    await vertex.ADAPTER.prepare(dep)
    req = chat(c.request)
    body = orjson.loads(vertex.ADAPTER.request(req, dep).body or b"")
    assert not mock_gemini.validate_generate_request(body)
    answer = mock_gemini.generate(body, dep.model)
    result = vertex.ADAPTER.response(orjson.dumps(answer), req, dep)
    completion = ChatCompletion.model_validate_json(result.body or b"")
    assert completion.choices[0].finish_reason == c.expect_finish
    assert len(completion.choices[0].message.tool_calls or []) == c.expect_tool_calls


async def test_claude_request_is_anthropic_body_for_raw_predict(
    auth: GoogleAuth, upstream: MockUpstream
) -> None:
    dep = deployment(upstream, "claude-sonnet-4@20250514")
    await vertex.ADAPTER.prepare(dep)
    up = vertex.ADAPTER.request(chat(case("system").request), dep)
    prefix = "/v1/projects/proj-1/locations/europe-west4/publishers/anthropic/models/claude-sonnet-4@20250514"
    assert up.path == f"{prefix}:rawPredict"
    assert "x-api-key" not in up.headers and "anthropic-version" not in up.headers
    body = orjson.loads(up.body or b"")
    assert "model" not in body and body["anthropic_version"] == "vertex-2023-10-16"
    assert body["messages"] and body["max_tokens"] == 64
    streamed = vertex.ADAPTER.request(chat(case("plain").request, stream=True), dep)
    assert streamed.path == f"{prefix}:streamRawPredict"
    assert orjson.loads(streamed.body or b"")["stream"] is True


@pytest.mark.parametrize("name", ["plain", "tool_call", "tool_results", "system"])
async def test_claude_answers(name: str, auth: GoogleAuth, upstream: MockUpstream) -> None:
    dep = deployment(upstream, "claude-sonnet-4@20250514")
    await vertex.ADAPTER.prepare(dep)
    c = case(name)
    req = chat(c.request)
    body = orjson.loads(vertex.ADAPTER.request(req, dep).body or b"")
    answer = mock_gemini.claude_answer(body, dep.model)
    result = vertex.ADAPTER.response(orjson.dumps(answer), req, dep)
    completion = ChatCompletion.model_validate_json(result.body or b"")
    assert completion.choices[0].finish_reason == c.expect_finish
    assert len(completion.choices[0].message.tool_calls or []) == c.expect_tool_calls
    assert result.usage.prompt_tokens == 21 and result.usage.completion_tokens == 9


async def test_claude_stream(auth: GoogleAuth, upstream: MockUpstream) -> None:
    dep = deployment(upstream, "claude-sonnet-4@20250514")
    req = chat({**case("plain").request, "stream_options": {"include_usage": True}}, stream=True)
    translator = vertex.ADAPTER.stream(req, dep)
    assert translator is not None
    answer = mock_gemini.claude_answer({"messages": [{"role": "user", "content": "hi"}]}, dep.model)
    raw = b"".join(
        f"event: {n}\ndata: ".encode() + orjson.dumps(e) + b"\n\n"
        for n, e in mock_gemini.claude_events(answer)
    )
    out = translator.feed(raw) + translator.finish()
    events = [e[6:] for e in out.split(b"\n\n") if e.startswith(b"data: ") and e != b"data: [DONE]"]
    chunks = [ChatCompletionChunk.model_validate_json(e) for e in events]
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == mock_gemini.TEXT
    )
    assert translator.usage.prompt_tokens == 21


def test_claude_errors_keep_anthropic_shape_vertex_errors_google_shape(
    upstream: MockUpstream,
) -> None:
    dep = deployment(upstream, "claude-sonnet-4@20250514")
    anthropic_body = orjson.dumps(
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "prompt is too long: 300000 tokens",
            },
        }
    )
    err = vertex.ADAPTER.error(400, anthropic_body, dep)
    assert err.status == 400 and "prompt is too long" in err.message
    quota = orjson.dumps(
        {
            "error": {
                "code": 429,
                "message": "Quota exceeded for aiplatform",
                "status": "RESOURCE_EXHAUSTED",
            }
        }
    )
    err = vertex.ADAPTER.error(429, quota, dep)
    assert (err.status, err.code, err.message) == (
        429,
        "rate_limit_exceeded",
        "Quota exceeded for aiplatform",
    )
    gemini_dep = deployment(upstream)
    err = vertex.ADAPTER.error(
        403,
        orjson.dumps({"error": {"code": 403, "message": "denied", "status": "PERMISSION_DENIED"}}),
        gemini_dep,
    )
    assert (err.status, err.type) == (403, "permission_error")


async def test_embeddings_use_predict_with_real_token_counts(
    auth: GoogleAuth, upstream: MockUpstream
) -> None:
    dep = deployment(upstream, "text-embedding-005")
    await vertex.ADAPTER.prepare(dep)
    full = {"model": "v", "input": ["one two three", "four"], "dimensions": 4}
    req = ClientRequest("embeddings", full, orjson.dumps(full), "v")
    up = vertex.ADAPTER.request(req, dep)
    assert up.path.endswith("/publishers/google/models/text-embedding-005:predict")
    sent = orjson.loads(up.body or b"")
    assert sent == {
        "instances": [{"content": "one two three"}, {"content": "four"}],
        "parameters": {"outputDimensionality": 4},
    }
    answer = {
        "predictions": [
            {
                "embeddings": {
                    "values": mock_gemini.vector(i["content"], 4),
                    "statistics": {"token_count": 3},
                }
            }
            for i in sent["instances"]
        ]
    }
    result = vertex.ADAPTER.response(orjson.dumps(answer), req, dep)
    assert result.usage.prompt_tokens == 6 and not result.usage.estimated
    parsed = CreateEmbeddingResponse.model_validate_json(result.body or b"")
    assert [len(d.embedding) for d in parsed.data] == [4, 4]
    no_stats = {
        "predictions": [{"embeddings": {"values": [0.1]}}, {"embeddings": {"values": [0.2]}}]
    }
    assert vertex.ADAPTER.response(orjson.dumps(no_stats), req, dep).usage.estimated


def test_missing_project_is_a_clear_error(upstream: MockUpstream) -> None:
    dep = deployment(upstream, vertex_project=None, vertex_credentials=None)
    with pytest.raises(GatewayError) as info:
        vertex.project(dep)
    assert "vertex_project" in info.value.message
