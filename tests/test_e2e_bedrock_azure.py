"""Bedrock and Azure OpenAI end to end: the official openai SDK, real Envoy and ext_proc,
and mock upstreams that check what they receive (Bedrock: SigV4 recomputed with botocore
and Converse bodies validated against its service model; Azure: path, api-version, key)."""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests import corpus
from tests.harness import Gateway, MockUpstream, json_response, running_gateway
from tests.streams import assert_stream_matches

pytest.importorskip("botocore")

from tests import mock_bedrock as mb

pytestmark = pytest.mark.e2e

CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"
AZURE_KEY = "azure-test-key"
AZURE_AD_TOKEN = "eyJ-test-entra-token"
API_VERSION = "2024-10-21"


# -- the Azure mock ----------------------------------------------------------------------------


@dataclass
class AzureMock:
    """Azure OpenAI's data plane: checks deployment path, api-version and credentials."""

    failures: list[str] = field(default_factory=list)

    async def __call__(self, request: web.Request, body: bytes) -> web.StreamResponse:
        match = re.fullmatch(
            r"/openai/deployments/([\w.-]+)/(chat/completions|embeddings)", request.path
        )
        if match is None:
            self.failures.append(f"bad path {request.path!r}")
            return _azure_error(404, "DeploymentNotFound", "The API deployment does not exist.")
        if request.query.get("api-version") != API_VERSION:
            self.failures.append(f"api-version {request.query.get('api-version')!r}")
            return _azure_error(404, "404", "Resource not found")
        if request.headers.get("api-key") != AZURE_KEY and request.headers.get("authorization") != (
            f"Bearer {AZURE_AD_TOKEN}"
        ):
            self.failures.append(f"credentials {dict(request.headers)!r}")
            return _azure_error(401, "401", "Access denied due to invalid subscription key.")
        data = orjson.loads(body)
        if match[2] == "embeddings":
            return json_response(_embeddings(match[1], data))
        text = _last_user_text(data["messages"])
        if "AZURE_CONTENT_FILTER" in text:
            return json_response(_content_filter_error(), status=400)
        if "AZURE_RATE_LIMIT" in text:
            return _azure_error(429, "429", "Rate limit is exceeded. Try again in 5 seconds.")
        message, finish = _azure_answer(data, text)
        if data.get("stream"):
            usage = (data.get("stream_options") or {}).get("include_usage") is True
            return await _sse(request, match[1], message, finish, usage)
        return json_response(
            {
                "id": "chatcmpl-azure",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": "gpt-4o-2024-08-06",
                "choices": [
                    {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
                ],
                "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
                "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
            }
        )


def _azure_error(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status=status)


def _content_filter_error() -> dict[str, Any]:
    return {
        "error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's "
            "content management policy.",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation"},
        }
    }


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    last = messages[-1]
    if last["role"] != "user":
        return ""
    content = last["content"]
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if p.get("type") == "text")


def _azure_answer(data: dict[str, Any], text: str) -> tuple[dict[str, Any], str]:
    tools = data.get("tools") or []
    if tools and text:
        calls = [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": t["function"]["name"], "arguments": '{"city":"Paris"}'},
            }
            for i, t in enumerate(tools[:2])
        ]
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    fmt = (data.get("response_format") or {}).get("type")
    if fmt in ("json_object", "json_schema"):
        return {"role": "assistant", "content": '{"name": "Ada", "age": 36}'}, "stop"
    return {"role": "assistant", "content": f"Azure says hi to: {text[:40]}"}, "stop"


async def _sse(
    request: web.Request, deployment: str, message: dict[str, Any], finish: str, usage: bool
) -> web.StreamResponse:
    """Azure's stream: a first chunk with no choices carrying `prompt_filter_results`, then
    OpenAI chunks with `content_filter_results`, tool calls in pieces, usage if asked."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    filters = {"hate": {"filtered": False, "severity": "safe"}}

    async def send(body: dict[str, Any]) -> None:
        await response.write(b"data: " + orjson.dumps(body) + b"\n\n")

    def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        choice = {
            "index": 0,
            "delta": delta,
            "finish_reason": reason,
            "content_filter_results": filters,
        }
        return {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": deployment,
            "choices": [choice],
        }

    await send(
        {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": filters}],
        }
    )
    await send(chunk({"role": "assistant", "content": ""}))
    for word in re.findall(r"\S+\s*", message.get("content") or ""):
        await send(chunk({"content": word}))
    for i, call in enumerate(message.get("tool_calls") or []):
        head = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
        await send(chunk({"tool_calls": [{"index": i, **head}]}))
        arguments = call["function"]["arguments"]
        for piece in (arguments[:5], arguments[5:]):
            await send(chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}))
    await send(chunk({}, finish))
    if usage:
        counts = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
        body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": deployment}
        await send({**body, "choices": [], "usage": counts})
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _embeddings(deployment: str, data: dict[str, Any]) -> dict[str, Any]:
    inputs = data["input"] if isinstance(data["input"], list) else [data["input"]]
    vectors = [[float(len(text)), 0.5] for text in inputs]

    def encode(vector: list[float]) -> Any:
        if data.get("encoding_format") == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v)}
            for i, v in enumerate(vectors)
        ],
        "model": deployment,
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }


# -- fixtures ----------------------------------------------------------------------------------


@dataclass
class Env:
    gateway: Gateway
    bedrock: mb.BedrockMock
    bedrock_sts: mb.BedrockMock
    azure: AzureMock
    bedrock_upstream: MockUpstream
    azure_upstream: MockUpstream

    def client(self) -> openai.OpenAI:
        # No SDK retries: each test sees the gateway's first answer.
        return openai.OpenAI(base_url=self.gateway.openai_base, api_key="sk-any", max_retries=0)


def _bedrock(name: str, model: str, base: str, **extra: Any) -> dict[str, Any]:
    params = {
        "model": f"bedrock/{model}",
        "api_base": base,
        "aws_access_key_id": mb.ACCESS_KEY,
        "aws_secret_access_key": mb.SECRET_KEY,
        "aws_region_name": mb.REGION,
        **extra,
    }
    return {"model_name": name, "litellm_params": params}


def _azure(name: str, deployment: str, base: str, **extra: Any) -> dict[str, Any]:
    params = {"model": f"azure/{deployment}", "api_base": base, "api_version": API_VERSION}
    return {"model_name": name, "litellm_params": {**params, **extra}}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    bedrock, bedrock_sts, azure = mb.BedrockMock(), mb.BedrockMock(mb.SESSION_TOKEN), AzureMock()
    upstreams = [MockUpstream(bedrock), MockUpstream(bedrock_sts), MockUpstream(azure)]
    for upstream in upstreams:
        upstream.start()
    base, sts_base, azure_base = (u.base_url for u in upstreams)
    config = {
        "model_list": [
            _bedrock("claude", CLAUDE, base),
            _bedrock("claude-sts", CLAUDE, sts_base, aws_session_token=mb.SESSION_TOKEN),
            _bedrock("claude-drop", CLAUDE, base, drop_params=True),
            _bedrock("titan", "amazon.titan-embed-text-v2:0", base),
            _bedrock("cohere", "cohere.embed-english-v3", base),
            _azure("gpt-azure", "gpt-4o-prod", azure_base, api_key=AZURE_KEY),
            _azure("gpt-azure-ad", "gpt-4o-prod", azure_base, azure_ad_token=AZURE_AD_TOKEN),
            _azure("azure-embed", "text-embedding-3-small", azure_base, api_key=AZURE_KEY),
        ]
    }
    try:
        with running_gateway(config, tmp_path_factory.mktemp("bedrock_azure")) as gw:
            yield Env(gw, bedrock, bedrock_sts, azure, upstreams[0], upstreams[2])
    finally:
        for upstream in upstreams:
            upstream.stop()


def _check_mocks(env: Env) -> None:
    assert env.bedrock.failures == []
    assert env.bedrock_sts.failures == []
    assert env.azure.failures == []


# -- chat: the corpus ----------------------------------------------------------------------------


def _check_answer(case: corpus.Case, response: Any) -> None:
    choice = response.choices[0]
    assert choice.finish_reason == case.expect_finish
    assert len(choice.message.tool_calls or []) == case.expect_tool_calls
    for call in choice.message.tool_calls or []:
        assert orjson.loads(call.function.arguments) == {"city": "Paris"}
    if case.expect_tool_calls == 0:
        assert choice.message.content
    if "json" in case.tags:
        assert isinstance(orjson.loads(choice.message.content), dict)


@pytest.mark.parametrize("case", corpus.CASES, ids=lambda c: c.name)
def test_bedrock_corpus(env: Env, case: corpus.Case) -> None:
    client = env.client()
    if case.unsupported_param:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="claude", **case.request)
        assert info.value.param == case.unsupported_param
        # drop_params: the same request succeeds without the parameter.
        dropped = client.chat.completions.create(model="claude-drop", **case.request)
        assert dropped.choices[0].message.content
        _check_mocks(env)
        return
    response = client.chat.completions.create(model="claude", **case.request)
    _check_answer(case, response)
    if "reasoning" in case.tags:
        extra = response.choices[0].message.model_extra or {}
        assert extra["reasoning_content"] == "Count the r letters: three."
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (14, 7)
    assert response.usage.prompt_tokens_details is not None
    assert response.usage.prompt_tokens_details.cached_tokens == 2
    # The model id's ':' reached Bedrock percent-encoded, and the signature held.
    assert (
        env.bedrock.raw_paths[-1] == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    )
    _check_mocks(env)


@pytest.mark.parametrize("case", corpus.CASES, ids=lambda c: c.name)
def test_azure_corpus(env: Env, case: corpus.Case) -> None:
    # Azure is OpenAI: even logit_bias is Azure's to judge, and the mock accepts it.
    response = env.client().chat.completions.create(model="gpt-azure", **case.request)
    _check_answer(case, response)
    assert response.usage is not None and response.usage.prompt_tokens == 12
    recorded = env.azure_upstream.last()
    assert recorded.path == "/openai/deployments/gpt-4o-prod/chat/completions"
    assert recorded.query == f"api-version={API_VERSION}"
    assert "authorization" not in recorded.headers  # the client's key never reaches Azure
    _check_mocks(env)


def test_bedrock_session_token(env: Env) -> None:
    response = env.client().chat.completions.create(
        model="claude-sts", **corpus.case("plain").request
    )
    assert response.choices[0].message.content
    assert len(env.bedrock_sts.bodies) >= 1
    _check_mocks(env)


def test_azure_entra_token(env: Env) -> None:
    response = env.client().chat.completions.create(
        model="gpt-azure-ad", **corpus.case("plain").request
    )
    assert response.choices[0].message.content
    headers = env.azure_upstream.last().headers
    assert headers["authorization"] == f"Bearer {AZURE_AD_TOKEN}" and "api-key" not in headers
    _check_mocks(env)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "exc", "status"),
    [
        ("ThrottlingException", openai.RateLimitError, 429),
        ("AccessDeniedException", openai.PermissionDeniedError, 403),
        ("UnrecognizedClientException", openai.AuthenticationError, 401),
        ("ResourceNotFoundException", openai.NotFoundError, 404),
        ("ValidationException", openai.BadRequestError, 400),
        ("ModelTimeoutException", openai.APIStatusError, 408),
        ("ServiceUnavailableException", openai.InternalServerError, 503),
        ("InternalServerException", openai.InternalServerError, 500),
    ],
)
def test_bedrock_errors(env: Env, name: str, exc: type[openai.APIStatusError], status: int) -> None:
    messages = [{"role": "user", "content": f"BEDROCK_ERROR:{name}"}]
    with pytest.raises(exc) as info:
        env.client().chat.completions.create(model="claude", messages=messages)  # type: ignore[arg-type]
    assert info.value.status_code == status
    assert info.value.message and mb.ERRORS[name][1] in info.value.message
    if name == "ValidationException":
        assert info.value.code == "context_length_exceeded"


def test_bedrock_gateway_side_400(env: Env) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    messages: list[Any] = [{"role": "user", "content": [image]}]
    with pytest.raises(openai.BadRequestError) as info:
        env.client().chat.completions.create(model="claude", messages=messages)
    assert "data URL" in info.value.message


def test_azure_errors(env: Env) -> None:
    client = env.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="gpt-azure", messages=[{"role": "user", "content": "AZURE_CONTENT_FILTER"}]
        )
    assert info.value.code == "content_policy_violation"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="gpt-azure", messages=[{"role": "user", "content": "AZURE_RATE_LIMIT"}]
        )


# -- embeddings ----------------------------------------------------------------------------------


def test_titan_embeddings(env: Env) -> None:
    client = env.client()
    # The SDK asks for base64 unless told otherwise; both encodings must decode the same.
    default = client.embeddings.create(model="titan", input="hello big world")
    floats = client.embeddings.create(
        model="titan", input="hello big world", encoding_format="float"
    )
    assert default.data[0].embedding == floats.data[0].embedding
    assert len(default.data[0].embedding) == 8
    assert default.usage.prompt_tokens == 3
    sized = client.embeddings.create(model="titan", input=["one"], dimensions=4)
    assert len(sized.data[0].embedding) == 4
    assert env.bedrock.raw_paths[-1] == "/model/amazon.titan-embed-text-v2%3A0/invoke"
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="titan", input=["a", "b"])
    assert info.value.param == "input"
    _check_mocks(env)


def test_cohere_embeddings(env: Env) -> None:
    response = env.client().embeddings.create(model="cohere", input=["alpha", "beta gamma", "d"])
    assert [d.index for d in response.data] == [0, 1, 2]
    assert all(len(d.embedding) == 6 for d in response.data)
    assert response.usage.prompt_tokens > 0
    assert env.bedrock.bodies[-1] == {
        "texts": ["alpha", "beta gamma", "d"],
        "input_type": "search_document",
    }
    _check_mocks(env)


def test_azure_embeddings(env: Env) -> None:
    response = env.client().embeddings.create(model="azure-embed", input=["ab", "abcd"])
    assert [d.embedding for d in response.data] == [[2.0, 0.5], [4.0, 0.5]]
    recorded = env.azure_upstream.last()
    assert recorded.path == "/openai/deployments/text-embedding-3-small/embeddings"
    _check_mocks(env)


# -- streaming -----------------------------------------------------------------------------------


def test_azure_stream(env: Env) -> None:
    stream = env.client().chat.completions.create(
        model="gpt-azure", stream=True, **corpus.case("plain").request
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Azure says hi to: Say hello")
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The gateway asked Azure for usage (to account the stream) and kept it from the client.
    assert env.azure_upstream.last().json()["stream_options"] == {"include_usage": True}
    assert all(c.usage is None for c in chunks)
    asked = env.client().chat.completions.create(
        model="gpt-azure",
        stream=True,
        stream_options={"include_usage": True},
        **corpus.case("plain").request,
    )
    last = list(asked)[-1]
    assert last.usage is not None and last.usage.prompt_tokens == 12


@pytest.mark.parametrize("case_name", ["plain", "parallel_tools", "reasoning"])
def test_bedrock_stream(env: Env, case_name: str) -> None:
    case = corpus.case(case_name)
    stream = env.client().chat.completions.create(
        model="claude", stream=True, stream_options={"include_usage": True}, **case.request
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == 14
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == case.expect_finish
    calls = {
        call.index for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []
    }
    assert len(calls) == case.expect_tool_calls
    if case.expect_tool_calls == 0:
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert env.bedrock.raw_paths[-1].endswith("/converse-stream")
    _check_mocks(env)


@pytest.mark.parametrize(
    "case", [c for c in corpus.CASES if not c.unsupported_param], ids=lambda c: c.name
)
@pytest.mark.parametrize("model", ["claude", "gpt-azure"])
def test_stream_matches_the_whole_answer(env: Env, model: str, case: corpus.Case) -> None:
    """ConverseStream's binary event stream and Azure's SSE say what the whole answer says."""
    client = env.client()
    whole = client.chat.completions.create(model=model, **case.request)
    chunks = list(
        client.chat.completions.create(
            model=model, stream=True, stream_options={"include_usage": True}, **case.request
        )
    )
    assert_stream_matches(whole, chunks)
    _check_mocks(env)


def test_bedrock_stream_http_error(env: Env) -> None:
    # Errors before the stream starts come as JSON with an HTTP status, as for Converse.
    messages: list[Any] = [{"role": "user", "content": "BEDROCK_ERROR:ThrottlingException"}]
    with pytest.raises(openai.RateLimitError):
        env.client().chat.completions.create(model="claude", stream=True, messages=messages)


def test_bedrock_stream_without_usage(env: Env) -> None:
    stream = env.client().chat.completions.create(
        model="claude", stream=True, **corpus.case("json_schema").request
    )
    chunks = list(stream)
    assert all(c.choices and c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert orjson.loads(text) == {"name": "Ada", "age": 36}
    assert chunks[-1].choices[0].finish_reason == "stop"
    _check_mocks(env)


def test_bedrock_stream_error_event(env: Env) -> None:
    messages = [{"role": "user", "content": "BEDROCK_STREAM_ERROR please"}]
    stream = env.client().chat.completions.create(
        model="claude",
        stream=True,
        messages=messages,  # type: ignore[arg-type]
    )
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert "Too many tokens." in info.value.message
