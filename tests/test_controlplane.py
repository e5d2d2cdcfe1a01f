"""The supervisor's control plane as a plain object: outcomes in, clusters out."""

from __future__ import annotations

from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2

from llmux_extproc.control.config import parse_config
from llmux_extproc.control.controlplane import ControlPlane, outcome_from_entry
from llmux_extproc.policy.health import Outcome

CONFIG = """
model_list:
  - {model_name: m, litellm_params: {model: openai_compatible/a, api_base: "http://127.0.0.1:9001/v1"}, model_info: {id: a}}
  - {model_name: m, litellm_params: {model: openai_compatible/b, api_base: "http://127.0.0.1:9001/v1"}, model_info: {id: b}}
router_settings: {routing_strategy: latency-based-routing}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def endpoints(clusters: list[dict[str, Any]]) -> dict[str, tuple[str, int]]:
    (group,) = [c for c in clusters if c["name"].startswith("llm_")]
    return {
        ep["metadata"]["filter_metadata"]["llmux"]["d"].split("|")[1]: (
            ep["health_status"],
            ep["load_balancing_weight"],
        )
        for level in group["load_assignment"]["endpoints"]
        for ep in level["lb_endpoints"]
    }


def test_health_goes_out_at_once_and_weight_drift_waits() -> None:
    clock = Clock()
    published: list[list[dict[str, Any]]] = []
    cp = ControlPlane(parse_config(CONFIG), 1, published.append, clock)
    assert cp.update(force=True)
    # Both deployments share an address and stay two endpoints (not merged, unlike EDS).
    assert set(endpoints(published[-1])) == {"a", "b"}
    # A 429 cools `a` down (its group has another deployment): published immediately.
    cp.record(Outcome("a", 429, 0.1, None, False))
    assert cp.update() and endpoints(published[-1])["a"][0] == "UNHEALTHY"
    assert not cp.update()  # nothing new
    clock.now += 6  # cooldown_time (5 s) over
    cp.tick()
    assert cp.update() and endpoints(published[-1])["a"][0] == "HEALTHY"
    # Latencies make `b` the fast one: a material weight change, held MATERIAL_EVERY_S.
    for _ in range(3):
        cp.record(Outcome("a", 200, 1.0, None, False))
        cp.record(Outcome("b", 200, 0.05, None, False))
    clock.now += 2
    assert cp.update()
    weights = endpoints(published[-1])
    assert weights["b"][1] > 10 * weights["a"][1]


def _entry(**fields: Any) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.common_properties.custom_tags["llmux_host"] = fields.pop("host", "0|a")
    if "status" in fields:
        entry.response.response_code.value = fields.pop("status")
    for flag in fields.pop("flags", ()):
        setattr(entry.common_properties.response_flags, flag, True)
    entry.common_properties.upstream_request_attempt_count = fields.pop("attempt", 1)
    return entry


def test_upstream_log_entries_become_outcomes() -> None:
    found = outcome_from_entry(_entry(status=503))
    assert found is not None and found[0].status == 503 and found[1] == "first"
    refused = outcome_from_entry(_entry(flags=["upstream_connection_failure"], attempt=2))
    assert refused is not None and refused[0].status == 0 and refused[1] == "retry"
    fallback = outcome_from_entry(_entry(status=200, host="1|b"))
    assert fallback is not None and fallback[0].deployment == "b" and fallback[1] == "fallback"
    # The processor's own reply (mock, bad request, full bulkhead): no status, no flag,
    # nothing reached the deployment.
    assert outcome_from_entry(_entry()) is None
