"""Config parsing and validation: LiteLLM's format, LLMux's section, errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
router_settings: {routing_strategy: lowest-everything, cache_responses: true, made_up: 1}
foo: 1
"""
    )
    text = "\n".join(config.warnings)
    assert "lowest-everything" in text
    assert "router_settings.cache_responses: not supported yet" in text
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


# -- as LiteLLM users write it ------------------------------------------------------------------


def _readme_config() -> str:
    """The configuration example of the README, as it is printed there."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_readme_example_parses_as_meant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-readme")
    monkeypatch.setenv("LLMUX_MASTER_KEY", "master")
    monkeypatch.setenv("DATABASE_URL", "postgresql://llmux@db.example/llmux")
    text = _readme_config()
    config = parse_config(text)
    assert config.database_url == "postgresql://llmux@db.example/llmux"
    s = config.settings
    assert (str(s.listen), str(s.admin), str(s.metrics)) == (
        "0.0.0.0:4000",
        "127.0.0.1:9901",
        "127.0.0.1:9464",
    )
    assert (s.workers, s.request_timeout_s, s.stream_idle_timeout_s) == (2, 600, 60)
    assert s.access_log == "stdout" and s.max_request_body_bytes == 33554432
    assert s.breaker["failure_rate"] == 0.5 and s.breaker["open_s"] == 30
    # Each alternative the README's comments offer, written the same way.
    for line, expect in (
        ("access_log: off", "off"),
        ("access_log: /var/log/llmux.log", "/var/log/llmux.log"),
    ):
        variant = text.replace("access_log: stdout", line.split(" #")[0])
        assert parse_config(variant).settings.access_log == expect
    variant = text.replace("listen: 0.0.0.0:4000", "listen: unix:/run/llmux/llmux.sock")
    assert parse_config(variant).settings.listen.path == "/run/llmux/llmux.sock"


def test_access_log_true_is_refused_with_what_to_write() -> None:
    with pytest.raises(ConfigError, match=r"llmux\.access_log: write stdout, off or a file path"):
        parse_config("llmux: {access_log: on}")


def test_bedrock_runtime_endpoint_as_litellm_orders_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_BEDROCK_RUNTIME_ENDPOINT", raising=False)
    base = "model_list: [{model_name: b, litellm_params: {model: bedrock/m, %s}}]"
    region = "aws_region_name: eu-west-1"

    def host(params: str) -> str:
        upstream = parse_config(base % params).deployments[0].upstream
        assert upstream is not None
        return f"{upstream.scheme}://{upstream.authority}"

    assert host(region) == "https://bedrock-runtime.eu-west-1.amazonaws.com"
    vpce = "https://vpce-1a2b.bedrock-runtime.eu-west-1.vpce.amazonaws.com"
    assert host(f"{region}, aws_bedrock_runtime_endpoint: '{vpce}'") == vpce
    monkeypatch.setenv("AWS_BEDROCK_RUNTIME_ENDPOINT", "http://bedrock-proxy.internal:8080")
    assert host(region) == "http://bedrock-proxy.internal:8080"
    # The parameter wins over the variable, api_base over both.
    assert host(f"{region}, aws_bedrock_runtime_endpoint: '{vpce}'") == vpce
    assert host(f"{region}, api_base: 'https://explicit.example'") == "https://explicit.example"
    assert parse_config(base % region).warnings == ()


@pytest.mark.parametrize(
    ("provider", "variable"),
    [
        ("openai", "OPENAI_BASE_URL"),
        ("openai", "OPENAI_API_BASE"),
        ("azure", "AZURE_API_BASE"),
        ("anthropic", "ANTHROPIC_API_BASE"),
        ("gemini", "GEMINI_API_BASE"),
        ("hosted_vllm", "HOSTED_VLLM_API_BASE"),
        ("ollama", "OLLAMA_API_BASE"),
        ("groq", "GROQ_API_BASE"),
    ],
)
def test_litellm_endpoint_variables(
    monkeypatch: pytest.MonkeyPatch, provider: str, variable: str
) -> None:
    for name in ("OPENAI_BASE_URL", "OPENAI_API_BASE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "http://gateway-proxy.internal:9000/v1")
    text = f"model_list: [{{model_name: m, litellm_params: {{model: {provider}/x}}}}]"
    upstream = parse_config(text).deployments[0].upstream
    assert upstream is not None
    assert (upstream.host, upstream.port, upstream.base_path) == (
        "gateway-proxy.internal",
        9000,
        "/v1",
    )
    # litellm_params.api_base (or LiteLLM's alias base_url) still wins.
    for key in ("api_base", "base_url"):
        explicit = text.replace("x}", f"x, {key}: 'https://own.example/v1'}}")
        upstream = parse_config(explicit).deployments[0].upstream
        assert upstream is not None and upstream.host == "own.example"


def test_vertex_ai_aliases_are_the_same_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VERTEXAI_LOCATION", raising=False)
    config = parse_config(
        "model_list: [{model_name: g, litellm_params: {model: vertex_ai/gemini-2.0-flash,"
        " vertex_ai_project: p1, vertex_ai_location: europe-west4}}]"
    )
    dep = config.deployments[0]
    assert dep.params["vertex_project"] == "p1" and dep.params["vertex_location"] == "europe-west4"
    assert (
        dep.upstream is not None and dep.upstream.host == "europe-west4-aiplatform.googleapis.com"
    )
    assert config.warnings == ()


def test_unknown_litellm_params_are_warned_by_name() -> None:
    config = parse_config(
        "model_list: [{model_name: m, litellm_params: {model: openai/x, api_key: k,"
        " temperature: 0.1, aws_region_name: us-east-1, rpm: 3, input_cost_per_token: 0.1}}]"
    )
    assert sorted(config.warnings) == [
        "model_list[0].litellm_params.aws_region_name: not used by LLMux for provider 'openai';"
        " ignored",
        "model_list[0].litellm_params.temperature: not used by LLMux for provider 'openai';"
        " ignored",
    ]


@pytest.mark.parametrize(
    ("api_base", "message"),
    [
        ("http://10.0.0.256:8000/v1", "'10.0.0.256' in 'http://10.0.0.256:8000/v1' is not an IPv4"),
        ("http://1.2.3.4x.5/v1", "is neither an IP address nor a name"),
        ("http://-bad.example/v1", "is not a valid host name"),
        ("http://[fe80::zz]/v1", "expected an http(s) URL"),
        ("http://127.0.0.1:0/v1", "bad port"),
    ],
)
def test_hosts_envoy_could_never_reach_are_refused(api_base: str, message: str) -> None:
    text = f"model_list: [{{model_name: m, litellm_params: {{model: openai/x, api_base: '{api_base}'}}}}]"
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert "model_list[0].litellm_params.api_base" in str(info.value)
    assert message in str(info.value)


def test_valid_hosts_are_taken() -> None:
    for api_base in (
        "http://10.0.0.255:8000/v1",
        "http://[::1]:8000/v1",
        "https://my_service.internal",
        "https://example-resource.openai.azure.com",
    ):
        text = f"model_list: [{{model_name: m, litellm_params: {{model: openai/x, api_base: '{api_base}'}}}}]"
        assert parse_config(text).deployments[0].upstream is not None


@pytest.mark.parametrize(
    ("router", "env", "url"),
    [
        ({"redis_url": "redis://h:1/2"}, {}, "redis://h:1/2"),
        (
            {"redis_host": "h", "redis_port": 7000, "redis_password": "p@ss"},
            {},
            "redis://:p%40ss@h:7000/0",
        ),
        ({"redis_host": "os.environ/RH"}, {"RH": "from-env"}, "redis://from-env:6379/0"),
        ({}, {"REDIS_URL": "redis://u:6/0", "REDIS_HOST": "ignored"}, "redis://u:6/0"),
        (
            {},
            {"REDIS_HOST": "e", "REDIS_PORT": "6380", "REDIS_PASSWORD": "x"},
            "redis://:x@e:6380/0",
        ),
        ({}, {}, None),
    ],
)
def test_redis_settings_as_litellm_reads_them(
    router: dict[str, object], env: dict[str, str], url: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = parse_config(yaml.safe_dump({"model_list": [], "router_settings": router}))
    assert config.redis_url == url
    assert not [w for w in config.warnings if "redis" in w]


def test_unsupported_general_and_litellm_settings_are_warnings_naming_them() -> None:
    config = parse_config(
        """
model_list:
  - model_name: m
    litellm_params: {model: mock/gpt-4o-mini}
general_settings:
  master_key: sk-1
  user_api_key_cache_ttl: 5
  alerting: [slack]
litellm_settings:
  drop_params: true
  num_retries: 2
  success_callback: [langfuse, prometheus]
  set_verbose: true
"""
    )
    assert sorted(config.warnings) == [
        "general_settings.alerting: not supported by LLMux, ignored",
        "litellm_settings.set_verbose: not supported by LLMux, ignored",
        "litellm_settings.success_callback: 'langfuse' not supported by LLMux, ignored",
    ]
    assert config.litellm_metrics  # prometheus is honoured
    assert config.router.num_retries == 2  # read from litellm_settings, as LiteLLM does
