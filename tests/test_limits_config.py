"""The `llmux:` limits for slow and idle clients, connections and overload: parsing, what
Envoy is given for them, and that a reload changing one is refused by name."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import pytest

from llmux_extproc.control import envoy_config, supervisor
from llmux_extproc.control.config import ConfigError, parse_config
from llmux_extproc.control.envoy_config import RuntimePaths
from llmux_extproc.control.envoy_routing import EXTPROC_CLUSTER
from tests.test_envoy_config import validate

BASE = """
model_list:
  - model_name: m
    litellm_params: {model: mock/x}
"""


def config(llmux: str = "") -> Any:
    return parse_config(BASE + ("llmux:\n" + llmux if llmux else ""))


def bootstrap(llmux: str = "") -> dict[str, Any]:
    paths = RuntimePaths(Path("/tmp/llmux-x"))
    return envoy_config.bootstrap(config(llmux), paths, static_clusters=True)


def hcm(doc: dict[str, Any]) -> dict[str, Any]:
    listener = doc["static_resources"]["listeners"][0]
    return dict(listener["filter_chains"][0]["filters"][0]["typed_config"])


def test_defaults() -> None:
    s = config().settings
    assert s.client_body_timeout_s == 60.0
    assert s.connection_idle_timeout_s == 120.0
    # The seed's 10,000 concurrent streams fit under the cap, with room for idle clients.
    assert s.max_connections == 12000 > 10000
    assert s.max_streams_per_worker == 512


def test_values_are_parsed_and_checked() -> None:
    s = config(
        "  client_body_timeout: 5\n  connection_idle_timeout: 7.5\n"
        "  max_connections: 300\n  max_streams_per_worker: 20\n"
    ).settings
    assert (s.client_body_timeout_s, s.connection_idle_timeout_s) == (5.0, 7.5)
    assert (s.max_connections, s.max_streams_per_worker) == (300, 20)
    for bad, where in [
        ("client_body_timeout: 0", "llmux.client_body_timeout"),
        ("connection_idle_timeout: -1", "llmux.connection_idle_timeout"),
        ("max_connections: 0", "llmux.max_connections"),
        ("max_connections: 1.5", "llmux.max_connections"),
        ("max_streams_per_worker: yes", "llmux.max_streams_per_worker"),
    ]:
        with pytest.raises(ConfigError, match=where):
            config("  " + bad + "\n")


def test_envoy_gets_the_timeouts_and_the_caps(tmp_path: Path) -> None:
    doc = bootstrap(
        "  client_body_timeout: 5\n  connection_idle_timeout: 7\n"
        "  max_connections: 300\n  max_streams_per_worker: 20\n  workers: 3\n"
    )
    manager = hcm(doc)
    assert manager["request_timeout"] == "5.000s"
    assert manager["common_http_protocol_options"] == {"idle_timeout": "7.000s"}
    (monitor,) = doc["overload_manager"]["resource_monitors"]
    assert monitor["name"] == "envoy.resource_monitors.global_downstream_max_connections"
    assert monitor["typed_config"]["max_active_downstream_connections"] == 300
    # Envoy's own connections to its sink listener never count against the clients' cap.
    listeners = doc["static_resources"]["listeners"]
    assert "ignore_global_conn_limit" not in listeners[0]
    assert listeners[1]["ignore_global_conn_limit"] is True
    (extproc,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == EXTPROC_CLUSTER]
    threshold = extproc["circuit_breakers"]["thresholds"][0]
    assert threshold["max_requests"] == 3 * 20
    # Envoy's access-log streams to the workers have a cluster of their own, uncapped.
    (logs,) = [
        c
        for c in doc["static_resources"]["clusters"]
        if c["name"] == envoy_config.EXTPROC_LOG_CLUSTER
    ]
    assert logs["load_assignment"]["endpoints"] == extproc["load_assignment"]["endpoints"]
    assert logs["circuit_breakers"]["thresholds"][0]["max_requests"] == 100000
    validate(doc, tmp_path)


def test_local_replies_for_limits() -> None:
    mappers = hcm(bootstrap("  client_body_timeout: 5\n"))["local_reply_config"]["mappers"]

    def expression_of(mapper: dict[str, Any]) -> str:
        status, cel = mapper["filter"]["and_filter"]["filters"]
        assert "status_code_filter" in status  # compared before any CEL is evaluated
        return str(cel["extension_filter"]["typed_config"]["expression"])

    # After the drain reply (its flag FI is unique), ahead of every other.
    assert mappers[0]["filter"] == {"response_flag_filter": {"flags": ["FI"]}}
    first = mappers[1]
    expression = expression_of(first)
    assert "request_overall_timeout" in expression and "request_header_timeout" in expression
    error = first["body_format_override"]["json_format"]["error"]
    assert error["type"] == "timeout_error" and error["code"] == "408"
    assert "llmux.client_body_timeout (5s)" in first["body"]["inline_string"]
    shed = mappers[2]
    expression = expression_of(shed)
    assert "ext_proc_error" in expression and "overflow" in expression
    assert "llmux.max_streams_per_worker" in shed["body"]["inline_string"]
    # Every 503 LLMux's Envoy answers itself says when to retry.
    for mapper in mappers:
        fmt = mapper["body_format_override"]["json_format"]["error"]
        added = {h["header"]["key"]: h["header"]["value"] for h in mapper.get("headers_to_add", [])}
        assert (added.get("retry-after") == "1") == (fmt["code"] == "503"), fmt


@pytest.mark.parametrize(
    "key,value",
    [
        ("client_body_timeout", 5),
        ("connection_idle_timeout", 5),
        ("max_connections", 50),
        ("max_streams_per_worker", 50),
    ],
)
def test_changing_a_limit_needs_a_restart(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"llmux.{key}: changing it needs a restart"):
        supervisor._check_reloadable(config(), config(f"  {key}: {value}\n"))


def test_fd_limit_is_raised_to_the_hard_limit(caplog: pytest.LogCaptureFixture) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        lowered = min(soft, 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        now, limit = supervisor.raise_fd_limit(100)
        assert limit == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == now
        if hard != resource.RLIM_INFINITY:
            assert now == hard
        else:
            assert now >= supervisor.fds_needed(100)
        # A cap the limit cannot hold is a warning naming both figures.
        caplog.clear()
        too_many = now  # two descriptors per connection: twice the limit is needed
        supervisor.raise_fd_limit(too_many)
        assert f"file-descriptor limit {now} is below the" in caplog.text
        assert f"llmux.max_connections ({too_many})" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
