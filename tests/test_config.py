"""Config parsing and validation: LiteLLM's format, LLMux's section, errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmux_extproc.control.config import ConfigError, load_config, parse_config

LITELLM_CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_key: os.environ/TEST_OPENAI_KEY
      rpm: 100
      tpm: 20000
    model_info:
      id: gpt4o-primary
  - model_name: gpt-4o
    litellm_params:
      model: azure/my-gpt4o
      api_base: https://example-resource.openai.azure.com
      api_key: azure-key
      api_version: "2024-10-21"
      rpm: 300
  - model_name: llama
    litellm_params:
      model: hosted_vllm/meta-llama/Llama-3.1-8B-Instruct
      api_base: http://10.0.0.5:8000/v1
      timeout: 30
      input_cost_per_token: 0.0000001
router_settings:
  routing_strategy: simple-shuffle
  num_retries: 2
litellm_settings:
  drop_params: true
  success_callback: ["langfuse"]
general_settings:
  master_key: sk-1234
"""


def test_litellm_config_parses_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-from-env")
    config = parse_config(LITELLM_CONFIG)
    assert config.model_names == ["gpt-4o", "llama"]
    openai, azure, llama = config.deployments
    assert (openai.provider, openai.model, openai.api_key) == ("openai", "gpt-4o", "sk-from-env")
    assert openai.id == "gpt4o-primary"
    assert openai.upstream is not None and openai.upstream.authority == "api.openai.com"
    assert (
        openai.upstream.tls and openai.upstream.port == 443 and openai.upstream.base_path == "/v1"
    )
    assert (openai.rpm, openai.tpm) == (100, 20000)
    assert azure.params["api_version"] == "2024-10-21"
    assert llama.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert llama.upstream is not None and not llama.upstream.tls and llama.upstream.port == 8000
    assert llama.upstream.cluster == "llm_10.0.0.5_8000"
    assert llama.timeout_s == 30
    assert all(d.drop_params for d in config.deployments)
    assert config.master_key == "sk-1234"
    assert config.num_retries == 2


def test_deployment_ids_are_stable_across_parses() -> None:
    a = parse_config(LITELLM_CONFIG.replace("os.environ/TEST_OPENAI_KEY", "k"))
    b = parse_config(LITELLM_CONFIG.replace("os.environ/TEST_OPENAI_KEY", "k"))
    assert [d.id for d in a.deployments] == [d.id for d in b.deployments]
    assert len({d.id for d in a.deployments}) == 3


def test_unsupported_litellm_settings_are_warned_not_silently_dropped() -> None:
    config = parse_config(
        """
model_list: []
router_settings: {routing_strategy: lowest-everything, redis_host: r, made_up: 1}
foo: 1
"""
    )
    text = "\n".join(config.warnings)
    assert "lowest-everything" in text
    assert "router_settings.redis_host: not supported yet" in text
    assert "router_settings.made_up: unknown setting" in text
    assert "foo: unknown section" in text


ROUTER = """
model_list:
  - {model_name: gpt, litellm_params: {model: openai/gpt-4o, api_key: k}}
  - {model_name: claude, litellm_params: {model: anthropic/claude-sonnet-4-5, api_key: k}}
  - {model_name: big, litellm_params: {model: openai/gpt-4.1, api_key: k}}
router_settings:
  routing_strategy: latency-based-routing
  routing_strategy_args: {lowest_latency_buffer: 0.2}
  num_retries: 2
  retry_policy: {BadRequestErrorRetries: 0, RateLimitErrorRetries: 0, AuthenticationErrorRetries: 0}
  timeout: 30
  fallbacks: [{gpt: [claude]}]
  context_window_fallbacks: [{gpt: [big]}]
  default_fallbacks: [big]
  allowed_fails: 2
  cooldown_time: 7
"""


def test_litellm_router_settings_are_honoured() -> None:
    router = parse_config(ROUTER).router
    assert router.routing_strategy == "latency-based-routing"
    assert router.routing_strategy_args == {"lowest_latency_buffer": 0.2}
    assert (router.num_retries, router.timeout_s) == (2, 30.0)
    assert (router.allowed_fails, router.cooldown_time_s) == (2, 7.0)
    # Classes switched off are not retried; the rest keep LiteLLM's retriable statuses.
    statuses = router.retriable_statuses()
    assert 429 not in statuses and 401 not in statuses
    assert {500, 503, 408, 404} <= statuses
    # Fallbacks in the order attempts reach them; default_fallbacks only where a group
    # has none of its own.
    assert router.fallback_groups("gpt") == (("fallback", "claude"), ("context_window", "big"))
    assert router.fallback_groups("claude") == (("fallback", "big"),)


def test_fallbacks_must_name_model_groups() -> None:
    with pytest.raises(ConfigError, match=r"fallbacks: 'nope' is not a model_name"):
        parse_config(ROUTER.replace("[{gpt: [claude]}]", "[{gpt: [nope]}]"))


def test_provider_key_falls_back_to_the_standard_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-std")
    config = parse_config("model_list: [{model_name: m, litellm_params: {model: openai/gpt-4o}}]")
    assert config.deployments[0].api_key == "sk-std"


def test_environment_variables_section_feeds_os_environ_references() -> None:
    config = parse_config(
        """
environment_variables: {MY_KEY: from-section}
model_list: [{model_name: m, litellm_params: {model: openai/gpt-4o, api_key: os.environ/MY_KEY}}]
"""
    )
    assert config.deployments[0].api_key == "from-section"


def test_llmux_settings() -> None:
    config = parse_config(
        """
llmux:
  listen: unix:/tmp/llmux.sock
  admin: 127.0.0.1:9902
  workers: 2
  request_timeout: 120
  max_request_body_bytes: 1048576
"""
    )
    s = config.settings
    assert s.listen.path == "/tmp/llmux.sock" and str(s.listen) == "unix:/tmp/llmux.sock"
    assert (s.admin.host, s.admin.port) == ("127.0.0.1", 9902)
    assert s.workers == 2 and s.request_timeout_s == 120 and s.max_request_body_bytes == 1048576


def test_embedded_default_config_serves_the_mock() -> None:
    config = load_config(None)
    assert "llmux-mock" in config.model_names
    assert all(d.provider == "mock" and d.upstream is None for d in config.deployments)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model_list: [{model_name: m, litellm_params: {model: gpt-4o}}]",
            "model_list[0].litellm_params.model: expected 'provider/model'",
        ),
        (
            "model_list: [{model_name: m, litellm_params: {model: nope/x}}]",
            "provider 'nope' is not supported",
        ),
        ("model_list: [{litellm_params: {model: openai/x}}]", "model_list[0].model_name"),
        (
            "model_list: [{model_name: m, litellm_params: {model: openai/x, api_key: os.environ/MISSING_VAR_X}}]",
            "MISSING_VAR_X",
        ),
        (
            "model_list: [{model_name: m, litellm_params: {model: openai/x, api_base: ftp://h}}]",
            "api_base: expected an http(s) URL",
        ),
        (
            "model_list: [{model_name: m, litellm_params: {model: openai/x, rpm: -1}}]",
            "litellm_params.rpm",
        ),
        (
            "model_list: [{model_name: m, litellm_params: {model: openai/x, timeout: 0}}]",
            "litellm_params.timeout",
        ),
        (
            "model_list: [{model_name: m, litellm_params: {model: openai/x, input_cost_per_token: cheap}}]",
            "input_cost_per_token",
        ),
        (
            "model_list: [{model_name: m, litellm_params: {model: hosted_vllm/x}}]",
            "api_base: required",
        ),
        (
            "model_list: [{model_name: a, litellm_params: {model: openai/x}, model_info: {id: same}}, {model_name: b, litellm_params: {model: openai/y}, model_info: {id: same}}]",
            "duplicate model_info.id",
        ),
        ("model_list: {a: 1}", "model_list: must be a list"),
        ("llmux: {listen: 4000}", "llmux.listen"),
        ("llmux: {listen: 'host:notaport'}", "llmux.listen: expected 'host:port'"),
        ("llmux: {workers: 0}", "llmux.workers"),
        ("llmux: {colour: blue}", "unknown setting(s) ['colour']"),
        ("general_settings: {master_key: ''}", "general_settings.master_key"),
        ("[1, 2]", "top level must be a mapping"),
        ("model_list: [", "not valid YAML"),
    ],
)
def test_invalid_configs_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert message in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_deployments_on_one_host_share_a_cluster_whatever_their_paths() -> None:
    config = parse_config(
        """
model_list:
  - {model_name: a, litellm_params: {model: hosted_vllm/a, api_base: "http://10.0.0.5:8000/v1"}}
  - {model_name: b, litellm_params: {model: hosted_vllm/b, api_base: "http://10.0.0.5:8000/other/v1"}}
"""
    )
    assert [u.cluster for u in config.upstreams] == ["llm_10.0.0.5_8000"]
    a, b = config.deployments
    assert a.upstream is not None and b.upstream is not None
    assert (a.upstream.base_path, b.upstream.base_path) == ("/v1", "/other/v1")
