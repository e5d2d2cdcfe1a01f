"""LiteLLM configs as they are written, against real Envoy and workers: Bedrock's
`aws_bedrock_runtime_endpoint` (and LiteLLM's endpoint variables) are where requests go,
an unknown litellm_params key is a warning naming it, `access_log: off` is off, and a
parameter pair the newer Claude models refuse is answered with a 400 naming it (or fixed
up under drop_params), never forwarded to fail upstream."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from openai.types.chat import ChatCompletion

from tests.harness import (
    Gateway,
    MockUpstream,
    json_response,
    openai_chat_completion,
    running_gateway,
)
from tests.mock_anthropic import API_KEY as ANTHROPIC_KEY
from tests.mock_anthropic import AnthropicMock

pytest.importorskip("botocore")

from tests import mock_bedrock as mb

pytestmark = pytest.mark.e2e

SONNET_45 = "claude-sonnet-4-5-20250929"
SONNET_35 = "claude-3-5-sonnet-20240620"
BEDROCK_SONNET_45 = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.openai_base, api_key="anything", max_retries=0)


def hello(gw: Gateway, model: str, **extra: Any) -> ChatCompletion:
    reply: ChatCompletion = client(gw).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], **extra
    )
    return reply


def bedrock(name: str, model: str, **params: Any) -> dict[str, Any]:
    return {
        "model_name": name,
        "litellm_params": {
            "model": f"bedrock/{model}",
            "aws_access_key_id": mb.ACCESS_KEY,
            "aws_secret_access_key": mb.SECRET_KEY,
            "aws_region_name": mb.REGION,
            **params,
        },
    }


def anthropic(name: str, model: str, base: str, **params: Any) -> dict[str, Any]:
    return {
        "model_name": name,
        "litellm_params": {
            "model": f"anthropic/{model}",
            "api_base": base,
            "api_key": ANTHROPIC_KEY,
            **params,
        },
    }


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Any]]:
    handlers: dict[str, Any] = {
        "bedrock": mb.BedrockMock(),
        "bedrock_env": mb.BedrockMock(),
        "anthropic": AnthropicMock(),
    }
    servers = {name: MockUpstream(h).start() for name, h in handlers.items()}
    yield {"handlers": handlers, "servers": servers}
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def gateway(
    upstreams: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    servers = upstreams["servers"]
    anthropic_base = servers["anthropic"].base_url
    config = {
        "model_list": [
            # The endpoint as LiteLLM users write it for a VPC endpoint or a proxy: no api_base.
            bedrock(
                "bedrock-endpoint",
                "anthropic.claude-3-5-sonnet-20240620-v1:0",
                aws_bedrock_runtime_endpoint=servers["bedrock"].base_url,
            ),
            # ... or from LiteLLM's variable (set for the gateway below).
            bedrock("bedrock-env", "anthropic.claude-3-5-sonnet-20240620-v1:0"),
            bedrock(
                "bedrock-sonnet-45",
                BEDROCK_SONNET_45,
                aws_bedrock_runtime_endpoint=servers["bedrock"].base_url,
            ),
            bedrock(
                "bedrock-sonnet-45-drop",
                BEDROCK_SONNET_45,
                aws_bedrock_runtime_endpoint=servers["bedrock"].base_url,
                drop_params=True,
            ),
            anthropic("sonnet-45", SONNET_45, anthropic_base, not_a_litellm_key="x"),
            anthropic("sonnet-45-drop", SONNET_45, anthropic_base, drop_params=True),
            anthropic("sonnet-35", SONNET_35, anthropic_base),
        ]
    }
    env = {"AWS_BEDROCK_RUNTIME_ENDPOINT": servers["bedrock_env"].base_url}
    with running_gateway(config, tmp_path_factory.mktemp("compat"), env=env) as gw:
        yield gw


# -- endpoints ---------------------------------------------------------------------------------


def test_bedrock_runtime_endpoint_is_where_requests_go(
    gateway: Gateway, upstreams: dict[str, Any]
) -> None:
    handlers, servers = upstreams["handlers"], upstreams["servers"]
    for name, key in (("bedrock-endpoint", "bedrock"), ("bedrock-env", "bedrock_env")):
        before = len(servers[key].requests)
        reply = hello(gateway, name)
        assert reply.choices[0].message.content
        assert len(servers[key].requests) == before + 1
        # Signed for the configured region, for the host it reached (botocore re-checks).
        assert handlers[key].failures == []
        assert f"/{mb.REGION}/bedrock/aws4_request" in servers[key].last().headers["authorization"]
    assert hello(gateway, "bedrock-endpoint").choices[0].message.content  # and the next one


# -- config keys as written ----------------------------------------------------------------------


def test_unknown_litellm_param_is_a_warning_naming_it(gateway: Gateway, tmp_path: Path) -> None:
    warning = "model_list[4].litellm_params.not_a_litellm_key: not used by LLMux"
    assert warning in gateway.log()
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": "m",
                        "litellm_params": {"model": "mock/m", "temperature": 0.2},
                    }
                ]
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "llmux_extproc", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "warning: model_list[0].litellm_params.temperature: not used by LLMux" in done.stdout


def test_access_log_off_as_the_readme_writes_it(tmp_path: Path) -> None:
    async def answer(request: Any, body: bytes) -> Any:
        return json_response(openai_chat_completion("m", "ok"))

    upstream = MockUpstream(answer).start()
    try:
        base = {
            "model_list": [
                {
                    "model_name": "gpt",
                    "litellm_params": {
                        "model": "openai/gpt-4o",
                        "api_base": f"{upstream.base_url}/v1",
                        "api_key": "k",
                    },
                }
            ]
        }
        # The README's bare `off` is YAML's false (test_config parses the README itself).
        with running_gateway({**base, "llmux": {"access_log": False}}, tmp_path) as gw:
            assert yaml.safe_load("access_log: off") == {"access_log": False}
            assert "access_log: false" in gw.config_path.read_text()
            for _ in range(3):
                assert hello(gw, "gpt").choices[0].message.content == "ok"
            time.sleep(1.5)  # Envoy flushes its access log every second
            assert '"request_id"' not in gw.log()
    finally:
        upstream.stop()


# -- the temperature + top_p pair -------------------------------------------------------------


def test_claude_temperature_with_top_p_is_refused_naming_both(
    gateway: Gateway, upstreams: dict[str, Any]
) -> None:
    servers, handlers = upstreams["servers"], upstreams["handlers"]
    for name, key in (("sonnet-45", "anthropic"), ("bedrock-sonnet-45", "bedrock")):
        before = len(servers[key].requests)
        with pytest.raises(openai.BadRequestError) as info:
            hello(gateway, name, temperature=0.3, top_p=0.9)
        err = info.value.body
        assert isinstance(err, dict)
        assert "'temperature' together with 'top_p'" in err["message"]
        assert err["param"] == "top_p" and err["type"] == "invalid_request_error"
        assert len(servers[key].requests) == before  # never forwarded
        # Either alone is fine, and the gateway serves the next request.
        assert hello(gateway, name, temperature=0.3).choices[0].message.content
        assert hello(gateway, name, top_p=0.9).choices[0].message.content
    assert handlers["anthropic"].rejected == []
    assert handlers["bedrock"].failures == []


def test_claude_pair_under_drop_params_keeps_temperature(
    gateway: Gateway, upstreams: dict[str, Any]
) -> None:
    servers, handlers = upstreams["servers"], upstreams["handlers"]
    assert hello(gateway, "sonnet-45-drop", temperature=0.3, top_p=0.9).choices[0].message.content
    sent = servers["anthropic"].last().json()
    assert sent["temperature"] == 0.3 and "top_p" not in sent
    reply = hello(gateway, "bedrock-sonnet-45-drop", temperature=0.3, top_p=0.9)
    assert reply.choices[0].message.content
    inference = servers["bedrock"].last().json()["inferenceConfig"]
    assert inference["temperature"] == 0.3 and "topP" not in inference
    # Older models take both, and get both.
    assert hello(gateway, "sonnet-35", temperature=0.3, top_p=0.9).choices[0].message.content
    sent = servers["anthropic"].last().json()
    assert (sent["temperature"], sent["top_p"]) == (0.3, 0.9)
    assert handlers["anthropic"].rejected == [] and handlers["bedrock"].failures == []
