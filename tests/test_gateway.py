"""The request/response logic as plain objects: no Envoy, no gRPC."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from llmux_extproc.control.config import parse_config
from llmux_extproc.dataplane.context import DEFAULT_CALLER, Attempt, Caller, RequestContext
from llmux_extproc.dataplane.gateway import Forward, Gateway, Immediate

CONFIG = """
model_list:
  - model_name: gpt
    litellm_params: {model: openai/gpt-4o-2024-08-06, api_key: sk-up}
  - model_name: same-name
    litellm_params: {model: openai/same-name, api_base: "http://127.0.0.1:9000/v1"}
  - model_name: mock
    litellm_params: {model: mock/gpt-4o-mini, mock_response: "fixed answer"}
general_settings: {master_key: sk-master}
"""
AUTH = {"authorization": "Bearer sk-master"}


@pytest.fixture
def gateway() -> Gateway:
    return Gateway(parse_config(CONFIG))


def body(**fields: object) -> bytes:
    return orjson.dumps({"messages": [{"role": "user", "content": "hi"}], **fields})


def attempt(gw: Gateway, raw: bytes, number: int = 1) -> RequestContext:
    """The context of an attempt on the first deployment of the body's model group, as
    Envoy would choose it (the model's group cluster)."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    group = gw.state.config.group(model) if isinstance(model, str) else []
    return RequestContext(DEFAULT_CALLER, Attempt(number, group[0] if group else None))


def decide(gw: Gateway, raw: bytes, path: str = "/v1/chat/completions") -> Immediate | Forward:
    assert isinstance(gw.on_headers("POST", path, AUTH), Caller)
    return asyncio.run(gw.on_body(path, raw, attempt(gw, raw)))


def test_auth_in_every_header_clients_use(gateway: Gateway) -> None:
    for headers in (AUTH, {"api-key": "sk-master"}, {"x-api-key": "sk-master"}):
        assert isinstance(gateway.on_headers("POST", "/v1/chat/completions", headers), Caller)
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic sk-master"}):
        answer = gateway.on_headers("POST", "/v1/chat/completions", headers)
        assert isinstance(answer, Immediate) and answer.status == 401


def test_models_list_and_unknown_path(gateway: Gateway) -> None:
    models = gateway.on_headers("GET", "/v1/models?x=1", AUTH)
    assert isinstance(models, Immediate)
    assert [m["id"] for m in orjson.loads(models.body)["data"]] == ["gpt", "same-name", "mock"]
    unknown = gateway.on_headers("POST", "/v1/completions", AUTH)
    assert isinstance(unknown, Immediate) and unknown.status == 404


def test_openai_forward_rewrites_model_and_sets_provider_auth(gateway: Gateway) -> None:
    fwd = decide(gateway, body(model="gpt", temperature=0))
    assert isinstance(fwd, Forward)
    assert fwd.authority == "api.openai.com"
    up = fwd.upstream
    assert up.path == "/v1/chat/completions"
    assert up.headers["authorization"] == "Bearer sk-up"
    assert up.body is not None
    assert orjson.loads(up.body) == {
        "messages": [{"role": "user", "content": "hi"}],
        "model": "gpt-4o-2024-08-06",
        "temperature": 0,
    }
    assert fwd.remove_headers == ()  # a first attempt has nothing of another's to remove


def test_a_retry_removes_what_another_provider_may_have_set() -> None:
    gw = Gateway(parse_config(CONFIG))
    raw = body(model="gpt")
    fwd = asyncio.run(gw.on_body("/v1/chat/completions", raw, attempt(gw, raw, number=2)))
    assert isinstance(fwd, Forward)
    # Anthropic's and AWS's credentials from an earlier attempt never reach OpenAI; this
    # attempt's own authorization is set, not removed.
    assert {"x-api-key", "x-amz-security-token", "anthropic-version"} <= set(fwd.remove_headers)
    assert "authorization" not in fwd.remove_headers


def test_unchanged_body_is_not_reencoded(gateway: Gateway) -> None:
    fwd = decide(gateway, body(model="same-name"))
    assert isinstance(fwd, Forward)
    assert fwd.upstream.body is None  # forwarded as the client sent it
    assert "authorization" not in fwd.upstream.headers  # no key configured for it


def test_response_usage_cost_and_metrics_headers(gateway: Gateway) -> None:
    fwd = decide(gateway, body(model="gpt"))
    assert isinstance(fwd, Forward)
    upstream_body = orjson.dumps(
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 1000,
                "completion_tokens": 100,
                "prompt_tokens_details": {"cached_tokens": 400},
            },
        }
    )
    action = gateway.handle_response(fwd.exchange, 200, upstream_body)
    assert action.body is None and action.status == 200
    assert action.log["prompt_tokens"] == 1000 and action.log["completion_tokens"] == 100
    price = gateway.state.prices[fwd.exchange.dep.id]
    assert price is not None and price.input_cost_per_token and price.output_cost_per_token
    assert price.cache_read_input_token_cost is not None
    expected = (
        600 * price.input_cost_per_token
        + 400 * price.cache_read_input_token_cost
        + 100 * price.output_cost_per_token
    )
    assert float(action.headers["x-llmux-response-cost"]) == pytest.approx(expected, rel=1e-12)


def test_upstream_error_body_is_normalised(gateway: Gateway) -> None:
    fwd = decide(gateway, body(model="same-name"))
    assert isinstance(fwd, Forward)
    action = gateway.handle_response(fwd.exchange, 503, b"<html>overloaded</html>")
    assert action.status == 503 and action.body is not None
    err = orjson.loads(action.body)["error"]
    assert err["message"] == "<html>overloaded</html>"
    assert err["type"] == "service_unavailable_error"
    garbage = gateway.handle_response(fwd.exchange, 200, b"not json")
    assert garbage.status == 502


def test_mock_answers_inline(gateway: Gateway) -> None:
    answer = decide(gateway, body(model="mock"))
    assert isinstance(answer, Immediate) and answer.status == 200
    data = orjson.loads(answer.body)
    assert data["choices"][0]["message"]["content"] == "fixed answer"
    assert data["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("raw", "status", "param"),
    [
        (b"", 400, None),
        (b"{", 400, None),
        (b'"str"', 400, None),
        (orjson.dumps({"model": 3, "messages": []}), 400, "model"),
        (body(model="gpt", stream=1), 400, "stream"),
        (body(model="unknown"), 404, "model"),
        (orjson.dumps({"model": "gpt", "messages": [{"role": "user"}, "x"]}), 400, "messages[1]"),
    ],
)
def test_bad_requests(gateway: Gateway, raw: bytes, status: int, param: str | None) -> None:
    answer = decide(gateway, raw)
    assert isinstance(answer, Immediate)
    assert answer.status == status
    assert orjson.loads(answer.body)["error"]["param"] == param


def test_embeddings_need_input(gateway: Gateway) -> None:
    answer = decide(gateway, orjson.dumps({"model": "gpt", "input": []}), "/v1/embeddings")
    assert isinstance(answer, Immediate) and answer.status == 400


def test_body_limit(gateway: Gateway) -> None:
    small = Gateway(parse_config(CONFIG + "llmux: {max_request_body_bytes: 100}"))
    answer = decide(small, body(model="gpt", padding="x" * 200))
    assert isinstance(answer, Immediate) and answer.status == 413


def test_reload_swaps_state(gateway: Gateway) -> None:
    gateway.reload(
        parse_config("model_list: [{model_name: other, litellm_params: {model: mock/x}}]")
    )
    answer = decide(Gateway(parse_config(CONFIG)), body(model="gpt"))
    assert isinstance(answer, Forward)
    assert isinstance(gateway.on_headers("POST", "/v1/chat/completions", {}), Caller)
    ctx = RequestContext(DEFAULT_CALLER, Attempt(1, None))
    gone = asyncio.run(gateway.on_body("/v1/chat/completions", body(model="gpt"), ctx))
    assert isinstance(gone, Immediate) and gone.status == 404


def test_an_attempt_that_keeps_the_body_resets_its_length(gateway: Gateway) -> None:
    # Headers persist across Envoy's retries, bodies do not: an attempt forwarding the
    # client's body as is must not inherit the length a previous attempt's rewrite set.
    from llmux_extproc.dataplane.extproc import forward

    raw = body(model="same-name")
    fwd = decide(gateway, raw)
    assert isinstance(fwd, Forward) and fwd.upstream.body is None
    headers = {
        h.header.key: h.header.raw_value.decode()
        for h in forward(fwd).request_body.response.header_mutation.set_headers
    }
    assert headers["content-length"] == str(len(raw))


def test_virtual_keys_hit_the_cache_or_wait_for_one_query(gateway: Gateway) -> None:
    """A cached key is answered at once (its team in the context); an uncached one is a
    Pending answer; management paths need the master key. The store is never opened: a
    query would fail, which the uncached key shows as a 503."""
    from llmux_extproc.dataplane.gateway import Pending
    from llmux_extproc.db.keystore import KeyStore
    from llmux_extproc.policy.keys import ModelScope, Principal, hash_key

    gateway.keys = KeyStore("postgresql://nobody@127.0.0.1:1/none", 10)
    key = "sk-cached-key-0123456789"
    principal = Principal(
        token=hash_key(key), team_id="team-1", key_alias="ci", models=ModelScope.parse(["gpt"])
    )
    gateway.keys.cache.put(principal.token, principal)
    caller = gateway.on_headers("POST", "/v1/chat/completions", {"authorization": f"Bearer {key}"})
    assert isinstance(caller, Caller) and caller.principal is principal
    assert (caller.team, caller.key_alias, caller.admin) == ("team-1", "ci", False)
    again = gateway.on_headers("POST", "/v1/chat/completions", {"authorization": f"Bearer {key}"})
    assert again is caller  # built once per cached principal
    models = gateway.on_headers("GET", "/v1/models", {"authorization": f"Bearer {key}"})
    assert isinstance(models, Immediate)
    assert [m["id"] for m in orjson.loads(models.body)["data"]] == ["gpt"]
    raw = body(model="mock")
    ctx = RequestContext(caller, attempt(gateway, raw).attempt)
    denied = asyncio.run(gateway.on_body("/v1/chat/completions", raw, ctx))
    assert isinstance(denied, Immediate) and denied.status == 403
    manage = gateway.on_headers("POST", "/key/generate", {"authorization": f"Bearer {key}"})
    assert isinstance(manage, Immediate) and manage.status == 403
    assert gateway.on_headers("POST", "/key/generate", AUTH).admin  # type: ignore[union-attr]

    pending = gateway.on_headers("POST", "/v1/chat/completions", {"authorization": "Bearer sk-new"})
    assert isinstance(pending, Pending)

    async def resolve() -> Immediate | Caller:
        assert isinstance(pending, Pending)
        return await pending.answer

    answer = asyncio.run(resolve())
    assert isinstance(answer, Immediate) and answer.status == 503
    assert orjson.loads(answer.body)["error"]["type"] == "service_unavailable_error"
