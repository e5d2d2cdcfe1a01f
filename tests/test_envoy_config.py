"""Envoy configuration generated from the LLMux config, checked by Envoy itself."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from llmux_extproc import envoy_config
from llmux_extproc.config import parse_config
from llmux_extproc.envoy_binary import find_envoy
from llmux_extproc.envoy_config import ROUTE_HEADER, STREAM_HEADER, RuntimePaths

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
    # The running form reads provider clusters from the CDS file, as `llmux run` writes it.
    cds = envoy_config.cds_document(envoy_config.provider_clusters(config), "1")
    paths.cds.write_bytes(orjson.dumps(cds))
    validate(envoy_config.bootstrap(config, paths), tmp_path)
    # The default config and one listening on TCP too.
    validate(
        envoy_config.bootstrap(parse_config("llmux: {listen: '0.0.0.0:4000'}"), paths), tmp_path
    )


def test_cds_document_validates_as_static_clusters(tmp_path: Path) -> None:
    config = parse_config(CONFIG)
    doc = envoy_config.cds_document(envoy_config.provider_clusters(config), "7")
    assert doc["version_info"] == "7"
    clusters = [{k: v for k, v in r.items() if k != "@type"} for r in doc["resources"]]
    boot = envoy_config.bootstrap(config, RuntimePaths(tmp_path), static_clusters=True)
    boot["static_resources"]["clusters"] = boot["static_resources"]["clusters"][:2] + clusters
    validate(boot, tmp_path)


def test_one_cluster_per_distinct_upstream() -> None:
    config = parse_config(CONFIG)
    clusters = {c["name"]: c for c in envoy_config.provider_clusters(config)}
    # Two OpenAI deployments share api.openai.com:443.
    assert set(clusters) == {
        "llm_api.openai.com_443_tls",
        "llm_127.0.0.1_8000",
        "llm_localhost_11434",
    }
    tls = clusters["llm_api.openai.com_443_tls"]
    assert tls["type"] == "LOGICAL_DNS"
    ctx = tls["transport_socket"]["typed_config"]
    assert ctx["sni"] == "api.openai.com"
    sans = ctx["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert sans == [{"san_type": "DNS", "matcher": {"exact": "api.openai.com"}}]
    assert clusters["llm_127.0.0.1_8000"]["type"] == "STATIC"
    assert "transport_socket" not in clusters["llm_127.0.0.1_8000"]


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
    assert names == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.lua",
        "envoy.filters.http.sse_to_metadata",
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]
    # The routing header is stripped from client requests before the processor runs.
    assert hcm["http_filters"][0]["typed_config"]["mutations"]["request_mutations"] == [
        {"remove": ROUTE_HEADER},
        {"remove": STREAM_HEADER},
    ]
    ext = hcm["http_filters"][3]["typed_config"]
    assert ext["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert ext["grpc_service"]["envoy_grpc"]["max_receive_message_length"] > 2_000_000
    # ext_proc streams end with a half-close the processor answers, not a reset (which made
    # grpcio leak per request; see docs/benchmarks.md, Soak).
    (layer,) = doc["layered_runtime"]["layers"]
    assert layer["static_layer"]["envoy.reloadable_features.ext_proc_graceful_grpc_close"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    # Streamed requests get an idle timeout; both routes drop the internal headers.
    assert routes[0]["route"]["idle_timeout"] == "60.000s"
    for route in routes[:2]:
        assert route["route"]["cluster_header"] == ROUTE_HEADER
        assert route["request_headers_to_remove"] == [ROUTE_HEADER, STREAM_HEADER]
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
