"""Self-healing, drain and health: the pure parts (back-off, exit reasons, settings, the
Envoy configuration that does the work). The behaviour is in test_e2e_resilience.py."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import pytest

from llmux_extproc.control import envoy_config
from llmux_extproc.control.config import ConfigError, parse_config
from llmux_extproc.control.envoy_config import RuntimePaths
from llmux_extproc.control.supervisor import ENVOY_MAX_QUICK_CRASHES, exit_reason, restart_delay

MOCK = "model_list: [{model_name: m, litellm_params: {model: mock/gpt-4o-mini}}]\n"


def _bootstrap(extra: str = "") -> dict[str, Any]:
    config = parse_config(MOCK + "llmux: {workers: 3" + extra + "}\n")
    return envoy_config.bootstrap(config, RuntimePaths(Path("/run/llmux")))


def _filters(doc: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters: list[dict[str, Any]] = hcm["typed_config"]["http_filters"]
    return filters


def _extproc_cluster(doc: dict[str, Any]) -> dict[str, Any]:
    clusters = doc["static_resources"]["clusters"]
    return next(c for c in clusters if c["name"] == "llmux_extproc")


def test_restart_back_off_grows_and_is_capped() -> None:
    delays = [restart_delay(n) for n in range(1, 10)]
    assert delays[0] == 0  # the first death: restarted at once
    assert delays == sorted(delays)
    assert delays[1] > 0
    assert max(delays) == 10
    assert ENVOY_MAX_QUICK_CRASHES >= 3


def test_exit_reason_names_the_signal_or_code() -> None:
    assert exit_reason(-signal.SIGKILL) == "killed by signal SIGKILL"
    assert exit_reason(-signal.SIGSEGV) == "killed by signal SIGSEGV"
    assert exit_reason(2) == "exit code 2"


def test_drain_timeout_setting() -> None:
    assert parse_config(MOCK).settings.drain_timeout_s == 60
    assert parse_config(MOCK + "llmux: {drain_timeout: 5}\n").settings.drain_timeout_s == 5
    with pytest.raises(ConfigError, match=r"llmux\.drain_timeout"):
        parse_config(MOCK + "llmux: {drain_timeout: 0}\n")


def test_extproc_cluster_is_health_checked_with_grpc_and_ejects_dead_workers() -> None:
    cluster = _extproc_cluster(_bootstrap())
    assert len(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 3
    (check,) = cluster["health_checks"]
    assert "grpc_health_check" in check
    for key in ("interval", "no_traffic_interval", "unhealthy_interval"):
        assert float(check[key].rstrip("s")) <= 1, key
    outlier = cluster["outlier_detection"]
    assert outlier["split_external_local_origin_errors"] is True
    assert outlier["consecutive_local_origin_failure"] == 1
    assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
    assert cluster["common_lb_config"]["update_merge_window"] == "0s"


def test_readiness_is_envoys_health_check_filter_on_the_workers() -> None:
    doc = _bootstrap()
    (hc,) = [f for f in _filters(doc) if f["name"] == "envoy.filters.http.health_check"]
    config = hc["typed_config"]
    assert config["pass_through_mode"] is False
    assert set(config["cluster_min_healthy_percentages"]) == {"llmux_extproc"}
    regex = config["headers"][0]["string_match"]["safe_regex"]["regex"]
    for path in ("/health/ready", "/health/readiness"):
        assert re.fullmatch(regex, path)
    for path in ("/health/live", "/health/liveliness", "/health", "/v1/chat/completions"):
        assert not re.fullmatch(regex, path)


def test_drain_refuses_new_requests_except_liveness_and_metrics() -> None:
    doc = _bootstrap()
    names = [f["name"] for f in _filters(doc)]
    # Right after readiness, which comes right after removing clients' x-llmux-* headers.
    assert (
        names.index("envoy.filters.http.fault")
        == names.index("envoy.filters.http.health_check") + 1
    )
    (fault,) = [f for f in _filters(doc) if f["name"] == "envoy.filters.http.fault"]
    config = fault["typed_config"]
    assert config["abort"]["http_status"] == 503
    assert config["abort"]["percentage"] == {"numerator": 0}  # off until llmux run drains
    assert config["abort_percent_runtime"] == envoy_config.DRAINING_RUNTIME_KEY
    (match,) = config["headers"]
    assert match["invert_match"] is True
    regex = match["string_match"]["safe_regex"]["regex"]
    assert re.fullmatch(regex, "/health/live") and re.fullmatch(regex, "/metrics")
    assert not re.fullmatch(regex, "/v1/chat/completions")
    layers = doc["layered_runtime"]["layers"]
    assert {"name": "admin", "admin_layer": {}} in layers  # runtime_modify needs it
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    first = hcm["typed_config"]["local_reply_config"]["mappers"][0]
    assert first["filter"] == {"response_flag_filter": {"flags": ["FI"]}}
