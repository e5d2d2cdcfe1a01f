"""Envoy configuration generated from the LLMux config, checked by Envoy itself."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from llmux_extproc.control import envoy_config, envoy_routing
from llmux_extproc.control.config import parse_config
from llmux_extproc.control.controlplane import ControlPlane
from llmux_extproc.control.envoy_binary import find_envoy
from llmux_extproc.control.envoy_config import RuntimePaths
from llmux_extproc.control.envoy_routing import group_cluster_name

CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params: {model: openai/gpt-4o, api_key: k}
  - model_name: gpt-4o-mini
    litellm_params: {model: openai/gpt-4o-mini, api_key: k}
  - model_name: llama
    litellm_params: {model: hosted_vllm/llama, api_base: "http://127.0.0.1:8000/v1"}
  - model_name: local
    litellm_params: {model: ollama/llama3}
  - model_name: claude
    litellm_params: {model: anthropic/claude-sonnet-4-5, api_key: k}
  - model_name: mock
    litellm_params: {model: mock/gpt-4o-mini}
router_settings:
  num_retries: 1
  fallbacks: [{gpt-4o: [claude, llama]}]
  context_window_fallbacks: [{gpt-4o-mini: [gpt-4o]}]
llmux:
  listen: unix:/tmp/llmux-test.sock
  workers: 3
  max_request_body_bytes: 2000000
"""


def validate(doc: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "envoy.json"
    path.write_bytes(orjson.dumps(doc))
    result = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_configs_pass_envoy_validation(tmp_path: Path) -> None:
    config = parse_config(CONFIG)
    paths = RuntimePaths(tmp_path)
    validate(envoy_config.bootstrap(config, paths, static_clusters=True), tmp_path)
    # The running form reads clusters and routes from the CDS and RDS files, as `llmux run`
    # writes them.
    cds = envoy_config.cds_document(envoy_config.provider_clusters(config, paths), "1")
    paths.cds.write_bytes(orjson.dumps(cds))
    # As the control plane publishes them: resolved, with health and weights.
    published: list[list[dict[str, Any]]] = []
    control = ControlPlane(config, paths.sink_port, published.append)
    assert control.update(force=True) and not control.update()
    paths.cds.write_bytes(orjson.dumps(envoy_config.cds_document(published[0], "2")))
    paths.rds.write_bytes(orjson.dumps(envoy_config.rds_document(config, "1")))
    validate(envoy_config.bootstrap(config, paths), tmp_path)
    # The default config and one listening on TCP too.
    validate(
        envoy_config.bootstrap(parse_config("llmux: {listen: '0.0.0.0:4000'}"), paths), tmp_path
    )


def test_cds_document_validates_as_static_clusters(tmp_path: Path) -> None:
    config = parse_config(CONFIG)
    paths = RuntimePaths(tmp_path)
    doc = envoy_config.cds_document(envoy_config.provider_clusters(config, paths), "7")
    assert doc["version_info"] == "7"
    clusters = [{k: v for k, v in r.items() if k != "@type"} for r in doc["resources"]]
    boot = envoy_config.bootstrap(config, paths, static_clusters=True)
    boot["static_resources"]["clusters"] = boot["static_resources"]["clusters"][:3] + clusters
    validate(boot, tmp_path)


def _endpoints(cluster: dict[str, Any]) -> list[tuple[int, str]]:
    """(priority, deployment id) of every endpoint, as the processor reads them."""
    out = []
    for level in cluster["load_assignment"]["endpoints"]:
        for ep in level["lb_endpoints"]:
            priority, _, dep = ep["metadata"]["filter_metadata"]["llmux"]["d"].partition("|")
            assert int(priority) == level["priority"]
            out.append((level["priority"], dep))
    return out


def test_one_cluster_per_model_group_with_fallbacks_as_priorities() -> None:
    config = parse_config(CONFIG)
    ids = {d.model_name: d.id for d in config.deployments}
    paths = RuntimePaths(Path())
    clusters = {c["name"]: c for c in envoy_config.provider_clusters(config, paths)}
    assert set(clusters) == {envoy_routing.LOCAL_CLUSTER} | {
        group_cluster_name(name) for name in config.model_names
    }
    gpt = clusters[group_cluster_name("gpt-4o")]
    # Deployments are endpoints: the group's own first, then each fallback group in order.
    assert _endpoints(gpt) == [(0, ids["gpt-4o"]), (1, ids["claude"]), (2, ids["llama"])]
    assert _endpoints(clusters[group_cluster_name("gpt-4o-mini")]) == [
        (0, ids["gpt-4o-mini"]),
        (1, ids["gpt-4o"]),
    ]
    # Providers by name are resolved by Envoy; TLS (SNI, SAN) is chosen per endpoint.
    assert gpt["type"] == "STRICT_DNS"
    tls = {
        m["match"]["tls"]: m["transport_socket"]["typed_config"]
        for m in gpt["transport_socket_matches"]
    }
    assert set(tls) == {"api.openai.com", "api.anthropic.com"}
    assert tls["api.anthropic.com"]["sni"] == "api.anthropic.com"
    sans = tls["api.openai.com"]["common_tls_context"]["validation_context"]
    assert sans["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "api.openai.com"}}
    ]
    llama = clusters[group_cluster_name("llama")]
    assert llama["type"] == "STATIC" and "transport_socket_matches" not in llama
    # Every group cluster runs the processor once per attempt, as an upstream filter.
    filters = gpt["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]["http_filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.upstream_codec",
    ]
    assert filters[0]["typed_config"]["request_attributes"] == ["xds.upstream_host_metadata"]


def test_retry_policy_spans_the_group_then_its_fallbacks() -> None:
    config = parse_config(CONFIG)
    policy = envoy_routing.retry_policy(config, "gpt-4o")
    # num_retries 1: two attempts per group, three groups (gpt-4o, claude, llama).
    assert policy["num_retries"] == 5
    priority = policy["retry_priority"]["typed_config"]
    assert priority["update_frequency"] == 2
    assert policy["retry_host_predicate"][0]["name"].endswith("previous_hosts")
    assert "retriable-headers" in policy["retry_on"]
    # A group without fallbacks has no priorities to move through.
    assert "retry_priority" not in envoy_routing.retry_policy(config, "llama")


def _hcm(doc: dict[str, Any]) -> dict[str, Any]:
    listener = doc["static_resources"]["listeners"][0]
    return dict(listener["filter_chains"][0]["filters"][0]["typed_config"])


def test_listener_filters_and_routes(tmp_path: Path) -> None:
    config = parse_config(CONFIG)
    doc = envoy_config.bootstrap(config, RuntimePaths(tmp_path))
    assert doc["static_resources"]["listeners"][0]["address"] == {
        "pipe": {"path": "/tmp/llmux-test.sock"}
    }
    hcm = _hcm(doc)
    names = [f["name"] for f in hcm["http_filters"]]
    # No downstream processor: the processor runs per attempt on the group clusters.
    assert "envoy.filters.http.ext_proc" not in names
    # Client-sent x-llmux-* headers go first, before anything reads headers or routes.
    assert names[0] == "envoy.filters.http.header_mutation"
    assert names[-8:] == [
        # Before everything that reads the body (issue 10: gzip bodies are decompressed).
        "envoy.filters.http.decompressor",
        "envoy.filters.http.header_to_metadata",
        "envoy.filters.http.json_to_metadata",
        envoy_routing.ALIAS_FILTER,
        envoy_routing.PROMPT_FILTER,
        "envoy.filters.http.lua",
        "envoy.filters.http.sse_to_metadata",
        "envoy.filters.http.router",
    ]
    mutations = hcm["http_filters"][names.index("envoy.filters.http.header_mutation")]
    (removed,) = mutations["typed_config"]["mutations"]["request_mutations"]
    assert removed == {"remove_on_match": {"key_matcher": {"prefix": "x-llmux-"}}}
    assert envoy_routing.RETRY_HEADER.startswith("x-llmux-")
    assert envoy_routing.MARKS_HEADER.startswith("x-llmux-")
    keys = hcm["http_filters"][names.index("envoy.filters.http.header_to_metadata")]
    rules = {r["header"]: r for r in keys["typed_config"]["request_rules"]}
    # Client keys leave the request (kept in metadata for every attempt); the path stays.
    assert all(rules[h]["remove"] for h in envoy_routing.CLIENT_KEY_HEADERS)
    assert not rules[":path"].get("remove")
    # ext_proc streams end with a half-close the processor answers, not a reset (which made
    # grpcio leak per request; see docs/benchmarks.md, Soak).
    layer = doc["layered_runtime"]["layers"][0]
    assert layer["static_layer"]["envoy.reloadable_features.ext_proc_graceful_grpc_close"]
    assert hcm["rds"]["route_config_name"] == envoy_routing.ROUTE_CONFIG
    (route_config,) = envoy_config.rds_document(config, "1")["resources"]
    routes = route_config["virtual_hosts"][0]["routes"]
    # Per group: the streamed route (idle timeout; the prompt kept) first, then the
    # whole-answer one, which pays for no Lua on its way in.
    # First of all: a body in an encoding Envoy did not undo is refused (415).
    assert routes[0]["direct_response"]["status"] == 415
    routes = routes[1:]
    assert routes[0]["route"]["idle_timeout"] == "60.000s"
    assert envoy_routing.PROMPT_FILTER in routes[0]["typed_per_filter_config"]
    assert "typed_per_filter_config" not in routes[1]
    assert routes[0]["route"]["cluster"] == routes[1]["route"]["cluster"]
    assert routes[-1]["direct_response"]["status"] == 404


def test_one_extproc_endpoint_per_worker(tmp_path: Path) -> None:
    config = parse_config(CONFIG)
    doc = envoy_config.bootstrap(config, RuntimePaths(tmp_path))
    extproc = doc["static_resources"]["clusters"][0]
    endpoints = extproc["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["pipe"]["path"] for e in endpoints] == [
        str(tmp_path / f"extproc-{i}.sock") for i in range(3)
    ]


@pytest.mark.parametrize("access_log", ["off", "/tmp/llmux-access.log"])
def test_access_log_targets(access_log: str, tmp_path: Path) -> None:
    config = parse_config(f"llmux: {{access_log: '{access_log}'}}")
    hcm = _hcm(envoy_config.bootstrap(config, RuntimePaths(tmp_path)))
    names = [log["name"] for log in hcm["access_log"]]
    # Stream accounting rides on the gRPC access log whatever the human-readable log does.
    assert names[-1] == "envoy.access_loggers.http_grpc"
    if access_log == "off":
        assert names == ["envoy.access_loggers.http_grpc"]
    else:
        assert hcm["access_log"][0]["typed_config"]["path"] == access_log
