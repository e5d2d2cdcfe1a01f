"""Gemini API and Vertex AI end to end: the official openai SDK, real Envoy and ext_proc
workers, and tests/mock_gemini.py as Google (generateContent, rawPredict, the OAuth
token endpoint), which checks every request the way Google would."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests import mock_gemini
from tests.corpus import CASES, PNG_B64, Case, case
from tests.harness import Gateway, MockUpstream, free_port, running_gateway
from tests.streams import assert_stream_matches

pytestmark = pytest.mark.e2e

MASTER_KEY = "sk-master-gemini-e2e"
KEY = mock_gemini.new_rsa_key()
CHAT_MODELS = ["gemini-flash", "vertex-gemini", "vertex-claude"]


@pytest.fixture(scope="module")
def mock() -> mock_gemini.GeminiMock:
    return mock_gemini.GeminiMock(public_key=KEY.public_key())


@pytest.fixture(scope="module")
def upstream(mock: mock_gemini.GeminiMock) -> Iterator[MockUpstream]:
    up = MockUpstream(mock.handler).start()
    yield up
    up.stop()


def _key_json(up: MockUpstream, key: Any = KEY, token_uri: str | None = None) -> str:
    info = mock_gemini.service_account_info(key, token_uri or f"{up.base_url}/token")
    return orjson.dumps(info).decode()


def _config(up: MockUpstream) -> dict[str, Any]:
    def gemini(name: str, model: str, api_key: str = mock_gemini.API_KEY) -> dict[str, Any]:
        params = {"model": f"gemini/{model}", "api_base": up.base_url, "api_key": api_key}
        return {"model_name": name, "litellm_params": params}

    def vertex(name: str, model: str, credentials: str) -> dict[str, Any]:
        params = {
            "model": f"vertex_ai/{model}",
            "api_base": up.base_url,
            "vertex_project": "proj-e2e",
            "vertex_location": "us-east5",
            "vertex_credentials": credentials,
        }
        return {"model_name": name, "litellm_params": params}

    unreachable = f"http://127.0.0.1:{free_port()}/token"
    return {
        "model_list": [
            gemini("gemini-flash", "gemini-2.5-flash"),
            gemini("gemini-badkey", "gemini-2.5-flash", "wrong-key"),
            gemini("gemini-embed", "gemini-embedding-001"),
            vertex("vertex-gemini", "gemini-2.5-flash", _key_json(up)),
            vertex("vertex-claude", "claude-sonnet-4@20250514", _key_json(up)),
            vertex("vertex-embed", "text-embedding-005", _key_json(up)),
            vertex("vertex-wrongkey", "gemini-2.5-flash", _key_json(up, mock_gemini.new_rsa_key())),
            vertex("vertex-noauth", "gemini-2.5-flash", _key_json(up, token_uri=unreachable)),
        ],
        "general_settings": {"master_key": MASTER_KEY},
    }


@pytest.fixture(scope="module")
def gateway(upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp: Path = tmp_path_factory.mktemp("gemini-e2e")
    with running_gateway(_config(upstream), tmp) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    # No SDK retries: each test sees the first answer the gateway gives.
    return openai.OpenAI(base_url=gateway.openai_base, api_key=MASTER_KEY, max_retries=0)


# -- every corpus case, every chat model ------------------------------------------------------


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("model", CHAT_MODELS)
def test_corpus(model: str, c: Case, client: openai.OpenAI, upstream: MockUpstream) -> None:
    if c.unsupported_param:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model, **c.request)
        assert c.unsupported_param in info.value.message
        return
    completion = client.chat.completions.create(model=model, **c.request)
    assert isinstance(completion, ChatCompletion)
    choice = completion.choices[0]
    assert choice.finish_reason == c.expect_finish
    calls = choice.message.tool_calls or []
    assert len(calls) == c.expect_tool_calls
    for call in calls:
        assert call.type == "function"
        assert orjson.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    if not c.expect_tool_calls:
        assert choice.message.content
    if "json" in c.tags:
        assert isinstance(orjson.loads(choice.message.content or ""), dict)
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    seen = upstream.last()
    assert seen.headers.get("authorization") != f"Bearer {MASTER_KEY}"  # never forwarded
    if model == "gemini-flash":
        assert seen.headers["x-goog-api-key"] == mock_gemini.API_KEY
        assert seen.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    else:
        assert seen.headers["authorization"].startswith("Bearer ya29.mock-")
        assert seen.path.startswith("/v1/projects/proj-e2e/locations/us-east5/publishers/")


def test_gemini_usage_and_reasoning(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="gemini-flash", **case("reasoning").request)
    message = completion.choices[0].message
    assert message.content == mock_gemini.TEXT
    assert (message.model_extra or {}).get("reasoning_content") == mock_gemini.THOUGHT
    usage = completion.usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens == 7 + 12
    assert usage.completion_tokens_details.reasoning_tokens == 12


def test_thought_signature_survives_the_client_roundtrip(
    client: openai.OpenAI, upstream: MockUpstream
) -> None:
    request = case("parallel_tools").request
    first = client.chat.completions.create(model="gemini-flash", **request)
    calls = first.choices[0].message.tool_calls or []
    assert len(calls) == 2
    messages = [
        *request["messages"],
        first.choices[0].message.model_dump(exclude_none=True),
        *[{"role": "tool", "tool_call_id": c.id, "content": "18C"} for c in calls],
    ]
    second = client.chat.completions.create(
        model="gemini-flash", messages=messages, tools=request["tools"]
    )
    assert second.choices[0].message.content == mock_gemini.TOOL_ANSWER
    model_turn = upstream.last().json()["contents"][1]
    assert model_turn["parts"][0]["thoughtSignature"] == mock_gemini.SIGNATURE


def test_vertex_token_is_fetched_once_and_reused(
    client: openai.OpenAI, mock: mock_gemini.GeminiMock, upstream: MockUpstream
) -> None:
    client.chat.completions.create(model="vertex-gemini", **case("plain").request)
    before = mock.token_requests
    assert before >= 1
    for model in ("vertex-gemini", "vertex-claude", "vertex-gemini"):
        client.chat.completions.create(model=model, **case("plain").request)
    assert mock.token_requests == before
    token = upstream.last().headers["authorization"].removeprefix("Bearer ")
    assert token in mock.issued


# -- streaming --------------------------------------------------------------------------------


def _collect(stream: Any) -> list[ChatCompletionChunk]:
    chunks = list(stream)
    assert chunks and all(ch.object == "chat.completion.chunk" for ch in chunks)
    return chunks


@pytest.mark.parametrize(
    ("model", "name"),
    [
        (model, name)
        for model in CHAT_MODELS
        for name in ("plain", "parallel_tools", "reasoning")
        # The Claude mock answers without thinking blocks; reasoning streams are covered
        # for Claude by the Anthropic tests.
        if (model, name) != ("vertex-claude", "reasoning")
    ],
)
def test_stream(model: str, name: str, client: openai.OpenAI) -> None:
    c = case(name)
    stream = client.chat.completions.create(
        model=model, stream=True, stream_options={"include_usage": True}, **c.request
    )
    chunks = _collect(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    calls = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finish[-1] == c.expect_finish
    assert len({t.index for t in calls}) == c.expect_tool_calls
    if not c.expect_tool_calls:
        assert text == mock_gemini.TEXT
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens > 0


@pytest.mark.parametrize("c", [c for c in CASES if not c.unsupported_param], ids=lambda c: c.name)
@pytest.mark.parametrize("model", CHAT_MODELS)
def test_stream_matches_the_whole_answer(model: str, c: Case, client: openai.OpenAI) -> None:
    """streamGenerateContent over SSE (thoughts, parallel function calls, usage in the last
    event) says what generateContent says."""
    whole = client.chat.completions.create(model=model, **c.request)
    chunks = list(
        client.chat.completions.create(
            model=model, stream=True, stream_options={"include_usage": True}, **c.request
        )
    )
    assert_stream_matches(whole, chunks)


def test_stream_error_reaches_the_sdk(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "TRIGGER_BLOCK"}]
    try:
        stream = client.chat.completions.create(
            model="gemini-flash", messages=messages, stream=True
        )
        _collect(stream)
    except openai.APIError as err:
        assert "blocked" in err.message
    else:
        pytest.fail("a blocked prompt must raise")


# -- errors through the SDK's exception classes ---------------------------------------------


def _ask(client: openai.OpenAI, model: str, text: str) -> None:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])


@pytest.mark.parametrize("model", ["gemini-flash", "vertex-gemini"])
def test_google_errors(model: str, client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as rate:
        _ask(client, model, "TRIGGER_RATE")
    assert rate.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.BadRequestError) as context:
        _ask(client, model, "TRIGGER_CONTEXT")
    assert context.value.code == "context_length_exceeded"
    assert "exceeds the maximum number of tokens" in context.value.message
    with pytest.raises(openai.BadRequestError) as blocked:
        _ask(client, model, "TRIGGER_BLOCK")
    assert blocked.value.code == "content_policy_violation"
    with pytest.raises(openai.InternalServerError) as unavailable:
        _ask(client, model, "TRIGGER_UNAVAILABLE")
    assert unavailable.value.status_code == 503


def test_bad_gemini_key_is_authentication_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        _ask(client, "gemini-badkey", "hi")
    assert info.value.code == "invalid_api_key" and "API key not valid" in info.value.message


def test_vertex_auth_failures(client: openai.OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        _ask(client, "vertex-wrongkey", "hi")
    assert "Invalid JWT Signature" in info.value.message
    with pytest.raises(openai.InternalServerError) as unreachable:
        _ask(client, "vertex-noauth", "hi")
    assert unreachable.value.status_code == 503


def test_http_image_url_is_refused(client: openai.OpenAI) -> None:
    content: list[Any] = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]
    messages: list[Any] = [{"role": "user", "content": content}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemini-flash", messages=messages)
    assert "data URL" in info.value.message
    inline = f"data:image/png;base64,{PNG_B64}"
    content[1] = {"type": "image_url", "image_url": {"url": inline}}
    ok = client.chat.completions.create(model="vertex-gemini", messages=messages)
    assert ok.choices[0].message.content


# -- embeddings --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gemini-embed", "vertex-embed"])
@pytest.mark.parametrize("encoding", ["base64", "float"])
def test_embeddings(model: str, encoding: str, client: openai.OpenAI) -> None:
    inputs = ["hello world", "bonjour le monde entier"]
    result = client.embeddings.create(
        model=model,
        input=inputs,
        dimensions=6,
        encoding_format=encoding,  # type: ignore[arg-type]
    )
    vectors = [d.embedding for d in result.data]
    if encoding == "base64":  # asked for explicitly, the SDK hands the string back
        vectors = [
            list(struct.unpack("<6f", base64.b64decode(v)))  # type: ignore[arg-type]
            for v in vectors
        ]
    for got, text in zip(vectors, inputs, strict=True):
        assert got == pytest.approx(mock_gemini.vector(text, 6))
    assert result.usage.prompt_tokens > 0
    if model == "vertex-embed":  # Vertex reports counts: one per word in the mock
        assert result.usage.prompt_tokens == 2 + 4


def test_embeddings_sdk_default_encoding(client: openai.OpenAI) -> None:
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    result = client.embeddings.create(model="gemini-embed", input="hello world", dimensions=5)
    assert result.data[0].embedding == pytest.approx(mock_gemini.vector("hello world", 5))


def test_gateway_log_has_no_tracebacks(gateway: Gateway) -> None:
    # Runs last: every failure above must have been answered, never crashed on.
    assert "Traceback" not in gateway.log()
